"""What the studies' tables share: the three metrics, one row's summary over seeds, the reference rows, and
writing study.json / study.csv / study.md / study.png.

A run is one student: ``{"name", "seed", "probe_top1", "knn_top1", "agree_cosine", "agree_cosine_sd", ...}``
(accuracies on the same ``val_images`` images; the cosine's mean and standard deviation over ``agreement_images``
held-out views). A row holds, per metric, the mean over the row's seeds, its 95% interval
(``pipeline/evaluation/seed_intervals.py``), the seed standard deviation and the evaluation-set standard error.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

from pipeline.evaluation.intervals import format_with_interval
from pipeline.evaluation.seed_intervals import SeedSummary, accuracy_over_seeds, mean_over_seeds
from pipeline.files import atomic_path, write_json_atomic

METRICS = {"probe_top1": "probe top-1", "knn_top1": "k-NN top-1", "agree_cosine": "cos to target"}
PARTS = ("", "_low", "_high", "_seed_sd", "_eval_se", "_delta")  # CSV columns per metric (arm_table)
REFERENCE_LABELS = {"teacher": "teacher (labelled, reference)", "random": "random-init student (reference)"}


def summary_fields(metric: str, s: SeedSummary) -> dict:
    """``<metric>`` (mean), ``_ci95``, ``_seed_sd``, ``_eval_se`` and ``_dof`` (None: the normal quantile)."""
    return {metric: s.mean, f"{metric}_ci95": s.interval(), f"{metric}_seed_sd": s.seed_sd,
            f"{metric}_eval_se": s.eval_se, f"{metric}_dof": None if math.isinf(s.dof) else s.dof}  # fmt: skip


def summarise_runs(runs: list[dict], val_images: int, agreement_images: int) -> dict:
    """Per metric of :data:`METRICS`, over the runs (seeds) of one row: :func:`summary_fields`."""
    summaries = {
        "probe_top1": accuracy_over_seeds([r["probe_top1"] for r in runs], val_images),
        "knn_top1": accuracy_over_seeds([r["knn_top1"] for r in runs], val_images),
        "agree_cosine": mean_over_seeds(
            [r["agree_cosine"] for r in runs], [r["agree_cosine_sd"] for r in runs], agreement_images
        ),
    }
    row: dict = {}
    for metric, s in summaries.items():
        row.update(summary_fields(metric, s))
    return row


def csv_row(row: dict, columns: tuple[str, ...]) -> dict:
    """A row flattened for CSV (each ``<x>_ci95`` interval as ``<x>_low`` / ``<x>_high``)."""
    flat = dict(row)
    for key, value in row.items():
        if key.endswith("_ci95"):
            flat[f"{key[:-5]}_low"], flat[f"{key[:-5]}_high"] = value
    return {c: flat.get(c) for c in columns}


def reference_lines(summary: dict, blanks: int = 4) -> list[str]:
    """Markdown lines of the reference backbones (teacher, random init): probe and k-NN with intervals, then
    ``blanks`` empty cells."""
    lines = []
    for name, ref in summary["references"].items():
        cells = [format_with_interval(ref[m], ref[f"{m}_ci95"]) for m in ("probe_top1", "knn_top1")]
        lines.append(
            f"| {REFERENCE_LABELS.get(name, name)} | – | " + " | ".join(cells + ["–"] * blanks) + " |"
        )
    return lines


def write_study_files(
    out: Path,
    summary: dict,
    columns: tuple[str, ...],
    markdown: Callable[[dict], str],
    plot: Callable[[dict, Path], None],
) -> dict[str, Path]:
    """A study's study.json (everything), study.csv (``summary["rows"]``, ``columns``), study.md
    (``markdown(summary)``) and study.png (``plot(summary, path)``) in ``out``, each written whole."""
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
