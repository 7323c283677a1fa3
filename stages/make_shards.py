"""Stage 0b `make-shards`: ImageFolder (one sub-folder per class) -> WebDataset shards + index, optional subset.

    kdep make-shards --from-folder /data/imagenet/train --out /data/shards/imagenet-train --per-shard 1000
    kdep make-shards --from-folder /data/imagenet/train --out /data/shards/in10p --fraction 0.1 --seed 0
    kdep make-shards --from-folder photos/ --out shards/ --skip-bad --workers 8

Reads each image file once. Writes ``OUT/<prefix>-NNNNNN.tar`` (``<key>.jpg|png``, ``<key>.cls``), one process
per core by default, each shard with a done marker ``OUT/done/<prefix>-NNNNNN.json``; then ``OUT/kept.txt``
(images written), ``OUT/skipped.txt`` (with ``--skip-bad``), ``OUT/index.json`` (last) and
``OUT/config.make_shards.json``. The output does not depend on ``--workers``. Rerun the same command after a crash:
finished shards are checked (size, sha256, inputs unchanged) and kept, the others written.
"""

from __future__ import annotations

import typer

from pipeline.data.folder import FolderResult, folder_to_shards
from stages.common import write_resolved_config
from stages.config import MakeShardsConfig


def run(config: MakeShardsConfig) -> FolderResult:
    result = folder_to_shards(
        config.from_folder,
        config.out,
        config.per_shard,
        config.fraction,
        config.seed,
        config.skip_bad,
        config.prefix,
        config.workers,
    )
    write_resolved_config(config.out, "make_shards", config, {"skipped": len(result.skipped)})
    return result


def report(config: MakeShardsConfig, result: FolderResult) -> None:
    n, shards, kept = sum(s["samples"] for s in result.shards), len(result.shards), result.reused
    typer.echo(f"{n} images of {len(result.classes)} classes in {shards} shards in {config.out}")
    typer.echo(
        f"wrote {shards - kept} of them, kept {kept} finished by an earlier run (size, sha256, inputs checked)"
        if kept
        else f"wrote all {shards} of them"
    )
    if result.skipped:
        typer.echo(f"skipped {len(result.skipped)} unreadable images (listed in {config.out}/skipped.txt):")
        for rel, _ in result.skipped[:10]:
            typer.echo(f"  {rel}")
