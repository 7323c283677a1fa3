"""DistPro's search: pathway losses weighted by softmax(alpha), alpha learned by DARTS' unrolled (bi-level) step.

    model = ProcessSearch(StageMaps(student), pathways, transform="mlp", task="ce", task_dims=(512, 10))
    opt = torch.optim.SGD(model.weight_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    architect = Architect(model, opt, alpha_lr=0.1)
    record = search_loop(model, opt, architect, train_epochs, val_batches, epochs=1, total_steps=S, lr_at=...)

**Losses** (weights w = student, transform blocks and task head; alpha one scalar per pathway)::

    L_train(w, alpha) = L_task(w; train) + kd_weight * sum_p softmax(alpha)_p * MSE(T_p(s_j(x)), t_i(x))
    L_val(w)          = L_task(w; held out)

``L_task`` is cross-entropy of a linear head on the GAP of the student's last stage when the data has labels (as
the public code: CE + weighted KD on the train split, CE alone on the held-out split), else the label-free
deviation: MSE of a linear head on that same feature to the teacher's last stage tap (pooled), the held-out
KDEP-style regression. The head is trained on the train split like every other weight. The teacher is never
differentiated: its rows or maps arrive as constants in the batch.

**The alpha step** (every search step, before the weight step; DARTS' ``Architect._backward_step_unrolled``)::

    w'     = w - xi * (m * buf + grad_w L_train(w, alpha) + wd * w)        the SGD step the network would take
    v      = grad_w' L_val(w')
    w+-    = w +- eps * v,  eps = r / ||v||                                  (r = fd_radius, 0.01 as DARTS)
    g      = grad_alpha L_val(w', alpha) - xi * (grad_alpha L_train(w+, alpha) - grad_alpha L_train(w-, alpha)) / (2 eps)

with xi the network's current learning rate, m its momentum and buf its momentum buffer (zero before the first
step), wd its weight decay; g goes to Adam (betas 0.5, 0.999, as DARTS and the public code). The second term is
the central finite difference of the mixed Hessian-vector product d^2 L_train / (d alpha d w) . v, so
g ~= d L_val(w'(alpha)) / d alpha. Here ``L_val`` does not depend on alpha, so its first term is zero.
``order="first"`` is DARTS' first-order step (xi = 0: g = grad_alpha L_val(w, alpha)); with DistPro's objective
that gradient is identically zero (alpha would never move), so the stage always runs the second-order step and
the option exists for objectives whose held-out loss depends on alpha. Batch-norm running statistics are
untouched by the architect's four extra forwards (they run on copies of the buffers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pipeline.process.artefact import Pathway, ProcessError, stage_tap
from pipeline.process.online import pooled

TRANSFORM_KINDS = ("mlp", "linear", "conv")  # mlp / linear: pooled rows (cached); conv: spatial maps (online)
TASKS = ("ce", "regress")  # held-out objective: cross-entropy with labels, or the label-free regression
ORDERS = ("second", "first")  # DARTS unrolled step, or its first-order simplification


@dataclass
class Batch:
    """One search batch: views, the teacher's outputs per stage tap, labels (or None)."""

    x: torch.Tensor  # (B, 3, r, r) normalised views
    targets: dict[str, torch.Tensor]  # teacher stage tap -> (B, D) pooled row or (B, C, H, W) map; constants
    labels: torch.Tensor | None = None  # (B,) int64 classes, or None without labels

    def to(self, device: torch.device) -> Batch:
        labels = None if self.labels is None else self.labels.to(device, non_blocking=True)
        targets = {k: v.to(device, torch.float32, non_blocking=True) for k, v in self.targets.items()}
        return Batch(self.x.to(device, non_blocking=True), targets, labels)


class MlpTransform(nn.Module):
    """Pooled rows ``(B, D_s) -> (B, D_t)``: Linear -> BatchNorm1d -> ReLU -> Linear."""

    def __init__(self, d_s: int, d_t: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_s, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, d_t)
        )

    def forward(self, x: torch.Tensor, size: tuple[int, ...] = ()) -> torch.Tensor:
        return self.net(x)


class LinearTransform(nn.Module):
    """Pooled rows ``(B, D_s) -> (B, D_t)``: one Linear (KDEP's parametric 1x1-conv baseline on pooled rows)."""

    def __init__(self, d_s: int, d_t: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_s, d_t)

    def forward(self, x: torch.Tensor, size: tuple[int, ...] = ()) -> torch.Tensor:
        return self.linear(x)


class ConvTransform(nn.Module):
    """Maps ``(B, C_s, H_s, W_s) -> (B, C_t, H_t, W_t)``: 1x1 conv + BN + ReLU, resize to the teacher map's size
    (area average when shrinking, nearest when growing, as the public code's ``Interpolate``), 3x3 conv + BN.
    Middle width min(512, C_s, C_t) as the public code's connectors."""

    def __init__(self, c_s: int, c_t: int) -> None:
        super().__init__()
        mid = min(512, c_s, c_t)
        self.reduce = nn.Sequential(nn.Conv2d(c_s, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(mid, c_t, 3, padding=1, bias=False), nn.BatchNorm2d(c_t))

    def forward(self, x: torch.Tensor, size: tuple[int, ...] = ()) -> torch.Tensor:
        x = self.reduce(x)
        if size and tuple(x.shape[-2:]) != tuple(size):
            shrink = x.shape[-2] >= size[0] and x.shape[-1] >= size[1]
            x = (
                F.adaptive_avg_pool2d(x, size)
                if shrink
                else F.interpolate(x, size=tuple(size), mode="nearest")
            )
        return self.expand(x)


def transform_block(kind: str, d_s: int, d_t: int, hidden: int = 512) -> nn.Module:
    """The transform block of one pathway (student width ``d_s`` -> teacher width ``d_t``)."""
    if kind == "mlp":
        return MlpTransform(d_s, d_t, hidden)
    if kind == "linear":
        return LinearTransform(d_s, d_t)
    if kind == "conv":
        return ConvTransform(d_s, d_t)
    raise ProcessError(f"transform {kind!r}; use one of {', '.join(TRANSFORM_KINDS)}")


class ProcessSearch(nn.Module):
    """Student stage maps + one transform block per pathway + the task head + alpha (one logit per pathway).

    ``student``: ``x -> {stageK: (B, C, H, W) or (B, D)}``. With a pooled transform (``mlp``/``linear``) the
    student's maps are pooled and the targets are pooled rows (cached mode); with ``conv`` both are maps.
    ``forward(x, targets, labels)`` returns ``(L_task, (P,) pathway MSEs)``.
    """

    def __init__(self, student: nn.Module, pathways: list[Pathway], transform: str, task: str,
                 task_dims: tuple[int, int], hidden: int = 512, kd_weight: float = 1.0) -> None:  # fmt: skip
        super().__init__()
        if task not in TASKS:
            raise ProcessError(f"task {task!r}; use one of {', '.join(TASKS)}")
        self.student, self.pathways, self.task, self.kd_weight = student, list(pathways), task, kd_weight
        self.spatial = transform == "conv"
        self.transforms = nn.ModuleDict(
            {p.name: transform_block(transform, p.student_dim, p.teacher_dim, hidden) for p in self.pathways}
        )
        self.head = nn.Linear(*task_dims)
        self.final = stage_tap(max(max(p.student_stage, p.teacher_stage) for p in self.pathways))
        self.alpha = nn.Parameter(torch.zeros(len(self.pathways)))  # softmax(0) = uniform, as the code's ones

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter except alpha: what the network optimiser steps."""
        return [p for n, p in self.named_parameters() if n != "alpha" and p.requires_grad]

    def forward(self, x: torch.Tensor, targets: dict[str, torch.Tensor], labels: torch.Tensor | None):
        maps = self.student(x)
        rows = pooled(maps)
        feats = maps if self.spatial else rows
        out = self.head(rows[self.final])
        if self.task == "ce":
            if labels is None:
                raise ProcessError(
                    "the cross-entropy objective needs labelled batches (a 'cls' field per sample)"
                )
            task = F.cross_entropy(out, labels)
        else:
            task = F.mse_loss(out, pooled({"t": targets[self.final]})["t"])
        losses = [
            F.mse_loss(self.transforms[p.name](feats[p.student_tap], targets[p.teacher_tap].shape[2:]),
                       targets[p.teacher_tap])
            for p in self.pathways
        ]  # fmt: skip
        return task, torch.stack(losses)

    def train_objective(self, task: torch.Tensor, losses: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return task + self.kd_weight * (torch.softmax(alpha, 0) * losses).sum()


Params = dict[str, torch.Tensor]


def _weights(model: ProcessSearch) -> Params:
    return {n: p.detach() for n, p in model.named_parameters() if n != "alpha" and p.requires_grad}


def _call(model: ProcessSearch, params: Params, batch: Batch):
    """Losses at ``params`` (weights and alpha), on copies of the buffers (running stats stay untouched)."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return functional_call(model, {**params, **buffers}, (batch.x, batch.targets, batch.labels))


def _train_loss(model: ProcessSearch, w: Params, alpha: torch.Tensor, batch: Batch) -> torch.Tensor:
    task, losses = _call(model, {**w, "alpha": alpha}, batch)
    return model.train_objective(task, losses, alpha)


def _val_loss(model: ProcessSearch, w: Params, alpha: torch.Tensor, batch: Batch) -> torch.Tensor:
    return _call(model, {**w, "alpha": alpha}, batch)[0]


def _grad(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients, zeros for inputs the loss does not depend on."""
    if not loss.requires_grad:
        return [torch.zeros_like(i) for i in inputs]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs, strict=True)]


def _leaves(params: Params) -> Params:
    return {n: p.detach().clone().requires_grad_() for n, p in params.items()}


def virtual_step(model: ProcessSearch, batch: Batch, xi: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, buffers: Params | None = None) -> Params:  # fmt: skip
    """``w' = w - xi * (m * buf + grad_w L_train(w, alpha) + wd * w)``: SGD's next weights at the current alpha."""
    w = _leaves(_weights(model))
    grads = _grad(_train_loss(model, w, model.alpha.detach(), batch), list(w.values()))
    out = {}
    for (name, p), g in zip(w.items(), grads, strict=True):
        step = g + weight_decay * p.detach()
        if momentum and buffers is not None and buffers.get(name) is not None:
            step = step + momentum * buffers[name]
        out[name] = (p - xi * step).detach()
    return out


def hypergradient(model: ProcessSearch, train: Batch, val: Batch, xi: float, momentum: float = 0.0,
                  weight_decay: float = 0.0, buffers: Params | None = None, radius: float = 0.01,
                  order: str = "second") -> tuple[torch.Tensor, float]:  # fmt: skip
    """(d L_val / d alpha as in the module docstring, L_val at the weights it was measured at)."""
    alpha = model.alpha.detach().clone().requires_grad_()
    if order == "first":
        val_loss = _val_loss(model, _weights(model), alpha, val)
        return _grad(val_loss, [alpha])[0], float(val_loss.detach())
    if order != "second":
        raise ProcessError(f"order {order!r}; use one of {', '.join(ORDERS)}")
    w_virtual = _leaves(virtual_step(model, train, xi, momentum, weight_decay, buffers))
    val_loss = _val_loss(model, w_virtual, alpha, val)
    direct, *v = _grad(val_loss, [alpha, *w_virtual.values()])
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in v))
    if norm == 0:  # the held-out loss does not move with w: no implicit term
        return direct, float(val_loss.detach())
    eps = radius / norm.to(v[0].dtype)
    w = _weights(model)
    plus = {n: p + eps * g for (n, p), g in zip(w.items(), v, strict=True)}
    minus = {n: p - eps * g for (n, p), g in zip(w.items(), v, strict=True)}
    g_plus = _grad(_train_loss(model, plus, alpha, train), [alpha])[0]
    g_minus = _grad(_train_loss(model, minus, alpha, train), [alpha])[0]
    return direct - xi * (g_plus - g_minus) / (2 * eps), float(val_loss.detach())


def momentum_buffers(model: ProcessSearch, optimizer: torch.optim.Optimizer) -> Params:
    """The SGD momentum buffer of each weight (absent before the first step)."""
    return {
        n: optimizer.state.get(p, {}).get("momentum_buffer")
        for n, p in model.named_parameters()
        if n != "alpha"
    }


class Architect:
    """Adam on alpha, fed by :func:`hypergradient` with the network optimiser's lr, momentum and weight decay."""

    def __init__(self, model: ProcessSearch, network: torch.optim.SGD, alpha_lr: float,
                 betas: tuple[float, float] = (0.5, 0.999), alpha_weight_decay: float = 0.0,
                 order: str = "second", radius: float = 0.01) -> None:  # fmt: skip
        if len(network.param_groups) != 1:
            raise ProcessError("the architect needs the network optimiser to have one parameter group")
        self.model, self.network, self.order, self.radius = model, network, order, radius
        self.optimizer = torch.optim.Adam(
            [model.alpha], lr=alpha_lr, betas=betas, weight_decay=alpha_weight_decay
        )

    def step(self, train: Batch, val: Batch) -> float:
        """One alpha update; returns the held-out loss it was computed from."""
        group = self.network.param_groups[0]
        grad, val_loss = hypergradient(
            self.model, train, val, group["lr"], group.get("momentum", 0.0), group.get("weight_decay", 0.0),
            momentum_buffers(self.model, self.network), self.radius, self.order,
        )  # fmt: skip
        self.model.alpha.grad = grad
        self.optimizer.step()
        self.model.alpha.grad = None
        return val_loss


def network_step(model: ProcessSearch, optimizer: torch.optim.Optimizer, batch: Batch) -> float:
    """One SGD step of the weights on L_train at the current alpha (alpha itself is not stepped here)."""
    optimizer.zero_grad(set_to_none=True)
    task, losses = model(batch.x, batch.targets, batch.labels)
    loss = model.train_objective(task, losses, model.alpha.detach())
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def lr_at(schedule: str, base: float, step: int, total: int) -> float:
    """The network lr at ``step`` of ``total``: ``cosine`` (per step, to 0), ``step`` (/10 at 1/3 and 2/3), or
    ``constant``. The schedule moves w only; alpha's Adam lr is constant (appendix E)."""
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
    if schedule == "step":
        return base * 0.1 ** sum(step >= total * f for f in (1 / 3, 2 / 3))
    return base


@dataclass
class SearchRecord:
    """What the loop saw: alpha logits per step (row 0 = initial), per-epoch weights, losses per step."""

    logits: list[list[float]] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)


def search_loop(model: ProcessSearch, network: torch.optim.Optimizer, architect: Architect,
                train_epochs: Callable[[int], Iterable[Batch]], val_batches: Iterator[Batch], epochs: int,
                total_steps: int, lr_at_step: Callable[[int], float], device: torch.device,
                on_step: Callable[[int], None] | None = None) -> SearchRecord:  # fmt: skip
    """Per step: set the lr, one alpha update (train batch + next held-out batch), one weight update. Stops after
    ``total_steps`` steps or ``epochs`` passes over ``train_epochs(epoch)``, whichever comes first."""
    record, step = SearchRecord(logits=[model.alpha.detach().tolist()]), 0
    model.train()
    for epoch in range(epochs):
        for batch in train_epochs(epoch):
            if step >= total_steps:
                break
            for group in network.param_groups:
                group["lr"] = lr_at_step(step)
            train, val = batch.to(device), next(val_batches).to(device)
            record.val_loss.append(architect.step(train, val))
            record.train_loss.append(network_step(model, network, train))
            record.logits.append(model.alpha.detach().tolist())
            step += 1
            if on_step is not None:
                on_step(step)
        weights = torch.softmax(model.alpha.detach().double(), 0).tolist()
        record.epochs.append({"epoch": epoch, "step": step, "weights": weights})
        if step >= total_steps:
            break
    return record
