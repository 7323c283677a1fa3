"""`kdep bench` (make bench): the benchmark figures of all stages in one run; see benchmarks/bench.py.

    make bench
    make bench QUICK=1
    kdep bench --device cuda

Writes ``OUT/<date>-<host>.json`` (the stable keys below plus every detail) and a PNG beside it.
"""

from __future__ import annotations

import json

import typer

from benchmarks.bench import run_bench
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
)


def run(config: BenchConfig) -> dict:
    return run_bench(config.device, config.quick, config.out)


def report(config: BenchConfig, results: dict) -> None:
    typer.echo(json.dumps({k: results.get(k) for k in SUMMARY_KEYS}, indent=1, default=float))
    typer.echo(f"written: {results['written']}")
