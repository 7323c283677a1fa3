"""Search batches from a feature cache: replayed views, the cached rows of several stage taps, labels; split by key.

    spec = SearchSpec(store="cache", shard_paths=paths, taps=("stage1", ..., "stage4"), resolution=64, seed=0)
    for batch in search_batches(spec, "train", epoch=0, batch_size=64):   # pipeline.process.search.Batch
        ...

The held-out split is a pure function of (seed, key): image ``key`` is held out when
``blake2b("<seed>\\x1fheld-out\\x1f<key>") / 2**64 < val_fraction`` (the public code holds out 20% of the training
images at random; a key hash makes the split independent of shard order, ranks and workers, and reproducible).
Each epoch reads one view per shard, chosen by stage 3's schedule (:func:`pipeline.student.pairs.scheduled_view`),
and joins samples to rows with the cache's one join (:func:`pipeline.cache.join.join_sample`). The held-out split
reads only its own samples, by the byte offsets the cache recorded (:func:`pipeline.cache.join.source_samples`).
Shards are read in the seeded per-epoch order and split over DataLoader workers; samples keep their (seeded) order
inside a shard.

Until stage 3's pair stream carries several taps at once (then this module can sit on top of it), this is the
adapter the search uses; its targets are the cached float16 rows. With ``taps=()`` it yields views and labels only
(online mode: the live teacher makes the targets on the device).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.cache.join import JoinError, SkippedAtCaching, join_sample, source_samples
from pipeline.cache.store import FeatureStore, open_store
from pipeline.data.shards import Sample, iter_samples
from pipeline.process.artefact import ProcessError
from pipeline.process.search import Batch
from pipeline.student.pairs import scheduled_view, shard_order, training_views

SPLITS = ("train", "val")
NO_LABEL = -1


def held_out(key: str, seed: int, fraction: float) -> bool:
    """Whether image ``key`` is in the held-out split (see the module docstring)."""
    digest = hashlib.blake2b(f"{seed}\x1fheld-out\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def sample_label(sample: Sample, where: str) -> int:
    """The integer class in the sample's ASCII ``cls`` field."""
    raw = sample.fields.get("cls")
    try:
        return int(raw.decode("ascii").strip())
    except (AttributeError, UnicodeDecodeError, ValueError):
        raise ProcessError(
            f"{where}: sample {sample.key!r} has no integer 'cls' label ({raw!r}) while the first sample has one; "
            "label every sample, or search without labels (--objective regress)"
        ) from None


def shards_have_labels(paths: tuple[str, ...]) -> bool:
    """Whether the first sample of the first shard has a ``cls`` field (every sample is checked when read)."""
    first = next(iter_samples(paths[0]), None)
    return first is not None and "cls" in first.fields


@dataclass(frozen=True)
class SearchSpec:
    """What the search reads."""

    store: str  # feature cache folder
    shard_paths: tuple[str, ...]  # source shards, in the cache's shard order
    taps: tuple[str, ...]  # cached taps to return per view (() = none: online teacher)
    resolution: int  # view side in pixels
    seed: int  # split, shard order and view schedule
    val_fraction: float = 0.2  # share of images held out
    labels: bool = False  # read the 'cls' label of every sample
    skip_bad: bool = False  # skip samples that do not join instead of stopping


@dataclass(frozen=True)
class SplitCounts:
    train: int  # images (valid cache rows) in the train split
    val: int  # images in the held-out split
    val_keys_sha256: str  # sha256 of the sorted held-out keys, one per line (identifies the split exactly)


def split_counts(store: FeatureStore, seed: int, fraction: float) -> SplitCounts:
    """Count both splits over the cache's valid rows (keys only: no features, no images)."""
    val_keys, n_train = [], 0
    for shard in range(len(store.layout.shards)):
        block = store.read_slot(shard, taps=[], views=[])
        for key, valid in zip(block.keys, block.valid, strict=True):
            if not valid:
                continue
            if held_out(key, seed, fraction):
                val_keys.append(key)
            else:
                n_train += 1
    digest = hashlib.sha256("".join(f"{k}\n" for k in sorted(val_keys)).encode()).hexdigest()
    return SplitCounts(n_train, len(val_keys), digest)


class SearchStream(IterableDataset):
    """Yields ``(view (3, r, r) float32, {tap: (D,) float16}, label or -1)`` of one split for one epoch."""

    def __init__(self, spec: SearchSpec, split: str, epoch: int) -> None:
        if split not in SPLITS:
            raise ProcessError(f"split {split!r}; use train or val")
        self.spec, self.split, self.epoch = spec, split, epoch

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        store = open_store(self.spec.store)
        first, stop = training_views(store)
        salt = 0 if self.split == "train" else 1_000_003  # the held-out stream walks its own shard order
        order = shard_order(self.spec.seed + salt, self.epoch, len(self.spec.shard_paths))
        for shard in order[wid::nw]:
            view = scheduled_view(self.spec.seed + salt, shard, self.epoch, first, stop)
            block = store.read_slot(shard, taps=list(self.spec.taps), views=[view])
            path = self.spec.shard_paths[shard]
            for sample in self._samples(store, shard, block, path):
                if held_out(sample.key, self.spec.seed, self.spec.val_fraction) != (self.split == "val"):
                    continue
                item = self._item(block, sample, path, view)
                if item is not None:
                    yield item

    def _samples(self, store: FeatureStore, shard: int, block, path: str) -> Iterator[Sample]:
        """The shard's samples of this split in tar order. A split holding under half of them (the held-out one)
        reads its cached rows by their recorded offsets, so only its own samples' bytes are read; the other split
        streams the whole shard (one sequential read, and it also finds samples the cache does not hold)."""
        share = self.spec.val_fraction if self.split == "val" else 1 - self.spec.val_fraction
        if share >= 0.5:
            return iter_samples(path)
        val = self.split == "val"
        rows = [r for r, (key, ok) in enumerate(zip(block.keys, block.valid, strict=True))
                if ok and held_out(key, self.spec.seed, self.spec.val_fraction) == val]  # fmt: skip
        return source_samples(store, shard, rows, path, block.keys)

    def _item(self, block, sample: Sample, path: str, view: int):
        try:
            joined = join_sample(block, sample, path, view, self.spec.resolution)
        except JoinError:
            if self.spec.skip_bad:
                return None
            raise
        if isinstance(joined, SkippedAtCaching):
            return None
        rows = {
            t: torch.from_numpy(np.ascontiguousarray(block.feature(t, joined.row, view)))
            for t in self.spec.taps
        }
        label = sample_label(sample, path) if self.spec.labels else NO_LABEL
        return joined.image, rows, label


def search_batches(
    spec: SearchSpec, split: str, epoch: int, batch_size: int, workers: int = 0
) -> Iterator[Batch]:
    """One epoch of one split as :class:`~pipeline.process.search.Batch` es (the last partial batch dropped)."""
    loader = DataLoader(SearchStream(spec, split, epoch), batch_size=batch_size, num_workers=workers,
                        drop_last=True, persistent_workers=False)  # fmt: skip
    for x, rows, labels in loader:
        yield Batch(x, dict(rows), labels if spec.labels else None)


def endless(spec: SearchSpec, split: str, batch_size: int, workers: int = 0) -> Iterator[Batch]:
    """Epoch after epoch of ``split`` (the held-out stream: one batch per search step, more steps than it has)."""
    epoch = 0
    while True:
        produced = False
        for batch in search_batches(spec, split, epoch, batch_size, workers):
            produced = True
            yield batch
        if not produced:
            raise ProcessError(
                f"the {split} split of {spec.store} has fewer than {batch_size} images; lower --batch-size or "
                "raise --val-fraction"
            )
        epoch += 1
