"""Stage 1's start-up: the input shards, which of them a resumed cache has done, and keys repeated across shards.

Start-up work follows the pending shards, not the finished ones:

- a fresh cache reads the 512-byte tar headers of every shard (:func:`pipeline.data.shards.scan_samples`: ~1% of an
  ImageNet shard's bytes), and hashes the shards no index describes (their sha256 is recorded);
- a resumed cache trusts its own record for what it has done. Every listed shard's cheap identity (name, size from
  a stat; sample count and sha256 where the index has them) must equal the cache's record, done shards' keys come
  from the cache's ``keys`` array, and only pending shards' headers are read. A pending shard that changed with the
  same size is caught when it is cached: its worker hashes it while reading it, against the recorded sha256.

Under torchrun each rank reads every world-th shard and every rank combines the gathered results the same way, so
all ranks agree on the shards, the done ones and the repeated keys.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.cache.store import encode_keys, open_store, zarr_path
from pipeline.cache.workers import CacheError
from pipeline.data.shards import ShardInfo, find_duplicates, list_shards, scan_counted
from pipeline.provenance import ProvenanceError
from pipeline.runtime import Dist, gather_from_ranks, on_main_rank


@dataclass(frozen=True)
class Inputs:
    """What stage 1 knows about its input shards once started."""

    shards: list[ShardInfo]  # in the cache's order, with sample counts and sha256
    duplicates: dict[int, dict[str, str]]  # shard index -> {key: the earlier shard holding it}
    done: list[int]  # shards a resumed cache has finished ([] for a new cache)


def recorded_shards(out: str | Path) -> list[dict] | None:
    """The source shard records of the cache at ``out``, or None when there is no cache there yet."""
    if not (zarr_path(out) / "zarr.json").exists():
        return None
    return open_store(out).layout.shards


def scan_inputs(spec: str, out: str | Path, job: Dist, skip_bad: bool) -> Inputs:
    """List the shards of ``spec`` and read what start-up needs of them for the cache at ``out`` (new or
    resumed, as rank 0 sees it: call under the writer lock). A key in two shards is refused (with ``skip_bad``,
    skipped in the later shard: the first occurrence wins, whatever the ranks or timing)."""
    listed = list_shards(spec)
    recorded = on_main_rank(lambda: recorded_shards(out))
    if recorded is None:
        shards, done, store = listed, [], None
    else:
        shards = trusted_shards(listed, recorded, out)
        store = open_store(out)
        parts = gather_from_ranks(lambda: store.finished(range(job.rank, len(shards), job.world)))
        done = sorted(i for part in parts for i in part)
        if len(done) == len(shards):
            return Inputs(shards, {}, done)  # nothing to write, nothing to read
    skip = set(done)
    pending = [i for i in range(len(shards)) if i not in skip]

    def my_share() -> list[tuple[int, ShardInfo, list[str]]]:
        scanned = [(i, *scan_counted(shards[i])) for i in pending[job.rank :: job.world]]
        for _, info, keys in scanned:
            encode_keys(keys, where=f"shard {info.path}")  # refuse a key the store cannot hold, up front
        lo, hi = len(done) * job.rank // job.world, len(done) * (job.rank + 1) // job.world
        recalled = store.keys_of(done[lo:hi]).items() if store is not None else ()
        return scanned + [(i, shards[i], keys) for i, keys in recalled]  # done: a contiguous run per rank

    merged = sorted((item for part in gather_from_ranks(my_share) for item in part), key=lambda t: t[0])
    shards = [info for _, info, _ in merged]
    dups = find_duplicates([s.name for s in shards], [keys for _, _, keys in merged])
    if dups and not skip_bad:
        i, found = next(iter(dups.items()))
        key, owner = next(iter(found.items()))
        raise CacheError(f"key {key!r} appears in shard {owner} and in shard {shards[i].name}; keys must be unique "
                         "across shards (re-make the shards with unique keys, or pass --skip-bad)")  # fmt: skip
    return Inputs(shards, dups, done)


def trusted_shards(listed: list[ShardInfo], recorded: list[dict], out: str | Path) -> list[ShardInfo]:
    """The listed shards with the cache's recorded counts and sha256, after checking each one's cheap identity
    (name and order, size; count and sha256 where the listing has them) against the record; nothing is read."""
    names, stored = [s.name for s in listed], [r["name"] for r in recorded]
    if names != stored:
        first = next(
            (i for i, (a, b) in enumerate(zip(names, stored, strict=False)) if a != b),
            min(len(names), len(stored)),
        )
        raise ProvenanceError(
            f"the shards listed differ from those the cache at {out} was started with ({len(names)} listed, "
            f"{len(stored)} recorded; first difference at position {first}: "
            f"{_at(names, first)} vs recorded {_at(stored, first)}); resume with the original shards or choose "
            "another --out"
        )
    out_shards = []
    for info, rec in zip(listed, recorded, strict=True):
        changed = [
            f"{what} {now} now, {then} recorded"
            for what, now, then in (
                ("bytes", info.nbytes, rec["nbytes"]),
                ("samples", info.samples, rec["samples"]),
                ("sha256", info.sha256, rec["sha256"]),
            )
            if now is not None and now != then
        ]
        if changed:
            raise ProvenanceError(
                f"shard {info.path} changed since the cache at {out} was started ({'; '.join(changed)}); restore "
                "the original shard, or start a new cache with another --out"
            )
        out_shards.append(replace(info, samples=rec["samples"], sha256=rec["sha256"]))
    return out_shards


def _at(names: list[str], i: int) -> str:
    return names[i] if i < len(names) else "(none)"
