"""`kdep eval` at scale: the linear probe in torch vs scikit-learn, k-NN, and the bytes extraction workers read.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_eval --json out/bench-eval.json   # ~10 min on one core
    python -m benchmarks.bench_eval --quick                                           # seconds (2k x 64 x 10)

Probe: synthetic features, N = 20,000 train + 5,000 val rows, D = 512, K = 100 classes (class means + Gaussian
noise, unequal column scales and an offset, stored as float16 like the feature files), the default C sweep
(0.01, 0.1, 1, 10 on a 20% per-class held-out part) and final fit, max 1000 iterations per fit. Each solver runs in
a fresh interpreter that reports its wall time (after a warm-up fit on tiny data: the imports and torch's first
optimiser are not counted), the L-BFGS iterations of each fit, val top-1 and peak RSS (ru_maxrss) beside the RSS
before the probe (data and imports): ``torch`` (warm-started sweep, --device cpu), ``torch-cold`` (each fit from zero,
to show what warm starts save) and ``sklearn``. k-NN (k = 20, cosine, blocked) is timed in the torch interpreter.

Extraction bytes: a split of 8 demo shards x 8 images is extracted by a random ResNet-18 at 32 px with 1 and 2
DataLoader workers; every shard read is counted in the workers (its size, and the bytes the worker's read() calls
returned while parsing it, from /proc/self/io rchar), so the figure is what the workers really read. The features
of both runs must be identical. (The script only uses ``extract_features``'s long-standing arguments, so it can
also be pointed at an older checkout to measure the previous reader: ``PYTHONPATH=<old checkout> python
benchmarks/bench_eval.py --bytes-only``.)
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
FULL = {"train": 20_000, "val": 5_000, "dim": 512, "classes": 100}
QUICK = {"train": 2_000, "val": 500, "dim": 64, "classes": 10}
CS = (0.01, 0.1, 1.0, 10.0)  # kdep eval's default probe_cs
SOLVERS = ("torch", "torch-cold", "sklearn")
NOISE = 6.0  # noise std per column next to class means of std 1: ~75% val top-1 at D = 512, K = 100


def synthetic(train: int, val: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_val, y_val): x float16 = (class mean + noise) x column scales 0.1..10 + 3."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)).astype(np.float32)
    scales = np.geomspace(0.1, 10.0, dim).astype(np.float32)

    def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % classes
        x = (means[y] + NOISE * rng.standard_normal((n, dim), dtype=np.float32)) * scales + 3.0
        return x.astype(np.float16), y

    return (*rows(train), *rows(val))


def rss_mb() -> float:
    """Resident memory now (VmRSS), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_probe(solver_name: str, sizes: dict) -> dict:
    """One solver on the synthetic set (in this process): the sweep, the final fit, val top-1, time, memory."""
    import torch

    from pipeline.evaluation.logistic import make_solver
    from pipeline.evaluation.probes import choose_c, knn_top1, top1

    backend = "sklearn" if solver_name == "sklearn" else "torch"
    warm = make_solver(backend, np.eye(4, dtype=np.float16), np.arange(4) % 2, torch.device("cpu"), 5)
    warm.fit(None, 1.0)  # imports (torch's first optimiser imports torch._dynamo, seconds) not timed
    x_train, y_train, x_val, y_val = synthetic(**sizes)
    before = rss_mb()
    start = time.perf_counter()
    solver = make_solver(
        backend, x_train, y_train, torch.device("cpu"), 1000, warm_start=solver_name == "torch"
    )
    c, sweep, _ = choose_c(solver, y_train, CS, 0.2, 0)
    converged = solver.fit(None, c)
    accuracy = top1(solver.predict(x_val), y_val)
    seconds = time.perf_counter() - start
    out = {
        "solver": solver_name, "seconds": round(seconds, 2), "top1": accuracy, "c": c, "sweep": sweep,
        "converged": converged, "iterations_per_fit": solver.iterations, "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    if solver_name == "torch":
        start = time.perf_counter()
        out["knn_top1"] = knn_top1(x_train, y_train, x_val, y_val, k=20)
        out["knn_seconds"] = round(time.perf_counter() - start, 2)
    return out


def probe_in_fresh_process(solver_name: str, quick: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_eval", "--child", solver_name] + (
        ["--quick"] if quick else []
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def counting_reader(real, counters: dict):
    """``iter_samples`` that adds each shard's size and the bytes read() while parsing it (rchar) to counters
    shared with the DataLoader workers (forked after this is installed)."""

    def rchar() -> int:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
        return 0

    def read(path, *args, **kwargs):
        before = rchar()
        with counters["lock"]:
            counters["shards"].value += 1
            counters["shard_bytes"].value += os.path.getsize(path)
        yield from real(path, *args, **kwargs)
        with counters["lock"]:
            counters["rchar"].value += rchar() - before

    return read


def bench_extraction_bytes(root: Path) -> dict:
    """Bytes read by 1 and 2 extraction workers over the same 8-shard split; features must be identical."""
    import pipeline.evaluation.batches as batches
    from pipeline.data.shards import list_shards
    from pipeline.demo.shards import DemoSpec, write_demo_data
    from pipeline.evaluation.backbones import BackboneSpec
    from pipeline.evaluation.features import extract_features, load_backbone

    spec = DemoSpec(seed=0, classes=4, train_per_class=16, val_per_class=1, per_shard=8)
    shards = list_shards(str(write_demo_data(spec, root)["train"]))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument(
        "--quick", action="store_true", help="2k x 64 x 10 classes instead of 20k x 512 x 100"
    )
    parser.add_argument("--bytes-only", action="store_true", help="only the extraction bytes")
    parser.add_argument("--child", choices=SOLVERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.child:
        print(json.dumps(run_probe(args.child, sizes)))
        return
    results: dict = {"omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count()}
    if not args.bytes_only:
        results["probe"] = {
            "sizes": sizes,
            "cs": CS,
            **{s: probe_in_fresh_process(s, args.quick) for s in SOLVERS},
        }
    with tempfile.TemporaryDirectory() as tmp:
        results["extraction_bytes"] = bench_extraction_bytes(Path(tmp))
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
