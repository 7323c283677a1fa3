"""Stage 3's loop: build students, stream pairs, step, checkpoint, export. ``train_students`` is the whole run."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from pipeline.progress import progress_bar

from pipeline.cache.join import rebuild_teacher, source_shard_paths
from pipeline.cache.store import FeatureStore, StoreError, open_store
from pipeline.cache.teacher import AMP_DTYPES, resolve_amp
from pipeline.data.shards import write_json_atomic
from pipeline.manifest import config_to_dict
from pipeline.provenance import require_same
from pipeline.runtime import Dist, barrier, init_distributed, pick_device
from pipeline.student.checkpoints import (
    append_metrics,
    export_backbone,
    latest_checkpoint,
    load_checkpoint,
    plot_losses,
    save_checkpoint,
)
from pipeline.student.loaders import PairLoaders
from pipeline.student.training import (
    LossSpec,
    Student,
    base_lr_for,
    lr_at,
    make_optimizer,
    make_scaler,
    train_step,
    weight_decay_for,
)


@dataclass
class Trainee:
    """One student with everything that steps it."""

    name: str
    model: nn.Module  # Student, or DDP(Student)
    student: Student
    optimizer: torch.optim.Optimizer
    projection: object | None  # pipeline.projection.artefact.Projection
    base_lr: float
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling (None or disabled otherwise)
    losses: list[float] = field(default_factory=list)


def train_students(config) -> dict:
    """The whole stage: see ``stages/train_student.py``."""
    device = pick_device(config.device)
    job = init_distributed(str(device))
    amp = resolve_amp(config.amp, device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    store = open_store(config.cache)
    require_complete(store, config.tap)
    shard_paths = source_shard_paths(store, config.shards)
    projections = [load_checked_projection(p, store, config.tap) for p in config.projection] or [None] * len(
        config.student
    )
    resolution = config.resolution or store.provenance["preprocessing"]["resolution"]
    trainees = build_trainees(config, store, projections, resolution, device, job)
    start, global_step = resume(out, config, store, trainees, job)
    teacher = online_teacher(store, config.tap, device) if config.online_teacher else None
    loaders = PairLoaders(config, store, tuple(shard_paths), resolution, job, device)
    write_provenance(out, config, store, trainees, resolution, job)
    loss_spec = LossSpec(
        config.loss,
        config.loss_weight,
        (config.coss_l0, config.coss_l1, config.coss_tau_t, config.coss_tau_s, 1.0),
    )
    expected = int(store.group["valid"][:].sum())
    for epoch in range(start, config.epochs):
        stats = run_epoch(
            epoch, config, loaders, trainees, teacher, loss_spec, device, amp, job, expected, global_step
        )
        global_step += stats["steps"]
        finish_epoch(out, epoch, config, store, trainees, stats, job, global_step)
    return finalize(out, config, trainees, job)


def require_complete(store: FeatureStore, tap: str) -> None:
    """Training reads every shard: refuse an unfinished cache (naming what is missing) or a tap it does not hold."""
    store.feature_array(tap)  # StoreError naming the taps it has
    missing = store.missing_shards()
    if missing:
        raise StoreError(
            f"{store.path} is not complete: {len(missing)} shard(s) not cached yet, e.g. {missing[0]}; "
            "finish `kdep cache-teacher` (it resumes) before training"
        )


def load_checked_projection(path: str, store: FeatureStore, tap: str):
    """A projection fitted on this very cache and tap; anything else is refused naming the difference."""
    from pipeline.projection.artefact import load_projection

    proj = load_projection(path)
    fitted = {"cache_fingerprint": proj.meta.get("cache_fingerprint"), "tap": proj.meta.get("tap")}
    require_same(
        f"projection {path}",
        fitted,
        {"cache_fingerprint": store.fingerprint(), "tap": tap},
        f"fit it on {store.path} (kdep fit-svd {store.path} --tap {tap})",
    )
    return proj


def build_trainees(
    config, store: FeatureStore, projections: list, resolution: int, device: torch.device, job: Dist
) -> list[Trainee]:
    d_teacher = store.layout.dims[config.tap]
    per_rank = config.anchors * (1 + config.neighbours) if config.neighbours else config.batch_size
    global_batch = per_rank * job.world  # the lr scales with the batch actually trained on
    out = []
    for i, (arch, proj) in enumerate(zip(config.student, projections, strict=True)):
        torch.manual_seed(config.seed + 1000 * i)  # deterministic init, the same on every rank
        d_target = proj.dim_student if proj is not None else d_teacher
        student = Student(arch, config.student_tap, config.loss, d_target, resolution).to(device)
        if device.type == "cuda" and config.channels_last:
            student = student.to(memory_format=torch.channels_last)
        model: nn.Module = student
        if job.world > 1:
            model = nn.parallel.DistributedDataParallel(
                student, device_ids=[device.index] if device.type == "cuda" else None
            )
        lr = config.lr or base_lr_for(arch, global_batch)
        wd = (
            config.weight_decay
            if config.weight_decay >= 0
            else weight_decay_for(config.data_fraction, config.epochs)
        )
        name = arch if config.student.count(arch) == 1 else f"{arch}-{i}"
        amp = resolve_amp(config.amp, device)
        out.append(
            Trainee(name, model, student, make_optimizer(model, lr, wd), proj, lr, make_scaler(device, amp))
        )
    return out


def online_teacher(store: FeatureStore, tap: str, device: torch.device):
    """The recorded teacher, live (the ``--online-teacher`` baseline)."""
    taps = rebuild_teacher(store)
    taps.model.to(device).requires_grad_(False)
    return taps


def teacher_rows(
    batch_rows: torch.Tensor, x: torch.Tensor, teacher, tap: str, device: torch.device, amp: str
) -> torch.Tensor:
    """(B, D_t) float32 teacher features: the cached rows, or the live teacher on the same views."""
    if teacher is None:
        return batch_rows.to(device, non_blocking=True).float()
    ctx = (
        torch.autocast("cuda", dtype=AMP_DTYPES[amp])
        if device.type == "cuda" and amp in AMP_DTYPES
        else contextlib.nullcontext()
    )
    with torch.no_grad(), ctx:  # no_grad, not inference_mode: the targets are saved for the loss's backward
        return teacher(x)[tap].float()


def run_epoch(
    epoch, config, loaders, trainees, teacher, loss_spec, device, amp, job, expected, step_base
) -> dict:
    """One pass over this rank's share of the pairs; every student steps on every batch."""
    loader = loaders.for_epoch(epoch)
    for t in trainees:
        for group in t.optimizer.param_groups:
            group["lr"] = lr_at(epoch, config.epochs, t.base_lr)
        t.model.train()
        t.losses = []
    bar = progress_bar(
        total=expected // job.world,
        unit="img",
        desc=f"epoch {epoch + 1}/{config.epochs}",
        disable=config.quiet or not job.is_main,
        mininterval=1.0,
    )
    images, steps, singletons, t0 = 0, 0, 0, time.perf_counter()
    joinables = [t.model for t in trainees if isinstance(t.model, nn.parallel.DistributedDataParallel)]
    with _join(joinables):
        for x, rows, _ids in loader:
            if len(x) < 2:  # a worker's last batch of one: BatchNorm cannot train on a single sample
                singletons += 1
                continue
            x = x.to(device, non_blocking=True)
            if device.type == "cuda" and config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            raw = teacher_rows(rows, x, teacher, config.tap, device, amp)
            for t in trainees:
                target = t.projection.targets(raw) if t.projection is not None else raw
                loss, parts = train_step(t.model, t.optimizer, x, target, loss_spec, device, amp, t.scaler)
                t.losses.append(loss)
                if steps % config.log_every == 0 and job.is_main:
                    append_metrics(
                        Path(config.out) / "metrics.jsonl",
                        {
                            "kind": "step",
                            "student": t.name,
                            "epoch": epoch,
                            "step": step_base + steps,
                            "loss": loss,
                            **parts,
                        },
                    )
            images += len(x)
            steps += 1
            bar.update(len(x))
            if config.max_steps and steps >= config.max_steps:
                break
    bar.close()
    seconds = time.perf_counter() - t0
    seen = _sum_over_ranks(images + singletons, device)
    skipped = (
        expected - seen if not config.max_steps and config.neighbours == 0 else 0
    )  # did not join (--skip-bad)
    return {"images": _sum_over_ranks(images, device), "steps": steps, "seconds": seconds,
            "singletons_dropped": _sum_over_ranks(singletons, device), "skipped": skipped}  # fmt: skip


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


def finish_epoch(out: Path, epoch: int, config, store: FeatureStore, trainees: list[Trainee], stats: dict, job: Dist,
                 global_step: int) -> None:  # fmt: skip
    """Epoch metrics, then an atomic checkpoint (rank 0)."""
    if not job.is_main:
        barrier()
        return
    for t in trainees:
        loss = float(np.mean(t.losses)) if t.losses else float("nan")
        append_metrics(
            out / "metrics.jsonl",
            {
                "kind": "epoch",
                "student": t.name,
                "epoch": epoch,
                "step": global_step,
                "loss": loss,
                "lr": t.optimizer.param_groups[0]["lr"],
                "images": stats["images"],
                "seconds": stats["seconds"],
                "images_per_s": stats["images"] / max(stats["seconds"], 1e-9),
                "skipped": stats["skipped"],
                "singletons_dropped": stats["singletons_dropped"],
            },
        )
    if stats["skipped"] and not config.quiet:
        print(
            f"epoch {epoch + 1}: skipped {stats['skipped']} samples that did not join the cache (--skip-bad)"
        )
    state = {
        "epoch": epoch,
        "global_step": global_step,
        "config": config_to_dict(config),
        "inputs": run_inputs(store, trainees),
        "scalers": {
            t.name: t.scaler.state_dict() for t in trainees if t.scaler is not None and t.scaler.is_enabled()
        },
        "students": {t.name: t.student.state_dict() for t in trainees},
        "optimizers": {t.name: t.optimizer.state_dict() for t in trainees},
    }
    save_checkpoint(out, epoch, state)
    barrier()


RESUME_FREE = ("quiet", "workers", "log_every", "shards", "device")  # settings a resumed run may change


def run_inputs(store: FeatureStore, trainees: list[Trainee]) -> dict:
    """The identities a run trains from: the cache fingerprint and each projection's sha256."""
    projections = [
        t.projection.meta.get("npz_sha256") if t.projection is not None else None for t in trainees
    ]
    return {"cache_fingerprint": store.fingerprint(), "projection_sha256": projections}


def resume(out: Path, config, store: FeatureStore, trainees: list[Trainee], job: Dist) -> tuple[int, int]:
    """Load the newest checkpoint if there is one (same settings and inputs required); returns (first epoch, step)."""
    path = latest_checkpoint(out)
    if path is None:
        return 0, 0
    state = load_checkpoint(path)
    stored = {k: v for k, v in state["config"].items() if k not in RESUME_FREE}
    now = {k: v for k, v in config_to_dict(config).items() if k not in RESUME_FREE}
    hint = "resume with the same settings and inputs, or choose another --out"
    require_same(
        f"the run in {out}", {**stored, **state["inputs"]}, {**now, **run_inputs(store, trainees)}, hint
    )
    for t in trainees:
        t.student.load_state_dict(state["students"][t.name])
        t.optimizer.load_state_dict(state["optimizers"][t.name])
        if t.scaler is not None and state.get("scalers", {}).get(t.name):
            t.scaler.load_state_dict(state["scalers"][t.name])
    if job.is_main and not config.quiet:
        print(f"resuming {out} after epoch {state['epoch'] + 1}")
    return state["epoch"] + 1, state["global_step"]


def write_provenance(
    out: Path, config, store: FeatureStore, trainees: list[Trainee], resolution: int, job: Dist
) -> None:
    if not job.is_main:
        return
    record = {
        "cache": str(store.path),
        "cache_fingerprint": store.fingerprint(),
        "projections": [
            {"path": p, "sha256": t.projection.meta.get("npz_sha256") if t.projection else None}
            for p, t in zip(config.projection, trainees, strict=False)
        ],
        "students": [t.name for t in trainees],
        "resolution": resolution,
        "config": config_to_dict(config),
    }
    write_json_atomic(out / "provenance.json", record)
    write_json_atomic(
        out / "config.train_student.json", {"section": "train_student", "config": config_to_dict(config)}
    )


def finalize(out: Path, config, trainees: list[Trainee], job: Dist) -> dict:
    """Export backbones, plot the losses and write done.json last (rank 0)."""
    result = {"epochs": config.epochs, "students": {}}
    if job.is_main:
        for t in trainees:
            path = export_backbone(t.student.backbone, out / f"backbone-{t.name}.pt")
            last = [r for r in _epoch_records(out) if r["student"] == t.name]
            result["students"][t.name] = {
                "backbone": str(path),
                "loss": last[-1]["loss"] if last else float("nan"),
            }
        plot_losses(out / "metrics.jsonl", out / "loss.png")
        write_json_atomic(out / "done.json", result)
    barrier()
    return result


def _epoch_records(out: Path) -> list[dict]:
    from pipeline.student.checkpoints import read_metrics

    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "epoch"]
