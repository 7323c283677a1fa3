"""Stage 3's inputs as small typed, frozen specs: what the library reads instead of a stage's config object.

``stages/train_student.py`` builds them from its config (the single source of defaults, so these have none);
benchmarks and tests may build them directly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossSpec:
    """Which distillation loss and its weights."""

    name: str  # kdep, cosine, coss, coss-bn, linear-pre, linear-post
    weight: float = 3.0  # w of the KDEP loss (and the baselines' MSE)
    coss: tuple[float, float, float, float, float] = (1.0, 1.0, 0.07, 0.1, 1.0)  # l0, l1, tau_t, tau_s, beta
    coss_head: str = "mlp"  # coss / coss-bn head when D_s != D_t: mlp (the reference) or mlp-bn


@dataclass(frozen=True)
class StudentSpec:
    """One student of the run and the projection that aligns the teacher to it."""

    arch: str  # torchvision model name (resnet18, mobilenet_v2, ...)
    tap: str  # student feature tap (KDEP: pre_relu; CoSS: post_relu)
    projection: str | None  # projection artefact from fit-svd; None: targets are the raw teacher rows


@dataclass(frozen=True)
class DataSpec:
    """What is read and how batches are composed."""

    cache: str  # feature cache folder from cache-teacher
    shards: str  # source shards if they moved since caching; "" = the cache's recorded source
    tap: str  # cached teacher tap paired with the views
    resolution: int  # student input side in pixels; 0 = the teacher's
    view_policy: str  # walk (seeded walk over an image's K views) or random (uniform per epoch)
    shuffle_buffer: int  # per-worker shuffle buffer, in samples
    skip_bad: bool  # count and skip samples that do not join the cache instead of stopping
    neighbours: int  # CoSS neighbour-mined batches: neighbours per anchor; 0 = stream order
    neighbour_pool: int  # neighbours are drawn from each anchor's top-N cosine neighbours
    anchors: int  # anchors per neighbour-mined batch (batch = anchors x (1 + neighbours))
    views_used: int = 0  # train on the first k views of the cache; 0 = all K


@dataclass(frozen=True)
class RecipeSpec:
    """The optimisation recipe (METHOD.md): epochs, batch, SGD lr and weight decay, seed."""

    epochs: int  # passes over the data
    batch_size: int  # samples per rank and step (stream order; neighbour batches use DataSpec.anchors)
    lr: float  # 0 = base lr (0.3 ResNet, 0.1 MobileNetV2) x global batch / 512
    weight_decay: float  # < 0 = from the supplement's table by data_fraction and epochs
    data_fraction: float  # fraction of ImageNet the shards hold (only for the weight-decay table)
    seed: int  # student init, shard order, view schedule, shuffle
    max_steps: int  # stop each epoch after this many steps; 0 = whole epoch (benchmarks)
    lr_schedule: str = "step"  # step (KDEP: /10 at 1/3 and 2/3) or cosine (CoSS: per-epoch cosine to 0)


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
    """A whole stage 3 run: its students and the five specs above."""

    students: tuple[StudentSpec, ...]  # trained together, one data pass
    data: DataSpec
    recipe: RecipeSpec
    loss: LossSpec
    runtime: RuntimeSpec
    output: OutputSpec

    @property
    def batch_per_rank(self) -> int:
        """Samples per step on one rank: anchors x (1 + neighbours) for neighbour batches, else batch_size."""
        if self.data.neighbours:
            return self.data.anchors * (1 + self.data.neighbours)
        return self.recipe.batch_size
