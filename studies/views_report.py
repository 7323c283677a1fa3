"""The views study's summary (study.json), table (study.md, study.csv) and plot (study.png), from its runs, kdep
eval's results and per-image predictions, and the per-image cosines.

    from studies.views_report import summarise, write_views_tables
    summary = summarise(config, runs, inits, results, predictions, cosines, timing)
    write_views_tables(out, summary)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.evaluation.backbones import EvalError
from pipeline.evaluation.intervals import format_with_interval
from pipeline.manifest import config_to_dict
from studies.tables import METRICS, write_study_files
from studies.views_plot import plot_study
from studies.views_table import (
    BASE,
    INTERVALS_NOTE,
    TIMES,
    arm_row,
    cost_rows,
    paired_rows,
    verdict,
)

STUDY_FORMAT = "kdep-study-views/2"
DELTA_PARTS = ("", "_low", "_high", "_seed_sd", "_eval_se", "_delta", "_delta_low", "_delta_high",
               "_delta_seed_sd", "_delta_eval_se")  # fmt: skip
RATIO_PARTS = ("_ratio", "_ratio_low", "_ratio_high")
CSV_COLUMNS = ("arm", "k", "uses_per_view", "seeds", *(f"{m}{p}" for m in METRICS for p in DELTA_PARTS), *TIMES,
               *(f"{t}{p}" for t in TIMES for p in RATIO_PARTS))  # fmt: skip


def scored_runs(runs: list[dict], results: dict, cosines: dict) -> list[dict]:
    """Each run with its probe and k-NN top-1 (kdep eval) and its cosine's mean and sd over the held-out views."""
    scored = {row["name"]: row for row in results["backbones"]}
    return [{**r, "probe_top1": scored[r["name"]]["probe_top1"], "knn_top1": scored[r["name"]]["knn_top1"],
             **cosines["rows"][r["name"]]} for r in runs]  # fmt: skip


def per_image_values(runs: list[dict], predictions: dict, cosines: dict) -> dict[str, dict[str, np.ndarray]]:
    """{arm: {metric: (S, M)}}, row s = seed s: probe and k-NN correctness (0/1) per val image, the cosine per
    held-out view."""
    labels = predictions["labels"]
    out: dict[str, dict[str, list]] = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        values = out.setdefault(r["arm"], {m: [] for m in METRICS})
        for kind in ("probe", "knn"):
            values[f"{kind}_top1"].append((predictions[f"{r['name']}.{kind}"] == labels).astype(np.float64))
        values["agree_cosine"].append(cosines["per_image"][r["name"]])
    return {arm: {m: np.stack(v) for m, v in values.items()} for arm, values in out.items()}


def check_predictions(runs: list[dict], predictions: dict) -> None:
    """The per-image predictions reproduce kdep eval's top-1 (the paired differences are of the same numbers)."""
    for r in runs:
        for kind in ("probe", "knn"):
            top1 = float(np.mean(predictions[f"{r['name']}.{kind}"] == predictions["labels"]))
            if abs(top1 - r[f"{kind}_top1"]) > 1e-9:
                raise EvalError(f"eval/predictions.npz gives {r['name']} {kind} top-1 {top1}, results.json "
                                 f"{r[f'{kind}_top1']}: re-run the evaluation (delete OUT/eval)")  # fmt: skip


def summarise(config, runs: list[dict], inits: list[dict], results: dict, predictions: dict, cosines: dict,
              timing: dict) -> dict:  # fmt: skip
    """Every run, one row per arm (online first) with its paired difference to online and its cost ratio, the
    reference rows, the verdict and what it was measured on."""
    runs, inits = scored_runs(runs, results, cosines), scored_runs(inits, results, cosines)
    check_predictions(runs + inits, predictions)
    n_val, n_agree = results["data"]["val_samples"], cosines["images"]
    names = sorted(
        {r["arm"] for r in runs}, key=lambda a: (a != BASE, a != BASE and int(a[1:]))
    )  # online, k up
    rows = [arm_row(a, next(r["k"] for r in runs if r["arm"] == a), config.epochs,
                    [r for r in runs if r["arm"] == a], n_val, n_agree) for a in names]  # fmt: skip
    cached = [a for a in names if a != BASE]
    paired, costs = paired_rows(per_image_values(runs, predictions, cosines), cached), cost_rows(runs, cached)
    for row in rows:
        row.update(paired.get(row["arm"], {}))
        row.update(costs.get(row["arm"], {}))
    random_row = arm_row("random", None, config.epochs, inits, n_val, n_agree)
    teacher = next(b for b in results["backbones"] if b["name"] == "teacher")
    return {
        "format": STUDY_FORMAT, "question": "is a student distilled from k cached views as good as online KD?",
        "epochs": config.epochs, "views": config.views, "ks": sorted(config.ks), "seeds": config.seeds,
        "verdict": verdict(rows, random_row), "rows": rows,
        "references": {"random": random_row,
                       "teacher": {m: teacher[m] for m in ("probe_top1", "probe_top1_ci95", "knn_top1", "knn_top1_ci95")}},
        "data": {**results["data"], "agreement_images": n_agree, "agreement_views": cosines["views"],
                 "agreement_seed": cosines["seed"], "resolution": config.resolution},
        "intervals": {"note": INTERVALS_NOTE, "doc": "pipeline/evaluation/seed_intervals.py"},
        "runs": runs + inits, "seconds": round(timing["seconds"], 1), "timing": timing,
        "config": config_to_dict(config),
    }  # fmt: skip


def arm_label(row: dict) -> str:
    return "online KD (fresh views)" if row["arm"] == BASE else f"k = {row['k']} cached"


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _ratio(row: dict, key: str) -> str:
    ratio = row.get(f"{key}_ratio")
    if ratio is None:
        return "–"
    lo, hi = row[f"{key}_ratio_ci95"]
    return f"{ratio:.2f}x [{lo:.2f}, {hi:.2f}]"


def _points(row: dict, metric: str) -> str:
    """A difference in points (accuracies x 100) or in cosine units, with its interval."""
    scale, digits = (100.0, 1) if metric != "agree_cosine" else (1.0, 3)
    mean, (lo, hi) = row[f"{metric}_delta"] * scale, row[f"{metric}_delta_ci95"]
    return f"{mean:+.{digits}f} [{lo * scale:+.{digits}f}, {hi * scale:+.{digits}f}]"


def markdown_study(summary: dict) -> str:
    """The verdict, the table of arms (and the reference rows), the paired differences to online, a note."""
    v, d, e = summary["verdict"], summary["data"], summary["epochs"]
    lines = [f"# Cached views vs online KD ({summary['seeds']} seeds, {e} epochs, cache of {summary['views']} views)",
             ""]  # fmt: skip
    if v["valid"]:
        lines += [f"Valid: {v['rule']}.", ""]
    else:
        lines += ["**The study cannot answer**: not every distilled arm beats the random-init student "
                  f"({v['rule']}):", *(f"- {r}" for r in v["reasons"]), ""]  # fmt: skip
    head = ["arm", "uses per view", "seeds", *(f"{m} [95% CI]" for m in METRICS.values()), "s / epoch",
            "wall s", "CPU s"]  # fmt: skip
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in [*summary["rows"], summary["references"]["random"]]:
        label = arm_label(row) if row["arm"] != "random" else f"random-init student ({row['seeds']} inits)"
        uses = "–" if row["arm"] == "random" else f"{row['uses_per_view']:g}"
        cells = [format_with_interval(row[m], row[f"{m}_ci95"]) for m in METRICS]
        cells += [_seconds(row.get(t)) for t in TIMES]
        lines.append(f"| {label} | {uses} | {row['seeds']} | " + " | ".join(cells) + " |")
    t = summary["references"]["teacher"]
    cells = [format_with_interval(t[m], t[f"{m}_ci95"]) for m in ("probe_top1", "knn_top1")]
    lines += [f"| teacher (labelled, reference) | – | – | {cells[0]} | {cells[1]} | – | – | – | – |", ""]
    head = ["cached arm − online", "uses per view", "Δ probe (points)", "Δ k-NN (points)", "Δ cos",
            "online / cached, s per epoch", "online / cached, CPU s"]  # fmt: skip
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in summary["rows"]:
        if row["arm"] != BASE:
            cells = [_points(row, m) for m in METRICS] + [
                _ratio(row, "epoch_seconds"),
                _ratio(row, "cpu_seconds"),
            ]
            lines.append(f"| {arm_label(row)} | {row['uses_per_view']:g} | " + " | ".join(cells) + " |")
    load = summary["timing"]
    lines += ["", f"Probe and k-NN top-1 on {d['val_samples']} held-out images (centre views, {d['resolution']} px; "
              f"probe and k-NN train set: the {d['train_samples']} train images); cosine between the student's "
              f"pre-ReLU feature and the projected teacher target on fresh {d['agreement_views']} views of "
              f"{d['agreement_images']} held-out images (seed {d['agreement_seed']}). {INTERVALS_NOTE} Study: "
              f"{summary['seconds'] / 60:.1f} min wall, {load['cpu_seconds'] / 60:.1f} min CPU, load average "
              f"{load['load_average_start'][1]:.1f} (5 min) at the start and {load['load_average_end'][1]:.1f} at "
              "the end."]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_views_tables(out: Path, summary: dict) -> dict[str, Path]:
    """study.json, study.csv (one line per arm), study.md and study.png in ``out``."""
    return write_study_files(out, summary, CSV_COLUMNS, markdown_study, plot_study)
