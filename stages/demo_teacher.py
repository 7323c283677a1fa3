"""`kdep demo-teacher`: the small labelled teacher of the demo (a stand-in for a pre-trained ImageNet teacher).

    kdep demo-teacher --manifest manifests/demo.yaml
    kdep demo-teacher --train out/demo/data/train --out out/demo/teacher-r18.pt --epochs 30

Real users pass torchvision weights to cache-teacher instead. Reads labelled shards; writes the state dict at
``--out`` and ``<out>.json`` beside it (the recipe and the final train accuracy).
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.demo.teacher import TeacherRecipe, train_demo_teacher
from pipeline.files import write_json_atomic
from stages.config import DemoTeacherConfig


def run(config: DemoTeacherConfig) -> dict:
    """Train the teacher with labels; returns its info record (also written to ``<out>.json``)."""
    recipe = TeacherRecipe(config.arch, config.epochs, config.batch_size, config.lr, resolution=config.resolution,
                           seed=config.seed, device=config.device)  # fmt: skip
    info = train_demo_teacher(config.train, Path(config.out), recipe, progress=not config.quiet)
    write_json_atomic(Path(config.out).with_suffix(".json"), info)
    return info


def report(config: DemoTeacherConfig, info: dict) -> None:
    typer.echo(f"wrote {config.out}")
