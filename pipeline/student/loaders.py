"""Stage 3's per-epoch DataLoader: the key-joined stream, or CoSS's neighbour-mined batches (``neighbours > 0``)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from pipeline.cache.store import FeatureStore
from pipeline.runtime import Dist
from pipeline.student.neighbours import (
    NeighbourBatchSampler,
    RandomAccessPairs,
    centre_view_rows,
    mine_neighbours,
)
from pipeline.student.pairs import PairStream, StreamSpec


class PairLoaders:
    """Makes each epoch's loader over (view, cached row, ids) triples for this rank."""

    def __init__(self, config, store: FeatureStore, shard_paths: tuple[str, ...], resolution: int, job: Dist,
                 device: torch.device) -> None:  # fmt: skip
        self.config, self.pin = config, device.type == "cuda"
        self.sampler: NeighbourBatchSampler | None = None
        if config.neighbours > 0:
            rows, centre = centre_view_rows(store, config.tap)
            neighbours = mine_neighbours(centre, config.neighbour_pool)
            self.dataset = RandomAccessPairs(str(store.path), shard_paths, rows, config.tap, resolution, config.seed,
                                             config.view_policy)  # fmt: skip
            self.sampler = NeighbourBatchSampler(neighbours, config.anchors, config.neighbours, config.seed,
                                                 job.rank, job.world)  # fmt: skip
        else:
            spec = StreamSpec(str(store.path), shard_paths, config.tap, resolution, config.seed, config.view_policy,
                              config.shuffle_buffer, config.skip_bad, job.rank, job.world)  # fmt: skip
            self.dataset = PairStream(spec)

    def for_epoch(self, epoch: int) -> DataLoader:
        self.dataset.set_epoch(epoch)
        extra = {"prefetch_factor": 4} if self.config.workers else {}
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            return DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=self.config.workers,
                              pin_memory=self.pin, **extra)  # fmt: skip
        return DataLoader(self.dataset, batch_size=self.config.batch_size, num_workers=self.config.workers,
                          pin_memory=self.pin, **extra)  # fmt: skip
