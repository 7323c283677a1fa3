"""The printed table and the plot of `kdep eval`'s results.json: one row (or group of bars) per backbone.

from pipeline.evaluation.report import print_table, plot_results
print_table(results)                                  # probe@1, kNN@1, FT@1 as "0.760 [0.696, 0.815]"
plot_results(results["backbones"], "out/results.png")  # top-1s with 95% Wilson intervals as error bars
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from pipeline.evaluation.intervals import format_with_interval

ACCURACIES = ("probe_top1", "knn_top1", "finetune_top1")  # val top-1s, each with "<metric>_ci95" beside it


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def fmt_accuracy(row: dict, metric: str) -> str:
    """``0.760 [0.696, 0.815]``: the accuracy and its 95% interval."""
    return format_with_interval(row[metric], row.get(f"{metric}_ci95"))


def print_table(results: dict) -> None:
    """One row per backbone: probe, k-NN, fine-tune top-1 (each with its 95% interval) and agreement."""
    data = results["data"]
    title = f"kdep eval ({data['val_samples']} val images, {data['classes']} classes; top-1 [95% Wilson CI])"
    table = Table(title=title)
    for col in ("backbone", "arch", "dim", "probe@1", "C", "kNN@1", "FT@1", "cos", "CKA"):
        table.add_column(col, justify="left" if col in ("backbone", "arch") else "right")
    for r in results["backbones"]:
        table.add_row(
            r["name"], r["arch"], str(r["dim"]), fmt_accuracy(r, "probe_top1"), f"{r['probe_c']:g}",
            fmt_accuracy(r, "knn_top1"), fmt_accuracy(r, "finetune_top1"), fmt(r["agree_cosine"]),
            fmt(r["agree_cka"]),
        )  # fmt: skip
    console = Console()
    if not console.is_terminal:  # a log or a pipe: rich would wrap at 80 columns; lines there may be long
        console = Console(width=200)
    console.print(table)


def error_bars(rows: list[dict], metric: str) -> list[list[float]]:
    """(2, n) distances from each accuracy down and up to its 95% interval (0 where there is none)."""
    low, high = [], []
    for r in rows:
        value, ci = r[metric] or 0.0, r.get(f"{metric}_ci95")
        low.append(value - ci[0] if ci else 0.0)
        high.append(ci[1] - value if ci else 0.0)
    return [low, high]


def plot_results(rows: list[dict], path: Path) -> None:
    """Grouped bars of probe / k-NN (/ fine-tune) top-1 per backbone, 95% intervals as error bars; a PNG."""
    metrics = [m for m in ACCURACIES if any(r[m] is not None for r in rows)]
    fig = Figure(figsize=(1.5 + 1.2 * len(rows), 3.5))
    ax = fig.add_subplot()
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        xs = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [r[metric] or 0.0 for r in rows], width, label=metric.removesuffix("_top1"),
               yerr=error_bars(rows, metric), capsize=3, error_kw={"elinewidth": 1})  # fmt: skip
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows])
    ax.set_ylim(0, 1)
    ax.set_ylabel("val top-1 (95% Wilson interval)")
    ax.legend(
        fontsize="small", ncols=len(metrics), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
