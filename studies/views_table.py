"""The views study's table (``kdep study views``): per-run scores -> one row per k, as JSON, CSV, markdown and PNG.

    from studies.views_table import summarise_k, write_tables
    row = summarise_k(8, runs_with_k_8, val_images=4000, agreement_images=1000)

``summarise_runs`` is the row without its label, shared with other studies (``studies/arm_table.py``).

A run is one student: ``{"name", "k", "seed", "probe_top1", "knn_top1", "agree_cosine", "agree_cosine_sd"}``
(accuracies on the same ``val_images`` images; the cosine's mean and standard deviation over ``agreement_images``
held-out views). A row holds, per metric, the mean over the row's seeds, its 95% interval
(``pipeline/evaluation/seed_intervals.py``), the seed standard deviation, the evaluation-set standard error and
the difference to the baseline row (k = E, the last).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from matplotlib.figure import Figure

from pipeline.evaluation.intervals import format_with_interval
from pipeline.evaluation.seed_intervals import accuracy_over_seeds, mean_over_seeds
from pipeline.files import atomic_path, write_json_atomic

METRICS = {"probe_top1": "probe top-1", "knn_top1": "k-NN top-1", "agree_cosine": "cos to target"}
PARTS = ("", "_low", "_high", "_seed_sd", "_eval_se", "_delta")  # CSV columns per metric
REFERENCE_LABELS = {"teacher": "teacher (labelled, reference)", "random": "random-init student (reference)"}
CSV_COLUMNS = ("k", "seeds", *(f"{m}{p}" for m in METRICS for p in PARTS))


def summarise_k(k: int, runs: list[dict], val_images: int, agreement_images: int) -> dict:
    """One row: each metric's mean over the seeds, 95% interval, seed sd, evaluation-set se and t's dof."""
    return {"k": k, "seeds": len(runs), **summarise_runs(runs, val_images, agreement_images)}


def summarise_runs(runs: list[dict], val_images: int, agreement_images: int) -> dict:
    """Per metric of :data:`METRICS`, over the runs (seeds) of one row: ``<metric>`` (mean), ``_ci95``,
    ``_seed_sd``, ``_eval_se`` and ``_dof`` (None: the normal quantile)."""
    summaries = {
        "probe_top1": accuracy_over_seeds([r["probe_top1"] for r in runs], val_images),
        "knn_top1": accuracy_over_seeds([r["knn_top1"] for r in runs], val_images),
        "agree_cosine": mean_over_seeds(
            [r["agree_cosine"] for r in runs], [r["agree_cosine_sd"] for r in runs], agreement_images
        ),
    }
    row: dict = {}
    for metric, s in summaries.items():
        row.update({metric: s.mean, f"{metric}_ci95": s.interval(), f"{metric}_seed_sd": s.seed_sd,
                    f"{metric}_eval_se": s.eval_se,
                    f"{metric}_dof": None if math.isinf(s.dof) else s.dof})  # None: the normal quantile  # fmt: skip
    return row


def add_deltas(rows: list[dict]) -> list[dict]:
    """``<metric>_delta``: each row's mean minus the last row's (k = E, the fresh-view baseline)."""
    for row in rows:
        for metric in METRICS:
            row[f"{metric}_delta"] = row[metric] - rows[-1][metric]
    return rows


def csv_row(row: dict, columns: tuple[str, ...] = CSV_COLUMNS) -> dict:
    """A row flattened for CSV (intervals as ``_low`` / ``_high``)."""
    flat = dict(row)
    for metric in METRICS:
        flat[f"{metric}_low"], flat[f"{metric}_high"] = row[f"{metric}_ci95"]
    return {c: flat[c] for c in columns}


def reference_lines(summary: dict) -> list[str]:
    """Markdown lines of the reference backbones (teacher, random init): probe and k-NN with intervals."""
    lines = []
    for name, ref in summary["references"].items():
        cells = [format_with_interval(ref[m], ref[f"{m}_ci95"]) for m in ("probe_top1", "knn_top1")]
        lines.append(f"| {REFERENCE_LABELS.get(name, name)} | – | " + " | ".join(cells + ["–"] * 4) + " |")
    return lines


def markdown_table(summary: dict) -> str:
    """One line per k (mean over seeds [95% CI], difference to k = E), the teacher as a reference, a note."""
    d, e = summary["data"], summary["epochs"]
    head = [f"k (of E = {e} views)", "seeds", *(f"{v} [95% CI]" for v in METRICS.values()),
            *(f"Δ {v.split()[0]} vs k = E" for v in METRICS.values())]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in summary["rows"]:
        label = f"{row['k']} (fresh view every epoch)" if row["k"] == e else str(row["k"])
        cells = [format_with_interval(row[m], row[f"{m}_ci95"]) for m in METRICS]
        cells += [f"{row[f'{m}_delta']:+.3f}" for m in METRICS]
        lines.append(f"| {label} | {row['seeds']} | " + " | ".join(cells) + " |")
    lines += reference_lines(summary)
    lines += ["", f"Probe and k-NN top-1 on {d['val_samples']} held-out images (centre views, {d['resolution']} px); "
              f"cosine to the projected teacher target on {d['agreement_images']} of them ({d['agreement_views']} "
              f"views, seed {d['agreement_seed']}). 95% intervals: {summary['intervals']['method']} "
              f"({summary['intervals']['doc']})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_study(summary: dict, path: Path) -> None:
    """Quality vs k, a panel per metric: mean over seeds with its 95% interval, each seed as a dot, and the
    k = E baseline's interval as a grey band."""
    rows, runs = summary["rows"], summary["runs"]
    ks = [r["k"] for r in rows]
    fig = Figure(figsize=(4.0 * len(METRICS), 3.4))
    for i, (metric, label) in enumerate(METRICS.items()):
        ax = fig.add_subplot(1, len(METRICS), i + 1)
        means = [r[metric] for r in rows]
        err = [[m - r[f"{metric}_ci95"][0] for m, r in zip(means, rows, strict=True)],
               [r[f"{metric}_ci95"][1] - m for m, r in zip(means, rows, strict=True)]]  # fmt: skip
        ax.axhspan(*rows[-1][f"{metric}_ci95"], color="0.88", label=f"k = E = {summary['epochs']} (95% CI)")
        ax.errorbar(ks, means, yerr=err, fmt="o-", capsize=3, label="mean over seeds (95% CI)")
        ax.plot([r["k"] for r in runs], [r[metric] for r in runs], ".", color="0.4", label="one seed")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("views used per image, k")
        ax.set_title(label)
        if i == 0:
            ax.legend(fontsize="x-small", loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_tables(out: Path, summary: dict) -> dict[str, Path]:
    """study.json (everything), study.csv (the rows), study.md (the table) and study.png (the plot) in ``out``."""
    return write_study_files(out, summary, CSV_COLUMNS, markdown_table, plot_study)


def write_study_files(out: Path, summary: dict, columns: tuple[str, ...], markdown, plot) -> dict[str, Path]:
    """A study's study.json (everything), study.csv (the rows, ``columns``), study.md (``markdown(summary)``) and
    study.png (``plot(summary, path)``) in ``out``, each written whole."""
    paths = {ext: Path(out) / f"study.{ext}" for ext in ("json", "csv", "md", "png")}
    write_json_atomic(paths["json"], summary)
    with atomic_path(paths["csv"]) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(csv_row(r, columns) for r in summary["rows"])
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(markdown(summary))
    plot(summary, paths["png"])
    return paths
