"""Frozen-backbone features for evaluation: backbone loading and one extraction pass over a split's shards.

    from pipeline.evaluation.features import parse_backbone, load_backbone, extract_features
    spec = parse_backbone("kdep=resnet18:out/demo/student/backbone.pt")
    model, identity = load_backbone(spec, seed=0)
    feats = extract_features({"kdep": model}, "out/demo/data/val", resolution=64, batch_size=64)
    feats = extract_features({"kdep": model}, "out/demo/data/val", 64, 64, tap="post_relu",
                             folders={"kdep": Path("out/f/kdep.val")}, dtype="float16")  # memmapped .npy

Every image goes through :func:`pipeline.data.views.replay_view` (default: the deterministic ``center`` view at the
evaluation resolution), decoded by DataLoader workers that each read whole shards (pipeline/evaluation/batches.py).
All backbones are run in the same pass over a split, so each image is decoded once; each batch's rows are written
at their place in the split (to memory, or to the memory-mapped files of pipeline/evaluation/feature_files.py), so
only one batch of features is ever held per backbone. On CUDA the pass runs under bf16 autocast with
channels_last; the device type and autocast are part of a saved feature file's key (:func:`eval_numerics`).
A backbone file may hold the backbone without its classifier (what ``backbone_state_dict`` saves; every other key
must match) or a full checkpoint with its head (e.g. a teacher): ``pipeline.models.build_model`` loads both.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.choices import EVAL_TAPS
from pipeline.data.shards import ShardInfo, list_shards
from pipeline.evaluation.backbones import BackboneSpec, EvalError
from pipeline.evaluation.batches import iter_view_batches, shard_rows
from pipeline.evaluation.feature_files import SplitFeatures, TapRows, save_rows
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
TEACHER_KEY = "<teacher>"  # the teacher's slot in a shared extraction pass (not a valid backbone name)
CUDA_AMP = "bf16"  # evaluation's autocast on CUDA (pipeline.runtime AMP mode); float32 on CPU


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


def taps_on_device(model: nn.Module, taps: tuple[str, ...], device: torch.device) -> FeatureTaps:
    """``model``'s ``taps`` fed ImageNet-normalised views, re-normalised with the model's own mean/std (a no-op
    for ImageNet's): built first, then moved, so the re-normalisation's buffers go to ``device`` with the model."""
    return prepare_model(FeatureTaps(model, taps, from_imagenet=model_preprocessing(model)), device)


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
    tap: str | None = None,
    folders: Mapping[str, Path] | None = None,
    dtype: str = "float32",
) -> dict[str, SplitFeatures]:
    """Every model's pooled ``tap`` (None: each of its evaluation taps) on every image of ``split``, keyed like
    ``models``: one decode per image, by ``workers`` DataLoader processes, the same numbers for any count.
    Rows are stored as ``dtype``; with ``folders`` ({name: directory}) into ``<directory>/<tap>.npy`` memmaps
    plus ``labels.npy`` and ``keys.npy`` (pipeline/evaluation/feature_files.py), else in memory."""
    device = resolve_device(str(device))
    shards = list_shards(split) if isinstance(split, str) else split
    rows = shard_rows(shards)
    total = sum(rows)
    if total == 0:
        raise EvalError(f"{desc}: the split has no samples ({len(shards)} shards); check --train / --val")
    taps = {n: taps_on_device(m, (tap,) if tap else model_taps(m), device) for n, m in models.items()}
    sinks = {
        n: {t: TapRows(folders[n] / f"{t}.npy" if folders else None, total, dtype, f"backbone {n!r} tap {t} on {desc}")
            for t in ft.taps}
        for n, ft in taps.items()
    }  # fmt: skip
    batches = iter_view_batches(shards, resolution, batch_size, recipe, seed, workers, device, rows)
    try:
        labels, keys = fill_rows(taps, sinks, batches, total, device, desc)
        out = {
            n: SplitFeatures({t: s.finish() for t, s in per.items()}, labels, keys)
            for n, per in sinks.items()
        }
    except BaseException:
        for per in sinks.values():
            for s in per.values():
                s.discard()
        raise
    for n in out if folders else ():
        save_rows(folders[n], labels, keys)
    return out


def fill_rows(
    taps: Mapping[str, FeatureTaps],
    sinks: Mapping[str, Mapping[str, TapRows]],
    batches: Iterator[tuple[int, torch.Tensor, np.ndarray, list[str]]],
    total: int,
    device: torch.device,
    desc: str,
) -> tuple[np.ndarray, list[str]]:
    """One pass over the ``total`` rows of a split (``batches`` from ``iter_view_batches``): every batch through
    every model, rows written at their split position; returns the (N,) labels and N keys in split order."""
    labels, keys, filled = np.zeros(total, np.int64), [""] * total, 0
    with progress_bar(total=total, desc=desc, unit="img", leave=False) as bar:
        for first, x, y, k in batches:
            for name, ft in taps.items():
                for t, v in forward_taps(ft, x, device).items():
                    sinks[name][t].write(first, v, k)
            labels[first : first + len(y)], keys[first : first + len(k)] = y, k
            filled += len(y)
            bar.update(len(y))
    if filled != total:  # every shard's count is checked as it is read; this guards the bookkeeping
        raise EvalError(f"{desc}: {filled} rows extracted but the shards list {total}; re-run")
    return labels, keys


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
        {**capable, TEACHER_KEY: teacher}, val, resolution, batch_size, device, recipe, seed, workers=workers, tap=tap,
    )  # fmt: skip
    teacher_feats = feats.pop(TEACHER_KEY).taps[tap]
    return {n: f.taps[tap] for n, f in feats.items()}, teacher_feats


def projected_targets(path: str, teacher_feats: np.ndarray) -> torch.Tensor:
    """(N, D_t) teacher features -> (N, D_s) targets through the projection artefact at ``path``."""
    from pipeline.projection.artefact import load_projection  # lazy: the fit-svd stage's module

    with torch.no_grad():
        return load_projection(path).targets(torch.from_numpy(teacher_feats).float()).float()
