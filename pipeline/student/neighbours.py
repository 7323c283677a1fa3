"""CoSS's neighbour-mined batches: anchors plus k nearest neighbours among cached teacher features.

Neighbours are mined once from the cached features of view 0 (of the first target's cache tap), which must be the
deterministic centre view (``cache-teacher --center-view``): cosine top-``pool`` per image, block by block on the
training device (:mod:`pipeline.student.mining`). Rank r of W reads and mines only its contiguous share of the N
images, ``[N r / W, N (r + 1) / W)``, reading one slot per store call in the cache's dtype (each image is read once
over all ranks), and every rank ends with the whole (N, pool) int32 table (:func:`neighbour_table`). Each epoch, anchors are shuffled from
(seed, epoch); each anchor brings ``per_anchor`` neighbours drawn from its top-``pool``; batches are ``anchors`` such
groups (CoSS: 16 anchors x (1 + 15 drawn from the top 31)), each rank building only its own
(:class:`NeighbourBatchSampler`). Such batches need images by key in any order, so this path reads samples by byte
offset from the tars and only the cached rows a batch needs (:class:`~pipeline.student.neighbour_pairs.
RandomAccessPairs`). As in the stream, every image of a shard shows the shard's scheduled view of the epoch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler

from pipeline.cache.store import FeatureStore
from pipeline.progress import progress_bar
from pipeline.student.mining import Blocks, NeighbourError, check_pool, mine_shared, share_bounds, world_of
from pipeline.student.neighbour_pairs import RandomAccessPairs, index_tar
from pipeline.student.pairs import _stable_int

__all__ = [
    "NeighbourBatchSampler",
    "NeighbourError",
    "RandomAccessPairs",
    "centre_view_rows",
    "index_tar",
    "mine_neighbours",
    "mine_neighbours_once",
    "neighbour_table",
    "read_centre_share",
    "valid_rows",
]


def valid_rows(store: FeatureStore) -> np.ndarray:
    """(N,) int64 global row ids of the valid rows, ascending: the images, indexed 0..N-1 everywhere."""
    return np.flatnonzero(store.valid())


def read_centre_share(store: FeatureStore, tap: str, rows: np.ndarray, quiet: bool = True) -> np.ndarray:
    """(len(rows), D) view-0 features of global ``rows`` (ascending) in the cache's dtype: one store call per slot,
    reading only the inner chunks that hold those rows. View 0 must be the centre view; non-finite features
    (float16 overflow at caching) are refused, naming the shard."""
    if not store.provenance["views"].get("center_first"):
        raise NeighbourError(
            f"{store.path} has no centre view 0; re-cache with --center-view to mine neighbours"
        )
    array, r = store.feature_array(tap), store.layout.slot_rows
    out = np.empty((len(rows), store.layout.dims[tap]), array.dtype)
    shards = rows // r
    starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]]) if len(rows) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(rows)]
    for a, b in progress_bar(list(zip(starts, ends, strict=True)), desc="read centre view", unit="shard",
                             disable=quiet, leave=False):  # fmt: skip
        first, last = int(rows[a]), int(rows[b - 1])
        got = array[first : last + 1, 0, :]  # one call: the inner chunks of this slot's rows only
        out[a:b] = got[rows[a:b] - first]
        if not np.isfinite(out[a:b]).all():
            name = store.layout.shards[int(shards[a])]["name"]
            raise NeighbourError(
                f"{store.path}: the centre-view features of shard {name} hold inf or NaN (float16 overflow?); "
                "re-cache with --dtype float32 to mine neighbours"
            )
    return out


def neighbour_table(
    store: FeatureStore, tap: str, pool: int, device: torch.device, quiet: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(rows (N,) int64 valid global rows, table (N, pool) int32 indices into ``rows``, most similar first). Under
    torch.distributed every rank calls it: each reads and mines its share, and all get the same table."""
    rows = valid_rows(store)
    rank, world = world_of()
    check_pool(pool, len(rows))
    lo, hi = share_bounds(len(rows), rank, world)
    share = read_centre_share(store, tap, rows[lo:hi], quiet or rank != 0)
    return rows, mine_shared(share, len(rows), pool, device, quiet=quiet or rank != 0)


def centre_view_rows(store: FeatureStore, tap: str) -> tuple[np.ndarray, np.ndarray]:
    """(global row ids of valid rows, their view-0 features (N, D) in the cache's dtype), read slot by slot; view 0
    must be the centre view. Mining reads only each rank's share (:func:`neighbour_table`)."""
    rows = valid_rows(store)
    return rows, read_centre_share(store, tap, rows)


def mine_neighbours(
    features: np.ndarray,
    pool: int,
    chunk: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    margin: int | None = None,
    stats: dict | None = None,
) -> np.ndarray:
    """(N, D) -> (N, pool) int32 indices of each row's most cosine-similar other rows, most similar first (float32
    scores, ties to the lower row), mined in this process alone; tiles of ``chunk`` x ``chunk`` (0: the device's
    default) on ``device``, scored in ``dtype`` (see :func:`pipeline.student.mining.mine_shared`)."""
    check_pool(pool, features.shape[0])
    blocks = Blocks(chunk, chunk) if chunk else None
    extra = {} if margin is None else {"margin": margin}
    return mine_shared(
        features, features.shape[0], pool, device, dtype, blocks, stats=stats, ranks=(0, 1), **extra
    )


def mine_neighbours_once(features: np.ndarray, pool: int, device: torch.device | str) -> np.ndarray:
    """:func:`mine_neighbours` under torch.distributed: each rank mines the queries of its share of the rows (only
    rows ``share_bounds(N, rank, world)`` of ``features`` are read on a rank) and every rank gets the whole, identical
    table. (N, D) -> (N, pool) int32."""
    n = features.shape[0]
    check_pool(pool, n)  # the same check on every rank, so no rank waits for a failed one
    lo, hi = share_bounds(n, *world_of())
    return mine_shared(features[lo:hi], n, pool, device)


class NeighbourBatchSampler(Sampler[list[int]]):
    """Batches of ``anchors`` x (anchor + ``per_anchor`` neighbours), as indices into the valid rows; this rank's share.

    Epoch e: the anchors are a permutation of all N rows drawn from (seed, e), the same on every rank; global batch b
    holds anchors ``[b * anchors, (b + 1) * anchors)`` of it, and rank r takes batches b = r, r + W, r + 2W, ...
    (disjoint anchors over ranks; every rank the same number of steps, N // (anchors * W); the remainder of the
    permutation waits for another epoch). Each anchor's neighbours are a uniformly drawn ordered subset of
    ``per_anchor`` of its top-``pool`` (no repeats; the anchor is never its own neighbour), drawn from
    (seed, e, rank). Only this rank's groups are built, with array operations (no per-anchor Python loop)."""

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

    def anchors_of_epoch(self) -> np.ndarray:
        """(len(self), anchors) this rank's anchors of the epoch, batch by batch."""
        n, per_step = self.nb.shape[0], self.anchors * self.world
        order = np.random.default_rng(_stable_int(self.seed, "anchors", self.epoch)).permutation(n)
        return order[: len(self) * per_step].reshape(len(self), self.world, self.anchors)[:, self.rank]

    def batches(self) -> np.ndarray:
        """(len(self), anchors * (1 + per_anchor)) int64: each batch's groups, anchor first, then its neighbours."""
        anchors = self.anchors_of_epoch().reshape(-1)
        rng = np.random.default_rng(_stable_int(self.seed, "neighbours", self.epoch, self.rank))
        pool = self.nb.shape[1]
        slots = np.broadcast_to(
            np.arange(pool, dtype=np.int16 if pool < 2**15 else np.int64), (len(anchors), pool)
        )
        picks = rng.permuted(slots, axis=1)[:, : self.per_anchor]  # a uniform ordered subset of each pool
        friends = np.take_along_axis(self.nb[anchors], picks.astype(np.int64), axis=1)
        groups = np.concatenate([anchors[:, None], friends], axis=1).astype(np.int64)
        return groups.reshape(len(self), -1)

    def __iter__(self):
        return (batch.tolist() for batch in self.batches())

    def __len__(self) -> int:
        return self.nb.shape[0] // (self.anchors * self.world)
