"""The views study's plot: each metric against uses per view (epochs / k), online KD as a band.

Top row: each cached arm's mean over seeds with its 95% interval and each seed as a dot, online KD's mean and
interval as a line in a grey band, the random-init student (red) and the teacher (black) as dotted lines. Bottom
row: each cached arm's paired difference to online with its 95% interval, around zero.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from studies.tables import METRICS

BASE = "online"


def _errors(rows: list[dict], key: str) -> list[list[float]]:
    """matplotlib's (2, n) error bars of ``key`` from its ``_ci95`` interval."""
    return [[r[key] - r[f"{key}_ci95"][0] for r in rows], [r[f"{key}_ci95"][1] - r[key] for r in rows]]


def _panel_values(ax, summary: dict, metric: str) -> None:
    rows = summary["rows"]
    base = next(r for r in rows if r["arm"] == BASE)
    cached = [r for r in rows if r["arm"] != BASE]
    x = [r["uses_per_view"] for r in cached]
    ax.axhspan(*base[f"{metric}_ci95"], color="0.88", label="online KD, fresh views (95% CI)")
    ax.axhline(base[metric], color="0.55", lw=1)
    ax.errorbar(x, [r[metric] for r in cached], yerr=_errors(cached, metric), fmt="o-", capsize=3,
                label="k cached views (95% CI)")  # fmt: skip
    uses = {r["arm"]: r["uses_per_view"] for r in cached}
    seeds = [r for r in summary["runs"] if r["arm"] in uses]
    ax.plot([uses[r["arm"]] for r in seeds], [r[metric] for r in seeds], ".", color="0.4", label="one seed")
    for r in cached:
        ax.annotate(f"k={r['k']}", (r["uses_per_view"], r[f"{metric}_ci95"][1]), textcoords="offset points",
                    xytext=(0, 3), ha="center", fontsize="x-small")  # fmt: skip
    refs = summary["references"]
    ax.axhline(refs["random"][metric], ls=":", color="tab:red", label="random-init student")
    if metric in refs["teacher"]:
        ax.axhline(refs["teacher"][metric], ls=":", color="black", label="teacher")


def _panel_differences(ax, summary: dict, metric: str) -> None:
    cached = [r for r in summary["rows"] if r["arm"] != BASE]
    scale = 1.0 if metric == "agree_cosine" else 100.0
    key = f"{metric}_delta"
    rows = [{key: r[key] * scale, f"{key}_ci95": [v * scale for v in r[f"{key}_ci95"]]} for r in cached]
    ax.axhline(0.0, color="0.55", lw=1)
    ax.errorbar([r["uses_per_view"] for r in cached], [r[key] for r in rows], yerr=_errors(rows, key), fmt="o",
                capsize=3, color="tab:blue")  # fmt: skip


def plot_study(summary: dict, path: Path) -> None:
    """study.png: a column per metric, values on top, paired differences to online below."""
    fig = Figure(figsize=(4.2 * len(METRICS), 6.4))
    for i, (metric, label) in enumerate(METRICS.items()):
        top = fig.add_subplot(2, len(METRICS), i + 1)
        _panel_values(top, summary, metric)
        top.set_title(label)
        bottom = fig.add_subplot(2, len(METRICS), len(METRICS) + i + 1, sharex=top)
        _panel_differences(bottom, summary, metric)
        unit = "" if metric == "agree_cosine" else " (points)"
        bottom.set_ylabel(f"cached − online{unit}")
        bottom.set_xscale("log", base=2)
        uses = sorted({r["uses_per_view"] for r in summary["rows"] if r["arm"] != BASE})
        bottom.set_xticks(uses, [f"{u:g}" for u in uses])
        bottom.minorticks_off()
        bottom.set_xlabel(f"uses per cached view (epochs / k, {summary['epochs']} epochs)")
        if i == 0:
            top.legend(fontsize="x-small", loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
