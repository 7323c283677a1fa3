"""How many files and folders (inodes) a cache of layout ``kdep-cache/2`` uses, from its layout alone.

Zarr v3 stores chunk (i, j, ...) of an array at ``<array>/c/i/j/...``: one folder per index but the last, one file
per stored chunk, plus the array's ``zarr.json``. With ``S`` done shards, ``K`` views and ``T`` taps
(``pipeline.cache.store.create_store`` fixes the chunking):

    features/<tap>   (S*R, K, D)  one Zarr shard per (shard, view)  -> c/i/v/0:  2 + 1 + S + S*K folders + S*K files
    view_params      (S*R, K, P)  one chunk per (shard, view)       -> c/i/v/0:  the same
    image_hw, image_hash, keys  (S*R, n)  one chunk per shard       -> c/i/0:    2 + 1 + S folders, S files each
    valid, member_offset  (S*R,)   one chunk per shard              -> c/i:      2 + 1 folders, S files each
    groups           store.zarr/ and features/ (and features/<label>/ per teacher label): a folder + zarr.json
    beside the store the cache folder, markers/ and one marker per done shard

    entries = 21 + 2 L + 9 S + (T + 1)(2 S K + S + 3)      (L: teacher labels of a multi-teacher cache, else 0)
    files   =  7 +   L + 6 S + (T + 1)(S K + 1)

plus the stage's own 3 files beside the store (``writer.lock``, ``runs.jsonl``, ``config.cache_teacher.json``). These
are upper bounds: Zarr does not store a chunk that holds only the fill value (zeros: e.g. every row of an empty shard).
ImageNet-1k (S = 1282, K = 10): 65,409 entries at T = 1, 173,109 at T = 5; `kdep inspect` reports the count.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP_ENTRIES = 2  # a group's folder and its zarr.json
PER_SHARD_ARRAYS = 3  # image_hw, image_hash, keys: 2-D, one chunk per shard
FLAT_ARRAYS = 2  # valid, member_offset: 1-D, one chunk per shard
ROOT_ENTRIES = 2  # the cache folder and markers/


@dataclass(frozen=True)
class Inodes:
    """Entries (folders + files) and files of a cache."""

    entries: int
    files: int


def view_major_array(shards: int, views: int) -> Inodes:
    """An (S*R, K, ...) array with one chunk (or Zarr shard) per (shard, view): c/i/v/0."""
    folders = 1 + 1 + shards + shards * views  # the array, c/, c/i/, c/i/v/
    files = 1 + shards * views  # zarr.json, c/i/v/0
    return Inodes(folders + files, files)


def per_shard_array(shards: int, dims: int) -> Inodes:
    """An (S*R,) (dims 1) or (S*R, n) (dims 2) array with one chunk per shard: c/i or c/i/0."""
    folders = 1 + 1 + (shards if dims == 2 else 0)
    files = 1 + shards
    return Inodes(folders + files, files)


def cache_inodes(shards: int, views: int, taps: list[str]) -> Inodes:
    """Entries and files of a cache folder with ``shards`` done shards, ``views`` views and ``taps`` (names as in
    the layout: ``TAP`` or ``LABEL/TAP``), stage 1's bookkeeping files (lock, runs log, config) left out."""
    labels = {t.split("/", 1)[0] for t in taps if "/" in t}
    arrays = [view_major_array(shards, views) for _ in range(len(taps) + 1)]  # features/*, view_params
    arrays += [per_shard_array(shards, 2) for _ in range(PER_SHARD_ARRAYS)]
    arrays += [per_shard_array(shards, 1) for _ in range(FLAT_ARRAYS)]
    groups = GROUP_ENTRIES * (2 + len(labels))  # store.zarr, features, features/<label>
    markers = shards
    entries = ROOT_ENTRIES + groups + markers + sum(a.entries for a in arrays)
    files = groups // GROUP_ENTRIES + markers + sum(a.files for a in arrays)
    return Inodes(entries, files)
