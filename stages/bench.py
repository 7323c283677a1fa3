"""`kdep bench` (make bench): the benchmark figures of all stages in one run; see benchmarks/bench.py.

    make bench
    make bench QUICK=1
    kdep bench --device cuda
    kdep bench --scale          # the ImageNet-shaped cache simulation (benchmarks/bench_scale.py, ~5 GB on disk)

Writes ``OUT/<date>-<host>.json`` (the stable keys below plus every detail) and a PNG beside it.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

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
    "teachers_one_pass_vs_separate",
    "teacher_views_per_s_in_pass",
)


def run(config: BenchConfig) -> dict:
    if config.scale:
        return run_scale_bench(config)
    return run_bench(config.device, config.quick, config.out)


def run_scale_bench(config: BenchConfig) -> dict:
    from benchmarks.bench_scale import run_scale

    results = run_scale(shards=config.scale_shards, root=config.scale_dir)
    out = Path(config.out) / f"{time.strftime('%Y-%m-%d')}-{socket.gethostname()}-scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    return {**results, "written": str(out)}


def report(config: BenchConfig, results: dict) -> None:
    if config.scale:
        typer.echo(json.dumps(results, indent=1, default=float))
        return
    typer.echo(json.dumps({k: results.get(k) for k in SUMMARY_KEYS}, indent=1, default=float))
    typer.echo(f"written: {results['written']}")
