"""Distillation losses. Each is a pure function returning ``(loss, parts)`` where ``parts`` holds named scalars.

Shapes: student features ``s`` (B, D_s), targets ``t`` (B, D_s) (or (B, D_t) for CoSS and the parametric
baselines, after the student head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.choices import COSS_HEADS


def kdep_loss(
    s: torch.Tensor, t: torch.Tensor, weight: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KDEP (He et al., CVPR 2022, eq. 2 with the reference code's weight): L = w * mean_{b,c} (s_bc - t_bc)^2.

    ``t`` is the teacher feature after SVD + PTS (or another non-parametric alignment). w: 3 (MS-R50 -> R18/MNV2),
    20 (standard ImageNet R50 -> R18), 1 (SWSL / MEAL-V2 R50 -> R18), 3 (Swin-B -> R18): KDEP supplement, Table S.3.
    """
    mse = F.mse_loss(s.float(), t.float())
    return weight * mse, {"mse": mse.detach()}


def cosine_loss(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cosine baseline: L = 1 - (1/B) sum_b cos(s_b, t_b)."""
    cos = F.cosine_similarity(s.float(), t.float(), dim=1, eps=1e-12).mean()
    return 1.0 - cos, {"cos": cos.detach()}


def _unit(v: torch.Tensor, dim: int) -> torch.Tensor:
    """v / max(||v||, 1e-12) along ``dim`` (CoSS's n(.))."""
    return v / v.norm(dim=dim, keepdim=True).clamp_min(1e-12)


def coss_loss(
    s: torch.Tensor,
    t: torch.Tensor,
    l0: float = 1.0,
    l1: float = 1.0,
    tau_t: float = 0.07,
    tau_s: float = 0.1,
    beta: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CoSS (Singh & Wang, "Simple Unsupervised Knowledge Distillation With Space Similarity", and its supplement).

    L_co = -(1/B) sum_b <n(T_b,:), n(S_b,:)>     (each sample normalised over D)
    L_ss = -(1/D) sum_d <n(T_:,d), n(S_:,d)>     (each dimension normalised over the batch, no centring)
    L = beta * (l0 * L_co + l1 * L_ss) / (tau_t * tau_s)
    """
    s, t = s.float(), t.float()
    l_co = -(_unit(t, 1) * _unit(s, 1)).sum(1).mean()
    l_ss = -(_unit(t, 0) * _unit(s, 0)).sum(0).mean()
    loss = beta * (l0 * l_co + l1 * l_ss) / (tau_t * tau_s)
    return loss, {"l_co": l_co.detach(), "l_ss": l_ss.detach()}


def coss_bn_loss(z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CoSS supplement section 4 (Table 4), the BN variant: L = (1/B) sum_b D(Z_b, X_b) with D the mean squared
    error over the D_t channels, i.e. mean_{b,d} (Z_bd - X_bd)^2, unweighted.

    ``z`` (B, D_t) is the batch-normalised student embedding (:class:`BatchNormHead`), ``t`` (B, D_t) the teacher's
    unnormalised embedding.
    """
    mse = F.mse_loss(z.float(), t.float())
    return mse, {"mse": mse.detach()}


class CossHead(nn.Module):
    """CoSS's student head when D_s != D_t, dropped after training; (B, D_s) -> (B, D_t).

    ``mlp`` (the reference, paganpasta/coss-pytorch ``wrapper.py``): Linear(D_s, 2048) -> ReLU -> Linear(2048, D_t).
    ``mlp-bn``: Linear(D_s, 2048) -> BatchNorm1d(2048) -> ReLU -> Linear(2048, D_t), a variant that is not in the
    reference (this project's head before it was checked against the reference code).
    """

    def __init__(self, d_s: int, d_t: int, hidden: int = 2048, kind: str = "mlp") -> None:
        super().__init__()
        if kind not in COSS_HEADS:
            raise ValueError(f"CoSS head {kind!r} is not one of {', '.join(COSS_HEADS)}")
        norm = [nn.BatchNorm1d(hidden)] if kind == "mlp-bn" else []
        self.kind = kind
        self.net = nn.Sequential(nn.Linear(d_s, hidden), *norm, nn.ReLU(inplace=True), nn.Linear(hidden, d_t))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.net(s)


class BatchNormHead(nn.Module):
    """The CoSS supplement's BN variant (section 4, eq. 1): Z_:,i = gamma_i (X_:,i - mu_i) / sigma_i + beta_i,
    BatchNorm1d(D_t) with affine parameters on the student embedding, mapping it to the teacher's unnormalised
    embedding space. The embedding is the student feature, through a :class:`CossHead` first when D_s != D_t."""

    def __init__(self, d_s: int, d_t: int, kind: str = "mlp") -> None:
        super().__init__()
        self.embed: nn.Module = CossHead(d_s, d_t, kind=kind) if d_s != d_t else nn.Identity()
        self.bn = nn.BatchNorm1d(d_t, affine=True)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.bn(self.embed(s))


class LinearHead(nn.Module):
    """KDEP's parametric baselines (paper Tables 2-3, "1x1 conv"): a learnable Linear + BN mapping the pooled student
    feature to D_t, applied before the student's last ReLU (``linear-pre``: on the pre-ReLU feature) or after it
    (``linear-post``: on ReLU(feature)). Trained jointly; for comparison only."""

    def __init__(self, d_s: int, d_t: int, after_relu: bool) -> None:
        super().__init__()
        self.after_relu = after_relu
        self.proj = nn.Sequential(nn.Linear(d_s, d_t, bias=False), nn.BatchNorm1d(d_t))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(s) if self.after_relu else s)
