"""The projection artefact: a cached teacher feature (D_t) -> a student training target (D_s), in one step.

    from pipeline.projection.artefact import load_projection
    proj = load_projection("out/demo/proj-r18.npz")  # checks the manifest written beside it by `kdep fit-svd`
    t = proj.targets(feats)  # (B, D_t) any float dtype, any device -> (B, D_s) float32 on that device

A target is ``y = F((x - mean) @ basis / scale)`` computed in float32 (TF32 is switched off for the product), with
``F(u) = sign(u) * |u / T|^(1/n)`` for ``pts`` and ``F(u) = u`` for every other transform (``sn`` and ``sm`` live
entirely in ``scale``). Channel-selection methods (cs-var, cs-rand, interp) store the 0/1 selection matrix as
``basis``, a zero ``mean`` and the chosen teacher channels in ``channels``; targets() then indexes (exact).

Files, written by `Projection.save` (npz first, then the manifest, each to a temporary name and renamed)::

    <out>.npz       format, method, transform (str); mean (D_t,) f32; basis (D_t, D_s) f32; scale (D_s,) f32;
                    channels (D_s,) int64 (empty for svd); pts_t, pts_n (f64); the statistics in STAT_KEYS (f64);
                    meta_json (str: the provenance, as in the manifest)
    <out>.npz.json  the manifest: format, npz name and sha256, method, transform, widths, summary statistics and
                    provenance (cache fingerprint and path, tap, views, rows, fraction, seed, versions, config)
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import KdepError
from pipeline.files import atomic_path, file_sha256, write_json_atomic

if TYPE_CHECKING:
    import torch

FORMAT = "kdep-projection/1"
TRANSFORMS = ("pts", "sn", "sm-linear", "sm-rank", "sm-match", "none")  # as stored ("sm" is "sm-linear")
STAT_KEYS = (
    "singular_values",  # (D_t,) sqrt of the eigenvalues of the centred scatter matrix, descending
    "explained_variance_ratio",  # (D_s,) variance of each output channel / total variance of x
    "explained_variance_cumulative",  # (D_s,) running sum of the above
    "raw_std",  # (D_t,) per-channel std of the raw teacher feature
    "std_before",  # (D_s,) per-channel std of (x - mean) @ basis
    "std_after",  # (D_s,) per-channel std of the targets (after scale and transform)
    "std_ratio_before",  # () max / min of std_before (inf when a channel is constant)
    "std_ratio_after",  # () max / min of std_after
    "n_rows",  # () rows (image views) the projection was fitted on
)


class ProjectionError(KdepError):
    """A projection file is missing, incomplete, or does not match its manifest."""


def manifest_path(npz_path: str | Path) -> Path:
    """The manifest written beside ``npz_path`` (``proj.npz`` -> ``proj.npz.json``)."""
    npz_path = Path(npz_path)
    return npz_path.with_name(npz_path.name + ".json")


def pts_numpy(u: np.ndarray, t: float, n: float) -> np.ndarray:
    """Power transform with sign: sign(u) * |u / T|^(1/n) (odd, monotone; PTS(T * 2^n) = 2)."""
    return np.sign(u) * np.abs(u / t) ** (1.0 / n)


def std_ratio(std: np.ndarray) -> float:
    """max std / min std (inf when some channel is constant)."""
    low = float(np.min(std))
    return float(np.max(std)) / low if low > 0 else float("inf")


@contextmanager
def _strict_fp32():
    """Full float32 matmul inside (the caller may have enabled TF32, which rounds inputs to 10 mantissa bits)."""
    import torch

    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


@dataclass(frozen=True, eq=False)
class Projection:
    """A fitted projection. Arrays are what targets() uses; stats and meta are what the fit measured/recorded."""

    method: str  # svd | cs-var | cs-rand | interp
    transform: str  # one of TRANSFORMS
    mean: np.ndarray  # (D_t,) float32, subtracted first (zeros for channel selection)
    basis: np.ndarray  # (D_t, D_s) float32: right singular vectors, or a 0/1 selection matrix
    scale: np.ndarray  # (D_s,) float32 divisor after the product (ones for pts and none)
    channels: np.ndarray  # (D_s,) int64 selected teacher channels; empty for svd
    pts_t: float = 0.1  # PTS temperature T (used only by pts)
    pts_n: float = 3.0  # PTS root n (used only by pts)
    stats: dict[str, np.ndarray] = field(default_factory=dict)  # STAT_KEYS -> float64 arrays
    meta: dict[str, Any] = field(default_factory=dict)  # provenance, copied into the manifest
    _on_device: dict = field(
        default_factory=dict, init=False, repr=False, compare=False
    )  # device -> torch tensors

    @property
    def dim_teacher(self) -> int:
        return int(self.basis.shape[0])

    @property
    def dim_student(self) -> int:
        return int(self.basis.shape[1])

    def project_numpy(self, x: np.ndarray) -> np.ndarray:
        """(B, D_t) -> (B, D_s) float64: (x - mean) @ basis / scale, before the transform."""
        x = np.asarray(x, dtype=np.float64)
        if self.channels.size:
            z = x[:, self.channels] - self.mean[self.channels]
        else:
            z = (x - self.mean) @ self.basis.astype(np.float64)
        return z / self.scale

    def targets_numpy(self, x: np.ndarray) -> np.ndarray:
        """(B, D_t) -> (B, D_s) float64 targets (the float64 twin of targets(); used for statistics)."""
        u = self.project_numpy(x)
        return pts_numpy(u, self.pts_t, self.pts_n) if self.transform == "pts" else u

    def _tensors(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        import torch

        key = str(device)
        if key not in self._on_device:
            with torch.inference_mode(False):  # cached for later calls: never inference tensors
                arrays = (self.mean, self.basis, self.scale)
                tensors = tuple(torch.as_tensor(a, dtype=torch.float32, device=device) for a in arrays)
                channels = torch.as_tensor(self.channels, dtype=torch.long, device=device)
            self._on_device[key] = (*tensors, channels)
        return self._on_device[key]

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D_t) raw teacher features, any float dtype/device -> (..., D_s) float32 targets on x's device."""
        import torch

        if x.shape[-1] != self.dim_teacher:
            raise ProjectionError(
                f"features of width {x.shape[-1]} given to a projection fitted on D_t={self.dim_teacher} "
                f"({self.meta.get('tap', '?')} of {self.meta.get('cache_path', '?')}); use the matching cache"
            )
        mean, basis, scale, channels = self._tensors(x.device)
        x = x.to(torch.float32)
        if self.channels.size:
            z = x.index_select(-1, channels) - mean.index_select(0, channels)
        else:
            with _strict_fp32():
                z = (x - mean) @ basis
        u = z / scale
        if self.transform == "pts":
            u = torch.sign(u) * (u.abs() / self.pts_t).pow(1.0 / self.pts_n)
        return u

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything the npz holds (see the module docstring)."""
        out = {
            "format": np.array(FORMAT),
            "method": np.array(self.method),
            "transform": np.array(self.transform),
            "mean": self.mean.astype(np.float32),
            "basis": self.basis.astype(np.float32),
            "scale": self.scale.astype(np.float32),
            "channels": self.channels.astype(np.int64),
            "pts_t": np.array(self.pts_t, np.float64),
            "pts_n": np.array(self.pts_n, np.float64),
            "meta_json": np.array(json.dumps(self.meta, default=str)),
        }
        out.update({k: np.asarray(self.stats[k], np.float64) for k in STAT_KEYS})
        return out

    def summary(self) -> dict[str, Any]:
        """Scalars for the manifest and the command's report."""
        cum = self.stats["explained_variance_cumulative"]
        return {
            "method": self.method,
            "transform": self.transform,
            "pts_t": self.pts_t,
            "pts_n": self.pts_n,
            "dim_teacher": self.dim_teacher,
            "dim_student": self.dim_student,
            "n_rows": int(self.stats["n_rows"]),
            "explained_variance": float(cum[-1]) if cum.size else 0.0,
            "std_ratio_before": _json_float(self.stats["std_ratio_before"]),
            "std_ratio_after": _json_float(self.stats["std_ratio_after"]),
        }

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.npz) then its manifest, each atomically; returns the manifest path."""
        path, man = Path(path), manifest_path(path)
        man.unlink(
            missing_ok=True
        )  # no manifest = incomplete: a crash below never leaves an old one beside new data
        _write_npz_atomic(path, self.arrays())
        record = {"format": FORMAT, "npz": path.name, "npz_sha256": file_sha256(path), **self.summary()}
        write_json_atomic(man, {**record, "provenance": self.meta})
        return man


def _json_float(value: Any) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None  # JSON has no inf


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)  # a file object: np.savez would otherwise append ".npz" to the name


def load_projection(path: str | Path) -> Projection:
    """Read a projection written by `kdep fit-svd`; refuses a file without (or not matching) its manifest."""
    path, man = Path(path), manifest_path(path)
    if not path.is_file():
        raise ProjectionError(
            f"no projection at {path}; run `kdep fit-svd CACHE --dim D_s --out {path}` first"
        )
    if not man.is_file():
        raise ProjectionError(
            f"{path} has no manifest {man.name}: its fit did not finish; rerun `kdep fit-svd ... --out {path}`"
        )
    record = json.loads(man.read_text())
    if record.get("npz_sha256") != file_sha256(path):
        raise ProjectionError(f"{path} does not match its manifest {man.name} (sha256); rerun `kdep fit-svd`")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    if str(arrays.get("format")) != FORMAT:
        raise ProjectionError(f"{path} is not a {FORMAT} file; rerun `kdep fit-svd`")
    return Projection(
        method=str(arrays["method"]),
        transform=str(arrays["transform"]),
        mean=arrays["mean"],
        basis=arrays["basis"],
        scale=arrays["scale"],
        channels=arrays["channels"],
        pts_t=float(arrays["pts_t"]),
        pts_n=float(arrays["pts_n"]),
        stats={k: arrays[k] for k in STAT_KEYS},
        meta={**record["provenance"], "npz_sha256": record["npz_sha256"]},  # the checked file's identity
    )
