"""Finding a cache's source shards again, and refusing ones that changed since caching."""

from __future__ import annotations

from pathlib import Path

from pipeline.cache.store import FeatureStore
from pipeline.data.shards import ShardError, list_shards
from pipeline.errors import KdepError


class SourceError(KdepError):
    """The shards given to stage 3 are not the ones the cache was made from."""


def source_shard_paths(store: FeatureStore, override: str = "") -> list[str]:
    """Paths of the cache's source shards in the cache's order, from ``override`` or the recorded source.

    Names, byte sizes and (where the listing has them) sample counts and sha256 must match the cache's record;
    per-image hashes are checked again while streaming.
    """
    spec = override or store.provenance["recorded"]["source"]
    try:
        listed = {s.name: s for s in list_shards(spec)}
    except ShardError as err:
        raise SourceError(
            f"cannot list the source shards of {store.path} ({err}); pass --shards with their new location"
        ) from None
    paths = []
    for rec in store.layout.shards:
        info = listed.get(rec["name"])
        if info is None:
            raise SourceError(
                f"{store.path} was cached from shard {rec['name']}, which is not in {spec}; pass --shards"
            )
        changed = info.nbytes != rec["nbytes"] or (
            info.samples is not None and info.samples != rec["samples"]
        )
        changed = changed or (info.sha256 is not None and rec.get("sha256") and info.sha256 != rec["sha256"])
        if changed:
            raise SourceError(
                f"shard {info.path} changed since {store.path} was cached (size, count or sha256 differs); "
                "restore it or re-run cache-teacher"
            )
        paths.append(str(Path(info.path)))
    return paths
