"""Frozen-backbone features for evaluation: backbone specs, loading, one-pass extraction over shards, .npz cache.

    from pipeline.evaluation.features import parse_backbone, load_backbone, extract_features
    spec = parse_backbone("kdep=resnet18:out/demo/student/backbone.pt")
    model, identity = load_backbone(spec, seed=0)
    feats = extract_features({"kdep": model}, "out/demo/data/val", resolution=64, batch_size=64)

Every image goes through :func:`pipeline.data.views.replay_view` (default: the deterministic ``center`` view at the
evaluation resolution), decoded by DataLoader workers (pipeline/evaluation/batches.py). All backbones are run in
the same pass over a split, so each image is decoded once. On CUDA the pass runs under bf16 autocast with
channels_last; the device type and autocast are part of a saved feature file's key (:func:`eval_numerics`).
A backbone file may hold the backbone without its classifier (what ``backbone_state_dict`` saves; every other key
must match) or a full checkpoint with its head (e.g. a teacher): ``pipeline.models.build_model`` loads both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.choices import EVAL_TAPS
from pipeline.data.shards import ShardInfo, list_shards, shard_record
from pipeline.evaluation.backbones import BackboneSpec, EvalError
from pipeline.evaluation.batches import iter_view_batches
from pipeline.files import atomic_path
from pipeline.models import (
    FeatureTaps,
    ModelError,
    build_for_resolution,
    build_model,
    model_preprocessing,
    supported_taps,
)
from pipeline.progress import progress_bar
from pipeline.runtime import autocast_for

RANDOM_WEIGHTS = "random"  # the --backbone weights word for a randomly initialised backbone
FEATURES_FORMAT = "kdep-eval-features/1"
TEACHER_KEY = "<teacher>"  # the teacher's slot in a shared extraction pass (not a valid backbone name)
CUDA_AMP = "bf16"  # evaluation's autocast on CUDA (pipeline.runtime AMP mode); float32 on CPU
CPU_FLOAT32 = {"device": "cpu", "amp": "off"}  # the numerics of keys made before numerics were keyed


@dataclass
class SplitFeatures:
    """Pooled features of one backbone on one split, rows in shard order."""

    taps: dict[str, np.ndarray]  # tap -> (N, D) float32
    labels: np.ndarray  # (N,) int64 class indices
    keys: list[str]  # (N,) sample keys


def head_name(model: nn.Module) -> str:
    """Dotted name of the model's last ``nn.Linear`` (its classifier), e.g. ``fc`` or ``classifier.1``."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ModelError(f"{type(model).__name__} has no final nn.Linear classifier to drop or replace")
    return names[-1]


def swap_module(model: nn.Module, dotted: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at ``dotted`` by ``new``; returns the old one."""
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = parent.get_submodule(child)
    setattr(parent, child, new)
    return old


def load_backbone(spec: BackboneSpec, seed: int, resolution: int = 0) -> tuple[nn.Module, dict]:
    """A complete torchvision or timm model for ``spec`` and its weights identity.

    ``random`` is a seeded init; a file may lack the classifier (then the head is a seeded random layer, unused by
    the taps); anything else is the library's weights name. ``resolution``: a model that takes one input side
    only (a timm ViT) is built for it.
    """
    torch.manual_seed(seed)
    weights = None if spec.weights == RANDOM_WEIGHTS else spec.weights
    if resolution:
        model, identity = build_for_resolution(spec.arch, weights, resolution)
    else:
        model, identity = build_model(spec.arch, weights)
    return model, ({**identity, "seed": seed} if weights is None else identity)


def model_taps(model: nn.Module) -> tuple[str, ...]:
    """The evaluation taps this model defines (among EVAL_TAPS): pre_relu for ResNets / MobileNetV2, post_relu (the
    pooled feature) for every model."""
    have = supported_taps(model)
    return tuple(t for t in EVAL_TAPS if t in have)


def resolve_device(name: str) -> torch.device:
    """``cpu`` / ``cuda`` / ``cuda:N``; asking for CUDA without one is an error naming the fix."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {name}: no CUDA device is visible; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise EvalError(f"--device {name}: use cpu or cuda[:N]")
    return device


def eval_numerics(device: torch.device) -> dict:
    """What makes a forward pass give other numbers for the same weights and views: the device type and the
    autocast mode. channels_last (used exactly when on CUDA) is left out: like the batch size or the GPU model it
    only changes which kernel runs, hence float rounding, not the computation."""
    return {"device": device.type, "amp": CUDA_AMP if device.type == "cuda" else "off"}


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Eval mode on ``device`` (channels_last on CUDA)."""
    model = model.eval().to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


@torch.no_grad()
def forward_taps(taps: FeatureTaps, x: torch.Tensor, device: torch.device) -> dict[str, np.ndarray]:
    """One batch through the taps (autocast per :func:`eval_numerics`) -> {tap: (B, D) float32 numpy}."""
    x = x.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.to(memory_format=torch.channels_last)
    with autocast_for(device, eval_numerics(device)["amp"]):
        out = taps(x)
    return {t: v.float().cpu().numpy() for t, v in out.items()}


def extract_features(
    models: Mapping[str, nn.Module],
    split: str | list[ShardInfo],
    resolution: int,
    batch_size: int,
    device: str | torch.device = "cpu",
    recipe: str = "center",
    seed: int = 0,
    desc: str = "features",
    workers: int = 0,
) -> dict[str, SplitFeatures]:
    """Every model's pooled taps on every image of ``split`` (one decode per image, by ``workers`` DataLoader
    processes; the same numbers for any count), keyed like ``models``."""
    device = resolve_device(str(device))
    shards = list_shards(split) if isinstance(split, str) else split
    taps = {  # each model re-normalises the ImageNet-normalised views with its own mean/std (no-op for ImageNet's)
        n: FeatureTaps(prepare_model(m, device), model_taps(m), from_imagenet=model_preprocessing(m))
        for n, m in models.items()
    }
    rows: dict[str, dict[str, list[np.ndarray]]] = {n: {t: [] for t in tp.taps} for n, tp in taps.items()}
    labels, keys = [], []
    total = sum(s.samples or 0 for s in shards) or None
    with progress_bar(total=total, desc=desc, unit="img", leave=False) as bar:
        for x, y, k in iter_view_batches(shards, resolution, batch_size, recipe, seed, workers, device):
            for name, tap in taps.items():
                for t, v in forward_taps(tap, x, device).items():
                    rows[name][t].append(v)
            labels.append(y)
            keys.extend(k)
            bar.update(len(y))
    y_all = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    return {
        n: SplitFeatures({t: np.concatenate(v) for t, v in r.items()}, y_all, keys) for n, r in rows.items()
    }


def feature_key(
    identity: dict,
    arch: str,
    split: list[ShardInfo],
    resolution: int,
    recipe: str,
    seed: int,
    numerics: dict | None = None,
) -> str:
    """16-hex digest naming one backbone's features on one split (weights, data, view, and the device type and
    autocast of :func:`eval_numerics`). CPU float32 (or ``numerics`` None) leaves the key as it was before the
    numerics were keyed, so CPU feature caches made then are still reused."""
    body: dict = {
        "arch": arch,
        "weights": identity,
        "shards": [{**shard_record(s), "path": s.path} for s in split],
        "resolution": resolution,
        "recipe": recipe,
        "seed": seed if recipe != "center" else None,
    }
    if numerics is not None and numerics != CPU_FLOAT32:
        body["numerics"] = numerics
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def feature_path(folder: str | Path, name: str, split_name: str, key: str) -> Path:
    """``<folder>/<name>.<split>.<key>.npz``."""
    return Path(folder) / f"{name}.{split_name}.{key}.npz"


def save_features(path: Path, feats: SplitFeatures) -> None:
    """Write one backbone's features on one split to an .npz (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"tap_{t}": v for t, v in feats.taps.items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz"
        np.savez(
            fh, format=np.array(FEATURES_FORMAT), labels=feats.labels, keys=np.array(feats.keys), **arrays
        )


def load_features(path: Path) -> SplitFeatures | None:
    """The features saved at ``path``, or None when there is no such file."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        if str(z["format"]) != FEATURES_FORMAT:
            raise EvalError(f"{path}: not a kdep eval feature file; delete it to recompute")
        taps = {k.removeprefix("tap_"): z[k] for k in z.files if k.startswith("tap_")}
        return SplitFeatures(taps, z["labels"], [str(k) for k in z["keys"]])


def agreement_features(
    students: Mapping[str, nn.Module],
    teacher: nn.Module,
    val: list[ShardInfo],
    tap: str,
    resolution: int,
    batch_size: int,
    device: str,
    recipe: str,
    seed: int,
    workers: int = 0,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({student: (N, D_s)}, (N, D_t)): ``tap`` of the students that define it and of the teacher, same views."""
    if tap not in model_taps(teacher):
        raise EvalError(
            f"the teacher ({type(teacher).__name__}) has no {tap} tap; use --set eval.agreement_tap=post_relu"
        )
    capable = {n: m for n, m in students.items() if tap in model_taps(m)}
    feats = extract_features(
        {**capable, TEACHER_KEY: teacher}, val, resolution, batch_size, device, recipe, seed, workers=workers
    )
    teacher_feats = feats.pop(TEACHER_KEY).taps[tap]
    return {n: f.taps[tap] for n, f in feats.items()}, teacher_feats


def projected_targets(path: str, teacher_feats: np.ndarray) -> torch.Tensor:
    """(N, D_t) teacher features -> (N, D_s) targets through the projection artefact at ``path``."""
    from pipeline.projection.artefact import load_projection  # lazy: the fit-svd stage's module

    with torch.no_grad():
        return load_projection(path).targets(torch.from_numpy(teacher_feats).float()).float()
