"""Fine-tuning's training batches, read from the shards by byte range: no copy of the encoded images in memory.

    index = index_samples(list_shards("out/demo/data/train"))     # one header scan per shard
    epochs = EpochBatches(index, epochs=3, batch_size=64, resolution=64, recipe="paper", seed=0)
    epoch, views, labels = epochs[0]                               # (3, 64, 64) views of epoch 0's first batch

:func:`index_samples` reads each shard's tar headers and ``cls`` labels only (``iter_samples(fields=("cls",))``)
and keeps, per sample, its shard, the byte range of its image member, its label and its key: about 40 bytes per
image (ImageNet-1k train: ~50 MB), in numpy arrays that DataLoader workers share without copying. An epoch's order
is one seeded permutation of all samples (``default_rng([seed, epoch])``), drawn once per epoch in each process;
a batch reads its images by byte range (one ``pread`` each), so each image is read once per epoch. Item ``i`` is
a fixed batch of a fixed epoch, so the batches do not depend on the number of DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.images import image_bytes
from pipeline.data.shards import IMAGE_EXTS, Sample, ShardInfo, iter_samples
from pipeline.evaluation.backbones import EvalError
from pipeline.evaluation.batches import sample_label, view_of
from pipeline.progress import progress_bar


@dataclass(frozen=True)
class SampleIndex:
    """Where each labelled sample of a split is, in split order (shards in list order, samples in tar order)."""

    shards: tuple[ShardInfo, ...]
    shard: np.ndarray  # (N,) int32 position of the sample's shard in ``shards``
    start: np.ndarray  # (N,) int64 byte offset of its image member's data in the shard file
    size: np.ndarray  # (N,) int64 byte size of the image member
    label: np.ndarray  # (N,) int64 class index
    key: np.ndarray  # (N,) bytes (numpy "S"): sample keys, ASCII/UTF-8

    def __len__(self) -> int:
        return len(self.label)

    def read_image(self, i: int) -> tuple[bytes, str, str]:
        """(encoded image bytes, key, shard name) of sample ``i``, read by byte range."""
        info, key = self.shards[int(self.shard[i])], self.key[i].decode()
        start, size = int(self.start[i]), int(self.size[i])
        with open(info.path, "rb", buffering=0) as fh:
            fh.seek(start)
            data = fh.read(size)
        if len(data) != size:
            raise EvalError(f"{info.path}: sample {key!r} is cut short; the shard changed during fine-tuning")
        return data, key, info.name


def index_samples(shards: list[ShardInfo]) -> SampleIndex:
    """Every sample's shard, image byte range, label and key, from the tar headers and ``cls`` members only; a
    shard whose count differs from its index, or a sample without image or label, is an error naming it."""
    rows: list[tuple[int, int, int, int, bytes]] = []
    for s, info in enumerate(progress_bar(shards, desc="index train", unit="shard", leave=False)):
        count = 0
        for sample in iter_samples(info.path, fields=("cls",)):
            start, size = image_span(sample, info.name)
            rows.append((s, start, size, sample_label(sample, info.name), sample.key.encode()))
            count += 1
        if info.samples is not None and count != info.samples:
            raise EvalError(
                f"{info.path}: {count} samples but its index lists {info.samples}; the shard is truncated or "
                "changed (re-make it, or its index.json)"
            )
    if not rows:
        raise EvalError(f"the train split has no samples ({len(shards)} shards); check --train")
    shard, start, size, label, key = zip(*rows, strict=True)
    return SampleIndex(
        tuple(shards), np.array(shard, np.int32), np.array(start, np.int64), np.array(size, np.int64),
        np.array(label, np.int64), np.array(key, dtype=bytes),
    )  # fmt: skip


def image_span(sample: Sample, where: str) -> tuple[int, int]:
    """(data offset, size) of the sample's image member: the first of IMAGE_EXTS it has, as ``image_bytes``
    picks it (whose error names a sample without one)."""
    ext = next((e for e in IMAGE_EXTS if e in sample.spans), None)
    if ext is None:
        image_bytes(Sample(sample.key, dict.fromkeys(sample.spans, b"")), where)  # raises, naming the fields
    return sample.spans[ext]


class EpochBatches(Dataset):
    """Fine-tuning batches of every epoch: item ``(epoch, b)`` -> (epoch, views (B, 3, res, res), labels (B,)),
    the epoch's seeded permutation cut into batches, views of ``recipe`` with view index = epoch."""

    def __init__(
        self, index: SampleIndex, epochs: int, batch_size: int, resolution: int, recipe: str, seed: int
    ) -> None:
        self.samples, self.batch_size, self.resolution, self.recipe, self.seed = (
            index, batch_size, resolution, recipe, seed,
        )  # fmt: skip
        n = len(index)
        starts = [s for s in range(0, n, batch_size) if n - s >= 2]  # BatchNorm needs 2 images
        self.per_epoch = len(starts)  # batches in every epoch
        self.index = [(e, s) for e in range(epochs) for s in starts]
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its permutation), drawn once per process

    def __len__(self) -> int:
        return len(self.index)

    def order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s permutation of the samples (drawn on the first batch of the epoch, then reused)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.samples)))
        return self._order[1]

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        epoch, start = self.index[i]
        chosen = self.order(epoch)[start : start + self.batch_size]
        views = []
        for j in chosen:
            data, key, where = self.samples.read_image(j)
            views.append(view_of(data, key, where, self.resolution, self.recipe, self.seed, epoch))
        return epoch, torch.stack(views), torch.as_tensor(self.samples.label[chosen])
