"""Streaming statistics of cached features with dask: one read of the store's own chunks, memory O(D_t^2).

Rows used (RowSelection): the rows of done shards (those with a marker) whose ``valid`` flag is set (never padding,
never skipped samples), with all or some of the K views of each; optionally an exact, seeded fraction of those
*images* (cache rows, all chosen views of each), drawn with numpy.random.default_rng(seed) from the rows in cache
order, so the choice does not depend on shard sizes or chunking.

Each store chunk is one dask task that reads exactly that chunk (rows [b*C, (b+1)*C): one read, never dask's
default blocks), keeps the selected rows, casts them to float64 in slices of SLICE_ROWS and adds partial sums
(count, column sums, X^T X, ids of rows holding NaN/Inf) to its lane's running total (see lane_graph); chunks
holding no selected row are never read. Peak memory is, per thread, one chunk, one float64 slice and two
D_t x D_t float64 matrices, whatever N is.
``scheduler=""`` runs on the local threaded scheduler with a tqdm bar over chunks; ``tcp://host:port`` runs on a
dask.distributed cluster (its workers must see the cache at the same path) with distributed's progress bar.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import dask
import numpy as np
import zarr
from dask.base import tokenize
from dask.callbacks import Callback
from dask.delayed import Delayed
from dask.system import CPU_COUNT
from tqdm import tqdm

from pipeline.cache.store import FeatureStore, StoreError
from pipeline.errors import KdepError
from pipeline.progress import progress_bar
from pipeline.projection.artefact import Projection
from pipeline.projection.fit import FeatureStats

SLICE_ROWS = 4096  # rows cast to float64 at once (4096 x 2048 x 8 B = 64 MiB)
FAN_IN = 8  # partials summed per reduction task
MAX_KEYS_SHOWN = 10  # keys named in a NaN/Inf error


class IncompleteCacheError(StoreError):
    """Not every shard of the cache is done (and --allow-partial was not given)."""


class EmptyCacheError(StoreError):
    """No done shard, or no valid row in the done shards."""


class NonFiniteError(StoreError):
    """Some cached rows hold NaN or Inf."""


class SchedulerError(KdepError):
    """The dask.distributed scheduler could not be reached."""


@dataclass(frozen=True)
class RowSelection:
    """Which cache rows (images) and views a fit reads."""

    rows: np.ndarray  # (S*R,) bool over cache rows
    views: tuple[int, ...]  # views used of every selected row
    shards_done: int  # done shards (the only ones read)
    shards_total: int  # shards in the cache

    @property
    def images(self) -> int:
        return int(self.rows.sum())

    @property
    def samples(self) -> int:
        return self.images * len(self.views)


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
    rows &= np.asarray(store.group["valid"][:], dtype=bool)
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


def chunk_moments(block: np.ndarray, local: np.ndarray, views: tuple[int, ...], first_row: int) -> dict:
    """Partial sums of one chunk (C, K, D) over its selected rows ``local`` and ``views``; NaN/Inf rows left out."""
    x = block[local][:, list(views)].reshape(-1, block.shape[-1])
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
    x = block[local][:, list(views)].reshape(-1, block.shape[-1])
    total, squares = np.zeros(projection.dim_student), np.zeros(projection.dim_student)
    for start in range(0, len(x), SLICE_ROWS):
        y = projection.targets_numpy(x[start : start + SLICE_ROWS])
        total += y.sum(axis=0)
        squares += (y * y).sum(axis=0)
    return {"n": len(x), "sum": total, "sumsq": squares}


def merge_partials(*parts: dict) -> dict:
    """Sum partial dicts key by key (lists are concatenated)."""
    out = dict(parts[0])
    for part in parts[1:]:
        for key, value in part.items():
            out[key] = out[key] + value
    return out


def tree_sum(items: list[Delayed]) -> Delayed:
    """One delayed sum of many delayed partials, FAN_IN at a time."""
    while len(items) > 1:
        token = tokenize(*items)
        merge = dask.delayed(merge_partials, pure=True)
        items = [
            merge(*items[i : i + FAN_IN], dask_key_name=f"kdep-merge-{i}-{token}")
            for i in range(0, len(items), FAN_IN)
        ]
    return items[0]


def read_chunk(path: str, tap: str, index: int, rows: int) -> np.ndarray:
    """Store chunk ``index`` of ``features/<tap>`` (rows [index*C, (index+1)*C)): one read of one whole chunk."""
    array = zarr.open_array(f"{path}/features/{tap}", mode="r")  # mode "r": never creates
    return array[index * rows : (index + 1) * rows]


def add_chunk(total: dict | None, fn: Callable, source: tuple, *args: object) -> dict:
    """One fold step of a lane: ``total`` plus ``fn(read_chunk(*source), *args)``'s partial sums."""
    part = fn(read_chunk(*source), *args)
    return part if total is None else merge_partials(total, part)


def lane_graph(
    store: FeatureStore, tap: str, selection: RowSelection, fn: Callable, args: tuple, name: str, lanes: int
) -> tuple[Delayed, int]:
    """The delayed total of ``fn(chunk, local_rows, views, first_row, *args)`` over the chunks holding selected
    rows, and the number of those chunks.

    Chunks are dealt round-robin to ``lanes`` chains; each step of a chain reads its chunk and adds its partial
    sums to the chain's running total, so at most ``lanes`` totals and chunks are in memory whatever N is. (A tree
    over per-chunk partials keeps O(log N) partials alive, and separate ``da.from_zarr`` getter tasks are read
    ahead of their consumers: 67 chunks held at 320 chunks, measured.) The lane totals are summed at the end.
    """
    array = store.feature_array(tap)
    c, path = array.chunks[0], str(store.path)
    token = tokenize(path, tap, c, selection.rows, selection.views, fn.__name__, *args)
    totals: list = [None] * lanes
    count = 0
    for b in range(array.shape[0] // c):
        local = np.flatnonzero(selection.rows[b * c : (b + 1) * c])
        if local.size:
            step = dask.delayed(add_chunk, pure=True)
            lane, source = count % lanes, (path, tap, b, c)
            totals[lane] = step(
                totals[lane],
                fn,
                source,
                local,
                selection.views,
                b * c,
                *args,
                dask_key_name=f"{name}-{b}-{token}",
            )
            count += 1
    return tree_sum([t for t in totals if t is not None]), count


class _ChunkProgress(Callback):
    """tqdm bar (rate, ETA) over finished chunk tasks of the local scheduler."""

    def __init__(self, bar: tqdm, prefix: str) -> None:
        super().__init__()
        self.bar, self.prefix = bar, prefix

    def _posttask(self, key: object, result: object, dsk: dict, state: dict, worker_id: object) -> None:
        name = key[0] if isinstance(key, tuple) else key
        if str(name).startswith(self.prefix):
            self.bar.update(1)


def chunk_pass(
    store: FeatureStore,
    tap: str,
    selection: RowSelection,
    fn: Callable,
    args: tuple,
    name: str,
    scheduler: str = "",
    quiet: bool = True,
) -> dict:
    """Sum ``fn``'s partials over the selected chunks, on local threads or on the cluster at ``scheduler``."""
    if scheduler:
        return _pass_distributed(store, tap, selection, fn, args, name, scheduler, quiet)
    lanes = dask.config.get("num_workers", None) or CPU_COUNT  # one lane per thread
    total, n_chunks = lane_graph(store, tap, selection, fn, args, name, lanes)
    with (
        progress_bar(total=n_chunks, unit="chunk", desc=name, disable=quiet) as bar,
        _ChunkProgress(bar, name),
    ):
        return dask.compute(total, scheduler="threads")[0]


def _pass_distributed(
    store: FeatureStore,
    tap: str,
    selection: RowSelection,
    fn: Callable,
    args: tuple,
    name: str,
    address: str,
    quiet: bool,
) -> dict:
    from distributed import Client, progress

    try:
        client = Client(address, timeout="20s", set_as_default=False)
    except (OSError, TimeoutError) as err:
        raise SchedulerError(
            f"cannot reach the dask scheduler at {address} ({err}); start it (`dask scheduler`) "
            "or leave --scheduler out to run locally"
        ) from None
    with client, client.as_current():  # progress() looks for the current client
        lanes = max(1, sum(client.nthreads().values()))  # one lane per worker thread
        total, _ = lane_graph(store, tap, selection, fn, args, name, lanes)
        future = client.compute(total)
        if not quiet:
            progress(future)
        return future.result()


def accumulate_stats(
    store: FeatureStore, tap: str, selection: RowSelection, scheduler: str = "", quiet: bool = True
) -> FeatureStats:
    """One pass: N, column sums and X^T X (float64) of the selected rows x views; NaN/Inf rows are an error."""
    total = chunk_pass(store, tap, selection, chunk_moments, (), "kdep-stats", scheduler, quiet)
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
) -> tuple[np.ndarray, np.ndarray]:
    """Second pass: exact per-channel mean and std (population) of the targets over the same rows."""
    args = (
        dask.delayed(projection, name=f"kdep-projection-{id(projection)}"),
    )  # one graph key, shipped once
    total = chunk_pass(store, tap, selection, chunk_target_moments, args, "kdep-targets", scheduler, quiet)
    mean = total["sum"] / total["n"]
    return mean, np.sqrt(np.maximum(total["sumsq"] / total["n"] - mean**2, 0.0))


def raise_non_finite(store: FeatureStore, tap: str, rows: list[int]) -> None:
    """Name the keys of cache rows holding NaN/Inf and say what to do."""
    rows = sorted(rows)
    keys = [str(k) for k in store.group["keys"].get_orthogonal_selection(np.array(rows[:MAX_KEYS_SHOWN]))]
    shards = sorted({store.layout.shards[r // store.layout.slot_rows]["name"] for r in rows})
    more = f" and {len(rows) - len(keys)} more" if len(rows) > len(keys) else ""
    raise NonFiniteError(
        f"{store.path}: {len(rows)} rows of tap {tap!r} hold NaN/Inf: keys {', '.join(keys)}{more} "
        f"(shards {', '.join(shards[:MAX_KEYS_SHOWN])}); re-cache those shards (delete their markers and "
        "resume `kdep cache-teacher`) or check the teacher's precision"
    )
