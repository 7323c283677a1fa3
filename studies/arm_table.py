"""A study's table when its rows are named arms rather than a number (``kdep study-layers``): per-run scores -> one
row per arm, as JSON, CSV, markdown and PNG.

    from studies.arm_table import summarise_arms, write_arm_tables
    rows = summarise_arms({"single-tap": runs_a, "multi-layer": runs_b}, val_images=1000, agreement_images=1000)

A run is one student, as in ``studies/tables.py`` (``probe_top1``, ``knn_top1``,
``agree_cosine``, ``agree_cosine_sd``). Each row holds, per metric, the mean over its seeds, the 95% interval
(``pipeline/evaluation/seed_intervals.py``), the seed sd, the evaluation-set se and the difference to the first
arm (the baseline).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from pipeline.evaluation.intervals import format_with_interval
from studies.tables import (
    METRICS,
    PARTS,
    REFERENCE_LABELS,
    reference_lines,
    summarise_runs,
    write_study_files,
)

CSV_COLUMNS = ("arm", "seeds", *(f"{m}{p}" for m in METRICS for p in PARTS))


def summarise_arms(arms: dict[str, list[dict]], val_images: int, agreement_images: int) -> list[dict]:
    """One row per arm, in the order given, with ``<metric>_delta`` to the first arm."""
    rows = [
        {"arm": arm, "seeds": len(runs), **summarise_runs(runs, val_images, agreement_images)}
        for arm, runs in arms.items()
    ]
    for row in rows:
        for metric in METRICS:
            row[f"{metric}_delta"] = row[metric] - rows[0][metric]
    return rows


def markdown_arms(summary: dict) -> str:
    """One line per arm (mean over seeds [95% CI], difference to the first arm), the references, a note."""
    d, rows = summary["data"], summary["rows"]
    base = rows[0]["arm"]
    head = ["arm", "seeds", *(f"{v} [95% CI]" for v in METRICS.values()),
            *(f"Δ {v.split()[0]} vs {base}" for v in METRICS.values())]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        cells = [format_with_interval(row[m], row[f"{m}_ci95"]) for m in METRICS]
        cells += [f"{row[f'{m}_delta']:+.3f}" for m in METRICS]
        lines.append(
            f"| {summary['labels'].get(row['arm'], row['arm'])} | {row['seeds']} | "
            + " | ".join(cells)
            + " |"
        )
    lines += reference_lines(summary)
    lines += ["", f"Probe and k-NN top-1 on {d['val_samples']} held-out images (centre views, {d['resolution']} px); "
              f"cosine between the student's pre_relu feature and the projected teacher pre_relu target on "
              f"{d['agreement_images']} of them ({d['agreement_views']} views, seed {d['agreement_seed']}). "
              f"95% intervals: {summary['intervals']['method']} ({summary['intervals']['doc']})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_arms(summary: dict, path: Path) -> None:
    """A panel per metric: each arm's mean over seeds with its 95% interval, each seed as a dot, and the first
    arm's interval as a grey band."""
    rows, runs = summary["rows"], summary["runs"]
    arms = [r["arm"] for r in rows]
    fig = Figure(figsize=(4.0 * len(METRICS), 3.4))
    for i, (metric, label) in enumerate(METRICS.items()):
        ax = fig.add_subplot(1, len(METRICS), i + 1)
        means = [r[metric] for r in rows]
        err = [[m - r[f"{metric}_ci95"][0] for m, r in zip(means, rows, strict=True)],
               [r[f"{metric}_ci95"][1] - m for m, r in zip(means, rows, strict=True)]]  # fmt: skip
        ax.axhspan(*rows[0][f"{metric}_ci95"], color="0.88", label=f"{arms[0]} (95% CI)")
        ax.errorbar(range(len(arms)), means, yerr=err, fmt="o", capsize=4, label="mean over seeds (95% CI)")
        ax.plot(
            [arms.index(r["arm"]) for r in runs],
            [r[metric] for r in runs],
            ".",
            color="0.4",
            label="one seed",
        )
        for name, ref in summary["references"].items():
            if metric in ref:
                ax.axhline(ref[metric], ls=":", lw=1, color="0.3" if name == "teacher" else "tab:red",
                           label=REFERENCE_LABELS.get(name, name))  # fmt: skip
        ax.set_xticks(range(len(arms)), arms)
        ax.set_xlim(-0.5, len(arms) - 0.5)
        ax.set_title(label)
        if i == 0:
            ax.legend(fontsize="x-small", loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_arm_tables(out: Path, summary: dict) -> dict[str, Path]:
    """study.json (everything), study.csv (the rows), study.md (the table) and study.png (the plot) in ``out``."""
    return write_study_files(out, summary, CSV_COLUMNS, markdown_arms, plot_arms)
