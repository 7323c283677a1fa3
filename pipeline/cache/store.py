"""The feature cache: a Zarr v3 group with one fixed slot of rows per input shard.

Layout (declared in full before the teacher runs; ``S`` input shards, ``R`` rows per slot = the largest shard's
sample count rounded up to whole chunks, ``K`` views, ``P`` view-parameter columns)::

    cache.zarr/
      zarr.json                 attributes["kdep"]: provenance + layout (teacher, weights, taps, preprocessing,
                                recipe, K, seed, source shards with counts/bytes/sha256, library versions)
      features/<tap>            float16 (or float32) [S*R, K, D]   chunks (C, K, D), C divides R
      view_params               float32 [S*R, K, P]                the stored parameters of every view
      image_hw                  int32   [S*R, 2]                    decoded image height, width
      image_hash                uint8   [S*R, 16]                   blake2b-128 of the encoded image bytes
      keys                      str     [S*R]                       sample keys ("" for padding rows)
      valid                     bool    [S*R]                       False for padding and skipped rows
      markers/<shard>.json      done marker, written (atomically) only after the shard's chunks are fsynced
      writer.lock               held by the running job (flock); other jobs are refused

Shard ``i`` owns rows ``[i*R, (i+1)*R)``: whole chunks, so no two writers ever touch the same chunk (zarr loses
data silently otherwise, PITFALLS.md), a shard is written in one call per array, and stage 3 reads one shard's
block in one read per array. Padding rows are zeros and ``valid`` is False there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.data.params import N_PARAMS
from pipeline.errors import KdepError
from pipeline.files import write_json_atomic

LAYOUT_VERSION = "kdep-cache/1"
MAX_CHUNK_BYTES = 64 << 20  # split a slot into several chunks above this size
HASH_BYTES = 16


class StoreError(KdepError):
    """The cache is missing, incomplete, or was built from other data or another teacher."""


@dataclass(frozen=True)
class CacheLayout:
    """Shapes of the store, fixed when it is created."""

    shards: list[dict]  # source shard records: name, samples, nbytes, sha256
    views: int  # K
    dims: dict[str, int]  # tap -> D
    dtype: str = "float16"  # feature dtype
    slot_rows: int = 0  # R (derived when 0)
    chunk_rows: int = 0  # C (derived when 0)

    def __post_init__(self) -> None:
        if not self.shards or max(s["samples"] for s in self.shards) == 0:
            raise StoreError(
                "no samples in the input shards; check the shard list (an empty index or empty tars)"
            )
        if self.slot_rows == 0:
            largest = max(s["samples"] for s in self.shards)
            row_bytes = self.views * max(self.dims.values()) * np.dtype(self.dtype).itemsize
            pieces = max(1, math.ceil(largest * row_bytes / MAX_CHUNK_BYTES))
            chunk = math.ceil(largest / pieces)
            object.__setattr__(self, "chunk_rows", chunk)
            object.__setattr__(self, "slot_rows", chunk * pieces)

    @property
    def rows(self) -> int:
        return len(self.shards) * self.slot_rows

    def slot(self, shard_index: int) -> slice:
        return slice(shard_index * self.slot_rows, (shard_index + 1) * self.slot_rows)


@dataclass
class ShardBlock:
    """All cached rows of one input shard (n = its sample count), in shard order."""

    keys: list[str]
    features: dict[str, np.ndarray]  # tap -> (n, K, D)
    params: np.ndarray  # (n, K, P) float32
    hw: np.ndarray  # (n, 2) int32
    hashes: np.ndarray  # (n, 16) uint8
    valid: np.ndarray  # (n,) bool
    skipped: list[dict] = field(default_factory=list)  # [{"key", "reason"}]
    cache: str = ""  # path of the cache it was read from (join errors name it)
    _rows: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    def row_of(self) -> dict[str, int]:
        """key -> row in the block, built once (the join looks up every streamed sample by key)."""
        if self._rows is None:
            self._rows = {k: i for i, k in enumerate(self.keys)}
        return self._rows


def _codec() -> list:
    return [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")]  # zstd 1: the measured sweet spot


def create_store(path: str | Path, layout: CacheLayout, provenance: dict) -> None:
    """Create the group and every array with its final shape and chunking, and record the metadata."""
    if (Path(path) / "zarr.json").exists():
        raise StoreError(f"{path} already holds a Zarr group; resume it or choose another --out")
    group = zarr.open_group(str(path), mode="a")  # "a": the folder may already hold the writer lock
    n, k, c = layout.rows, layout.views, layout.chunk_rows
    for tap, d in layout.dims.items():
        group.create_array(
            f"features/{tap}",
            shape=(n, k, d),
            chunks=(c, k, d),
            dtype=layout.dtype,
            compressors=_codec(),
            fill_value=0,
        )
    group.create_array(
        "view_params",
        shape=(n, k, N_PARAMS),
        chunks=(c, k, N_PARAMS),
        dtype="float32",
        compressors=_codec(),
        fill_value=0,
    )
    group.create_array("image_hw", shape=(n, 2), chunks=(c, 2), dtype="int32", fill_value=0)
    group.create_array(
        "image_hash", shape=(n, HASH_BYTES), chunks=(c, HASH_BYTES), dtype="uint8", fill_value=0
    )
    group.create_array("keys", shape=(n,), chunks=(c,), dtype=str)
    group.create_array("valid", shape=(n,), chunks=(c,), dtype="bool", fill_value=False)
    meta = {"layout_version": LAYOUT_VERSION, "layout": asdict(layout), "provenance": provenance}
    group.attrs["kdep"] = json.loads(json.dumps(meta))
    (Path(path) / "markers").mkdir(exist_ok=True)


class FeatureStore:
    """A cache opened for reading (``mode="r"``) or for writing slots (``mode="r+"``)."""

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise StoreError(
                f"no feature cache at {self.path}; run `kdep cache-teacher` (make cache-teacher) first"
            )
        self.group = zarr.open_group(str(self.path), mode=mode)
        meta = self.group.attrs.asdict().get("kdep")
        if not meta or meta.get("layout_version") != LAYOUT_VERSION:
            raise StoreError(
                f"{self.path} is a Zarr group but not a kdep feature cache (layout {LAYOUT_VERSION})"
            )
        self.meta = meta
        self.layout = CacheLayout(**meta["layout"])
        self.provenance = meta["provenance"]
        self._arrays: dict[str, zarr.Array] = {}  # opened once: each open reads its zarr.json

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    @property
    def taps(self) -> list[str]:
        return list(self.layout.dims)

    def fingerprint(self) -> str:
        """sha256 of the canonical provenance + layout: what projections and students record."""
        canon = json.dumps({"layout": self.meta["layout"], "provenance": self.provenance}, sort_keys=True)
        return hashlib.sha256(canon.encode()).hexdigest()

    def feature_array(self, tap: str) -> zarr.Array:
        if tap not in self.layout.dims:
            raise StoreError(f"{self.path} has no tap {tap!r}; it has {', '.join(self.taps)}")
        return self.array(f"features/{tap}")

    def marker_path(self, shard_index: int) -> Path:
        return self.path / "markers" / f"{shard_index:06d}.json"

    def marker(self, shard_index: int) -> dict | None:
        """The done marker of one shard, or None while it is not durably written."""
        path = self.marker_path(shard_index)
        return json.loads(path.read_text()) if path.is_file() else None

    def done(self) -> dict[int, dict]:
        """Done markers by shard index (only shards whose data is durable)."""
        out = {}
        for p in sorted((self.path / "markers").glob("*.json")):
            out[int(p.stem)] = json.loads(p.read_text())
        return out

    def finished(self, indices: Iterable[int]) -> list[int]:
        """Which of ``indices`` have a done marker. Under torchrun each rank asks about its own shards and rank 0
        combines the answers: a marker another node wrote moments ago may be missing from rank 0's (cached)
        directory listing on a shared filesystem, but is visible to the node that wrote it."""
        return [i for i in indices if self.marker_path(i).is_file()]

    def missing_shards(self) -> list[str]:
        """Names of the source shards whose data is not durably written yet (no done marker)."""
        done = self.done()
        return [s["name"] for i, s in enumerate(self.layout.shards) if i not in done]

    def write_slot(self, shard_index: int, block: ShardBlock) -> None:
        """Write one shard's rows into its own chunks (one call per array), fsync them, then its done marker."""
        rows, sl, n = self.layout.slot_rows, self.layout.slot(shard_index), len(block.keys)
        pad = rows - n

        def padded(a: np.ndarray) -> np.ndarray:
            return np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a

        for tap, feats in block.features.items():
            self.array(f"features/{tap}")[sl] = padded(feats.astype(self.layout.dtype, copy=False))
        self.array("view_params")[sl] = padded(block.params.astype(np.float32, copy=False))
        self.array("image_hw")[sl] = padded(block.hw.astype(np.int32, copy=False))
        self.array("image_hash")[sl] = padded(block.hashes.astype(np.uint8, copy=False))
        self.array("keys")[sl] = np.array(block.keys + [""] * pad, dtype=object).astype(str)
        self.array("valid")[sl] = padded(block.valid.astype(bool, copy=False))
        self._fsync_slot(shard_index)
        record = {
            "shard": self.layout.shards[shard_index]["name"],
            "samples": n,
            "written": int(block.valid.sum()),
            "skipped": block.skipped,
        }
        write_json_atomic(self.marker_path(shard_index), record)

    def _fsync_slot(self, shard_index: int) -> None:
        """Make the slot's chunk files durable before its marker exists (zarr itself does not fsync)."""
        per_slot = self.layout.slot_rows // self.layout.chunk_rows
        names = [f"features/{t}" for t in self.taps] + [
            "view_params",
            "image_hw",
            "image_hash",
            "keys",
            "valid",
        ]
        for name in names:
            trailing = ["0"] * (self.array(name).ndim - 1)  # one chunk across the other axes
            for ci in range(shard_index * per_slot, (shard_index + 1) * per_slot):
                chunk = self.path.joinpath(name, "c", str(ci), *trailing)
                if chunk.is_file():
                    with open(chunk, "rb") as fh:
                        os.fsync(fh.fileno())

    def read_slot(self, shard_index: int, taps: list[str] | None = None) -> ShardBlock:
        """One shard's block: one read per array, rows in shard order (padding dropped)."""
        marker = self.marker(shard_index)
        if marker is None:
            raise StoreError(
                f"{self.path}: shard {self.layout.shards[shard_index]['name']} is not cached yet; resume `kdep cache-teacher`"
            )
        n, sl = marker["samples"], self.layout.slot(shard_index)
        keys = [str(k) for k in self.array("keys")[sl][:n]]
        feats = {t: self.feature_array(t)[sl][:n] for t in (taps or self.taps)}
        return ShardBlock(
            keys=keys,
            features=feats,
            params=self.array("view_params")[sl][:n],
            hw=self.array("image_hw")[sl][:n],
            hashes=self.array("image_hash")[sl][:n],
            valid=self.array("valid")[sl][:n],
            skipped=marker["skipped"],
            cache=str(self.path),
        )


def open_store(path: str | Path, mode: str = "r") -> FeatureStore:
    """Open an existing cache (never creates one: a mistyped path is an error)."""
    return FeatureStore(path, mode)
