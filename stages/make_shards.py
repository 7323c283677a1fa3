"""Stage 0b `make-shards`: ImageFolder (one sub-folder per class) -> WebDataset shards + index, optional subset.

    kdep make-shards --from-folder /data/imagenet/train --out /data/shards/imagenet-train --per-shard 1000
    kdep make-shards --from-folder /data/imagenet/train --out /data/shards/in10p --fraction 0.1 --seed 0
    kdep make-shards --from-folder photos/ --out shards/ --skip-bad

Reads the image files. Writes ``OUT/<prefix>-NNNNNN.tar`` (``<key>.jpg|png``, ``<key>.cls``), ``OUT/index.json``,
``OUT/kept.txt`` (images written), ``OUT/skipped.txt`` (with ``--skip-bad``) and ``OUT/config.make_shards.json``.
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
    )
    write_resolved_config(config.out, "make_shards", config, {"skipped": len(result.skipped)})
    return result


def report(config: MakeShardsConfig, result: FolderResult) -> None:
    n = sum(s["samples"] for s in result.shards)
    typer.echo(
        f"wrote {n} images of {len(result.classes)} classes to {len(result.shards)} shards in {config.out}"
    )
    if result.skipped:
        typer.echo(f"skipped {len(result.skipped)} unreadable images (listed in {config.out}/skipped.txt):")
        for rel, _ in result.skipped[:10]:
            typer.echo(f"  {rel}")
