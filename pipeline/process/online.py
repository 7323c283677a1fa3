"""Spatial stage maps of torchvision and timm models, for pathways between feature *maps*.

    from pipeline.process.online import StageMaps, pooled
    maps = StageMaps(model)(x)          # {"stage1": (B, C1, H1, W1), ..., "stage4": (B, C4, H4, W4)}
    rows = pooled(maps)                 # {"stage1": (B, C1), ...}: equals the cached ``stageK`` taps

Stages are those of :mod:`pipeline.models` (its docstring): torchvision ResNet ``layer1..layer4``; torchvision
MobileNetV2 ``features[3, 6, 13, 17]``; timm CNNs the ``feature_info`` entries at stride >= 4; timm isotropic
models (ViTs) 4 evenly spaced blocks, as patch-token maps (B, C, h, w) without prefix tokens or final norm. So the
global average of each map equals the pooled ``stageK`` tap the cache holds (checked in tests/test_process.py).

torchvision maps come from ``torchvision.models.feature_extraction.create_feature_extractor`` (an FX graph that
shares the model's modules and parameters; stage outputs are whole-block outputs); timm maps from
``forward_intermediates(intermediates_only=True)``.

``features="pre_relu"`` (the official DistPro code's ``extract_feature(x, preReLU=True)``) gives each stage before
its final ReLU, keyed ``stageK_pre``: a ResNet's ``layerK.<last>.add`` node (its ReLUs are made out of place first:
with ``inplace=True`` the ReLU after the add overwrites that node's output and the map comes back post-ReLU, without
an error); MobileNetV2's stage outputs (linear bottlenecks, no activation) as they are. Defined for torchvision
ResNets and MobileNetV2, the families whose ``stageK_pre`` taps :mod:`pipeline.models` defines; refused for others.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models import is_timm_model
from pipeline.process.artefact import ProcessError, stage_tap


def torchvision_stage_nodes(model: nn.Module, features: str = "output") -> dict[str, str]:
    """``{graph node: "stageK"}`` (``"stageK_pre"`` with ``features="pre_relu"``) for a torchvision ResNet or
    MobileNetV2."""
    from torchvision.models.mobilenetv2 import MobileNetV2
    from torchvision.models.resnet import ResNet

    from pipeline.models.from_torchvision import MOBILENET_V2_STAGES

    if isinstance(model, ResNet):
        if features == "pre_relu":
            layers = (model.layer1, model.layer2, model.layer3, model.layer4)
            return {
                f"layer{k}.{len(layer) - 1}.add": stage_tap(k, features) for k, layer in enumerate(layers, 1)
            }
        return {f"layer{k}": stage_tap(k) for k in range(1, 5)}
    if isinstance(model, MobileNetV2):
        return {f"features.{i}": stage_tap(k, features) for k, i in enumerate(MOBILENET_V2_STAGES, 1)}
    raise ProcessError(
        f"spatial stage maps are defined for torchvision ResNets and MobileNetV2 and for timm models with "
        f"feature_info, not {type(model).__name__}"
    )


def out_of_place_relus(model: nn.Module) -> None:
    """Every ``nn.ReLU`` of ``model`` computes out of place (the same values; a pre-ReLU node keeps its own)."""
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False


class StageMaps(nn.Module):
    """``(B, 3, H, W)`` normalised views -> ``{stageK: (B, C_k, H_k, W_k)}`` for every stage of ``model`` (or
    ``{stageK_pre: ...}``, each stage before its final ReLU, with ``features="pre_relu"``: module docstring)."""

    def __init__(self, model: nn.Module, features: str = "output") -> None:
        super().__init__()
        self.timm, self.features = is_timm_model(model), features
        if self.timm and features == "pre_relu":
            raise ProcessError(
                f"pre-ReLU stage maps are defined for torchvision ResNets and MobileNetV2, not timm's "
                f"{type(model).__name__}; use --stage-features output"
            )
        if self.timm:
            from pipeline.models.from_timm import stage_indices

            self.indices = stage_indices(model)
            if not self.indices:
                raise ProcessError(f"timm model {type(model).__name__} has no feature_info stages")
            self.model = model
        else:
            from torchvision.models.feature_extraction import create_feature_extractor

            nodes = torchvision_stage_nodes(model, features)
            if features == "pre_relu":
                out_of_place_relus(model)
            self.model = create_feature_extractor(model, return_nodes=nodes)

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
