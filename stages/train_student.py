"""Stage 3 `train-student`: students from streamed (replayed view, cached teacher row) pairs; no teacher runs.

    kdep train-student --cache out/demo/cache --projection out/demo/proj-r18.npz --student resnet18 \\
        --epochs 90 --batch-size 512 --out runs/r18
    torchrun --nproc_per_node 8 --no-python kdep train-student --manifest manifests/imagenet10p-r50.yaml
    kdep train-student ... --online-teacher      # the baseline: the teacher runs live on the same views
    kdep train-student --manifest manifests/demo-multilayer.yaml   # multi-layer KD: several targets per student
    kdep train-student ... --targets stage3=stage3 --targets pre_relu=pre_relu --target-weights 0.5,1 \
        --projection proj-stage3-256.npz,proj-pre_relu-512.npz

Targets: each ``STUDENT_TAP=CACHE_TAP`` pairs a student tap with a cached teacher tap (a key of the store's taps:
``pre_relu``, or ``LABEL/TAP`` in a multi-teacher cache); without ``--targets`` the one target is
``student_tap=tap``, exactly as before. The loss is sum_i w_i * loss_i (``--target-weights``, default 1 each), each
loss_i the configured loss with its own head (CoSS, linear baselines) and, per student, its own projection:
``--projection`` is one item per student listing one path per target (``a.npz,b.npz``), or students x targets
items in student-major order (a YAML list). Each projection must be fitted on this cache and its target's cache
tap, to the student's width at its student tap for kdep / cosine. The rows of all cache taps are read together
(one read per shard and view); metrics.jsonl and loss.png show each target's loss (``loss/<target>``).

Reads the cache (read-only: many students can train from one cache at once), its source shards (checked against
the cache's record, joined by key), and the projection(s). Writes into ``--out``: ``checkpoints/epoch-NNNN.pt``
(atomic; a re-run resumes from the newest), ``backbone-<student>.pt`` (torchvision-loadable without the
classifier), ``metrics.jsonl``, ``loss.png``, ``provenance.json``, ``config.train_student.json`` and, last,
``done.json``. Several ``--student``/``--projection`` pairs train in one data pass, sharing decoding.
provenance.json and the checkpoints record the targets; a resume with other targets or weights is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from pipeline.files import file_sha256
from pipeline.manifest import ConfigError, config_to_dict
from pipeline.student.loss_weight import LossWeight, resolve_loss_weight
from pipeline.student.run import train_students
from pipeline.student.specs import (
    DataSpec,
    LossSpec,
    OutputSpec,
    RecipeSpec,
    RuntimeSpec,
    StudentSpec,
    TargetSpec,
    TrainSpec,
    WeightSchedule,
    distinct_cache_taps,
)
from stages.config import TrainStudentConfig

# CoSS's reference set-up (paganpasta/coss-pytorch: train_sampled_coss.py, scripts/cf_train.sh), as
# manifests/coss.yaml writes it: training settings, and the cache settings its teacher rows need. Its lr is flat for
# 5 epochs, then a per-epoch cosine (cosine-coss). Epochs and batch are left out (they follow the compute budget).
COSS_REFERENCE = {
    "tap": "post_relu", "student_tap": "post_relu", "neighbours": 15, "neighbour_pool": 31, "anchors": 16,
    "lr": 0.03, "weight_decay": 1e-4, "lr_schedule": "cosine-coss", "coss_head": "mlp",
}  # fmt: skip
COSS_REFERENCE_CACHE = {"recipe": "coss", "center_first": True, "center_recipe": "center-coss"}


def coss_differences(config: TrainStudentConfig, cache_views: dict) -> list[str]:
    """How a ``--loss coss`` run differs from CoSS's reference set-up: ``key value (reference value)`` items."""
    if config.loss != "coss":
        return []
    student_tap, tap = config.target_pairs[0]
    now = {**{k: getattr(config, k) for k in COSS_REFERENCE}, "tap": tap, "student_tap": student_tap}
    out = [f"{k} {now[k]} ({v})" for k, v in COSS_REFERENCE.items() if now[k] != v]
    out += [
        f"cache {k} {cache_views.get(k)} ({v})"
        for k, v in COSS_REFERENCE_CACHE.items()
        if cache_views.get(k) != v
    ]
    return out


def warn_if_not_coss_reference(config: TrainStudentConfig) -> None:
    """One line on stderr (rank 0) when a CoSS run is not the reference set-up; the run goes on."""
    if config.loss != "coss" or os.environ.get("RANK", "0") != "0":
        return
    from pipeline.cache.store import open_store

    diffs = coss_differences(config, open_store(config.cache).provenance["views"])
    if diffs:
        typer.echo(f"train-student: --loss coss differs from CoSS's reference set-up (manifests/coss.yaml): "
                   f"{', '.join(diffs)}", err=True)  # fmt: skip


def run(config: TrainStudentConfig) -> dict:
    """Train every student for ``epochs`` (resuming from the newest checkpoint); returns the final metrics."""
    warn_if_not_coss_reference(config)
    spec, settings = train_spec(config)
    return train_students(spec, settings=settings)  # settings: recorded, compared on resume


def train_spec(config: TrainStudentConfig) -> tuple[TrainSpec, dict]:
    """The library's typed spec of this run (a DistPro process is read here: its pathways become the targets) and
    the settings it records (the resolved loss weight and its rule included)."""
    c = config
    schedule, head = None, ("mlp", 512)
    if c.process:
        targets, schedule, head = process_targets(config)
    else:
        targets = tuple(TargetSpec(s, t, w) for (s, t), w in zip(c.target_pairs, c.weights, strict=True))
    weight = choose_loss_weight(config, targets)
    spec = TrainSpec(
        targets=targets,
        schedule=schedule,
        students=student_specs(config, len(targets)),
        data=DataSpec(cache=c.cache, shards=c.shards, taps=distinct_cache_taps(targets), resolution=c.resolution,
                      view_policy=c.view_policy, shuffle_buffer=c.shuffle_buffer, skip_bad=c.skip_bad,
                      neighbours=c.neighbours, neighbour_pool=c.neighbour_pool, anchors=c.anchors,
                      views_used=c.views_used, fresh_views=c.fresh_views),
        recipe=RecipeSpec(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, weight_decay=c.weight_decay,
                          data_fraction=c.data_fraction, seed=c.seed, max_steps=c.max_steps,
                          lr_schedule=c.lr_schedule, global_batch=c.global_batch_size),
        loss=LossSpec(c.loss, weight.value, coss=(c.coss_l0, c.coss_l1, c.coss_tau_t, c.coss_tau_s, 1.0),
                      coss_head=c.coss_head, pathway_head=head),
        runtime=RuntimeSpec(device=c.device, amp=c.amp, channels_last=c.channels_last, workers=c.workers,
                            prefetch_factor=c.prefetch_factor, online_teacher=c.online_teacher),
        output=OutputSpec(out=c.out, log_every=c.log_every, checkpoint_every=c.checkpoint_every, quiet=c.quiet),
    )  # fmt: skip
    settings = {**config_to_dict(config), "loss_weight": weight.value, "loss_weight_rule": weight.rule}
    return spec, settings


# Losses that multiply by w (kdep_loss); coss, coss-bn and cosine have their own scale and ignore it.
WEIGHTED_LOSSES = ("kdep", "linear-pre", "linear-post", "distpro")


def choose_loss_weight(config: TrainStudentConfig, targets: tuple[TargetSpec, ...]) -> LossWeight:
    """``--loss-weight``, or with 0 (auto) the KDEP supplement's Table S.3 value of the teacher(s) the targets come
    from (pipeline/student/loss_weight.py); one line on stderr (rank 0) when auto met a teacher the table does not
    list and the loss uses w. The value and its rule are recorded in provenance.json (config.loss_weight,
    config.loss_weight_rule)."""
    from pipeline.cache.store import open_store
    from pipeline.teachers import teacher_of_tap

    teachers = []
    if config.loss_weight == 0:
        provenance = open_store(config.cache).provenance
        for target in targets:
            try:
                teachers.append(teacher_of_tap(provenance, target.cache_tap))
            except ConfigError:  # a tap the cache lacks: the run stops on it right after, naming it
                continue
    chosen = resolve_loss_weight(config.loss_weight, teachers)
    if chosen.note and config.loss in WEIGHTED_LOSSES and os.environ.get("RANK", "0") == "0":
        typer.echo(f"train-student: {chosen.note}", err=True)
    return chosen


def student_specs(config: TrainStudentConfig, targets: int) -> tuple[StudentSpec, ...]:
    """One spec per ``--student`` with one projection per target (None: the raw teacher rows are the targets)."""
    paths = config.projection_paths or ((None,) * targets,) * len(config.student)
    return tuple(StudentSpec(arch, tuple(p)) for arch, p in zip(config.student, paths, strict=True))


def process_targets(
    config: TrainStudentConfig,
) -> tuple[tuple[TargetSpec, ...], WeightSchedule, tuple[str, int]]:
    """A DistPro process as stage 3 targets: each kept pathway ``t{i}-s{j}`` is the target ``stage{j}=stage{i}``
    (``stage{j}_pre=stage{i}_pre`` for a pre-ReLU process; teacher stage i's cached row regressed from student stage
    j through a fresh transform block: Linear for a ``linear`` process, else Linear-BN-ReLU-Linear, since stage 3
    carries pooled rows, not maps), weighted at each step by its searched alpha at ``--process-weights`` scale
    (softmax, or the official retrain's; pipeline/process/artefact.py), set to 0 where its normalised alpha is under
    ``--alpha-threshold`` (pathways under it at every step are not computed at all). Each pathway's loss is
    ``loss_weight`` * MSE, which on pooled rows is also the official hcl loss. The process must fit every student and
    the cache (the same stage counts; it may come from another pair of architectures with them, DistPro's Table 1,
    which is recorded)."""
    import numpy as np

    from pipeline.cache.store import open_store
    from pipeline.models import build_for_resolution, supported_taps
    from pipeline.process.artefact import check_fits, kept_pathways, load_process, normalised, weight_rows

    store = open_store(config.cache)
    process = load_process(config.process)
    resolution = config.resolution or store.provenance["preprocessing"]["resolution"]
    for arch in config.student:
        model, _ = build_for_resolution(arch, None, resolution)
        check_fits(
            process, supported_taps(model), store.taps, config.process
        )  # refuses a pair it does not fit
    kept = kept_pathways(process, config.alpha_threshold)
    index = [process.names.index(n) for n in kept]
    rows = weight_rows(process, config.process_weights)
    weights = np.where(normalised(process) >= config.alpha_threshold, rows, 0.0)[:, index]
    pathways = [process.pathways[i] for i in index]
    targets = tuple(TargetSpec(p["student_tap"], p["teacher_tap"]) for p in pathways)
    searched = process.provenance.get("student", {}).get("arch")
    hidden = int(process.provenance.get("config", {}).get("hidden", 512))
    record = {
        "path": str(Path(config.process).resolve()), "sha256": file_sha256(config.process),
        "alpha_threshold": config.alpha_threshold, "kept": kept,
        "dropped": [n for n in process.names if n not in kept], "transform": process.transform.get("kind", "mlp"),
        "weights": config.process_weights, "stage_features": process.stage_features,
        "pathway_loss": "mse on pooled rows (= the official hcl there)",
        "searched_for": {"student": searched, "cache_fingerprint": process.provenance.get("cache_fingerprint")},
        "transferred": searched not in config.student
        or process.provenance.get("cache_fingerprint") != store.fingerprint(),
    }  # fmt: skip
    schedule = WeightSchedule(tuple(process.progress.tolist()), tuple(map(tuple, weights.tolist())),
                              tuple(record.items()))  # fmt: skip
    return targets, schedule, (record["transform"], hidden)


def report(config: TrainStudentConfig, result: dict) -> None:
    for name, m in result["students"].items():
        typer.echo(f"{name}: loss {m['loss']:.4g} after {result['epochs']} epochs -> {m['backbone']}")
