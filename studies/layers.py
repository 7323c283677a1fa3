"""`kdep study-layers`: does multi-layer KD (KDEP Table 7), or a searched DistPro process, beat single-tap KDEP?

    kdep study-layers --manifest manifests/study-layers.yaml
    kdep study-layers --manifest manifests/study-layers.yaml --seeds 5 --threads 1
    kdep study-layers --out /tmp/layers --epochs 2 --seeds 1 --val-per-class 5 --classes 4   # a quick look

One cache of the labelled demo teacher holds every tap the arms need (pre_relu and the stage taps), ``views`` views
per train image. Two arms train the same student recipe from it, ``seeds`` students each (seeds 0..S-1: student
init, shard order, view schedule, shuffle): ``single-tap`` distils ``single`` (KDEP: pre_relu=pre_relu), and
``multi-layer`` distils every target of ``targets`` at once (default stage2=stage2, stage3=stage3,
pre_relu=pre_relu), loss = sum_i w_i * KDEP loss_i, each target with its own SVD + PTS projection fitted on its
cache tap to the student's width at its student tap. With ``distpro`` (default) a third arm, ``distpro``, first
searches a DistPro process on the cache's stage1..stage4 taps (``kdep search-process``, cached mode, seed 0,
``search_epochs`` epochs; the held-out objective is cross-entropy since the demo shards have labels, as DistPro's)
and trains each seed with it (``train-student --process --loss distpro --alpha-threshold``). A random-init student
and the teacher are reference rows.
Every student is scored on the same held-out images by the steps the studies share (``studies/common.py``):
linear-probe and k-NN top-1 by ``kdep eval`` (centre views), and the cosine between the student's pre_relu feature
and the projected teacher pre_relu target on held-out views; 95% intervals over seeds and evaluation images
(``pipeline/evaluation/seed_intervals.py``).

Steps, each reused when done (a re-run with more seeds trains only the new students): the demo shards, the
teacher, the cache, the projections, the students, the evaluation. Writes into OUT: ``data/``, ``teacher.pt``,
``cache/``, ``proj.npz`` (pre_relu, ``dim``) and ``proj-<tap>-<dim>.npz``, ``process/`` (process.json, alpha.png),
``students/<arm>-s<seed>/``, ``eval/``,
``study.json``, ``study.csv``, ``study.md``, ``study.png`` and ``config.study.json``.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import typer

from pipeline.evaluation.intervals import LEVEL
from pipeline.evaluation.seed_intervals import METHOD
from pipeline.manifest import config_to_dict
from pipeline.models import build_model, tap_dims
from pipeline.projection.artefact import manifest_path
from pipeline.runtime import cpu_threads
from stages import cache_teacher, fit_svd, search_process, train_student
from stages.config import (
    CacheTeacherConfig,
    FitSvdConfig,
    SearchProcessConfig,
    StudyLayersConfig,
    TrainStudentConfig,
    parse_target,
)
from studies.arm_table import markdown_arms, summarise_arms, write_arm_tables
from studies.common import (
    REFERENCE_METRICS,
    REFERENCES,
    StudyPaths,
    agreement_runs,
    check_resume,
    evaluate_runs,
    prepare_data_and_teacher,
)

STUDY_FORMAT = "kdep-study-layers/1"
ARMS = ("single-tap", "multi-layer", "distpro")  # the baseline first: the table's differences are to it


def run(config: StudyLayersConfig) -> dict:
    """Every step in order (each reused when done); returns the summary also written to OUT/study.json."""
    start = time.perf_counter()
    paths = StudyPaths.under(config.out)
    check_resume(config)
    with cpu_threads(config.threads):
        prepare_data(config, paths, start)
        projections = prepare_projections(config, paths, start)
        if config.distpro:
            prepare_process(config, paths, start)
        runs = [
            train_run(config, paths, projections, arm, seed, start)
            for arm in arms(config)
            for seed in range(config.seeds)
        ]
        _step(f"evaluating {len(runs)} students, the teacher and a random-init student", start)
        results = evaluate_runs(config, paths, runs)
        _step(f"cosine to the projected pre_relu target on held-out {config.agreement_views} views", start)
        cosines = agreement_runs(config, paths, runs)
    summary = summarise(config, runs, results, cosines, time.perf_counter() - start)
    write_arm_tables(paths.out, summary)
    _step(f"done; table in {paths.out / 'study.md'}", start)
    return summary


def _step(title: str, start: float) -> None:
    typer.echo(f"[study-layers {time.perf_counter() - start:7.1f} s] {title}", err=True)


def arms(config: StudyLayersConfig) -> tuple[str, ...]:
    return ARMS if config.distpro else ARMS[:2]


def arm_targets(config: StudyLayersConfig, arm: str) -> tuple[str, ...]:
    if arm == "distpro":
        return ("searched process (" + ", ".join(process_targets(config)) + ")",)
    return (config.single,) if arm == "single-tap" else config.targets


def process_path(config: StudyLayersConfig) -> Path:
    return Path(config.out) / "process" / "process.json"


def process_targets(config: StudyLayersConfig) -> list[str]:
    """The DistPro arm's kept pathways (``t{i}-s{j}``) at the study's threshold."""
    from pipeline.process.artefact import kept_pathways, load_process

    return kept_pathways(load_process(process_path(config)), config.alpha_threshold)


def prepare_process(config: StudyLayersConfig, paths: StudyPaths, start: float) -> None:
    """The DistPro arm's process: ``kdep search-process`` on the cache's stage taps (cached mode, seed 0; the
    held-out objective is cross-entropy, as DistPro's, since the demo shards have labels), reused when done."""
    if process_path(config).is_file():
        return
    _step(f"searching the DistPro process ({config.search_epochs} epochs, cached stage taps)", start)
    search_process.run(SearchProcessConfig(cache=str(paths.cache), out=str(process_path(config).parent),
                                           student=config.student, epochs=config.search_epochs,
                                           batch_size=config.batch_size, lr=config.lr, seed=0,
                                           workers=config.workers, device=config.device, quiet=config.quiet))  # fmt: skip
    gc.collect()


def prepare_data(config: StudyLayersConfig, paths: StudyPaths, start: float) -> None:
    """Demo shards, the labelled demo teacher and its cache with every tap of every arm (each once)."""
    prepare_data_and_teacher(config, paths, lambda title: _step(title, start))
    _step(
        f"caching {config.views} views per train image, taps {', '.join(config.cache_taps)} (resumes)", start
    )
    cache_teacher.run(CacheTeacherConfig(shards=str(paths.data / "train"), out=str(paths.cache), teacher=config.teacher,
                                         weights=str(paths.teacher), taps=config.cache_taps, views=config.views,
                                         recipe=config.recipe, resolution=config.resolution, seed=config.data_seed,
                                         workers=config.workers, device=config.device, quiet=config.quiet))  # fmt: skip


def prepare_projections(config: StudyLayersConfig, paths: StudyPaths, start: float) -> dict[str, str]:
    """SVD + PTS per target (both arms), from its cache tap to the student's width at its student tap:
    {target: projection path}. pre_relu at ``dim`` is ``proj.npz`` (the cosine to target uses it too)."""
    pairs = {t: parse_target(t) for t in dict.fromkeys((config.single, *config.targets, "pre_relu=pre_relu"))}
    widths = tap_dims(
        build_model(config.student, None)[0], tuple({s for s, _ in pairs.values()}), config.resolution
    )
    out = {}
    for target, (student_tap, cache_tap) in pairs.items():
        dim = config.dim if (student_tap, cache_tap) == ("pre_relu", "pre_relu") else widths[student_tap]
        path = (
            paths.projection
            if (cache_tap, dim) == ("pre_relu", config.dim)
            else projection_path(paths, cache_tap, dim)
        )
        if not manifest_path(path).is_file():
            _step(f"fitting SVD + PTS: {cache_tap} -> {dim} (for {target})", start)
            fit_svd.run(
                FitSvdConfig(
                    cache=str(paths.cache), out=str(path), tap=cache_tap, dim=dim, quiet=config.quiet
                )
            )
        out[target] = str(path)
    return out


def projection_path(paths: StudyPaths, cache_tap: str, dim: int) -> Path:
    """Where the projection of ``cache_tap`` (plain or LABEL/TAP) to ``dim`` is kept."""
    return paths.out / f"proj-{cache_tap.replace('/', '-')}-{dim}.npz"


def train_run(config: StudyLayersConfig, paths: StudyPaths, projections: dict[str, str], arm: str, seed: int,
              start: float) -> dict:  # fmt: skip
    """One student of ``arm`` with ``seed`` (reused when done); returns {name, arm, seed, backbone}."""
    name, targets = f"{arm}-s{seed}", arm_targets(config, arm)
    out = paths.students / name
    if arm == "distpro" and not (out / "done.json").is_file():
        _step(f"training {name}: {targets[0]}, threshold {config.alpha_threshold}", start)
        train_student.run(TrainStudentConfig(
            cache=str(paths.cache), student=(config.student,), out=str(out), loss="distpro",
            process=str(process_path(config)), alpha_threshold=config.alpha_threshold,
            loss_weight=config.loss_weight, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
            seed=seed, workers=config.workers, device=config.device, checkpoint_every=config.epochs,
            quiet=config.quiet,
        ))  # fmt: skip
        gc.collect()
    if not (out / "done.json").is_file():
        _step(f"training {name}: {', '.join(targets)}", start)
        train_student.run(TrainStudentConfig(
            cache=str(paths.cache), projection=(",".join(projections[t] for t in targets),),
            student=(config.student,), out=str(out), targets=targets,
            target_weights=config.target_weights if arm == "multi-layer" else (), loss=config.loss,
            loss_weight=config.loss_weight, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
            seed=seed, workers=config.workers, device=config.device, checkpoint_every=config.epochs,
            quiet=config.quiet,
        ))  # fmt: skip
        gc.collect()  # the run's persistent DataLoader workers sit in reference cycles: end them before the next
    done = json.loads((out / "done.json").read_text())
    backbone = next(iter(done["students"].values()))["backbone"]
    return {"name": name, "arm": arm, "seed": seed, "backbone": backbone}


def summarise(
    config: StudyLayersConfig, runs: list[dict], results: dict, cosines: dict, seconds: float
) -> dict:
    """Every run's scores and one row per arm (``studies.arm_table``), with what they were measured on."""
    scored = {row["name"]: row for row in results["backbones"]}
    per_run = [{**r, "probe_top1": scored[r["name"]]["probe_top1"], "knn_top1": scored[r["name"]]["knn_top1"],
                **cosines["rows"][r["name"]]} for r in runs]  # fmt: skip
    n_val, n_agree = results["data"]["val_samples"], cosines["images"]
    rows = summarise_arms(
        {arm: [r for r in per_run if r["arm"] == arm] for arm in arms(config)}, n_val, n_agree
    )
    weights = config.target_weights or (1.0,) * len(config.targets)
    labels = {"single-tap": f"single-tap KDEP ({config.single})",
              "multi-layer": "multi-layer KDEP (" + ", ".join(
                  f"{t} x{w:g}" for t, w in zip(config.targets, weights, strict=True)) + ")"}  # fmt: skip
    if config.distpro:
        kept = process_targets(config)
        labels["distpro"] = (f"DistPro (searched {config.search_epochs} epochs; alpha threshold "
                             f"{config.alpha_threshold:g}: {len(kept)} pathways kept)")  # fmt: skip
    return {
        "format": STUDY_FORMAT, "arms": {arm: list(arm_targets(config, arm)) for arm in arms(config)},
        "target_weights": list(weights), "epochs": config.epochs, "views": config.views, "seeds": config.seeds,
        "data": {**results["data"], "agreement_images": n_agree, "agreement_views": cosines["views"],
                 "agreement_seed": cosines["seed"], "resolution": config.resolution},
        "intervals": {"level": LEVEL, "method": METHOD, "doc": "pipeline/evaluation/seed_intervals.py"},
        "rows": rows, "runs": per_run, "labels": labels,
        "references": {name: {m: scored[name][m] for m in REFERENCE_METRICS} for name in REFERENCES},
        "seconds": round(seconds, 1), "config": config_to_dict(config),
    }  # fmt: skip


def report(config: StudyLayersConfig, summary: dict) -> None:
    typer.echo(markdown_arms(summary))
    typer.echo(
        f"wrote study.md, study.csv, study.json and study.png in {config.out} ({summary['seconds']:.0f} s)"
    )
