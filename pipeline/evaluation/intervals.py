"""95% confidence intervals of accuracies: the Wilson score interval of a binomial proportion.

An accuracy measured on n evaluation images is a proportion p = k / n of correct answers. The Wilson (1927)
interval at level 1 - alpha, with z the 1 - alpha/2 normal quantile (z = 1.959964 for 95%), is

    centre = (p + z^2 / (2n)) / (1 + z^2 / n)
    half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))

It stays inside [0, 1] and is not empty at p = 0 or 1, unlike the normal (Wald) interval p +- z sqrt(p(1-p)/n).
It measures the sampling error of the n evaluation images only (how the accuracy would move on another n images
from the same distribution), not the spread between training seeds or probe fits: two backbones evaluated on the
same images whose intervals overlap may still differ (a paired test is sharper), and one seed says nothing about
seed-to-seed variation.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
METHOD = "wilson"  # recorded next to the intervals in results.json
LEVEL = 0.95


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) Wilson score interval of ``correct`` successes in ``total`` trials, total >= 1."""
    if total < 1 or not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total and total >= 1, got correct={correct}, total={total}")
    p, z2 = correct / total, z * z
    denom = 1.0 + z2 / total
    centre = (p + z2 / (2 * total)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(accuracy: float | None, total: int) -> list[float] | None:
    """[low, high] of an accuracy measured as a fraction of ``total`` rows (None stays None); JSON-ready."""
    if accuracy is None:
        return None
    correct = round(accuracy * total)  # exact: the accuracy is correct / total
    return list(wilson_interval(correct, total))


def format_with_interval(accuracy: float | None, interval: list[float] | None) -> str:
    """``0.760 [0.696, 0.815]``; ``-`` for a missing accuracy."""
    if accuracy is None:
        return "-"
    if interval is None:
        return f"{accuracy:.3f}"
    return f"{accuracy:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"
