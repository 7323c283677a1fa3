"""`kdep study views` (make study): how many cached views per image match a fresh view every epoch?

    make study
    kdep study views --manifest manifests/study-views.yaml
    kdep study views --manifest manifests/study-views.yaml --seeds 5 --ks 1,4,8 --threads 1
    kdep study-views --out /tmp/study --epochs 4 --ks 1,2 --seeds 1 --val-per-class 50   # the same command

From ONE cache of E views per image (E = ``epochs``), the same student recipe trains for E epochs on the first k
views (``train-student --views-used k``; the first k views of an E-view cache are exactly a k-view cache, and with
the walk policy every image shows each of its k views once per cycle of k epochs) for each k of ``ks`` up to E,
and for k = E itself: a fresh view every epoch, the online-equivalent baseline. Each k trains ``seeds`` students
(seeds 0..S-1: student init, shard order, view schedule and shuffle; the cache and the SVD + PTS projection,
fitted once on all E views, are shared, so only the views a student trains on differ between rows). Every
student is scored on the same held-out images: linear-probe and k-NN top-1 by ``kdep eval`` (centre views), and
the mean cosine between the student's pre-ReLU feature and the projected teacher target on held-out views (val
images are never cached; ``agreement_views`` views, seeded like ``kdep eval``'s), the same cosine ``kdep eval``
reports, kept per image for its interval. Each row's 95% interval adds the seed-to-seed variance to the
evaluation-set error (binomial for accuracies), t on Welch-Satterthwaite degrees of freedom; one seed gives the
Wilson interval: ``pipeline/evaluation/seed_intervals.py``.

Steps, each reused when done (a re-run with more seeds or another k trains only what is new): the demo shards
with a large val split (the evaluation set), the labelled demo teacher, the E-view cache, SVD + PTS, the students,
the evaluation. Writes into OUT: ``data/``, ``teacher.pt``, ``cache/``, ``proj.npz``, ``students/k<k>-s<seed>/``,
``eval/`` (kdep eval's results.json and features), ``study.json`` (every run and every row), ``study.csv``,
``study.md``, ``study.png`` and ``config.study.json`` (settings that change an artefact must match on a re-run).
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import typer
from threadpoolctl import threadpool_limits

from pipeline.data.shards import ShardInfo, list_shards
from pipeline.demo.shards import DemoSpec, write_demo_data
from pipeline.evaluation.backbones import BackboneSpec, EvalError
from pipeline.evaluation.features import agreement_features, load_backbone, projected_targets
from pipeline.evaluation.intervals import LEVEL
from pipeline.evaluation.probes import l2_normalise
from pipeline.evaluation.seed_intervals import METHOD
from pipeline.evaluation.study_table import add_deltas, markdown_table, summarise_k, write_tables
from pipeline.manifest import ConfigError, config_to_dict
from pipeline.projection.artefact import manifest_path
from stages import cache_teacher, demo_teacher, evaluate, fit_svd, train_student
from stages.common import write_resolved_config
from stages.config import (
    CacheTeacherConfig,
    DemoTeacherConfig,
    EvalConfig,
    FitSvdConfig,
    StudyViewsConfig,
    TrainStudentConfig,
)

STUDY_FORMAT = "kdep-study-views/1"
AGREEMENT_TAP = "pre_relu"  # the KDEP tap: the student's pre-ReLU feature regresses the projected target
EVAL_BATCH = 256  # images per forward pass during evaluation
REFERENCES = ("teacher", "random")  # reference rows: the labelled teacher and a random-init student (seed 0)
REFERENCE_METRICS = ("probe_top1", "probe_top1_ci95", "knn_top1", "knn_top1_ci95")
RESUME_FREE = ("ks", "seeds", "knn_k", "agreement_views", "agreement_images", "threads", "workers", "device",
               "quiet")  # settings a re-run may change: they touch no artefact it reuses  # fmt: skip


@dataclass(frozen=True)
class StudyPaths:
    """Where each step of the study writes, under OUT."""

    out: Path
    data: Path  # demo shards: train/ (cached, distilled on, probe train set) and val/ (the evaluation set)
    teacher: Path  # the labelled demo teacher's state dict
    cache: Path  # the E-view feature cache
    projection: Path  # SVD + PTS, fitted on all E views
    students: Path  # one train-student run folder per (k, seed)
    eval: Path  # kdep eval's output (results.json, features/)

    @classmethod
    def under(cls, out: str | Path) -> StudyPaths:
        out = Path(out)
        return cls(out, out / "data", out / "teacher.pt", out / "cache", out / "proj.npz", out / "students",
                   out / "eval")  # fmt: skip


def run(config: StudyViewsConfig) -> dict:
    """Every step in order (each reused when done); returns the summary also written to OUT/study.json."""
    start = time.perf_counter()
    paths = StudyPaths.under(config.out)
    check_resume(config)
    with cpu_threads(config.threads):
        prepare_cache(config, paths, start)
        runs = [
            train_run(config, paths, k, seed, start) for k in config.study_ks for seed in range(config.seeds)
        ]
        _step(f"evaluating {len(runs)} students and the teacher", start)
        results = evaluate_runs(config, paths, runs)
        _step(f"cosine to the projected target on held-out {config.agreement_views} views", start)
        cosines = agreement_runs(config, paths, runs)
    summary = summarise(config, runs, results, cosines, time.perf_counter() - start)
    write_tables(paths.out, summary)
    _step(f"done; table in {paths.out / 'study.md'}", start)
    return summary


@contextlib.contextmanager
def cpu_threads(threads: int) -> Iterator[None]:
    """torch's CPU threads and the BLAS / OpenMP pools of numpy, scipy and scikit-learn (the probe) capped at
    ``threads`` inside the block (0: left as they are), restored after it. On a machine shared with other jobs,
    more threads than free cores wait on each other: a 32 px ResNet-18 step ran 5x slower with 2 than with 1."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads or None):
            yield
    finally:
        torch.set_num_threads(before)


def _step(title: str, start: float) -> None:
    typer.echo(f"[study {time.perf_counter() - start:7.1f} s] {title}", err=True)


def check_resume(config: StudyViewsConfig) -> None:
    """Refuse an OUT made with settings that changed a reused artefact (data, teacher, cache, recipe); then record
    the settings in OUT/config.study.json."""
    path = Path(config.out) / "config.study.json"
    now = config_to_dict(config)
    if path.is_file():
        before = json.loads(path.read_text())["config"]
        diffs = [
            f"{k}: {before.get(k)!r} -> {v!r}"
            for k, v in now.items()
            if k not in RESUME_FREE and before.get(k) != v
        ]
        if diffs:
            raise ConfigError(
                f"{config.out} holds a study made with other settings ({'; '.join(diffs)}); "
                "use another --out, or delete it to start over"
            )
    write_resolved_config(config.out, "study", config)


def prepare_data_and_teacher(config, paths: StudyPaths, step: Callable[[str], None]) -> None:
    """The demo shards and the labelled demo teacher of a study (each made once); ``config`` is a study config
    (StudyViewsConfig or StudyLayersConfig: the data, teacher and resolution fields), ``step`` says what runs."""
    if not (paths.data / "val" / "index.json").is_file():
        step(
            f"generating {config.classes} x {config.train_per_class} train / {config.val_per_class} val images"
        )
        spec = DemoSpec(config.data_seed, config.classes, config.train_per_class, config.val_per_class,
                        config.per_shard, config.min_side, config.max_side)  # fmt: skip
        write_demo_data(spec, paths.data)
    if not paths.teacher.is_file():
        step(f"training the demo teacher ({config.teacher}, {config.teacher_epochs} epochs, with labels)")
        demo_teacher.run(DemoTeacherConfig(train=str(paths.data / "train"), out=str(paths.teacher), arch=config.teacher,
                                           epochs=config.teacher_epochs, resolution=config.resolution,
                                           seed=config.data_seed, quiet=config.quiet))  # fmt: skip


def prepare_cache(config: StudyViewsConfig, paths: StudyPaths, start: float) -> None:
    """Demo shards, the labelled demo teacher, the E-view cache and the SVD + PTS projection (each once)."""
    prepare_data_and_teacher(config, paths, lambda title: _step(title, start))
    _step(f"caching E = {config.epochs} views per train image (resumes)", start)
    cache_teacher.run(CacheTeacherConfig(shards=str(paths.data / "train"), out=str(paths.cache), teacher=config.teacher,
                                         weights=str(paths.teacher), views=config.epochs, recipe=config.recipe,
                                         resolution=config.resolution, seed=config.data_seed, workers=config.workers,
                                         device=config.device, quiet=config.quiet))  # fmt: skip
    if not manifest_path(paths.projection).is_file():
        _step("fitting SVD + PTS on all E views", start)
        fit_svd.run(
            FitSvdConfig(
                cache=str(paths.cache), out=str(paths.projection), dim=config.dim, quiet=config.quiet
            )
        )


def train_run(config: StudyViewsConfig, paths: StudyPaths, k: int, seed: int, start: float) -> dict:
    """One student on the first k views with ``seed`` (reused when done); returns {name, k, seed, backbone}."""
    name = f"k{k}-s{seed}"
    out = paths.students / name
    if not (out / "done.json").is_file():
        _step(f"training {name}: the first {k} of {config.epochs} views, seed {seed}", start)
        train_student.run(TrainStudentConfig(
            cache=str(paths.cache), projection=(str(paths.projection),), student=(config.student,), out=str(out),
            loss=config.loss, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, views_used=k,
            seed=seed, workers=config.workers, device=config.device, checkpoint_every=config.epochs,
            quiet=config.quiet,
        ))  # fmt: skip
        gc.collect()  # the run's persistent DataLoader workers sit in reference cycles: end them before the next
    done = json.loads((out / "done.json").read_text())
    backbone = next(iter(done["students"].values()))["backbone"]
    return {"name": name, "k": k, "seed": seed, "backbone": backbone}


def eval_device(device: str) -> str:
    """Evaluation's device (cpu or cuda[:N]) for the study's ``device`` (auto: CUDA when there is one)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def evaluate_runs(config: StudyViewsConfig, paths: StudyPaths, runs: list[dict]) -> dict:
    """``kdep eval`` (probe and k-NN on centre views) of every student and of the teacher (reference row)."""
    backbones = tuple(f"{r['name']}={config.student}:{r['backbone']}" for r in runs)
    # float32 feature files: a random-init MobileNetV2's features (the reference row) are below float16's range
    eval_config = EvalConfig(train=str(paths.data / "train"), val=str(paths.data / "val"), out=str(paths.eval),
                             backbones=(*backbones, f"teacher={config.teacher}:{paths.teacher}",
                                        f"random={config.student}:random"),
                             resolution=config.resolution, batch_size=EVAL_BATCH, device=eval_device(config.device),
                             workers=config.workers, knn_k=config.knn_k,
                             feature_dtype="float32")  # fmt: skip
    return evaluate.run(eval_config)


def agreement_shards(shards: list[ShardInfo], images: int) -> list[ShardInfo]:
    """The first whole shards holding at least ``images`` images (0: all of them)."""
    if images == 0:
        return shards
    kept, count = [], 0
    for s in shards:
        if count >= images:
            break
        kept.append(s)
        count += s.samples or 0
    return kept


def row_cosines(student: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> np.ndarray:
    """(B,) cos(s_b, t_b) in float64: the rows whose mean is ``kdep eval``'s agreement cosine (probes.mean_cosine)."""
    s, t = torch.as_tensor(student).double(), torch.as_tensor(targets).double()
    return (l2_normalise(s) * l2_normalise(t)).sum(1).numpy()


def agreement_runs(config: StudyViewsConfig, paths: StudyPaths, runs: list[dict]) -> dict:
    """Per student, the mean and the standard deviation over images of the cosine between its pre-ReLU feature and
    the projected teacher target, on held-out val views: {images, views, seed, rows: {name: {...}}}."""
    val = agreement_shards(list_shards(str(paths.data / "val")), config.agreement_images)
    students = {
        r["name"]: load_backbone(BackboneSpec(r["name"], config.student, r["backbone"]), 0)[0] for r in runs
    }
    teacher, _ = load_backbone(BackboneSpec("teacher", config.teacher, str(paths.teacher)), 0)
    seed = EvalConfig.agreement_seed  # kdep eval's default view seed, unlike the cache's
    feats, raw = agreement_features(students, teacher, val, AGREEMENT_TAP, config.resolution, EVAL_BATCH,
                                    eval_device(config.device), config.agreement_views, seed, config.workers)  # fmt: skip
    targets = projected_targets(str(paths.projection), raw)
    rows = {}
    for name in students:
        if name not in feats:
            raise EvalError(
                f"student {config.student} has no {AGREEMENT_TAP} tap; the study needs a ResNet or MobileNetV2"
            )
        cos = row_cosines(feats[name], targets)
        rows[name] = {
            "agree_cosine": float(cos.mean()),
            "agree_cosine_sd": float(cos.std(ddof=1)) if len(cos) > 1 else 0.0,
        }
    return {"images": len(raw), "views": config.agreement_views, "seed": seed, "rows": rows}


def summarise(
    config: StudyViewsConfig, runs: list[dict], results: dict, cosines: dict, seconds: float
) -> dict:
    """Every run's scores and one row per k (``pipeline.evaluation.study_table``), with what they were measured on."""
    scored = {row["name"]: row for row in results["backbones"]}
    per_run = [{**r, "probe_top1": scored[r["name"]]["probe_top1"], "knn_top1": scored[r["name"]]["knn_top1"],
                **cosines["rows"][r["name"]]} for r in runs]  # fmt: skip
    n_val, n_agree = results["data"]["val_samples"], cosines["images"]
    rows = add_deltas(
        [summarise_k(k, [r for r in per_run if r["k"] == k], n_val, n_agree) for k in config.study_ks]
    )
    return {
        "format": STUDY_FORMAT, "epochs": config.epochs, "ks": list(config.study_ks), "seeds": config.seeds,
        "data": {**results["data"], "agreement_images": n_agree, "agreement_views": cosines["views"],
                 "agreement_seed": cosines["seed"], "resolution": config.resolution},
        "intervals": {"level": LEVEL, "method": METHOD, "doc": "pipeline/evaluation/seed_intervals.py"},
        "rows": rows, "runs": per_run,
        "references": {name: {m: scored[name][m] for m in REFERENCE_METRICS} for name in REFERENCES},
        "seconds": round(seconds, 1), "config": config_to_dict(config),
    }  # fmt: skip


def report(config: StudyViewsConfig, summary: dict) -> None:
    typer.echo(markdown_table(summary))
    typer.echo(
        f"wrote study.md, study.csv, study.json and study.png in {config.out} ({summary['seconds']:.0f} s)"
    )
