"""Models from torchvision and timm by name, their weights and preprocessing, pooled feature taps, backbone export.

Names: ``resnet50`` or ``tv:resnet50`` (torchvision classification models), ``timm:convnext_atto`` or
``timm:resnet18.a1_in1k`` (timm; the ``.tag`` picks pretrained weights). Weights: None (random init), the library's
pretrained weights (torchvision enum names such as ``IMAGENET1K_V2`` / ``DEFAULT``; timm ``pretrained`` or a tag
such as ``a1_in1k``), downloaded on the user's machine the way each library does, or a local file (sha256 recorded).

Taps, each ``(B, D)``, all from one forward (:func:`supported_taps` lists a model's, :func:`tap_definitions` says
what each is for that model):

- ``pre_relu``: KDEP's feature. ResNets (torchvision, and timm ``ResNet`` models with Basic or Bottleneck blocks:
  resnet*, resnet*d, seresnet*, resnext*): the last residual block up to ``bn(conv(..)) + shortcut``, *before* its
  final activation, then global average pooling (GAP). torchvision MobileNetV2: ``features[18]`` (320 -> 1280
  conv + BN) without its ReLU6, then GAP; likewise timm EfficientNet-class models whose ``bn2`` activation is a
  ReLU/ReLU6 (mobilenetv2_*): ``conv_head`` + ``bn2`` before that activation. Values can be negative. Not defined
  for other models.
- ``pooled``: the pre-logits feature, i.e. the input of the classifier. torchvision: the input of the last
  ``nn.Linear``; timm: ``forward_head(forward_features(x), pre_logits=True)``, so it follows the model's
  ``global_pool``: for timm ViTs with ``global_pool='token'`` (``vit_*``, DeiT, DINOv2) the CLS token after the
  final norm, with ``'avg'`` the mean of the patch tokens then ``fc_norm``.
- ``post_relu``: today's name for the same tensor as ``pooled`` for every model (for ResNets and MobileNetV2 it
  is the pooled feature after the last ReLU, hence the name; for a ViT or ConvNeXt it is just ``pooled``).
- ``stage1_pre..stage4_pre`` (torchvision ResNets and MobileNetV2 only; what DistPro's pathways regress): GAP of
  stage K *before* its final ReLU: ResNet ``layerK[-1]`` up to ``bn(conv(..)) + identity`` (``stage4_pre`` is
  ``pre_relu``); MobileNetV2's stages end in a linear bottleneck (no activation), so ``stageK_pre`` = ``stageK``.
- ``stage1..stageN``: GAP of each stage's output. torchvision ResNet: ``layer1..layer4``; torchvision MobileNetV2:
  ``features[3, 6, 13, 17]`` (24/32/96/320 channels at stride 4/8/16/32, timm's ``mobilenetv2_100`` grouping);
  timm CNNs: the ``feature_info`` entries at stride >= 4 (the stride-2 stem entry of e.g. ResNets is dropped, so
  ResNet stage K is ``layerK`` in both libraries); timm models whose ``feature_info`` has one stride (ViTs): the
  mean of the patch tokens (prefix/CLS tokens excluded, no final norm) of 4 evenly spaced blocks,
  stageK = ``blocks[ceil(K * depth / 4) - 1]`` (depth 12: blocks 2, 5, 8, 11; depth <= 4: every block).

This module is library-agnostic (names, weights files, export, preprocessing, the tap API); each library's code is
in :mod:`pipeline.models.from_torchvision` / :mod:`pipeline.models.from_timm`, which have the same functions (``build``,
``head_names``, ``last_linear``, ``preprocessing``, ``fixed_input_size``, ``tap_definitions``, ``run_taps``) and
are imported on first use (``import timm`` takes seconds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from pipeline.choices import TAPS as TAPS  # re-exported: callers import it from here
from pipeline.data.views import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import KdepError

LIBRARIES = {"tv": "torchvision", "torchvision": "torchvision", "timm": "timm"}  # name prefix -> library
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")


class ModelError(KdepError):
    """Unknown model, tap or weights; the message says what exists."""


def parse_model_name(name: str) -> tuple[str, str]:
    """``'timm:NAME'`` -> ``('timm', 'NAME')``; ``'tv:NAME'`` and a plain ``'NAME'`` -> ``('torchvision', 'NAME')``."""
    prefix, sep, rest = name.partition(":")
    if not sep:
        return "torchvision", name
    if prefix not in LIBRARIES or not rest:
        raise ModelError(f"model name {name!r}: use NAME or tv:NAME (torchvision), or timm:NAME (timm)")
    return LIBRARIES[prefix], rest


def is_timm_model(model: nn.Module) -> bool:
    """True for a model built by timm (checked without importing timm)."""
    return type(model).__module__.startswith("timm.")


def _library(library: str | nn.Module) -> ModuleType:
    """:mod:`pipeline.models.from_timm` or :mod:`pipeline.models.from_torchvision`, for a library name or a model."""
    if isinstance(library, nn.Module):
        library = "timm" if is_timm_model(library) else "torchvision"
    return importlib.import_module(f"pipeline.models.from_{library}")


def build_model(
    arch: str,
    weights: str | None = None,
    num_classes: int | None = None,
    *,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict]:
    """A torchvision or timm model (see the module docstring for names) and its weights identity.

    ``weights``: None (random init); pretrained weights by name (torchvision: an enum name such as
    ``IMAGENET1K_V2``, ``DEFAULT`` or ``pretrained`` (= DEFAULT); timm: ``pretrained`` for the name's tag or timm's
    default, or a tag such as ``a1_in1k``), fetched the way each library does on the user's machine; or a path to a
    state dict / checkpoint (its sha256 is recorded). A file's classifier may have any number of classes, or be
    absent (a backbone saved by :func:`backbone_state_dict`): the model then keeps a random-init head.
    ``num_classes`` sizes a random-init head. ``model_kwargs`` go to the constructor (e.g. timm ``img_size=224``
    or ``dynamic_img_size=True`` for a ViT at another resolution) and are recorded in the identity when given.
    Identity: ``{"kind": "torchvision" | "timm" | "file" | "random", "name": ..., ...}``.
    """
    library, name = parse_model_name(arch)
    kwargs = dict(model_kwargs or {})
    model, identity = _library(library).build(name, weights, num_classes, kwargs)
    return model, ({**identity, "model_kwargs": kwargs} if kwargs else identity)


def is_weights_name(weights: str) -> bool:
    """A pretrained-weights name rather than a file: no suffix and no such path (the rule of every library)."""
    return not Path(weights).suffix and not Path(weights).exists()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a file holding one, or a checkpoint holding one under 'state_dict'/'model'/'backbone'."""
    if not path.is_file():
        raise ModelError(f"no weights file at {path}; pass an existing file or a pretrained weights name")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        raise ModelError(
            f"{path} is not a readable PyTorch weights file ({str(err).splitlines()[0]})"
        ) from None
    for field in ("state_dict", "model", "backbone"):
        if isinstance(state, dict) and isinstance(state.get(field), dict):
            state = state[field]
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_state(model: nn.Module, arch: str, state: dict, path: Path, head: str | tuple[str, ...]) -> dict:
    """Load strictly, except that the classifier (``head``: one or more module names) may be absent; a mismatch
    names the file and the keys."""
    heads = tuple(f"{h}." for h in ((head,) if isinstance(head, str) else head))
    current = model.state_dict()
    missing = sorted(k for k in set(current) - set(state) if not k.startswith(heads))
    unexpected = sorted(set(state) - set(current))
    wrong = sorted(k for k in set(current) & set(state) if current[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = (
            (missing and f"missing {missing[:3]}")
            or (unexpected and f"unexpected {unexpected[:3]}")
            or f"shape of {wrong[:3]}"
        )
        raise ModelError(
            f"weights file {path} does not fit {arch} ({detail}); is it for another architecture?"
        )
    model.load_state_dict(state, strict=not (set(current) - set(state)))
    return {"kind": "file", "name": path.name, "sha256": sha256_file(path), "path": str(path.resolve())}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def head_names(model: nn.Module) -> tuple[str, ...]:
    """Dotted names of the classifier module(s): ``('fc',)``, ``('classifier.1',)``, timm ``('head.fc',)``."""
    return _library(model).head_names(model)


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's classifier ``nn.Linear`` (torchvision: the last one; timm: ``get_classifier()``)."""
    return _library(model).last_linear(model)


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without its classifier, on CPU.

    torchvision: loads with ``strict=True`` into the same model once its last Linear is dropped (or non-strictly
    through :func:`build_model`). timm: loads with ``strict=True`` into
    ``timm.create_model(NAME, pretrained=False, num_classes=0)`` (``NAME`` without the ``timm:`` prefix, plus the
    ``model_kwargs`` the model was built with, e.g. ``img_size``).
    """
    prefixes = tuple(f"{h}." for h in head_names(model))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith(prefixes)}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input: normalisation, side length and resize filter; JSON-able for provenance.

    :func:`model_preprocessing` reads a model's; :meth:`override` changes fields (and says so in ``source``).
    """

    mean: tuple[float, float, float]  # per RGB channel, on [0, 1] pixels
    std: tuple[float, float, float]  # per RGB channel, > 0
    resolution: int  # side of the square model input in pixels
    interpolation: str = "bilinear"  # resize filter the weights were trained with (one of INTERPOLATIONS)
    crop_pct: float = 0.875  # centre-crop side / resize side for evaluation views
    source: str = "imagenet-default"  # where the numbers come from (library config, or "override")

    def __post_init__(self) -> None:
        for field in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, field))
            if len(value) != 3:
                raise ModelError(f"preprocessing {field} {value!r} must have 3 values (R, G, B)")
            object.__setattr__(self, field, value)
        if min(self.std) <= 0:
            raise ModelError(f"preprocessing std {self.std!r} must be > 0")
        if int(self.resolution) < 1:
            raise ModelError(f"preprocessing resolution {self.resolution!r} must be >= 1 pixel")
        if self.interpolation not in INTERPOLATIONS:
            raise ModelError(
                f"preprocessing interpolation {self.interpolation!r}; use one of {', '.join(INTERPOLATIONS)}"
            )
        if not 0 < self.crop_pct <= 1:
            raise ModelError(f"preprocessing crop_pct {self.crop_pct!r} must be in (0, 1]")

    def override(self, **changes: Any) -> Preprocessing:
        """A copy with ``changes`` (e.g. ``mean=(0.5, 0.5, 0.5), resolution=256``), validated; ``source`` records
        which fields were overridden. Unknown field names are refused naming the fields."""
        fields = [f.name for f in dataclasses.fields(self) if f.name != "source"]
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise ModelError(f"preprocessing has no field {unknown[0]!r}; fields: {', '.join(fields)}")
        source = f"{self.source} + override({', '.join(sorted(changes))})" if changes else self.source
        return dataclasses.replace(self, **changes, source=source)

    def to_dict(self) -> dict:
        """Plain JSON types (lists for the tuples); :meth:`from_dict` reads it back."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(**data)


IMAGENET_PREPROCESSING = Preprocessing(IMAGENET_MEAN, IMAGENET_STD, 224)


def model_preprocessing(model: nn.Module, identity: dict | None = None) -> Preprocessing:
    """The model's own preprocessing: timm from its ``pretrained_cfg`` (``resolve_data_config``; metadata, no
    download); torchvision from the weights' ``transforms()`` when ``identity`` (from :func:`build_model`) names
    torchvision weights, else the ImageNet defaults (mean/std, 224, bilinear, crop 0.875) every stage used so far."""
    return _library(model).preprocessing(model, identity)


class Normalize(nn.Module):
    """``(B, 3, H, W)`` uint8 or [0, 1] float -> normalised float32 on the input's device.

    uint8 takes one multiply by 1 / (255 std) and one subtract of mean / std, float ``(x - mean) / std``: with
    ImageNet mean/std both are bit-identical to :func:`pipeline.data.views.normalize_views` / ``replay_view``.
    """

    def __init__(self, preprocessing: Preprocessing) -> None:
        super().__init__()
        mean = torch.tensor(preprocessing.mean).view(3, 1, 1)
        std = torch.tensor(preprocessing.std).view(3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", mean / std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            return x.to(torch.float32).mul_(self.scale).sub_(self.shift)
        return (x - self.mean) / self.std


def tap_definitions(model: nn.Module) -> dict[str, str]:
    """``{tap: what it is for this model}`` for every tap the model supports (JSON-able, for provenance)."""
    return _library(model).tap_definitions(model)


def supported_taps(model: nn.Module) -> tuple[str, ...]:
    """The tap names ``model`` supports, e.g. ``('pre_relu', 'post_relu', 'pooled', 'stage1', ..., 'stage4')``."""
    return tuple(tap_definitions(model))


def _check_taps(model: nn.Module, taps: tuple[str, ...]) -> None:
    known = supported_taps(model)
    for tap in taps:
        if tap in known:
            continue
        name = type(model).__name__
        if tap.startswith("stage") and tap.endswith("_pre") and tap.removesuffix("_pre") in known:
            raise ModelError(
                f"the {tap} tap (a stage before its final ReLU) is defined for torchvision ResNets and MobileNetV2, "
                f"not {name}; {name} has taps: {', '.join(known)}"
            )
        if tap == "pre_relu":
            raise ModelError(
                f"the pre_relu tap is defined for ResNet and MobileNetV2 models (torchvision and timm), not "
                f"{name}; {name} has taps: {', '.join(known)}"
            )
        raise ModelError(f"{name} has no tap {tap!r}; it has: {', '.join(known)}")


class Renormalize(nn.Module):
    """ImageNet-normalised views (what the stages replay and move to the device) -> normalised with
    ``preprocessing``'s mean/std instead: ``x * (std_in / std) + (mean_in - mean) / std``.

    No operation at all when ``preprocessing`` has ImageNet's mean/std (today's models: byte-identical caches);
    otherwise within float32 rounding (~1e-7 relative) of normalising the [0, 1] view with the model's own values.
    Stage 1, ``kdep verify`` and the online teacher all go through this module, so they agree exactly.
    """

    def __init__(self, preprocessing: Preprocessing | None) -> None:
        super().__init__()
        self.identity = preprocessing is None or (
            preprocessing.mean == IMAGENET_PREPROCESSING.mean
            and preprocessing.std == IMAGENET_PREPROCESSING.std
        )
        if not self.identity:
            mean_in = torch.tensor(IMAGENET_PREPROCESSING.mean, dtype=torch.float64).view(3, 1, 1)
            std_in = torch.tensor(IMAGENET_PREPROCESSING.std, dtype=torch.float64).view(3, 1, 1)
            mean = torch.tensor(preprocessing.mean, dtype=torch.float64).view(3, 1, 1)
            std = torch.tensor(preprocessing.std, dtype=torch.float64).view(3, 1, 1)
            self.register_buffer("scale", (std_in / std).float(), persistent=False)
            self.register_buffer("shift", ((mean_in - mean) / std).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.identity else x * self.scale + self.shift


class FeatureTaps(nn.Module):
    """``(B, 3, H, W) -> {tap: (B, D)}`` for the requested taps, from one forward of ``model``.

    ``preprocessing``: None (default) takes inputs already normalised (ImageNet mean/std, as every stage makes
    them); a :class:`Preprocessing` takes uint8 or [0, 1] float views and normalises them on the device with its
    mean/std (:class:`Normalize`) first, so each teacher and student normalises for itself. ``from_imagenet``
    instead takes ImageNet-normalised inputs and re-normalises them with its mean/std (:class:`Renormalize`; a no-op
    for ImageNet's values). Resizing to ``preprocessing.resolution`` is the caller's (the view replay's) job.
    """

    def __init__(
        self,
        model: nn.Module,
        taps: tuple[str, ...],
        preprocessing: Preprocessing | None = None,
        from_imagenet: Preprocessing | None = None,
    ) -> None:
        super().__init__()
        _check_taps(model, tuple(taps))
        if preprocessing is not None and from_imagenet is not None:
            raise ModelError("FeatureTaps takes preprocessing or from_imagenet, not both")
        self.model, self.taps = model, tuple(taps)
        self.preprocessing = preprocessing or from_imagenet
        if preprocessing is not None:
            self.normalize: nn.Module = Normalize(preprocessing)
        else:
            self.normalize = Renormalize(from_imagenet)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = _library(self.model).run_taps(self.model, self.normalize(x), self.taps)
        return {t: out[t] for t in self.taps}


def build_for_resolution(
    arch: str, weights: str | None, resolution: int, num_classes: int | None = None
) -> tuple[nn.Module, dict]:
    """:func:`build_model` for inputs of side ``resolution``: a model that accepts one input side only (a timm ViT)
    is built for it (``img_size``; timm resamples pretrained position embeddings, and a weights file must be for
    that size), recorded as ``model_kwargs`` in the identity so that it can be rebuilt exactly. The input size is
    probed on a random-init build, so a weights file is loaded once, into the right shape."""
    if parse_model_name(arch)[0] != "timm":  # img_size is timm's; torchvision models need no probe build
        return build_model(arch, weights, num_classes)
    probe, _ = build_model(arch, None, num_classes)
    fixed = _library(probe).fixed_input_size(probe)
    del probe
    if fixed is not None and fixed != resolution:
        return build_model(arch, weights, num_classes, model_kwargs={"img_size": resolution})
    return build_model(arch, weights, num_classes)


def tap_dims(model: nn.Module, taps: tuple[str, ...], resolution: int = 64) -> dict[str, int]:
    """Feature width of each tap, from one dummy forward on the model's device (at the model's own input size
    when it only takes one, e.g. a timm ViT without ``dynamic_img_size``)."""
    resolution = _library(model).fixed_input_size(model) or resolution
    was_training = model.training
    model.eval()
    with torch.no_grad():
        x = torch.zeros(1, 3, resolution, resolution, device=next(model.parameters()).device)
        out = FeatureTaps(model, taps)(x)
    model.train(was_training)
    return {t: int(v.shape[1]) for t, v in out.items()}
