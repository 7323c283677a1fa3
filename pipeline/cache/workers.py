"""Stage 1 pieces: decode each image once, draw and replay its K views, assemble per-shard blocks, write them.

Data flow per rank: DataLoader workers each take whole input shards (the unit of work), check the shard against
its recorded identity, decode every image once, replay its K views (once per distinct teacher resolution), and send
batches of views (never spanning two shards) with their metadata. The main process runs the teacher(s) and fills one
:class:`ShardAssembly` per shard;
a complete shard goes to a background writer thread (so writing never stalls the teacher), which writes its
slot, fsyncs it and then writes its done marker.

Batches are cut at fixed positions inside a shard, so a view's features never depend on the number of ranks or
workers, or on which run (first or resumed) computed them.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.cache.store import HASH_BYTES, FeatureStore, ShardBlock
from pipeline.data.images import DecodeError, decode_rgb, image_bytes, image_hash
from pipeline.data.shards import ShardError, iter_samples
from pipeline.data.views import N_PARAMS, cat_views, replay_for_transport, sample_views, stack_views
from pipeline.dtypes import range_problem
from pipeline.errors import KdepError
from pipeline.files import file_sha256


class CacheError(KdepError):
    """Stage 1 cannot go on; the message names the shard and key and says what to do."""


@dataclass(frozen=True)
class ShardTask:
    """One input shard to cache: where it is and what it must contain."""

    index: int  # position in the store's shard list (its slot)
    path: str
    name: str
    samples: int  # expected count (from the index or the first listing)
    sha256: str | None  # expected content hash
    duplicates: dict[str, str] = field(default_factory=dict)  # key -> earlier shard holding it (skipped here)


@dataclass(frozen=True)
class ViewSpec:
    """How views are drawn and rendered (the recorded augmentation settings)."""

    recipe: str
    seed: int
    views: int  # K
    resolution: int
    center_first: bool
    images_per_batch: int
    center_recipe: str = "center"  # view 0's recipe when center_first: center or center-coss
    extra_resolutions: tuple[
        int, ...
    ] = ()  # other teachers' input sides: each view is also replayed at these

    def __post_init__(self) -> None:
        if self.resolution in self.extra_resolutions or len(set(self.extra_resolutions)) != len(
            self.extra_resolutions
        ):
            raise ValueError(f"extra_resolutions {self.extra_resolutions} repeat a resolution")


class ShardViews(IterableDataset):
    """Yields messages per shard: {"kind": "views", ...} batches, then {"kind": "end"}; errors as {"kind": "error"}."""

    def __init__(self, tasks: list[ShardTask], spec: ViewSpec, skip_bad: bool) -> None:
        self.tasks, self.spec, self.skip_bad = tasks, spec, skip_bad

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.tasks if info is None else self.tasks[info.id :: info.num_workers]
        for task in mine:
            try:
                yield from self._shard(task)
            except (ShardError, DecodeError, CacheError) as err:
                yield {"kind": "error", "shard": task.index, "message": str(err)}
                return

    def _shard(self, task: ShardTask) -> Iterator[dict]:
        """One shard's batches, then its end message. The shard is hashed while it is read (one pass); a hash that
        differs from the recorded one is reported instead of the end message, so nothing of it is ever written."""
        digest = hashlib.sha256() if task.sha256 else None
        try:
            yield from self._read_shard(task, digest)
        except (ShardError, DecodeError, CacheError):
            if task.sha256 and file_sha256(task.path) != task.sha256:  # error path only: say why it failed
                raise _changed(task) from None
            raise

    def _read_shard(self, task: ShardTask, digest) -> Iterator[dict]:
        pending: list[dict] = []
        skipped: list[dict] = []
        count = 0
        for pos, sample in enumerate(iter_samples(task.path, digest)):
            count += 1
            item = self._render(task, pos, sample, skipped)
            if item is not None:
                pending.append(item)
            if len(pending) == self.spec.images_per_batch:
                yield _batch(task.index, pending)
                pending = []
        if pending:
            yield _batch(task.index, pending)
        if count != task.samples:
            raise CacheError(
                f"{task.path}: {count} samples but {task.samples} expected; the shard is truncated or changed"
            )
        if digest is not None and digest.hexdigest() != task.sha256:
            raise _changed(task)
        yield {"kind": "end", "shard": task.index, "samples": count, "skipped": skipped}

    def _render(self, task: ShardTask, pos: int, sample, skipped: list[dict]) -> dict | None:
        where = f"{task.path} key {sample.key!r}"
        if sample.key in task.duplicates:  # only present with --skip-bad (otherwise refused before caching)
            reason = (
                f"key {sample.key!r} appears in shard {task.duplicates[sample.key]} and in shard {task.name}"
            )
            skipped.append({"key": sample.key, "position": pos, "offset": sample.offset, "reason": reason})
            return None
        try:
            data = image_bytes(sample, task.path)
            image = decode_rgb(data, where)
        except DecodeError as err:
            if not self.skip_bad:
                raise
            skipped.append({"key": sample.key, "position": pos, "offset": sample.offset, "reason": str(err)})
            return None
        s = self.spec
        h, w = int(image.shape[1]), int(image.shape[2])
        params = sample_views(s.recipe, s.seed, sample.key, s.views, h, w, s.center_first, s.center_recipe)
        views = {  # each resolution's K views, replayed from the same parameters; uint8 where exact
            res: stack_views([replay_for_transport(image, p, res) for p in params])
            for res in (s.resolution, *s.extra_resolutions)
        }
        return {
            "pos": pos,
            "key": sample.key,
            "offset": sample.offset,
            "views": views,
            "params": params,
            "hw": (h, w),
            "hash": np.frombuffer(image_hash(data), np.uint8),
        }


def _changed(task: ShardTask) -> CacheError:
    return CacheError(f"{task.path}: content changed since this cache was started (sha256 differs); "
                      "restore the original shard or start a new cache")  # fmt: skip


def _batch(shard: int, items: list[dict]) -> dict:
    res0, *extra = items[0]["views"]
    return {
        "kind": "views", "shard": shard,
        "positions": [it["pos"] for it in items], "keys": [it["key"] for it in items],
        "offsets": np.array([it["offset"] for it in items], np.int64),
        "views": cat_views([it["views"][res0] for it in items]),  # (n*K, 3, r, r) uint8/float32, image-major
        "views_at": {res: cat_views([it["views"][res] for it in items]) for res in extra},  # other sides
        "params": np.stack([it["params"] for it in items]), "hw": np.array([it["hw"] for it in items], np.int32),
        "hashes": np.stack([it["hash"] for it in items]),
    }  # fmt: skip


@dataclass
class ShardAssembly:
    """One shard's rows filling up as teacher batches arrive. Every batch is checked against the stored ``dtype``
    first: with ``out_of_range="error"`` a feature it cannot hold stops the run; with ``"skip"`` the image is
    skipped (no features stored, counted and listed in the marker). Nothing degraded is ever stored.

    Its buffers (float32 (n, K, D) per tap: ~80 MB for 1000 images, K=10, D=2048) are allocated when it is made;
    stage 1 makes one at its shard's first message and drops it once the shard is handed to the writer, so memory
    follows the shards in flight, not the shards pending (1282 buffers at once are 105 GB of address space)."""

    task: ShardTask
    views: int
    dims: dict[str, int]
    dtype: str = "float32"
    out_of_range: str = "error"
    range_skipped: list[dict] = field(default_factory=list)  # [{"key", "position", "reason"}]
    keys: list[str] = field(default_factory=list)
    features: dict[str, np.ndarray] = field(default_factory=dict)
    params: np.ndarray | None = None
    hw: np.ndarray | None = None
    hashes: np.ndarray | None = None
    valid: np.ndarray | None = None
    offsets: np.ndarray | None = None

    def __post_init__(self) -> None:
        n, k = self.task.samples, self.views
        self.keys = [""] * n
        self.features = {t: np.zeros((n, k, d), np.float32) for t, d in self.dims.items()}
        self.params = np.zeros((n, k, N_PARAMS), np.float32)
        self.hw = np.zeros((n, 2), np.int32)
        self.hashes = np.zeros((n, HASH_BYTES), np.uint8)
        self.valid = np.zeros(n, bool)
        self.offsets = np.full(n, -1, np.int64)

    def add(self, msg: dict, feats: dict[str, np.ndarray]) -> None:
        """Place a batch: ``feats[tap]`` is (n*K, D) in the batch's image-major order."""
        pos = np.asarray(msg["positions"])
        if pos.size and pos.max() >= self.task.samples:
            raise CacheError(
                f"{self.task.path}: more samples than the {self.task.samples} expected; the shard changed"
            )
        keep = np.ones(len(pos), bool)
        for tap, f in feats.items():
            bad, what = range_problem(f, self.dtype)
            bad_images = bad.reshape(len(pos), self.views).any(axis=1)
            if bad_images.any():
                self._out_of_range(tap, msg, bad_images, what)
                keep &= ~bad_images
        for tap, f in feats.items():
            self.features[tap][pos[keep]] = f.reshape(len(pos), self.views, -1)[keep]
        self.params[pos], self.hw[pos], self.hashes[pos] = msg["params"], msg["hw"], msg["hashes"]
        self.offsets[pos] = msg["offsets"]
        self.valid[pos[keep]] = True
        for p, key in zip(pos, msg["keys"], strict=True):
            self.keys[p] = key

    def _out_of_range(self, tap: str, msg: dict, bad_images: np.ndarray, what: str) -> None:
        first = int(np.flatnonzero(bad_images)[0])
        where = f"{self.task.path} key {msg['keys'][first]!r}"
        if self.out_of_range != "skip":
            raise CacheError(
                f"{where}: teacher tap {tap!r}: {what}; cache with --dtype float32 (or --out-of-range skip to "
                "skip such images, counted)"
            )
        for i in np.flatnonzero(bad_images):
            self.range_skipped.append({"key": msg["keys"][i], "position": int(msg["positions"][i]),
                                       "reason": f"tap {tap!r} out of {self.dtype} range"})  # fmt: skip

    def finish(self, end: dict) -> ShardBlock:
        """The complete block; every position must be either filled or a recorded skip."""
        for s in end["skipped"]:
            self.keys[s["position"]] = s["key"]
            self.offsets[s["position"]] = s["offset"]
        missing = [i for i, k in enumerate(self.keys) if not k]
        if end["samples"] != self.task.samples or missing:
            raise CacheError(
                f"{self.task.path}: {len(missing)} of {self.task.samples} rows missing; the shard is incomplete"
            )
        ranged = {s["position"]: s for s in self.range_skipped}  # one entry per image, the first tap found
        found = sorted([*end["skipped"], *ranged.values()], key=lambda s: s["position"])
        skipped = [{"key": s["key"], "reason": s["reason"]} for s in found]
        return ShardBlock(self.keys, self.features, self.params, self.hw, self.hashes, self.valid, skipped,
                          offsets=self.offsets)  # fmt: skip


class SlotWriter:
    """Writes finished shard blocks in a background thread; errors surface on the next call or at ``close``."""

    def __init__(self, store: FeatureStore, depth: int = 2) -> None:
        self.store, self.error = store, None
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                if self.error is None:
                    self.store.write_slot(*item)
            except BaseException as err:  # surfaced in the main thread by _raise_if_failed
                self.error = err

    def submit(self, shard_index: int, block: ShardBlock) -> None:
        self._raise_if_failed()
        self.queue.put((shard_index, block))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error
