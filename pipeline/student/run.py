"""Stage 3's loop: build students, stream pairs, step, checkpoint, export. ``train_students`` is the whole run.

It reads typed specs (``pipeline.student.specs``), never a stage's config object; the stage's resolved settings
come in as a plain dict, only to be recorded (provenance.json, checkpoints) and compared on resume.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.cache.join import rebuild_teacher, source_shard_paths
from pipeline.cache.store import FeatureStore, StoreError, open_store
from pipeline.errors import KdepError
from pipeline.files import write_json_atomic
from pipeline.models import FeatureTaps, parse_model_name
from pipeline.progress import progress_bar
from pipeline.projection.artefact import Projection, load_projection
from pipeline.provenance import require_same
from pipeline.runtime import (
    Dist,
    barrier,
    init_distributed,
    local_leader_first,
    pick_device,
    resolve_amp,
    set_tf32,
    shutdown,
)
from pipeline.student.checkpoints import (
    append_metrics,
    checkpoint_due,
    checkpoint_state,
    export_backbone,
    plot_losses,
    read_metrics,
    resume,
    save_checkpoint,
    write_provenance,
)
from pipeline.student.loaders import LoaderSpec, PairLoaders, batches, resolve_workers
from pipeline.student.pairs import StreamSpec, training_views
from pipeline.student.specs import StudentSpec, TrainSpec
from pipeline.student.training import (
    StepContext,
    Trainee,
    build_trainees,
    lr_at,
    teacher_rows,
    train_step,
    views_on_device,
)


@dataclass
class Run:
    """One run's state, shared by its epochs: the specs, this rank, the step context, the loaders, the students."""

    spec: TrainSpec
    settings: dict  # the stage's resolved settings (recorded; compared on resume)
    job: Dist
    store: FeatureStore
    ctx: StepContext
    loaders: PairLoaders
    trainees: list[Trainee]
    expected: int  # valid cached images, all ranks together (one epoch)
    global_step: int = 0

    @property
    def out(self) -> Path:
        return Path(self.spec.output.out)


def train_students(spec: TrainSpec, settings: dict) -> dict:
    """The whole stage (see ``stages/train_student.py``). ``settings``: the stage's resolved settings as a plain
    JSON-ready dict, written to provenance.json and checkpoints; a resumed run must match them (bar RESUME_FREE)."""
    device = pick_device(spec.runtime.device)
    job = init_distributed(str(device))
    amp = configure_numerics(device, spec.runtime.amp)
    out = Path(spec.output.out)
    out.mkdir(parents=True, exist_ok=True)
    store = open_store(spec.data.cache)
    require_complete(store, spec.data.taps)
    shard_paths = tuple(source_shard_paths(store, spec.data.shards))
    projections = [student_projections(s, spec, store) for s in spec.students]
    resolution = spec.data.resolution or store.provenance["preprocessing"]["resolution"]
    trainees = build_trainees(spec, projections, store.layout.dims, resolution, device, amp, job)
    start, global_step = resume(out, settings, store, trainees, job, spec.output.quiet, spec.targets)
    teacher = None
    if spec.runtime.online_teacher:  # a library weight downloads once per node
        teacher = local_leader_first(
            lambda: online_teacher(store, spec.data.taps, device, spec.runtime.channels_last)
        )
    widths = tuple(store.layout.dims[t] for t in spec.data.taps)
    ctx = StepContext(device, amp, spec.loss, spec.runtime.channels_last, spec.data.taps[0], teacher,
                      spec.targets, widths)  # fmt: skip
    loaders = PairLoaders(loader_spec(spec, str(store.path), shard_paths, resolution, job, device), store)
    views = training_views(store, spec.data.views_used)  # refuses a views_used the cache does not hold
    write_provenance(out, settings, spec.students, store, trainees, resolution, job, views, spec.targets,
                     dict(spec.schedule.record) if spec.schedule is not None else None)  # fmt: skip
    expected = int(store.valid().sum())
    run = Run(spec, settings, job, store, ctx, loaders, trainees, expected, global_step)
    for epoch in range(start, spec.recipe.epochs):
        stats = run_epoch(run, epoch)
        run.global_step += stats["steps"]
        finish_epoch(run, epoch, stats)
    result = finalize(run)
    shutdown()
    return result


def configure_numerics(device: torch.device, amp: str) -> str:
    """The resolved AMP mode; on CUDA, cuDNN picks the fastest algorithms for the fixed input shapes (not in stage 1,
    whose cache must be byte-identical across runs) and amp "off" also turns TF32 off (float32 means float32)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp = resolve_amp(amp, device)
    set_tf32(device, amp)
    return amp


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


def online_teacher(
    store: FeatureStore, taps: str | tuple[str, ...], device: torch.device, channels_last: bool = False
) -> FeatureTaps:
    """The recorded teacher, live on ``device`` for the ``--online-teacher`` baseline: (B, 3, r, r) -> {tap: (B, D_t)}
    for the cache tap(s) ``taps``; channels_last on CUDA when asked (like the students and the views)."""
    taps = (taps,) if isinstance(taps, str) else tuple(taps)
    teacher = rebuild_teacher(store, taps).to(device).requires_grad_(False)
    if device.type == "cuda" and channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher


def loader_spec(spec: TrainSpec, store: str, shard_paths: tuple[str, ...], resolution: int, job: Dist,
                device: torch.device) -> LoaderSpec:  # fmt: skip
    """This rank's loader: the key-joined stream over the shards, or neighbour-mined batches."""
    d = spec.data
    stream = StreamSpec(store=store, shard_paths=shard_paths, tap=d.taps[0], resolution=resolution, seed=spec.recipe.seed,
                        view_policy=d.view_policy, shuffle_buffer=d.shuffle_buffer, skip_bad=d.skip_bad,
                        rank=job.rank, world=job.world, uint8_views=True, views_used=d.views_used,
                        taps=d.taps if len(d.taps) > 1 else ())  # fmt: skip
    return LoaderSpec(stream, spec.recipe.batch_size, resolve_workers(spec.runtime.workers), device.type == "cuda",
                      d.neighbours, d.neighbour_pool, d.anchors, prefetch_factor=spec.runtime.prefetch_factor,
                      mine_device=str(device))  # fmt: skip


def run_epoch(run: Run, epoch: int) -> dict:
    """One pass over this rank's share of the pairs; every student steps on every batch. Returns the counts
    (images and singletons over all ranks, this rank's steps), the seconds and the samples that did not join."""
    loader, recipe = run.loaders.for_epoch(epoch), run.spec.recipe
    start_epoch(run.trainees, epoch, recipe.epochs, recipe.lr_schedule)
    bar = progress_bar(total=run.expected // run.job.world, unit="img", desc=f"epoch {epoch + 1}/{recipe.epochs}",
                       disable=run.spec.output.quiet or not run.job.is_main, mininterval=1.0)  # fmt: skip
    images, steps, singletons, t0 = 0, 0, 0, time.perf_counter()
    with _join([t.model for t in run.trainees if isinstance(t.model, nn.parallel.DistributedDataParallel)]):
        for x, rows, _ids in batches(loader, run.loaders.spec):
            if len(x) < 2:  # a worker's last batch of one: BatchNorm cannot train on a single sample
                singletons += 1
                continue
            x = views_on_device(x, run.ctx)
            raw = teacher_rows(rows, x, run.ctx)
            weights = scheduled_weights(run, epoch, steps)
            for t in run.trainees:
                step_trainee(run, t, x, raw, epoch, steps, weights)
            images, steps = images + len(x), steps + 1
            bar.update(len(x))
            if recipe.max_steps and steps >= recipe.max_steps:
                break
    bar.close()
    stats = epoch_stats(run, images, steps, singletons, time.perf_counter() - t0)
    if stats["total_steps"] == 0:
        raise EmptyEpochError(empty_epoch_message(run, epoch, stats))
    return stats


class EmptyEpochError(KdepError):
    """An epoch yielded no batch on any rank (too few samples per worker for one batch of two)."""


def empty_epoch_message(run: Run, epoch: int, stats: dict) -> str:
    """One line naming the numbers: samples seen, singleton batches dropped, batch size, ranks x workers."""
    s = run.loaders.spec
    return (f"epoch {epoch + 1} yielded no batch: {stats['images'] + stats['singletons_dropped']} samples over "
            f"{run.job.world} rank(s) x {max(s.workers, 1)} worker(s) gave {stats['singletons_dropped']} batch(es) "
            f"of one (dropped: BatchNorm needs 2) with batch_size {s.batch_size}; use fewer --workers or ranks, or "
            "more images")  # fmt: skip


def start_epoch(trainees: list[Trainee], epoch: int, epochs: int, schedule: str = "step") -> None:
    """This epoch's lr (step or cosine schedule), train mode and a fresh loss list for every student."""
    for t in trainees:
        for group in t.optimizer.param_groups:
            group["lr"] = lr_at(epoch, epochs, t.base_lr, schedule)
        t.model.train()
        t.losses, t.parts = [], []


def scaled_progress(run: Run, epoch: int, steps: int) -> float:
    """How far training is, in [0, 1]: epochs done plus this epoch's share (its steps over an epoch's expected
    steps on this rank, or ``max_steps``)."""
    per_epoch = max(1, run.expected // (run.spec.batch_per_rank * run.job.world))
    if run.spec.recipe.max_steps:
        per_epoch = min(per_epoch, run.spec.recipe.max_steps)
    return (epoch + min(steps / per_epoch, 1.0)) / run.spec.recipe.epochs


def scheduled_weights(run: Run, epoch: int, steps: int) -> tuple[float, ...] | None:
    """The targets' weights at this step from the run's schedule (DistPro's alpha(t)), or None (fixed weights)."""
    if run.spec.schedule is None:
        return None
    return run.spec.schedule.at(scaled_progress(run, epoch, steps))


def step_trainee(run: Run, t: Trainee, x: torch.Tensor, raw: dict[str, torch.Tensor], epoch: int, steps: int,
                 weights: tuple[float, ...] | None = None) -> None:  # fmt: skip
    """One student's step on views (B, 3, r, r) and teacher rows {cache tap: (B, D_t)} (``weights``: the targets'
    weights at this step, from a schedule); a metrics record every log_every steps."""
    targets = [p.targets(raw[s.cache_tap]) if p is not None else raw[s.cache_tap]
               for p, s in zip(t.projections, run.spec.targets, strict=True)]  # fmt: skip
    loss, parts = train_step(
        t.model, t.optimizer, x, targets, run.ctx, t.scaler, to_host=False, weights=weights
    )
    t.losses.append(loss)  # a device scalar: converted only here every log_every steps and at the epoch end
    if len(targets) > 1:
        t.parts.append({k: v for k, v in parts.items() if k.startswith("loss/")})
    if steps % run.spec.output.log_every == 0 and run.job.is_main:
        record = {"kind": "step", "student": t.name, "epoch": epoch, "step": run.global_step + steps,
                  "loss": float(loss), **({"weights": list(weights)} if weights is not None else {})}  # fmt: skip
        append_metrics(run.out / "metrics.jsonl", {**record, **{k: float(v) for k, v in parts.items()}})


def epoch_stats(run: Run, images: int, steps: int, singletons: int, seconds: float) -> dict:
    """Counts summed over ranks; ``skipped``: samples that did not join (--skip-bad), known after a whole pass."""
    device = run.ctx.device
    seen = _sum_over_ranks(images + singletons, device)
    whole_pass = not run.spec.recipe.max_steps and run.spec.data.neighbours == 0
    return {"images": _sum_over_ranks(images, device), "steps": steps, "seconds": seconds,
            "total_steps": _sum_over_ranks(steps, device),
            "singletons_dropped": _sum_over_ranks(singletons, device),
            "skipped": run.expected - seen if whole_pass else 0}  # fmt: skip


@contextlib.contextmanager
def _join(models: list):
    """DDP's Join for uneven inputs (ranks may get different sample counts); a no-op on one process."""
    if not models:
        yield
        return
    from torch.distributed.algorithms.join import Join

    with Join(models):
        yield


def _sum_over_ranks(value: int, device: torch.device) -> int:
    """Sum over ranks; the tensor lives on the training device (NCCL has no CPU tensors)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def finish_epoch(run: Run, epoch: int, stats: dict) -> None:
    """Epoch metrics, then an atomic checkpoint every ``checkpoint_every`` epochs and after the last (rank 0)."""
    if not run.job.is_main:
        barrier()
        return
    for t in run.trainees:
        loss = float(np.mean(torch.stack(t.losses).double().cpu().numpy())) if t.losses else float("nan")
        append_metrics(run.out / "metrics.jsonl", {
            "kind": "epoch", "student": t.name, "epoch": epoch, "step": run.global_step, "loss": loss,
            "lr": t.optimizer.param_groups[0]["lr"], "images": stats["images"], "seconds": stats["seconds"],
            "images_per_s": stats["images"] / max(stats["seconds"], 1e-9), "skipped": stats["skipped"],
            "singletons_dropped": stats["singletons_dropped"], **epoch_parts(t),
        })  # fmt: skip
    if stats["skipped"] and not run.spec.output.quiet:
        print(
            f"epoch {epoch + 1}: skipped {stats['skipped']} samples that did not join the cache (--skip-bad)"
        )
    if checkpoint_due(epoch, run.spec.recipe.epochs, run.spec.output.checkpoint_every):
        state = checkpoint_state(
            epoch, run.global_step, run.settings, run.store, run.trainees, run.spec.targets
        )
        save_checkpoint(run.out, epoch, state)
    barrier()


def epoch_parts(t: Trainee) -> dict[str, float]:
    """The epoch mean of each target's (unweighted) loss, ``loss/<name>``; empty for a single-target run."""
    if not t.parts:
        return {}
    return {k: float(torch.stack([p[k] for p in t.parts]).double().mean()) for k in t.parts[0]}


def load_call(arch: str, model_kwargs: dict, path: Path) -> str:
    """The line of Python that loads an exported backbone, strictly, with the library alone."""
    library, name = parse_model_name(arch)
    kwargs = "".join(f", {k}={v!r}" for k, v in sorted(model_kwargs.items()))
    if library == "timm":
        model = f"timm.create_model({name!r}, pretrained=False, num_classes=0{kwargs})"
        return f"{model}.load_state_dict(torch.load({str(path)!r}), strict=True)"
    return (f"m = torchvision.models.get_model({name!r}); m.load_state_dict(torch.load({str(path)!r}), "
            "strict=False)  # only the classifier is missing")  # fmt: skip


def finalize(run: Run) -> dict:
    """Export backbones, plot the losses and write done.json last (rank 0)."""
    result = {"epochs": run.spec.recipe.epochs, "students": {}}
    if run.job.is_main:
        epochs = [r for r in read_metrics(run.out / "metrics.jsonl") if r["kind"] == "epoch"]
        for t in run.trainees:
            path = export_backbone(t.student.backbone, run.out / f"backbone-{t.name}.pt")
            last = [r for r in epochs if r["student"] == t.name]
            result["students"][t.name] = {
                "backbone": str(path),
                "loss": last[-1]["loss"] if last else float("nan"),
                "load": load_call(t.student.arch, t.student.model_kwargs, path),
            }
        plot_losses(run.out / "metrics.jsonl", run.out / "loss.png")
        write_json_atomic(run.out / "done.json", result)
    barrier()
    return result
