"""CoSS neighbour batches at scale, the code before this module's rewrite against the code now, side by side.

    python -m benchmarks.bench_neighbours --quick --json OUT.json   # ~10 min on 2 busy cores: mining at 5k, 20k
    python -m benchmarks.bench_neighbours --json OUT.json           # mining at 20k, 80k (~1.5 h on one core)

Each figure is measured in a fresh process (its own peak RSS), on one thread (``torch.set_num_threads(1)``):

- ``mining``: the neighbour table (pool 31) of N synthetic clustered float16 features (D = 2048) on this machine's
  CPU: the old mining (every rank's float32 copy of all N features, N x chunk float32 similarities, torch.topk) and
  the new (:func:`pipeline.student.neighbours.mine_neighbours`: float32 tiles on the CPU, float64 re-scoring of the
  candidates) at each N. Seconds, peak RSS above the float16 features, and how many rows' lists differ (and by how
  much their float64 scores differ there: float32 rounding).
- ``sampler``: one epoch's batches at N = 1.28M (pool 31, 16 anchors x (1 + 15)), rank 0 of 8: the old sampler
  (every rank draws all N groups in a Python loop) and the new one (this rank's groups only, numpy). Seconds and
  peak RSS above the (N, 31) table.
- ``access``: what a neighbour batch reads from the cache (256 rows drawn uniformly over the cache: features of the
  epoch's view, keys, hashes, sizes, view parameters; no images) at 128 and 1282 shards of 1000 rows (K = 1 view,
  D = 2048, synthetic): the old reader (per-shard metadata and per-(shard, view) parameters in 256-entry LRU caches,
  one feature read per touched shard) and the new one (:class:`~pipeline.student.neighbour_pairs.
  RandomAccessPairs`: metadata for all rows loaded once, parameters once per shard and epoch, one feature read per
  view). Seconds per batch after warm-up (the steady state: the old reader's LRUs warm, the new reader's view
  parameters of the epoch all loaded, which a real epoch does on first touch of each shard, timed apart), the new
  reader's one-time metadata load and its memory. 1282 shards of 1000 rows is ImageNet-1k's size, so those
  figures are ImageNet-1k's (``--quick``: D = 256, fewer batches).
- ``imagenet_1k``: the figures at N = 1,281,167: mining memory per rank (old: rank 0's measured peak per row times
  N, every other rank's float32 copy of all N features; new: the rank's float16 share, the measured blocks, the
  table and its all-gather), one-core CPU mining time scaled by N^2 from the largest measured N (a GPU mines in float16 tiles instead: not
  measured here), the sampler and access figures as measured.
- ``checks`` (benchmarks/checks.py: a FAIL line, and exit status 1 after the JSON): where the old and new tables
  differ, the candidates' exact cosines tie within float32 rounding; the samplers make as many batches.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queue_module
import resource
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from benchmarks.checks import check, exit_status

POOL, ANCHORS, PER_ANCHOR = 31, 16, 15
DIM = 2048
IMAGENET_1K = 1_281_167  # train images
OLD_CHUNK = 2048  # the old mining's query rows per similarity chunk


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def clustered_features(n: int, d: int = DIM, seed: int = 0) -> np.ndarray:
    """(n, d) float16: rows around n / 50 random centres (clusters of ~50, like images of one class)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 50), d), dtype=np.float32)
    out = np.empty((n, d), np.float16)
    for a in range(0, n, 8192):
        b = min(n, a + 8192)
        noise = rng.standard_normal((b - a, d), dtype=np.float32)
        out[a:b] = centres[rng.integers(0, len(centres), b - a)] + 0.6 * noise
    return out


def old_mining(features16, pool: int, chunk: int = 2048):
    """The mining before the rewrite: float32 copy of all rows, chunk x N float32 similarities, torch.topk."""
    import torch

    features = features16.astype(np.float32)  # what centre_view_rows returned on every rank
    x = torch.nn.functional.normalize(torch.from_numpy(features), dim=1)
    out = torch.empty((len(x), pool), dtype=torch.int64)
    for start in range(0, len(x), chunk):
        sims = x[start : start + chunk] @ x.T
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + start] = -float("inf")
        out[start : start + chunk] = sims.topk(pool, dim=1).indices
    return out.numpy()


def mining_pass(n: int, which: str, out: str, queue: mp.Queue) -> None:
    import torch

    torch.set_num_threads(1)
    from pipeline.student.neighbours import mine_neighbours

    feats = clustered_features(n)
    base, start = _rss_mb(), time.perf_counter()
    stats: dict = {}
    table = old_mining(feats, POOL) if which == "old" else mine_neighbours(feats, POOL, stats=stats)
    seconds = time.perf_counter() - start
    np.save(out, table)
    queue.put({"seconds": seconds, "peak_mb_above_features": _peak_mb() - base, "features_mb": feats.nbytes / 2**20,
               **stats})  # fmt: skip


def compare_tables(n: int, old: np.ndarray, new: np.ndarray) -> dict:
    """Rows whose lists differ (in order or content), rows whose sets differ, and the largest float64 cosine gap
    between two rows that the tables list at the same place (float32 rounding is ~1e-7)."""
    differ = np.flatnonzero((old != new).any(axis=1))
    sets = sum(set(old[i].tolist()) != set(new[i].tolist()) for i in differ)
    gap = 0.0
    if len(differ):
        feats = clustered_features(n).astype(np.float64)
        unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        for i in differ:
            gap = max(gap, float(np.abs(unit[old[i]] @ unit[i] - unit[new[i]] @ unit[i]).max()))
    return {
        "rows_differing": int(len(differ)),
        "sets_differing": int(sets),
        "max_cosine_gap_where_differing": gap,
    }


def bench_mining(sizes: list[int], tmp: Path) -> list[dict]:
    out = []
    for n in sizes:
        row: dict = {"rows": n, "dim": DIM, "pool": POOL}
        for which in ("old", "new"):
            row[which] = _in_child(mining_pass, n, which, str(tmp / f"{which}-{n}.npy"))
            print(f"mining N={n} {which}: {row[which]}", flush=True)
        row["agreement"] = compare_tables(n, np.load(tmp / f"old-{n}.npy"), np.load(tmp / f"new-{n}.npy"))
        out.append(row)
    return out


def old_sampler_epoch(nb: np.ndarray, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """The sampler before the rewrite (every rank draws all N groups, one Python call per anchor)."""
    from pipeline.student.pairs import _stable_int

    rng = np.random.default_rng(_stable_int(seed, "anchors", epoch))
    order = rng.permutation(nb.shape[0])
    groups = [[int(a), *(int(v) for v in rng.choice(nb[a], PER_ANCHOR, replace=False))] for a in order]
    usable = len(groups) // (ANCHORS * world) * ANCHORS * world
    return [sum(groups[i : i + ANCHORS], []) for i in range(0, usable, ANCHORS)][rank::world]


def sampler_pass(n: int, which: str, queue: mp.Queue) -> None:
    from pipeline.student.neighbours import NeighbourBatchSampler

    nb = np.random.default_rng(0).integers(0, n, (n, POOL), dtype=np.int32)
    base, start = _rss_mb(), time.perf_counter()
    if which == "old":
        batches = len(old_sampler_epoch(nb, 0, 1, 0, 8))
    else:
        sampler = NeighbourBatchSampler(nb, ANCHORS, PER_ANCHOR, seed=0, rank=0, world=8)
        sampler.set_epoch(1)
        batches = sum(1 for _ in sampler)  # the DataLoader takes each batch as a list
    seconds = time.perf_counter() - start
    queue.put({"seconds": seconds, "batches": batches, "peak_mb_above_table": _peak_mb() - base})


def bench_sampler(n: int) -> dict:
    row: dict = {"rows": n, "rank": 0, "world": 8, "anchors": ANCHORS, "per_anchor": PER_ANCHOR, "pool": POOL}
    for which in ("old", "new"):
        row[which] = _in_child(sampler_pass, n, which)
        print(f"sampler N={n} {which}: {row[which]}", flush=True)
    return row


class OldRowReader:
    """The cache side of RandomAccessPairs before the rewrite: per-shard metadata and per-(shard, view) parameters in
    LRU caches of 256 entries, one ``read_rows`` per touched shard."""

    def __init__(self, store, capacity: int = 256) -> None:
        self.store, self.capacity = store, capacity
        self.meta: OrderedDict = OrderedDict()
        self.params: OrderedDict = OrderedDict()

    def _cached(self, cache: OrderedDict, key, load):
        if key not in cache:
            cache[key] = load()
            if len(cache) > self.capacity:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return cache[key]

    def batch(self, rows: np.ndarray, view_of) -> int:
        r, by_shard = self.store.layout.slot_rows, {}
        for g in rows.tolist():
            by_shard.setdefault(g // r, []).append(g % r)
        checks = 0
        for shard, local in sorted(by_shard.items()):
            view = view_of(shard)
            feats = self.store.read_rows(shard, local, view, "pre_relu")
            for row in local:  # _item's _block: both caches, per item
                meta = self._cached(
                    self.meta, shard, lambda s=shard: self.store.read_slot(s, taps=[], views=[])
                )
                params = self._cached(self.params, (shard, view),
                                      lambda s=shard, v=view: self.store.read_view_params(s, v))  # fmt: skip
                checks += int(bool(meta.keys[row])) + int(params[row, 0] >= 0)
            checks += len(feats)
        return checks


def new_batch(ds, idx: np.ndarray) -> int:
    """What RandomAccessPairs.__getitems__ reads from the cache for a batch (its image reads and joins left out)."""
    r = ds.store.layout.slot_rows
    shard, row = np.divmod(ds.rows[idx], r)
    views = ds.shard_views()[shard]
    feats = ds.features(ds.rows[idx], views)
    meta, checks = ds.meta, len(feats)
    for i, s, w in zip(idx.tolist(), shard.tolist(), row.tolist(), strict=True):
        checks += int(bool(meta.keys[i])) + int(ds.view_params(s)[w, 0] >= 0) + int(meta.hashes[i, 0] >= 0)
    return checks


def access_pass(path: str, which: str, warm: int, timed: int, queue: mp.Queue) -> None:
    import torch

    torch.set_num_threads(1)
    from pipeline.cache.store import open_store
    from pipeline.student.neighbour_pairs import RandomAccessPairs
    from pipeline.student.pairs import scheduled_view

    store = open_store(path)
    rows = np.flatnonzero(store.valid())
    rng = np.random.default_rng(1)
    batches = [np.sort(rng.choice(len(rows), 256, replace=False)) for _ in range(warm + timed)]
    base = _rss_mb()
    out: dict = {}
    if which == "old":
        reader = OldRowReader(store)
        views = {}

        def view_of(s):
            return views.setdefault(s, scheduled_view(0, s, 0, 0, store.layout.views))

        run = [lambda b=b: reader.batch(rows[b], view_of) for b in batches]
    else:
        ds = RandomAccessPairs(path, (), rows, "pre_relu", 32, seed=0)
        start = time.perf_counter()
        meta = ds.meta
        out["meta_load_seconds"] = time.perf_counter() - start
        out["meta_mb"] = meta.nbytes / 2**20
        start = time.perf_counter()
        for shard in range(
            len(store.layout.shards)
        ):  # an epoch loads each on first touch; here up front, so the
            ds.view_params(shard)  # timed batches are the steady state (the old reader's is its LRU's, warm)
        out["epoch_params_seconds"] = time.perf_counter() - start
        run = [lambda b=b: new_batch(ds, b) for b in batches]
    start = time.perf_counter()
    for step in run[:warm]:
        step()
    out["warm_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    for step in run[warm:]:
        step()
    out["seconds_per_batch"] = (time.perf_counter() - start) / timed
    out["rss_mb_above_open"] = _rss_mb() - base
    if which == "new":
        out["params_mb"] = sum(p.nbytes for p in ds._epoch_plan()[2].values()) / 2**20
        out["params_shards"] = len(ds._epoch_plan()[2])
    queue.put(out)


def bench_access(
    shard_counts: list[int], rows: int, dim: int, root: Path, warm: int, timed: int
) -> list[dict]:
    from benchmarks.bench_scale import build

    out = []
    for shards in shard_counts:
        cache = root / f"cache-{shards}"
        write_s = build(cache, shards, rows, 1, dim)
        row: dict = {
            "shards": shards,
            "rows_per_shard": rows,
            "views": 1,
            "dim": dim,
            "write_seconds": write_s,
        }
        for which in ("old", "new"):
            row[which] = _in_child(access_pass, str(cache), which, warm, timed)
            print(f"access {shards} shards {which}: {row[which]}", flush=True)
        out.append(row)
        shutil.rmtree(cache, ignore_errors=True)
    return out


def _in_child(fn, *args) -> dict:
    """``fn(*args, queue)`` in a fresh process (its own peak RSS, no inherited arrays); its figures, or an error when
    it dies without them."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=fn, args=(*args, queue))
    proc.start()
    while True:
        try:
            out = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"{fn.__name__}{args} died (exit code {proc.exitcode})") from None
    proc.join()
    return out


def extrapolate(result: dict, n: int = IMAGENET_1K, dim: int = DIM, world: int = 8) -> dict:
    """The ImageNet-1k figures: mining memory per rank (old: the measured peak per row of the largest size, times N,
    on rank 0, and the float32 copy on the others; new: the rank's float16 share, the measured blocks, the table and
    its all-gather), one-core CPU mining time scaled by N^2 from the largest measured size, the rest as measured."""
    mining = result["mining"]
    big = max(mining, key=lambda row: row["rows"])
    scale = (n / big["rows"]) ** 2
    old_rank0_gb = (
        big["old"]["peak_mb_above_features"] / big["rows"] * n / 1e3
    )  # linear in N (copies, N x chunk)
    held_gb = n * dim * 4 / 1e9  # the old code's float32 centre view, on every rank
    old_table_gb = n * POOL * 8 / 1e9  # its broadcast int64 table
    share_gb = -(-n // world) * dim * 2 / 1e9  # this rank's share of the centre view, float16
    table_gb = 2 * n * POOL * 4 / 1e9  # the int32 table and the all-gather's buffers
    blocks_mb = max(row["new"]["peak_mb_above_features"] for row in mining)  # fixed by the block sizes
    out = {
        "rows": n,
        "dim": dim,
        "world": world,
        "mining_memory": {
            "old_gb_rank_0": old_rank0_gb + old_table_gb,
            "old_gb_other_ranks": held_gb + old_table_gb,
            "old_note": f"every rank held the float32 centre view of all N; rank 0 also mined: "
            f"{big['old']['peak_mb_above_features'] / big['rows'] * 1e3:.0f} kB per row measured at N = {big['rows']} "
            "(float32 copy, normalised copy, chunk x N scores, topk)",
            "new_gb_per_rank": share_gb + blocks_mb / 1e3 + table_gb,
            "new_note": f"the rank's float16 share of {world} ({share_gb:.2f} GB) + ~{blocks_mb:.0f} MB of tiles and "
            f"blocks (measured; fixed by the block sizes once N exceeds one key block, 8192 rows on the CPU) + the "
            f"int32 table and its all-gather ({table_gb:.2f} GB)",
        },
        "mining_cpu_core_hours": {which: big[which]["seconds"] * scale / 3600 for which in ("old", "new")},
        "mining_cpu_core_hours_note": f"one core, scaled by N^2 from N = {big['rows']}; split over ranks (new) "
        "or all on rank 0 (old); the GPU mines in float16 tiles (not measured here)",
    }
    if "sampler" in result:
        out["sampler_seconds_per_epoch"] = {w: result["sampler"][w]["seconds"] for w in ("old", "new")}
        out["sampler_peak_mb"] = {w: result["sampler"][w]["peak_mb_above_table"] for w in ("old", "new")}
    for row in result.get("access", []):
        if row["shards"] * row["rows_per_shard"] >= 0.99 * n:
            out["access_seconds_per_batch"] = {w: row[w]["seconds_per_batch"] for w in ("old", "new")}
            out["access_meta_load_seconds"] = row["new"]["meta_load_seconds"]
            out["access_epoch_params_seconds"] = row["new"]["epoch_params_seconds"]
            out["access_meta_mb_per_worker"] = row["new"]["meta_mb"]
    return out


ROUNDING = 1e-6  # float32 cosines of 2048-wide unit rows are within ~2e-7 of the exact ones: a tie below this


def neighbour_checks(result: dict) -> list[dict]:
    """The new code against the old: tables that differ only between candidates tied within float32 rounding, the
    same number of sampler batches."""
    out = [check(f"mining_max_cosine_gap_vs_old_{row['rows']}", row["agreement"]["max_cosine_gap_where_differing"],
                 ROUNDING, "where the old and new tables differ, their candidates' exact cosines tie within float32 "
                 "rounding")  # fmt: skip
           for row in result["mining"]]  # fmt: skip
    sampler = result["sampler"]
    out.append(check("sampler_batches_vs_old", sampler["new"]["batches"], sampler["old"]["batches"],
                     "batches per epoch on rank 0, new sampler = old", "=="))  # fmt: skip
    return out


QUICK = {"mine_rows": [5000, 20000], "access_dim": 256, "warm": 2, "timed": 8}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="mining at 5k and 20k rows, access caches with D = 256"
    )
    ap.add_argument("--mine-rows", type=int, nargs="*", default=None, help="default 20000 80000")
    ap.add_argument("--sampler-rows", type=int, default=IMAGENET_1K)
    ap.add_argument("--access-shards", type=int, nargs="*", default=[128, 1282])
    ap.add_argument("--access-rows", type=int, default=1000, help="rows per shard of the access caches")
    ap.add_argument(
        "--access-dim", type=int, default=None, help="feature width of the access caches (default 2048)"
    )
    ap.add_argument("--warm", type=int, default=None, help="access batches before the timed ones (default 4)")
    ap.add_argument("--timed", type=int, default=None, help="timed access batches (default 16)")
    ap.add_argument("--skip-access", action="store_true")
    ap.add_argument("--dir", default="", help="where the synthetic caches go (default: the temp folder)")
    ap.add_argument("--json", default="", help="also write the figures to this file")
    args = ap.parse_args(argv)
    defaults = (
        QUICK if args.quick else {"mine_rows": [20000, 80000], "access_dim": DIM, "warm": 4, "timed": 16}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    tmp = Path(tempfile.mkdtemp(prefix="kdep-nb-", dir=args.dir or None))
    result: dict = {
        "threads": 1,
        "quick": args.quick,
        "cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
    }
    try:
        result["sampler"] = bench_sampler(args.sampler_rows)
        if not args.skip_access:
            result["access"] = bench_access(
                args.access_shards, args.access_rows, args.access_dim, tmp, args.warm, args.timed
            )
        result["mining"] = bench_mining(args.mine_rows, tmp)
        result["imagenet_1k"] = extrapolate(result)
        result["checks"] = neighbour_checks(result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["load_avg_at_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(exit_status(main()))
