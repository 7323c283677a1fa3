"""`kdep study views` (make study): is a student distilled from k cached views as good as one distilled online?

    make study
    kdep study views --manifest manifests/study-views.yaml
    kdep study views --manifest manifests/study-views-gpu.yaml          # the --device cuda profile
    kdep study views --manifest manifests/study-views.yaml --seeds 8 --ks 1,4,16   # finished students are reused

Arms, all the same student recipe for ``epochs`` epochs:

- ``online``: true online KD (``train-student --online-teacher --fresh-views``): every (image, epoch) gets a fresh
  view drawn from the cache's recipe and seed at an index outside its pool, fed to the live teacher. The reference.
- ``k<k>`` for k in ``ks``: the first k views of ONE cache of ``views`` views per image (``--views-used k``), each
  view used epochs / k times. One SVD + PTS projection, fitted on all of that cache, serves every arm (the online
  arm projects its live teacher's features with it too), so only the views differ between arms.
- reference rows: the random-init student (the very initialisations the arms start from, one per seed) and the
  labelled teacher.

Pairing: seed s gives every arm the same student initialisation (``torch.manual_seed(s)``) and the same data order
(the shard order and the shuffle are seeded by (seed, epoch, loader consumer), never by the views), so arms differ
only in the views; students train seed by seed (every arm of seed 0, then of seed 1, ...), so the machine's load
drifts over all arms alike. Metrics on held-out images: probe and k-NN top-1 (``kdep eval``, centre views, with
each image's predictions), and the cosine between the student's pre-ReLU feature and the projected teacher target
on fresh views of the training recipe (val images are never cached or trained on). Times: seconds per epoch of the
training loop (metrics.jsonl), and the wall and CPU seconds of each train-student call (CPU of the process and its
loader workers), with the load average around it.

The answer (``studies/views_table.py``): per arm the mean and 95% interval of every metric over seeds and the
evaluation set; per cached arm its paired difference to online with its interval and the cost ratio online /
cached; and the verdict: the study answers only when every distilled arm beats the random-init student with
non-overlapping intervals on probe and k-NN, else it says it cannot and why. Writes into OUT: ``data/``,
``teacher.pt``, ``cache/``, ``proj.npz``, ``students/<arm>-s<seed>/`` (each with ``timing.json``) and
``random-s<seed>/``, ``eval/`` (results.json, predictions.npz, features), ``study.json``, ``study.csv``,
``study.md``, ``study.png`` and ``config.study.json`` (settings that change a reused artefact are refused).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch
import typer

from pipeline.files import write_json_atomic
from pipeline.models import build_for_resolution
from pipeline.projection.artefact import manifest_path
from pipeline.runtime import cpu_threads
from pipeline.student.checkpoints import export_backbone, read_metrics
from stages import cache_teacher, fit_svd, train_student
from stages.config import CacheTeacherConfig, FitSvdConfig, StudyViewsConfig, TrainStudentConfig
from studies.common import (
    StudyPaths,
    agreement_runs,
    check_resume,
    evaluate_runs,
    prepare_data_and_teacher,
)
from studies.views_report import markdown_study, summarise, write_views_tables


def run(config: StudyViewsConfig) -> dict:
    """Every step in order (each reused when done); returns the summary also written to OUT/study.json."""
    start, load = time.perf_counter(), os.getloadavg()
    paths = StudyPaths.under(config.out)
    check_resume(config)
    with cpu_threads(config.threads):
        prepare_cache(config, paths, start)
        inits = [random_init(config, paths, seed) for seed in range(config.seeds)]
        runs = [
            train_run(config, paths, arm, seed, start) for seed in range(config.seeds) for arm in arms(config)
        ]
        _step(f"evaluating {len(runs)} students, {len(inits)} random inits and the teacher", start)
        references = (f"teacher={config.teacher}:{paths.teacher}",)
        results = evaluate_runs(config, paths, runs + inits, references, predictions=True)
        predictions = dict(np.load(paths.eval / "predictions.npz"))
        _step(f"cosine to the projected target on fresh {config.recipe} views of held-out images", start)
        cosines = agreement_runs(config, paths, runs + inits, views=config.recipe)
    timing = {"seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds(),
              "load_average_start": list(load), "load_average_end": list(os.getloadavg())}  # fmt: skip
    summary = summarise(config, runs, inits, results, predictions, cosines, timing)
    write_views_tables(paths.out, summary)
    _step(f"done; table in {paths.out / 'study.md'}", start)
    return summary


def _step(title: str, start: float) -> None:
    typer.echo(f"[study {time.perf_counter() - start:7.1f} s] {title}", err=True)


def arms(config: StudyViewsConfig) -> list[str]:
    """``online`` first, then ``k<k>`` for each k of ``ks``, ascending."""
    return ["online", *(f"k{k}" for k in sorted(config.ks))]


def arm_views(arm: str) -> int | None:
    """The k of a cached arm (None: online)."""
    return None if arm == "online" else int(arm[1:])


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def prepare_cache(config: StudyViewsConfig, paths: StudyPaths, start: float) -> None:
    """Demo shards, the labelled demo teacher, the cache of ``views`` views and SVD + PTS on all of it (each once)."""
    prepare_data_and_teacher(config, paths, lambda title: _step(title, start))
    _step(f"caching {config.views} views per train image (resumes)", start)
    cache_teacher.run(CacheTeacherConfig(shards=str(paths.data / "train"), out=str(paths.cache), teacher=config.teacher,
                                         weights=str(paths.teacher), views=config.views, recipe=config.recipe,
                                         resolution=config.resolution, seed=config.data_seed, workers=config.workers,
                                         device=config.device, quiet=config.quiet))  # fmt: skip
    if not manifest_path(paths.projection).is_file():
        _step(f"fitting SVD + PTS to {config.dim} on all {config.views} views", start)
        fit_svd.run(
            FitSvdConfig(
                cache=str(paths.cache), out=str(paths.projection), dim=config.dim, quiet=config.quiet
            )
        )


def random_init(config: StudyViewsConfig, paths: StudyPaths, seed: int) -> dict:
    """The student every arm of ``seed`` starts from, exported as a backbone (train-student seeds a run's one
    student with ``torch.manual_seed(seed)`` right before building it, as here): the random-init reference row."""
    name = f"random-s{seed}"
    path = paths.students / name / "backbone.pt"
    if not path.is_file():
        torch.manual_seed(seed)
        model, _ = build_for_resolution(config.student, None, config.resolution)
        path.parent.mkdir(parents=True, exist_ok=True)
        export_backbone(model, path)
    return {"name": name, "arm": "random", "k": None, "seed": seed, "backbone": str(path)}


def train_config(
    config: StudyViewsConfig, paths: StudyPaths, arm: str, seed: int, out: Path
) -> TrainStudentConfig:
    """train-student's settings for one student of ``arm``: only the views differ between arms."""
    k = arm_views(arm)
    views = {"online_teacher": True, "fresh_views": True} if k is None else {"views_used": k}
    return TrainStudentConfig(cache=str(paths.cache), projection=(str(paths.projection),), student=(config.student,),
                              out=str(out), loss=config.loss, epochs=config.epochs, batch_size=config.batch_size,
                              lr=config.lr, seed=seed, workers=config.workers, device=config.device,
                              checkpoint_every=config.epochs, quiet=config.quiet, **views)  # fmt: skip


def train_run(config: StudyViewsConfig, paths: StudyPaths, arm: str, seed: int, start: float) -> dict:
    """One student of ``arm`` with ``seed`` (reused when done; its timing.json written after it):
    {name, arm, k, seed, backbone, epoch_seconds, wall_seconds, cpu_seconds}."""
    name = f"{arm}-s{seed}"
    out = paths.students / name
    if not (out / "done.json").is_file():
        what = "online KD on fresh views" if arm == "online" else f"the first {arm_views(arm)} cached views"
        _step(f"training {name}: {what}, seed {seed}", start)
        wall, cpu, load = time.perf_counter(), cpu_seconds(), os.getloadavg()
        train_student.run(train_config(config, paths, arm, seed, out))
        gc.collect()  # the run's persistent DataLoader workers sit in reference cycles: end (and reap) them first
        write_json_atomic(out / "timing.json", {"wall_seconds": time.perf_counter() - wall,
                                                "cpu_seconds": cpu_seconds() - cpu, "load_average_before": list(load),
                                                "load_average_after": list(os.getloadavg())})  # fmt: skip
    done = json.loads((out / "done.json").read_text())
    backbone = next(iter(done["students"].values()))["backbone"]
    timing = json.loads((out / "timing.json").read_text()) if (out / "timing.json").is_file() else {}
    epochs = [r["seconds"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "epoch"]
    return {"name": name, "arm": arm, "k": arm_views(arm), "seed": seed, "backbone": backbone,
            "epoch_seconds": float(np.mean(epochs)) if epochs else None,
            "wall_seconds": timing.get("wall_seconds"), "cpu_seconds": timing.get("cpu_seconds")}  # fmt: skip


def report(config: StudyViewsConfig, summary: dict) -> None:
    typer.echo(markdown_study(summary))
    typer.echo(
        f"wrote study.md, study.csv, study.json and study.png in {config.out} ({summary['seconds']:.0f} s)"
    )
