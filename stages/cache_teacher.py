"""Stage 1 `cache-teacher`: a frozen teacher over K augmented views per image -> a Zarr feature cache.

    kdep cache-teacher --shards 'train-{000000..000146}.tar' --teacher resnet50 --weights IMAGENET1K_V2 \\
        --views 10 --resolution 224 --out cache
    torchrun --nproc_per_node 8 --no-python kdep cache-teacher --manifest manifests/imagenet10p-r50.yaml
    make cache-teacher MANIFEST=manifests/demo.yaml
    kdep cache-teacher --shards ... --teacher cnn=resnet50 --weights IMAGENET1K_V2 \
        --teacher dino=timm:vit_base_patch14_dinov2.lvd142m --weights pretrained \
        --tap cnn/pre_relu --tap dino/pooled --resolution 224 --out cache2   # two teachers, one pass

Reads the input shards (and their index.json when present) and the teacher weights. Writes the cache folder
described in ``pipeline/cache/store.py``: ``store.zarr`` (features per tap, view parameters, image sizes and hashes,
keys) and, beside it, per-shard done markers, ``config.cache_teacher.json`` and ``runs.jsonl``. Checks every teacher
batch against the stored dtype (``--out-of-range``). Several teachers (``LABEL=NAME`` each, see ``pipeline/teachers.py``) run in one pass: each image is
decoded once and each view replayed once per distinct teacher resolution (``--teacher-resolution``), and each
teacher's taps are stored as ``LABEL/TAP``. Re-running resumes: done shards are skipped, and the
result is identical to an uninterrupted run. Start-up reads only tar headers (512 bytes each), of every shard for a
new cache and of the pending shards on a resume (``pipeline/cache/inputs.py``); each shard's buffers exist only
while it is in flight. Under torchrun, ranks split the shards; the store does not depend
on the number of ranks. A failure on any rank ends every rank with its one-line message; collectives wait at most
``KDEP_DIST_TIMEOUT_S`` seconds (default 3600), and ``KDEP_DIST_BACKEND=gloo`` lets several ranks share one GPU.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import typer
from torch import nn

from pipeline.cache.inputs import Inputs, scan_inputs
from pipeline.cache.store import CacheLayout, FeatureStore, create_store, open_store, zarr_path
from pipeline.cache.teacher import PREFETCH, Runtime, TeacherRun, cache_shards, prepare_teacher
from pipeline.cache.workers import CacheError, ShardTask, ViewSpec
from pipeline.data.shards import ShardInfo, shard_record
from pipeline.data.views import CENTER_BOX_RULES, RECIPES, describe_preprocessing, transport_bytes
from pipeline.failures import shared_failures
from pipeline.models import (
    Preprocessing,
    build_for_resolution,
    build_model,
    model_preprocessing,
    tap_definitions,
    tap_dims,
)
from pipeline.provenance import StoreLock, library_versions, require_same
from pipeline.runtime import (
    Dist,
    gather_from_ranks,
    init_distributed,
    local_leader_first,
    on_every_rank,
    on_main_rank,
    pick_device,
    resolve_amp,
    resolve_workers,
    set_tf32,
    shared_memory_note,
    shutdown,
)
from pipeline.teachers import TeacherSpec, cache_tap, teacher_specs
from stages.common import write_resolved_config
from stages.config import CacheTeacherConfig


@dataclass
class LoadedTeacher:
    """One teacher, loaded: its spec, model, weights identity, taps' widths and preprocessing."""

    spec: TeacherSpec
    model: nn.Module
    identity: dict
    dims: dict[str, int]  # tap -> D
    prep: Preprocessing


def run(config: CacheTeacherConfig) -> dict:
    """Create or resume the cache and fill every shard's slot; returns this rank's counts and timing."""
    device = pick_device(config.device)
    job = init_distributed(str(device))
    try:
        with shared_failures("cache-teacher"):
            return _cache(config, device, job)
    finally:
        shutdown()


def _cache(config: CacheTeacherConfig, device: torch.device, job: Dist) -> dict:
    amp = resolve_amp(config.amp, device)
    tf32 = set_tf32(device, amp)  # off with --amp off on CUDA, so the cache matches a float32 recomputation
    rt = Runtime(device, amp, config.channels_last, resolve_workers(config.workers), config.skip_bad,
                 not config.quiet and job.is_main, config.out_of_range)  # fmt: skip
    lock = StoreLock(config.out)
    try:
        take_lock(config.out, lock, job)  # held from here: what is done cannot change under us
        inputs = scan_inputs(config.shards, config.out, job, config.skip_bad)
        teachers = load_teachers(config)
        config = replace(config, resolution=teachers[0].prep.resolution)  # 0 meant the (first) teacher's own
        provenance = build_provenance(config, teachers, inputs.shards, amp, tf32)
        store = open_shared_store(config, cache_layout(config, teachers, inputs), provenance)
        tasks = pending_tasks(inputs, job)
        if rt.progress:
            print_banner(store, inputs.shards, tasks, len(inputs.done), job, rt)
        spec = view_spec(config, teachers)
        if rt.progress and rt.workers:
            typer.echo(shared_memory_need(config, spec, rt.workers), err=True)
        results = gather_from_ranks(lambda: cache_share(store, tasks, teachers, spec, rt))
        stats = finish_run(store, job, config, results, inputs.done)
        stats["shards_total"] = len(inputs.shards)
    finally:
        lock.release()
    return stats


def load_teachers(config: CacheTeacherConfig) -> list[LoadedTeacher]:
    """Every teacher of the run, each at its input side (``--teacher-resolution``, default ``--resolution``)."""
    specs = teacher_specs(config.teacher, config.weights, config.taps)
    sides = config.teacher_resolution or (config.resolution,) * len(specs)
    return local_leader_first(lambda: [load_teacher(s, r, config) for s, r in zip(specs, sides, strict=True)])


def cache_layout(config: CacheTeacherConfig, teachers: list[LoadedTeacher], inputs: Inputs) -> CacheLayout:
    """The store's shapes: the shards' records, K and each stored tap's width."""
    dims = {cache_tap(t.spec.label, tap, len(teachers) > 1): d for t in teachers for tap, d in t.dims.items()}
    return CacheLayout([shard_record(s) for s in inputs.shards], config.views, dims, config.dtype)


def view_spec(config: CacheTeacherConfig, teachers: list[LoadedTeacher]) -> ViewSpec:
    """How views are drawn and rendered: the first teacher's side, plus each other teacher's."""
    others = tuple(sorted({t.prep.resolution for t in teachers} - {config.resolution}))
    return ViewSpec(config.recipe, config.seed, config.views, config.resolution, config.center_view,
                    max(1, config.batch_size // config.views), config.center_recipe, others)  # fmt: skip


def shared_memory_need(config: CacheTeacherConfig, spec: ViewSpec, workers: int) -> str:
    """The /dev/shm note: each worker keeps PREFETCH batches of rendered views (every teacher side) in flight."""
    per_view = sum(
        transport_bytes(config.recipe, side) for side in (config.resolution, *spec.extra_resolutions)
    )
    return shared_memory_note(
        "cache-teacher", workers, PREFETCH, spec.images_per_batch * config.views * per_view
    )


def load_teacher(spec: TeacherSpec, resolution: int, config: CacheTeacherConfig) -> LoadedTeacher:
    """A teacher model, its weights identity, its taps' widths and its preprocessing (run on each node's local
    rank 0 first, so library weights are downloaded once per node and the other ranks load them from that node's
    cache). A model that takes one input side only (a timm ViT) is built for ``resolution`` (0: its own)."""
    weights = None if spec.weights == "random" else spec.weights
    if resolution:
        model, identity = build_for_resolution(spec.arch, weights, resolution)
    else:
        model, identity = build_model(spec.arch, weights)
    prep = teacher_preprocessing(model, identity, replace(config, resolution=resolution))
    return LoadedTeacher(spec, model, identity, tap_dims(model, spec.taps, prep.resolution), prep)


def teacher_preprocessing(model: nn.Module, identity: dict, config: CacheTeacherConfig) -> Preprocessing:
    """The teacher's own normalisation and resolution (its library's), with ``--resolution``, ``--mean`` and
    ``--std`` overriding them where given."""
    prep = model_preprocessing(model, identity)
    wanted = {"resolution": config.resolution, "mean": tuple(config.mean), "std": tuple(config.std)}
    changes = {k: v for k, v in wanted.items() if v and v != getattr(prep, k)}
    return prep.override(**changes) if changes else prep


def teacher_record(t: LoadedTeacher) -> dict:
    """What the provenance says of one teacher: identity, taps, widths, normalisation, what each tap is."""
    identity = {k: v for k, v in t.identity.items() if k != "path"}
    defs = tap_definitions(t.model)
    return {"arch": t.spec.arch, "weights": identity, "taps": list(t.spec.taps), "dims": t.dims,
            "normalization": t.prep.to_dict(), "tap_definitions": {x: defs[x] for x in t.spec.taps}}  # fmt: skip


def weights_path(weights: str) -> str:
    """Where a weights file is (recorded, for rebuilding the teacher), or the library weights name."""
    return str(Path(weights).resolve()) if Path(weights).is_file() else weights


def build_provenance(
    config: CacheTeacherConfig,
    teachers: list[LoadedTeacher],
    shards: list[ShardInfo],
    amp: str,
    tf32: bool,
) -> dict:
    """Everything that determines the cached numbers (compared on resume), plus versions and sources (recorded).
    One teacher: a ``teacher`` record; several: a ``teachers`` list, each record with its ``label`` and input
    ``resolution`` (``preprocessing.resolution`` is the first teacher's, the students' default). A teacher's
    ``normalization`` (its own mean/std) is applied to the ImageNet-normalised replayed view by
    :class:`pipeline.models.Renormalize` (a no-op for ImageNet's values)."""
    recorded = {"versions": library_versions(), "source": os.path.abspath(config.shards)}
    if len(teachers) == 1:
        who = {"teacher": teacher_record(teachers[0])}
        recorded["weights_path"] = weights_path(teachers[0].spec.weights)
    else:
        who = {"teachers": [{"label": t.spec.label, "resolution": t.prep.resolution, **teacher_record(t)}
                            for t in teachers]}  # fmt: skip
        recorded["weights_paths"] = {t.spec.label: weights_path(t.spec.weights) for t in teachers}
    return {
        **who,
        "preprocessing": describe_preprocessing(config.resolution),
        "views": {"recipe": config.recipe, "recipe_params": asdict(RECIPES[config.recipe]), "k": config.views,
                  "seed": config.seed, "center_first": config.center_view,
                  "center_recipe": config.center_recipe if config.center_view else None, **center_boxes(config)},
        "compute": {"amp": amp, "tf32": tf32, "feature_dtype": config.dtype,
                    "batch_views": max(1, config.batch_size // config.views) * config.views},
        "shards": [shard_record(s) for s in shards],
        "recorded": recorded,
    }  # fmt: skip


def center_boxes(config: CacheTeacherConfig) -> dict:
    """``{"center_box": {recipe: rule}}`` for the centre recipes used whose box follows a reference geometry
    (pipeline.data.views.CENTER_BOX_RULES); nothing otherwise, so other caches' records are unchanged. A cache
    started before a rule existed holds other boxes: the record makes a resume with this code refuse it."""
    used = (config.recipe, config.center_recipe if config.center_view else None)
    rules = {r: CENTER_BOX_RULES[r] for r in used if r in CENTER_BOX_RULES}
    return {"center_box": rules} if rules else {}


def _compared(provenance: dict) -> dict:
    """What a resume must match: everything but "recorded" (versions, paths)."""
    return {k: v for k, v in provenance.items() if k != "recorded"}


def take_lock(out: str, lock: StoreLock, job: Dist) -> None:
    """Rank 0 takes the writer lock and broadcasts the job id; the other ranks join under that id (never by
    reading the lock file, which another node may see stale)."""

    def acquire() -> str:
        Path(out).mkdir(parents=True, exist_ok=True)
        return lock.acquire()

    job_id = on_main_rank(acquire)
    if not job.is_main:
        lock.join(job_id)


def open_shared_store(config: CacheTeacherConfig, layout: CacheLayout, provenance: dict) -> FeatureStore:
    """Rank 0 (holding the lock) creates the store or checks it against the request, then every rank opens it."""

    def prepare() -> None:
        if (zarr_path(config.out) / "zarr.json").exists():
            stored = open_store(config.out)
            require_same(
                f"the cache at {config.out}",
                _compared(stored.provenance),
                _compared(provenance),
                "resume with the original settings and data, or choose another --out",
            )
        else:
            create_store(config.out, layout, provenance)
        write_resolved_config(config.out, "cache_teacher", config)

    on_main_rank(prepare)
    return on_every_rank(lambda: open_store(config.out, mode="r+"))


def pending_tasks(inputs: Inputs, job: Dist) -> list[ShardTask]:
    """This rank's share of the shards not yet done (every rank splits the same list)."""
    skip = set(inputs.done)
    todo = [i for i in range(len(inputs.shards)) if i not in skip]
    shards, dups = inputs.shards, inputs.duplicates
    return [ShardTask(i, shards[i].path, shards[i].name, shards[i].samples, shards[i].sha256, dups.get(i, {}))
            for i in todo[job.rank :: job.world]]  # fmt: skip


def cache_share(
    store: FeatureStore, tasks: list[ShardTask], teachers: list[LoadedTeacher], spec: ViewSpec, rt: Runtime
) -> tuple[dict, list[int]]:
    """This rank's shards through the teacher(s); returns its counts and the shards whose done marker it sees (it
    wrote them, so no other node's cache of the directory is involved)."""
    several = len(teachers) > 1
    runs = [TeacherRun(t.spec.label, prepare_teacher(t.model, t.spec.taps, rt, t.prep), t.prep.resolution,
                       {tap: cache_tap(t.spec.label, tap, several) for tap in t.spec.taps}) for t in teachers]  # fmt: skip
    stats = cache_shards(store, tasks, runs, spec, rt)
    return stats, store.finished([t.index for t in tasks])


def print_banner(
    store: FeatureStore, shards: list[ShardInfo], tasks: list[ShardTask], done: int, job: Dist, rt: Runtime
) -> None:
    lay = store.layout
    images = sum(s.samples for s in shards)
    raw = images * lay.views * sum(lay.dims.values()) * np.dtype(lay.dtype).itemsize
    taps = ", ".join(f"{t}:{d}" for t, d in lay.dims.items())
    typer.echo(
        f"cache-teacher: {images} images in {len(shards)} shards ({done} done), K={lay.views} views, "
        f"taps {taps}, {lay.dtype} ~{raw / 2**30:.2f} GiB before compression, ranks {job.world}, "
        f"device {rt.device}, amp {rt.amp}, workers {rt.workers}",
        err=True,
    )


def finish_run(
    store: FeatureStore, job: Dist, config: CacheTeacherConfig, results: list[tuple], done: list[int]
) -> dict:
    """Rank 0 checks that every shard is durably done, from the ranks' own reports (its listing of a shared
    directory may be stale), and appends the run log; a failure there is raised on every rank."""
    everyone = [stats for stats, _ in results]
    finished = set(done).union(*(set(f) for _, f in results))

    def check_and_log() -> None:
        missing = [s["name"] for i, s in enumerate(store.layout.shards) if i not in finished]
        if missing:
            raise CacheError(
                f"{config.out}: {len(missing)} shard(s) have no done marker after the run (e.g. {missing[0]}); "
                "re-run cache-teacher to resume them"
            )
        log = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "ranks": job.world, "per_rank": everyone}
        with open(Path(config.out) / "runs.jsonl", "a") as fh:
            fh.write(json.dumps(log) + "\n")

    on_main_rank(check_and_log)
    return everyone[job.rank]


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
