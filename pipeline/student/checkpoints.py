"""Stage 3 outputs: atomic per-epoch checkpoints, exact resume (same settings and inputs), provenance.json, the
exported backbone, metrics and the loss plot."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pipeline.cache.store import FeatureStore
from pipeline.files import atomic_path, write_json_atomic
from pipeline.models import backbone_state_dict, parse_model_name
from pipeline.provenance import require_same
from pipeline.runtime import Dist, on_every_rank, on_main_rank
from pipeline.student.specs import StudentSpec, TargetSpec
from pipeline.student.trainees import Trainee

KEEP_CHECKPOINTS = 2  # the newest epochs kept on disk


def checkpoint_path(out: Path, epoch: int) -> Path:
    return out / "checkpoints" / f"epoch-{epoch:04d}.pt"


def save_checkpoint(out: Path, epoch: int, state: dict) -> Path:
    """Write ``state`` for a finished ``epoch`` to a temporary name, fsync, rename; prune older checkpoints."""
    path = checkpoint_path(out, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fsync=True) as tmp:
        torch.save(state, tmp)
    for old in sorted(path.parent.glob("epoch-*.pt"))[:-KEEP_CHECKPOINTS]:
        old.unlink()
    return path


def checkpoint_due(epoch: int, epochs: int, every: int) -> bool:
    """Whether finished ``epoch`` (0-based) is checkpointed: every ``every`` epochs, and always the last one."""
    return (epoch + 1) % every == 0 or epoch + 1 == epochs


def checkpoint_state(epoch: int, global_step: int, settings: dict, store: FeatureStore,
                     trainees: list[Trainee], targets: tuple[TargetSpec, ...] = ()) -> dict:  # fmt: skip
    """Everything an exact resume after finished ``epoch`` needs: students, optimizers, scalers, settings, inputs
    and the targets (student tap, cache tap, weight) the heads and losses were built for."""
    return {
        "epoch": epoch,
        "global_step": global_step,
        "config": settings,
        "targets": target_records(targets),
        "inputs": run_inputs(store, trainees),
        "scalers": {
            t.name: t.scaler.state_dict() for t in trainees if t.scaler is not None and t.scaler.is_enabled()
        },
        "students": {t.name: t.student.state_dict() for t in trainees},
        "optimizers": {t.name: t.optimizer.state_dict() for t in trainees},
    }


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("epoch-*.pt"))
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def export_backbone(model: nn.Module, path: Path) -> Path:
    """The backbone's state dict without its classifier: loads into the torchvision model with strict=True once the
    classifier is dropped (or with ``strict=False`` and only ``fc``/``classifier`` missing)."""
    with atomic_path(path) as tmp:
        torch.save(backbone_state_dict(model), tmp)
    return path


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trim_metrics(path: Path, last_epoch: int) -> None:
    """Keep only the records of epochs <= ``last_epoch`` (those a resumed run does not train again), atomically."""
    records = read_metrics(path)
    kept = [r for r in records if r["epoch"] <= last_epoch]
    if len(kept) == len(records):
        return
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept))


def plot_losses(metrics_path: Path, png: Path) -> Path:
    """Per-step loss (light) and per-epoch mean (bold) of every student (log scale for positive losses); with
    several targets also each target's epoch mean (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in sorted({r["student"] for r in records}):
        steps = [r for r in records if r["student"] == name and r["kind"] == "step"]
        epochs = [r for r in records if r["student"] == name and r["kind"] == "epoch"]
        if steps:
            ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], alpha=0.35, lw=0.8)
        if epochs:
            ax.plot(
                [r["step"] for r in epochs],
                [r["loss"] for r in epochs],
                marker="o",
                lw=2,
                label=f"{name} (epoch mean)",
            )
        for key in sorted({k for r in epochs for k in r if k.startswith("loss/")}):  # several targets: each
            ax.plot([r["step"] for r in epochs if key in r], [r[key] for r in epochs if key in r], marker=".",
                    ls="--", lw=1.2, label=f"{name} {key} (epoch mean, unweighted)")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if records and min(r["loss"] for r in records) > 0:
        ax.set_yscale("log")  # CoSS losses are negative: those stay linear
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("train-student loss")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


RESUME_FREE = (
    "quiet",
    "workers",
    "log_every",
    "shards",
    "device",
    "prefetch_factor",
    "checkpoint_every",
    "loss_weight_rule",  # how loss_weight was chosen; the value itself is compared
)  # settings a resumed run may change


def target_records(targets: tuple[TargetSpec, ...]) -> list[dict]:
    """The targets as JSON records (provenance.json, checkpoints)."""
    return [{"name": t.name, "student_tap": t.student_tap, "cache_tap": t.cache_tap, "weight": t.weight}
            for t in targets]  # fmt: skip


def _sha(projection) -> str | None:
    return projection.meta.get("npz_sha256") if projection is not None else None


def run_inputs(store: FeatureStore, trainees: list[Trainee]) -> dict:
    """The identities a run trains from: the cache fingerprint and each projection's sha256 (per student: one, or
    a list with one per target when there are several)."""
    projections = [
        _sha(t.projection) if len(t.projections) == 1 else [_sha(p) for p in t.projections] for t in trainees
    ]
    return {"cache_fingerprint": store.fingerprint(), "projection_sha256": projections}


# Settings added after runs were checkpointed without them, with the value that means "as before": a resumed
# older run matches when the new setting has it.
ADDED_SETTINGS = {"targets": [], "target_weights": []}


def upgrade_student_state(state: dict) -> dict:
    """A student state dict from before per-target heads (``head.*``) -> today's names (``heads.0.*``)."""
    return {("heads.0." + k[len("head.") :] if k.startswith("head.") else k): v for k, v in state.items()}


def resume(out: Path, settings: dict, store: FeatureStore, trainees: list[Trainee], job: Dist, quiet: bool,
           targets: tuple[TargetSpec, ...] = ()) -> tuple[int, int]:  # fmt: skip
    """Load the newest checkpoint if there is one (same settings, inputs and targets required); returns (first
    epoch, step). Rank 0 alone decides which checkpoint and whether it matches (another rank's listing of a shared
    directory may be stale) and every rank loads the one it names; a refusal reaches every rank."""
    path = on_main_rank(lambda: _choose_checkpoint(out, settings, store, trainees, quiet, targets))
    if path is None:
        return 0, 0
    state = on_every_rank(lambda: load_checkpoint(Path(path)))
    for t in trainees:
        t.student.load_state_dict(upgrade_student_state(state["students"][t.name]))
        t.optimizer.load_state_dict(state["optimizers"][t.name])
        if t.scaler is not None and state.get("scalers", {}).get(t.name):
            t.scaler.load_state_dict(state["scalers"][t.name])
    return state["epoch"] + 1, state["global_step"]


def _choose_checkpoint(out: Path, settings: dict, store: FeatureStore, trainees: list[Trainee], quiet: bool,
                       targets: tuple[TargetSpec, ...]) -> str | None:  # fmt: skip
    """(rank 0) The newest checkpoint's path after checking that it was made with these settings, inputs and
    targets, and the metrics trimmed to it; None (and the metrics of a run that died before its first checkpoint
    cleared) when there is none."""
    path = latest_checkpoint(out)
    if path is None:
        trim_metrics(out / "metrics.jsonl", -1)
        return None
    state = load_checkpoint(path)
    stored = {**ADDED_SETTINGS, **{k: v for k, v in state["config"].items() if k not in RESUME_FREE}}
    now = {k: v for k, v in settings.items() if k not in RESUME_FREE}
    hint = "resume with the same settings and inputs, or choose another --out"
    if (
        "targets" in state
    ):  # checkpoints from before multi-target runs had one target: their settings say which
        stored = {**stored, "targets_built": state["targets"]}
        now = {**now, "targets_built": target_records(targets)}
    require_same(
        f"the run in {out}", {**stored, **state["inputs"]}, {**now, **run_inputs(store, trainees)}, hint
    )
    trim_metrics(out / "metrics.jsonl", state["epoch"])  # epochs after the checkpoint are trained again
    if not quiet:
        print(f"resuming {out} after epoch {state['epoch'] + 1}")
    return str(path)


def write_provenance(out: Path, settings: dict, students: tuple[StudentSpec, ...], store: FeatureStore,
                     trainees: list[Trainee], resolution: int, job: Dist, views: tuple[int, int] = (0, 0),
                     targets: tuple[TargetSpec, ...] = (), process: dict | None = None,
                     run: dict | None = None) -> None:  # fmt: skip
    """provenance.json (inputs, their identities, the targets, the students and the parameters of each that no
    target reaches (frozen), the settings, how the run executed: world size, per-rank and global batch, precision,
    and the DistPro process the target weights follow, if any) and config.train_student.json."""
    if not job.is_main:
        return
    several = len(targets) > 1
    record = {
        "cache": str(store.path),
        "cache_fingerprint": store.fingerprint(),
        "projections": [
            {"path": path, "sha256": _sha(proj), **({"student": t.name, "target": g.name} if several else {})}
            for s, t in zip(students, trainees, strict=True)
            for path, proj, g in zip(s.projections, t.projections, targets or (None,), strict=True)
            if path is not None
        ],
        "targets": target_records(targets),
        "students": [t.name for t in trainees],
        "frozen_parameters": {t.name: list(t.frozen) for t in trainees},
        **({"run": run} if run is not None else {}),
        "resolution": resolution,
        "training_views": list(views),  # [first, stop): the cache views the students trained on
        **({"process": process} if process is not None else {}),
        "config": settings,
    }
    write_json_atomic(out / "provenance.json", record)
    write_json_atomic(out / "config.train_student.json", {"section": "train_student", "config": settings})


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
