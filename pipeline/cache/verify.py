"""Recompute cached features from the store's metadata and the source shards, with torchvision alone.

For a seeded sample of (key, view) pairs: find the sample in its source shard, join it to its row with the cache's
one join (image hash and size, then the replay of the stored view parameters), run the teacher rebuilt from the
recorded architecture and weights (each teacher of a multi-teacher cache at its own input side), and compare with
the cached row: the cache is self-describing, and this command proves it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.join import JoinError, join_row, rebuild_teachers, source_shard_paths
from pipeline.cache.store import FeatureStore
from pipeline.data.images import image_bytes
from pipeline.data.shards import iter_samples
from pipeline.errors import KdepError
from pipeline.teachers import cache_tap

# Expected error of a cached value against a float32 recomputation, relative to the row's largest magnitude:
# float16 storage rounds at 2^-11 (~5e-4); bf16 / fp16 autocast on the GPU adds its own rounding.
DEFAULT_TOLERANCE = {"off": 2e-3, "fp16": 1e-2, "bf16": 5e-2}


class VerifyError(KdepError):
    """The cache cannot be checked (missing source shard or weights, changed image)."""


@dataclass
class VerifyReport:
    pairs: int
    max_abs_error: float
    max_rel_error: float  # max |cached - recomputed| / max |recomputed| over each row
    tolerance: float
    worst: str  # "key view tap" of the worst pair

    @property
    def ok(self) -> bool:
        return self.max_rel_error <= self.tolerance


def pick_pairs(store: FeatureStore, samples: int, seed: int) -> list[tuple[int, int, int]]:
    """Seeded (shard, row in shard, view) triples among valid cached rows."""
    rng = np.random.default_rng(seed)
    rows = store.layout.slot_rows
    valid = np.flatnonzero(store.valid())
    if valid.size == 0:
        raise VerifyError(f"{store.path}: no cached rows to verify; run `kdep cache-teacher` first")
    chosen = rng.choice(valid, size=min(samples, valid.size), replace=False)
    return sorted((int(r // rows), int(r % rows), int(rng.integers(store.layout.views))) for r in chosen)


def verify_store(
    store: FeatureStore, samples: int, seed: int = 0, tolerance: float | None = None, shards: str = ""
) -> VerifyReport:
    """Recompute ``samples`` random (key, view) features and compare them with the cache (``shards``: where the
    source shards are now, if they moved; default: the recorded source)."""
    teachers = rebuild_teachers(store)  # each with its label and input side
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE[store.provenance["compute"]["amp"]]
    paths = source_shard_paths(store, shards)
    worst, max_abs, max_rel = "", 0.0, 0.0
    pairs = pick_pairs(store, samples, seed)
    for shard in sorted({p[0] for p in pairs}):
        wanted = sorted({(row, view) for s, row, view in pairs if s == shard})
        block = store.read_slot(shard, taps=[], views=sorted({v for _, v in wanted}))  # rows, no features
        cached = {  # only the rows checked: (tap, row, view) -> cached feature
            (tap, row, view): feat
            for view in sorted({v for _, v in wanted})
            for tap in store.taps
            for row, feat in zip(
                [r for r, v in wanted if v == view],
                store.read_rows(shard, [r for r, v in wanted if v == view], view, tap),
                strict=True,
            )
        }
        images = _find_images(Path(paths[shard]), {block.keys[r] for r, _ in wanted})
        for (row, view), (teacher, taps) in itertools.product(wanted, teachers):
            key = block.keys[row]
            try:
                x = join_row(block, row, images[key], paths[shard], view, teacher["resolution"]).image[None]
            except JoinError:
                raise VerifyError(
                    f"{key}: image bytes differ from the cached image's hash; the source shard changed"
                ) from None
            with torch.inference_mode():
                out = taps(x)
            for plain, feats in out.items():
                tap = cache_tap(teacher["label"], plain, bool(teacher["label"]))
                ref = feats[0].double().numpy()
                err = np.abs(cached[(tap, row, view)].astype(np.float64) - ref)
                rel = float(err.max() / max(np.abs(ref).max(), 1e-12))
                if rel >= max_rel:
                    worst, max_rel = f"{key} view {view} {tap}", rel
                max_abs = max(max_abs, float(err.max()))
    return VerifyReport(len(pairs), max_abs, max_rel, tol, worst)


def _find_images(shard_path: Path, keys: set[str]) -> dict[str, bytes]:
    if not shard_path.is_file():
        raise VerifyError(
            f"source shard {shard_path} not found; verify needs the shards the cache was made from"
        )
    found = {s.key: image_bytes(s, str(shard_path)) for s in iter_samples(shard_path) if s.key in keys}
    missing = keys - set(found)
    if missing:
        raise VerifyError(
            f"{shard_path}: keys {sorted(missing)[:3]} are cached but not in the shard; it changed"
        )
    return found
