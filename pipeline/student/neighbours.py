"""CoSS's neighbour-mined batches: anchors plus k nearest neighbours among cached teacher features.

Neighbours are mined once from the cached features of view 0 (of the first target's cache tap), which must be the
deterministic centre view (``cache-teacher --center-view``): cosine top-``pool`` per image, computed in chunks. Each epoch, anchors are
shuffled from (seed, epoch); each anchor brings ``per_anchor`` neighbours drawn from its top-``pool``; batches are
``anchors`` such groups (CoSS: 16 anchors x (1 + 15 drawn from the top 31)). Such batches need images by key in any
order, so this path reads samples by byte offset from the tars (:class:`RandomAccessPairs`) instead of streaming
them, and reads only the cached rows a batch needs: the features of those rows (the store's small inner chunks),
plus each touched shard's keys, hashes and sizes and the parameters of the epoch's view, kept in small per-worker
caches (a batch of 16 x 16 images touches most shards of a 10%-ImageNet cache). As in the stream, every image of a
shard shows the shard's scheduled view of the epoch.
"""

from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

from pipeline.cache.join import JoinError, join_row
from pipeline.cache.store import FeatureStore, ShardBlock, open_store
from pipeline.data.shards import IMAGE_EXTS, split_member_name
from pipeline.errors import KdepError
from pipeline.student.pairs import SharedEpoch, _stable_int, scheduled_view, training_views


class NeighbourError(KdepError):
    """Neighbour mining is not possible with this cache."""


def centre_view_rows(store: FeatureStore, tap: str) -> tuple[np.ndarray, np.ndarray]:
    """(global row ids of valid rows, their view-0 features (N, D) float32); view 0 must be the centre view."""
    if not store.provenance["views"].get("center_first"):
        raise NeighbourError(
            f"{store.path} has no centre view 0; re-cache with --center-view to mine neighbours"
        )
    valid = np.flatnonzero(store.valid())
    feats = store.feature_array(tap)[:, 0, :][valid].astype(np.float32)
    return valid, feats


def mine_neighbours(
    features: np.ndarray, pool: int, chunk: int = 2048, device: torch.device | str = "cpu"
) -> np.ndarray:
    """(N, D) -> (N, pool) indices of each row's most cosine-similar other rows, most similar first; the
    similarities (chunk x N at a time) are computed on ``device``."""
    n = features.shape[0]
    if pool >= n:
        raise NeighbourError(f"neighbour pool {pool} needs more than {n} images")
    x = torch.nn.functional.normalize(torch.from_numpy(features).float().to(device), dim=1)
    out = torch.empty((n, pool), dtype=torch.int64, device=x.device)
    for start in range(0, n, chunk):
        sims = x[start : start + chunk] @ x.T
        rows = torch.arange(sims.shape[0], device=x.device)
        sims[rows, rows + start] = -float("inf")  # not self
        out[start : start + chunk] = sims.topk(pool, dim=1).indices
    return out.cpu().numpy()


def mine_neighbours_once(features: np.ndarray, pool: int, device: torch.device) -> np.ndarray:
    """:func:`mine_neighbours` on rank 0 only (on ``device``: the GPU when training on CUDA), then broadcast to
    every rank (on ``device``, as NCCL needs), so all ranks batch from one identical table. (N, D) -> (N, pool)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mine_neighbours(features, pool, device=device)
    if pool >= features.shape[0]:  # the same check on every rank, so no rank waits for a failed one
        raise NeighbourError(f"neighbour pool {pool} needs more than {features.shape[0]} images")
    table = torch.empty((features.shape[0], pool), dtype=torch.int64, device=device)
    if dist.get_rank() == 0:
        table.copy_(torch.from_numpy(mine_neighbours(features, pool, device=device)))
    dist.broadcast(table, src=0)
    return table.cpu().numpy()


class NeighbourBatchSampler(Sampler[list[int]]):
    """Batches of ``anchors`` x (anchor + ``per_anchor`` neighbours), as indices into the valid rows; this rank's share."""

    def __init__(
        self, neighbours: np.ndarray, anchors: int, per_anchor: int, seed: int, rank: int = 0, world: int = 1
    ):
        self.nb, self.anchors, self.per_anchor, self.seed = neighbours, anchors, per_anchor, seed
        self.rank, self.world, self.epoch = rank, world, 0
        if per_anchor > neighbours.shape[1]:
            raise NeighbourError(
                f"{per_anchor} neighbours per anchor cannot be drawn from a pool of {neighbours.shape[1]}"
            )
        if len(self) == 0:
            raise NeighbourError(
                f"{neighbours.shape[0]} images make no batch of {anchors} anchors on {world} rank(s); "
                "lower --anchors or use more images"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng(_stable_int(self.seed, "anchors", self.epoch))
        order = rng.permutation(self.nb.shape[0])
        groups = [
            [int(a), *(int(v) for v in rng.choice(self.nb[a], self.per_anchor, replace=False))] for a in order
        ]
        usable = (
            len(groups) // (self.anchors * self.world) * self.anchors * self.world
        )  # equal steps on every rank
        batches = [sum(groups[i : i + self.anchors], []) for i in range(0, usable, self.anchors)]
        return batches[self.rank :: self.world]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return self.nb.shape[0] // (self.anchors * self.world)


def index_tar(path: str) -> dict[str, tuple[int, int]]:
    """key -> (byte offset, size) of each sample's image member, from the tar headers alone."""
    out = {}
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            key, ext = split_member_name(m.name)
            if m.isfile() and ext in IMAGE_EXTS:
                out[key] = (m.offset_data, m.size)
    return out


class RandomAccessPairs(Dataset):
    """Item ``i`` (an index into ``rows``, the valid global rows) -> the same triple as ``PairStream`` yields."""

    def __init__(
        self,
        store_path: str,
        shard_paths: tuple[str, ...],
        rows: np.ndarray,
        tap: str,
        resolution: int,
        seed: int,
        view_policy: str = "walk",
        cached_blocks: int = 256,
        uint8_views: bool = False,
        views_used: int = 0,
        taps: tuple[str, ...] = (),
        extra_resolutions: tuple[int, ...] = (),
    ) -> None:
        self.store_path, self.shard_paths, self.rows, self.tap = store_path, shard_paths, rows, tap
        self.extra_resolutions = (
            extra_resolutions  # also replay each view at these sides (an online teacher's)
        )
        self.taps = taps or (tap,)  # carried taps: rows concatenate them in this order (PairStream's rows)
        self.resolution, self.seed, self.view_policy = resolution, seed, view_policy
        self.cached_blocks, self.uint8_views, self.views_used = cached_blocks, uint8_views, views_used
        self._epoch = SharedEpoch()
        self._store: FeatureStore | None = None
        self._meta: OrderedDict[int, ShardBlock] = OrderedDict()  # shard -> keys, hashes, sizes, validity
        self._params: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()  # (shard, view) -> (n, P)
        self._offsets: dict[int, dict[str, tuple[int, int]]] = {}

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        """Also seen by persistent DataLoader workers (shared memory)."""
        self._epoch.value = epoch

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def store(self) -> FeatureStore:
        if self._store is None:
            self._store = open_store(self.store_path)
            self._views = training_views(self._store, self.views_used)
        return self._store

    def view_of(self, shard: int) -> int:
        """The shard's scheduled view this epoch (the stream's schedule)."""
        self.store  # noqa: B018 - opens the store and fixes the training views
        return scheduled_view(self.seed, shard, self.epoch, *self._views, self.view_policy)

    def _block(self, shard: int, view: int) -> ShardBlock:
        """The shard's keys, hashes, sizes and validity with the view's parameters (no features), from the caches."""
        meta = _cached(
            self._meta, shard, lambda: self.store.read_slot(shard, taps=[], views=[]), self.cached_blocks
        )
        params = _cached(self._params, (shard, view), lambda: self.store.read_view_params(shard, view),
                         self.cached_blocks)  # fmt: skip
        return replace(meta, params=params[:, None, :], views=(view,))

    def _locate(self, i: int) -> tuple[int, int]:
        shard, row = divmod(int(self.rows[i]), self.store.layout.slot_rows)
        return shard, row

    def __getitems__(self, indices: list[int]) -> list:
        """A whole batch: per touched shard one read of just the needed feature rows, in batch order."""
        located = [self._locate(i) for i in indices]
        by_shard: dict[int, list[int]] = {}
        for j, (shard, _) in enumerate(located):
            by_shard.setdefault(shard, []).append(j)
        out: list = [None] * len(indices)
        for shard, js in sorted(by_shard.items()):
            view = self.view_of(shard)
            feats = self._features(shard, [located[j][1] for j in js], view)
            for j, feat in zip(js, feats, strict=True):
                out[j] = self._item(shard, located[j][1], view, feat)
        return out

    def __getitem__(self, i: int):
        shard, row = self._locate(i)
        view = self.view_of(shard)
        return self._item(shard, row, view, self._features(shard, [row], view)[0])

    def _features(self, shard: int, rows: list[int], view: int) -> np.ndarray:
        """(len(rows), sum D_i) float16: one ``read_rows`` per carried tap, concatenated in tap order."""
        feats = [self.store.read_rows(shard, rows, view, tap) for tap in self.taps]
        return feats[0] if len(feats) == 1 else np.concatenate(feats, axis=1)

    def _item(self, shard: int, row: int, view: int, feat: np.ndarray):
        block, path = self._block(shard, view), self.shard_paths[shard]
        key = block.keys[row]
        if shard not in self._offsets:
            self._offsets[shard] = index_tar(path)
        if key not in self._offsets[shard]:
            raise NeighbourError(f"{path}: cached key {key!r} is not in the shard; it changed since caching")
        offset, size = self._offsets[shard][key]
        with open(path, "rb") as fh:
            data = os.pread(fh.fileno(), size, offset)
        try:
            x = join_row(block, row, data, path, view, self.resolution, self.uint8_views,
                         self.extra_resolutions).views  # fmt: skip
        except JoinError:
            raise NeighbourError(
                f"{path} key {key!r}: image differs from the cached one; re-run cache-teacher"
            ) from None
        return x, torch.from_numpy(np.ascontiguousarray(feat)), torch.tensor([shard, row, view])


def _cached(cache: OrderedDict, key: object, load, capacity: int):
    """``cache[key]``, loaded on a miss; least recently used entries beyond ``capacity`` are dropped."""
    if key not in cache:
        cache[key] = load()
        if len(cache) > capacity:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]
