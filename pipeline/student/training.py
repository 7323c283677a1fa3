"""Stage 3 pieces: a student with its heads, the KDEP recipe (SGD, step schedule, weight decay table), one step.

Recipe (the KDEP paper and its supplement, section B.1 and Table S.4): SGD momentum 0.9, lr = base * (global
batch / 512) with base 0.3 for ResNets and 0.1 for MobileNetV2, divided by 10 at 1/3 and 2/3 of training, no
warm-up, weight decay from the supplement's table by data fraction and epochs. AMP (bf16) and channels_last on
CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
from pipeline.runtime import autocast_for
from pipeline.student.losses import (
    BatchNormHead,
    CossHead,
    LinearHead,
    cosine_loss,
    coss_bn_loss,
    coss_loss,
    kdep_loss,
)
from pipeline.student.specs import LossSpec, TargetSpec, distinct_cache_taps

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


COSS_FLAT_EPOCHS = 5  # coss-pytorch: warmup_epochs = 5 with lr_mult = 1, so its "warm-up" holds the base lr


def lr_at(epoch: int, epochs: int, base: float, schedule: str = "step") -> float:
    """The learning rate of ``epoch``. ``step`` (KDEP): base, base/10 from 1/3 of training, base/100 from 2/3
    (reference: every 30 of 90 epochs). ``cosine`` (MoCo's per-epoch rule): base * (1 + cos(pi * epoch /
    epochs)) / 2. ``cosine-coss`` (CoSS's reference, coss-pytorch ``adjust_learning_rate`` with warmup_epochs 5 and
    lr_mult 1): base for epochs 0-4, then the same cosine of the *unshifted* epoch (epoch 5 of 25: 0.905 base);
    plain ``cosine`` is up to 6.2% lower over those first 5 epochs."""
    if schedule == "cosine-coss" and epoch < COSS_FLAT_EPOCHS:
        return base
    if schedule in ("cosine", "cosine-coss"):
        return base * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    drops = sum(epoch >= math.ceil(epochs * f) for f in (1 / 3, 2 / 3))
    return base * (0.1**drops)


class Student(nn.Module):
    """A torchvision or timm backbone (random init), its feature taps and the loss's trainable head per target (if
    the loss has one), fed the ImageNet-normalised views re-normalised with the backbone's own mean/std (its
    library's: a no-op for torchvision's and timm's ImageNet ones).

    ``tap`` and ``d_target`` are one value (one target, as KDEP) or one per target (multi-layer KD: a student tap
    may repeat, e.g. one tap distilling two teachers). All taps come from one forward; ``forward`` -> one
    (B, D_out_i) tensor per target, in target order. ``cache_taps`` (one per target) only names the teacher taps in
    errors."""

    def __init__(self, arch: str, tap: str | tuple[str, ...], loss: str, d_target: int | tuple[int, ...],
                 resolution: int, coss_head: str = "mlp", cache_taps: tuple[str, ...] = (),
                 pathway_head: tuple[str, int] = ("mlp", 512)) -> None:  # fmt: skip
        super().__init__()
        taps = (tap,) if isinstance(tap, str) else tuple(tap)
        d_targets = (d_target,) * len(taps) if isinstance(d_target, int) else tuple(d_target)
        if len(d_targets) != len(taps):
            raise ModelError(f"student {arch}: {len(taps)} target taps but {len(d_targets)} target widths")
        model, identity = build_for_resolution(arch, None, resolution)
        self.arch, self.tap, self.target_taps, self.loss = arch, taps[0], taps, loss
        self.backbone = model
        for p in last_linear(
            model
        ).parameters():  # the classifier is not on the feature path: frozen, so that
            p.requires_grad_(False)  # DDP sees no unused parameters and the optimizer does not decay it
        self.preprocessing = model_preprocessing(model, identity)
        self.model_kwargs = identity.get(
            "model_kwargs", {}
        )  # what timm.create_model needs to load the export
        distinct = tuple(dict.fromkeys(taps))
        try:
            self.taps = FeatureTaps(model, distinct, from_imagenet=self.preprocessing)
        except ModelError as err:
            raise ModelError(
                f"student {arch}: {err}; choose student taps it has (--student-tap, or --targets STUDENT_TAP=CACHE_TAP)"
            ) from None
        widths = tap_dims(model, distinct, resolution=min(resolution, 64))
        self.d_features = tuple(widths[t] for t in taps)
        self.d_feature = self.d_features[0]
        sources = cache_taps or (None,) * len(taps)
        self.heads = nn.ModuleList(
            loss_head(loss, arch, t, d_s, d_t, coss_head, source, pathway_head)
            for t, d_s, d_t, source in zip(taps, self.d_features, d_targets, sources, strict=True)
        )

    @property
    def head(self) -> nn.Module:
        """The first target's head (the only one of a single-target student)."""
        return self.heads[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.taps(x)
        return tuple(head(feats[t]) for head, t in zip(self.heads, self.target_taps, strict=True))


def loss_head(loss: str, arch: str, tap: str, d_feature: int, d_target: int, coss_head: str = "mlp",
              cache_tap: str | None = None, pathway_head: tuple[str, int] = ("mlp", 512)) -> nn.Module:  # fmt: skip
    """The trainable head between the student tap (B, d_feature) and the loss: a parametric baseline's
    Linear + BN, CoSS's MLP when the widths differ, coss-bn's BatchNorm, DistPro's transform block (``distpro``:
    a Linear for a ``linear`` process, else Linear-BN-ReLU-Linear of width ``pathway_head`` = (kind, hidden); a
    process searched on maps, ``conv-reference`` / ``conv``, gets this pooled block too: stage 3 carries pooled
    rows); nothing (Identity) for kdep / cosine, whose projected target must already have the tap's width (refused
    otherwise, naming the fit that gives it)."""
    if loss in ("linear-pre", "linear-post"):
        return LinearHead(d_feature, d_target, after_relu=loss == "linear-post")
    if loss == "coss" and d_feature != d_target:
        return CossHead(d_feature, d_target, kind=coss_head)
    if loss == "coss-bn":
        return BatchNormHead(d_feature, d_target, kind=coss_head)
    if loss == "distpro":  # DistPro's pooled transform block (pipeline/process/search.py), per pathway
        kind, hidden = pathway_head
        if kind == "linear":
            return nn.Linear(d_feature, d_target)
        return CossHead(d_feature, d_target, hidden=hidden, kind="mlp-bn")  # Linear-BN-ReLU-Linear
    if loss in ("kdep", "cosine") and d_feature != d_target:
        fit = f"kdep fit-svd CACHE --tap {cache_tap} --dim {d_feature}" if cache_tap else f"--dim {d_feature}"
        raise ModelError(
            f"student {arch} {tap} width is {d_feature} but the projection gives {d_target}; "
            f"fit a projection with {fit} (kdep fit-svd)"
        )
    return nn.Identity()


@dataclass(frozen=True)
class StepContext:
    """How every step of a run executes, shared by all its students: device, precision, loss, target source."""

    device: torch.device
    amp: str  # resolved AMP mode (pipeline.runtime.resolve_amp): off, bf16 or fp16; autocast on CUDA only
    loss: LossSpec
    channels_last: bool = False  # channels_last views on CUDA
    tap: str = "pre_relu"  # teacher tap the targets come from (several targets: the first one's)
    teacher: nn.Module | None = (
        None  # live OnlineTeacher (--online-teacher): {side: views} -> {tap}; None: cache
    )
    targets: tuple[TargetSpec, ...] = ()  # the run's targets (weights, names); () = one target of weight 1
    widths: tuple[int, ...] = ()  # D_i of each carried cache tap (``carried``), to split a (B, sum D_i) row

    @property
    def carried(self) -> tuple[str, ...]:
        """The cache taps in a cached row, in order (PairStream's ``carried``)."""
        return distinct_cache_taps(self.targets) if self.targets else (self.tap,)


def compute_loss(
    spec: LossSpec, out: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(B, D_out)`` student output and ``(B, D_out)`` float32 targets -> (scalar loss, named detached scalar
    parts, on the device)."""
    if spec.name in ("kdep", "distpro") or spec.name.startswith("linear"):
        return kdep_loss(out, target, spec.weight)
    if spec.name == "cosine":
        return cosine_loss(out, target)
    if spec.name == "coss-bn":
        return coss_bn_loss(out, target)
    l0, l1, tau_t, tau_s, beta = spec.coss
    return coss_loss(out, target, l0, l1, tau_t, tau_s, beta)


def combined_loss(ctx: StepContext, outs: tuple[torch.Tensor, ...], targets: tuple[torch.Tensor, ...],
                  weights: tuple[float, ...] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """sum_i w_i * loss_i over the targets (each the configured loss of its output and target) and the parts: per
    target ``loss/<name>`` (unweighted) and its loss's parts as ``<part>/<name>``. ``weights`` (one per target)
    replace the targets' own at this step (a DistPro schedule). One target of weight 1 is exactly
    :func:`compute_loss` (no multiply, no rename): single-target runs are unchanged bit for bit."""
    if len(outs) != len(targets):
        raise ValueError(f"{len(outs)} student outputs for {len(targets)} targets")
    specs = ctx.targets or (None,) * len(outs)
    if weights is None:
        weights = tuple(1.0 if s is None else s.weight for s in specs)
    if len(weights) != len(outs):
        raise ValueError(f"{len(weights)} weights for {len(outs)} targets")
    if len(outs) == 1 and weights[0] == 1.0:
        return compute_loss(ctx.loss, outs[0], targets[0])
    total, parts = None, {}
    for i, (spec, out, target) in enumerate(zip(specs, outs, targets, strict=True)):
        loss_i, parts_i = compute_loss(ctx.loss, out, target)
        name = spec.name if spec is not None else str(i)
        weighted = weights[i] * loss_i
        total = weighted if total is None else total + weighted
        parts[f"loss/{name}"] = loss_i.detach()
        parts.update({f"{k}/{name}": v for k, v in parts_i.items()})
    return total, parts


def make_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast (bf16 and float32 need none: the scaler is then a pass-through)."""
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and amp == "fp16")


def views_on_device(
    x: torch.Tensor | tuple[torch.Tensor, ...], ctx: StepContext
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """(B, 3, r, r) uint8 (before normalisation) or float32 normalised views -> float32 normalised views on the
    context's device (channels_last on CUDA when asked); a tuple (the same views at several sides) view by view.
    uint8 is normalised there in one fused multiply-subtract, bit-identical to the worker's normalisation
    (:func:`pipeline.data.views.normalize_views`)."""
    if isinstance(x, tuple):
        return tuple(views_on_device(v, ctx) for v in x)
    x = normalize_views(x.to(ctx.device, non_blocking=True))
    if ctx.device.type == "cuda" and ctx.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def teacher_targets(rows: torch.Tensor, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """(B, D_t) float32 teacher features of ``ctx.tap``: the cached rows (B, D_t) float16, or the live teacher on
    the views ``x`` (B, 3, r, r) already on the device."""
    return teacher_rows(rows, x, ctx)[ctx.tap]


def student_views(x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The student's views of a batch: ``x`` itself, or the first of the sides it comes at."""
    return x[0] if isinstance(x, tuple) else x


def teacher_rows(
    rows: torch.Tensor, x: torch.Tensor | tuple[torch.Tensor, ...], ctx: StepContext
) -> dict[str, torch.Tensor]:
    """{cache tap: (B, D_i) float32} for every carried tap: the cached rows (B, sum D_i) float16 split per tap, or
    the live teacher's taps on the views ``x`` already on the device: (B, 3, r, r), or the same views at several
    sides (each teacher reads its own side: :class:`pipeline.student.online.OnlineTeacher`)."""
    taps = ctx.carried
    if ctx.teacher is None:
        flat = rows.to(ctx.device, non_blocking=True).float()
        if len(taps) == 1:
            return {taps[0]: flat}
        return dict(zip(taps, flat.split(list(ctx.widths), dim=1), strict=True))
    # no_grad, not inference_mode: the loss's backward saves the targets
    by_side = {v.shape[-1]: v for v in (x if isinstance(x, tuple) else (x,))}
    with torch.no_grad(), autocast_for(ctx.device, ctx.amp):
        out = ctx.teacher(by_side)
    return {t: out[t].float() for t in taps}


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    target: torch.Tensor | Sequence[torch.Tensor],
    ctx: StepContext,
    scaler: torch.amp.GradScaler | None = None,
    to_host: bool = True,
    weights: tuple[float, ...] | None = None,
) -> tuple[float | torch.Tensor, dict[str, float | torch.Tensor]]:
    """One SGD step on views ``x`` (B, 3, r, r) and targets (B, D_out) float32 (one per target of the model, in
    target order; a tensor for one), all on ``ctx.device``; the loss is :func:`combined_loss`. Returns the loss
    and its named parts as floats, or with ``to_host=False`` as detached scalar tensors on the device (no host
    sync per step on CUDA: the loop converts them only when it logs)."""
    with autocast_for(ctx.device, ctx.amp):
        outs = model(x)
    outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
    targets = (target,) if isinstance(target, torch.Tensor) else tuple(target)
    loss, parts = combined_loss(ctx, tuple(o.float() for o in outs), targets, weights)
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


def idle_step(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: StepContext, resolution: int,
              scaler: torch.amp.GradScaler | None = None) -> None:  # fmt: skip
    """A step with zero gradients, for a rank that has no batch this step while other ranks do: DDP all-reduces its
    zeros with their gradients and this rank applies the same averaged update as they do, so the replicas stay
    identical. The forward is on a (2, 3, r, r) zero batch in eval mode (no BatchNorm statistics change) and the
    loss is 0 x the sum of every output, so every trainable parameter gets a (zero) gradient."""
    x = torch.zeros(2, 3, resolution, resolution, device=ctx.device)
    if ctx.device.type == "cuda" and ctx.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    try:
        with autocast_for(ctx.device, ctx.amp):
            outs = model(x)
        outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
        loss = sum(o.float().sum() for o in outs) * 0.0
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
    finally:
        model.train(was_training)
