"""Neighbour batches' samples by row, in any order: :class:`RandomAccessPairs`, what the stream yields, by index.

A batch of anchors and their neighbours touches most shards of a large cache, so nothing here is kept per touched
shard in a bounded cache (one that thrashes once the shards outnumber it). Instead each DataLoader worker holds,
for every image (N rows):

- the per-row metadata, read once, in runs of slots: keys (bytes, as wide as the longest key), image hashes (16 B),
  decoded sizes (8 B), and the sample's byte offset in its tar (8 B) when the cache records it. ImageNet-1k
  (1.28M images, keys of ~15 B): ~60 MB per worker;
- the view parameters of this epoch's view of each shard (every image of a shard shows the shard's scheduled view
  of the epoch, as in the stream), read once per shard and epoch and dropped when the epoch changes: N x 20 float32,
  ~100 MB per worker at ImageNet-1k.

A batch's features are read in one store call per (view, tap) for all its rows (zarr fetches their inner chunks
concurrently): only the chunks holding them, whatever shards they are in. Images are read by their tar offset
(:func:`images_at`: the sample's headers and its image, nothing else of the shard): the one the cache records, or,
for a cache made before offsets were recorded, the one found by scanning the headers of each tar a worker touches
(:func:`index_tar`), once per worker and shard, kept as one int64 per row (~10 MB at ImageNet-1k; the key -> offset
map of a shard is dropped once its rows' offsets are noted).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.cache.join import JoinError, join_row
from pipeline.cache.store import OFFSETS, FeatureStore, ShardBlock, open_store
from pipeline.data.images import image_bytes
from pipeline.data.random_access import iter_samples_at
from pipeline.data.shards import scan_samples
from pipeline.student.mining import NeighbourError
from pipeline.student.pairs import SharedEpoch, scheduled_view, training_views

RUN_SLOTS = 64  # slots of per-row metadata read per store call


@dataclass(frozen=True)
class RowMeta:
    """What the join checks and where the image is, for rows ``rows`` (index i = position in ``rows``)."""

    keys: np.ndarray  # (N,) bytes S<L>, UTF-8 (L = the longest key)
    hashes: np.ndarray  # (N, 16) uint8 blake2b-128 of the encoded image
    hw: np.ndarray  # (N, 2) int32 decoded height, width
    offsets: (
        np.ndarray | None
    )  # (N,) int64 first tar header of the sample (-1: not recorded); None: no such array

    @property
    def nbytes(self) -> int:
        arrays = (self.keys, self.hashes, self.hw) + ((self.offsets,) if self.offsets is not None else ())
        return sum(a.nbytes for a in arrays)


def load_row_meta(store: FeatureStore, rows: np.ndarray, run: int = RUN_SLOTS) -> RowMeta:
    """:class:`RowMeta` of global ``rows`` (any order), read in runs of ``run`` adjacent slots (one call per array
    and run: zarr reads a run's chunks concurrently)."""
    r, slots = store.layout.slot_rows, len(store.layout.shards)
    order = np.argsort(rows, kind="stable")
    ordered = np.asarray(rows, np.int64)[order]
    offsets = store.array(OFFSETS) if store.has_offsets else None
    keys, hashes, hw = [], np.empty((len(rows), 16), np.uint8), np.empty((len(rows), 2), np.int32)
    offs = np.full(len(rows), -1, np.int64) if offsets is not None else None
    for s in range(0, slots, run):
        span = slice(s * r, min(s + run, slots) * r)
        a, b = np.searchsorted(ordered, [span.start, span.stop])
        if a == b:
            continue
        local, at = ordered[a:b] - span.start, order[a:b]
        keys.append(_compact_keys(store.array("keys")[span][local]))
        hashes[at] = store.array("image_hash")[span][local]
        hw[at] = store.array("image_hw")[span][local]
        if offs is not None:
            offs[at] = offsets[span][local]
    joined = np.concatenate(keys) if keys else np.zeros(0, "S1")
    out = np.empty_like(joined)
    out[order] = joined
    return RowMeta(out, hashes, hw, offs)


def _compact_keys(raw: np.ndarray) -> np.ndarray:
    """(n, width) uint8 NUL-padded keys -> (n,) bytes as wide as the longest of them."""
    used = np.flatnonzero(raw.any(axis=0))
    width = int(used[-1]) + 1 if len(used) else 1
    return np.ascontiguousarray(raw[:, :width]).view(f"S{width}").ravel()


def images_at(path: str, wanted: list[tuple[int, str]]) -> list[bytes]:
    """The encoded images of the samples ``(offset, key)`` of shard ``path`` (offset: the sample's first tar header),
    in the order asked, opening the shard once and reading each sample's headers and members only
    (:func:`pipeline.data.random_access.iter_samples_at`: a sample not at its offset is a ShardError naming the
    shard, the key and the offset)."""
    return [image_bytes(sample, path) for sample in iter_samples_at(path, wanted)]


def index_tar(path: str) -> dict[str, int]:
    """key -> byte offset of the sample's first tar header, from the headers alone (no member's data is read);
    for caches made before offsets were recorded."""
    return dict(scan_samples(path))


class RandomAccessPairs(Dataset):
    """Item ``i`` (an index into ``rows``, global cache rows) -> the same triple as ``PairStream`` yields."""

    def __init__(
        self,
        store_path: str,
        shard_paths: tuple[str, ...],
        rows: np.ndarray,
        tap: str,
        resolution: int,
        seed: int,
        view_policy: str = "walk",
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
        self.uint8_views, self.views_used = uint8_views, views_used
        self._epoch = SharedEpoch()
        self._store: FeatureStore | None = None  # the rest is per process, loaded on first use
        self._meta: RowMeta | None = None
        self._plan: tuple[int, np.ndarray, dict[int, np.ndarray]] | None = (
            None  # epoch, views, shard -> params
        )
        self._found: np.ndarray | None = None  # (N,) int64 offsets found by scanning (caches without them)
        self._scanned: set[int] = set()  # shards whose rows' offsets are in _found

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

    @property
    def meta(self) -> RowMeta:
        if self._meta is None:
            self._meta = load_row_meta(self.store, self.rows)
        return self._meta

    def shard_views(self) -> np.ndarray:
        """(S,) each shard's scheduled view this epoch (the stream's schedule), computed once per epoch."""
        return self._epoch_plan()[1]

    def view_params(self, shard: int) -> np.ndarray:
        """(n, P) float32 parameters of ``shard``'s view this epoch, for all its rows: read once per epoch."""
        _, views, params = self._epoch_plan()
        if shard not in params:
            params[shard] = self.store.read_view_params(shard, int(views[shard]))
        return params[shard]

    def _epoch_plan(self) -> tuple[int, np.ndarray, dict[int, np.ndarray]]:
        epoch = self.epoch
        if self._plan is None or self._plan[0] != epoch:
            shards = range(len(self.store.layout.shards))
            views = np.array(
                [scheduled_view(self.seed, s, epoch, *self._views, self.view_policy) for s in shards]
            )
            self._plan = (epoch, views, {})  # last epoch's parameters are dropped
        return self._plan

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list:
        """A whole batch: its features in one read per (view, tap), its images one shard file open each."""
        idx = np.asarray(indices, np.int64)
        shard, row = np.divmod(self.rows[idx], self.store.layout.slot_rows)
        views = self.shard_views()[shard]
        feats = self.features(self.rows[idx], views)
        images = self._images(idx, shard)
        return [self._item(int(i), int(s), int(r), int(v), data, f)
                for i, s, r, v, data, f in zip(idx, shard, row, views, images, feats, strict=True)]  # fmt: skip

    def features(self, global_rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        """(B, sum D_i) in the cache's dtype (float16): the rows at their views, carried taps concatenated in tap
        order."""
        store = self.store
        width = sum(store.layout.dims[t] for t in self.taps)
        out = np.empty((len(global_rows), width), np.dtype(store.layout.dtype))
        for view in np.unique(views):
            at = np.flatnonzero(views == view)
            parts = [store.read_rows_at(global_rows[at], int(view), tap) for tap in self.taps]
            out[at] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        return out

    def _images(self, idx: np.ndarray, shard: np.ndarray) -> list[bytes]:
        """Encoded images of items ``idx`` (in shards ``shard``), in batch order."""
        out: list = [None] * len(idx)
        for s in np.unique(shard):
            at = np.flatnonzero(shard == s)
            path, keys = self.shard_paths[s], [self.meta.keys[idx[j]].decode() for j in at]
            got = images_at(path, list(zip(self._offsets(int(s), idx[at]).tolist(), keys, strict=True)))
            for j, data in zip(at, got, strict=True):
                out[j] = data
        return out

    def _offsets(self, shard: int, items: np.ndarray) -> np.ndarray:
        """Tar offsets of items ``items`` (all in ``shard``): recorded by the cache, else found by scanning the
        shard's headers once (:meth:`_scan`)."""
        recorded = self.meta.offsets
        if recorded is not None and (recorded[items] >= 0).all():
            return recorded[items]
        if shard not in self._scanned:
            self._scan(shard)
        return self._found[items]

    def _scan(self, shard: int) -> None:
        """Note the tar offset of every item of ``shard`` (from its headers); a cached key the tar lacks is an error."""
        if self._found is None:
            self._found = np.full(len(self.rows), -1, np.int64)
            self._by_row = np.argsort(self.rows, kind="stable")  # items in row order: a shard's are a run
        order = self._by_row
        r = self.store.layout.slot_rows
        a, b = np.searchsorted(self.rows[order], [shard * r, (shard + 1) * r])
        items = order[a:b]
        path, where = self.shard_paths[shard], index_tar(self.shard_paths[shard])
        for i in items.tolist():
            key = self.meta.keys[i].decode()
            if key not in where:
                raise NeighbourError(
                    f"{path}: cached key {key!r} is not in the shard; it changed since caching"
                )
            self._found[i] = where[key]
        self._scanned.add(shard)

    def _item(self, i: int, shard: int, row: int, view: int, data: bytes, feat: np.ndarray):
        meta, path = self.meta, self.shard_paths[shard]
        block = ShardBlock(keys=[meta.keys[i].decode()], features={}, params=self.view_params(shard)[row][None, None],
                           hw=meta.hw[i : i + 1], hashes=meta.hashes[i : i + 1], valid=np.ones(1, bool),
                           cache=self.store_path, views=(view,))  # fmt: skip
        try:
            x = join_row(
                block, 0, data, path, view, self.resolution, self.uint8_views, self.extra_resolutions
            ).views
        except JoinError:
            raise NeighbourError(
                f"{path} key {block.keys[0]!r}: image differs from the cached one; re-run cache-teacher"
            ) from None
        return x, torch.from_numpy(np.ascontiguousarray(feat)), torch.tensor([shard, row, view])
