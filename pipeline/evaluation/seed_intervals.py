"""95% intervals of a quality measured for several training seeds on one evaluation set (``kdep study views``).

S students of one recipe (S seeds) are scored on the same M evaluation images: accuracies a_1..a_S (each a
fraction of the M images) or mean cosines c_1..c_S (each a mean of M per-image values). The mean over seeds m
differs from the recipe's expected quality on the image distribution for two reasons, whose variances add:

- seed-to-seed variation: s^2 / S, with s^2 the sample variance of the S values (ddof = 1);
- the evaluation set is one draw of M images: e = p (1 - p) / M for an accuracy p = m (the binomial variance;
  the exact share, Var over images of each image's seed-averaged correctness / M, is never larger, so this is
  conservative), and e = sd^2 / M for a mean of per-image values whose standard deviation is sd (averaged over
  the seeds as a variance).

With V = s^2 / S + e, the interval is m +- t * sqrt(V), t the 97.5% quantile of Student's t with the
Welch-Satterthwaite degrees of freedom nu = (S - 1) V^2 / (s^2 / S)^2 (e counts as known exactly: infinite
degrees of freedom). nu is S - 1 when the seeds dominate (the plain t-interval over seeds) and grows to infinity
(the normal quantile) when the evaluation set does. With one seed there is no seed term: an accuracy gets the
Wilson interval of ``kdep eval`` (``pipeline/evaluation/intervals.py``) on round(a M) of M, a mean the normal
interval m +- z sd / sqrt(M). Accuracies are clipped to [0, 1], cosines to [-1, 1].

Two students evaluated on the same images share the evaluation-set error, so these intervals (each about one
row) overlapping does not mean two rows are equal; a difference between rows is sharper than the intervals show.

**Paired differences** (:func:`paired_difference`). Arms A and B trained with the same S seeds (seed s: the same
initialisation and data order in both) and scored on the same M images give per-image values x^A_si, x^B_si (0/1
correctness of an accuracy, or a per-image cosine). With D_si = x^A_si - x^B_si, the difference d = mean over s
and i of D_si (= the mean over seeds of the per-seed differences of the two rows' scores) gets d +- t sqrt(V),
V = s_d^2 / S + e_d, where

- s_d^2 is the sample variance over seeds of the per-seed differences D_s. = mean_i D_si;
- e_d = Var_i(D_.i) / M, the sample variance over images of the seed-averaged per-image differences
  D_.i = mean_s D_si, over M: the evaluation-set term, measured, not bounded (images both arms get right or both
  get wrong add nothing, so it is far below the binomial term of one row);
- t is Student's on nu = (S - 1) V^2 / (s_d^2 / S)^2 degrees of freedom, e_d counted as known (as above).

Why V: with the crossed model D_si = mu + a_s + b_i + c_si (seed effect a, image effect b, interaction c, of
variances sa^2, sb^2, sc^2), Var(d) = sa^2 / S + sb^2 / M + sc^2 / (S M), while E[s_d^2 / S] = sa^2 / S +
sc^2 / (S M) and E[e_d] = sb^2 / M + sc^2 / (S M): V counts the interaction term twice, so it is conservative by
sc^2 / (S M) and never smaller than either part alone. One seed: d +- z sqrt(e_d).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from pipeline.evaluation.intervals import LEVEL, Z95, wilson_interval

METHOD = (
    "mean over seeds +- t_nu sqrt(s^2/S + e), Welch-Satterthwaite nu; one seed: Wilson (accuracy) or normal"
)


@dataclass(frozen=True)
class SeedSummary:
    """One quality over S seeds: the mean, its 95% interval and the parts of its variance."""

    mean: float  # mean over seeds
    low: float  # 95% interval, lower end
    high: float  # 95% interval, upper end
    seeds: int  # S
    seed_sd: float  # sample standard deviation over seeds (0 for one seed)
    eval_se: float  # standard error from the evaluation set alone, sqrt(e)
    dof: float  # degrees of freedom of t (inf: the normal quantile)

    def interval(self) -> list[float]:
        """[low, high], JSON-ready."""
        return [self.low, self.high]


def welch_dof(seed_var_of_mean: float, eval_var: float, seeds: int) -> float:
    """nu = (S - 1) V^2 / (s^2 / S)^2 for V = s^2 / S + e; infinity when there is no seed variance."""
    if seed_var_of_mean <= 0.0:
        return math.inf
    total = seed_var_of_mean + eval_var
    return (seeds - 1) * total * total / (seed_var_of_mean * seed_var_of_mean)


def t_quantile(dof: float) -> float:
    """The 97.5% quantile of Student's t with ``dof`` degrees of freedom (the normal one for infinity)."""
    return Z95 if math.isinf(dof) else float(stats.t.ppf(0.5 + LEVEL / 2, dof))


def combined_summary(values: Sequence[float], eval_var: float, bounds: tuple[float, float]) -> SeedSummary:
    """Mean of ``values`` (S >= 2 seeds) +- t_nu sqrt(s^2 / S + eval_var), clipped to ``bounds``."""
    n = len(values)
    if n < 2:
        raise ValueError(f"combined_summary needs at least 2 seeds, got {n}")
    mean = sum(values) / n
    seed_var = sum((v - mean) ** 2 for v in values) / (n - 1)
    dof = welch_dof(seed_var / n, eval_var, n)
    half = t_quantile(dof) * math.sqrt(seed_var / n + eval_var)
    lo, hi = bounds
    return SeedSummary(mean, max(lo, mean - half), min(hi, mean + half), n, math.sqrt(seed_var),
                       math.sqrt(eval_var), dof)  # fmt: skip


def accuracy_over_seeds(accuracies: Sequence[float], total: int) -> SeedSummary:
    """Accuracies of S seeds, each on the same ``total`` images: one seed -> Wilson, more -> the combined interval."""
    if not accuracies or total < 1:
        raise ValueError(f"need at least one accuracy and total >= 1, got {len(accuracies)} and {total}")
    mean = sum(accuracies) / len(accuracies)
    eval_var = mean * (1.0 - mean) / total
    if len(accuracies) == 1:
        low, high = wilson_interval(round(mean * total), total)
        return SeedSummary(mean, low, high, 1, 0.0, math.sqrt(eval_var), math.inf)
    return combined_summary(accuracies, eval_var, (0.0, 1.0))


def mean_over_seeds(means: Sequence[float], sds: Sequence[float], total: int) -> SeedSummary:
    """Per-seed means of ``total`` per-image values (per-seed standard deviations ``sds``): one seed -> the normal
    interval, more -> the combined interval; clipped to [-1, 1] (cosines)."""
    if not means or len(means) != len(sds) or total < 1:
        raise ValueError(f"need matching means and sds and total >= 1, got {len(means)}, {len(sds)}, {total}")
    eval_var = sum(sd * sd for sd in sds) / len(sds) / total
    if len(means) == 1:
        half = Z95 * math.sqrt(eval_var)
        return SeedSummary(means[0], max(-1.0, means[0] - half), min(1.0, means[0] + half), 1, 0.0,
                           math.sqrt(eval_var), math.inf)  # fmt: skip
    return combined_summary(means, eval_var, (-1.0, 1.0))


def paired_difference(a: np.ndarray, b: np.ndarray, bounds: tuple[float, float]) -> SeedSummary:
    """Arm A minus arm B from their (S, M) per-image values (row s: seed s, the same M images in both): the mean
    difference +- t_nu sqrt(s_d^2 / S + e_d) (module docstring), clipped to ``bounds``; ``eval_se`` is sqrt(e_d)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] < 2:
        raise ValueError(
            f"paired_difference needs two (S, M >= 2) arrays of one shape, got {a.shape} and {b.shape}"
        )
    diff = a - b
    eval_var = float(diff.mean(0).var(ddof=1)) / diff.shape[1]
    per_seed = [float(v) for v in diff.mean(1)]
    if len(per_seed) == 1:
        half, mean = Z95 * math.sqrt(eval_var), per_seed[0]
        return SeedSummary(mean, max(bounds[0], mean - half), min(bounds[1], mean + half), 1, 0.0,
                           math.sqrt(eval_var), math.inf)  # fmt: skip
    return combined_summary(per_seed, eval_var, bounds)
