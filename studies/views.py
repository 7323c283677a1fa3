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

import gc
import json
import time

import typer

from pipeline.evaluation.intervals import LEVEL
from pipeline.evaluation.seed_intervals import METHOD
from pipeline.manifest import config_to_dict
from pipeline.projection.artefact import manifest_path
from stages import cache_teacher, fit_svd, train_student
from stages.config import CacheTeacherConfig, FitSvdConfig, StudyViewsConfig, TrainStudentConfig
from studies.common import (
    REFERENCE_METRICS,
    REFERENCES,
    StudyPaths,
    agreement_runs,
    check_resume,
    cpu_threads,
    evaluate_runs,
    prepare_data_and_teacher,
)
from studies.views_table import add_deltas, markdown_table, summarise_k, write_tables

STUDY_FORMAT = "kdep-study-views/1"


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


def _step(title: str, start: float) -> None:
    typer.echo(f"[study {time.perf_counter() - start:7.1f} s] {title}", err=True)


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


def summarise(
    config: StudyViewsConfig, runs: list[dict], results: dict, cosines: dict, seconds: float
) -> dict:
    """Every run's scores and one row per k (``studies.views_table``), with what they were measured on."""
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
