"""`kdep bench` (make bench): the benchmark figures of all stages in one run; see benchmarks/bench.py.

make bench
make bench QUICK=1
kdep bench --device cuda
"""

from __future__ import annotations

import json

import typer

from stages.common import one_line_errors


@one_line_errors
def command(
    quick: bool = typer.Option(False, "--quick", help="Small sizes (under 5 minutes on 2 CPU cores)."),
    device: str = typer.Option("cpu", help="cpu or cuda (the GPU profile: ResNet-50/ResNet-18 at 224, AMP)."),
    out: str = typer.Option("benchmarks/results", help="Folder for <date>-<host>.json and .png."),
) -> None:
    """Run every benchmark side by side; write benchmarks/results/<date>-<host>.json and a PNG."""
    from benchmarks.bench import run_bench

    results = run_bench(device, quick, out)
    keys = (
        "cache_vs_inference",
        "bytes_per_view_over_2Dt",
        "decode_once_speedup",
        "student_cached_vs_plain",
        "cached_vs_online",
        "loader_vs_torchvision",
        "svd_seconds_per_million_rows",
        "svd_peak_rss_mb",
    )
    typer.echo(json.dumps({k: results.get(k) for k in keys}, indent=1, default=float))
    typer.echo(f"written: {results['written']}")
