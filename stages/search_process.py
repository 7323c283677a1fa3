"""`search-process`: DistPro's search of a distillation process (alpha per pathway per step) from a feature cache.

    kdep cache-teacher --shards out/demo/data/train --teacher resnet18 --weights out/demo/teacher-r18.pt \\
        --taps stage1,stage2,stage3,stage4 --views 4 --resolution 64 --out out/demo/cache-stages
    kdep search-process --cache out/demo/cache-stages --student resnet18 --epochs 2 --out out/demo/process
    kdep search-process --cache C --mode online --student mobilenet_v2 --out out/process-online   # spatial maps
    kdep cache-teacher ... --taps stage1_pre,stage2_pre,stage3_pre,stage4_pre --out C-pre      # stages before ReLU
    kdep search-process --cache C-pre --stage-features pre_relu --out out/process-pre

The defaults follow the official code (bytedance/DistPro) where it is well defined: hcl pathway loss, Nesterov SGD
at a constant lr, its connector block in online mode; our own choices where it is not: the exact alpha gradient
(the code's finite difference is an approximation, ``--hypergradient finite-difference``), pathways between stage
outputs (``--stage-features pre_relu`` is the code's choice, defined for torchvision ResNets and MobileNetV2 and
needing ``stageK_pre`` taps in the cache), pooled MLP blocks in cached mode (the code's connector needs maps).
process.json records every choice.

Reads the cache (rows of the stage taps, view parameters, keys) and its source shards (the images, and the 'cls'
labels when there are any). Cached mode uses the cached pooled ``stageK`` rows (the teacher never runs); online
mode rebuilds the teacher from the cache's record and runs it live for spatial maps. Writes into ``--out``:
``process.json`` (pipeline/process/artefact.py), ``alpha.png`` (alpha(t) per pathway) and
``config.search_process.json``. The algorithm is in pipeline/process/search.py.
"""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import typer

import pipeline
from pipeline.cache.join import rebuild_teacher, source_shard_paths
from pipeline.cache.store import FeatureStore, open_store
from pipeline.data.shards import index_classes
from pipeline.manifest import ConfigError, config_to_dict
from pipeline.models import build_model
from pipeline.process.artefact import Process, make_pathways, stage_count, stage_tap
from pipeline.process.batches import SearchSpec, endless, search_batches, shards_have_labels, split_counts
from pipeline.process.online import StageMaps, stage_shapes
from pipeline.process.plots import plot_alpha
from pipeline.process.search import Architect, Batch, ProcessSearch, lr_at, search_loop
from pipeline.progress import progress_bar
from pipeline.provenance import library_versions
from pipeline.runtime import pick_device, refuse_several_ranks, tf32_off
from stages.common import write_resolved_config
from stages.config import SearchProcessConfig

BETAS = (0.5, 0.999)  # alpha's Adam betas (DARTS and the public code)


@dataclass(frozen=True)
class SearchProcessResult:
    process: Process  # as saved
    path: Path  # process.json
    plot: Path  # alpha.png


@dataclass(frozen=True)
class SearchData:
    spec: SearchSpec  # what the batches read
    counts: object  # pipeline.process.batches.SplitCounts
    objective: str  # ce or regress
    classes: int  # ce classes (0 for regress)


def plan_data(config: SearchProcessConfig, store: FeatureStore) -> SearchData:
    """Source shards, the objective (labels or not), the taps to read, and the split's counts."""
    if "teacher" not in store.provenance:
        raise ConfigError(f"{store.path} holds several teachers; search-process takes a single-teacher cache")
    paths = tuple(source_shard_paths(store, config.shards))
    labelled = shards_have_labels(paths)
    objective = config.objective if config.objective != "auto" else ("ce" if labelled else "regress")
    if objective == "ce" and not labelled:
        raise ConfigError(
            f"key 'objective': ce needs labelled shards; {paths[0]} has no 'cls' field (use regress)"
        )
    classes = _classes(config, store) if objective == "ce" else 0
    features = config.stage_features
    n_t = stage_count(store.taps, features)
    if n_t == 0 and config.mode == "cached":
        names = ",".join(stage_tap(k, features) for k in range(1, 5))
        raise ConfigError(
            f"{store.path} holds taps {store.taps}, no {stage_tap(1, features)}..{stage_tap(4, features)}; cache "
            f"them with `kdep cache-teacher --taps {names}`"
        )
    taps = tuple(stage_tap(k, features) for k in range(1, n_t + 1)) if config.mode == "cached" else ()
    resolution = int(store.provenance["preprocessing"]["resolution"])
    spec = SearchSpec(str(store.path), paths, taps, resolution, config.seed, config.val_fraction,
                      objective == "ce", config.skip_bad)  # fmt: skip
    return SearchData(spec, split_counts(store, config.seed, config.val_fraction), objective, classes)


def _classes(config: SearchProcessConfig, store: FeatureStore) -> int:
    names = index_classes(config.shards or store.provenance["recorded"]["source"])
    if config.classes:
        return config.classes
    if not names:
        raise ConfigError("key 'classes': the shards have no index.json with class names; pass --classes N")
    return len(names)


def build_search(config: SearchProcessConfig, store: FeatureStore, data: SearchData, device: torch.device):
    """(the search model, the live teacher's stage maps or None) on ``device``."""
    torch.manual_seed(config.seed)
    features = config.stage_features
    model, _ = build_model(config.student, None)
    student = StageMaps(model, features)
    s_shapes = stage_shapes(student, data.spec.resolution)
    teacher = None
    if config.mode == "online":
        live = rebuild_teacher(store)  # FeatureTaps: the recorded model and its normalisation
        teacher = torch.nn.Sequential(live.normalize, StageMaps(live.model, features)).eval().to(device)
        t_dims = {k: v[0] for k, v in stage_shapes(teacher[1], data.spec.resolution).items()}
    else:
        t_dims = {t: int(store.layout.dims[t]) for t in data.spec.taps}
    pathways = make_pathways(t_dims, {k: v[0] for k, v in s_shapes.items()}, config.pathways, features)
    final = stage_tap(stage_count(list(t_dims), features), features)
    head = (s_shapes[final][0], data.classes if data.objective == "ce" else t_dims[final])
    search = ProcessSearch(student, pathways, config.transform_kind, data.objective, head, config.hidden,
                           config.kd_weight, config.pathway_loss)  # fmt: skip
    return search.to(device), teacher


def with_teacher(batches, teacher, device: torch.device):
    """Online mode: the live teacher's stage maps (no grad) as each batch's targets, on ``device``."""
    for batch in batches:
        batch = batch.to(device)
        with torch.no_grad():
            targets = teacher(batch.x)
        yield Batch(batch.x, targets, batch.labels)


def describe(config: SearchProcessConfig, store: FeatureStore, data: SearchData, model, total: int) -> str:
    return (
        f"search-process: {store.path} | {config.mode} | student {config.student} | {len(model.pathways)} pathways "
        f"({config.pathways}, {config.stage_features}), transform {config.transform_kind}, {config.pathway_loss} | "
        f"{config.hypergradient} alpha gradient | objective {data.objective} | images "
        f"{data.counts.train} train / {data.counts.val} held out | {total} steps x batch {config.batch_size}"
    )


def provenance(config: SearchProcessConfig, store: FeatureStore, data: SearchData) -> dict:
    teacher = store.provenance["teacher"]
    return {
        "cache_fingerprint": store.fingerprint(), "cache_path": str(Path(config.cache).resolve()),
        "teacher": {k: teacher[k] for k in ("arch", "weights", "taps", "dims", "normalization")},
        "student": {"arch": config.student, "weights": "random-init", "seed": config.seed},
        "resolution": data.spec.resolution, "config": config_to_dict(config),
        "versions": {**library_versions(), "kdep": pipeline.__version__, "host_python": platform.python_version()},
    }  # fmt: skip


TRANSFORM_DETAILS = {
    "mlp": "Linear(D_s, {hidden}) + BatchNorm1d + ReLU + Linear(., D_t) on pooled rows",
    "linear": "Linear(D_s, D_t) on pooled rows",
    "conv-reference": "the official connector: Conv3x3(C_s, m) + BN + ReLU, x * Conv1x1(m, 1)(x), Conv3x3(m, m) + BN "
                      "+ ReLU, nearest resize to the teacher map, Conv3x3(m, C_t) + BN; m = min(512, C_s, C_t)",
    "conv": "Conv1x1(C_s, min(512, C_s, C_t)) + BN + ReLU, resize to the teacher map (area down, nearest up), "
            "Conv3x3(., C_t) + BN",
}  # fmt: skip
PATHWAY_LOSS_DETAILS = {
    "hcl": "the official hcl: (mse + sum_k 2^-k mse of the maps average-pooled to the sizes of (4, 2, 1) below H) / "
           "(1 + sum_k 2^-k); on pooled rows = mse",
    "mse": "mean squared error",
}  # fmt: skip
# What the official code (bytedance/DistPro) does for each setting a process records.
REFERENCE_CODE = {
    "pathway_loss": "hcl", "stage_features": "pre_relu", "transform": "conv-reference (on maps)",
    "network_optimizer": "SGD, Nesterov momentum 0.9, constant lr 0.1 over the search",
    "hypergradient": "finite-difference, r = 0.01, unrolling the heavy-ball step under a Nesterov optimiser",
}  # fmt: skip


def search_record(config: SearchProcessConfig, data: SearchData, steps: int) -> dict:
    """Every setting of the search (process.json ``search``), with what the official code does (``reference_code``)."""
    nesterov = config.nesterov and config.momentum > 0
    return {
        "mode": config.mode, "order": "second", "xi": "the network's lr at the step",
        "virtual_step": "SGD with Nesterov momentum" if nesterov else "SGD with heavy-ball momentum",
        "hypergradient": config.hypergradient, "objective": data.objective, "classes": data.classes,
        "lr": config.lr, "lr_schedule": config.lr_schedule, "momentum": config.momentum, "nesterov": nesterov,
        "weight_decay": config.weight_decay,
        "alpha_optimizer": {"kind": "Adam", "lr": config.alpha_lr, "betas": list(BETAS),
                            "weight_decay": config.alpha_weight_decay},
        "alpha_init": "zeros (uniform softmax)",
        "fd_radius": config.fd_radius if config.hypergradient == "finite-difference" else None,
        "pathway_loss": config.pathway_loss, "stage_features": config.stage_features,
        "kd_weight": config.kd_weight, "batch_size": config.batch_size, "epochs": config.epochs, "steps": steps,
        "precision": "float32", "tf32": False, "reference_code": REFERENCE_CODE,
    }  # fmt: skip


def to_process(config: SearchProcessConfig, store: FeatureStore, data: SearchData, model, record) -> Process:
    kind = config.transform_kind
    detail = TRANSFORM_DETAILS[kind].format(hidden=config.hidden)
    loss = {"name": config.pathway_loss, "detail": PATHWAY_LOSS_DETAILS[config.pathway_loss]}
    n = len(record.train_loss)
    return Process(
        pathways=[p.to_dict() for p in model.pathways], logits=np.asarray(record.logits, np.float64),
        pathway_set=config.pathways, stage_features=config.stage_features,
        transform={"kind": kind, "detail": detail, "loss": loss},
        stages={"teacher": max(p.teacher_stage for p in model.pathways),
                "student": max(p.student_stage for p in model.pathways)},
        epochs=record.epochs,
        losses={"steps": list(range(1, n + 1)), "train": record.train_loss, "val": record.val_loss},
        search=search_record(config, data, n),
        split={"rule": "blake2b('<seed>\\x1fheld-out\\x1f<key>', 8 bytes, little endian) / 2**64 < val_fraction",
               "seed": config.seed, "val_fraction": config.val_fraction, **dataclasses.asdict(data.counts)},
        provenance=provenance(config, store, data),
    )  # fmt: skip


def run(config: SearchProcessConfig) -> SearchProcessResult:
    """Plan the data, build student, blocks and alpha, run the bi-level search, save the process and its plot.
    One process (refused under torchrun with several ranks), TF32 off: the finite-difference weight step (radius
    ``fd_radius`` / ||v||) mostly vanishes under TF32's 10-bit mantissa."""
    refuse_several_ranks("search-process", "run it without torchrun (one device: --device cuda); the search is "
                         "short, and train-student then runs the process on every rank")  # fmt: skip
    with tf32_off():
        return _search(config)


def _search(config: SearchProcessConfig) -> SearchProcessResult:
    device = pick_device(config.device)
    store = open_store(config.cache)
    data = plan_data(config, store)
    model, teacher = build_search(config, store, data, device)
    per_epoch = data.counts.train // config.batch_size
    total = min(per_epoch * config.epochs, config.max_steps or per_epoch * config.epochs)
    if total == 0:
        raise ConfigError(
            f"key 'batch_size': {config.batch_size} is more than the {data.counts.train} train images"
        )
    if not config.quiet:
        typer.echo(describe(config, store, data, model, total), err=True)
    network = torch.optim.SGD(model.weight_parameters(), lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay, nesterov=config.nesterov)  # fmt: skip
    architect = Architect(model, network, config.alpha_lr, BETAS, config.alpha_weight_decay, "second",
                          config.fd_radius, config.hypergradient)  # fmt: skip
    train = lambda epoch: search_batches(data.spec, "train", epoch, config.batch_size, config.workers)  # noqa: E731
    val = endless(data.spec, "val", config.batch_size, config.workers)
    if teacher is not None:
        train_fn = train
        train = lambda epoch: with_teacher(train_fn(epoch), teacher, device)  # noqa: E731
        val = with_teacher(val, teacher, device)
    with progress_bar(total=total, desc="search", unit="step", disable=config.quiet) as bar:
        record = search_loop(model, network, architect, train, val, config.epochs, total,
                             lambda s: lr_at(config.lr_schedule, config.lr, s, total), device,
                             lambda _s: bar.update(1))  # fmt: skip
    process = to_process(config, store, data, model, record)
    out = Path(config.out)
    path = process.save(out / "process.json")
    plot = plot_alpha(process, out / "alpha.png")
    write_resolved_config(out, "search_process", config, {"artefact": path.name})
    return SearchProcessResult(process, path, plot)


def report(config: SearchProcessConfig, result: SearchProcessResult) -> None:
    p = result.process
    last = dict(zip(p.names, p.weights[-1], strict=True))
    top = ", ".join(f"{n} {w:.3f}" for n, w in sorted(last.items(), key=lambda kv: -kv[1])[:3])
    typer.echo(
        f"wrote {result.path} ({len(p.names)} pathways, {p.steps} steps; final top: {top}); plot {result.plot}"
    )
