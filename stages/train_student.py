"""Stage 3 `train-student`: students from streamed (replayed view, cached teacher row) pairs; no teacher runs.

    kdep train-student --cache out/demo/cache --projection out/demo/proj-r18.npz --student resnet18 \\
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

import os

import typer

from pipeline.manifest import config_to_dict
from pipeline.student.run import train_students
from pipeline.student.specs import (
    DataSpec,
    LossSpec,
    OutputSpec,
    RecipeSpec,
    RuntimeSpec,
    StudentSpec,
    TrainSpec,
)
from stages.config import TrainStudentConfig

# CoSS's reference set-up (coss-pytorch; METHOD.md), as manifests/coss.yaml writes it: training settings, and the
# cache settings its teacher rows need. Epochs and batch are left out (they follow the compute budget).
COSS_REFERENCE = {
    "tap": "post_relu", "student_tap": "post_relu", "neighbours": 15, "neighbour_pool": 31, "anchors": 16,
    "lr": 0.03, "weight_decay": 1e-4, "lr_schedule": "cosine", "coss_head": "mlp",
}  # fmt: skip
COSS_REFERENCE_CACHE = {"recipe": "coss", "center_first": True, "center_recipe": "center-coss"}


def coss_differences(config: TrainStudentConfig, cache_views: dict) -> list[str]:
    """How a ``--loss coss`` run differs from CoSS's reference set-up: ``key value (reference value)`` items."""
    if config.loss != "coss":
        return []
    out = [f"{k} {getattr(config, k)} ({v})" for k, v in COSS_REFERENCE.items() if getattr(config, k) != v]
    out += [
        f"cache {k} {cache_views.get(k)} ({v})"
        for k, v in COSS_REFERENCE_CACHE.items()
        if cache_views.get(k) != v
    ]
    return out


def warn_if_not_coss_reference(config: TrainStudentConfig) -> None:
    """One line on stderr (rank 0) when a CoSS run is not the reference set-up; the run goes on."""
    if config.loss != "coss" or os.environ.get("RANK", "0") != "0":
        return
    from pipeline.cache.store import open_store

    diffs = coss_differences(config, open_store(config.cache).provenance["views"])
    if diffs:
        typer.echo(f"train-student: --loss coss differs from CoSS's reference set-up (manifests/coss.yaml): "
                   f"{', '.join(diffs)}", err=True)  # fmt: skip


def run(config: TrainStudentConfig) -> dict:
    """Train every student for ``epochs`` (resuming from the newest checkpoint); returns the final metrics."""
    c = config
    warn_if_not_coss_reference(config)
    projections = c.projection or (None,) * len(c.student)  # None: the raw teacher rows are the targets
    students = tuple(StudentSpec(a, c.student_tap, p) for a, p in zip(c.student, projections, strict=True))
    spec = TrainSpec(
        students=students,
        data=DataSpec(cache=c.cache, shards=c.shards, tap=c.tap, resolution=c.resolution, view_policy=c.view_policy,
                      shuffle_buffer=c.shuffle_buffer, skip_bad=c.skip_bad, neighbours=c.neighbours,
                      neighbour_pool=c.neighbour_pool, anchors=c.anchors, views_used=c.views_used),
        recipe=RecipeSpec(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, weight_decay=c.weight_decay,
                          data_fraction=c.data_fraction, seed=c.seed, max_steps=c.max_steps,
                          lr_schedule=c.lr_schedule),
        loss=LossSpec(c.loss, c.loss_weight, coss=(c.coss_l0, c.coss_l1, c.coss_tau_t, c.coss_tau_s, 1.0),
                      coss_head=c.coss_head),
        runtime=RuntimeSpec(device=c.device, amp=c.amp, channels_last=c.channels_last, workers=c.workers,
                            prefetch_factor=c.prefetch_factor, online_teacher=c.online_teacher),
        output=OutputSpec(out=c.out, log_every=c.log_every, checkpoint_every=c.checkpoint_every, quiet=c.quiet),
    )  # fmt: skip
    return train_students(spec, settings=config_to_dict(config))  # settings: recorded, compared on resume


def report(config: TrainStudentConfig, result: dict) -> None:
    for name, m in result["students"].items():
        typer.echo(f"{name}: loss {m['loss']:.4g} after {result['epochs']} epochs -> {m['backbone']}")
