"""Stage 3's loop: build students, stream pairs, step, checkpoint, export. ``train_students`` is the whole run.

It reads typed specs (``pipeline.student.specs``), never a stage's config object; the stage's resolved settings
come in as a plain dict, only to be recorded (provenance.json, checkpoints) and compared on resume.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.cache.join import source_shard_paths
from pipeline.cache.store import FeatureStore, open_store
from pipeline.errors import KdepError
from pipeline.failures import shared_failures
from pipeline.files import write_json_atomic
from pipeline.progress import progress_bar
from pipeline.runtime import (
    Dist,
    all_gather_objects,
    any_rank,
    barrier,
    init_distributed,
    local_leader_first,
    pick_device,
    shutdown,
)
from pipeline.student.checkpoints import (
    append_metrics,
    checkpoint_due,
    checkpoint_state,
    epoch_parts,
    export_backbone,
    load_call,
    plot_losses,
    read_metrics,
    resume,
    save_checkpoint,
    write_provenance,
)
from pipeline.student.loaders import PairLoaders, batches
from pipeline.student.online import build_online_teacher, extra_sides
from pipeline.student.pairs import epoch_fingerprint, fingerprint, training_views
from pipeline.student.setup import (
    configure_numerics,
    loader_spec,
    per_rank_batch,
    print_banner,
    report_frozen,
    require_complete,
    run_line,
    run_record,
    student_projections,
)
from pipeline.student.specs import TrainSpec
from pipeline.student.trainees import Trainee, build_trainees
from pipeline.student.training import (
    StepContext,
    idle_step,
    lr_at,
    student_views,
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
    resolution: int  # the students' input side
    global_step: int = 0
    views: tuple[int, int] = (0, 0)  # [first, stop): the cache views trained on

    @property
    def out(self) -> Path:
        return Path(self.spec.output.out)


def train_students(spec: TrainSpec, settings: dict) -> dict:
    """The whole stage (see ``stages/train_student.py``). ``settings``: the stage's resolved settings as a plain
    JSON-ready dict, written to provenance.json and checkpoints; a resumed run must match them (bar RESUME_FREE).
    Under torchrun an exception on any rank ends every rank within seconds with its one-line message
    (:func:`pipeline.failures.shared_failures`)."""
    device = pick_device(spec.runtime.device)
    job = init_distributed(str(device))
    try:
        with shared_failures("train-student"):
            return _train(spec, settings, device, job)
    finally:
        shutdown()


def _train(spec: TrainSpec, settings: dict, device: torch.device, job: Dist) -> dict:
    amp, tf32 = configure_numerics(device, spec.runtime.amp)
    spec = per_rank_batch(spec, job)
    out = Path(spec.output.out)
    out.mkdir(parents=True, exist_ok=True)
    store = open_store(spec.data.cache)
    require_complete(store, spec.data.taps)
    shard_paths = tuple(source_shard_paths(store, spec.data.shards))
    projections = [student_projections(s, spec, store) for s in spec.students]
    resolution = spec.data.resolution or store.provenance["preprocessing"]["resolution"]
    trainees = build_trainees(spec, projections, store.layout.dims, resolution, device, amp, job)
    report_frozen(trainees, job, spec.output.quiet)
    start, global_step = resume(out, settings, store, trainees, job, spec.output.quiet, spec.targets)
    teacher, sides = None, ()
    if spec.runtime.online_teacher:  # a library weight downloads once per node
        teacher = local_leader_first(
            lambda: build_online_teacher(store, spec.data.taps, device, spec.runtime.channels_last)
        )
        sides = extra_sides(store, spec.data.taps, resolution)
    widths = tuple(store.layout.dims[t] for t in spec.data.taps)
    ctx = StepContext(device, amp, spec.loss, spec.runtime.channels_last, spec.data.taps[0], teacher,
                      spec.targets, widths)  # fmt: skip
    loaders = PairLoaders(
        loader_spec(spec, str(store.path), shard_paths, resolution, job, device, sides), store
    )
    views = training_views(store, spec.data.views_used)  # refuses a views_used the cache does not hold
    if job.is_main and not spec.output.quiet:
        print_banner(
            run_line(spec, store, job, trainees, loaders.spec), loaders.spec, store, (resolution, *sides)
        )
    write_provenance(out, settings, spec.students, store, trainees, resolution, job, views, spec.targets,
                     dict(spec.schedule.record) if spec.schedule is not None else None,
                     run_record(spec, job, amp, tf32))  # fmt: skip
    expected = int(store.valid().sum())
    run = Run(spec, settings, job, store, ctx, loaders, trainees, expected, resolution, global_step, views)
    for epoch in range(start, spec.recipe.epochs):
        stats = run_epoch(run, epoch)
        run.global_step += stats["steps"]
        finish_epoch(run, epoch, stats)
    return finalize(run)


def run_epoch(run: Run, epoch: int) -> dict:
    """One pass over this rank's share of the pairs; every student steps on every batch. Returns the counts
    (images and singletons over all ranks, the steps and this rank's real ones), the seconds, the samples that did
    not join and whether every scheduled (image, view) came exactly once over all ranks (``coverage``).

    Ranks step in lock-step: each step they agree (one small host-side all-reduce) whether any rank still has data,
    and a rank that has none left (or only a batch of one) takes a zero-gradient step, so every replica applies the
    same averaged update every step (parameters and momentum stay identical; DDP's Join lets an idle rank skip its
    optimizer steps, and the replicas drift apart)."""
    loader, recipe = run.loaders.for_epoch(epoch), run.spec.recipe
    start_epoch(run.trainees, epoch, recipe.epochs, recipe.lr_schedule)
    bar = progress_bar(total=run.expected // run.job.world, unit="img", desc=f"epoch {epoch + 1}/{recipe.epochs}",
                       disable=run.spec.output.quiet or not run.job.is_main, mininterval=1.0)  # fmt: skip
    images, steps, real, singletons, seen, t0 = 0, 0, 0, 0, 0, time.perf_counter()
    stream = iter(batches(loader, run.loaders.spec))
    while True:
        batch = next(stream, None)
        if not any_rank(batch is not None):
            break
        if batch is not None:
            x, rows, ids = batch
            seen = (seen + fingerprint(ids.numpy())) % 2**64
            singletons += len(ids) < 2
        if batch is None or len(ids) < 2:  # no data left here, or a worker's last batch of one (BatchNorm)
            for t in run.trainees:
                idle_step(t.model, t.optimizer, run.ctx, run.resolution, t.scaler)
        else:
            x = views_on_device(x, run.ctx)
            raw = teacher_rows(rows, x, run.ctx)
            weights = scheduled_weights(run, epoch, steps)
            for t in run.trainees:
                step_trainee(run, t, student_views(x), raw, epoch, steps, weights)
            images, real = images + len(ids), real + 1
            bar.update(len(ids))
        steps += 1
        if recipe.max_steps and steps >= recipe.max_steps:
            break
    bar.close()
    stats = epoch_stats(run, images, steps, real, singletons, time.perf_counter() - t0)
    stats["coverage"] = epoch_coverage(run, epoch, seen, stats)
    stats["losses"] = epoch_losses(run, epoch)
    if stats["total_steps"] == 0:
        raise EmptyEpochError(empty_epoch_message(run, epoch, stats))
    return stats


class TrainingDiverged(KdepError):
    """A student's loss is not finite: it diverged (the message names the student, epoch and step)."""


def check_finite(name: str, loss: float, epoch: int, step: int, lr: float) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"student {name}: the loss is {loss} at epoch {epoch + 1}, step {step}: training diverged; lower --lr "
            f"(now {lr:g}) or check the targets (projection, loss weight)"
        )


def epoch_losses(run: Run, epoch: int) -> dict[str, float]:
    """Each student's mean loss over the epoch's steps on every rank (NaN when no rank had a batch); a non-finite
    mean stops the run (:class:`TrainingDiverged`)."""
    mine = {t.name: (float(torch.stack(t.losses).double().sum()) if t.losses else 0.0, len(t.losses))
            for t in run.trainees}  # fmt: skip
    everyone = all_gather_objects(mine)
    out = {}
    for t in run.trainees:
        total, count = (sum(r[t.name][i] for r in everyone) for i in (0, 1))
        out[t.name] = total / count if count else float("nan")
        if count:
            check_finite(t.name, out[t.name], epoch, run.global_step, t.base_lr)
    return out


def epoch_coverage(run: Run, epoch: int, seen: int, stats: dict) -> str:
    """Whether the stream delivered every scheduled (image, view) of a whole pass exactly once over all ranks and
    workers: the ranks' order-free fingerprints of the (shard, row, view) ids they received, summed, against the
    schedule's (:func:`pipeline.student.pairs.epoch_fingerprint`). "exact", "MISMATCH", or "n/a" (max_steps,
    neighbour batches or skipped samples: not a whole pass by design)."""
    total = sum(all_gather_objects(seen)) % 2**64
    d = run.spec.data
    if run.spec.recipe.max_steps or d.neighbours or stats["skipped"]:
        return "n/a"
    expected = epoch_fingerprint(
        run.store, run.spec.recipe.seed, epoch, run.views, d.view_policy, d.fresh_views
    )
    return "exact" if total == expected else "MISMATCH"


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
        check_finite(t.name, float(loss), epoch, run.global_step + steps, t.base_lr)
        record = {"kind": "step", "student": t.name, "epoch": epoch, "step": run.global_step + steps,
                  "loss": float(loss), **({"weights": list(weights)} if weights is not None else {})}  # fmt: skip
        append_metrics(run.out / "metrics.jsonl", {**record, **{k: float(v) for k, v in parts.items()}})


def epoch_stats(run: Run, images: int, steps: int, real: int, singletons: int, seconds: float) -> dict:
    """Counts summed over ranks (``total_steps``: steps on real batches); ``steps``: the epoch's optimizer steps
    (the same on every rank); ``skipped``: samples that did not join (--skip-bad), known after a whole pass."""
    device = run.ctx.device
    seen = _sum_over_ranks(images + singletons, device)
    whole_pass = not run.spec.recipe.max_steps and run.spec.data.neighbours == 0
    return {"images": _sum_over_ranks(images, device), "steps": steps, "seconds": seconds,
            "total_steps": _sum_over_ranks(real, device),
            "singletons_dropped": _sum_over_ranks(singletons, device),
            "skipped": run.expected - seen if whole_pass else 0}  # fmt: skip


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
        loss = stats["losses"][t.name]
        append_metrics(run.out / "metrics.jsonl", {
            "kind": "epoch", "student": t.name, "epoch": epoch, "step": run.global_step, "loss": loss,
            "lr": t.optimizer.param_groups[0]["lr"], "images": stats["images"], "seconds": stats["seconds"],
            "images_per_s": stats["images"] / max(stats["seconds"], 1e-9), "skipped": stats["skipped"],
            "singletons_dropped": stats["singletons_dropped"], "coverage": stats["coverage"], **epoch_parts(t),
        })  # fmt: skip
    if stats["coverage"] == "MISMATCH":
        print(f"train-student: epoch {epoch + 1} did not deliver every scheduled (image, view) exactly once over "
              f"{run.job.world} rank(s); please report this with the run's config.train_student.json")  # fmt: skip
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
