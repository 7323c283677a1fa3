"""The plot of a searched process: alpha(t) per pathway, like the appendix's Figs. 2-3 (PNG, Agg canvas).

One panel per teacher stage i (the appendix groups curves by connection), each curve a pathway ``t{i}-s{j}``:
its softmax weight against search progress (step / S), epoch boundaries dotted. A second row shows the normalised
alpha (weight / the largest weight of that step, what ``--alpha-threshold`` is compared with).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.files import atomic_path
from pipeline.process.artefact import Process, normalised


def plot_alpha(process: Process, path: str | Path) -> Path:
    """Write the alpha(t) figure of ``process`` to ``path`` (PNG)."""
    path = Path(path)
    stages = sorted({p["teacher_stage"] for p in process.pathways})
    weights, norm, x = process.weights, normalised(process), process.progress
    fig = Figure(figsize=(3.2 * len(stages), 5.6))
    axes = fig.subplots(2, len(stages), squeeze=False, sharex=True, sharey="row")
    for col, stage in enumerate(stages):
        for k, p in enumerate(process.pathways):
            if p["teacher_stage"] != stage:
                continue
            axes[0][col].plot(x, weights[:, k], label=p["name"])
            axes[1][col].plot(x, norm[:, k], label=p["name"])
        axes[0][col].set_title(f"teacher stage {stage}")
        axes[0][col].legend(fontsize=7)
        axes[1][col].set_xlabel("search progress (step / S)")
        for ax in (axes[0][col], axes[1][col]):
            for epoch in process.epochs[:-1]:
                ax.axvline(epoch["step"] / max(process.steps, 1), color="k", linestyle=":", linewidth=0.8)
    axes[0][0].set_ylabel("softmax(alpha)")
    axes[1][0].set_ylabel("alpha / max alpha")
    fig.suptitle(f"searched process: {len(process.pathways)} pathways, {process.steps} steps", fontsize=10)
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path
