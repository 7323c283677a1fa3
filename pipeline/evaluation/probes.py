"""Probe maths on frozen features: linear probe, cosine k-NN, linear CKA and cosine agreement.

Pure functions of arrays (no models, no files), so each can be checked against a hand-computed value:

    .venv/bin/pytest -q tests/test_eval.py -k "probe or knn or cka or cosine"

- Linear probe: multinomial logistic regression on features standardised with the statistics of the rows it is
  fitted on, solved by full-batch L-BFGS in torch on the evaluation device (default) or by scikit-learn on the CPU;
  the objective and C's meaning are scikit-learn's (pipeline/evaluation/logistic.py). ``C`` is picked from a small
  sweep by top-1 on a held-out, per-class stratified part of train (seeded), then the probe is refitted on all of
  train with that ``C``.
- k-NN: cosine similarity between L2-normalised raw features; each of the ``k`` nearest train rows casts one vote
  for its label; a tie between classes goes to the class whose tied voters have the larger summed similarity.
  Computed on the evaluation device over blocks of train rows (each read and normalised once) with a running
  top-k per query, so memory is O(queries x (D + k) + block x D + query block x block), not O(queries x N).
- Linear CKA (Kornblith et al. 2019): ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred
  X (N, D1), Y (N, D2); in [0, 1], invariant to orthogonal transforms and isotropic scaling of either side.
- Cosine agreement: the mean over rows of ``cos(s_b, t_b)`` (norms clamped at 1e-12, as in CoSS).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.errors import KdepError
from pipeline.evaluation.logistic import SklearnLogistic, TorchLogistic, as_tensor, make_solver

EPS = 1e-12  # norm clamp for cosines (CoSS's n(v) = v / max(||v||, 1e-12))


class ProbeError(KdepError, ValueError):
    """Features and labels do not fit together (shapes, too few rows); the message says what to pass."""


@dataclass(frozen=True)
class ProbeResult:
    """Linear-probe outcome on the evaluation rows."""

    top1: float  # fraction of evaluation rows classified correctly, [0, 1]
    c: float  # the inverse regularisation strength used for the final fit
    sweep: dict[str, float]  # str(C) -> held-out top-1 of the sweep (empty when no sweep ran)
    converged: bool  # False when L-BFGS hit max_iter on the final fit
    sweep_rows: int = 0  # held-out train rows each sweep top-1 is measured on (0 when no sweep ran)
    predictions: np.ndarray | None = field(default=None, compare=False, repr=False)  # (M,) int64 labels


def check_rows(x: np.ndarray, y: np.ndarray, what: str) -> None:
    """Raise ProbeError unless ``x`` is (N, D) and ``y`` is (N,) with N >= 1."""
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise ProbeError(
            f"{what}: features {x.shape} and labels {y.shape} must be (N, D) and (N,) with N >= 1"
        )


def split_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit_idx, holdout_idx): per class, a seeded ``fraction`` (at least 1 if the class has >= 2 rows) is held out."""
    rng = np.random.default_rng(seed)
    fit, hold = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_hold = max(1, round(fraction * len(idx))) if len(idx) >= 2 else 0
        hold.append(idx[:n_hold])
        fit.append(idx[n_hold:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(hold))


def top1(pred: np.ndarray, y: np.ndarray) -> float:
    """Fraction of ``pred == y``."""
    return float(np.mean(np.asarray(pred) == np.asarray(y)))


def choose_c(
    solver: TorchLogistic | SklearnLogistic, y: np.ndarray, cs: tuple[float, ...], holdout: float, seed: int
) -> tuple[float, dict[str, float], int]:
    """Pick C by held-out top-1 (ties -> the smaller C, i.e. stronger regularisation); one C means no sweep.
    The sweep fits from the smallest C up (a torch solver warm-starts each from the last).
    Returns (C, {str(C): held-out top-1}, held-out rows)."""
    if len(cs) == 1:
        return cs[0], {}, 0
    fit_idx, hold_idx = split_holdout(y, holdout, seed)
    if len(hold_idx) == 0 or len(np.unique(y[fit_idx])) < 2:
        raise ProbeError(
            f"too few train rows ({len(y)}) to hold out a C-sweep split; pass a single C (--set eval.probe_cs=1.0)"
        )
    sweep = {}
    for c in sorted(cs):
        solver.fit(fit_idx, c)
        sweep[str(c)] = top1(solver.predict_rows(hold_idx), y[hold_idx])
    best = max(sorted(cs), key=lambda c: sweep[str(c)])  # max() keeps the first (smallest) C among ties
    return best, sweep, len(hold_idx)


def linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_eval: np.ndarray,
    y_eval: np.ndarray,
    cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0),
    holdout: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
    backend: str = "torch",
    device: str | torch.device = "cpu",
) -> ProbeResult:
    """Top-1 of a logistic-regression probe: (N, D) train features -> (M, D) evaluation features (float16 or
    float32, memmaps welcome), solved by ``backend`` (torch on ``device``, or sklearn)."""
    check_rows(x_train, y_train, "probe train")
    check_rows(x_eval, y_eval, "probe eval")
    if len(np.unique(y_train)) < 2:
        raise ProbeError("probe train: a linear probe needs at least 2 classes in the train split")
    solver = make_solver(backend, x_train, y_train, torch.device(device), max_iter)
    c, sweep, sweep_rows = choose_c(solver, y_train, cs, holdout, seed)
    converged = solver.fit(None, c)
    pred = np.asarray(solver.predict(x_eval), dtype=np.int64)
    return ProbeResult(top1(pred, y_eval), c, sweep, converged, sweep_rows, pred)


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm (norms clamped at 1e-12)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(EPS)


def knn_predict(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_eval: np.ndarray,
    k: int = 20,
    device: str | torch.device = "cpu",
    bank_block: int = 65536,
    query_block: int = 1024,
) -> np.ndarray:
    """(M,) predicted labels: majority vote of the k most cosine-similar train rows, ties by summed similarity.
    Train rows are taken ``bank_block`` at a time (each read, moved and normalised once), merged into a running
    top-k of every query; queries go ``query_block`` at a time through each block."""
    check_rows(x_train, y_train, "k-NN train")
    device = torch.device(device)
    k = min(k, len(x_train))
    queries = l2_normalise(as_tensor(x_eval).to(device).float())
    sims = torch.full((len(queries), k), -torch.inf, device=device)  # the running top-k of every query
    index = torch.zeros((len(queries), k), dtype=torch.long, device=device)
    bank_rows = as_tensor(x_train)
    for start in range(0, len(bank_rows), bank_block):
        bank = l2_normalise(bank_rows[start : start + bank_block].to(device).float())
        for q in range(0, len(queries), query_block):
            rows = slice(q, q + query_block)
            block_sims, block_index = (queries[rows] @ bank.T).topk(min(k, len(bank)), dim=1)
            best = torch.cat([sims[rows], block_sims], 1).topk(k, dim=1)
            sims[rows] = best.values
            index[rows] = torch.cat([index[rows], block_index + start], 1).gather(1, best.indices)
    return vote(sims, torch.as_tensor(np.asarray(y_train), dtype=torch.long, device=device)[index])


def vote(sims: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """(M,) labels from the (M, k) neighbour similarities and labels: most votes, ties to the larger summed
    similarity."""
    n_classes = int(labels.max()) + 1 if labels.numel() else 1
    counts = torch.zeros(len(sims), n_classes, device=sims.device).scatter_add_(
        1, labels, torch.ones_like(sims)
    )
    sim_sums = torch.zeros(len(sims), n_classes, device=sims.device).scatter_add_(1, labels, sims)
    k = sims.shape[1]
    # A one-vote lead (weight 4k) beats any similarity sum (range [-k, k], width 2k).
    return (counts * 4 * k + sim_sums).argmax(dim=1).cpu().numpy()


def knn_top1(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_eval: np.ndarray,
    y_eval: np.ndarray,
    k: int = 20,
    device: str | torch.device = "cpu",
) -> float:
    """Top-1 of cosine k-NN (see :func:`knn_predict`)."""
    check_rows(x_eval, y_eval, "k-NN eval")
    return top1(knn_predict(x_train, y_train, x_eval, k, device), y_eval)


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear CKA between (N, D1) and (N, D2) features of the same N inputs, computed in float64."""
    x = torch.as_tensor(x).double()
    y = torch.as_tensor(y).double()
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or len(x) < 2:
        raise ProbeError(
            f"CKA needs (N, D1) and (N, D2) features with N >= 2, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    x = x - x.mean(0)
    y = y - y.mean(0)
    cross = (y.T @ x).square().sum()
    denom = (x.T @ x).norm() * (y.T @ y).norm()
    return float(cross / denom) if denom > 0 else 0.0


def mean_cosine(s: torch.Tensor | np.ndarray, t: torch.Tensor | np.ndarray) -> float:
    """Mean over rows of cos(s_b, t_b) for (B, D) student features and (B, D) targets, in float64."""
    s = torch.as_tensor(s).double()
    t = torch.as_tensor(t).double()
    if s.shape != t.shape or s.ndim != 2 or len(s) == 0:
        raise ProbeError(
            f"cosine agreement needs equal (B, D) shapes, got {tuple(s.shape)} and {tuple(t.shape)}; "
            "is the projection for this student's width?"
        )
    return float((l2_normalise(s) * l2_normalise(t)).sum(1).mean())


def agreement(
    student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None
) -> dict[str, float | None]:
    """Teacher-student agreement on the same views: student (B, D_s), teacher (B, D_t), targets (B, D_s) or None.

    ``cosine``: mean cos(student, projected teacher target) (None without targets); ``cka``: linear CKA between
    the student's and the raw teacher's features.
    """
    cosine = mean_cosine(student, targets) if targets is not None else None
    return {"cosine": cosine, "cka": linear_cka(student, teacher)}
