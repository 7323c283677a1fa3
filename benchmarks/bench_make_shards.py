"""`make-shards` throughput: files/s at 1 and 2 processes on a generated ImageFolder of ImageNet-sized JPEGs, and
what that means for ImageNet-1k (1.28M files) and ImageNet-21k (14.2M files) in core-hours.

    python -m benchmarks.bench_make_shards --json out.json
    python -m benchmarks.bench_make_shards --sizes 500 2000 --workers 1 2 --baseline-tree /path/to/older/checkout

The folder holds ``<class>/<class>_<j>.JPEG`` files painted like the benchmark shards (benchmarks/bench_data.py:
375-500 px a side, quality 90, ~65 KB), written once per run into a temporary folder. Each size is converted with
each worker count into a fresh output folder; a second run over a finished output times the resume check (every
shard re-hashed, nothing written). The files were just written, so they are read from the page cache: the
figures are the CPU cost (listing, reading, full decode, tar writing, hashing), not a disk's or a network
filesystem's. Core-seconds per file = (this process's + the workers' CPU time) / files; the ImageNet rows
extrapolate it linearly (time per core); the wall time at N cores is the plan (serial, in the main process) plus
the rest divided over N cores at the measured CPU efficiency of the pool (an assumption beyond 2 cores, and only
where the storage delivers the files that fast). Each run records the load average before it: on a shared
machine the wall-time figures include other people's work.
``--baseline-tree`` also times another checkout's ``folder_to_shards`` (one process) in a subprocess, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.data.folder import folder_to_shards, plan_folder
from pipeline.data.pool import available_cores
from pipeline.demo.shards import CLASS_NAMES, encode_image, paint_image

IMAGENET_FILES = {"imagenet_1k": 1_281_167, "imagenet_21k": 14_197_122}  # train images (21k: fall11 release)
PER_SHARD = 50  # small shards so that even the small folder gives each process many tasks


def _paint_one(args: tuple[str, int, int]) -> int:
    root, j, seed = args
    label = j % len(CLASS_NAMES)
    rng = np.random.default_rng([seed, j])
    _, data = encode_image(paint_image(rng, label, 375, 500), "rgb")
    (Path(root) / CLASS_NAMES[label] / f"{CLASS_NAMES[label]}_{j:07d}.JPEG").write_bytes(data)
    return len(data)


def make_folder(root: Path, images: int, seed: int = 11) -> int:
    """Write ``images`` ImageNet-sized JPEGs as an ImageFolder of 10 classes; returns their total bytes."""
    for name in CLASS_NAMES:
        (root / name).mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), j, seed) for j in range(images)]
    with ProcessPoolExecutor(available_cores()) as pool:
        return sum(pool.map(_paint_one, jobs, chunksize=32))


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime  # children: counted once they exit


def time_run(src: Path, out: Path, workers: int) -> dict:
    """One ``folder_to_shards`` call: wall seconds, CPU seconds (all processes), shards kept from a finished run,
    and the machine's 1-minute load average before it (other work on a shared machine slows the wall time)."""
    load, wall, cpu = os.getloadavg()[0], time.perf_counter(), _cpu_seconds()
    result = folder_to_shards(src, out, per_shard=PER_SHARD, workers=workers)
    return {
        "seconds": time.perf_counter() - wall,
        "cpu_seconds": _cpu_seconds() - cpu,
        "reused_shards": result.reused,
        "load_average_before": load,
    }


def time_baseline(tree: str, src: Path, out: Path) -> dict:
    """``folder_to_shards`` from another checkout (its own signature: one process): wall and CPU seconds of the
    call, measured inside the subprocess (its imports excluded)."""
    code = (
        "import time; from pipeline.data.folder import folder_to_shards; t, c = time.perf_counter(), "
        f"time.process_time(); folder_to_shards({str(src)!r}, {str(out)!r}, per_shard={PER_SHARD}); "
        "print(time.perf_counter() - t, time.process_time() - c)"
    )
    env = {**os.environ, "PYTHONPATH": tree, "KDEP_PROGRESS_SECONDS": "3600"}
    load = os.getloadavg()[0]
    done = subprocess.run(  # cwd: `python -c` puts the current folder first on sys.path, before PYTHONPATH
        [sys.executable, "-c", code], env=env, cwd=tree, capture_output=True, text=True, check=True
    )
    wall, cpu = map(float, done.stdout.split()[-2:])
    return {"seconds": wall, "cpu_seconds": cpu, "load_average_before": load}


def bench_size(src: Path, work: Path, files: int, workers: tuple[int, ...], baseline: str) -> dict:
    """Every worker count (a fresh output each), the resume check, the plan alone, the baseline."""
    row: dict = {"files": files}
    plan_start = time.perf_counter()
    plan_folder(src, 1.0, 0)
    row["plan_seconds"] = time.perf_counter() - plan_start
    for n in workers:
        out = work / f"out-{files}-w{n}"
        run = time_run(src, out, n)
        run["files_per_s"] = files / run["seconds"]
        run["core_seconds_per_file"] = run["cpu_seconds"] / files
        row[f"workers_{n}"] = run
    resume = time_run(src, work / f"out-{files}-w{workers[-1]}", workers[-1])
    row["resume_check"] = {**resume, "files_per_s": files / resume["seconds"]}
    if baseline:
        base = time_baseline(baseline, src, work / f"out-{files}-baseline")
        row["baseline_1_process"] = {**base, "files_per_s": files / base["seconds"]}
        row["baseline_1_process"]["core_seconds_per_file"] = base["cpu_seconds"] / files
    for n in workers:
        shutil.rmtree(work / f"out-{files}-w{n}", ignore_errors=True)
    return row


def per_file(rows: list[dict], run: str, field: str) -> float:
    """Seconds per extra file of ``run`` (e.g. "workers_2") between the smallest and largest folder: the pool's
    start-up (a fresh interpreter per worker) and the plan's fixed costs cancel. One size: the plain average."""
    small, large = rows[0], rows[-1]
    if large["files"] == small["files"]:
        return large[run][field] / large["files"]
    return (large[run][field] - small[run][field]) / (large["files"] - small["files"])


def extrapolate(rows: list[dict], workers: tuple[int, ...]) -> dict:
    """ImageNet-1k/21k: core-hours at the measured core-seconds per file, and wall hours at 2/16/64 cores.

    Per-file costs are marginal (:func:`per_file`). Two parallel efficiencies of the largest worker count: by
    wall time (speedup / processes; meaningful only on an otherwise idle machine) and by CPU time (one process's
    CPU per file / the pool's: the share of the pool's work that is the task itself, not transfers). The wall
    hours use the CPU one: what an idle machine with that many cores would take if the storage keeps up."""
    one, many = f"workers_{workers[0]}", f"workers_{workers[-1]}"
    cpu_one, plan = per_file(rows, one, "cpu_seconds"), rows[-1]["plan_seconds"] / rows[-1]["files"]
    parallel = workers[-1] > 1
    efficiency = cpu_one / per_file(rows, many, "cpu_seconds") if parallel else 1.0
    wall_speedup = per_file(rows, one, "seconds") / per_file(rows, many, "seconds")
    out = {
        "core_ms_per_file": cpu_one * 1e3,
        "wall_efficiency": wall_speedup / workers[-1] if parallel else 1.0,
        "cpu_efficiency": efficiency,
    }
    for name, files in IMAGENET_FILES.items():
        core_hours, plan_hours = files * cpu_one / 3600, files * plan / 3600  # the plan: serial, main process
        out[name] = {
            "core_hours": core_hours,
            "plan_minutes_one_core": plan_hours * 60,
            **{f"wall_hours_{c}_cores": plan_hours + core_hours / (c * efficiency) for c in (2, 16, 64)},
        }
    return out


def run_make_shards_bench(
    sizes: tuple[int, ...] = (500, 2000),
    workers: tuple[int, ...] = (1, 2),
    root: str = "",
    baseline: str = "",
) -> dict:
    """Generate, time, extrapolate, clean up; returns the figures."""
    work = Path(tempfile.mkdtemp(prefix="kdep-make-shards-", dir=root or None))
    os.environ.setdefault("KDEP_PROGRESS_SECONDS", "3600")  # a progress line per run, not per 10 s
    try:
        make_folder(
            work / "warm-up", 10
        )  # first calls in this process (plugin imports, caches) are not timed
        folder_to_shards(work / "warm-up", work / "warm-up-out", per_shard=PER_SHARD, workers=0)
        rows = []
        for files in sizes:
            src = work / f"folder-{files}"
            nbytes = make_folder(src, files)
            rows.append({**bench_size(src, work, files, tuple(workers), baseline), "mb": nbytes / 1e6})
            shutil.rmtree(src, ignore_errors=True)
        return {
            "cores": available_cores(),
            "per_shard": PER_SHARD,
            "image_sides_px": [375, 500],
            "sizes": rows,
            "extrapolation": extrapolate(rows, tuple(workers)),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 2000], help="images per generated folder")
    ap.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="process counts (first: the reference)"
    )
    ap.add_argument("--dir", default="", help="where the folders are generated (default: the temp folder)")
    ap.add_argument("--baseline-tree", default="", help="also time this checkout's make-shards (one process)")
    ap.add_argument("--json", default="", help="also write the figures to this file")
    args = ap.parse_args()
    out = run_make_shards_bench(tuple(args.sizes), tuple(args.workers), args.dir, args.baseline_tree)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
