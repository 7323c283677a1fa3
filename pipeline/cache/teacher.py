"""Running a frozen teacher on replayed views: device placement, autocast, and the stage 1 main loop."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.cache.store import FeatureStore
from pipeline.cache.workers import CacheError, ShardAssembly, ShardTask, ShardViews, SlotWriter, ViewSpec
from pipeline.data.views import normalize_views
from pipeline.models import FeatureTaps, Preprocessing
from pipeline.progress import progress_bar
from pipeline.runtime import AMP_DTYPES

PREFETCH = 4  # batches each DataLoader worker keeps ready


@dataclass(frozen=True)
class Runtime:
    """Where and how the teacher runs."""

    device: torch.device
    amp: str  # "off", "bf16" or "fp16" (resolved; autocast only on CUDA)
    channels_last: bool
    workers: int  # DataLoader worker processes
    skip_bad: bool
    progress: bool
    out_of_range: str = "error"  # features the stored dtype cannot hold: error or skip (see workers.py)


def prepare_teacher(
    model: nn.Module, taps: tuple[str, ...], rt: Runtime, prep: Preprocessing | None = None
) -> FeatureTaps:
    """Eval mode, no gradients, on the device (channels_last on CUDA when asked); the replayed (ImageNet-normalised)
    views are re-normalised with the teacher's own mean/std (``prep``; a no-op for ImageNet's)."""
    model = model.eval().requires_grad_(False).to(rt.device)
    if rt.channels_last and rt.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return FeatureTaps(model, taps, from_imagenet=prep).to(rt.device)


def teacher_features(taps: FeatureTaps, views: torch.Tensor, rt: Runtime) -> dict[str, np.ndarray]:
    """(N, 3, r, r) uint8 or normalised float32 views -> {tap: (N, D) float32 numpy}; uint8 is normalised on the
    device (bit-identical to the worker's normalisation)."""
    x = normalize_views(views.to(rt.device, non_blocking=True))
    if rt.channels_last and rt.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = (
        torch.autocast("cuda", dtype=AMP_DTYPES[rt.amp]) if rt.amp in AMP_DTYPES else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        out = taps(x)
    return {t: v.float().cpu().numpy() for t, v in out.items()}


@dataclass
class TeacherRun:
    """One teacher of a stage 1 pass: its prepared taps, the view side it reads and the stored name of each tap."""

    label: str  # "" for a single-teacher cache
    taps: FeatureTaps
    resolution: int
    names: dict[str, str]  # tap -> stored name (the tap itself, or LABEL/TAP with several teachers)
    seconds: float = (
        0.0  # time in this teacher's forwards (device work included: the features come back to host)
    )


def ensemble_features(teachers: list[TeacherRun], msg: dict, rt: Runtime) -> dict[str, np.ndarray]:
    """Every teacher on the batch's views at its resolution -> {stored tap name: (n*K, D) float32}."""
    out: dict[str, np.ndarray] = {}
    for t in teachers:
        views = msg["views"] if t.resolution not in msg.get("views_at", {}) else msg["views_at"][t.resolution]
        start = time.perf_counter()
        feats = teacher_features(t.taps, views, rt)
        t.seconds += time.perf_counter() - start
        out.update({t.names[tap]: f for tap, f in feats.items()})
    return out


def cache_shards(
    store: FeatureStore,
    tasks: list[ShardTask],
    teachers: list[TeacherRun],
    spec: ViewSpec,
    rt: Runtime,
) -> dict:
    """Cache every task's shard into its slot with every teacher; returns counts and timing (per teacher in
    ``teacher_seconds``)."""
    loader = DataLoader(
        ShardViews(tasks, spec, rt.skip_bad),
        batch_size=None,
        num_workers=rt.workers,
        pin_memory=rt.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=PREFETCH if rt.workers else None,
    )
    dims = store.layout.dims
    dtype = store.layout.dtype
    by_index = {t.index: t for t in tasks}
    assemblies: dict[int, ShardAssembly] = {}  # the shards in flight only (each made at its first message)
    writer = SlotWriter(store)
    total = sum(t.samples for t in tasks)
    bar = progress_bar(
        total=total, unit="img", desc="cache-teacher", disable=not rt.progress, mininterval=1.0
    )
    start, images, skipped = time.perf_counter(), 0, 0
    try:
        for msg in loader:
            if msg["kind"] == "error":
                raise CacheError(msg["message"])
            if msg["shard"] not in assemblies:
                assemblies[msg["shard"]] = ShardAssembly(
                    by_index[msg["shard"]], spec.views, dims, dtype, rt.out_of_range
                )
            assembly = assemblies[msg["shard"]]
            if msg["kind"] == "views":
                assembly.add(msg, ensemble_features(teachers, msg, rt))
                images += len(msg["keys"])
                bar.update(len(msg["keys"]))
            else:
                block = assembly.finish(msg)
                writer.submit(msg["shard"], block)
                images -= len(block.skipped) - len(msg["skipped"])  # skipped for their range
                skipped += len(block.skipped)
                bar.update(len(msg["skipped"]))
                del assemblies[msg["shard"]]
    finally:
        bar.close()
        writer.close()
    seconds = time.perf_counter() - start
    return {
        "images": images,
        "skipped": skipped,
        "shards": len(tasks),
        "seconds": seconds,
        "images_per_s": images / seconds if seconds > 0 else 0.0,
        "teacher_seconds": {t.label: t.seconds for t in teachers},
    }
