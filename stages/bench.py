"""`kdep bench` (make bench): the benchmark figures of all stages in one run; see benchmarks/bench.py.

    make bench
    make bench QUICK=1
    kdep bench --device cuda
    kdep bench --scale                      # ImageNet-scale benches, each in a fresh process (benchmarks/scale_suite.py)
    kdep bench --scale --scale-only cache   # just the cache simulation (benchmarks/bench_scale.py, ~5 GB on disk)

Writes ``OUT/<date>-<host>.json`` (the stable keys below plus every detail, and ``checks``: every agreement figure
against its tolerance) and a PNG beside it; ``--scale`` writes ``OUT/<date>-<host>-scale.json``. Exits 1 after
writing when an agreement check failed (each failure is also a FAIL line on stderr).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import typer

from benchmarks.bench import run_bench
from benchmarks.checks import exit_status
from stages.config import BenchConfig

SUMMARY_KEYS = (
    "cache_vs_inference",
    "bytes_per_view_over_2Dt",
    "decode_once_speedup",
    "student_cached_vs_plain",
    "cached_vs_online",
    "student_images_per_s",
    "student_loader_images_per_s",
    "loader_vs_torchvision",
    "svd_seconds_per_million_rows",
    "svd_peak_rss_mb",
    "svd_max_subspace_error_vs_numpy",
    "cached_vs_online_target_max_rel_error",
    "teachers_one_pass_vs_separate",
    "teacher_views_per_s_in_pass",
)


def run(config: BenchConfig) -> dict:
    if config.scale:
        return run_scale_bench(config)
    return run_bench(config.device, config.quick, config.out)


def run_scale_bench(config: BenchConfig) -> dict:
    from benchmarks.scale_suite import ScaleOptions, run_scale_suite

    options = ScaleOptions(config.quick, config.scale_shards, config.scale_dir)
    results = run_scale_suite(options, config.scale_only)
    stem = f"{time.strftime('%Y-%m-%d')}-{socket.gethostname()}-scale{'-quick' if config.quick else ''}"
    out = Path(config.out) / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    return {**results, "written": str(out)}


def report(config: BenchConfig, results: dict) -> None:
    """The summary (or the merged scale results), where the JSON is; exit 1 when an agreement check failed."""
    shown = results if config.scale else {k: results.get(k) for k in SUMMARY_KEYS}
    typer.echo(json.dumps(shown, indent=1, default=float))
    typer.echo(f"written: {results['written']}")
    status = exit_status(results)  # repeats each FAIL line, then how many failed
    if status:
        raise typer.Exit(status)
    typer.echo(f"agreement checks: all {len(results.get('checks', []))} within tolerance", err=True)
