"""The benchmark's images: ImageNet-sized RGB JPEGs (375-500 px a side by default, ~65 KB each), made locally.

    from benchmarks.bench_data import BenchData, bench_shards
    train = bench_shards(BenchData(images=20_000, shards=16), "benchmarks/results/bench-data")

The pictures are the demo's ten painted classes (pipeline.demo.shards) at ImageNet's size, so that decoding and
cropping cost what they cost on real data (tiny images made every loader look free). Image ``j`` of a split is
class ``j % 10`` drawn from ``default_rng([seed, split, j])``: the same spec gives byte-identical shards. Shards are
written in parallel (one process per core) into ``<folder>/<spec tag>/`` and reused by later runs; that folder
holds a ``.gitignore`` of ``*`` so that it never shows up as untracked.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.shards import INDEX_NAME, write_index, write_shard
from pipeline.demo.shards import CLASS_NAMES, encode_image, paint_image

SPLITS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class BenchData:
    """What to generate."""

    images: int  # train images (val: one shard of ``val_images``)
    shards: int  # train shards (as equal as possible)
    min_side: int = 375  # smallest image side in pixels (ImageNet: most sides are 375-500)
    max_side: int = 500  # largest image side in pixels
    val_images: int = 20  # val images (the benchmark does not time them)
    seed: int = 11

    @property
    def tag(self) -> str:
        return f"{self.images}x{self.shards}-{self.min_side}-{self.max_side}px-seed{self.seed}"


def shard_ranges(images: int, shards: int) -> list[range]:
    """Image index ranges of ``shards`` near-equal shards (sizes differ by at most one)."""
    bounds = np.linspace(0, images, shards + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _write_one(args: tuple[BenchData, str, int, range, str]) -> dict:
    """Paint, encode and write one shard; returns its index record."""
    spec, split, number, indices, directory = args
    samples = []
    for j in indices:
        label = j % len(CLASS_NAMES)
        rng = np.random.default_rng([spec.seed, SPLITS[split], j])
        ext, data = encode_image(paint_image(rng, label, spec.min_side, spec.max_side), "rgb")
        samples.append((f"{split}_{CLASS_NAMES[label]}_{j:06d}", {ext: data, "cls": str(label).encode()}))
    return write_shard(Path(directory) / f"{split}-{number:06d}.tar", samples)


def write_bench_data(spec: BenchData, out: Path, processes: int | None = None) -> None:
    """Write ``out/train`` and ``out/val`` (with their index.json), shards painted in parallel."""
    jobs = []
    for split, images, shards in (("train", spec.images, spec.shards), ("val", spec.val_images, 1)):
        (out / split).mkdir(parents=True, exist_ok=True)
        jobs += [(spec, split, i, r, str(out / split)) for i, r in enumerate(shard_ranges(images, shards))]
    processes = max(1, min(processes or os.cpu_count() or 1, len(jobs)))
    if processes == 1:
        records = [_write_one(job) for job in jobs]
    else:
        with ProcessPoolExecutor(processes) as pool:
            records = list(pool.map(_write_one, jobs))
    for split in SPLITS:
        mine = [rec for job, rec in zip(jobs, records, strict=True) if job[1] == split]
        write_index(out / split, mine, list(CLASS_NAMES), split=split, source="kdep bench", seed=spec.seed)


def bench_shards(spec: BenchData, folder: str | Path) -> Path:
    """The train shard folder for ``spec`` under ``folder``: reused when a previous run finished it, else made
    (into a temporary sibling, renamed when complete, so an interrupted run is never reused)."""
    folder = Path(folder)
    done = folder / spec.tag
    if (done / "train" / INDEX_NAME).is_file() and (done / "val" / INDEX_NAME).is_file():
        return done / "train"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".gitignore").write_text("*\n")
    partial = folder / f"{spec.tag}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    write_bench_data(spec, partial)
    shutil.rmtree(done, ignore_errors=True)
    partial.rename(done)
    return done / "train"
