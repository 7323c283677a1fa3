"""Spatial stage maps of torchvision and timm models, for pathways between feature *maps*.

    from pipeline.process.online import StageMaps, pooled
    maps = StageMaps(model)(x)          # {"stage1": (B, C1, H1, W1), ..., "stage4": (B, C4, H4, W4)}
    rows = pooled(maps)                 # {"stage1": (B, C1), ...}: equals the cached ``stageK`` taps

Stages are those of :mod:`pipeline.models` (its docstring): torchvision ResNet ``layer1..layer4``; torchvision
MobileNetV2 ``features[3, 6, 13, 17]``; timm CNNs the ``feature_info`` entries at stride >= 4; timm isotropic
models (ViTs) 4 evenly spaced blocks, as patch-token maps (B, C, h, w) without prefix tokens or final norm. So the
global average of each map equals the pooled ``stageK`` tap the cache holds (checked in tests/test_process.py).

torchvision maps come from ``torchvision.models.feature_extraction.create_feature_extractor`` (an FX graph that
shares the model's modules and parameters; stage outputs are whole-block outputs, so the in-place-ReLU pitfall of
the ``pre_relu`` node does not apply); timm maps from ``forward_intermediates(intermediates_only=True)``.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models import is_timm_model
from pipeline.process.artefact import ProcessError, stage_tap


def torchvision_stage_nodes(model: nn.Module) -> dict[str, str]:
    """``{graph node: "stageK"}`` for a torchvision ResNet or MobileNetV2."""
    from torchvision.models.mobilenetv2 import MobileNetV2
    from torchvision.models.resnet import ResNet

    from pipeline.models.from_torchvision import MOBILENET_V2_STAGES

    if isinstance(model, ResNet):
        return {f"layer{k}": stage_tap(k) for k in range(1, 5)}
    if isinstance(model, MobileNetV2):
        return {f"features.{i}": stage_tap(k) for k, i in enumerate(MOBILENET_V2_STAGES, 1)}
    raise ProcessError(
        f"spatial stage maps are defined for torchvision ResNets and MobileNetV2 and for timm models with "
        f"feature_info, not {type(model).__name__}"
    )


class StageMaps(nn.Module):
    """``(B, 3, H, W)`` normalised views -> ``{stageK: (B, C_k, H_k, W_k)}`` for every stage of ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.timm = is_timm_model(model)
        if self.timm:
            from pipeline.models.from_timm import stage_indices

            self.indices = stage_indices(model)
            if not self.indices:
                raise ProcessError(f"timm model {type(model).__name__} has no feature_info stages")
            self.model = model
        else:
            from torchvision.models.feature_extraction import create_feature_extractor

            self.model = create_feature_extractor(model, return_nodes=torchvision_stage_nodes(model))

    @property
    def stages(self) -> int:
        return len(self.indices) if self.timm else len(self.model.graph.output_node().args[0])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.timm:
            return dict(self.model(x))
        maps = self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        return {stage_tap(k): m for k, m in enumerate(maps, 1)}


def pooled(maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Global average pooling of every map: ``(B, C, H, W) -> (B, C)`` (a ``(B, C)`` row passes through)."""
    return {k: (m.mean((2, 3)) if m.ndim == 4 else m) for k, m in maps.items()}


def stage_shapes(maps: StageMaps, resolution: int) -> dict[str, tuple[int, ...]]:
    """``{stageK: (C, H, W)}`` at input side ``resolution``, from one dummy forward in eval mode."""
    device = next(maps.parameters()).device
    was_training = maps.training
    maps.eval()
    with torch.no_grad():
        out = maps(torch.zeros(1, 3, resolution, resolution, device=device))
    maps.train(was_training)
    return {k: tuple(int(s) for s in v.shape[1:]) for k, v in out.items()}
