"""Stage 3's inputs as small typed, frozen specs: what the library reads instead of a stage's config object.

``stages/train_student.py`` builds them from its config (the single source of defaults, so these have none);
benchmarks and tests may build them directly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class LossSpec:
    """Which distillation loss and its weights."""

    name: str  # kdep, cosine, coss, coss-bn, linear-pre, linear-post
    weight: float = 3.0  # w of the KDEP loss (and the baselines' MSE)
    coss: tuple[float, float, float, float, float] = (1.0, 1.0, 0.07, 0.1, 1.0)  # l0, l1, tau_t, tau_s, beta
    coss_head: str = "mlp"  # coss / coss-bn head when D_s != D_t: mlp (the reference) or mlp-bn
    pathway_head: tuple[str, int] = (
        "mlp",
        512,
    )  # distpro: each pathway's transform block (mlp or linear), hidden


@dataclass(frozen=True)
class TargetSpec:
    """One distillation target: a student tap regresses a cached teacher tap; the run's loss is the sum over its
    targets of ``weight`` x the configured loss of each."""

    student_tap: str  # student feature tap (KDEP: pre_relu; CoSS: post_relu; multi-layer: stageK)
    cache_tap: str  # cached teacher tap: a key of the store's taps (plain ``pre_relu`` or ``LABEL/TAP``)
    weight: float = 1.0  # w_i in sum_i w_i * loss_i (on top of the loss's own weight, e.g. KDEP's w)

    @property
    def name(self) -> str:
        """``STUDENT_TAP=CACHE_TAP``: how settings, metrics (``loss/<name>``) and records name the target."""
        return f"{self.student_tap}={self.cache_tap}"


@dataclass(frozen=True)
class StudentSpec:
    """One student of the run and, per target, the projection that aligns the teacher tap to it."""

    arch: str  # torchvision model name (resnet18, mobilenet_v2, ...)
    projections: tuple[str | None, ...]  # one per target: fit-svd artefact, or None (the raw teacher rows)


@dataclass(frozen=True)
class DataSpec:
    """What is read and how batches are composed."""

    cache: str  # feature cache folder from cache-teacher
    shards: str  # source shards if they moved since caching; "" = the cache's recorded source
    taps: tuple[str, ...]  # the targets' distinct cached teacher taps paired with the views, in target order
    resolution: int  # student input side in pixels; 0 = the teacher's
    view_policy: str  # walk (seeded walk over an image's K views) or random (uniform per epoch)
    shuffle_buffer: int  # per-worker shuffle buffer, in samples
    skip_bad: bool  # count and skip samples that do not join the cache instead of stopping
    neighbours: int  # CoSS neighbour-mined batches: neighbours per anchor; 0 = stream order
    neighbour_pool: int  # neighbours are drawn from each anchor's top-N cosine neighbours
    anchors: int  # anchors per neighbour-mined batch (batch = anchors x (1 + neighbours))
    views_used: int = 0  # train on the first k views of the cache; 0 = all K
    fresh_views: bool = (
        False  # a fresh view of every image every epoch, outside the pool (online teacher only)
    )


@dataclass(frozen=True)
class RecipeSpec:
    """The optimisation recipe (KDEP supplement B.1 and Table S.4): epochs, batch, SGD lr and weight decay, seed."""

    epochs: int  # passes over the data
    batch_size: int  # samples per rank and step (stream order; neighbour batches use DataSpec.anchors)
    lr: float  # 0 = base lr (0.3 ResNet, 0.1 MobileNetV2) x global batch / 512
    weight_decay: float  # < 0 = from the supplement's table by data_fraction and epochs
    data_fraction: float  # fraction of ImageNet the shards hold (only for the weight-decay table)
    seed: int  # student init, shard order, view schedule, shuffle
    max_steps: int  # stop each epoch after this many steps; 0 = whole epoch (benchmarks)
    lr_schedule: str = "step"  # step (KDEP: /10 at 1/3 and 2/3), cosine (per epoch, to 0) or cosine-coss
    global_batch: int = 0  # images per step over all ranks (0: batch_size is per rank); replaces batch_size


@dataclass(frozen=True)
class RuntimeSpec:
    """Where and how the run executes; none of it changes the maths except the AMP mode."""

    device: str  # auto, cpu, cuda or cuda:N
    amp: str  # auto (bf16 on CUDA), bf16, fp16 or off; CPU always runs float32
    channels_last: bool  # channels_last views and students on CUDA
    workers: int  # DataLoader worker processes per rank; -1 = the CPU cores available per rank (auto)
    prefetch_factor: int  # batches each DataLoader worker keeps ready (shared memory: workers x this x batch)
    online_teacher: bool  # run the recorded teacher live on the same views instead of reading the cache


@dataclass(frozen=True)
class OutputSpec:
    """Where the run writes and how much it says."""

    out: str  # run folder (checkpoints, backbones, metrics.jsonl, loss.png, provenance.json, done.json)
    log_every: int  # steps between per-step metrics records (the only per-step host syncs)
    checkpoint_every: int  # epochs between checkpoints; the last epoch is always checkpointed
    quiet: bool  # no progress bar or messages


@dataclass(frozen=True)
class TrainSpec:
    """A whole stage 3 run: its targets, its students and the five specs above."""

    targets: tuple[TargetSpec, ...]  # every student distils all of them (one: today's single-tap KDEP)
    students: tuple[StudentSpec, ...]  # trained together, one data pass
    data: DataSpec
    recipe: RecipeSpec
    loss: LossSpec
    runtime: RuntimeSpec
    output: OutputSpec
    schedule: WeightSchedule | None = None  # target weights that change over training (DistPro); None: fixed

    @property
    def batch_per_rank(self) -> int:
        """Samples per step on one rank: anchors x (1 + neighbours) for neighbour batches, else batch_size."""
        if self.data.neighbours:
            return self.data.anchors * (1 + self.data.neighbours)
        return self.recipe.batch_size


@dataclass(frozen=True)
class WeightSchedule:
    """Target weights over training (a searched DistPro process): ``weights[k][i]`` is target i's weight at training
    progress ``progress[k]`` (increasing, in [0, 1]); in between, linear interpolation; they replace the targets'
    fixed weights. ``record`` says where the schedule came from (written to provenance.json)."""

    progress: tuple[float, ...]
    weights: tuple[tuple[float, ...], ...]
    record: tuple[tuple[str, object], ...] = ()

    @functools.cached_property
    def _columns(self) -> tuple:
        """(progress, one weight column per target) as float64 arrays, built once (``at`` runs every step)."""
        import numpy as np

        table = np.asarray(self.weights, np.float64)
        return np.asarray(self.progress, np.float64), [table[:, i] for i in range(table.shape[1])]

    def at(self, progress: float) -> tuple[float, ...]:
        """Every target's weight at ``progress`` (clipped to [0, 1])."""
        import numpy as np

        p = min(max(progress, 0.0), 1.0)
        x, columns = self._columns
        return tuple(float(np.interp(p, x, w)) for w in columns)


def distinct_cache_taps(targets: tuple[TargetSpec, ...]) -> tuple[str, ...]:
    """The cache taps the targets read, each once, in the order the targets first name them."""
    return tuple(dict.fromkeys(t.cache_tap for t in targets))
