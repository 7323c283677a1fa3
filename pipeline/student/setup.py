"""What a stage 3 run is built from, before its first step: the per-rank batch, the checked inputs (complete
cache, projections fitted on it), numerics, this rank's loader spec, and what the run says and records about
itself at start (the banner, the frozen parameters, the run record in provenance.json)."""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

from pipeline.cache.store import FeatureStore, StoreError
from pipeline.data.views import transport_bytes
from pipeline.errors import KdepError
from pipeline.projection.artefact import Projection, load_projection
from pipeline.provenance import require_same
from pipeline.runtime import Dist, resolve_amp, resolve_workers, set_tf32, shared_memory_note
from pipeline.student.loaders import LoaderSpec
from pipeline.student.pairs import StreamSpec
from pipeline.student.specs import StudentSpec, TrainSpec
from pipeline.student.trainees import Trainee


def per_rank_batch(spec: TrainSpec, job: Dist) -> TrainSpec:
    """``spec`` with the per-rank batch of its global batch (``recipe.global_batch``; 0 keeps ``batch_size`` per
    rank): global / world images per rank and step, or, for neighbour batches, global / world / (1 + neighbours)
    anchors per rank. A global batch the ranks cannot share evenly is refused in one line."""
    total, d = spec.recipe.global_batch, spec.data
    if not total:
        return spec
    group = 1 + d.neighbours if d.neighbours else 1
    if total % (job.world * group):
        unit = f"{job.world} rank(s)" + (f" x {group} images per anchor group" if group > 1 else "")
        raise KdepError(
            f"global_batch_size {total} does not split over {unit}; use a multiple of {job.world * group} "
            "(or set batch_size per rank and global_batch_size 0)"
        )
    per_rank = total // job.world
    if d.neighbours:
        return replace(spec, data=replace(d, anchors=per_rank // group))
    return replace(spec, recipe=replace(spec.recipe, batch_size=per_rank))


def run_line(
    spec: TrainSpec, store: FeatureStore, job: Dist, trainees: list[Trainee], loader: LoaderSpec
) -> str:
    """The start-up line: students, images, epochs, ranks, per-rank and global batch, lr, workers."""
    names = ", ".join(t.name for t in trainees)
    lrs = ", ".join(f"{t.base_lr:g}" for t in trainees)
    return (f"train-student: {names} on {int(store.valid().sum())} images x {spec.recipe.epochs} epochs, "
            f"{job.world} rank(s) x {spec.batch_per_rank} = global batch {spec.batch_per_rank * job.world}, lr {lrs}, "
            f"{loader.workers} worker(s) per rank")  # fmt: skip


def print_banner(line: str, loader: LoaderSpec, store: FeatureStore, sides: tuple[int, ...]) -> None:
    """The start-up line and what the DataLoader's batches hold in /dev/shm (views at every side they travel at,
    float32 when the cache's recipe has colour operations, and the float16 rows), on stderr."""
    recipe = store.provenance["views"]["recipe"]
    per_image = sum(transport_bytes(recipe, side) for side in sides) + 2 * sum(store.layout.dims.values())
    print(line, file=sys.stderr)
    if loader.workers:
        note = shared_memory_note(
            "train-student", loader.workers, loader.prefetch_factor, loader.batch_size * per_image
        )
        print(note, file=sys.stderr)


def run_record(spec: TrainSpec, job: Dist, amp: str, tf32: bool) -> dict:
    """How the run executed (provenance.json): world size, per-rank and global batch, precision."""
    return {"world_size": job.world, "batch_per_rank": spec.batch_per_rank,
            "global_batch": spec.batch_per_rank * job.world, "amp": amp, "tf32": tf32,
            "views": "fresh" if spec.data.fresh_views else "cached"}  # fmt: skip


def report_frozen(trainees: list[Trainee], job: Dist, quiet: bool) -> None:
    """One line per student with parameters no target reaches (frozen before DDP; names in provenance.json)."""
    if quiet or not job.is_main:
        return
    for t in trainees:
        if t.frozen:
            groups = sorted({".".join(n.split(".")[:3]) for n in t.frozen})
            shown = ", ".join(groups[:4]) + (f", ... ({len(groups)} modules)" if len(groups) > 4 else "")
            print(f"train-student: {t.name}: {len(t.frozen)} parameter tensor(s) that no target reaches are frozen "
                  f"({shown}); provenance.json lists them")  # fmt: skip


def configure_numerics(device: torch.device, amp: str) -> tuple[str, bool]:
    """The resolved AMP mode and whether TF32 may be used; on CUDA, cuDNN picks the fastest algorithms for the
    fixed input shapes (not in stage 1, whose cache must be byte-identical across runs) and amp "off" also turns
    TF32 off (float32 means float32)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp = resolve_amp(amp, device)
    return amp, set_tf32(device, amp)


def require_complete(store: FeatureStore, taps: str | tuple[str, ...]) -> None:
    """Training reads every shard: refuse an unfinished cache (naming what is missing) or a tap it does not hold."""
    for tap in (taps,) if isinstance(taps, str) else taps:
        if tap not in store.layout.dims:
            raise StoreError(
                f"{store.path} has no tap {tap!r} (it has: {', '.join(store.layout.dims)}); name a cached tap in "
                "--tap / --targets STUDENT_TAP=CACHE_TAP, or re-cache with `kdep cache-teacher --taps ...`"
            )
        store.feature_array(tap)  # StoreError naming the taps it has
    missing = store.missing_shards()
    if missing:
        raise StoreError(
            f"{store.path} is not complete: {len(missing)} shard(s) not cached yet, e.g. {missing[0]}; "
            "finish `kdep cache-teacher` (it resumes) before training"
        )


def load_checked_projection(path: str | None, store: FeatureStore, tap: str) -> Projection | None:
    """A projection fitted on this very cache and tap (anything else is refused naming the difference); None for
    no path."""
    if path is None:
        return None
    proj = load_projection(path)
    fitted = {"cache_fingerprint": proj.meta.get("cache_fingerprint"), "tap": proj.meta.get("tap")}
    require_same(
        f"projection {path}",
        fitted,
        {"cache_fingerprint": store.fingerprint(), "tap": tap},
        f"fit it on {store.path} (kdep fit-svd {store.path} --tap {tap})",
    )
    return proj


def student_projections(
    student: StudentSpec, spec: TrainSpec, store: FeatureStore
) -> tuple[Projection | None, ...]:
    """The student's projection of each target, each checked against this cache and the target's cache tap."""
    if len(student.projections) != len(spec.targets):
        raise KdepError(
            f"student {student.arch}: {len(student.projections)} projection(s) for {len(spec.targets)} target(s); "
            "give one per target (--projection a.npz,b.npz per student)"
        )
    return tuple(
        load_checked_projection(p, store, t.cache_tap)
        for p, t in zip(student.projections, spec.targets, strict=True)
    )


def loader_spec(spec: TrainSpec, store: str, shard_paths: tuple[str, ...], resolution: int, job: Dist,
                device: torch.device, extra_resolutions: tuple[int, ...] = ()) -> LoaderSpec:  # fmt: skip
    """This rank's loader: the key-joined stream over the shards, or neighbour-mined batches (``extra_resolutions``:
    the online teacher's own input sides, replayed besides the student's)."""
    d = spec.data
    stream = StreamSpec(store=store, shard_paths=shard_paths, tap=d.taps[0], resolution=resolution, seed=spec.recipe.seed,
                        view_policy=d.view_policy, shuffle_buffer=d.shuffle_buffer, skip_bad=d.skip_bad,
                        rank=job.rank, world=job.world, uint8_views=True, views_used=d.views_used,
                        taps=d.taps if len(d.taps) > 1 else (), extra_resolutions=extra_resolutions,
                        fresh_views=d.fresh_views)  # fmt: skip
    return LoaderSpec(stream, spec.recipe.batch_size, resolve_workers(spec.runtime.workers), device.type == "cuda",
                      d.neighbours, d.neighbour_pool, d.anchors, prefetch_factor=spec.runtime.prefetch_factor,
                      mine_device=str(device), quiet=spec.output.quiet)  # fmt: skip
