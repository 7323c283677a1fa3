"""Plots of a fitted projection (PNG, Agg canvas: no display, no global pyplot state).

- ``<stem>.explained_variance.png``: cumulative explained variance of the full SVD spectrum with D_s marked (and,
  for a channel-selection method, the cumulative variance of its chosen channels).
- ``<stem>.channel_std.png``: per-channel std before and after the transform (log scale), Std Ratios in the title.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.files import atomic_path
from pipeline.projection.artefact import Projection


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:  # "<name>.png.tmp": the format must be given, not inferred from the name
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_explained_variance(projection: Projection, path: Path) -> Path:
    """Cumulative explained variance vs number of components, D_s marked."""
    power = projection.stats["singular_values"] ** 2
    svd_cum = np.cumsum(power) / max(power.sum(), np.finfo(float).tiny)
    d_s = projection.dim_student
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(np.arange(1, len(svd_cum) + 1), svd_cum, label="SVD (all components)")
    if projection.method != "svd":
        method_cum = projection.stats["explained_variance_cumulative"]
        ax.plot(np.arange(1, d_s + 1), method_cum, label=f"{projection.method} (chosen channels)")
    kept = float(projection.stats["explained_variance_cumulative"][-1])
    ax.axvline(d_s, color="k", linestyle="--", linewidth=1)
    ax.annotate(f"D_s={d_s}: {kept:.1%}", (d_s, kept), textcoords="offset points", xytext=(5, -12))
    ax.set(xlabel="components", ylabel="cumulative explained variance", ylim=(0, 1.02))
    ax.set_title(f"{projection.method}: {projection.dim_teacher} -> {d_s}")
    ax.legend(loc="lower right")
    return _save(fig, path)


def _ratio_text(value: float) -> str:
    return f"{value:.3g}" if np.isfinite(value) else "inf"


def plot_channel_std(projection: Projection, path: Path) -> Path:
    """Per-channel std of the projection before and after the transform, log scale."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for key, label in (("std_before", "before"), ("std_after", f"after {projection.transform}")):
        std = np.asarray(projection.stats[key], dtype=float)
        ax.plot(np.arange(len(std)), np.where(std > 0, std, np.nan), label=label)
    ax.set_yscale("log")
    ax.set(xlabel="output channel", ylabel="std over the fit rows")
    before = _ratio_text(float(projection.stats["std_ratio_before"]))
    after = _ratio_text(float(projection.stats["std_ratio_after"]))
    ax.set_title(f"Std Ratio (max/min): before {before}, after {after}")
    ax.legend()
    return _save(fig, path)


def write_plots(projection: Projection, npz_path: str | Path) -> list[Path]:
    """Both plots beside the artefact; returns their paths."""
    npz_path = Path(npz_path)
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    stem = npz_path.with_suffix("")
    return [
        plot_explained_variance(projection, Path(f"{stem}.explained_variance.png")),
        plot_channel_std(projection, Path(f"{stem}.channel_std.png")),
    ]
