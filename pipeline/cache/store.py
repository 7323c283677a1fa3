"""The feature cache (layout ``kdep-cache/2``): one folder holding a pure Zarr v3 hierarchy and its bookkeeping.

``S`` input shards, ``R`` rows per slot (the largest shard's sample count rounded up to whole inner chunks), ``K``
views, ``P`` view-parameter columns, ``c`` rows per inner chunk::

    cache/                        what every kdep command takes (--out / --cache)
      store.zarr/                 the Zarr v3 hierarchy: core data types only, nothing else inside
        zarr.json                 attributes["kdep"]: layout version, layout, provenance (teacher, weights, taps,
                                  preprocessing, recipe, K, seed, source shards with counts/bytes/sha256, versions)
        features/<tap>            float16 (or float32) [S*R, K, D]  sharding codec: shards (R, 1, D), inner (c, 1, D)
        features/<label>/<tap>    the same, per teacher, in a cache of several teachers (``pipeline.teachers``)
        view_params               float32 [S*R, K, P]  chunks (R, 1, P)   the stored parameters of every view
        image_hw                  int32   [S*R, 2]     chunks (R, 2)      decoded image height, width
        image_hash                uint8   [S*R, 16]    chunks (R, 16)     blake2b-128 of the encoded image bytes
        keys                      uint8   [S*R, 128]   chunks (R, 128)    sample key, UTF-8, NUL-padded ("" = padding)
        valid                     bool    [S*R]        chunks (R,)        False for padding and skipped rows
      markers/<shard>.json        done marker, written (atomically) only after the shard's files are fsynced
      writer.lock  runs.jsonl  config.cache_teacher.json

Why view-major: stage 3 uses one view per image per epoch, and its schedule (``pipeline.student.pairs``) gives every
image of a shard the same view index in an epoch, so an epoch reads one feature file per (shard, tap): exactly the
bytes it uses, where layout 1 (chunks of (C, K, D)) read all K views to use one. Inner chunks of ``c`` rows (about
128 KiB: 32 rows of 2048 float16) let neighbour batches and ``verify`` read single rows without reading a shard's
view. Each (shard, view) is one Zarr shard file written whole by the one writer that owns the slot (two writers on
one shard lose data silently: zarr-python issues #3682 and #3514); the per-row arrays have one chunk per slot. Keys are bytes in a uint8
array, not zarr-python's ``string`` type, so tensorstore or any other Zarr v3 reader opens every array; bookkeeping
files sit beside the hierarchy, not inside it. Padding rows are zeros and ``valid`` is False there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.data.params import N_PARAMS
from pipeline.errors import KdepError
from pipeline.files import write_json_atomic

LAYOUT_VERSION = "kdep-cache/2"
OLD_LAYOUTS = ("kdep-cache/1",)  # refused with the rebuild message, never reinterpreted
ZARR_DIR = "store.zarr"  # the Zarr hierarchy inside a cache folder
INNER_CHUNK_BYTES = 128 << 10  # target size of one inner feature chunk (the unit of a row-granular read)
HASH_BYTES = 16
KEY_BYTES = 128  # longest sample key (UTF-8 bytes) a cache stores


class StoreError(KdepError):
    """The cache is missing, incomplete, of an old layout, or was built from other data or another teacher."""


@dataclass(frozen=True)
class CacheLayout:
    """Shapes of the store, fixed when it is created."""

    shards: list[dict]  # source shard records: name, samples, nbytes, sha256
    views: int  # K
    dims: dict[str, int]  # tap -> D
    dtype: str = "float16"  # feature dtype
    slot_rows: int = 0  # R (derived when 0)
    inner_rows: int = 0  # c, rows per inner feature chunk (derived when 0); divides R
    key_bytes: int = KEY_BYTES

    def __post_init__(self) -> None:
        if not self.shards or max(s["samples"] for s in self.shards) == 0:
            raise StoreError(
                "no samples in the input shards; check the shard list (an empty index or empty tars)"
            )
        largest = max(s["samples"] for s in self.shards)
        if self.inner_rows == 0:
            row_bytes = max(self.dims.values()) * np.dtype(self.dtype).itemsize
            object.__setattr__(self, "inner_rows", max(1, min(largest, INNER_CHUNK_BYTES // row_bytes)))
        if self.slot_rows == 0:
            object.__setattr__(self, "slot_rows", math.ceil(largest / self.inner_rows) * self.inner_rows)
        if self.slot_rows % self.inner_rows or self.slot_rows < largest:
            raise StoreError(
                f"slot of {self.slot_rows} rows does not fit {largest} rows in chunks of {self.inner_rows}"
            )

    @property
    def rows(self) -> int:
        return len(self.shards) * self.slot_rows

    def slot(self, shard_index: int) -> slice:
        return slice(shard_index * self.slot_rows, (shard_index + 1) * self.slot_rows)


@dataclass
class ShardBlock:
    """Cached rows of one input shard (n = its sample count), in shard order, with some or all of its views.

    ``features[tap]`` and ``params`` hold the columns of ``views`` (all K, in order, when the block was written or
    read whole); :meth:`feature` and :meth:`view_params` take a view index and find its column.
    """

    keys: list[str]
    features: dict[str, np.ndarray]  # tap -> (n, len(views), D)
    params: np.ndarray  # (n, len(views), P) float32
    hw: np.ndarray  # (n, 2) int32
    hashes: np.ndarray  # (n, 16) uint8
    valid: np.ndarray  # (n,) bool
    skipped: list[dict] = field(default_factory=list)  # [{"key", "reason"}]
    cache: str = ""  # path of the cache it was read from (join errors name it)
    views: tuple[int, ...] = ()  # view index of each column; () = all K views in order
    _rows: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    def row_of(self) -> dict[str, int]:
        """key -> row in the block, built once (the join looks up every streamed sample by key)."""
        if self._rows is None:
            self._rows = {k: i for i, k in enumerate(self.keys)}
        return self._rows

    def column(self, view: int) -> int:
        if not self.views:
            return view
        try:
            return self.views.index(view)
        except ValueError:
            raise StoreError(
                f"view {view} was not read from {self.cache} (read: {list(self.views)})"
            ) from None

    def feature(self, tap: str, row: int, view: int) -> np.ndarray:
        return self.features[tap][row, self.column(view)]

    def view_params(self, row: int, view: int) -> np.ndarray:
        return self.params[row, self.column(view)]


def _codec() -> list:
    return [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")]  # zstd 1: the measured sweet spot


def encode_keys(keys: Sequence[str], width: int = KEY_BYTES, where: str = "") -> np.ndarray:
    """Keys -> (n, width) uint8, UTF-8 and NUL-padded; a key longer than ``width`` bytes (or holding NUL) is refused."""
    out = np.zeros((len(keys), width), np.uint8)
    for i, key in enumerate(keys):
        raw = key.encode()
        if len(raw) > width or b"\0" in raw:
            raise StoreError(
                f"{where or 'a shard'}: key {key[:60]!r} is {len(raw)} bytes of UTF-8; cache keys are at most "
                f"{width} bytes without NUL: re-make the shards with shorter keys"
            )
        out[i, : len(raw)] = np.frombuffer(raw, np.uint8)
    return out


def decode_keys(raw: np.ndarray) -> list[str]:
    """(n, width) uint8 -> keys (numpy's fixed-width bytes drop the NUL padding)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    return [k.decode() for k in raw.view(f"S{raw.shape[1]}").ravel()]


def zarr_path(path: str | Path) -> Path:
    """The Zarr hierarchy of the cache folder ``path``."""
    return Path(path) / ZARR_DIR


def _old_layout_error(path: Path, version: str) -> StoreError:
    return StoreError(
        f"{path} is a kdep cache of layout {version}, which this version does not read (now {LAYOUT_VERSION}: "
        "one read per view and epoch, core Zarr types); rebuild it with `kdep cache-teacher --out NEW_FOLDER`"
    )


def _layout_of(zarr_json: Path) -> str | None:
    try:
        meta = json.loads(zarr_json.read_text())
    except (OSError, ValueError):
        return None
    return ((meta.get("attributes") or {}).get("kdep") or {}).get("layout_version")


def create_store(path: str | Path, layout: CacheLayout, provenance: dict) -> None:
    """Create the Zarr group with every array in its final shape and chunking, and record the metadata.

    ``path`` is the cache folder (it may already hold the writer lock). Markers left there by a deleted store are
    removed: they vouch for data that is gone.
    """
    path = Path(path)
    version = _layout_of(path / "zarr.json")
    if version is not None:
        raise _old_layout_error(path, version)
    if (zarr_path(path) / "zarr.json").exists():
        raise StoreError(f"{path} already holds a feature cache; resume it or choose another --out")
    for stale in (path / "markers").glob("*.json"):
        stale.unlink()
    group = zarr.open_group(str(zarr_path(path)), mode="w-")
    n, k, r, c = layout.rows, layout.views, layout.slot_rows, layout.inner_rows
    for tap, d in layout.dims.items():
        group.create_array(
            f"features/{tap}", shape=(n, k, d), shards=(r, 1, d), chunks=(c, 1, d), dtype=layout.dtype,
            compressors=_codec(), fill_value=0,
        )  # fmt: skip
    group.create_array(
        "view_params", shape=(n, k, N_PARAMS), chunks=(r, 1, N_PARAMS), dtype="float32", compressors=_codec(),
        fill_value=0,
    )  # fmt: skip
    group.create_array("image_hw", shape=(n, 2), chunks=(r, 2), dtype="int32", fill_value=0)
    group.create_array(
        "image_hash", shape=(n, HASH_BYTES), chunks=(r, HASH_BYTES), dtype="uint8", fill_value=0
    )
    group.create_array(
        "keys", shape=(n, layout.key_bytes), chunks=(r, layout.key_bytes), dtype="uint8", fill_value=0
    )
    group.create_array("valid", shape=(n,), chunks=(r,), dtype="bool", fill_value=False)
    meta = {
        "layout_version": LAYOUT_VERSION,
        "layout": asdict(layout),
        "encoding": {"keys": f"UTF-8, NUL-padded to {layout.key_bytes} bytes per row"},
        "provenance": provenance,
    }
    group.attrs["kdep"] = json.loads(json.dumps(meta))
    (path / "markers").mkdir(exist_ok=True)


class FeatureStore:
    """A cache opened for reading (``mode="r"``) or for writing slots (``mode="r+"``).

    ``path`` is the cache folder; its ``store.zarr`` is accepted too (and means its folder).
    """

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        path = Path(path)
        if path.name == ZARR_DIR and (path / "zarr.json").is_file():
            path = path.parent
        self.path = path
        if not (zarr_path(path) / "zarr.json").is_file():
            version = _layout_of(path / "zarr.json")
            if version in OLD_LAYOUTS:
                raise _old_layout_error(path, version)
            if (path / "zarr.json").is_file():
                raise StoreError(
                    f"{path} is a Zarr group but not a kdep feature cache (layout {LAYOUT_VERSION})"
                )
            raise StoreError(
                f"no feature cache at {path}; run `kdep cache-teacher` (make cache-teacher) first"
            )
        self.group = zarr.open_group(str(zarr_path(path)), mode=mode)
        meta = self.group.attrs.asdict().get("kdep")
        if not meta or meta.get("layout_version") != LAYOUT_VERSION:
            version = (meta or {}).get("layout_version")
            if version in OLD_LAYOUTS:
                raise _old_layout_error(path, version)
            raise StoreError(f"{path} is a Zarr group but not a kdep feature cache (layout {LAYOUT_VERSION})")
        self.meta = meta
        self.layout = CacheLayout(**meta["layout"])
        self.provenance = meta["provenance"]
        self._arrays: dict[str, zarr.Array] = {}  # opened once: each open reads its zarr.json

    @property
    def zarr_path(self) -> Path:
        return zarr_path(self.path)

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

    def valid(self) -> np.ndarray:
        """(S*R,) bool: the rows that hold features."""
        return np.asarray(self.array("valid")[:], dtype=bool)

    def keys_at(self, rows: Sequence[int]) -> list[str]:
        """The keys of global rows ``rows``."""
        return decode_keys(self.array("keys").get_orthogonal_selection(np.asarray(rows, np.int64)))

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
        """Write one shard's rows into its own files (one whole-shard write per array), fsync them, then its done
        marker. ``block`` holds all K views."""
        rows, sl, n = self.layout.slot_rows, self.layout.slot(shard_index), len(block.keys)
        pad = rows - n
        name = self.layout.shards[shard_index]["name"]
        keys = encode_keys(block.keys, self.layout.key_bytes, f"shard {name}")

        def padded(a: np.ndarray) -> np.ndarray:
            return np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a

        for tap, feats in block.features.items():
            self.array(f"features/{tap}")[sl] = padded(feats.astype(self.layout.dtype, copy=False))
        self.array("view_params")[sl] = padded(block.params.astype(np.float32, copy=False))
        self.array("image_hw")[sl] = padded(block.hw.astype(np.int32, copy=False))
        self.array("image_hash")[sl] = padded(block.hashes.astype(np.uint8, copy=False))
        self.array("keys")[sl] = padded(keys)
        self.array("valid")[sl] = padded(block.valid.astype(bool, copy=False))
        self._fsync_slot(shard_index)
        record = {"shard": name, "samples": n, "written": int(block.valid.sum()), "skipped": block.skipped}
        write_json_atomic(self.marker_path(shard_index), record)

    def _fsync_slot(self, shard_index: int) -> None:
        """Make the slot's files durable before its marker exists (zarr itself does not fsync). Every array has one
        chunk (or Zarr shard) row per slot, so the slot's files are those under ``<array>/c/<shard_index>``."""
        names = [f"features/{t}" for t in self.taps] + [
            "view_params",
            "image_hw",
            "image_hash",
            "keys",
            "valid",
        ]
        for name in names:
            top = self.zarr_path.joinpath(name, "c", str(shard_index))
            for f in [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())

    def _require_done(self, shard_index: int) -> dict:
        marker = self.marker(shard_index)
        if marker is None:
            raise StoreError(
                f"{self.path}: shard {self.layout.shards[shard_index]['name']} is not cached yet; resume "
                "`kdep cache-teacher`"
            )
        return marker

    def read_slot(
        self, shard_index: int, taps: Sequence[str] | None = None, views: Sequence[int] | None = None
    ) -> ShardBlock:
        """One shard's rows in shard order (padding dropped): the per-row arrays, and features of ``taps`` (default
        every tap; [] none) and view parameters for ``views`` (default all K; [] none). One read per array and
        view: an epoch's block (one view) reads exactly that view's files."""
        marker = self._require_done(shard_index)
        n, sl = marker["samples"], self.layout.slot(shard_index)
        chosen = tuple(range(self.layout.views)) if views is None else tuple(int(v) for v in views)
        bad = [v for v in chosen if not 0 <= v < self.layout.views]
        if bad:
            raise StoreError(
                f"{self.path} holds views 0..{self.layout.views - 1}; view {bad[0]} was asked for"
            )
        taps = self.taps if taps is None else list(taps)
        whole = chosen == tuple(range(self.layout.views))

        def per_view(array: zarr.Array) -> np.ndarray:
            if whole:
                return array[sl][:n]
            cols = [array[sl, v][:n] for v in chosen]  # one Zarr shard (or chunk) per view
            return np.stack(cols, axis=1) if cols else np.zeros((n, 0, array.shape[-1]), array.dtype)

        return ShardBlock(
            keys=decode_keys(self.array("keys")[sl][:n]),
            features={t: per_view(self.feature_array(t)) for t in taps},
            params=per_view(self.array("view_params")),
            hw=self.array("image_hw")[sl][:n],
            hashes=self.array("image_hash")[sl][:n],
            valid=self.array("valid")[sl][:n],
            skipped=marker["skipped"],
            cache=str(self.path),
            views=() if whole else chosen,
        )

    def read_view_params(self, shard_index: int, view: int) -> np.ndarray:
        """(n, P) float32: the stored parameters of one view of every row of a done shard (one chunk read)."""
        n = self._require_done(shard_index)["samples"]
        return self.array("view_params")[self.layout.slot(shard_index), int(view)][:n]

    def read_rows(self, shard_index: int, rows: Sequence[int], view: int, tap: str) -> np.ndarray:
        """Features of ``rows`` (rows of the shard's block) at one view, (len(rows), D), in the order asked: only
        the inner chunks holding them are read."""
        unique, inverse = np.unique(np.asarray(rows, np.int64), return_inverse=True)
        start = shard_index * self.layout.slot_rows
        got = self.feature_array(tap).get_orthogonal_selection((start + unique, int(view), slice(None)))
        return got[inverse]


def open_store(path: str | Path, mode: str = "r") -> FeatureStore:
    """Open an existing cache (never creates one: a mistyped path is an error)."""
    return FeatureStore(path, mode)
