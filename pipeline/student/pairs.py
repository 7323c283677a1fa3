"""Stage 3's input: a stream of (replayed view, cached teacher row) pairs joined by key, never by position.

Per epoch, the shard order is a permutation drawn from (seed, epoch) (WebDataset's ``shardshuffle`` repeats the
same order every epoch, and shuffles after the split, so a rank would always see the same shards). Shards are split over ranks then DataLoader workers (webdataset's
``split_by_node`` / ``split_by_worker`` semantics); when there are fewer shards than consumers (ranks x workers),
consumers are split into one group per shard and the members of a group stride inside its shard (member m of g
keeps samples m, m + g, ...), so each shard is opened by at most ceil(consumers / shards) consumers, no rank is
ever empty while a shard has a sample per member, and each scheduled (image, view) still appears exactly once.

The view schedule is per (shard, epoch): in an epoch every image of a shard shows the same view index, so the
epoch reads one view of each shard from the cache (one feature file per shard, the bytes it uses; the store is
view-major, ``pipeline/cache/store.py``). This is equivalent in distribution to choosing a view per image: the
views of different images are independent draws (a view's parameters are a pure function of (seed, key, view
index)), so which index two images share says nothing about their crops. With ``walk`` each shard walks a seeded
permutation of the training views, a fresh one every cycle, so each image still shows each of its training views
exactly once per cycle of ``n`` epochs (``n`` training views); ``random`` draws the index uniformly per (shard,
epoch). Training views are ``[first, stop)``: view 0 is left out when it is the cache's deterministic centre view
(for neighbour mining, not training), and ``views_used = k`` stops at view k (the first k views of a K-view cache
are exactly a k-view cache, since view parameters depend only on the view index).

Views travel as uint8 where that is exact (``uint8_views``; normalised on the device by
:func:`pipeline.data.views.normalize_views`). Each shard's block is read once per epoch, for its one view; each
sample is joined to its row and that view replayed by the cache's one join
(:func:`pipeline.cache.join.join_sample`: key, validity, image hash and size, replay).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.cache.join import JoinError, SkippedAtCaching, join_sample
from pipeline.cache.store import FeatureStore, ShardBlock, StoreError, open_store
from pipeline.data.params import N_PARAMS
from pipeline.data.shards import Sample, iter_samples
from pipeline.data.views import RECIPES, sample_view_params


@dataclass(frozen=True)
class StreamSpec:
    """What the stream reads and how it picks views."""

    store: str  # feature cache path
    shard_paths: tuple[str, ...]  # source shard paths, in the cache's shard order
    tap: str  # cached tap to pair with the views
    resolution: int  # student input side (the view is replayed at this size)
    seed: int  # shard order, view schedule and shuffle buffer seed
    view_policy: str = (
        "walk"  # walk: each image walks its K views in a seeded order; random: uniform per epoch
    )
    shuffle_buffer: int = 256  # samples mixed in each worker's buffer (0 = stream order)
    skip_bad: bool = False  # count and skip samples that do not join instead of stopping
    rank: int = 0
    world: int = 1
    uint8_views: bool = False  # uint8 views before normalisation where exact (4x less shared memory)
    views_used: int = 0  # train on the first k views of the cache (0 = all K)
    taps: tuple[
        str, ...
    ] = ()  # several cached taps (multi-target): rows concatenate them in this order; () = (tap,)
    extra_resolutions: tuple[int, ...] = ()  # also replay each view at these sides (an online teacher's own)
    fresh_views: bool = False  # a fresh view of every image every epoch, outside the cached pool (online KD)

    @property
    def carried(self) -> tuple[str, ...]:
        """The cached taps each row carries, in row order (one: ``tap``, as a single-target run reads it)."""
        return self.taps or (self.tap,)


def _stable_int(*parts: object) -> int:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def scheduled_view(seed: int, shard: int, epoch: int, first: int, stop: int, policy: str = "walk") -> int:
    """The view every image of cache shard ``shard`` shows in ``epoch``, among the training views ``[first, stop)``:
    the shard's seeded permutation of them, walked (a fresh one every cycle), or a uniform draw."""
    n = stop - first
    if n < 1:
        raise ValueError(f"no training views in [{first}, {stop})")
    if policy == "random":
        return first + _stable_int(seed, shard, "random", epoch) % n
    cycle = epoch // n  # random.Random is ~10x cheaper to seed than numpy's generators
    return first + random.Random(_stable_int(seed, shard, "walk", cycle)).sample(range(n), n)[epoch % n]


FRESH_VIEWS_FROM = 1 << 20  # fresh view indices start here: disjoint from any cache's pool 0..K-1


def fresh_view(epoch: int) -> int:
    """The view index every image shows in ``epoch`` with fresh views: one the cache never holds, new each epoch."""
    return FRESH_VIEWS_FROM + epoch


def fresh_recipe(store: FeatureStore) -> tuple[str, int]:
    """(recipe, seed) of the cache's training views, for drawing fresh ones; refused when this version's recipe no
    longer has the parameters the cache recorded (fresh views would come from another distribution)."""
    views = store.provenance["views"]
    recipe, recorded = views["recipe"], views.get("recipe_params")
    if recorded is not None and json_ready(asdict(RECIPES[recipe])) != json_ready(recorded):
        raise StoreError(
            f"{store.path} was cached with recipe {recipe!r} = {recorded}, which this version draws differently "
            f"({asdict(RECIPES[recipe])}); fresh views need the cache's recipe: use the version that made it"
        )
    return recipe, int(views["seed"])


def json_ready(value: object) -> object:
    """Tuples as lists (how a recipe's parameters come back from the store's JSON)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def with_fresh_views(block: ShardBlock, view: int, recipe: str, seed: int) -> ShardBlock:
    """``block`` (keys, sizes, validity) with the parameters of fresh view ``view`` of each valid row, drawn like the
    cached ones (a pure function of the cache's seed, the key, the view index and the image size)."""
    params = np.zeros((len(block.keys), 1, N_PARAMS), np.float32)
    for row in np.flatnonzero(block.valid):
        h, w = (int(v) for v in block.hw[row])
        params[row, 0] = sample_view_params(recipe, seed, block.keys[row], view, h, w)
    return replace(block, params=params, views=(view,))


def first_training_view(store: FeatureStore) -> int:
    """1 when view 0 is the cache's centre view (and there are others), else 0."""
    return int(bool(store.provenance["views"].get("center_first")) and store.layout.views > 1)


def training_views(store: FeatureStore, views_used: int = 0) -> tuple[int, int]:
    """``[first, stop)``: the views stage 3 trains on (``views_used`` = k: the first k views of the cache; 0 = all)."""
    first, k = first_training_view(store), store.layout.views
    stop = views_used or k
    if not first < stop <= k:
        raise StoreError(
            f"views_used {views_used}: {store.path} holds views 0..{k - 1}"
            + (" (view 0 is the centre view, not trained on)" if first else "")
            + f"; use a value in {first + 1}..{k}"
        )
    return first, stop


def shard_order(seed: int, epoch: int, shards: int) -> list[int]:
    """This epoch's shard order: a permutation drawn from (seed, epoch), the same on every rank."""
    return [int(i) for i in np.random.default_rng(_stable_int(seed, "shards", epoch)).permutation(shards)]


def consumer_id(rank: int, world: int, worker: int) -> int:
    """The consumer number of DataLoader ``worker`` of ``rank``: interleaved (worker-major), so that when the shards
    do not split evenly the extra ones (which go to the lowest consumer numbers) spread over the ranks instead of
    piling up on the lowest ranks. On one rank it is the worker number."""
    return worker * world + rank


def consumer_plan(order: list[int], consumer: int, consumers: int) -> tuple[list[int], int, int]:
    """(shards this consumer reads, its member index m, the group size g): it keeps samples i of each of its shards
    with i % g == m. Whole shards (g = 1) when there are at least as many shards as consumers; otherwise consumer c
    joins the group of shard ``order[c % S]`` (S shards), whose ceil or floor of consumers / S members stride
    inside that one shard."""
    shards = len(order)
    if shards >= consumers:
        return order[consumer::consumers], 0, 1
    group = consumer % shards
    return [order[group]], consumer // shards, len(range(group, consumers, shards))


class SharedEpoch:
    """An epoch number in shared memory: set in the main process, read by (persistent) DataLoader workers."""

    def __init__(self) -> None:
        self._value = multiprocessing.RawValue("q", 0)  # passed to workers when they start (inheritance)

    @property
    def value(self) -> int:
        return int(self._value.value)

    @value.setter
    def value(self, epoch: int) -> None:
        self._value.value = epoch


class PairStream(IterableDataset):
    """Yields ``(view (3, r, r) float32, target row (D,) float16, ids (shard, row, view) int64)`` for one epoch
    (with ``extra_resolutions`` the view is a tuple: the view at ``resolution``, then at each extra side);
    with ``uint8_views`` the view is uint8 before normalisation where that is exact. With several carried taps the
    row is their features concatenated, (sum D_i,), read in the same one ``read_slot`` per (shard, view)."""

    def __init__(self, spec: StreamSpec) -> None:
        self.spec, self._epoch = spec, SharedEpoch()
        self.counts = {"pairs": 0, "skipped_cached": 0, "skipped_bad": 0}

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        """Also seen by persistent DataLoader workers (shared memory), before the epoch's ``iter(loader)``."""
        self._epoch.value = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        consumer, consumers = consumer_id(self.spec.rank, self.spec.world, wid), self.spec.world * nw
        store = open_store(self.spec.store)
        order = shard_order(self.spec.seed, self.epoch, len(self.spec.shard_paths))
        shards, member, group = consumer_plan(order, consumer, consumers)
        items = self._pairs(store, shards, member, group)
        yield from _shuffled(
            items, self.spec.shuffle_buffer, _stable_int(self.spec.seed, "buffer", self.epoch, consumer)
        )

    def _pairs(self, store: FeatureStore, shards: list[int], member: int, group: int) -> Iterator:
        first, stop = training_views(store, self.spec.views_used)
        fresh = fresh_recipe(store) if self.spec.fresh_views else None
        for shard in shards:
            path = self.spec.shard_paths[shard]
            if fresh:  # no cached row is read: the online teacher makes the targets
                view = fresh_view(self.epoch)
                block = with_fresh_views(store.read_slot(shard, taps=[], views=[]), view, *fresh)
            else:
                view = scheduled_view(self.spec.seed, shard, self.epoch, first, stop, self.spec.view_policy)
                block = store.read_slot(shard, taps=list(self.spec.carried), views=[view])
            seen = set()
            for i, sample in enumerate(iter_samples(path)):
                if i % group != member:  # another member of this shard's group pairs it
                    seen.add(sample.key)
                    continue
                pair = self._pair(shard, path, sample, block, view)
                seen.add(sample.key)
                if pair is not None:
                    yield pair
            self._check_complete(path, block, seen)

    def _pair(self, shard: int, path: str, sample: Sample, block: ShardBlock, view: int):
        """The sample's (view, target row, ids) triple, or None when it is skipped (and counted)."""
        try:
            joined = join_sample(block, sample, path, view, self.spec.resolution, self.spec.uint8_views,
                                 self.spec.extra_resolutions)  # fmt: skip
        except JoinError as err:
            return self._bad(err)
        if isinstance(joined, SkippedAtCaching):
            self.counts["skipped_cached"] += 1  # skipped (and recorded) when the cache was made
            return None
        self.counts["pairs"] += 1
        row = joined.row
        if self.spec.fresh_views:
            target = torch.zeros(0, dtype=torch.float16)  # the live teacher's targets replace the cached rows
        else:
            target = torch.from_numpy(joined_row([block.feature(t, row, view) for t in self.spec.carried]))
        return joined.views, target, torch.tensor([shard, row, view])

    def _bad(self, err: JoinError) -> None:
        """Raise ``err``, or with ``skip_bad`` count it and go on."""
        if not self.spec.skip_bad:
            raise err
        self.counts["skipped_bad"] += 1
        return None

    def _check_complete(self, path: str, block: ShardBlock, seen: set[str]) -> None:
        missing = [k for k, v in zip(block.keys, block.valid, strict=True) if v and k not in seen]
        if missing:
            self._bad(
                JoinError(
                    f"{path}: cached image {missing[0]!r} is missing from the shard ({len(missing)} missing); "
                    "the shard changed since caching",
                    "missing",
                )
            )


def joined_row(features: list[np.ndarray]) -> np.ndarray:
    """One sample's cached features, one (D_i,) array per carried tap -> its row (sum D_i,), taps concatenated in
    order (one tap: that array, contiguous, as a single-target run has always sent it)."""
    if len(features) == 1:
        return np.ascontiguousarray(features[0])
    return np.concatenate(features)


def _shuffled(items: Iterator, size: int, seed: int) -> Iterator:
    """A seeded shuffle buffer (deterministic for a given seed, epoch and consumer)."""
    if size <= 1:
        yield from items
        return
    rng = np.random.default_rng(seed)
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(size))
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


# Two odd 64-bit multipliers (splitmix64's) for the order-free fingerprint of an epoch's (shard, row, view) triples.
_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def pair_hashes(ids: np.ndarray) -> np.ndarray:
    """(n, 3) int (shard, row, view) -> (n,) uint64 well-mixed hashes (splitmix64 finaliser of a packed triple)."""
    ids = np.asarray(ids, dtype=np.uint64).reshape(-1, 3)
    with np.errstate(over="ignore"):
        z = ids[:, 0] * _MIX[0] + ids[:, 1] * _MIX[1] + ids[:, 2]
        z = (z ^ (z >> np.uint64(30))) * _MIX[1]
        z = (z ^ (z >> np.uint64(27))) * _MIX[2]
        return z ^ (z >> np.uint64(31))


def fingerprint(ids: np.ndarray) -> int:
    """An order-free fingerprint of a multiset of (shard, row, view) triples: the sum of their hashes mod 2**64
    (two multisets agree only if equal, up to a 2**-64 chance); sums of parts add up (ranks, batches)."""
    with np.errstate(over="ignore"):
        return int(pair_hashes(ids).sum(dtype=np.uint64))


def epoch_fingerprint(store: FeatureStore, seed: int, epoch: int, views: tuple[int, int], policy: str,
                      fresh: bool = False) -> int:  # fmt: skip
    """The fingerprint of every valid cached (shard, row) with its shard's scheduled view in ``epoch`` (or the
    epoch's fresh view): what one whole pass of the stream, over all ranks and workers, must deliver exactly once."""
    valid = store.valid().reshape(len(store.layout.shards), -1)
    shard, row = np.nonzero(valid)
    if fresh:
        view = np.full(len(shard), fresh_view(epoch))
    else:
        view = np.array([scheduled_view(seed, s, epoch, *views, policy) for s in range(valid.shape[0])])[
            shard
        ]
    return fingerprint(np.stack([shard, row, view], axis=1))
