"""`kdep eval` at scale: the linear probe in torch vs scikit-learn, k-NN, and the bytes extraction workers read.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_eval --json out/bench-eval.json   # minutes on one core
    python -m benchmarks.bench_eval --quick                                           # seconds (2k x 64 x 10)

Probe, ``probe_accuracy``: synthetic features, N = 20,000 train + 5,000 val rows, D = 512, K = 100 classes (class
means + Gaussian noise, unequal column scales and an offset, stored as float16 like the feature files), the
default C sweep (0.01, 0.1, 1, 10 on a 20% per-class held-out part) and the final fit, at most 1000 iterations per
fit, on the CPU. Each solver runs in a fresh interpreter after a warm-up fit on tiny data (imports and torch's
first optimiser, which imports torch._dynamo, are not counted) and reports wall and CPU seconds (CPU seconds are
the fair figure on a shared machine), the iterations of each fit, val top-1, and its peak RSS (ru_maxrss) beside
the RSS before the probe (imports and data): ``torch`` (warm-started sweep), ``torch-cold`` (each fit from zero: what
warm starts save) and ``sklearn``. k-NN (k = 20, cosine on the raw features, blocked) is timed in the torch run;
its top-1 means little on these features (the offset and column scales dominate raw cosines).
``probe_memory``: N = 160,000 x 512, one C, 3 iterations, torch vs sklearn: peak RSS against N (the torch
solver's temporaries are bounded by its row blocks; scikit-learn copies the split to float32 and standardises a
copy).

Extraction bytes: a split of 8 demo shards x 8 images is extracted by a random ResNet-18 at 32 px with 1 and 2
DataLoader workers; every shard read is counted in the workers (its size, and the bytes the worker's read() calls
returned while parsing it, from /proc/self/io rchar), so the figure is what the workers really read. The features
of both runs must be identical (an agreement check, benchmarks/checks.py: a FAIL line and exit status 1 after the
JSON when they differ). (The script only uses ``extract_features``'s long-standing arguments, so it can
also be pointed at an older checkout to measure the previous reader: ``PYTHONPATH=<old checkout> python
benchmarks/bench_eval.py --bytes-only``.) Fine-tuning's index of the same split: bytes read to build it (tar
headers and ``cls`` members), bytes it holds, against the encoded images the previous version held in memory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ACCURACY = {"train": 20_000, "val": 5_000, "dim": 512, "classes": 100}  # the C sweep: time, iterations, top-1
MEMORY = {
    "train": 160_000,
    "val": 1_000,
    "dim": 512,
    "classes": 100,
}  # one C, 3 iterations: peak RSS against N
QUICK = {"train": 2_000, "val": 500, "dim": 64, "classes": 10}
CS = (0.01, 0.1, 1.0, 10.0)  # kdep eval's default probe_cs
SOLVERS = ("torch", "torch-cold", "sklearn")
NOISE = 6.0  # noise std per column next to class means of std 1: ~78% val top-1 at D = 512, K = 100
CHUNK = 10_000  # rows generated at a time (the generator's own peak memory stays small)


def synthetic(train: int, val: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_val, y_val): x float16 = (class mean + noise) x column scales 0.1..10 + 3, labels
    cycling through the classes."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)).astype(np.float32)
    scales = np.geomspace(0.1, 10.0, dim).astype(np.float32)

    def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
        y, x = np.arange(n) % classes, np.empty((n, dim), np.float16)
        for s in range(0, n, CHUNK):
            noise = NOISE * rng.standard_normal((min(CHUNK, n - s), dim), dtype=np.float32)
            x[s : s + CHUNK] = (means[y[s : s + CHUNK]] + noise) * scales + 3.0
        return x, y

    return (*rows(train), *rows(val))


def rss_mb() -> float:
    """Resident memory now (VmRSS), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_probe(solver_name: str, sizes: dict, cs: tuple[float, ...], max_iter: int) -> dict:
    """One solver on the synthetic set (in this process): the sweep over ``cs``, the final fit, val top-1, wall and
    CPU seconds, iterations per fit, RSS before and at the peak."""
    import torch

    from pipeline.evaluation.logistic import make_solver
    from pipeline.evaluation.probes import choose_c, knn_top1, top1

    backend = "sklearn" if solver_name == "sklearn" else "torch"
    warm = make_solver(backend, np.eye(4, dtype=np.float16), np.arange(4) % 2, torch.device("cpu"), 5)
    warm.fit(None, 1.0)  # imports (torch's first optimiser imports torch._dynamo, seconds) not timed
    x_train, y_train, x_val, y_val = synthetic(**sizes)
    before, start, cpu = rss_mb(), time.perf_counter(), cpu_seconds()
    warm_start = solver_name == "torch"
    solver = make_solver(backend, x_train, y_train, torch.device("cpu"), max_iter, warm_start=warm_start)
    c, sweep, _ = choose_c(solver, y_train, cs, 0.2, 0)
    converged = solver.fit(None, c)
    accuracy = top1(solver.predict(x_val), y_val)
    out = {
        "solver": solver_name, "rows": len(x_train), "seconds": round(time.perf_counter() - start, 2),
        "cpu_seconds": round(cpu_seconds() - cpu, 2), "top1": accuracy, "c": c, "sweep": sweep,
        "converged": converged, "iterations_per_fit": solver.iterations, "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    out["peak_minus_before_mb"] = round(out["peak_rss_mb"] - before, 1)
    if solver_name == "torch" and len(cs) > 1:  # k-NN on the raw features: its time (top-1 means little here)
        start = time.perf_counter()
        out["knn_top1"] = knn_top1(x_train, y_train, x_val, y_val, k=20)
        out["knn_seconds"] = round(time.perf_counter() - start, 2)
    return out


def probe_in_fresh_process(solver_name: str, mode: str, quick: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_eval", "--child", solver_name, "--mode", mode]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        cmd + (["--quick"] if quick else []), capture_output=True, text=True, cwd=REPO, env=env
    )
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def rchar() -> int:
    """Bytes this process's read() calls have returned so far (/proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def counting_reader(real, counters: dict):
    """``iter_samples`` that adds each shard's size and the bytes read() while parsing it (rchar) to counters
    shared with the DataLoader workers (forked after this is installed)."""

    def read(path, *args, **kwargs):
        before = rchar()
        with counters["lock"]:
            counters["shards"].value += 1
            counters["shard_bytes"].value += os.path.getsize(path)
        yield from real(path, *args, **kwargs)
        with counters["lock"]:
            counters["rchar"].value += rchar() - before

    return read


def demo_split(root: Path) -> list:
    """8 demo shards x 8 images (ShardInfo list)."""
    from pipeline.data.shards import list_shards
    from pipeline.demo.shards import DemoSpec, write_demo_data

    spec = DemoSpec(seed=0, classes=4, train_per_class=16, val_per_class=1, per_shard=8)
    return list_shards(str(write_demo_data(spec, root)["train"]))


def bench_extraction_bytes(shards: list) -> dict:
    """Bytes read by 1 and 2 extraction workers over the same split; the features must be identical."""
    import pipeline.evaluation.batches as batches
    from pipeline.evaluation.backbones import BackboneSpec
    from pipeline.evaluation.features import extract_features, load_backbone

    split_bytes = sum(s.nbytes for s in shards)
    model, _ = load_backbone(BackboneSpec("r", "resnet18", "random"), seed=0)
    real, out, rows = batches.iter_samples, {"split_bytes": split_bytes, "shards": len(shards)}, {}
    for workers in (1, 2):
        lock = multiprocessing.Lock()
        counters = {"lock": lock, **{k: multiprocessing.Value("q", 0, lock=False) for k in ("shards", "shard_bytes", "rchar")}}  # fmt: skip
        batches.iter_samples = counting_reader(real, counters)
        start = time.perf_counter()
        try:
            feats = extract_features({"r": model}, shards, 32, 8, "cpu", workers=workers)["r"]
        finally:
            batches.iter_samples = real
        rows[workers] = feats.taps["post_relu"]
        out[f"workers_{workers}"] = {
            "shard_opens": counters["shards"].value, "shard_bytes_parsed": counters["shard_bytes"].value,
            "rchar_bytes": counters["rchar"].value, "bytes_per_split_byte": round(counters["rchar"].value / split_bytes, 3),
            "seconds": round(time.perf_counter() - start, 2),
        }  # fmt: skip
    out["identical_features"] = bool(np.array_equal(rows[1], rows[2]))
    return out


def bench_finetune_index(shards: list) -> dict | None:
    """What fine-tuning reads to index the train split (tar headers + labels) and holds (the index) against the
    encoded images it no longer holds; None on a checkout without the index."""
    try:
        from pipeline.evaluation.train_samples import index_samples
    except ImportError:  # an older checkout kept every encoded train image in memory
        return None
    split_bytes, before = sum(s.nbytes for s in shards), rchar()
    index = index_samples(shards)
    read = rchar() - before
    held = sum(a.nbytes for a in (index.shard, index.start, index.size, index.label, index.key))
    return {
        "images": len(index), "split_bytes": split_bytes, "bytes_read": read,
        "read_per_split_byte": round(read / split_bytes, 3), "encoded_image_bytes": int(index.size.sum()),
        "index_bytes": held, "index_bytes_per_image": round(held / len(index), 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--quick", action="store_true", help="2k x 64 x 10 classes (seconds)")
    parser.add_argument("--bytes-only", action="store_true", help="only the extraction bytes")
    parser.add_argument("--child", choices=SOLVERS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("accuracy", "memory"), default="accuracy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_probe(args.child, *probe_setting(args.mode, args.quick))))
        return
    results: dict = {"omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count()}
    for mode, solvers in (
        (("accuracy", SOLVERS), ("memory", ("torch", "sklearn"))) if not args.bytes_only else ()
    ):
        sizes, cs, max_iter = probe_setting(mode, args.quick)
        results[f"probe_{mode}"] = {"sizes": sizes, "cs": cs, "max_iter": max_iter}
        results[f"probe_{mode}"].update({s: probe_in_fresh_process(s, mode, args.quick) for s in solvers})
    with tempfile.TemporaryDirectory() as tmp:
        shards = demo_split(Path(tmp))
        results["extraction_bytes"] = bench_extraction_bytes(shards)
        results["finetune_index"] = bench_finetune_index(shards)
    status = check_results(results)
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    sys.exit(status())


def check_results(results: dict):
    """Record the agreement check (1 and 2 workers extract the same features); returns the exit-status function.
    Against an older checkout on PYTHONPATH (no benchmarks.checks there) nothing is checked, and that is said."""
    try:
        from benchmarks.checks import add_part, check, exit_status
    except ImportError:
        print(
            "bench_eval: benchmarks.checks is not importable (an older checkout?): nothing checked",
            file=sys.stderr,
        )
        return lambda: 0
    same = results["extraction_bytes"]["identical_features"]
    about = "features extracted with 1 and 2 DataLoader workers, bit for bit"
    add_part(results, {"checks": [check("extraction_identical_features", same, True, about, "==")]})
    return lambda: exit_status(results)


def probe_setting(mode: str, quick: bool) -> tuple[dict, tuple[float, ...], int]:
    """(sizes, C values, max iterations) of a probe run: the full sweep, or one C for 3 iterations (memory)."""
    if mode == "accuracy":
        return (QUICK if quick else ACCURACY), CS, 1000
    return (QUICK if quick else MEMORY), (1.0,), 3


if __name__ == "__main__":
    main()
