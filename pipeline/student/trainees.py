"""Stage 3's trainees: each student built, seeded, frozen where no target reaches, wrapped in DDP, with its
optimizer, scaler and learning rate (the KDEP recipe of :mod:`pipeline.student.training`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.projection.artefact import Projection
from pipeline.runtime import Dist
from pipeline.student.specs import TrainSpec
from pipeline.student.training import Student, base_lr_for, make_scaler, weight_decay_for


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
    projections: tuple[
        Projection | None, ...
    ]  # per target: teacher (B, D_t) -> target (B, D_s); None: raw rows
    base_lr: float
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling (None or disabled otherwise)
    losses: list[torch.Tensor] = field(default_factory=list)  # this epoch's detached scalar losses (device)
    parts: list[dict[str, torch.Tensor]] = field(
        default_factory=list
    )  # this epoch's per-target losses (several)
    frozen: tuple[
        str, ...
    ] = ()  # parameters no target reaches, frozen before DDP (recorded in provenance.json)

    @property
    def projection(self) -> Projection | None:
        """The first target's projection (the only one of a single-target run)."""
        return self.projections[0]


def build_trainees(spec: TrainSpec, projections: list[tuple[Projection | None, ...]], d_teacher: dict[str, int],
                   resolution: int, device: torch.device, amp: str, job: Dist) -> list[Trainee]:  # fmt: skip
    """Each student seeded with ``seed + 1000 i`` (the same init on every rank), with its optimizer and scaler;
    ``projections``: per student, one per target; ``d_teacher``: each cache tap's width D_t."""
    recipe = spec.recipe
    global_batch = spec.batch_per_rank * job.world  # the lr scales with the batch actually trained on
    wd = (
        recipe.weight_decay
        if recipe.weight_decay >= 0
        else weight_decay_for(recipe.data_fraction, recipe.epochs)
    )
    archs = [s.arch for s in spec.students]
    out = []
    student_taps = tuple(t.student_tap for t in spec.targets)
    cache_taps = tuple(t.cache_tap for t in spec.targets)
    for i, (s, projs) in enumerate(zip(spec.students, projections, strict=True)):
        torch.manual_seed(recipe.seed + 1000 * i)
        d_targets = tuple(p.dim_student if p is not None else d_teacher[c]
                          for p, c in zip(projs, cache_taps, strict=True))  # fmt: skip
        student = Student(s.arch, student_taps, spec.loss.name, d_targets, resolution, spec.loss.coss_head,
                          cache_taps=cache_taps, pathway_head=spec.loss.pathway_head).to(device)  # fmt: skip
        if device.type == "cuda" and spec.runtime.channels_last:
            student = student.to(memory_format=torch.channels_last)
        frozen = freeze_unreached(student, resolution, device)
        model: nn.Module = wrap_ddp(student, device) if job.world > 1 else student
        lr = recipe.lr or base_lr_for(s.arch, global_batch)
        name = s.arch if archs.count(s.arch) == 1 else f"{s.arch}-{i}"
        out.append(
            Trainee(
                name,
                model,
                student,
                make_optimizer(model, lr, wd),
                projs,
                lr,
                make_scaler(device, amp),
                frozen=frozen,
            )
        )
    return out


def unreached_parameters(model: nn.Module, resolution: int, device: torch.device) -> list[str]:
    """Names of the trainable parameters that no output of ``model`` depends on (a student whose last stage feeds
    no target, a timm model's extra head norm), found by one probe forward and backward of every output's sum on a
    (2, 3, r, r) zero batch, in eval mode (no BatchNorm statistics change, no dropout; the graph is what matters,
    not the values). DDP without ``find_unused_parameters`` fails at the second step on any rank when a parameter
    gets no gradient, and one process never shows it."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        outs = model(torch.zeros(2, 3, resolution, resolution, device=device))
        outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
        total = sum(o.float().sum() for o in outs)
        grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
    finally:
        model.train(was_training)
    return [n for (n, _), g in zip(named, grads, strict=True) if g is None]


def freeze_unreached(student: nn.Module, resolution: int, device: torch.device) -> tuple[str, ...]:
    """Freeze (requires_grad False: no optimizer slot, no DDP bucket) the parameters no target reaches; returns
    their names (recorded in provenance.json). Parameters whose target weight is 0 at some steps (a DistPro
    schedule) stay trainable: their loss is still computed, times 0, so they always get a gradient."""
    names = unreached_parameters(student, resolution, device)
    params = dict(student.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    return tuple(names)


def wrap_ddp(student: nn.Module, device: torch.device) -> nn.Module:
    """DDP without per-step buffer broadcasts: BatchNorm trains on batch statistics, so gradients and the
    (identically replicated) parameters never depend on the running stats; rank 0's own are checkpointed and
    exported. torch >= 2.13 names this ``forward_sync_buffers`` (``broadcast_buffers`` warns there)."""
    ddp = nn.parallel.DistributedDataParallel
    buffers = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else "broadcast_buffers")  # fmt: skip
    return ddp(student, device_ids=[device.index] if device.type == "cuda" else None, **{buffers: False})
