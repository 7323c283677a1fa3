"""Stage 3's DataLoader: the key-joined stream, or CoSS's neighbour-mined batches (``neighbours > 0``).

One DataLoader serves the whole run (``persistent_workers`` when there are workers; the epoch reaches them through
shared memory). Views travel as uint8 where that is exact (4x less /dev/shm and pinned memory than float32) and
are normalised on the device by :func:`pipeline.student.training.views_on_device`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from pipeline.cache.store import FeatureStore
from pipeline.data.views import stack_views
from pipeline.errors import KdepError
from pipeline.student.neighbours import NeighbourBatchSampler, RandomAccessPairs, neighbour_table
from pipeline.student.pairs import PairStream, StreamSpec

SHM_SYMPTOMS = ("No space left on device", "Bus error", "shared memory", "shm")


class LoaderError(KdepError):
    """The DataLoader cannot deliver batches (e.g. out of shared memory); the message says what to change."""


@dataclass(frozen=True)
class LoaderSpec:
    """One rank's loader, fully resolved (paths, input side, rank and world in ``stream``)."""

    stream: StreamSpec  # what is read and how views are picked; also the neighbour dataset's source
    batch_size: int  # samples per batch in stream order (neighbour batches: anchors x (1 + neighbours))
    workers: int  # DataLoader worker processes
    pin_memory: bool  # page-locked batches (for CUDA)
    neighbours: int = 0  # CoSS neighbour-mined batches: neighbours per anchor; 0 = the key-joined stream
    neighbour_pool: int = 31  # neighbours are drawn from each anchor's top-N cosine neighbours
    anchors: int = 16  # anchors per neighbour-mined batch
    prefetch_factor: int = 4  # batches each worker keeps ready
    mine_device: str = "cpu"  # where each rank mines its share of CoSS's neighbours (the training device)
    quiet: bool = True  # no progress bar while reading the centre view and mining (rank 0 shows it otherwise)


def collate_pairs(
    batch: list[tuple],
) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """[(view, row, ids)] -> (views (B, 3, r, r) uint8, or float32 normalised if any view is not exactly uint8 (a
    tuple of such, one per side, when each view comes at several sides); rows (B, D_t) float16, or (B, sum D_i)
    with several carried taps; ids (B, 3) int64)."""
    views, rows, ids = zip(*batch, strict=True)
    if isinstance(views[0], tuple):
        stacked = tuple(stack_views(list(side)) for side in zip(*views, strict=True))
        return stacked, torch.stack(rows), torch.stack(ids)
    return stack_views(list(views)), torch.stack(rows), torch.stack(ids)


class PairLoaders:
    """Makes each epoch's loader over ``(views (B, 3, r, r) uint8 or float32, cached rows (B, D_t) float16,
    ids (B, 3))`` batches for this rank."""

    def __init__(self, spec: LoaderSpec, store: FeatureStore) -> None:
        self.spec, s = spec, spec.stream
        self.sampler: NeighbourBatchSampler | None = None
        self._loader: DataLoader | None = None
        if spec.neighbours > 0:
            rows, neighbours = neighbour_table(
                store, s.tap, spec.neighbour_pool, torch.device(spec.mine_device), spec.quiet
            )
            self.dataset = RandomAccessPairs(s.store, s.shard_paths, rows, s.tap, s.resolution, s.seed,
                                             s.view_policy, uint8_views=s.uint8_views,
                                             views_used=s.views_used, taps=s.carried,
                                             extra_resolutions=s.extra_resolutions)  # fmt: skip
            self.sampler = NeighbourBatchSampler(
                neighbours, spec.anchors, spec.neighbours, s.seed, s.rank, s.world
            )
        else:
            self.dataset = PairStream(s)

    def for_epoch(self, epoch: int) -> DataLoader:
        """The loader for ``epoch`` (its shard order, view schedule and shuffle, or its neighbour batches); the same
        DataLoader every epoch, so persistent workers stay up."""
        self.dataset.set_epoch(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        if self._loader is None:
            self._loader = self._make()
        return self._loader

    def _make(self) -> DataLoader:
        s = self.spec
        extra = {"prefetch_factor": s.prefetch_factor, "persistent_workers": True} if s.workers else {}
        common = {"num_workers": s.workers, "pin_memory": s.pin_memory, "collate_fn": collate_pairs, **extra}
        if self.sampler is not None:
            return DataLoader(self.dataset, batch_sampler=self.sampler, **common)
        return DataLoader(self.dataset, batch_size=s.batch_size, **common)


def batches(loader: DataLoader, spec: LoaderSpec) -> Iterator:
    """Iterate ``loader``; running out of shared memory becomes one line that says what to change."""
    try:
        yield from loader
    except RuntimeError as err:
        text = str(err)
        if not any(sym.lower() in text.lower() for sym in SHM_SYMPTOMS):
            raise
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        raise LoaderError(
            f"the DataLoader ran out of shared memory ({first}) with {spec.workers} workers x prefetch_factor "
            f"{spec.prefetch_factor} batches of {spec.batch_size}; raise /dev/shm (docker run --shm-size=16g) "
            "or lower --workers / --prefetch-factor"
        ) from None
