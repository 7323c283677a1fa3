"""Stage 3 pieces: a student with its heads, the KDEP recipe (SGD, step schedule, weight decay table), one step.

Recipe (METHOD.md): SGD momentum 0.9, lr = base * (global batch / 512) with base 0.3 for ResNets and 0.1 for
MobileNetV2, divided by 10 at 1/3 and 2/3 of training, no warm-up, weight decay from the supplement's table by
data fraction and epochs. AMP (bf16) and channels_last on CUDA.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.models import FeatureTaps, ModelError, build_model, last_linear, tap_dims
from pipeline.student.losses import CossHead, LinearHead, cosine_loss, coss_loss, kdep_loss

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


def lr_at(epoch: int, epochs: int, base: float) -> float:
    """Step schedule: base, base/10 from 1/3 of training, base/100 from 2/3 (reference: every 30 of 90 epochs)."""
    drops = sum(epoch >= math.ceil(epochs * f) for f in (1 / 3, 2 / 3))
    return base * (0.1**drops)


class Student(nn.Module):
    """A torchvision backbone, its feature tap and the loss's trainable head (if any). forward -> (B, D_out)."""

    def __init__(self, arch: str, tap: str, loss: str, d_target: int, resolution: int) -> None:
        super().__init__()
        model, _ = build_model(arch, None)
        self.arch, self.tap, self.loss = arch, tap, loss
        self.backbone = model
        for p in last_linear(
            model
        ).parameters():  # the classifier is not on the feature path: frozen, so that
            p.requires_grad_(False)  # DDP sees no unused parameters and the optimizer does not decay it
        self.taps = FeatureTaps(model, (tap,))
        self.d_feature = tap_dims(model, (tap,), resolution=min(resolution, 64))[tap]
        self.head: nn.Module = nn.Identity()
        if loss in ("linear-pre", "linear-post"):
            self.head = LinearHead(self.d_feature, d_target, after_relu=loss == "linear-post")
        elif loss == "coss" and self.d_feature != d_target:
            self.head = CossHead(self.d_feature, d_target)
        elif loss in ("kdep", "cosine") and self.d_feature != d_target:
            raise ModelError(
                f"student {arch} {tap} width is {self.d_feature} but the projection gives {d_target}; "
                f"fit a projection with --dim {self.d_feature} (kdep fit-svd)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.taps(x)[self.tap])


@dataclass(frozen=True)
class LossSpec:
    name: str  # kdep, cosine, coss, linear-pre, linear-post
    weight: float = 3.0  # w of the KDEP loss (and the baselines' MSE)
    coss: tuple[float, float, float, float, float] = (1.0, 1.0, 0.07, 0.1, 1.0)  # l0, l1, tau_t, tau_s, beta


def compute_loss(
    spec: LossSpec, out: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    if spec.name == "kdep" or spec.name.startswith("linear"):
        return kdep_loss(out, target, spec.weight)
    if spec.name == "cosine":
        return cosine_loss(out, target)
    l0, l1, tau_t, tau_s, beta = spec.coss
    return coss_loss(out, target, l0, l1, tau_t, tau_s, beta)


def autocast_for(device: torch.device, amp: str):
    if device.type == "cuda" and amp in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
    return contextlib.nullcontext()


def make_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast (bf16 and float32 need none: the scaler is then a pass-through)."""
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and amp == "fp16")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor,
               spec: LossSpec, device: torch.device, amp: str, scaler: torch.amp.GradScaler | None = None,
               ) -> tuple[float, dict[str, float]]:  # fmt: skip
    """One SGD step on (views, targets) already on the device; returns the loss and its parts."""
    with autocast_for(device, amp):
        out = model(x)
    loss, parts = compute_loss(spec, out.float(), target)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return float(loss.detach()), parts


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
