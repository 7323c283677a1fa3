"""One dask pass over a feature cache's chunks, on local threads or a dask.distributed cluster, with progress.

Chunks holding selected rows are dealt round-robin to ``lanes`` chains (``lane_graph``); each step reads its whole
store chunk once (never dask's default blocks) and folds ``fn``'s partial sums into the chain's total, and the lane
totals are summed ``FAN_IN`` at a time. ``scheduler=""`` runs on the local threaded scheduler; ``tcp://host:port`` on
a dask.distributed cluster whose workers see the cache at the same path. Progress counts finished chunks: a bar on
a terminal, lines in a log (``pipeline.progress``; on a cluster, read from the scheduler's task stream).
"""

from __future__ import annotations

import time
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

from pipeline.cache.store import FeatureStore
from pipeline.errors import KdepError
from pipeline.progress import LineBar, on_terminal, progress_bar

FAN_IN = 8  # partials summed per reduction task


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


class SchedulerError(KdepError):
    """The dask.distributed scheduler could not be reached."""


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


def read_chunk(path: str, tap: str, index: int, rows: int, views: tuple[int, ...]) -> np.ndarray:
    """Slot ``index`` of ``features/<tap>`` (rows [index*R, (index+1)*R)) at ``views`` only, (R, len(views), D): one
    whole read of each of those views' Zarr shard files (the store is view-major), each copied into one buffer.

    View by view, because zarr's multi-view reads hold far more than their result: for one 1024 x 10 x 2048
    float16 slot (40 MiB) a whole-slot read peaked at 130 MiB and an orthogonal selection of all 10 views at
    1.4 GiB (tracemalloc, zarr 3.1); reading view by view into the result peaked at 53 MiB, in half the time.
    """
    array = zarr.open_array(f"{path}/features/{tap}", mode="r")  # mode "r": never creates
    block = slice(index * rows, (index + 1) * rows)
    out = np.empty((rows, len(views), array.shape[-1]), array.dtype)
    for column, view in enumerate(views):
        out[:, column] = array[block, view]
    return out


def add_chunk(total: dict | None, fn: Callable, source: tuple, *args: object) -> dict:
    """One fold step of a lane: ``total`` plus ``fn(read_chunk(*source), *args)``'s partial sums."""
    part = fn(read_chunk(*source), *args)
    return part if total is None else merge_partials(total, part)


def lane_graph(
    store: FeatureStore, tap: str, selection: RowSelection, fn: Callable, args: tuple, name: str, lanes: int
) -> tuple[Delayed, int]:
    """The delayed total of ``fn(chunk, local_rows, columns, first_row, *args)`` over the slots holding selected
    rows, and the number of those slots (each read at the selected views only, so ``columns`` is
    ``0..len(views)-1``).

    Chunks are dealt round-robin to ``lanes`` chains; each step of a chain reads its chunk and adds its partial
    sums to the chain's running total, so at most ``lanes`` totals and chunks are in memory whatever N is. (A tree
    over per-chunk partials keeps O(log N) partials alive, and separate ``da.from_zarr`` getter tasks are read
    ahead of their consumers: 67 chunks held at 320 chunks, measured.) The lane totals are summed at the end.
    """
    array = store.feature_array(tap)
    c, path = store.layout.slot_rows, str(store.zarr_path)
    columns = tuple(range(len(selection.views)))
    token = tokenize(path, tap, c, selection.rows, selection.views, fn.__name__, *args)
    totals: list = [None] * lanes
    count = 0
    for b in range(array.shape[0] // c):
        local = np.flatnonzero(selection.rows[b * c : (b + 1) * c])
        if local.size:
            step = dask.delayed(add_chunk, pure=True)
            lane, source = count % lanes, (path, tap, b, c, selection.views)
            totals[lane] = step(
                totals[lane],
                fn,
                source,
                local,
                columns,
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
    lanes: int = 0,
) -> dict:
    """Sum ``fn``'s partials over the selected chunks, on ``lanes`` local threads (0: dask's default thread count)
    or on the cluster at ``scheduler`` (``lanes`` 0: one per worker thread; else at most ``lanes``)."""
    if scheduler:
        return _pass_distributed(store, tap, selection, fn, args, name, scheduler, quiet, lanes)
    lanes = lanes or dask.config.get("num_workers", None) or CPU_COUNT  # one lane per thread
    total, n_chunks = lane_graph(store, tap, selection, fn, args, name, lanes)
    with (
        progress_bar(total=n_chunks, unit="chunk", desc=name, disable=quiet) as bar,
        _ChunkProgress(bar, name),
    ):
        return dask.compute(total, scheduler="threads", num_workers=lanes)[0]


def _pass_distributed(
    store: FeatureStore,
    tap: str,
    selection: RowSelection,
    fn: Callable,
    args: tuple,
    name: str,
    address: str,
    quiet: bool,
    lanes: int,
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
        threads = max(1, sum(client.nthreads().values()))  # one lane per worker thread
        lanes = min(lanes, threads) if lanes else threads
        total, n_chunks = lane_graph(store, tap, selection, fn, args, name, lanes)
        future = client.compute(total)
        if not quiet and on_terminal():
            progress(future)
        elif not quiet:
            _log_progress(client, future, name, n_chunks)
        return future.result()


def _log_progress(client: object, future: object, name: str, chunks: int) -> None:
    """Lines for a log while ``future`` runs on the cluster: chunk tasks named ``name-*`` that finished, read
    from the scheduler's task stream (distributed's own bar writes carriage-return frames)."""
    from distributed import wait

    seen: set[str] = set()
    with LineBar(total=chunks, unit="chunk", desc=name) as bar:
        since = time.time()
        while True:
            finished = future.done()  # read before the poll, so the last poll sees every chunk task
            records = client.get_task_stream(start=since - 60)  # a margin for clock skew; keys de-duplicate
            since = time.time()
            new = {str(r["key"]) for r in records if str(r["key"]).startswith(name)} - seen
            seen |= new
            bar.update(len(new))
            if finished:
                return
            try:
                wait(future, timeout=bar.mininterval)
            except TimeoutError:
                pass
