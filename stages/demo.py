"""`kdep demo` (make demo): the whole pipeline on the embedded demo data, on CPU, from nothing, in minutes.

    make demo
    kdep demo --manifest manifests/demo.yaml
    kdep demo --manifest manifests/demo.yaml --set train_student.epochs=40

Steps, each reading its section of the manifest and skipped when its output is already complete: generate the
demo shards; train a small labelled demo teacher (a stand-in for a pre-trained ImageNet teacher: real users pass
torchvision weights); cache the teacher's features for K views of the train split (no labels); fit SVD+PTS;
train a student from the cache; evaluate random-init student vs KDEP student vs teacher on the held-out split
(linear probe, k-NN); print a table and save ``OUT/eval/results.png``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import typer

from pipeline.manifest import parse_overrides, resolve_config
from pipeline.projection.artefact import manifest_path
from pipeline.runtime import cpu_threads
from stages import cache_teacher, demo_data, demo_teacher, evaluate, fit_svd, train_student
from stages.config import (
    CacheTeacherConfig,
    DemoConfig,
    DemoDataConfig,
    DemoTeacherConfig,
    EvalConfig,
    FitSvdConfig,
    TrainStudentConfig,
)


def _section(cls, name: str, manifest: Path, sets: list[str] | None, **fixed):
    mine = [s for s in sets or [] if s.startswith(f"{name}.")]
    return replace(resolve_config(cls, name, manifest, None, mine), **fixed)


def _step(title: str, t0: float) -> None:
    typer.echo(f"[demo {time.perf_counter() - t0:6.1f} s] {title}", err=True)


def run(
    manifest: Path | DemoConfig, sets: list[str] | None = None, quiet: bool = False, threads: int = 2
) -> dict:
    """Every stage in order, each skipped when already done, with ``threads`` CPU threads (fixed: the same numbers
    on every re-run on the same kind of CPU); returns the eval results."""
    if isinstance(manifest, DemoConfig):
        manifest, sets, quiet, threads = (
            Path(manifest.manifest),
            list(manifest.sets),
            manifest.quiet,
            manifest.threads,
        )
    with cpu_threads(threads):
        return run_steps(Path(manifest), sets, quiet)


def run_steps(manifest: Path, sets: list[str] | None, quiet: bool) -> dict:
    parse_overrides(sets)  # syntax check up front
    t0 = time.perf_counter()
    data_cfg = _section(DemoDataConfig, "demo_data", manifest, sets)
    if not (Path(data_cfg.out) / "val" / "index.json").is_file():
        _step("generating demo shards", t0)
        demo_data.run(data_cfg)
    teacher_cfg = _section(DemoTeacherConfig, "demo_teacher", manifest, sets, quiet=quiet)
    if not Path(teacher_cfg.out).is_file():
        _step(f"training the demo teacher ({teacher_cfg.arch}, {teacher_cfg.epochs} epochs, with labels)", t0)
        demo_teacher.run(teacher_cfg)
    _step("caching teacher features (resumes; skips done shards)", t0)
    cache_teacher.run(_section(CacheTeacherConfig, "cache_teacher", manifest, sets, quiet=quiet))
    svd_cfg = _section(FitSvdConfig, "fit_svd", manifest, sets, quiet=quiet)
    if not manifest_path(svd_cfg.out).is_file():
        _step("fitting SVD + PTS", t0)
        fit_svd.run(svd_cfg)
    student_cfg = _section(TrainStudentConfig, "train_student", manifest, sets, quiet=quiet)
    if not (Path(student_cfg.out) / "done.json").is_file():
        _step("training the student from the cache", t0)
        train_student.run(student_cfg)
    eval_cfg = _section(EvalConfig, "eval", manifest, sets)
    _step("evaluating on the held-out split", t0)
    results = evaluate.run(eval_cfg)
    _step(f"done; results in {eval_cfg.out}", t0)
    return results


def report(config: DemoConfig, results: dict) -> None:
    evaluate.print_table(results)
