"""`make bench` / `kdep bench`: every benchmark figure of the three stages, side by side in one run.

    make bench                 # full CPU profile
    make bench QUICK=1         # about 2 minutes on 2 CPU cores
    kdep bench --device cuda   # GPU profile: same ratios plus absolute images/s (ResNet-50 caching and ResNet-18
                               # training at 224, AMP bf16 + channels_last, 20k images)

The images are ImageNet-sized JPEGs (375-500 px, benchmarks/bench_data.py), made once into
``benchmarks/results/bench-data/`` and reused. The student figures time stage 3's own loaders and ``train_step``
over one epoch's batches; a profile whose epoch is too short for them is refused up front (KdepError).

Each ratio compares two runs made in this process on the same inputs, one after the other. Each agreement figure (SVD
vs numpy, cached vs online teacher rows) is checked against its tolerance where it is measured (benchmarks/checks.py).
Writes ``benchmarks/results/<date>-<host>.json`` (stable keys, see RESULT_KEYS; ``checks`` lists every check) and a
PNG of the ratios; `kdep bench` then exits 1 if a check failed.
"""

from __future__ import annotations

import json
import platform
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_data import bench_shards, shard_ranges
from benchmarks.bench_stages import (
    bench_cache_vs_inference,
    bench_data_spec,
    bench_decode_once,
    bench_loader_vs_torchvision,
    bench_student_steps,
    bench_teachers,
    check_student_epoch,
)
from benchmarks.checks import add_part

RESULT_KEYS = (
    "cache_vs_inference", "bytes_per_view_over_2Dt", "student_cached_vs_plain", "cached_vs_online",
    "loader_vs_torchvision", "svd_seconds_per_million_rows", "svd_peak_rss_mb", "machine",
    "teachers_one_pass_vs_separate", "cached_vs_online_target_max_rel_error", "checks",
)  # fmt: skip


@dataclass(frozen=True)
class Profile:
    """Sizes of one benchmark run."""

    device: str
    teacher: str
    student: str
    resolution: int
    views: int
    images: int  # demo images used (train split)
    batch: int
    steps: int  # timed student steps per variant
    svd_rows: tuple[int, ...]
    svd_dim: int
    workers: int = -1  # DataLoader workers for caching and stage 3 (-1: 8 on CUDA, 2 on CPU)
    min_side: int = 375  # generated JPEGs' smallest side in pixels (ImageNet-like: 375-500)
    max_side: int = 500  # generated JPEGs' largest side in pixels
    loader_images: int = 1000  # images (whole shards) in the one-core loader comparison


def profile_for(device: str, quick: bool) -> Profile:
    """Sizes per device; ``images`` is large enough that one stage 3 epoch holds the warm-up and timed steps."""
    if device.startswith("cuda"):
        if quick:
            return Profile(device, "resnet50", "resnet18", 224, 10, 6_000, 256, 20, (5_000, 20_000), 256)
        return Profile(
            device, "resnet50", "resnet18", 224, 10, 20_000, 256, 60, (50_000, 200_000, 800_000), 2048
        )
    if quick:
        return Profile(device, "resnet50", "resnet18", 64, 4, 320, 32, 6, (5_000, 20_000), 256)
    return Profile(device, "resnet50", "resnet18", 112, 8, 800, 64, 10, (50_000, 200_000, 800_000), 2048)


def machine() -> dict:
    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": torch.get_num_threads(), "torch": torch.__version__}  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_bench(
    device: str = "cpu",
    quick: bool = False,
    out_dir: str | Path = "benchmarks/results",
    profile: Profile | None = None,
) -> dict:
    """Run every benchmark; write the JSON and PNG; return the results. ``profile`` overrides the sizes (tests)."""
    from benchmarks.bench_svd import bench_svd

    prof = profile or profile_for(device, quick)
    results: dict = {
        "profile": prof.__dict__ | {"svd_rows": list(prof.svd_rows)},
        "machine": machine(),
        "quick": quick,
        "checks": [],
    }
    out = Path(out_dir)
    spec = bench_data_spec(prof)
    check_student_epoch(prof, [len(r) for r in shard_ranges(spec.images, spec.shards)])  # before any work
    data = bench_shards(spec, out / "bench-data")  # made once, reused by later runs
    with tempfile.TemporaryDirectory(prefix="kdep-bench-") as tmp:
        add_part(results, bench_cache_vs_inference(data, Path(tmp), prof))
        add_part(results, bench_decode_once(data, prof))
        add_part(results, bench_teachers(data, Path(tmp), prof))
        add_part(results, bench_student_steps(Path(tmp) / "cache", Path(tmp), prof))
        add_part(results, bench_loader_vs_torchvision(data, Path(tmp), prof))
    add_part(results, bench_svd(rows=prof.svd_rows, dim=prof.svd_dim, quick=quick))
    missing = [k for k in RESULT_KEYS if k not in results]
    if missing:
        raise RuntimeError(f"benchmark result lacks {missing}")
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y-%m-%d')}-{socket.gethostname()}{'-quick' if quick else ''}{'-cuda' if device != 'cpu' else ''}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    plot_ratios(results, out / f"{stem}.png")
    results["written"] = str(out / f"{stem}.json")
    return results


def plot_ratios(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["cache_vs_inference", "student_cached_vs_plain", "cached_vs_online", "loader_vs_torchvision",
             "bytes_per_view_over_2Dt", "decode_once_speedup", "teachers_one_pass_vs_separate"]  # fmt: skip
    targets = {"cache_vs_inference": 0.95, "student_cached_vs_plain": 0.95, "loader_vs_torchvision": 1.0,
               "bytes_per_view_over_2Dt": 1.0}  # fmt: skip
    values = [float(results.get(n, np.nan)) for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh(names, values, color="#4878a8")
    for i, n in enumerate(names):
        if n in targets:
            ax.plot([targets[n]] * 2, [i - 0.4, i + 0.4], color="#c44", lw=2)
        ax.text(values[i], i, f" {values[i]:.2f}", va="center")
    ax.set_xlabel("ratio (red: target; bytes_per_view_over_2Dt: at most 1)")
    ax.set_title(
        f"kdep bench ({results['machine'].get('gpu', 'CPU')}, {'quick' if results['quick'] else 'full'})"
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
