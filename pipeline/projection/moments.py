"""Streaming statistics of cached features: one read of each slot's selected views, memory O(D_t^2).

Rows used (RowSelection): the rows of done shards (those with a marker) whose ``valid`` flag is set (never padding,
never skipped samples), with all or some of the K views of each; optionally an exact, seeded fraction of those
*images* (cache rows, all chosen views of each), drawn with numpy.random.default_rng(seed) from the rows in cache
order, so the choice does not depend on shard sizes or chunking.

Each slot (one input shard's rows, read at the selected views only) holding selected rows is read once by one dask
task (``pipeline.projection.passes``), which keeps the selected rows, casts them to float64 in slices of SLICE_ROWS
and adds partial sums (count, column sums, X^T X, ids of rows holding NaN/Inf). Peak memory is, per thread, one
slot, one float64 slice and two D_t x D_t float64 matrices, whatever N is.
"""

from __future__ import annotations

import dask
import numpy as np

from pipeline.cache.store import FeatureStore, StoreError
from pipeline.projection.artefact import Projection
from pipeline.projection.fit import FeatureStats
from pipeline.projection.passes import RowSelection, chunk_pass

SLICE_ROWS = 4096  # rows cast to float64 at once (4096 x 2048 x 8 B = 64 MiB)
TARGET_SLICE_ROWS = (
    1024  # rows projected at once in the second pass: ~6 float64 temporaries of (rows, D) each
)
MAX_KEYS_SHOWN = 10  # keys named in a NaN/Inf error


class IncompleteCacheError(StoreError):
    """Not every shard of the cache is done (and --allow-partial was not given)."""


class EmptyCacheError(StoreError):
    """No done shard, or no valid row in the done shards."""


class NonFiniteError(StoreError):
    """Some cached rows hold NaN or Inf."""


def done_rows(store: FeatureStore, allow_partial: bool) -> tuple[np.ndarray, int]:
    """(S*R,) bool: valid rows of done shards; and the number of done shards. Refuses empty/incomplete caches."""
    done, total = store.done(), len(store.layout.shards)
    if not done:
        raise EmptyCacheError(
            f"{store.path} has no finished shard; run (or resume) `kdep cache-teacher` first"
        )
    if len(done) < total and not allow_partial:
        raise IncompleteCacheError(
            f"{store.path}: only {len(done)} of {total} shards are done; finish `kdep cache-teacher` "
            "or pass --allow-partial to fit on the done shards (recorded in the artefact)"
        )
    rows = np.zeros(store.layout.rows, bool)
    for index, marker in done.items():
        start = index * store.layout.slot_rows
        rows[start : start + marker["samples"]] = True
    rows &= store.valid()
    if not rows.any():
        raise EmptyCacheError(f"{store.path}: the {len(done)} done shards hold no valid row (all skipped)")
    return rows, len(done)


def subsample_rows(rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Keep round(fraction * images) of the selected rows (at least 1), seeded; fraction 1 keeps all."""
    if fraction >= 1.0:
        return rows
    index = np.flatnonzero(rows)
    keep = max(1, round(fraction * len(index)))
    out = np.zeros_like(rows)
    out[np.random.default_rng(seed).choice(index, size=keep, replace=False)] = True
    return out


def select_rows(
    store: FeatureStore, views: tuple[int, ...], fraction: float, seed: int, allow_partial: bool
) -> RowSelection:
    """The rows and views a fit reads (views () = all K)."""
    rows, n_done = done_rows(store, allow_partial)
    views = tuple(views) or tuple(range(store.layout.views))
    return RowSelection(subsample_rows(rows, fraction, seed), views, n_done, len(store.layout.shards))


def selected_rows(block: np.ndarray, local: np.ndarray, views: tuple[int, ...]) -> np.ndarray:
    """(len(local) * len(views), D) rows of a chunk (C, K, D): a view of ``block``, not a copy, when ``local`` is a
    run of adjacent rows and ``views`` are all its columns in order (every row of a shard but its padding, read at
    the selected views only: the usual case), else one copy."""
    if len(views) != block.shape[1] or list(views) != list(range(block.shape[1])):
        block = block[:, list(views)]
    if local.size and local[-1] - local[0] + 1 == local.size:  # sorted and unique, so a run
        return block[local[0] : local[-1] + 1].reshape(-1, block.shape[-1])
    return block[local].reshape(-1, block.shape[-1])


def chunk_moments(block: np.ndarray, local: np.ndarray, views: tuple[int, ...], first_row: int) -> dict:
    """Partial sums of one chunk (C, K, D) over its selected rows ``local`` and ``views``; NaN/Inf rows left out."""
    x = selected_rows(block, local, views)
    col_sum, gram, bad = np.zeros(x.shape[1]), np.zeros((x.shape[1],) * 2), []
    n = 0
    for start in range(0, len(x), SLICE_ROWS):
        part = x[start : start + SLICE_ROWS].astype(np.float64)
        finite = np.isfinite(part.sum(axis=1))  # NaN and Inf both make the row sum non-finite
        if not finite.all():
            bad.extend(first_row + local[(start + np.flatnonzero(~finite)) // len(views)])
            part = np.ascontiguousarray(part[finite])
        n += len(part)
        col_sum += part.sum(axis=0)
        gram += part.T @ part  # numpy uses syrk for a.T @ a
    return {"n": n, "sum": col_sum, "gram": gram, "bad": sorted(set(int(b) for b in bad))}


def chunk_target_moments(
    block: np.ndarray, local: np.ndarray, views: tuple[int, ...], first_row: int, projection: Projection
) -> dict:
    """Count, sum and sum of squares (float64) of the targets of one chunk's selected rows (first_row unused)."""
    x = selected_rows(block, local, views)
    total, squares = np.zeros(projection.dim_student), np.zeros(projection.dim_student)
    for start in range(0, len(x), TARGET_SLICE_ROWS):
        y = projection.targets_numpy(x[start : start + TARGET_SLICE_ROWS])
        total += y.sum(axis=0)
        squares += (y * y).sum(axis=0)
    return {"n": len(x), "sum": total, "sumsq": squares}


def accumulate_stats(
    store: FeatureStore,
    tap: str,
    selection: RowSelection,
    scheduler: str = "",
    quiet: bool = True,
    lanes: int = 0,
) -> FeatureStats:
    """One pass: N, column sums and X^T X (float64) of the selected rows x views; NaN/Inf rows are an error."""
    total = chunk_pass(store, tap, selection, chunk_moments, (), "kdep-stats", scheduler, quiet, lanes)
    if total["bad"]:
        raise_non_finite(store, tap, total["bad"])
    return FeatureStats(total["n"], total["sum"], total["gram"])


def target_moments(
    store: FeatureStore,
    tap: str,
    selection: RowSelection,
    projection: Projection,
    scheduler: str = "",
    quiet: bool = True,
    lanes: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Second pass: exact per-channel mean and std (population) of the targets over the same rows."""
    args = (
        dask.delayed(projection, name=f"kdep-projection-{id(projection)}"),
    )  # one graph key, shipped once
    total = chunk_pass(
        store, tap, selection, chunk_target_moments, args, "kdep-targets", scheduler, quiet, lanes
    )
    mean = total["sum"] / total["n"]
    return mean, np.sqrt(np.maximum(total["sumsq"] / total["n"] - mean**2, 0.0))


def raise_non_finite(store: FeatureStore, tap: str, rows: list[int]) -> None:
    """Name the keys of cache rows holding NaN/Inf and say what to do."""
    rows = sorted(rows)
    keys = store.keys_at(rows[:MAX_KEYS_SHOWN])
    shards = sorted({store.layout.shards[r // store.layout.slot_rows]["name"] for r in rows})
    more = f" and {len(rows) - len(keys)} more" if len(rows) > len(keys) else ""
    raise NonFiniteError(
        f"{store.path}: {len(rows)} rows of tap {tap!r} hold NaN/Inf: keys {', '.join(keys)}{more} "
        f"(shards {', '.join(shards[:MAX_KEYS_SHOWN])}); re-cache those shards (delete their markers and "
        "resume `kdep cache-teacher`) or check the teacher's precision"
    )
