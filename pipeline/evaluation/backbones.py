"""Which backbones to evaluate: ``name=arch:weights`` specs (torch-free, so configs validate them instantly)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import KdepError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")


class EvalError(KdepError, ValueError):
    """A backbone spec, label, device or feature file is wrong; the message names it and the fix."""


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone to evaluate, from ``name=arch:weights``."""

    name: str  # row label in the results (letters, digits, ``_ . -``)
    arch: str  # model name: resnet18 (torchvision), tv:NAME or timm:NAME
    weights: str  # "random", a torchvision weights enum name (IMAGENET1K_V1), or a weights file path


LIBRARY_PREFIXES = (
    "timm:",
    "tv:",
    "torchvision:",
)  # a model name's library (pipeline.models.parse_model_name)


def parse_backbone(text: str) -> BackboneSpec:
    """``"kdep=resnet18:out/student/backbone.pt"`` or ``"vit=timm:vit_small_patch16_224:pretrained"`` ->
    BackboneSpec (a library prefix belongs to the model name); the error shows the expected form."""
    name, eq, rest = text.partition("=")
    prefix = next((p for p in LIBRARY_PREFIXES if rest.startswith(p)), "")
    arch, colon, weights = rest[len(prefix) :].partition(":")
    arch = prefix + arch if arch else ""
    if not (eq and colon and name and arch and weights):
        raise EvalError(
            f"--backbone {text!r}: expected name=arch:weights, e.g. kdep=resnet18:out/demo/student/backbone.pt, "
            "random=resnet18:random or s=timm:convnext_atto:run/backbone-timm-convnext_atto.pt"
        )
    if not NAME_PATTERN.match(name):
        raise EvalError(f"--backbone {text!r}: name {name!r} may hold only letters, digits and _ . -")
    return BackboneSpec(name, arch, weights)
