"""Stage 0a `demo-data`: generate the embedded ImageNet-like demo set as WebDataset shards (no download).

    kdep demo-data --out out/demo/data
    kdep demo-data --out /tmp/tiny --classes 4 --train-per-class 8 --val-per-class 4 --seed 1
    make demo-data

Reads nothing. Writes ``OUT/train/train-NNNNNN.tar`` and ``OUT/val/val-NNNNNN.tar``, each folder with an
``index.json`` (names, counts, bytes, sha256, class names), and ``OUT/config.demo_data.json``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.demo.shards import DemoSpec, write_demo_data
from stages.common import write_resolved_config
from stages.config import DemoDataConfig


def run(config: DemoDataConfig) -> dict[str, Path]:
    """Generate the demo shards; returns {"train": dir, "val": dir}."""
    spec = DemoSpec(
        config.seed, config.classes, config.train_per_class, config.val_per_class, config.per_shard
    )
    dirs = write_demo_data(spec, config.out)
    write_resolved_config(config.out, "demo_data", config)
    return dirs


def report(config: DemoDataConfig, dirs: dict[str, Path]) -> None:
    for split, d in dirs.items():
        typer.echo(f"{split}: {d}")
