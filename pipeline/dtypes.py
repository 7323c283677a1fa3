"""What a stored feature dtype can hold: the one range check before float32 features are cast for storage.

float16 turns values above 65504 into inf and flushes rows whose largest magnitude is below ~6e-5 to subnormals or
zeros (a random-init MobileNetV2's pooled features are ~4e-9: all zeros). Every writer of float16 features (the
teacher cache, evaluation's feature files) checks its rows here first, so nothing degraded is ever stored.
"""

from __future__ import annotations

import numpy as np

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: larger values become inf
FLOAT16_TINY = float(np.finfo(np.float16).tiny)  # 6.1e-05: float16's smallest normal value


def range_problem(feats: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
    """(rows,) bool of the rows of ``feats`` (rows, D) that ``dtype`` cannot hold, and what is wrong with the first:
    a value beyond its largest finite value (stored as inf), or a row whose largest magnitude is below its smallest
    normal value (stored as subnormals or zeros, relative error up to 1). Exact zeros and float32 are fine."""
    if np.dtype(dtype) != np.float16 or feats.size == 0:
        return np.zeros(len(feats), bool), ""
    peak = np.abs(feats).max(axis=1)
    over, tiny = peak > FLOAT16_MAX, (peak > 0) & (peak < FLOAT16_TINY)
    bad = over | tiny
    if not bad.any():
        return bad, ""
    i = int(np.flatnonzero(bad)[0])
    if over[i]:
        return bad, f"a value of {peak[i]:.4g} would be stored as inf (float16 holds at most {FLOAT16_MAX:g})"
    return bad, (f"its largest value {peak[i]:.3g} is below float16's normal range ({FLOAT16_TINY:.3g}) and "
                 "would be stored as (nearly) zeros")  # fmt: skip
