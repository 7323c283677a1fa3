"""`make bench` / `kdep bench`: every benchmark figure of the three stages, side by side in one run.

    make bench                 # full CPU profile
    make bench QUICK=1         # under 5 minutes on 2 CPU cores
    kdep bench --device cuda   # GPU profile: same ratios plus absolute images/s (ResNet-50 caching and ResNet-18
                               # training at 224, AMP bf16 + channels_last)

Each ratio compares two runs made in this process on the same inputs, one after the other. Writes
``benchmarks/results/<date>-<host>.json`` (stable keys, see RESULT_KEYS) and a PNG of the ratios.
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

from benchmarks.bench_stages import (
    bench_cache_vs_inference,
    bench_decode_once,
    bench_loader_vs_torchvision,
    bench_student_steps,
    make_bench_data,
)

RESULT_KEYS = (
    "cache_vs_inference", "bytes_per_view_over_2Dt", "student_cached_vs_plain", "cached_vs_online",
    "loader_vs_torchvision", "svd_seconds_per_million_rows", "svd_peak_rss_mb", "machine",
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


def profile_for(device: str, quick: bool) -> Profile:
    if device.startswith("cuda"):
        return Profile(
            device,
            "resnet50",
            "resnet18",
            224,
            10,
            2000 if not quick else 500,
            256,
            60 if not quick else 20,
            (50_000, 200_000, 800_000) if not quick else (5_000, 20_000),
            2048 if not quick else 256,
        )
    if quick:
        return Profile(device, "resnet50", "resnet18", 64, 4, 160, 32, 6, (5_000, 20_000), 256)
    return Profile(device, "resnet50", "resnet18", 112, 8, 400, 64, 12, (50_000, 200_000, 800_000), 2048)


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
    }
    with tempfile.TemporaryDirectory(prefix="kdep-bench-") as tmp:
        data = make_bench_data(Path(tmp), prof.images)
        results.update(bench_cache_vs_inference(data, Path(tmp), prof))
        results.update(bench_decode_once(data, prof))
        results.update(bench_student_steps(Path(tmp) / "cache.zarr", Path(tmp), prof))
        results.update(bench_loader_vs_torchvision(data, Path(tmp), prof))
    svd = bench_svd(rows=prof.svd_rows, dim=prof.svd_dim, quick=quick)
    results.update(svd)
    missing = [k for k in RESULT_KEYS if k not in results]
    if missing:
        raise RuntimeError(f"benchmark result lacks {missing}")
    out = Path(out_dir)
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
             "bytes_per_view_over_2Dt", "decode_once_speedup"]  # fmt: skip
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
