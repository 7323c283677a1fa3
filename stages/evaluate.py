"""Stage 4 `eval`: linear probe, k-NN, optional fine-tuning and teacher agreement for one or more backbones.

    kdep eval --train out/demo/data/train --val out/demo/data/val --out out/demo/eval --resolution 64 \\
        --backbone random=resnet18:random --backbone kdep=resnet18:out/demo/student/backbone.pt \\
        --backbone teacher=resnet50:out/demo/teacher.pt
    kdep eval --manifest manifests/demo.yaml --finetune-epochs 3
    kdep eval --manifest manifests/demo.yaml --teacher resnet50 --teacher-weights out/demo/teacher.pt \\
        --projection out/demo/proj-r18.npz --set eval.agreement_views=paper --set eval.agreement_seed=7
    kdep eval --manifest manifests/demo.yaml --set eval.probe_cs=1.0 --set eval.knn_k=10 --set eval.cache_features=false

A backbone is ``name=arch:weights`` with weights ``random`` (seeded init), a torchvision weights name, or a
file: a backbone state dict without the classifier (loaded strictly) or a full checkpoint. Features are the
centre view at ``--resolution`` through ``replay_view``, extracted once per backbone and split for the evaluated
tap only (``--tap``, default post_relu), written as they come into float16 memory-mapped files
(``--feature-dtype``) and shared by the probe and k-NN. Probe: multinomial logistic regression on
train-standardised features, scikit-learn's objective and C, solved by full-batch L-BFGS in torch on ``--device``
(``--probe-backend sklearn``: scikit-learn on the CPU); C picked on a 20% per-class held-out part of train
(warm-started sweep), refitted on all of train (pipeline/evaluation/logistic.py). k-NN: cosine, k = 20, one vote
per neighbour, ties to the larger summed similarity, over blocks of train rows on ``--device``
(pipeline/evaluation/probes.py). Fine-tuning: KDEP supplement B.2 recipe, epochs as given, images read from the
shards by byte range (pipeline/evaluation/finetune.py). Agreement, on val views that were never cached (centre
views by default, or seeded views of the recipe ``agreement_views``): mean cosine between the student's tap and
the projected teacher target, and linear CKA between the student's and the raw teacher's features.
``kdep eval`` runs in one process on one device; under torchrun (WORLD_SIZE > 1) it stops before any work.

Every accuracy comes with its 95% Wilson score interval over the images it is measured on (the val split; the
held-out part of train for the C sweep), pipeline/evaluation/intervals.py: in the printed table as
``0.760 [0.696, 0.815]``, in results.json as ``<metric>_ci95: [low, high]`` beside ``<metric>`` (method, level
and counts under ``intervals``), and as error bars in the plot. The interval covers the choice of evaluation
images only, not the spread between training seeds.

Reads labelled train/val shards and the backbone files. Writes ``OUT/results.json`` (one row per backbone),
``OUT/results.png`` (probe / k-NN / fine-tune top-1 per backbone with 95% intervals), with ``--predictions``
``OUT/predictions.npz`` (each backbone's probe and k-NN label per val image, for paired comparisons),
``OUT/features/<name>.<split>.<key>/{<tap>.npy,labels.npy,keys.npy}`` (reused when the backbone, data, view,
device type and autocast are unchanged; ``.npz`` files of earlier versions are read too; with
``--no-cache-features`` they go to a temporary folder in OUT, removed at the end) and ``OUT/config.eval.json``.
Views are decoded by ``--workers`` DataLoader processes, each reading whole shards (the same features for any
count).
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import typer
from torch import nn

from pipeline.data.shards import ShardInfo, index_classes, list_shards
from pipeline.evaluation.backbones import BackboneSpec, EvalError, parse_backbone
from pipeline.evaluation.feature_files import SplitFeatures, feature_dir, feature_key, load_features
from pipeline.evaluation.features import (
    agreement_features,
    eval_numerics,
    extract_features,
    load_backbone,
    model_taps,
    projected_targets,
    resolve_device,
)
from pipeline.evaluation.finetune import FinetuneRecipe, finetune
from pipeline.evaluation.intervals import LEVEL, METHOD, accuracy_interval
from pipeline.evaluation.probes import agreement, knn_predict, linear_probe, top1
from pipeline.evaluation.report import plot_results, print_table
from pipeline.files import atomic_path, write_json_atomic
from pipeline.manifest import config_to_dict
from pipeline.runtime import refuse_several_ranks
from stages.common import write_resolved_config
from stages.config import EvalConfig

RESULTS_FORMAT = "kdep-eval/1"


def run(config: EvalConfig) -> dict:
    """Evaluate every backbone; write results.json, results.png and config.eval.json; return the results."""
    refuse_several_ranks("eval", "run it without torchrun (it uses one device: --device cuda)")
    specs = [parse_backbone(b) for b in config.backbones]
    splits = {"train": list_shards(config.train), "val": list_shards(config.val)}
    loaded = {s.name: load_backbone(s, config.seed, config.resolution) for s in specs}
    check_taps(specs, loaded, config.tap)
    models = {n: model for n, (model, _) in loaded.items()}
    with features_folder(config) as folder:
        feats = features_per_split(specs, loaded, splits, config, folder)
        classes = count_classes(config.train, feats)
        print_banner(config, feats, classes)
        scored = [score_backbone(s, loaded[s.name][1], feats[s.name], config) for s in specs]
        rows = [row for row, _ in scored]
        sizes = {split: len(f.labels) for split, f in next(iter(feats.values())).items()}
        if config.predictions:
            write_predictions(Path(config.out) / "predictions.npz", feats, scored)
    if config.finetune_epochs:
        n_val = sizes["val"]
        for row in rows:
            row["finetune_top1"] = finetune_backbone(models[row["name"]], splits, classes, config)
            row["finetune_top1_ci95"] = accuracy_interval(row["finetune_top1"], n_val)
    agree = score_agreement(models, splits["val"], config) if config.teacher else None
    for row in rows:
        row.update((agree or {}).get("rows", {}).get(row["name"], {}))
    results = results_body(config, rows, sizes, classes, agree)
    out = Path(config.out)
    write_resolved_config(out, "eval", config)
    write_json_atomic(out / "results.json", results)
    plot_results(rows, out / "results.png")
    return results


def check_taps(specs: list[BackboneSpec], loaded: dict, tap: str) -> None:
    """Every backbone defines ``tap`` (before any image is read)."""
    for s in specs:
        if tap not in model_taps(loaded[s.name][0]):
            raise EvalError(f"backbone {s.name!r} ({s.arch}) has no {tap} tap; use --tap post_relu")


@contextlib.contextmanager
def features_folder(config: EvalConfig) -> Iterator[Path]:
    """OUT/features, or (``cache_features`` off) a temporary folder in OUT that is removed afterwards: the
    features are memory-mapped files either way, never whole splits in RAM."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.cache_features:
        yield out / "features"
        return
    with tempfile.TemporaryDirectory(prefix=".features-", dir=out) as tmp:
        yield Path(tmp)


def features_per_split(
    specs: list[BackboneSpec],
    loaded: dict,
    splits: dict[str, list[ShardInfo]],
    config: EvalConfig,
    folder: Path,
) -> dict[str, dict[str, SplitFeatures]]:
    """{backbone: {split: features of ``config.tap``}}: from ``folder`` when saved there, else one extraction pass
    per split for the backbones that lack them, written into ``folder``."""
    numerics = eval_numerics(resolve_device(config.device))
    out: dict[str, dict[str, SplitFeatures]] = {s.name: {} for s in specs}
    for split, shards in splits.items():
        dirs = {
            s.name: feature_dir(
                folder, s.name, split,
                feature_key(loaded[s.name][1], s.arch, shards, config.resolution, "center", 0, numerics),
            )
            for s in specs
        }  # fmt: skip
        cached = {n: load_features(d, config.tap, config.feature_dtype) for n, d in dirs.items()}
        todo = {n: loaded[n][0] for n in dirs if cached[n] is None}
        fresh = (
            extract_features(
                todo, shards, config.resolution, config.batch_size, config.device, desc=split,
                workers=config.workers, tap=config.tap, folders={n: dirs[n] for n in todo},
                dtype=config.feature_dtype,
            )
            if todo
            else {}
        )  # fmt: skip
        for n in dirs:
            out[n][split] = fresh[n] if n in fresh else cached[n]
    return out


def count_classes(train: str, feats: dict[str, dict[str, SplitFeatures]]) -> int:
    """Class count from the train index, else 1 + the largest label seen; a label outside it is an error."""
    any_feats = next(iter(feats.values()))
    largest = max(int(f.labels.max()) for f in any_feats.values() if len(f.labels))
    names = index_classes(train)
    classes = len(names) if names else largest + 1
    if largest >= classes:
        raise EvalError(f"label {largest} but the train index lists {classes} classes; re-make the shards")
    return classes


def score_backbone(
    spec: BackboneSpec, identity: dict, feats: dict[str, SplitFeatures], config: EvalConfig
) -> tuple[dict, dict[str, np.ndarray]]:
    """Linear-probe and k-NN top-1 of one backbone on its cached features (both on ``config.device``, the probe
    by ``config.probe_backend``): its results.json row, and the (M,) predicted label of every val image
    ({"probe": ..., "knn": ...})."""
    train, val = feats["train"], feats["val"]
    x_train, x_val = train.taps[config.tap], val.taps[config.tap]
    start = time.perf_counter()
    probe = linear_probe(
        x_train, train.labels, x_val, val.labels, config.probe_cs, config.probe_holdout, config.seed,
        config.probe_max_iter, config.probe_backend, config.device,
    )  # fmt: skip
    probe_done = time.perf_counter()
    knn_pred = knn_predict(x_train, train.labels, x_val, config.knn_k, config.device)
    knn = top1(knn_pred, val.labels)
    done = time.perf_counter()
    n_val, n_hold = len(val.labels), probe.sweep_rows
    sweep_ci = {c: accuracy_interval(a, n_hold) for c, a in probe.sweep.items()}
    return {
        "name": spec.name, "arch": spec.arch, "weights": spec.weights, "identity": identity,
        "tap": config.tap, "dim": int(x_train.shape[1]),
        "probe_top1": probe.top1, "probe_top1_ci95": accuracy_interval(probe.top1, n_val), "probe_c": probe.c,
        "probe_sweep": probe.sweep, "probe_sweep_ci95": sweep_ci,
        "probe_sweep_rows": n_hold, "probe_converged": probe.converged,
        "knn_top1": knn, "knn_top1_ci95": accuracy_interval(knn, n_val), "knn_k": config.knn_k,
        "finetune_top1": None, "finetune_top1_ci95": None,
        "agree_cosine": None, "agree_cka": None, "probe_knn_seconds": round(done - start, 3),
        "probe_backend": config.probe_backend, "probe_seconds": round(probe_done - start, 3),
        "knn_seconds": round(done - probe_done, 3), "feature_dtype": str(x_train.dtype),
    }, {"probe": probe.predictions, "knn": knn_pred}  # fmt: skip


def write_predictions(path: Path, feats: dict[str, dict[str, SplitFeatures]], scored: list) -> None:
    """``predictions.npz``: ``labels`` and ``keys`` (M,) of the val images, and ``<backbone>.probe`` /
    ``<backbone>.knn`` (M,) int64 predicted labels, rows in the same order (for paired comparisons)."""
    val = next(iter(feats.values()))["val"]
    arrays = {f"{row['name']}.{kind}": pred for row, preds in scored for kind, pred in preds.items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, labels=np.asarray(val.labels), keys=np.asarray(val.keys), **arrays)


def finetune_backbone(
    model: nn.Module, splits: dict[str, list[ShardInfo]], classes: int, config: EvalConfig
) -> float:
    """Val top-1 after fine-tuning a copy of ``model`` with the configured KDEP downstream recipe."""
    recipe = FinetuneRecipe(
        epochs=config.finetune_epochs,
        lr=config.finetune_lr,
        weight_decay=config.finetune_weight_decay,
        batch_size=config.finetune_batch_size,
    )
    return finetune(
        copy.deepcopy(model), splits["train"], splits["val"], classes, config.resolution, recipe, config.seed,
        config.device, config.workers,
    )  # fmt: skip


def score_agreement(models: dict[str, nn.Module], val: list[ShardInfo], config: EvalConfig) -> dict:
    """Teacher-student agreement on val views: {teacher, identity, views, ..., rows: {name: agree_* values}}."""
    teacher, identity = load_backbone(
        BackboneSpec("teacher", config.teacher, config.teacher_weights), config.seed, config.resolution
    )
    students, t = agreement_features(
        models, teacher, val, config.agreement_tap, config.resolution, config.batch_size, config.device,
        config.agreement_views, config.agreement_seed, config.workers,
    )  # fmt: skip
    targets = projected_targets(config.projection, t) if config.projection else None
    rows = {}
    for name, s in students.items():
        fits = targets is not None and targets.shape[1] == s.shape[1]  # a projection is for one student width
        scores = agreement(s, t, targets if fits else None)
        rows[name] = {"agree_cosine": scores["cosine"], "agree_cka": scores["cka"]}
    return {
        "teacher": config.teacher, "teacher_identity": identity, "projection": config.projection,
        "targets_dim": None if targets is None else int(targets.shape[1]), "tap": config.agreement_tap,
        "views": config.agreement_views, "seed": config.agreement_seed if config.agreement_views != "center" else None,
        "samples": len(t), "rows": rows,
    }  # fmt: skip


def print_banner(config: EvalConfig, feats: dict[str, dict[str, SplitFeatures]], classes: int) -> None:
    any_feats = next(iter(feats.values()))
    typer.echo(
        f"eval: {len(feats)} backbones, {len(any_feats['train'].labels)} train / {len(any_feats['val'].labels)} "
        f"val images, {classes} classes, {config.resolution} px, tap {config.tap}, device {config.device}, "
        f"probe {config.probe_backend}"
    )


def results_body(
    config: EvalConfig, rows: list[dict], sizes: dict[str, int], classes: int, agreement: dict | None
) -> dict:
    """results.json: ``sizes`` = {split: images}."""
    return {
        "format": RESULTS_FORMAT,
        "data": {
            "train": config.train,
            "val": config.val,
            "train_samples": sizes["train"],
            "val_samples": sizes["val"],
            "classes": classes,
        },
        "intervals": {
            "method": METHOD,
            "level": LEVEL,
            "val_samples": sizes["val"],  # n of probe, k-NN and fine-tune top-1
            "note": "<metric>_ci95: [low, high], Wilson interval over the evaluation images (not over seeds)",
        },
        "backbones": rows,
        "agreement": {k: v for k, v in agreement.items() if k != "rows"} if agreement else None,
        "config": config_to_dict(config),
    }


def report(config: EvalConfig, results: dict) -> None:
    print_table(results)
    typer.echo(f"wrote {Path(config.out) / 'results.json'} and results.png")
