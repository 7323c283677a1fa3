"""The steps every demo study shares (``kdep study views``, ``kdep study layers``): where each step writes,
refusal of changed settings on a re-run, the demo shards and labelled teacher, ``kdep eval`` of the
students with the teacher and a random-init student as reference rows, and the per-image cosine to the projected
teacher target on held-out views."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data.shards import ShardInfo, list_shards
from pipeline.demo.shards import DemoSpec, write_demo_data
from pipeline.evaluation.backbones import BackboneSpec, EvalError
from pipeline.evaluation.features import agreement_features, load_backbone, projected_targets
from pipeline.evaluation.probes import l2_normalise
from pipeline.manifest import ConfigError, config_to_dict
from stages import demo_teacher, evaluate
from stages.common import write_resolved_config
from stages.config import DemoTeacherConfig, EvalConfig

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


def check_resume(config, free: tuple[str, ...] = RESUME_FREE) -> None:
    """Refuse an OUT made with settings that changed a reused artefact (data, teacher, cache, recipe); then record
    the settings in OUT/config.study.json."""
    path = Path(config.out) / "config.study.json"
    now = config_to_dict(config)
    if path.is_file():
        before = json.loads(path.read_text())["config"]
        diffs = [
            f"{k}: {before.get(k)!r} -> {v!r}" for k, v in now.items() if k not in free and before.get(k) != v
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
                                           seed=config.data_seed, device=config.device,
                                           quiet=config.quiet))  # fmt: skip


def eval_device(device: str) -> str:
    """Evaluation's device (cpu or cuda[:N]) for the study's ``device`` (auto: CUDA when there is one)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def evaluate_runs(config, paths: StudyPaths, runs: list[dict], references: tuple[str, ...] = (),
                  predictions: bool = False) -> dict:  # fmt: skip
    """``kdep eval`` (probe and k-NN on centre views) of every student and of the reference backbones
    (``name=arch:weights`` each; default: the teacher and a random-init student, ``random``); with
    ``predictions`` also OUT/eval/predictions.npz (each backbone's label per val image)."""
    backbones = tuple(f"{r['name']}={config.student}:{r['backbone']}" for r in runs)
    references = references or (
        f"teacher={config.teacher}:{paths.teacher}",
        f"random={config.student}:random",
    )
    # float32 feature files: a random-init MobileNetV2's features (the reference row) are below float16's range
    eval_config = EvalConfig(train=str(paths.data / "train"), val=str(paths.data / "val"), out=str(paths.eval),
                             backbones=(*backbones, *references), resolution=config.resolution,
                             batch_size=EVAL_BATCH, device=eval_device(config.device), workers=config.workers,
                             knn_k=config.knn_k, feature_dtype="float32", predictions=predictions)  # fmt: skip
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


def agreement_runs(config, paths: StudyPaths, runs: list[dict], views: str = "") -> dict:
    """Per student, the cosine between its pre-ReLU feature and the projected teacher target on held-out val views
    (``views``: their recipe, default ``config.agreement_views``; val images are never cached, so no such view was
    trained on): {images, views, seed, rows: {name: {agree_cosine, agree_cosine_sd}}, per_image: {name: (M,)}}."""
    views = views or config.agreement_views
    val = agreement_shards(list_shards(str(paths.data / "val")), config.agreement_images)
    students = {
        r["name"]: load_backbone(BackboneSpec(r["name"], config.student, r["backbone"]), 0)[0] for r in runs
    }
    teacher, _ = load_backbone(BackboneSpec("teacher", config.teacher, str(paths.teacher)), 0)
    seed = EvalConfig.agreement_seed  # kdep eval's default view seed, unlike the cache's
    feats, raw = agreement_features(students, teacher, val, AGREEMENT_TAP, config.resolution, EVAL_BATCH,
                                    eval_device(config.device), views, seed, config.workers)  # fmt: skip
    targets = projected_targets(str(paths.projection), raw)
    rows, per_image = {}, {}
    for name in students:
        if name not in feats:
            raise EvalError(
                f"student {config.student} has no {AGREEMENT_TAP} tap; the study needs a ResNet or MobileNetV2"
            )
        per_image[name] = cos = row_cosines(feats[name], targets)
        rows[name] = {
            "agree_cosine": float(cos.mean()),
            "agree_cosine_sd": float(cos.std(ddof=1)) if len(cos) > 1 else 0.0,
        }
    return {"images": len(raw), "views": views, "seed": seed, "rows": rows, "per_image": per_image}
