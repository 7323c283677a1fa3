"""Stage 0a `demo-data`: generate the embedded ImageNet-like demo set as WebDataset shards (no download).

    kdep demo-data --out out/demo/data
    kdep demo-data --out /tmp/tiny --classes 4 --train-per-class 8 --val-per-class 4 --seed 1
    make demo-data

Reads nothing. Writes ``OUT/train/train-NNNNNN.tar`` and ``OUT/val/val-NNNNNN.tar``, each folder with an
``index.json`` (names, counts, bytes, sha256, class names), and ``OUT/config.demo_data.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer

from pipeline.demo.shards import CLASS_NAMES, DemoSpec, write_demo_data
from pipeline.manifest import check_range, resolve_config
from stages.common import MANIFEST_HELP, SET_HELP, one_line_errors, write_resolved_config


@dataclass(frozen=True)
class DemoDataConfig:
    out: str = "out/demo/data"  # output folder (train/ and val/ are made inside)
    seed: int = 0  # base seed: the same seed gives byte-identical shards
    classes: int = 10  # number of classes, 1..10
    train_per_class: int = 60  # train images per class
    val_per_class: int = 20  # held-out images per class
    per_shard: int = 100  # samples per shard

    def __post_init__(self) -> None:
        check_range("classes", self.classes, 1, len(CLASS_NAMES))
        check_range("train_per_class", self.train_per_class, 1)
        check_range("val_per_class", self.val_per_class, 1)
        check_range("per_shard", self.per_shard, 1)


def run(config: DemoDataConfig) -> dict[str, Path]:
    """Generate the demo shards; returns {"train": dir, "val": dir}."""
    spec = DemoSpec(
        config.seed, config.classes, config.train_per_class, config.val_per_class, config.per_shard
    )
    dirs = write_demo_data(spec, config.out)
    write_resolved_config(config.out, "demo_data", config)
    return dirs


@one_line_errors
def command(
    out: str = typer.Option(None, help="Output folder."),
    seed: int = typer.Option(None, help="Base seed (same seed, same bytes)."),
    classes: int = typer.Option(None, help="Number of classes (1-10)."),
    train_per_class: int = typer.Option(None, help="Train images per class."),
    val_per_class: int = typer.Option(None, help="Held-out images per class."),
    per_shard: int = typer.Option(None, help="Samples per shard."),
    manifest: Path = typer.Option(None, help=MANIFEST_HELP),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Generate the demo image set (10 classes, mixed JPEG/PNG/grayscale/CMYK) as train/val shards."""
    flags = dict(
        out=out,
        seed=seed,
        classes=classes,
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        per_shard=per_shard,
    )
    config = resolve_config(DemoDataConfig, "demo_data", manifest, flags, set_)
    dirs = run(config)
    for split, d in dirs.items():
        typer.echo(f"{split}: {d}")
