"""DistPro's pathway pieces: the transform block that maps a student stage to a teacher stage, and the pathway loss.

    block = transform_block("conv-reference", c_s=128, c_t=512)      # the official connector (886,400 parameters)
    loss = pathway_loss("hcl", block(s_map, t_map.shape[2:]), t_map)

**Transform blocks** (``kind``): ``mlp`` and ``linear`` take pooled rows ``(B, D_s) -> (B, D_t)`` (cached mode);
``conv-reference`` and ``conv`` take maps ``(B, C_s, H_s, W_s) -> (B, C_t, H_t, W_t)`` (online mode).

- ``conv-reference``: the official code's connector (bytedance/DistPro ``distiller.py``,
  ``build_feature_connector_complex``, rewritten): Conv3x3(C_s, m) + BN + ReLU, self-attention (x times a
  Conv1x1(m, 1) of x, no bias), Conv3x3(m, m) + BN + ReLU, nearest resize to the teacher map's size, Conv3x3(m, C_t) +
  BN, with m = min(512, C_s, C_t), convolutions without bias. Parameters: 9 C_s m + 9 m^2 + 9 m C_t + m (attention)
  + 4 m + 2 C_t (BN). Initialised as the code does: the three 3x3 convolutions N(0, 2 / (9 * out channels)), BN
  weight 1 and bias 0, the attention convolution PyTorch's default. The code resizes to a size fixed at build time
  (the teacher's map at its one resolution); here, to the teacher map of each call (the same at a fixed resolution).
- ``conv``: a lighter block of our own: Conv1x1(C_s, m) + BN + ReLU, resize (area average when shrinking, nearest
  when growing), Conv3x3(m, C_t) + BN (C_s = 128, C_t = 512: 607,488 parameters against the official 886,400).
- ``mlp``: Linear(D_s, hidden) + BatchNorm1d + ReLU + Linear(hidden, D_t); ``linear``: Linear(D_s, D_t).

**Pathway losses** (``kind``): ``hcl`` (the official ``hcl``, rewritten; :func:`hcl_loss`) or ``mse``. On pooled rows
(or 1 x 1 maps) hcl has no pooled level and is exactly the MSE, so in cached mode the two are the same number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.process.artefact import ProcessError

TRANSFORM_KINDS = (
    "mlp",
    "linear",
    "conv-reference",
    "conv",
)  # mlp / linear: pooled rows; conv*: spatial maps
SPATIAL_KINDS = ("conv-reference", "conv")
PATHWAY_LOSSES = ("hcl", "mse")
HCL_LEVELS = (4, 2, 1)  # the official hcl's pooled sizes, in order


def hcl_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The official code's hierarchical context loss between a transformed student map ``s`` and the teacher map
    ``t``, both (B, C, H, W) (or pooled (B, D) rows: plain MSE)::

        hcl(s, t) = [mse(s, t) + sum_k 2^-k mse(P_{l_k} s, P_{l_k} t)] / [1 + sum_k 2^-k]

    where l_1, l_2, ... are the sizes of (4, 2, 1) smaller than H, in that order (k = 1, 2, ...: weights 1/2, 1/4,
    1/8), P_l is adaptive average pooling to l x l and mse the mean of squared differences over all elements. Only H
    decides which levels count, as in the code. E.g. H = 8: (mse + mse_4 / 2 + mse_2 / 4 + mse_1 / 8) / 1.875;
    H = 2: (mse + mse_1 / 2) / 1.5; H = 1 or pooled rows: mse. Returns a scalar."""
    loss = F.mse_loss(s, t)
    if s.ndim != 4:
        return loss
    weight, total = 1.0, 1.0
    for level in HCL_LEVELS:
        if level >= s.shape[2]:
            continue
        weight /= 2.0
        pooled = F.mse_loss(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level))
        loss = loss + weight * pooled
        total += weight
    return loss / total


def pathway_loss(kind: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``hcl`` (:func:`hcl_loss`) or ``mse`` between a transformed student feature and the teacher's."""
    if kind == "hcl":
        return hcl_loss(s, t)
    if kind == "mse":
        return F.mse_loss(s, t)
    raise ProcessError(f"pathway loss {kind!r}; use one of {', '.join(PATHWAY_LOSSES)}")


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
    (area average when shrinking, nearest when growing), 3x3 conv + BN. Middle width min(512, C_s, C_t)."""

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


class SelfAttention(nn.Module):
    """``x * a(x)`` with ``a`` a bias-free Conv1x1(C, 1): one spatial gate shared by the channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gate = nn.Conv2d(channels, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class ConvReferenceTransform(nn.Module):
    """The official connector, maps ``(B, C_s, H_s, W_s) -> (B, C_t, H_t, W_t)`` (module docstring)."""

    def __init__(self, c_s: int, c_t: int) -> None:
        super().__init__()
        mid = min(512, c_s, c_t)
        self.head = nn.Sequential(
            nn.Conv2d(c_s, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(), SelfAttention(mid),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        )  # fmt: skip
        self.tail = nn.Sequential(nn.Conv2d(mid, c_t, 3, padding=1, bias=False), nn.BatchNorm2d(c_t))
        for m in (*self.head, *self.tail):
            if isinstance(m, nn.Conv2d):  # N(0, 2 / (k * k * out)), the code's init (the gate is not one)
                nn.init.normal_(
                    m.weight, 0.0, (2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)) ** 0.5
                )
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, size: tuple[int, ...] = ()) -> torch.Tensor:
        x = self.head(x)
        if size and tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.tail(x)


def transform_block(kind: str, d_s: int, d_t: int, hidden: int = 512) -> nn.Module:
    """The transform block of one pathway (student width ``d_s`` -> teacher width ``d_t``)."""
    if kind == "mlp":
        return MlpTransform(d_s, d_t, hidden)
    if kind == "linear":
        return LinearTransform(d_s, d_t)
    if kind == "conv-reference":
        return ConvReferenceTransform(d_s, d_t)
    if kind == "conv":
        return ConvTransform(d_s, d_t)
    raise ProcessError(f"transform {kind!r}; use one of {', '.join(TRANSFORM_KINDS)}")
