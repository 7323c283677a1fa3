"""The views study's numbers (``kdep study views``): per-run scores and per-image values -> one row per arm, the
paired difference of every cached arm to online KD, the cost ratio, and whether the study can answer at all.

    from studies.views_table import arm_row, paired_rows, verdict
    row = arm_row("k8", 8, epochs=48, runs=runs_of_k8, val_images=4000, agreement_images=2000)

Arms: ``online`` (a fresh view of every image every epoch, fed to the live teacher: the reference) and ``k<k>``
(the first k views of one cached pool, each used epochs / k times). A run is one student (``studies/tables.py``)
with its timing: ``epoch_seconds`` (mean seconds per epoch of the training loop, metrics.jsonl), ``wall_seconds``
and ``cpu_seconds`` (the whole train-student call, measured by the study; CPU of the process and its loader
workers). Per-image values are (S, M) arrays, row s = seed s: 0/1 correctness of probe and k-NN on the M val
images, the cosine to the target on the held-out views.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.evaluation.seed_intervals import paired_difference, t_quantile
from studies.tables import METRICS, summarise_runs, summary_fields

BASE = "online"  # the arm every cached arm is compared with
DIFF_BOUNDS = {"probe_top1": (-1.0, 1.0), "knn_top1": (-1.0, 1.0), "agree_cosine": (-2.0, 2.0)}
TIMES = ("epoch_seconds", "wall_seconds", "cpu_seconds")
VALIDITY_METRICS = (
    "probe_top1",
    "knn_top1",
)  # every distilled arm must beat the random-init student on these
INTERVALS_NOTE = (
    "95% intervals. Rows: mean over seeds +- t sqrt(s^2/S + e), e the binomial (accuracies) or per-image (cosine) "
    "evaluation-set variance, Welch-Satterthwaite degrees of freedom. Differences to online: paired by seed (the "
    "same initialisation and data order), mean +- t sqrt(s_d^2/S + Var_i(D_i)/M), s_d^2 the variance over seeds of "
    "the per-seed differences, D_i the seed-averaged difference on image i of M (pipeline/evaluation/"
    "seed_intervals.py). Cost: geometric mean over seeds of online time / this arm's time, t over the log ratios."
)


def uses_per_view(k: int | None, epochs: int) -> float:
    """How many times a student trains on each stored view: epochs / k (online: every view once)."""
    return 1.0 if k is None else epochs / k


def arm_row(
    arm: str, k: int | None, epochs: int, runs: list[dict], val_images: int, agreement_images: int
) -> dict:
    """One arm over its seeds: every metric's mean and 95% interval (``studies.tables.summarise_runs``), uses
    per view, and the mean of each time (None when a run has no record of it)."""
    row = {"arm": arm, "k": k, "uses_per_view": uses_per_view(k, epochs), "seeds": len(runs)}
    row.update(summarise_runs(runs, val_images, agreement_images))
    for key in TIMES:
        values = [r.get(key) for r in runs]
        row[key] = None if None in values or not values else float(np.mean(values))
    return row


def paired_rows(per_image: dict[str, dict[str, np.ndarray]], cached: list[str]) -> dict[str, dict]:
    """Each cached arm minus ``online`` per metric (``pipeline.evaluation.seed_intervals.paired_difference``):
    {arm: {"<metric>_delta", "_delta_ci95", "_delta_seed_sd", "_delta_eval_se", "_delta_dof"}}.
    ``per_image[arm][metric]``: (S, M), the same seeds in the same row order for every arm."""
    out = {}
    for arm in cached:
        fields: dict = {}
        for metric in METRICS:
            s = paired_difference(per_image[arm][metric], per_image[BASE][metric], DIFF_BOUNDS[metric])
            fields.update(summary_fields(f"{metric}_delta", s))
        out[arm] = fields
    return out


def cost_ratio(base: list[float | None], arm: list[float | None]) -> dict | None:
    """Per seed, base time / arm time (same seed, same run of the study): the geometric mean and its 95%
    interval, t over the seeds' log ratios (S - 1 degrees of freedom; one seed: no interval). None when a time
    is missing."""
    if None in base or None in arm or not base:
        return None
    logs = np.log(np.asarray(base, np.float64) / np.asarray(arm, np.float64))
    mean = float(logs.mean())
    if len(logs) < 2:
        return {"ratio": math.exp(mean), "ratio_ci95": [math.exp(mean), math.exp(mean)], "seeds": 1}
    half = t_quantile(len(logs) - 1) * float(logs.std(ddof=1)) / math.sqrt(len(logs))
    return {"ratio": math.exp(mean), "ratio_ci95": [math.exp(mean - half), math.exp(mean + half)],
            "seeds": len(logs)}  # fmt: skip


def cost_rows(runs: list[dict], cached: list[str]) -> dict[str, dict]:
    """{arm: {"<time>_ratio": online / this arm, per seed, as :func:`cost_ratio`}} for every time of TIMES."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs if r["arm"] == BASE})
    out = {}
    for arm in cached:
        fields = {}
        for key in TIMES:
            ratio = cost_ratio(
                [by[(BASE, s)].get(key) for s in seeds], [by[(arm, s)].get(key) for s in seeds]
            )
            fields[f"{key}_ratio"] = None if ratio is None else ratio["ratio"]
            fields[f"{key}_ratio_ci95"] = None if ratio is None else ratio["ratio_ci95"]
        out[arm] = fields
    return out


def verdict(rows: list[dict], random_row: dict) -> dict:
    """Can the study answer? Only when every distilled arm's 95% interval lies wholly above the random-init
    student's on probe and k-NN: a student that has not learned more than its own initialisation says nothing
    about how many views distillation needs. {"valid": bool, "reasons": [one line per failure]}."""
    reasons = []
    for row in rows:
        for metric in VALIDITY_METRICS:
            low, high = row[f"{metric}_ci95"], random_row[f"{metric}_ci95"]
            if low[0] <= high[1]:
                reasons.append(
                    f"{row['arm']} does not beat the random-init student on {METRICS[metric]}: "
                    f"{row[metric]:.3f} [{low[0]:.3f}, {low[1]:.3f}] vs {random_row[metric]:.3f} "
                    f"[{high[0]:.3f}, {high[1]:.3f}] (the intervals overlap)"
                )
    return {"valid": not reasons, "reasons": reasons, "rule": "every distilled arm's 95% interval lies above "
            "the random-init student's on probe and k-NN top-1"}  # fmt: skip


def equivalence_margin(delta_ci95: list[float]) -> float:
    """The largest |difference| the interval allows: the arm is within this of online KD (at 95%)."""
    return max(abs(delta_ci95[0]), abs(delta_ci95[1]))
