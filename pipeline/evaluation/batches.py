"""Evaluation's input batches, decoded by DataLoader workers into pinned memory (on CUDA), in a fixed order.

    from pipeline.evaluation.batches import iter_view_batches
    for views, labels, keys in iter_view_batches(list_shards("out/demo/data/val"), 64, 64, workers=2):
        ...  # (B, 3, 64, 64) float32, (B,) int64 numpy, B keys

The batches are the same with any number of workers (same samples, same order, same views), so features are
bit-identical to an in-process run: over shards, worker ``w`` of ``n`` builds batches ``w, w + n, ...`` (every
worker reads the shards' bytes, which is cheap next to decoding, and decodes only its own batches) and the
DataLoader's round-robin returns them in batch order; fine-tuning batches are a map-style dataset indexed by
(epoch, batch) read in order by one DataLoader for the whole run.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from pipeline.data.images import decode_rgb, image_bytes
from pipeline.data.shards import Sample, ShardInfo, iter_samples
from pipeline.data.views import replay_view, sample_view_params
from pipeline.evaluation.backbones import EvalError

Labelled = tuple[Sample, str, int]  # a sample, the name of its shard and its class


def sample_label(sample: Sample, where: str) -> int:
    """The integer class of a sample from its ASCII ``cls`` field."""
    raw = sample.fields.get("cls")
    try:
        return int(raw.decode("ascii").strip())
    except (AttributeError, UnicodeDecodeError, ValueError):
        raise EvalError(
            f"{where}: sample {sample.key!r} has no integer 'cls' label ({raw!r}); evaluation needs labelled "
            "shards (kdep make-shards --from-folder)"
        ) from None


def make_view(sample: Sample, where: str, resolution: int, recipe: str, seed: int, view: int) -> torch.Tensor:
    """Decode one sample and replay its view ``view`` of ``recipe``: (3, res, res) normalised float32."""
    image = decode_rgb(image_bytes(sample, where), f"{where}:{sample.key}")
    params = sample_view_params(recipe, seed, sample.key, view, *image.shape[-2:])
    return replay_view(image, params, resolution)


def _worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class ShardViewBatches(IterableDataset):
    """``(views (B, 3, res, res) float32, labels (B,) int64, keys)`` over ``shards`` in shard order, view 0 of
    ``recipe``; this worker yields only its own batches (``b % workers == worker``)."""

    def __init__(self, shards: list[ShardInfo], resolution: int, batch_size: int, recipe: str, seed: int):
        self.shards, self.resolution, self.batch_size = shards, resolution, batch_size
        self.recipe, self.seed = recipe, seed

    def _chunks(self) -> Iterator[list[tuple[Sample, str]]]:
        chunk: list[tuple[Sample, str]] = []
        for info in self.shards:
            for sample in iter_samples(info.path):
                chunk.append((sample, info.name))
                if len(chunk) == self.batch_size:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        worker, workers = _worker_slot()
        for b, chunk in enumerate(self._chunks()):
            if b % workers == worker:
                views = [
                    make_view(s, where, self.resolution, self.recipe, self.seed, 0) for s, where in chunk
                ]
                labels = torch.tensor([sample_label(s, where) for s, where in chunk], dtype=torch.int64)
                yield torch.stack(views), labels, [s.key for s, _ in chunk]


class EpochBatches(Dataset):
    """Fine-tuning batches of every epoch: item ``(epoch, b)`` -> (epoch, views (B, 3, res, res), labels (B,)),
    the epoch's seeded permutation cut into batches, views of ``recipe`` with view index = epoch."""

    def __init__(
        self, data: list[Labelled], epochs: int, batch_size: int, resolution: int, recipe: str, seed: int
    ):
        self.data, self.batch_size, self.resolution, self.recipe, self.seed = (
            data,
            batch_size,
            resolution,
            recipe,
            seed,
        )
        starts = [
            s for s in range(0, len(data), batch_size) if len(data) - s >= 2
        ]  # BatchNorm needs 2 images
        self.per_epoch = len(starts)  # batches in every epoch
        self.index = [(e, s) for e in range(epochs) for s in starts]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        epoch, start = self.index[i]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
        chunk = [self.data[j] for j in order[start : start + self.batch_size]]
        views = [make_view(s, where, self.resolution, self.recipe, self.seed, epoch) for s, where, _ in chunk]
        return epoch, torch.stack(views), torch.tensor([y for _, _, y in chunk])


def batch_loader(dataset: Dataset, workers: int, device: torch.device) -> DataLoader:
    """Items of ``dataset`` (each one whole batch) in order, built by ``workers`` processes (0: this one), pinned
    for CUDA."""
    extra = {"prefetch_factor": 2} if workers else {}
    return DataLoader(
        dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda", **extra
    )


def iter_view_batches(
    shards: list[ShardInfo],
    resolution: int,
    batch_size: int,
    recipe: str = "center",
    seed: int = 0,
    workers: int = 0,
    device: torch.device | None = None,
) -> Iterator[tuple[torch.Tensor, np.ndarray, list[str]]]:
    """Batches of (B, 3, res, res) views, (B,) labels and keys, in shard order (view index 0 of ``recipe``);
    the same batches for any ``workers``."""
    dataset = ShardViewBatches(shards, resolution, batch_size, recipe, seed)
    for views, labels, keys in batch_loader(dataset, workers, device or torch.device("cpu")):
        yield views, labels.numpy(), list(keys)
