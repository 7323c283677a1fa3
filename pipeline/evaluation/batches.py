"""Evaluation's input batches of centre (or seeded) views, decoded by DataLoader workers into pinned memory (CUDA).

    from pipeline.evaluation.batches import iter_view_batches
    for first, views, labels, keys in iter_view_batches(list_shards("out/demo/data/val"), 64, 64, workers=2):
        ...  # split rows first .. first + B - 1: (B, 3, 64, 64) float32, (B,) int64 numpy, B keys

Whole shards are split over the workers: worker ``w`` of ``W`` reads shards ``w, w + W, ...``, so each byte of the
split is read and parsed once whatever ``W`` (parallelism is min(workers, shards)). Batches never span two shards
and are cut at fixed positions inside each shard (0, B, 2B, ...); each carries the split row of its first sample
(split order: shards in list order, samples in tar order), so a caller puts the rows where they belong, whatever
order the workers deliver them in. The batches, hence the features, are the same bit for bit for any ``W``.
A shard whose sample count differs from its index is an error naming it (rows are never shifted into the next
shard's place).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from pipeline.data.images import decode_rgb, image_bytes
from pipeline.data.shards import Sample, ShardInfo, count_samples, iter_samples
from pipeline.data.views import replay_view, sample_view_params
from pipeline.evaluation.backbones import EvalError

Batch = tuple[int, torch.Tensor, torch.Tensor, list[str]]  # first split row, views, labels, keys


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
    return view_of(image_bytes(sample, where), sample.key, where, resolution, recipe, seed, view)


def view_of(
    data: bytes, key: str, where: str, resolution: int, recipe: str, seed: int, view: int
) -> torch.Tensor:
    """Encoded image bytes of sample ``key`` -> its view ``view`` of ``recipe``: (3, res, res) normalised float32."""
    image = decode_rgb(data, f"{where}:{key}")
    params = sample_view_params(recipe, seed, key, view, *image.shape[-2:])
    return replay_view(image, params, resolution)


def shard_rows(shards: list[ShardInfo]) -> list[int]:
    """Samples per shard: from the index, else counted from the tar headers."""
    return [s.samples if s.samples is not None else count_samples(s) for s in shards]


def _worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class ShardViewBatches(IterableDataset):
    """``(first split row, views (B, 3, res, res) float32, labels (B,) int64, keys)`` of view 0 of ``recipe``;
    this worker reads only its own shards (``s % workers == worker``)."""

    def __init__(
        self,
        shards: list[ShardInfo],
        rows: list[int],
        resolution: int,
        batch_size: int,
        recipe: str,
        seed: int,
    ):
        self.shards, self.rows, self.resolution, self.batch_size = shards, rows, resolution, batch_size
        self.recipe, self.seed = recipe, seed
        self.starts = (
            np.concatenate([[0], np.cumsum(rows)]).astype(int).tolist()
        )  # each shard's first split row

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker_slot()
        for s in range(worker, len(self.shards), workers):
            yield from self._shard_batches(s)

    def _shard_batches(self, s: int) -> Iterator[Batch]:
        info, expected = self.shards[s], self.rows[s]
        chunk: list[Sample] = []
        seen = 0
        for sample in iter_samples(info.path):
            seen += 1
            if seen > expected:
                raise _count_error(info, f"more than {expected}", expected)
            chunk.append(sample)
            if len(chunk) == self.batch_size:
                yield self._batch(info, self.starts[s] + seen - len(chunk), chunk)
                chunk = []
        if chunk:
            yield self._batch(info, self.starts[s] + seen - len(chunk), chunk)
        if seen != expected:
            raise _count_error(info, str(seen), expected)

    def _batch(self, info: ShardInfo, first: int, chunk: list[Sample]) -> Batch:
        views = [make_view(s, info.name, self.resolution, self.recipe, self.seed, 0) for s in chunk]
        labels = torch.tensor([sample_label(s, info.name) for s in chunk], dtype=torch.int64)
        return first, torch.stack(views), labels, [s.key for s in chunk]


def _count_error(info: ShardInfo, seen: str, expected: int) -> EvalError:
    return EvalError(
        f"{info.path}: {seen} samples but {expected} were listed for it; the shard is truncated or changed "
        "(re-make it, or its index.json)"
    )


def batch_loader(dataset: Dataset, workers: int, device: torch.device) -> DataLoader:
    """Items of ``dataset`` (each one whole batch), built by ``workers`` processes (0: this one), pinned for
    CUDA. A map-style dataset's items come in index order; an iterable one's in the workers' round-robin."""
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
    rows: list[int] | None = None,
) -> Iterator[tuple[int, torch.Tensor, np.ndarray, list[str]]]:
    """Batches ``(first split row, (B, 3, res, res) views, (B,) labels, B keys)`` of view index 0 of ``recipe``,
    each split row exactly once, in an order that depends on ``workers`` (the batches themselves do not).
    ``rows``: samples per shard (default: :func:`shard_rows`)."""
    rows = shard_rows(shards) if rows is None else rows
    dataset = ShardViewBatches(shards, rows, resolution, batch_size, recipe, seed)
    for first, views, labels, keys in batch_loader(dataset, workers, device or torch.device("cpu")):
        yield int(first), views, labels.numpy(), list(keys)
