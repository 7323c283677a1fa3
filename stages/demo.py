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
from dataclasses import dataclass, replace
from pathlib import Path

import typer

from pipeline.data.shards import write_json_atomic
from pipeline.demo.teacher import TeacherRecipe, train_demo_teacher
from pipeline.manifest import ConfigError, check_range, parse_overrides, resolve_config
from pipeline.projection.artefact import manifest_path
from stages import cache_teacher, demo_data, evaluate, fit_svd, train_student
from stages.common import MANIFEST_HELP, SET_HELP, one_line_errors


@dataclass(frozen=True)
class DemoTeacherConfig:
    train: str = "out/demo/data/train"  # labelled shards to train on
    out: str = "out/demo/teacher-r18.pt"  # the teacher's state dict
    arch: str = "resnet18"  # torchvision model name
    epochs: int = 30  # supervised epochs
    batch_size: int = 32  # images per step
    lr: float = 0.05  # peak SGD learning rate (cosine schedule)
    resolution: int = 64  # training view side in pixels
    seed: int = 0  # init and views

    def __post_init__(self) -> None:
        if not self.train or not self.out:
            raise ConfigError("keys 'train' and 'out' are required")
        check_range("epochs", self.epochs, 1)
        check_range("batch_size", self.batch_size, 2)
        check_range("lr", self.lr, 0.0, open_lo=True)


def _section(cls, name: str, manifest: Path, sets: list[str] | None):
    mine = [s for s in sets or [] if s.startswith(f"{name}.")]
    return resolve_config(cls, name, manifest, None, mine)


def _step(title: str, t0: float) -> None:
    typer.echo(f"[demo {time.perf_counter() - t0:6.1f} s] {title}", err=True)


def run(manifest: Path, sets: list[str] | None = None, quiet: bool = False) -> dict:
    """Every stage in order, each skipped when already done; returns the eval results."""
    parse_overrides(sets)  # syntax check up front
    t0 = time.perf_counter()
    data_cfg = _section(demo_data.DemoDataConfig, "demo_data", manifest, sets)
    if not (Path(data_cfg.out) / "val" / "index.json").is_file():
        _step("generating demo shards", t0)
        demo_data.run(data_cfg)
    teacher_cfg = _section(DemoTeacherConfig, "demo_teacher", manifest, sets)
    if not Path(teacher_cfg.out).is_file():
        _step(f"training the demo teacher ({teacher_cfg.arch}, {teacher_cfg.epochs} epochs, with labels)", t0)
        recipe = TeacherRecipe(
            teacher_cfg.arch,
            teacher_cfg.epochs,
            teacher_cfg.batch_size,
            teacher_cfg.lr,
            resolution=teacher_cfg.resolution,
            seed=teacher_cfg.seed,
        )
        info = train_demo_teacher(teacher_cfg.train, Path(teacher_cfg.out), recipe, progress=not quiet)
        write_json_atomic(Path(teacher_cfg.out).with_suffix(".json"), info)
    cache_cfg = replace(
        _section(cache_teacher.CacheTeacherConfig, "cache_teacher", manifest, sets), quiet=quiet
    )
    _step("caching teacher features (resumes; skips done shards)", t0)
    cache_teacher.run(cache_cfg)
    svd_cfg = replace(_section(fit_svd.FitSvdConfig, "fit_svd", manifest, sets), quiet=quiet)
    if not manifest_path(svd_cfg.out).is_file():
        _step("fitting SVD + PTS", t0)
        fit_svd.run(svd_cfg)
    student_cfg = replace(
        _section(train_student.TrainStudentConfig, "train_student", manifest, sets), quiet=quiet
    )
    if not (Path(student_cfg.out) / "done.json").is_file():
        _step("training the student from the cache", t0)
        train_student.run(student_cfg)
    eval_cfg = _section(evaluate.EvalConfig, "eval", manifest, sets)
    _step("evaluating on the held-out split", t0)
    results = evaluate.run(eval_cfg)
    _step(f"done; results in {eval_cfg.out}", t0)
    return results


@one_line_errors
def command(
    manifest: Path = typer.Option(Path("manifests/demo.yaml"), help=MANIFEST_HELP),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Run the whole pipeline on the embedded demo data (CPU, minutes); finished stages are reused."""
    results = run(manifest, set_, quiet)
    evaluate.print_table(results)
