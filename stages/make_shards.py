"""Stage 0b `make-shards`: ImageFolder (one sub-folder per class) -> WebDataset shards + index, optional subset.

    kdep make-shards --from-folder /data/imagenet/train --out /data/shards/imagenet-train --per-shard 1000
    kdep make-shards --from-folder /data/imagenet/train --out /data/shards/in10p --fraction 0.1 --seed 0
    kdep make-shards --from-folder photos/ --out shards/ --skip-bad

Reads the image files. Writes ``OUT/<prefix>-NNNNNN.tar`` (``<key>.jpg|png``, ``<key>.cls``), ``OUT/index.json``,
``OUT/kept.txt`` (images written), ``OUT/skipped.txt`` (with ``--skip-bad``) and ``OUT/config.make_shards.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer

from pipeline.data.folder import FolderResult, folder_to_shards
from pipeline.manifest import ConfigError, check_range, resolve_config
from stages.common import MANIFEST_HELP, SET_HELP, one_line_errors, write_resolved_config


@dataclass(frozen=True)
class MakeShardsConfig:
    from_folder: str = ""  # ImageFolder root: <root>/<class>/<image>
    out: str = ""  # output shard folder
    per_shard: int = 1000  # samples per shard (ImageNet: ~1000 gives ~110 MB shards)
    fraction: float = 1.0  # fraction of the images of every class to keep, (0, 1]
    seed: int = 0  # seeds the subset choice and the sample order
    skip_bad: bool = False  # skip unreadable images (counted and listed) instead of stopping
    prefix: str = "train"  # shard name prefix

    def __post_init__(self) -> None:
        if not self.from_folder or not self.out:
            raise ConfigError("keys 'from_folder' and 'out' are required (--from-folder DIR --out OUTDIR)")
        check_range("per_shard", self.per_shard, 1)
        check_range("fraction", self.fraction, 0.0, 1.0, open_lo=True)


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


@one_line_errors
def command(
    from_folder: str = typer.Option(None, help="ImageFolder root (one sub-folder per class)."),
    out: str = typer.Option(None, help="Output shard folder."),
    per_shard: int = typer.Option(None, help="Samples per shard."),
    fraction: float = typer.Option(None, help="Keep this fraction of every class (0.1 = KDEP's 10% subset)."),
    seed: int = typer.Option(None, help="Seed for the subset and the order."),
    skip_bad: bool = typer.Option(None, "--skip-bad", help="Skip unreadable images (counted and listed)."),
    prefix: str = typer.Option(None, help="Shard name prefix."),
    manifest: Path = typer.Option(None, help=MANIFEST_HELP),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Convert an ImageFolder to WebDataset shards with stable keys and a shard index."""
    flags = dict(
        from_folder=from_folder,
        out=out,
        per_shard=per_shard,
        fraction=fraction,
        seed=seed,
        skip_bad=skip_bad,
        prefix=prefix,
    )
    config = resolve_config(MakeShardsConfig, "make_shards", manifest, flags, set_)
    result = run(config)
    n = sum(s["samples"] for s in result.shards)
    typer.echo(
        f"wrote {n} images of {len(result.classes)} classes to {len(result.shards)} shards in {config.out}"
    )
    if result.skipped:
        typer.echo(f"skipped {len(result.skipped)} unreadable images (listed in {config.out}/skipped.txt):")
        for rel, _ in result.skipped[:10]:
            typer.echo(f"  {rel}")
