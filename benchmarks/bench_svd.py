"""Stage 2's out-of-core SVD fit: seconds per million rows and peak RSS against N, and agreement with numpy.

    python -m benchmarks.bench_svd            # N = 50k, 200k, 800k rows x 2048 (a few minutes, ~4 GB of temp disk)
    python -m benchmarks.bench_svd --quick    # N = 5k, 20k rows x 256 (seconds)

For every N a synthetic float16 cache (1 view, 10k-row shards, the store's default chunking) is generated shard by
shard in a temporary folder (memory-flat), then `kdep fit-svd --method svd --transform none` (one pass, fit, plots,
save) runs in a fresh interpreter (`python -c`) that reports its own wall time and peak RSS (VmHWM).
Where the float32 matrix is at most NUMPY_MAX_BYTES, numpy.linalg.svd(centred float32, full_matrices=False) runs in
memory on the same rows for comparison: the rows whose ``valid`` flag is set, as the fit reads them (a slot is
rounded up to whole inner chunks, 5120 rows for 5000 samples, and its padding rows are zeros that no fit reads).
The subspace error is sin of the largest principal angle between the two top-D_s subspaces. Each agreement figure
is checked against its tolerance (benchmarks/checks.py: a FAIL line, and exit status 1 after the JSON). Prints the
result as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.checks import check, exit_status
from pipeline.cache.store import CacheLayout, ShardBlock, create_store, open_store
from pipeline.data.params import N_PARAMS

SHARD_ROWS = 10_000  # rows per synthetic shard (ImageNet-like shard size)
RANK = 64  # rank of the synthetic low-rank signal
REPO = Path(__file__).resolve().parents[1]
NUMPY_MAX_BYTES = 1 << 30  # in-memory numpy SVD only up to this float32 matrix size (~3-4x that at its peak)
# float32 precision, with room: measured 4.6e-8 (5k and 20k x 256) and 1.3e-7 (50k x 2048) for the subspace, 5.8e-8
# for the singular values; reading the 480 zero padding rows of 20k x 256 into the reference made the subspace 0.10
SUBSPACE_TOLERANCE = 1e-5  # sin of the largest principal angle, fit-svd vs numpy
SINGULAR_VALUE_TOLERANCE = 1e-5  # max relative error of the top-D_s singular values


def synthetic_rows(rng: np.random.Generator, n: int, signal: np.ndarray, noise_std: np.ndarray) -> np.ndarray:
    """(n, D) float16: low-rank signal + per-channel noise with distinct stds (a strictly decaying spectrum)."""
    z = rng.standard_normal((n, signal.shape[0]), dtype=np.float32) @ signal
    return (z + rng.standard_normal((n, len(noise_std)), dtype=np.float32) * noise_std + 0.3).astype(
        np.float16
    )


def build_cache(path: Path, rows: int, dim: int, seed: int = 0) -> Path:
    """A 1-view cache of ``rows`` synthetic rows, written shard by shard."""
    rng = np.random.default_rng(seed)
    signal = np.linalg.qr(rng.standard_normal((dim, RANK)))[0].T * np.geomspace(6.0, 1.0, RANK)[:, None]
    noise_std = np.geomspace(1.0, 0.02, dim).astype(np.float32)
    sizes = [min(SHARD_ROWS, rows - s) for s in range(0, rows, SHARD_ROWS)]
    layout = CacheLayout(
        [{"name": f"syn-{i:06d}", "samples": n} for i, n in enumerate(sizes)], 1, {"pre_relu": dim}
    )
    create_store(path, layout, provenance={"teacher": "synthetic", "seed": seed})
    store = open_store(path, "r+")
    for i, n in enumerate(sizes):
        feats = synthetic_rows(rng, n, signal.astype(np.float32), noise_std)[:, None, :]
        block = ShardBlock(
            keys=[f"s{i}-{j}" for j in range(n)],
            features={"pre_relu": feats},
            params=np.zeros((n, 1, N_PARAMS), np.float32),
            hw=np.zeros((n, 2), np.int32),
            hashes=np.zeros((n, 16), np.uint8),
            valid=np.ones(n, bool),
        )
        store.write_slot(i, block)
    return path


def _max_rss_mb() -> float:
    """Peak RSS of this process in MiB: VmHWM on Linux (ru_maxrss there keeps the parent's peak across fork+exec)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB elsewhere


def fit_child(cache: str, out: str, dim: int) -> dict:
    """The measured fit (runs in the child process): wall time, peak RSS, RSS after imports."""
    from stages.fit_svd import FitSvdConfig, run

    baseline = _max_rss_mb()
    start = time.perf_counter()
    run(FitSvdConfig(cache=cache, out=out, dim=dim, method="svd", transform="none", quiet=True))
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": _max_rss_mb(), "baseline_rss_mb": baseline}


def time_fit(cache: Path, out: Path, dim: int) -> dict:
    """Run fit_child in a fresh interpreter (its RSS is the fit's alone); its JSON result."""
    code = f"import json; from benchmarks.bench_svd import fit_child; print(json.dumps(fit_child({str(cache)!r}, {str(out)!r}, {dim})))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the fit failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def numpy_reference(cache: Path, dim: int) -> tuple[float, np.ndarray, np.ndarray, int]:
    """Seconds of an in-memory float32 SVD of the centred valid rows; its top-``dim`` basis, singular values and
    the number of rows."""
    store = open_store(cache)
    valid = store.valid()  # padding rows (a slot's tail) and skipped samples are not features
    x = store.feature_array("pre_relu")[:][valid, 0, :].astype(np.float32)
    start = time.perf_counter()
    _, s, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    return time.perf_counter() - start, vt[:dim].T, s, len(x)


def subspace_error(a: np.ndarray, b: np.ndarray) -> float:
    """sin of the largest principal angle between the spans of orthonormal a and b: ||a - b b^T a||_2.

    (Computed from the residual, not as sqrt(1 - cos^2), which turns float32 rounding into ~1e-4.)
    """
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b @ (b.T @ a), ord=2))


def bench_one(root: Path, rows: int, dim: int, dim_s: int) -> dict:
    cache, out = build_cache(root / f"cache-{rows}", rows, dim), root / f"proj-{rows}.npz"
    fit = time_fit(cache, out, dim_s)
    record = {"rows": rows, **fit, "numpy_seconds": None, "subspace_error": None, "sv_rel_error": None,
              "numpy_rows": None}  # fmt: skip
    with np.load(out) as proj:
        ours, ours_s, record["fit_rows"] = proj["basis"], proj["singular_values"], int(proj["n_rows"])
    if rows * dim * 4 <= NUMPY_MAX_BYTES:
        seconds, basis, s, record["numpy_rows"] = numpy_reference(cache, dim_s)
        record.update(numpy_seconds=seconds, subspace_error=subspace_error(ours, basis))
        record["sv_rel_error"] = float(np.max(np.abs(ours_s[:dim_s] - s[:dim_s]) / s[:dim_s]))
    return record


def bench_svd(
    rows: tuple[int, ...] = (50_000, 200_000, 800_000), dim: int = 2048, quick: bool = False
) -> dict:
    """Time and measure the out-of-core fit for each N; compare with numpy where it fits in memory."""
    if quick:
        rows, dim = (5_000, 20_000), 256
    dim_s = dim // 4
    with tempfile.TemporaryDirectory(prefix="bench-svd-") as tmp:
        records = [bench_one(Path(tmp), n, dim, dim_s) for n in rows]
    errors = [r["subspace_error"] for r in records if r["subspace_error"] is not None]
    figures = {
        "dim_teacher": dim,
        "dim_student": dim_s,
        "fit": "fit-svd --method svd --transform none in a fresh interpreter (one pass, eigh, plots, save)",
        "svd_seconds_per_million_rows": {r["rows"]: r["seconds"] / r["rows"] * 1e6 for r in records},
        "svd_seconds": {r["rows"]: r["seconds"] for r in records},
        "svd_peak_rss_mb": {r["rows"]: r["peak_rss_mb"] for r in records},
        "svd_baseline_rss_mb": {r["rows"]: r["baseline_rss_mb"] for r in records},
        "svd_numpy_seconds": {r["rows"]: r["numpy_seconds"] for r in records},
        "svd_max_subspace_error_vs_numpy": max(errors) if errors else None,
        "svd_max_singular_value_rel_error_vs_numpy": max(
            (r["sv_rel_error"] for r in records if r["sv_rel_error"] is not None), default=None
        ),
        "svd_rows": {r["rows"]: {"fit": r["fit_rows"], "numpy": r["numpy_rows"]} for r in records},
    }
    return {**figures, "checks": svd_checks(figures, records)}


def svd_checks(figures: dict, records: list[dict]) -> list[dict]:
    """The fit against numpy: subspace and singular values within float32 precision, on the same rows (every
    synthetic row is valid, so both read exactly N)."""
    checks = [check(f"svd_rows_{r['rows']}", r["fit_rows"], r["rows"], "rows fit-svd read = rows written", "==")
              for r in records]  # fmt: skip
    checks += [check(f"svd_numpy_rows_{r['rows']}", r["numpy_rows"], r["rows"], "rows in the numpy reference "
                     "(the valid rows) = rows written", "==") for r in records if r["numpy_rows"] is not None]  # fmt: skip
    if figures["svd_max_subspace_error_vs_numpy"] is not None:
        checks.append(check("svd_max_subspace_error_vs_numpy", figures["svd_max_subspace_error_vs_numpy"],
                            SUBSPACE_TOLERANCE, "sin of the largest angle, fit-svd's top-D_s basis vs "
                            "numpy.linalg.svd's on the valid rows"))  # fmt: skip
        checks.append(check("svd_max_singular_value_rel_error_vs_numpy",
                            figures["svd_max_singular_value_rel_error_vs_numpy"], SINGULAR_VALUE_TOLERANCE,
                            "top-D_s singular values, fit-svd vs numpy.linalg.svd"))  # fmt: skip
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    args = parser.parse_args()
    results = bench_svd(quick=args.quick)
    print(json.dumps(results, indent=1))
    sys.exit(exit_status(results))


if __name__ == "__main__":
    main()
