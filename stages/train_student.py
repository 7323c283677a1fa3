"""Stage 3 `train-student`: students from streamed (replayed view, cached teacher row) pairs; no teacher runs.

    kdep train-student --cache out/demo/cache.zarr --projection out/demo/proj-r18.npz --student resnet18 \\
        --epochs 90 --batch-size 512 --out runs/r18
    torchrun --nproc_per_node 8 --no-python kdep train-student --manifest manifests/imagenet10p-r50.yaml
    kdep train-student ... --online-teacher      # the baseline: the teacher runs live on the same views

Reads the cache (read-only: many students can train from one cache at once), its source shards (checked against
the cache's record, joined by key), and the projection(s). Writes into ``--out``: ``checkpoints/epoch-NNNN.pt``
(atomic; a re-run resumes from the newest), ``backbone-<student>.pt`` (torchvision-loadable without the
classifier), ``metrics.jsonl``, ``loss.png``, ``provenance.json``, ``config.train_student.json`` and, last,
``done.json``. Several ``--student``/``--projection`` pairs train in one data pass, sharing decoding.
"""

from __future__ import annotations

import typer

from pipeline.student.run import train_students
from stages.config import TrainStudentConfig


def run(config: TrainStudentConfig) -> dict:
    """Train every student for ``epochs`` (resuming from the newest checkpoint); returns the final metrics."""
    return train_students(config)


def report(config: TrainStudentConfig, result: dict) -> None:
    for name, m in result["students"].items():
        typer.echo(f"{name}: loss {m['loss']:.4g} after {result['epochs']} epochs -> {m['backbone']}")
