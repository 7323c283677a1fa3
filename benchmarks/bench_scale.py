"""ImageNet-shaped simulation of the feature cache, without a teacher or images: `kdep bench --scale`.

    kdep bench --scale                                   # 10%-ImageNet shape: 128 shards x 1000 rows, K=10, D=2048
    python -m benchmarks.bench_scale --shards 8 --json out.json   # smaller, same figures

Writes synthetic float16 features straight through the store API (~5 GB at the default shape, in ``--dir``), then
measures what stage 3 and its neighbour batches read, on this machine's cores, one process at a time:

- ``read_ratio``: bytes read from the store files during one epoch's reads (``rchar`` of /proc/self/io, so page
  cache hits count too) divided by the bytes the epoch uses (one view's feature and view parameters per image);
- ``stream_rows_per_s``: (key, view, feature) rows per second of that epoch in one process (no image decoding);
- ``neighbour_batches_per_s``: batches of 16 anchors x 16 rows drawn at random across the cache, each read with
  the features of its rows, their keys/hashes/sizes and view parameters (what ``RandomAccessPairs`` reads);
- ``worker_peak_rss_mb``: peak RSS of the process that streamed the epoch (a stage-3 DataLoader worker's job);
- ``plan_seconds``: open a cache with full-ImageNet metadata (1282 shards x 1000 rows, done markers) and plan an
  epoch (shard order, this consumer's shards and their views).

Agreement checks (benchmarks/checks.py; a FAIL line, and exit status 1 after the JSON): the epoch streamed every
valid row once (``epoch_rows`` = the rows written), and the cache folder holds the files and folders its layout
implies (``store_inodes``, pipeline/cache/inodes.py). Neighbour anchors are drawn among the valid rows, as
``RandomAccessPairs`` draws them.

The script also runs against layout 1 (the code before the view-major layout: put that tree first on PYTHONPATH),
where an epoch reads each shard's whole block of K views; both results are in the README. Run that way it makes no
checks (the older tree has no benchmarks/checks.py) and says so.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from pipeline.cache import store as store_module
from pipeline.cache.store import CacheLayout, ShardBlock, create_store, open_store

NEW_LAYOUT = store_module.LAYOUT_VERSION != "kdep-cache/1"
from pipeline.data.params import N_PARAMS as P  # noqa: E402 - view parameter columns

TAP = "pre_relu"


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def build(path: Path, shards: int, rows: int, views: int, dim: int, seed: int = 0) -> float:
    """Write the synthetic cache; returns seconds."""
    layout = CacheLayout(
        [{"name": f"train-{i:06d}.tar", "samples": rows} for i in range(shards)], views, {TAP: dim}
    )
    create_store(path, layout, {"teacher": "synthetic", "views": {"center_first": False, "k": views}})
    store, rng, start = open_store(path, "r+"), np.random.default_rng(seed), time.perf_counter()
    for i in range(shards):
        block = ShardBlock(
            keys=[f"n{i:05d}_{j:06d}" for j in range(rows)],
            features={TAP: rng.standard_normal((rows, views, dim), dtype=np.float32).astype(np.float16)},
            params=rng.random((rows, views, P), dtype=np.float32),
            hw=np.full((rows, 2), 375, np.int32),
            hashes=rng.integers(0, 256, (rows, 16), dtype=np.uint8),
            valid=np.ones(rows, bool),
        )
        store.write_slot(i, block)
    return time.perf_counter() - start


def _view(seed: int, shard: int, epoch: int, views: int) -> int:
    if NEW_LAYOUT:
        from pipeline.student.pairs import scheduled_view

        return scheduled_view(seed, shard, epoch, 0, views)
    return -1  # layout 1: a view per image, chosen after the whole block is read


def _warm_up(store) -> None:
    """Imports and array metadata outside the measured window (their file reads would count as cache reads); both
    layouts import stage 3's stream module, as a DataLoader worker has (torch included, so peak RSS compares)."""
    import pipeline.student.pairs  # noqa: F401

    _view(0, 0, 0, store.layout.views)
    store.read_slot(0, taps=[], views=[0]) if NEW_LAYOUT else store.read_slot(0, taps=[])
    store.feature_array(TAP)[0, 0]


def epoch_pass(path: str, epoch: int, queue: mp.Queue) -> None:
    """One epoch's cache reads of every shard, in a fresh process: rows, bytes read, seconds, peak RSS."""
    store = open_store(path)
    lay, rng = store.layout, np.random.default_rng(epoch)
    _warm_up(store)
    n_rows, start, rchar = 0, time.perf_counter(), _rchar()
    checksum = 0.0
    for shard in rng.permutation(len(lay.shards)):
        view = _view(0, int(shard), epoch, lay.views)
        if NEW_LAYOUT:
            block = store.read_slot(int(shard), taps=[TAP], views=[view])
            rows = [
                (k, view, block.feature(TAP, i, view)) for i, k in enumerate(block.keys) if block.valid[i]
            ]
        else:
            block = store.read_slot(int(shard), taps=[TAP])
            chosen = rng.integers(0, lay.views, len(block.keys))
            feats = block.features[TAP]
            rows = [(k, int(v), feats[i, v]) for i, (k, v) in enumerate(zip(block.keys, chosen, strict=True))]
        checksum += float(rows[-1][2][0])
        n_rows += len(rows)
    seconds = time.perf_counter() - start
    read = _rchar() - rchar
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(
        {"rows": n_rows, "seconds": seconds, "bytes_read": read, "peak_rss_mb": rss, "checksum": checksum}
    )


def neighbour_pass(path: str, batches: int, queue: mp.Queue) -> None:
    """Random 256-row batches (16 anchors x 16) read as the neighbour loader reads them (no images): layout 2 reads
    the rows' features and keeps per-shard metadata and per-(shard, view) parameters in caches of 256 entries, as
    ``RandomAccessPairs`` did when layout 2 came (it now holds per-row arrays instead: benchmarks/bench_neighbours.py
    times both); layout 1 read whole shard blocks into a cache of 8."""
    store = open_store(path)
    lay, rng = store.layout, np.random.default_rng(1)
    _warm_up(store)
    rows_per_shard = min(s["samples"] for s in lay.shards)
    # anchors among the valid rows (never a slot's padding), as RandomAccessPairs draws them; global row g is row
    # g % R of shard g // R; layout 1 (no padding rows) draws from the first rows of every shard
    pool = np.flatnonzero(store.valid()) if NEW_LAYOUT else np.arange(len(lay.shards) * rows_per_shard)
    slot = lay.slot_rows if NEW_LAYOUT else rows_per_shard
    meta: OrderedDict = OrderedDict()
    params: OrderedDict = OrderedDict()
    start, rchar, total = time.perf_counter(), _rchar(), 0
    for _ in range(batches):
        by_shard: dict[int, list[int]] = {}
        for g in rng.choice(pool, 256, replace=False):
            shard, row = divmod(int(g), slot)
            by_shard.setdefault(shard, []).append(row)
        for shard, rows in by_shard.items():
            view = int(rng.integers(lay.views))
            if NEW_LAYOUT:
                block = _cached(meta, shard, lambda s=shard: store.read_slot(s, taps=[], views=[]), 256)
                _cached(params, (shard, view), lambda s=shard, v=view: store.read_view_params(s, v), 256)
                feats = store.read_rows(shard, rows, view, TAP)
            else:
                block = _cached(meta, shard, lambda s=shard: store.read_slot(s, taps=[TAP]), 8)
                feats = block.features[TAP][rows, view]
            assert block.keys[rows[0]] and len(feats) == len(rows)
            total += len(feats)
    seconds = time.perf_counter() - start
    queue.put({"batches": batches, "seconds": seconds, "bytes_read": _rchar() - rchar, "rows": total})


def _cached(cache: OrderedDict, key: object, load, capacity: int):
    if key not in cache:
        cache[key] = load()
        if len(cache) > capacity:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


def plan_pass(path: str, queue: mp.Queue) -> None:
    """Open a full-ImageNet-sized cache (metadata only) and plan epoch 0 for consumer 0 of 8 ranks x 8 workers."""
    from pipeline.student.pairs import consumer_plan, shard_order

    start = time.perf_counter()
    store = open_store(path)
    done = store.done()
    order = shard_order(0, 0, len(store.layout.shards))
    mine, _m, _g = consumer_plan(order, 0, 64)
    views = [_view(0, s, 0, store.layout.views) for s in mine]
    queue.put({"seconds": time.perf_counter() - start, "shards": len(store.layout.shards), "done": len(done),
               "planned": len(views)})  # fmt: skip


def build_metadata_only(path: Path, shards: int, rows: int, views: int, dim: int) -> None:
    """A cache with full-ImageNet metadata: arrays declared (nothing written) and every shard's done marker."""
    layout = CacheLayout(
        [{"name": f"train-{i:06d}.tar", "samples": rows} for i in range(shards)], views, {TAP: dim}
    )
    create_store(path, layout, {"teacher": "synthetic", "views": {"center_first": False, "k": views}})
    markers = path / "markers"
    markers.mkdir(exist_ok=True)
    for i in range(shards):
        (markers / f"{i:06d}.json").write_text(
            json.dumps({"shard": f"train-{i:06d}.tar", "samples": rows, "written": rows, "skipped": []})
        )


def _in_child(fn, *args) -> dict:
    ctx = mp.get_context("spawn")  # a fresh process: its own peak RSS, no inherited arrays
    queue = ctx.Queue()
    proc = ctx.Process(target=fn, args=(*args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def run_scale(shards: int = 128, rows: int = 1000, views: int = 10, dim: int = 2048, root: str = "",
              neighbour_batches: int = 4, keep: bool = False) -> dict:  # fmt: skip
    """Build, measure, clean up; returns the figures."""
    base = Path(tempfile.mkdtemp(prefix="kdep-scale-", dir=root or None))
    try:
        cache = base / "cache"
        write_s = build(cache, shards, rows, views, dim)
        disk, inodes = _usage(cache)
        epoch = _in_child(epoch_pass, str(cache), 3)
        used = epoch["rows"] * (dim * 2 + P * 4)  # one view's feature + view parameters per image
        nb = _in_child(neighbour_pass, str(cache), neighbour_batches)
        meta = base / "imagenet-meta"
        build_metadata_only(meta, 1282, 1000, views, dim)
        plan = _in_child(plan_pass, str(meta))
        figures = {
            "layout": store_module.LAYOUT_VERSION,
            "shape": {"shards": shards, "rows": rows, "views": views, "dim": dim, "dtype": "float16"},
            "store_gb_on_disk": disk / 1e9,
            "store_inodes": inodes,
            "epoch_rows": epoch["rows"],
            "write_seconds": write_s,
            "epoch_gb_read": epoch["bytes_read"] / 1e9,
            "epoch_gb_used": used / 1e9,
            "read_ratio": epoch["bytes_read"] / used,
            "stream_rows_per_s": epoch["rows"] / epoch["seconds"],
            "worker_peak_rss_mb": epoch["peak_rss_mb"],
            "neighbour_batches_per_s": nb["batches"] / nb["seconds"],
            "neighbour_mb_read_per_batch": nb["bytes_read"] / nb["batches"] / 1e6,
            "plan_seconds_1282_shards": plan["seconds"],
        }
        return {**figures, "checks": scale_checks(figures, shards, rows, views)}
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def _usage(cache: Path) -> tuple[int, int | None]:
    """Bytes of the cache's files and its entries, from one walk; an older tree (no tree_usage): bytes only."""
    try:
        from pipeline.files import tree_usage
    except ImportError:
        return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()), None
    usage = tree_usage(cache)
    return usage.bytes, usage.entries


def scale_checks(figures: dict, shards: int, rows: int, views: int) -> list[dict]:
    """Every valid row streamed once; the cache's entries = its layout's (none made against an older tree)."""
    try:
        from benchmarks.checks import check
        from pipeline.cache.inodes import cache_inodes
    except ImportError:
        print("bench_scale: an older tree (no benchmarks/checks.py): nothing checked", file=sys.stderr)
        return []
    expected = cache_inodes(shards, views, [TAP]).entries
    return [
        check(
            "epoch_rows", figures["epoch_rows"], shards * rows, "rows one epoch streamed = rows written", "=="
        ),
        check(
            "store_inodes",
            figures["store_inodes"],
            expected,
            "entries of the cache folder = its layout's",
            "==",
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=128)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--neighbour-batches", type=int, default=4)
    ap.add_argument(
        "--dir", default="", help="where the synthetic cache is written (default: the temp folder)"
    )
    ap.add_argument("--json", default="", help="also write the figures to this file")
    args = ap.parse_args()
    out = run_scale(args.shards, args.rows, args.views, args.dim, args.dir, args.neighbour_batches)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    failed = [c for c in out["checks"] if not c["passed"]]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
