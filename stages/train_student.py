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

from dataclasses import dataclass
from pathlib import Path

import typer

from pipeline.manifest import ConfigError, check_choice, check_range, resolve_config
from pipeline.models import TAPS
from pipeline.student.losses import LOSSES
from pipeline.student.pairs import VIEW_POLICIES
from pipeline.student.run import train_students
from stages.common import MANIFEST_HELP, SET_HELP, one_line_errors


@dataclass(frozen=True)
class TrainStudentConfig:
    cache: str = ""  # feature cache (Zarr store) from cache-teacher
    projection: tuple[
        str, ...
    ] = ()  # projection artefact(s) from fit-svd, one per student (optional for coss/linear-*)
    student: tuple[str, ...] = ("resnet18",)  # torchvision model name(s); several train in one data pass
    out: str = ""  # run folder
    shards: str = ""  # source shards, if they moved since caching (default: the cache's recorded source)
    tap: str = "pre_relu"  # cached teacher tap paired with the views
    student_tap: str = "pre_relu"  # student feature tap (KDEP: pre_relu; CoSS: post_relu)
    loss: str = "kdep"  # kdep, cosine, coss, linear-pre, linear-post
    loss_weight: float = 3.0  # w in w * MSE (METHOD.md: 3, 20, 1 depending on the teacher)
    coss_l0: float = 1.0  # CoSS feature-similarity weight
    coss_l1: float = 1.0  # CoSS space-similarity weight
    coss_tau_t: float = 0.07  # CoSS teacher temperature
    coss_tau_s: float = 0.1  # CoSS student temperature
    neighbours: int = (
        0  # CoSS neighbour-mined batches: neighbours drawn per anchor (CoSS: 15); 0 = stream order
    )
    neighbour_pool: int = 31  # draw them from each anchor's top-N cosine neighbours (centre view 0)
    anchors: int = 16  # anchors per batch (batch = anchors x (1 + neighbours), replacing batch_size)
    epochs: int = 90  # passes over the data
    batch_size: int = 512  # per rank
    lr: float = 0.0  # 0 = base lr (0.3 ResNet, 0.1 MobileNetV2) x global batch / 512
    weight_decay: float = -1.0  # < 0 = from the supplement's table by data_fraction and epochs
    data_fraction: float = 0.1  # fraction of ImageNet the shards hold (only for the weight-decay table)
    resolution: int = 0  # student input side; 0 = the teacher's
    view_policy: str = (
        "walk"  # walk: each image walks its K views in a seeded order; random: uniform per epoch
    )
    shuffle_buffer: int = 256  # per-worker shuffle buffer (samples)
    seed: int = 0  # student init, shard order, view schedule, shuffle
    workers: int = 2  # DataLoader workers per rank
    device: str = "auto"  # auto, cpu, cuda
    amp: str = "auto"  # auto (bf16 on CUDA), bf16, fp16, off
    channels_last: bool = True  # channels_last on CUDA
    online_teacher: bool = False  # run the teacher live on the same views instead of reading the cache
    skip_bad: bool = False  # count and skip samples that do not join the cache
    max_steps: int = 0  # stop each epoch after this many steps (0 = whole epoch; for benchmarks)
    log_every: int = 10  # steps between metrics records
    quiet: bool = False  # no progress bar

    def __post_init__(self) -> None:
        if not self.cache or not self.out:
            raise ConfigError("keys 'cache' and 'out' are required (--cache STORE --out RUN_DIR)")
        check_choice("loss", self.loss, LOSSES)
        check_choice("tap", self.tap, TAPS)
        check_choice("student_tap", self.student_tap, TAPS)
        if self.loss in ("kdep", "cosine") and len(self.projection) != len(self.student):
            raise ConfigError(
                f"key 'projection': the {self.loss} loss needs one projection per student "
                f"({len(self.student)} students, {len(self.projection)} projections); run kdep fit-svd"
            )
        if self.projection and len(self.projection) != len(self.student):
            raise ConfigError("key 'projection': give one projection per student, in the same order")
        check_range("neighbours", self.neighbours, 0)
        if self.neighbours > self.neighbour_pool:
            raise ConfigError(
                f"key 'neighbours': {self.neighbours} cannot be drawn from neighbour_pool {self.neighbour_pool}"
            )
        check_range("anchors", self.anchors, 1)
        check_range("epochs", self.epochs, 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("lr", self.lr, 0.0)
        check_range("data_fraction", self.data_fraction, 0.0, 1.0, open_lo=True)
        check_range("resolution", self.resolution, 0, 1024)
        check_choice("view_policy", self.view_policy, VIEW_POLICIES)
        check_range("workers", self.workers, 0, 64)
        check_choice("device", self.device.split(":")[0], ("auto", "cpu", "cuda"))
        check_choice("amp", self.amp, ("auto", "bf16", "fp16", "off"))
        check_range("max_steps", self.max_steps, 0)
        check_range("log_every", self.log_every, 1)
        for name in ("coss_tau_t", "coss_tau_s"):
            check_range(name, getattr(self, name), 0.0, open_lo=True)


def run(config: TrainStudentConfig) -> dict:
    """Train every student for ``epochs`` (resuming from the newest checkpoint); returns the final metrics."""
    return train_students(config)


@one_line_errors
def command(
    cache: str = typer.Option(None, help="Feature cache from cache-teacher."),
    projection: list[str] = typer.Option(
        None, "--projection", help="Projection from fit-svd (one per student)."
    ),
    student: list[str] = typer.Option(None, "--student", help="torchvision student name (repeatable)."),
    out: str = typer.Option(None, help="Run folder."),
    shards: str = typer.Option(None, help="Source shards, if moved since caching."),
    loss: str = typer.Option(None, help="kdep, cosine, coss, linear-pre, linear-post."),
    loss_weight: float = typer.Option(None, help="w of the KDEP loss."),
    epochs: int = typer.Option(None, help="Epochs."),
    batch_size: int = typer.Option(None, help="Batch size per rank."),
    lr: float = typer.Option(None, help="Learning rate (default: scaled from the batch size)."),
    resolution: int = typer.Option(None, help="Student input side (default: the teacher's)."),
    seed: int = typer.Option(None, help="Seed."),
    workers: int = typer.Option(None, help="DataLoader workers per rank."),
    device: str = typer.Option(None, help="auto, cpu or cuda."),
    online_teacher: bool = typer.Option(None, "--online-teacher", help="Run the teacher live (baseline)."),
    skip_bad: bool = typer.Option(None, "--skip-bad", help="Count and skip samples that do not join."),
    quiet: bool = typer.Option(None, "--quiet", help="No progress bar."),
    manifest: Path = typer.Option(None, help=MANIFEST_HELP),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Train student backbones from the cache (KDEP, CoSS, cosine or parametric baselines)."""
    flags = dict(
        cache=cache,
        projection=projection or None,
        student=student or None,
        out=out,
        shards=shards,
        loss=loss,
        loss_weight=loss_weight,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        resolution=resolution,
        seed=seed,
        workers=workers,
        device=device,
        online_teacher=online_teacher,
        skip_bad=skip_bad,
        quiet=quiet,
    )
    config = resolve_config(TrainStudentConfig, "train_student", manifest, flags, set_)
    result = run(config)
    for name, m in result["students"].items():
        typer.echo(f"{name}: loss {m['loss']:.4g} after {result['epochs']} epochs -> {m['backbone']}")
