"""Stage 1 start-up at ImageNet scale, without a teacher: seconds and bytes read, new and resumed, and the address
space of stage 1's shard buffers with every shard pending.

    python -m benchmarks.bench_startup --json out.json                          # 128 and 1282 shards
    python -m benchmarks.bench_startup --shards 128 --old /work/main --json out.json   # also an older tree's code

The shards are ImageNet-shaped tars made sparse: 1000 samples each, a ``.jpg`` member of an ImageNet-like size
(log-normal, mean ~106 KB: ~108 MB per shard) whose bytes are a hole, and a ``.cls`` member. 1282 of them are ~138 GB
of file but ~6.5 GB of disk (every header has its own 4 KiB block), written once into ``--dir``. Their index.json
has the real names, counts and sizes; its sha256 fields are placeholders (start-up never hashes a shard whose index
gives its hash, and no worker runs here). Figures, each from a fresh child process (``--old``: the same child on
an older tree's code, for a side-by-side run):

- ``startup``: what ``cache-teacher`` does before its first batch, but for loading the teacher: list the shards,
  scan what is needed, create or check the store, split the pending shards. For a new cache and for a resume with
  90% of the shards done (their slots' keys and offsets written, their done markers present). ``bytes_read`` is
  ``rchar`` of /proc/self/io (every byte read, page cache hits included: a hole reads as memory); seconds are with
  every header in the page cache, so an older tree's seconds are a lower bound (its member bytes are holes here,
  read at memory speed; on disk they are real reads);
- ``assembly``: stage 1's main loop (``pipeline.cache.teacher.cache_shards``) with a synthetic message stream for
  the first 2 of 1282 pending shards (K=10, one 2048-wide tap, or ResNet-50's five stage taps), the teacher
  replaced by zeros and the writer by a no-op: peak virtual memory (VmPeak) above the process's size before the
  loop, and memory maps (``vm.max_map_count`` is 65,530) at the first batch.
"""

from __future__ import annotations

import argparse
import builtins
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
TAPS = {"one-2048": {"pre_relu": 2048},
        "r50-five": {"stage1": 256, "stage2": 512, "stage3": 1024, "stage4": 2048, "pre_relu": 2048}}  # fmt: skip


def _proc(field: str, path: str = "/proc/self/status") -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _padded(n: int) -> int:
    return (n + 511) // 512 * 512


def _placeholder(name: str) -> str:
    return hashlib.sha256(f"placeholder for {name}".encode()).hexdigest()


def write_sparse_shard(path: Path, shard: int, images: int) -> None:
    """One ImageNet-shaped tar whose image bytes are holes."""
    rng = np.random.default_rng(shard)
    sizes = np.clip(rng.lognormal(np.log(110e3) - 0.18, 0.6, images), 2e3, 2e6).astype(int)
    pos = 0
    with open(path, "wb") as fh:
        for j, size in enumerate(sizes):
            key = f"n{shard:05d}_{j:06d}"
            for ext, n, data in (("jpg", int(size), b""), ("cls", 3, b"%3d" % (j % 1000))):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode = n, 0o444
                fh.seek(pos)
                fh.write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict") + data)
                pos += 512 + _padded(n)
        fh.seek(pos)
        fh.write(bytes(1024))  # end-of-archive marker


def build_shards(root: Path, count: int, images: int) -> tuple[Path, Path]:
    """``root/all`` holds the shards (made once); ``root/<count>`` links the first ``count`` with their index,
    ``root/<count>-bare`` links them without one."""
    from pipeline.data.shards import INDEX_NAME, write_index

    every, folder, bare = root / "all", root / f"{count}", root / f"{count}-bare"
    for d in (every, folder, bare):
        d.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        name = f"train-{i:06d}.tar"
        if not (every / name).is_file():
            write_sparse_shard(every / (name + ".tmp"), i, images)
            os.replace(every / (name + ".tmp"), every / name)
        for d in (folder, bare):
            if not (d / name).exists():
                os.link(every / name, d / name)
        size = (every / name).stat().st_size
        records.append({"name": name, "samples": images, "bytes": size, "sha256": _placeholder(name)})
    if not (folder / INDEX_NAME).is_file():
        write_index(folder, records, [f"c{i}" for i in range(1000)])
    return folder, bare


def settle(folder: Path) -> None:
    """Evict the shards' pages, then read every header back: each measurement starts with headers cached."""
    from pipeline.data.shards import scan_samples

    for tar in sorted(folder.glob("*.tar")):
        with open(tar, "rb") as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        scan_samples(tar)


def child_startup(spec: str, out: str) -> dict:
    """Start-up of whatever ``pipeline``/``stages`` this process imports (this tree's, or an older one's)."""
    import stages.cache_teacher as stage
    from pipeline.cache.store import CacheLayout, create_store, open_store, zarr_path
    from pipeline.data.shards import shard_record
    from pipeline.provenance import StoreLock, require_same
    from pipeline.runtime import Dist

    opened: set[str] = set()
    original = builtins.open

    def recording(file, *args, **kwargs):
        if str(file).endswith(".tar"):
            opened.add(str(file))
        return original(file, *args, **kwargs)

    def prepare(shards) -> None:
        records = [shard_record(s) for s in shards]
        provenance = {"bench": "startup", "shards": records}
        if (zarr_path(out) / "zarr.json").exists():
            require_same("bench store", open_store(out).provenance, provenance, "")
        else:
            create_store(out, CacheLayout(records, 1, {"pre_relu": 8}), provenance)

    builtins.open = recording
    lock, job = StoreLock(out), Dist()
    rchar, start = _proc("rchar", "/proc/self/io"), time.perf_counter()
    if hasattr(stage, "take_lock"):  # this tree: lock, then read what the pending shards need
        from pipeline.cache.inputs import scan_inputs

        stage.take_lock(out, lock, job)
        inputs = scan_inputs(spec, out, job, False)
        prepare(inputs.shards)
        tasks = stage.pending_tasks(inputs, job)
    else:  # before: every shard's headers first, then lock, create or check, read the markers
        shards, dups = stage.scan_inputs(spec, job, False)
        Path(out).mkdir(parents=True, exist_ok=True)
        lock.acquire()
        prepare(shards)
        tasks, _done = stage.pending_tasks(open_store(out, "r+"), shards, dups, job)
    seconds = time.perf_counter() - start
    read = _proc("rchar", "/proc/self/io") - rchar
    lock.release()
    return {"seconds": seconds, "bytes_read": read, "tars_opened": len(opened), "pending": len(tasks)}


def child_assembly(shards: int, taps: str, images: int = 1000, views: int = 10, run_shards: int = 2) -> dict:
    """Stage 1's loop over a synthetic stream: the first ``run_shards`` of ``shards`` pending shards."""
    import torch

    from pipeline.cache import teacher as loop
    from pipeline.cache.workers import ShardTask, ViewSpec
    from pipeline.data.params import N_PARAMS

    dims, per_batch, seen = TAPS[taps], 25, {}

    def stream(*_args, **_kwargs):
        for s in range(run_shards):
            for first in range(0, images, per_batch):
                pos = list(range(first, min(images, first + per_batch)))
                yield {"kind": "views", "shard": s, "positions": pos, "keys": [f"k{s}_{p}" for p in pos],
                       "offsets": np.array(pos, np.int64) * 110_000, "params": np.zeros((len(pos), views, N_PARAMS),
                       np.float32), "hw": np.ones((len(pos), 2), np.int32), "hashes": np.zeros((len(pos), 16), np.uint8)}  # fmt: skip
            yield {"kind": "end", "shard": s, "samples": images, "skipped": []}

    def features(_teachers, msg, _rt):
        seen.setdefault("maps_at_first_batch", len(Path("/proc/self/maps").read_text().splitlines()))
        return {t: np.zeros((len(msg["keys"]) * views, d), np.float32) for t, d in dims.items()}

    class Store:  # what the loop asks of a store; writes are dropped
        layout = type("Layout", (), {"dims": dims, "dtype": "float16"})

        def write_slot(self, shard_index, block) -> None:
            pass

    loop.DataLoader, loop.ensemble_features = stream, features
    tasks = [ShardTask(i, f"train-{i:06d}.tar", f"train-{i:06d}.tar", images, None) for i in range(shards)]
    spec = ViewSpec("paper", 0, views, 224, False, per_batch)
    rt = loop.Runtime(torch.device("cpu"), "off", False, 0, False, False)
    before = _proc("VmSize")
    loop.cache_shards(Store(), tasks, [], spec, rt)
    return {"vm_peak_gb": _proc("VmPeak") * 1024 / 1e9, "vm_added_gb": (_proc("VmPeak") - before) * 1024 / 1e9,
            "maps_at_first_batch": seen["maps_at_first_batch"], "shards_pending": shards, "taps": dims}  # fmt: skip


def in_child(code: str, *args: str) -> dict:
    """Run ``child_*`` in a fresh interpreter importing ``code``'s ``pipeline`` (this file as a script)."""
    env = {**os.environ, "PYTHONPATH": code, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(HERE), "--child", *args], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {args} on {code} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fill_done(out: Path, folder: Path, fraction: float) -> int:
    """Write the first ``fraction`` of the store's slots as stage 1 would (keys, offsets; zero features) + markers."""
    from pipeline.cache.store import ShardBlock, open_store
    from pipeline.data.params import N_PARAMS
    from pipeline.data.shards import scan_samples

    store = open_store(out, "r+")
    done = int(len(store.layout.shards) * fraction)
    for i, rec in enumerate(store.layout.shards[:done]):
        found = scan_samples(folder / rec["name"])
        n = len(found)
        store.write_slot(i, ShardBlock([k for k, _ in found], {"pre_relu": np.zeros((n, 1, 8), np.float16)},
                                       np.zeros((n, 1, N_PARAMS), np.float32), np.ones((n, 2), np.int32),
                                       np.zeros((n, 16), np.uint8), np.ones(n, bool),
                                       offsets=np.array([o for _, o in found], np.int64)))  # fmt: skip
    return done


def measure(folder: Path, bare: Path, work: Path, codes: dict[str, str]) -> dict:
    """Fresh start, then resume with 90% done, for each code tree on the same shards (and the same resumed store);
    this tree's resume also without the index (an older tree hashes every shard then, and its hashes would not
    match the index's placeholders)."""
    out: dict = {name: {} for name in codes}
    for name, code in codes.items():
        settle(folder)
        out[name]["fresh"] = in_child(code, "startup", str(folder), str(work / f"fresh-{name}"))
    resumed = work / "fresh-this"
    done = fill_done(resumed, folder, 0.9)
    for name, code in codes.items():
        settle(folder)
        out[name]["resume_90pct_done"] = {
            **in_child(code, "startup", str(folder), str(resumed)),
            "done": done,
        }
    settle(bare)
    out["this"]["resume_90pct_done_no_index"] = in_child(codes["this"], "startup", str(bare), str(resumed))
    return out


def run_startup(counts: tuple[int, ...] = (128, 1282), images: int = 1000, root: str = "", old: str = "",
                keep: bool = False) -> dict:  # fmt: skip
    """Every figure of the module docstring; ``old``: an older tree measured side by side ("" = this tree only)."""
    base = Path(root) if root else Path(tempfile.mkdtemp(prefix="kdep-startup-"))
    codes = {"this": str(HERE.parents[1]), **({"before": old} if old else {})}
    results: dict = {"images_per_shard": images, "startup": {}, "assembly": {}}
    try:
        for count in counts:
            folder, bare = build_shards(base / "shards", count, images)
            shard_bytes = sum(t.stat().st_size for t in folder.glob("*.tar"))
            work = Path(tempfile.mkdtemp(prefix=f"run{count}-", dir=base))
            figures = measure(folder, bare, work, codes)
            for runs in figures.values():
                for fig in runs.values():
                    fig["share_of_shard_bytes"] = fig["bytes_read"] / shard_bytes
            results["startup"][str(count)] = {"shards": count, "shard_gb": shard_bytes / 1e9, **figures}
            shutil.rmtree(work, ignore_errors=True)
        for taps in TAPS:
            results["assembly"][taps] = {
                name: in_child(code, "assembly", "1282", taps) for name, code in codes.items()
            }
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    return results


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, args = sys.argv[2], sys.argv[3:]
        out = child_startup(*args) if kind == "startup" else child_assembly(int(args[0]), args[1])
        print(json.dumps(out))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="128,1282", help="shard counts, comma-separated")
    ap.add_argument("--images", type=int, default=1000, help="samples per shard")
    ap.add_argument(
        "--old", default="", help="an older tree (its root) to measure side by side, e.g. /work/main"
    )
    ap.add_argument("--dir", default="", help="where the sparse shards go (kept there when given)")
    ap.add_argument("--json", default="", help="also write the figures to this file")
    args = ap.parse_args()
    counts = tuple(int(c) for c in args.shards.split(","))
    out = run_startup(counts, args.images, args.dir, args.old, keep=bool(args.dir))
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
