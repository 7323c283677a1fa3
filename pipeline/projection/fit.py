"""Fitting a projection from accumulated statistics (no pass over the data): pure numpy, float64.

Statistics (FeatureStats): N rows, column sums and the Gram matrix X^T X; the centred scatter matrix is
``S = X^T X - N mu mu^T`` and every std below is the population std (divide by N).

Methods (KDEP, section 3 and Table 2 of the paper; formulas in docs/method.md), each giving ``mean``, ``basis``
(D_t, D_s) and the per-channel std of ``(x - mean) @ basis``:
- ``svd``: mu and the top-D_s eigenvectors of S (= right singular vectors of X - mu), in descending order of
  eigenvalue; singular values s = sqrt(eigenvalues), so the std of component i is s_i / sqrt(N). Not scaled.
  Sign rule: in every basis column the entry of largest |value| (first one on ties) is positive.
- ``cs-var``: the D_s raw (uncentred: mean 0) channels of largest variance, ordered by decreasing variance
  (ties: lower channel first); the variance comes from the same S.
- ``cs-rand``: D_s channels drawn without replacement by numpy.random.default_rng(seed), in increasing order.
- ``interp``: nearest-neighbour interpolation, channel j = floor(j * D_t / D_s), uncentred.

Transforms, as a per-channel divisor ``scale`` (then PTS for ``pts``). A constant channel (std 0) keeps scale 1.
Below, sigma_i is the std of output channel i before the transform (svd: s_i / sqrt(N)) and R = max/min of the raw
feature's per-channel std over its non-constant channels (the reference hard-codes it: STD_PRE_PCA = 2.98).
- ``pts`` / ``none``: scale 1.
- ``sn``: scale = sigma (every channel std 1). The KDEP reference (``src/resnet.py``, ResNet_feat_svd_pre_relu,
  commented "Var matching step1") multiplies by 500 / s_i instead, s_i the singular values of its centred fit
  matrix (``gen_svd_weights.py``: torch.svd), so its channel std is 500 / sqrt(N): about 1.40 for its N = 128k
  (the 10% ImageNet subset, one view per image; its SM blocks multiply by 357 ~ sqrt(N) to get back to 1). That
  constant ties the target scale to the fit-set size; ours is 1 for any N (a cache of K views per image has
  K times the rows), and a reference-scale target is ours times 500 / sqrt(N) (the loss then grows by its square).
- ``sm-linear`` (what ``sm`` means; the reference's "step2 method 1"): the target std is linear in sigma,
  y_i = (sigma_1 - R sigma_k + (R - 1) sigma_i) / (sigma_1 - sigma_k), with sigma_1 / sigma_k the largest /
  smallest non-constant sigma: R for the largest channel, 1 for the smallest. The formula is invariant to a common
  scale of sigma, so sigma_i may be read as the singular value s_i as in the reference. Every sigma equal (or
  D_s = 1): R everywhere.
- ``sm-rank``: linear by rank instead of by value (this project's earlier ``sm-linear``): linspace(R, 1, D_s) in
  order of decreasing sigma (ties: lower channel first); D_s = 1: R.
- ``sm-match`` (the reference's "step2 method 2"): the channel of rank k gets the k-th largest per-channel std of
  the raw feature.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from pipeline.projection.artefact import Projection, std_ratio

SM_DEFAULT = "sm-linear"  # what "sm" resolves to
SIGN_RULE = "largest-|value| entry of each basis column is positive (first on ties)"


@dataclass(frozen=True)
class FeatureStats:
    """Sufficient statistics of N rows of D features, float64."""

    n: int  # rows
    col_sum: np.ndarray  # (D,) sum of x
    gram: np.ndarray  # (D, D) sum of x x^T

    @classmethod
    def from_rows(cls, x: np.ndarray) -> FeatureStats:
        """(N, D) rows, any float dtype -> their statistics (cast to float64 first)."""
        x = np.asarray(x, dtype=np.float64)
        return cls(len(x), x.sum(axis=0), x.T @ x)

    @property
    def mean(self) -> np.ndarray:
        return self.col_sum / self.n

    def scatter(self) -> np.ndarray:
        """(D, D) centred scatter matrix X^T X - N mu mu^T (symmetrised)."""
        s = self.gram - self.n * np.outer(self.mean, self.mean)
        return (s + s.T) / 2

    def variance(self) -> np.ndarray:
        """(D,) per-channel population variance (clipped at 0 against rounding)."""
        return np.maximum(np.diag(self.gram) / self.n - self.mean**2, 0.0)


def resolve_transform(name: str) -> str:
    """The stored transform name ("sm" -> SM_DEFAULT)."""
    return SM_DEFAULT if name == "sm" else name


def fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip columns so each column's largest-|value| entry is positive (SIGN_RULE)."""
    top = np.argmax(np.abs(vectors), axis=0)
    signs = np.sign(vectors[top, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs


def eigen_decompose(stats: FeatureStats) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (D,) descending, clipped at 0, and eigenvectors (D, D) in the same order, signs fixed."""
    values, vectors = np.linalg.eigh(stats.scatter())
    order = np.argsort(values)[::-1]
    return np.maximum(values[order], 0.0), fix_signs(vectors[:, order])


def select_channels(method: str, variance: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """(D_s,) teacher channels kept by a channel-selection method."""
    d_t = len(variance)
    if method == "cs-var":
        return np.argsort(-variance, kind="stable")[:dim]
    if method == "cs-rand":
        return np.sort(np.random.default_rng(seed).choice(d_t, size=dim, replace=False))
    if method == "interp":
        return (np.arange(dim) * d_t) // dim
    raise ValueError(f"not a channel-selection method: {method!r}")


def selection_matrix(channels: np.ndarray, d_t: int) -> np.ndarray:
    """(D_t, D_s) 0/1 matrix with column j selecting channel channels[j]."""
    out = np.zeros((d_t, len(channels)))
    out[channels, np.arange(len(channels))] = 1.0
    return out


def target_std(transform: str, std: np.ndarray, raw_std: np.ndarray) -> np.ndarray | None:
    """(D_s,) the per-channel std a transform asks for (None: keep the std as it is)."""
    if transform in ("pts", "none"):
        return None
    if transform == "sn":
        return np.ones_like(std)
    live = raw_std[raw_std > 0]
    ratio = live.max() / live.min() if live.size else 1.0
    if transform == "sm-linear":
        return linear_in_value(std, ratio)
    if transform == "sm-rank":
        levels = np.linspace(ratio, 1.0, len(std))
    elif transform == "sm-match":
        levels = np.sort(raw_std)[::-1][: len(std)]
    else:
        raise ValueError(f"unknown transform {transform!r}")
    out = np.empty_like(std)
    out[np.argsort(-std, kind="stable")] = levels  # by rank: the largest std gets the largest level
    return out


def linear_in_value(std: np.ndarray, ratio: float) -> np.ndarray:
    """(D_s,) KDEP's SM method 1: (s_1 - R s_k + (R - 1) s_i) / (s_1 - s_k), s_1 / s_k the largest / smallest
    non-constant std: R at the largest, 1 at the smallest. All equal (or none non-constant): R everywhere."""
    live = std[std > 0]
    if live.size == 0 or live.max() == live.min():
        return np.full_like(std, ratio)
    top, bottom = live.max(), live.min()
    return (top - ratio * bottom + (ratio - 1.0) * std) / (top - bottom)


def transform_scale(transform: str, std: np.ndarray, raw_std: np.ndarray) -> np.ndarray:
    """(D_s,) divisor so that std / scale = the transform's target std; 1 where a channel is constant."""
    wanted = target_std(transform, std, raw_std)
    if wanted is None:
        return np.ones_like(std)
    return np.where(std > 0, std / np.where(wanted > 0, wanted, 1.0), 1.0)


def fit_projection(
    stats: FeatureStats,
    method: str,
    dim: int,
    transform: str = "pts",
    pts_t: float = 0.1,
    pts_n: float = 3.0,
    seed: int = 0,
) -> Projection:
    """Fit ``method`` to D_s = ``dim`` channels, then the transform's scale; stats of linear transforms are exact.

    ``std_after`` of ``pts`` (non-linear) is NaN here: it needs a pass over the data (svd_stats.target_moments).
    """
    transform = resolve_transform(transform)
    d_t = len(stats.col_sum)
    if not 1 <= dim <= d_t:
        raise ValueError(f"dim must be in [1, {d_t}], got {dim}")
    eigenvalues, vectors = eigen_decompose(stats)
    variance = stats.variance()
    if method == "svd":
        mean, basis, channels = stats.mean, vectors[:, :dim], np.zeros(0, np.int64)
        comp_var = eigenvalues[:dim] / stats.n
    else:
        channels = select_channels(method, variance, dim, seed).astype(np.int64)
        mean, basis, comp_var = np.zeros(d_t), selection_matrix(channels, d_t), variance[channels]
    std_before, raw_std = np.sqrt(comp_var), np.sqrt(variance)
    scale = transform_scale(transform, std_before, raw_std)
    ratio = comp_var / max(eigenvalues.sum() / stats.n, np.finfo(float).tiny)
    std_after = std_before / scale if transform != "pts" else np.full(dim, np.nan)
    out_stats = {
        "singular_values": np.sqrt(eigenvalues),
        "explained_variance_ratio": ratio,
        "explained_variance_cumulative": np.cumsum(ratio),
        "raw_std": raw_std,
        "std_before": std_before,
        "std_after": std_after,
        "std_ratio_before": np.array(std_ratio(std_before)),
        "std_ratio_after": np.array(std_ratio(std_after) if transform != "pts" else np.nan),
        "n_rows": np.array(stats.n),
    }
    arrays = (mean.astype(np.float32), basis.astype(np.float32), scale.astype(np.float32))
    return Projection(method, transform, *arrays, channels, float(pts_t), float(pts_n), out_stats)


def with_target_std(projection: Projection, std_after: np.ndarray) -> Projection:
    """The projection with measured per-channel target stds (and their ratio) filled in."""
    stats = {**projection.stats, "std_after": std_after, "std_ratio_after": np.array(std_ratio(std_after))}
    return replace(projection, stats=stats)
