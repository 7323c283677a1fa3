"""Stage 1 `cache-teacher`: a frozen teacher over K augmented views per image -> a Zarr feature cache.

    kdep cache-teacher --shards 'train-{000000..000146}.tar' --teacher resnet50 --weights IMAGENET1K_V2 \\
        --views 10 --resolution 224 --out cache.zarr
    torchrun --nproc_per_node 8 --no-python kdep cache-teacher --manifest manifests/imagenet10p-r50.yaml
    make cache-teacher MANIFEST=manifests/demo.yaml

Reads the input shards (and their index.json when present) and the teacher weights. Writes the store described in
``pipeline/cache/store.py`` (features per tap, view parameters, image sizes and hashes, keys, per-shard done markers),
``config.cache_teacher.json`` and ``runs.jsonl`` inside it. Re-running resumes: done shards are skipped, and the
result is identical to an uninterrupted run. Under torchrun, ranks split the shards; the store does not depend
on the number of ranks.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import typer

from pipeline.cache.store import CacheLayout, FeatureStore, create_store, open_store
from pipeline.cache.teacher import Runtime, cache_shards, prepare_teacher
from pipeline.cache.workers import CacheError, ShardTask, ViewSpec
from pipeline.data.shards import ShardInfo, duplicate_keys, list_shards, shard_record, with_counts
from pipeline.data.views import RECIPES, describe_preprocessing
from pipeline.errors import KdepError
from pipeline.models import build_model, tap_dims
from pipeline.provenance import StoreLock, library_versions, require_same
from pipeline.runtime import (
    Dist,
    all_gather_objects,
    barrier,
    broadcast_object,
    init_distributed,
    pick_device,
    resolve_amp,
)
from stages.common import write_resolved_config
from stages.config import CacheTeacherConfig


def run(config: CacheTeacherConfig) -> dict:
    """Create or resume the cache and fill every shard's slot; returns this rank's counts and timing."""
    device = pick_device(config.device)
    job = init_distributed(str(device))
    rt = Runtime(
        device,
        resolve_amp(config.amp, device),
        config.channels_last,
        config.workers,
        config.skip_bad,
        progress=not config.quiet and job.is_main,
    )
    shards = with_counts(list_shards(config.shards))
    model, identity = build_model(config.teacher, None if config.weights == "random" else config.weights)
    dims = tap_dims(model, config.taps, config.resolution)
    provenance = build_provenance(config, identity, dims, shards, rt.amp)
    layout = CacheLayout(
        shards=[shard_record(s) for s in shards], views=config.views, dims=dims, dtype=config.dtype
    )
    lock = StoreLock(config.out)
    store = open_shared_store(config, layout, provenance, job, lock)
    try:
        tasks = pending_tasks(store, shards, job, config.skip_bad)
        if rt.progress:
            print_banner(store, shards, tasks, job, rt)
        spec = ViewSpec(
            config.recipe,
            config.seed,
            config.views,
            config.resolution,
            config.center_view,
            max(1, config.batch_size // config.views),
        )
        stats = cache_shards(store, tasks, prepare_teacher(model, config.taps, rt), spec, rt)
        stats["shards_total"] = len(shards)
        finish_run(store, job, config, stats)
    finally:
        lock.release()
    return stats


def build_provenance(
    config: CacheTeacherConfig, identity: dict, dims: dict, shards: list[ShardInfo], amp: str
) -> dict:
    """Everything that determines the cached numbers (compared on resume), plus versions and sources (recorded)."""
    identity = {k: v for k, v in identity.items() if k != "path"}
    return {
        "teacher": {"arch": config.teacher, "weights": identity, "taps": list(config.taps), "dims": dims},
        "preprocessing": describe_preprocessing(config.resolution),
        "views": {"recipe": config.recipe, "recipe_params": asdict(RECIPES[config.recipe]), "k": config.views,
                  "seed": config.seed, "center_first": config.center_view},
        "compute": {"amp": amp, "feature_dtype": config.dtype, "batch_views": max(1, config.batch_size // config.views) * config.views},
        "shards": [shard_record(s) for s in shards],
        "recorded": {"versions": library_versions(), "source": os.path.abspath(config.shards),
                     "weights_path": str(Path(config.weights).resolve()) if Path(config.weights).is_file() else config.weights},
    }  # fmt: skip


def _compared(provenance: dict) -> dict:
    return {k: v for k, v in provenance.items() if k != "recorded"}


def open_shared_store(
    config: CacheTeacherConfig, layout: CacheLayout, provenance: dict, job: Dist, lock: StoreLock
) -> FeatureStore:
    """Rank 0 locks, then creates or checks the store; the other ranks join under the same job id."""
    failure: KdepError | None = None
    job_id = ""
    if job.is_main:
        try:
            job_id = _lock_and_prepare(config, layout, provenance, lock)
        except KdepError as err:
            lock.release()
            failure = err
    status = broadcast_object(("error", str(failure)) if failure else ("ok", job_id))
    if failure is not None:
        raise failure
    if status[0] == "error":
        raise CacheError(status[1])
    if not job.is_main:
        lock.check_member(status[1])
    else:
        write_resolved_config(config.out, "cache_teacher", config)
    return open_store(config.out, mode="r+")


def _lock_and_prepare(
    config: CacheTeacherConfig, layout: CacheLayout, provenance: dict, lock: StoreLock
) -> str:
    Path(config.out).mkdir(parents=True, exist_ok=True)
    job_id = lock.acquire()
    if (Path(config.out) / "zarr.json").exists():
        stored = open_store(config.out)
        require_same(
            f"the cache at {config.out}",
            _compared(stored.provenance),
            _compared(provenance),
            "resume with the original settings and data, or choose another --out",
        )
    else:
        create_store(config.out, layout, provenance)
    return job_id


def pending_tasks(store: FeatureStore, shards: list[ShardInfo], job: Dist, skip_bad: bool) -> list[ShardTask]:
    """This rank's share of the shards not yet done. Rank 0 reads the done markers and scans the keys once and
    broadcasts both, so every rank splits the same list; a key already in an earlier shard is refused up front
    (or, with --skip-bad, skipped in the later shard: the first occurrence wins, whatever the ranks or timing)."""
    plan: tuple = ("ok", [], {})
    if job.is_main:
        done, dups = sorted(store.done()), duplicate_keys(shards)
        if dups and not skip_bad:
            i, found = next(iter(dups.items()))
            key, owner = next(iter(found.items()))
            plan = ("error", f"key {key!r} appears in shard {owner} and in shard {shards[i].name}; keys must be unique "
                             "across shards (re-make the shards with unique keys, or pass --skip-bad)", {})  # fmt: skip
        else:
            plan = ("ok", done, dups)
    status, done, dups = broadcast_object(plan)
    if status == "error":
        raise CacheError(done)
    todo = [i for i in range(len(shards)) if i not in set(done)]
    return [ShardTask(i, shards[i].path, shards[i].name, shards[i].samples, shards[i].sha256, dups.get(i, {}))
            for i in todo[job.rank :: job.world]]  # fmt: skip


def print_banner(
    store: FeatureStore, shards: list[ShardInfo], tasks: list[ShardTask], job: Dist, rt: Runtime
) -> None:
    lay = store.layout
    images = sum(s.samples for s in shards)
    raw = images * lay.views * sum(lay.dims.values()) * np.dtype(lay.dtype).itemsize
    done = len(store.done())
    taps = ", ".join(f"{t}:{d}" for t, d in lay.dims.items())
    typer.echo(
        f"cache-teacher: {images} images in {len(shards)} shards ({done} done), K={lay.views} views, "
        f"taps {taps}, {lay.dtype} ~{raw / 2**30:.2f} GiB before compression, ranks {job.world}, "
        f"device {rt.device}, amp {rt.amp}, workers {rt.workers}",
        err=True,
    )


def finish_run(store: FeatureStore, job: Dist, config: CacheTeacherConfig, stats: dict) -> None:
    """Wait for every rank; rank 0 checks that every shard is durably done and appends the run log."""
    everyone = all_gather_objects(stats)
    barrier()
    if not job.is_main:
        return
    missing = store.missing_shards()
    if missing:
        raise CacheError(
            f"{config.out}: {len(missing)} shard(s) have no done marker after the run (e.g. {missing[0]}); "
            "re-run cache-teacher to resume them"
        )
    log = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "ranks": job.world, "per_rank": everyone}
    with open(Path(config.out) / "runs.jsonl", "a") as fh:
        fh.write(json.dumps(log) + "\n")


def report(config: CacheTeacherConfig, stats: dict) -> None:
    """Under torchrun only rank 0 reports (runs.jsonl has every rank's counts)."""
    if os.environ.get("RANK", "0") != "0":
        return
    several = os.environ.get("WORLD_SIZE", "1") != "1"
    if stats["shards"] == 0 and not several:
        typer.echo(f"nothing to do: all {stats['shards_total']} shards of {config.out} are already cached")
        return
    typer.echo(
        f"cached {stats['images']} images{' on rank 0' if several else ''} ({stats['skipped']} skipped) from "
        f"{stats['shards']} shards in {stats['seconds']:.1f} s ({stats['images_per_s']:.1f} img/s) -> {config.out}"
    )
