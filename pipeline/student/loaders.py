"""Stage 3's per-epoch DataLoader: the key-joined stream, or CoSS's neighbour-mined batches (``neighbours > 0``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import DataLoader

from pipeline.cache.store import FeatureStore
from pipeline.student.neighbours import (
    NeighbourBatchSampler,
    RandomAccessPairs,
    centre_view_rows,
    mine_neighbours,
)
from pipeline.student.pairs import PairStream, StreamSpec


@dataclass(frozen=True)
class LoaderSpec:
    """One rank's per-epoch loader, fully resolved (paths, input side, rank and world in ``stream``)."""

    stream: StreamSpec  # what is read and how views are picked; also the neighbour dataset's source
    batch_size: int  # samples per batch in stream order (neighbour batches: anchors x (1 + neighbours))
    workers: int  # DataLoader worker processes
    pin_memory: bool  # page-locked batches (for CUDA)
    neighbours: int = 0  # CoSS neighbour-mined batches: neighbours per anchor; 0 = the key-joined stream
    neighbour_pool: int = 31  # neighbours are drawn from each anchor's top-N cosine neighbours
    anchors: int = 16  # anchors per neighbour-mined batch


class PairLoaders:
    """Makes each epoch's loader over ``(views (B, 3, r, r) float32, cached rows (B, D_t) float16, ids (B, 3))``
    batches for this rank."""

    def __init__(self, spec: LoaderSpec, store: FeatureStore) -> None:
        self.spec, s = spec, spec.stream
        self.sampler: NeighbourBatchSampler | None = None
        if spec.neighbours > 0:
            rows, centre = centre_view_rows(store, s.tap)
            neighbours = mine_neighbours(centre, spec.neighbour_pool)
            self.dataset = RandomAccessPairs(
                s.store, s.shard_paths, rows, s.tap, s.resolution, s.seed, s.view_policy
            )
            self.sampler = NeighbourBatchSampler(
                neighbours, spec.anchors, spec.neighbours, s.seed, s.rank, s.world
            )
        else:
            self.dataset = PairStream(s)

    def for_epoch(self, epoch: int) -> DataLoader:
        """The loader for ``epoch`` (its shard order, view schedule and shuffle, or its neighbour batches)."""
        self.dataset.set_epoch(epoch)
        extra = {"prefetch_factor": 4} if self.spec.workers else {}
        common = {"num_workers": self.spec.workers, "pin_memory": self.spec.pin_memory, **extra}
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            return DataLoader(self.dataset, batch_sampler=self.sampler, **common)
        return DataLoader(self.dataset, batch_size=self.spec.batch_size, **common)
