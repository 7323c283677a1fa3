"""DistPro's search: pathway losses weighted by softmax(alpha), alpha learned by DARTS' unrolled (bi-level) step.

    model = ProcessSearch(StageMaps(student), pathways, transform="mlp", task="ce", task_dims=(512, 10))
    opt = torch.optim.SGD(model.weight_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    architect = Architect(model, opt, alpha_lr=0.1)                  # method="exact" (or "finite-difference")
    record = search_loop(model, opt, architect, train_epochs, val_batches, epochs=1, total_steps=S, lr_at=...)

**Losses** (weights w = student, transform blocks and task head; alpha one scalar per pathway)::

    L_train(w, alpha) = L_task(w; train) + kd_weight * sum_p softmax(alpha)_p * loss_p(T_p(s_j(x)), t_i(x))
    L_val(w)          = L_task(w; held out)

``loss_p`` is the pathway loss (:mod:`pipeline.process.blocks`: the official hierarchical context loss ``hcl``, or
``mse``; on pooled rows both are the MSE) and ``T_p`` the pathway's transform block. ``L_task`` is cross-entropy of a
linear head on the GAP of the student's last stage when the data has labels (as the public code: CE + weighted KD
on the train split, CE alone on the held-out split), else the label-free deviation: MSE of a linear head on that
same feature to the teacher's last stage tap (pooled), the held-out KDEP-style regression. The head is trained on
the train split like every other weight. The teacher is never differentiated: its rows or maps arrive as
constants in the batch.

**The alpha step** (every search step, before the weight step): :mod:`pipeline.process.unrolled` computes
d L_val(w'(alpha)) / d alpha through the virtual SGD step w' the network optimiser would take (its lr, momentum,
Nesterov and weight decay), exactly (double backward) or by DARTS' finite difference; the gradient goes to Adam
(betas 0.5, 0.999, as DARTS and the public code).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.process.artefact import Pathway, ProcessError, stage_tap
from pipeline.process.blocks import (  # noqa: F401 - re-exported: the blocks were defined here before
    SPATIAL_KINDS,
    TRANSFORM_KINDS,
    ConvReferenceTransform,
    ConvTransform,
    LinearTransform,
    MlpTransform,
    pathway_loss,
    transform_block,
)
from pipeline.process.online import pooled
from pipeline.process.unrolled import (  # noqa: F401 - re-exported: the alpha step was defined here before
    HYPERGRADIENTS,
    ORDERS,
    hypergradient,
    momentum_buffers,
    virtual_step,
)

TASKS = ("ce", "regress")  # held-out objective: cross-entropy with labels, or the label-free regression


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


class ProcessSearch(nn.Module):
    """Student stage maps + one transform block per pathway + the task head + alpha (one logit per pathway).

    ``student``: ``x -> {stageK: (B, C, H, W) or (B, D)}`` (``stageK_pre`` keys for pre-ReLU pathways). With a
    pooled transform (``mlp``/``linear``) the student's maps are pooled and the targets are pooled rows (cached
    mode); with ``conv-reference``/``conv`` both are maps. ``forward(x, targets, labels)`` returns ``(L_task, (P,)
    pathway losses)``, each ``pathway_loss`` (hcl or mse) of the transformed student feature and the target.
    """

    def __init__(self, student: nn.Module, pathways: list[Pathway], transform: str, task: str,
                 task_dims: tuple[int, int], hidden: int = 512, kd_weight: float = 1.0,
                 pathway_loss: str = "hcl") -> None:  # fmt: skip
        super().__init__()
        if task not in TASKS:
            raise ProcessError(f"task {task!r}; use one of {', '.join(TASKS)}")
        self.student, self.pathways, self.task, self.kd_weight = student, list(pathways), task, kd_weight
        self.spatial, self.loss = transform in SPATIAL_KINDS, pathway_loss
        self.transforms = nn.ModuleDict(
            {p.name: transform_block(transform, p.student_dim, p.teacher_dim, hidden) for p in self.pathways}
        )
        self.head = nn.Linear(*task_dims)
        last = max(max(p.student_stage, p.teacher_stage) for p in self.pathways)
        self.final = stage_tap(last, self.pathways[0].features)
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
            pathway_loss(self.loss, self.transforms[p.name](feats[p.student_tap], targets[p.teacher_tap].shape[2:]),
                         targets[p.teacher_tap])
            for p in self.pathways
        ]  # fmt: skip
        return task, torch.stack(losses)

    def train_objective(self, task: torch.Tensor, losses: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return task + self.kd_weight * (torch.softmax(alpha, 0) * losses).sum()


class Architect:
    """Adam on alpha, fed by :func:`hypergradient` (``method`` exact or finite-difference) with the network
    optimiser's lr, momentum, Nesterov flag, weight decay and momentum buffers."""

    def __init__(self, model: ProcessSearch, network: torch.optim.SGD, alpha_lr: float,
                 betas: tuple[float, float] = (0.5, 0.999), alpha_weight_decay: float = 0.0,
                 order: str = "second", radius: float = 0.01, method: str = "exact") -> None:  # fmt: skip
        if len(network.param_groups) != 1:
            raise ProcessError("the architect needs the network optimiser to have one parameter group")
        if method not in HYPERGRADIENTS:
            raise ProcessError(f"hypergradient {method!r}; use one of {', '.join(HYPERGRADIENTS)}")
        self.model, self.network, self.order, self.radius, self.method = model, network, order, radius, method
        self.optimizer = torch.optim.Adam(
            [model.alpha], lr=alpha_lr, betas=betas, weight_decay=alpha_weight_decay
        )

    def step(self, train: Batch, val: Batch) -> float:
        """One alpha update; returns the held-out loss it was computed from."""
        group = self.network.param_groups[0]
        grad, val_loss = hypergradient(
            self.model, train, val, group["lr"], group.get("momentum", 0.0), group.get("weight_decay", 0.0),
            momentum_buffers(self.model, self.network), self.radius, self.order, self.method,
            bool(group.get("nesterov", False)),
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
