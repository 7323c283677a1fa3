"""Stage 3 pieces: a student with its heads, the KDEP recipe (SGD, step schedule, weight decay table), one step.

Recipe (METHOD.md): SGD momentum 0.9, lr = base * (global batch / 512) with base 0.3 for ResNets and 0.1 for
MobileNetV2, divided by 10 at 1/3 and 2/3 of training, no warm-up, weight decay from the supplement's table by
data fraction and epochs. AMP (bf16) and channels_last on CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.data.views import normalize_views
from pipeline.models import (
    FeatureTaps,
    ModelError,
    build_for_resolution,
    last_linear,
    model_preprocessing,
    tap_dims,
)
from pipeline.projection.artefact import Projection
from pipeline.runtime import Dist, autocast_for
from pipeline.student.losses import (
    BatchNormHead,
    CossHead,
    LinearHead,
    cosine_loss,
    coss_bn_loss,
    coss_loss,
    kdep_loss,
)
from pipeline.student.specs import LossSpec, TrainSpec

# Supplement Table S.4: (data fraction, epochs) -> weight decay.
WEIGHT_DECAY_TABLE = {(0.1, 90): 5e-4, (0.1, 180): 4e-4, (1.0, 9): 5e-4, (1.0, 18): 4e-4, (1.0, 90): 1e-4}
BASE_LR = {"mobilenet_v2": 0.1}  # at batch 512; every other student: 0.3 (ResNet-18 in the paper)


def weight_decay_for(fraction: float, epochs: int) -> float:
    """The table entry nearest (in log scale) to the data fraction, then to the number of epochs."""
    frac = min({f for f, _ in WEIGHT_DECAY_TABLE}, key=lambda f: abs(math.log(f) - math.log(fraction)))
    ep = min(
        (e for f, e in WEIGHT_DECAY_TABLE if f == frac), key=lambda e: abs(math.log(e) - math.log(epochs))
    )
    return WEIGHT_DECAY_TABLE[(frac, ep)]


def base_lr_for(arch: str, global_batch: int) -> float:
    return BASE_LR.get(arch, 0.3) * global_batch / 512


def lr_at(epoch: int, epochs: int, base: float, schedule: str = "step") -> float:
    """The learning rate of ``epoch``. ``step`` (KDEP): base, base/10 from 1/3 of training, base/100 from 2/3
    (reference: every 30 of 90 epochs). ``cosine`` (CoSS, MoCo's per-epoch rule): base * (1 + cos(pi * epoch /
    epochs)) / 2."""
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    drops = sum(epoch >= math.ceil(epochs * f) for f in (1 / 3, 2 / 3))
    return base * (0.1**drops)


class Student(nn.Module):
    """A torchvision or timm backbone (random init), its feature tap and the loss's trainable head (if any), fed
    the ImageNet-normalised views re-normalised with the backbone's own mean/std (its library's: a no-op for
    torchvision's and timm's ImageNet ones). forward -> (B, D_out)."""

    def __init__(
        self, arch: str, tap: str, loss: str, d_target: int, resolution: int, coss_head: str = "mlp"
    ) -> None:
        super().__init__()
        model, identity = build_for_resolution(arch, None, resolution)
        self.arch, self.tap, self.loss = arch, tap, loss
        self.backbone = model
        for p in last_linear(
            model
        ).parameters():  # the classifier is not on the feature path: frozen, so that
            p.requires_grad_(False)  # DDP sees no unused parameters and the optimizer does not decay it
        self.preprocessing = model_preprocessing(model, identity)
        self.model_kwargs = identity.get(
            "model_kwargs", {}
        )  # what timm.create_model needs to load the export
        self.taps = FeatureTaps(model, (tap,), from_imagenet=self.preprocessing)
        self.d_feature = tap_dims(model, (tap,), resolution=min(resolution, 64))[tap]
        self.head: nn.Module = nn.Identity()
        if loss in ("linear-pre", "linear-post"):
            self.head = LinearHead(self.d_feature, d_target, after_relu=loss == "linear-post")
        elif loss == "coss" and self.d_feature != d_target:
            self.head = CossHead(self.d_feature, d_target, kind=coss_head)
        elif loss == "coss-bn":
            self.head = BatchNormHead(self.d_feature, d_target, kind=coss_head)
        elif loss in ("kdep", "cosine") and self.d_feature != d_target:
            raise ModelError(
                f"student {arch} {tap} width is {self.d_feature} but the projection gives {d_target}; "
                f"fit a projection with --dim {self.d_feature} (kdep fit-svd)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.taps(x)[self.tap])


@dataclass(frozen=True)
class StepContext:
    """How every step of a run executes, shared by all its students: device, precision, loss, target source."""

    device: torch.device
    amp: str  # resolved AMP mode (pipeline.runtime.resolve_amp): off, bf16 or fp16; autocast on CUDA only
    loss: LossSpec
    channels_last: bool = False  # channels_last views on CUDA
    tap: str = "pre_relu"  # teacher tap the targets come from
    teacher: nn.Module | None = None  # live teacher FeatureTaps (--online-teacher); None: the cached rows


def compute_loss(
    spec: LossSpec, out: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(B, D_out)`` student output and ``(B, D_out)`` float32 targets -> (scalar loss, named detached scalar
    parts, on the device)."""
    if spec.name == "kdep" or spec.name.startswith("linear"):
        return kdep_loss(out, target, spec.weight)
    if spec.name == "cosine":
        return cosine_loss(out, target)
    if spec.name == "coss-bn":
        return coss_bn_loss(out, target)
    l0, l1, tau_t, tau_s, beta = spec.coss
    return coss_loss(out, target, l0, l1, tau_t, tau_s, beta)


def make_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast (bf16 and float32 need none: the scaler is then a pass-through)."""
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and amp == "fp16")


def views_on_device(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """(B, 3, r, r) uint8 (before normalisation) or float32 normalised views -> float32 normalised views on the
    context's device (channels_last on CUDA when asked). uint8 is normalised there in one fused multiply-subtract,
    bit-identical to the worker's normalisation (:func:`pipeline.data.views.normalize_views`)."""
    x = normalize_views(x.to(ctx.device, non_blocking=True))
    if ctx.device.type == "cuda" and ctx.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def teacher_targets(rows: torch.Tensor, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """(B, D_t) float32 teacher features: the cached rows (B, D_t) float16, or the live teacher on the views ``x``
    (B, 3, r, r) already on the device."""
    if ctx.teacher is None:
        return rows.to(ctx.device, non_blocking=True).float()
    # no_grad, not inference_mode: the loss's backward saves the targets
    with torch.no_grad(), autocast_for(ctx.device, ctx.amp):
        return ctx.teacher(x)[ctx.tap].float()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    target: torch.Tensor,
    ctx: StepContext,
    scaler: torch.amp.GradScaler | None = None,
    to_host: bool = True,
) -> tuple[float | torch.Tensor, dict[str, float | torch.Tensor]]:
    """One SGD step on views ``x`` (B, 3, r, r) and targets (B, D_out) float32, both on ``ctx.device``;
    returns the loss and its named parts as floats, or with ``to_host=False`` as detached scalar tensors on the
    device (no host sync per step on CUDA: the loop converts them only when it logs)."""
    with autocast_for(ctx.device, ctx.amp):
        out = model(x)
    loss, parts = compute_loss(ctx.loss, out.float(), target)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    if to_host:
        return float(loss.detach()), {k: float(v) for k, v in parts.items()}
    return loss.detach(), parts


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.SGD:
    """SGD, momentum 0.9, over the trainable parameters (the frozen classifier is left out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


@dataclass
class Trainee:
    """One student with everything that steps it."""

    name: str
    model: nn.Module  # Student, or DDP(Student)
    student: Student
    optimizer: torch.optim.Optimizer
    projection: Projection | None  # teacher row (B, D_t) -> target (B, D_s); None: the raw row is the target
    base_lr: float
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling (None or disabled otherwise)
    losses: list[torch.Tensor] = field(default_factory=list)  # this epoch's detached scalar losses (device)


def build_trainees(spec: TrainSpec, projections: list[Projection | None], d_teacher: int, resolution: int,
                   device: torch.device, amp: str, job: Dist) -> list[Trainee]:  # fmt: skip
    """Each student seeded with ``seed + 1000 i`` (the same init on every rank), with its optimizer and scaler."""
    recipe = spec.recipe
    global_batch = spec.batch_per_rank * job.world  # the lr scales with the batch actually trained on
    wd = (
        recipe.weight_decay
        if recipe.weight_decay >= 0
        else weight_decay_for(recipe.data_fraction, recipe.epochs)
    )
    archs = [s.arch for s in spec.students]
    out = []
    for i, (s, proj) in enumerate(zip(spec.students, projections, strict=True)):
        torch.manual_seed(recipe.seed + 1000 * i)
        d_target = proj.dim_student if proj is not None else d_teacher
        student = Student(s.arch, s.tap, spec.loss.name, d_target, resolution, spec.loss.coss_head).to(device)
        if device.type == "cuda" and spec.runtime.channels_last:
            student = student.to(memory_format=torch.channels_last)
        model: nn.Module = student
        if job.world > 1:
            # broadcast_buffers=False: no per-step broadcast of BatchNorm running stats from rank 0. Training
            # uses batch statistics, so gradients and the (identically replicated) parameters never depend on
            # the buffers; rank 0's own running stats are what is checkpointed and exported.
            model = nn.parallel.DistributedDataParallel(
                student, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
        lr = recipe.lr or base_lr_for(s.arch, global_batch)
        name = s.arch if archs.count(s.arch) == 1 else f"{s.arch}-{i}"
        out.append(
            Trainee(name, model, student, make_optimizer(model, lr, wd), proj, lr, make_scaler(device, amp))
        )
    return out
