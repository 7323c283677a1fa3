"""torchvision models for :mod:`pipeline.models`: building with weights, taps, preprocessing and classifier names.

Call it through :mod:`pipeline.models` (``build_model('resnet50', ...)``, ``FeatureTaps``, ``model_preprocessing``);
the tap definitions are in that module's docstring. :mod:`pipeline.models.from_timm` has the same functions for timm.

The last block of a ResNet stage is re-run by hand (not hooked) for the pre-ReLU taps because torchvision blocks
reuse one in-place ReLU module: a hook that keeps a reference to the ``out += identity`` tensor sees it after the
ReLU has overwritten it, i.e. post-ReLU values, with no error.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.mobilenetv2 import MobileNetV2
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.vision_transformer import VisionTransformer

from pipeline.models import (
    IMAGENET_PREPROCESSING,
    ModelError,
    Preprocessing,
    is_weights_name,
    load_state,
    read_state_dict,
)

# MobileNetV2 stages: the last block at stride 4/8/16/32 (= timm mobilenetv2_100's blocks.1/2/4/6)
MOBILENET_V2_STAGES = (3, 6, 13, 17)


def build(arch: str, weights: str | None, num_classes: int | None, kwargs: dict) -> tuple[nn.Module, dict]:
    """``torchvision.models.get_model`` with random, enum-named or file weights; see pipeline.models.build_model."""
    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        close = ", ".join(difflib.get_close_matches(arch, known, n=3)) or "resnet50, resnet18, mobilenet_v2"
        raise ModelError(
            f"unknown model {arch!r}; torchvision classification models include {close} "
            "(torchvision.models.list_models()), or use timm:NAME for a timm model"
        )
    if weights and is_weights_name(weights):
        return _pretrained(arch, weights, kwargs)
    if not weights:
        sized = {"num_classes": num_classes} if num_classes else {}
        model = torchvision.models.get_model(arch, weights=None, **sized, **kwargs)
        return model, {"kind": "random", "name": "random-init"}
    path = Path(weights)
    state = read_state_dict(path)
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    head = head_names(model)[0]
    if f"{head}.weight" in state:  # size the classifier like the file's
        rows = int(state[f"{head}.weight"].shape[0])
        model = torchvision.models.get_model(arch, weights=None, num_classes=rows, **kwargs)
    return model, load_state(model, arch, state, path, head)


def _pretrained(arch: str, weights: str, kwargs: dict) -> tuple[nn.Module, dict]:
    enum = torchvision.models.get_model_weights(arch)
    try:
        w = enum["DEFAULT" if weights == "pretrained" else weights]
    except KeyError:
        names = ", ".join(e.name for e in enum)
        raise ModelError(
            f"{arch} has no torchvision weights {weights!r}; known: {names}, DEFAULT, or pass a weights file"
        ) from None
    try:
        model = torchvision.models.get_model(arch, weights=w, **kwargs)
    except (OSError, RuntimeError) as err:  # URLError is an OSError: no network, proxy, disk
        raise ModelError(
            f"could not load torchvision weights {enum.__name__}.{w.name} ({str(err).splitlines()[0]}); "
            "download them once with network access, or pass a local weights file"
        ) from None
    return model, {"kind": "torchvision", "name": f"{enum.__name__}.{w.name}", "url": w.url}


def last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"{type(model).__name__} has no final nn.Linear; pooled is the input of that layer")
    return linears[-1]


def head_names(model: nn.Module) -> tuple[str, ...]:
    head = last_linear(model)
    return (next(n for n, m in model.named_modules() if m is head),)


def preprocessing(model: nn.Module, identity: dict | None) -> Preprocessing:
    """The weights' ``transforms()`` (metadata, no download) when ``identity`` names torchvision weights, else the
    ImageNet defaults every stage used so far."""
    if not identity or identity.get("kind") != "torchvision":
        return IMAGENET_PREPROCESSING
    t = torchvision.models.get_weight(identity["name"]).transforms()
    return Preprocessing(
        mean=tuple(t.mean),
        std=tuple(t.std),
        resolution=int(t.crop_size[0]),
        interpolation=t.interpolation.value,
        crop_pct=t.crop_size[0] / t.resize_size[0],
        source=f"torchvision:{identity['name']}.transforms()",
    )


def fixed_input_size(model: nn.Module) -> int | None:
    """The one input side the model accepts (torchvision ViTs), else None."""
    return int(model.image_size) if isinstance(model, VisionTransformer) else None


def tap_definitions(model: nn.Module) -> dict[str, str]:
    pooled = f"input of {head_names(model)[0]} (the pre-logits feature)"
    if _is_resnet(model):
        return {
            "pre_relu": "GAP of layer4[-1] up to bn(conv(..)) + identity, before its ReLU",
            "post_relu": pooled,
            "pooled": pooled,
            **{f"stage{k}": f"GAP of layer{k}" for k in range(1, 5)},
            **{
                f"stage{k}_pre": f"GAP of layer{k}[-1] up to bn(conv(..)) + identity, before its ReLU"
                for k in range(1, 5)
            },
        }
    if isinstance(model, MobileNetV2):
        return {
            "pre_relu": "GAP of features[18] (conv + BN) without its ReLU6",
            "post_relu": pooled,
            "pooled": pooled,
            **{f"stage{k}": f"GAP of features[{i}]" for k, i in enumerate(MOBILENET_V2_STAGES, 1)},
            **{f"stage{k}_pre": f"GAP of features[{i}] (a linear bottleneck, no final activation: = stage{k})"
               for k, i in enumerate(MOBILENET_V2_STAGES, 1)},
        }  # fmt: skip
    return {"post_relu": pooled, "pooled": pooled}


def run_taps(model: nn.Module, x: torch.Tensor, taps: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """One forward -> ``{tap: (B, D)}`` for ``taps`` (already checked against :func:`tap_definitions`)."""
    if _is_resnet(model):
        return _resnet_taps(model, x, taps)
    if isinstance(model, MobileNetV2):
        return _mobilenet_v2_taps(model, x, taps)
    pooled = _input_of(last_linear(model), model, x)
    return {"pooled": pooled, "post_relu": pooled}


def _resnet_taps(m: ResNet, x: torch.Tensor, taps: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    for k, layer in enumerate((m.layer1, m.layer2, m.layer3), 1):
        if f"stage{k}_pre" in taps:  # the same maths as layer(x), stopping before the last block's ReLU
            pre = _block_pre_relu(layer[-1], layer[:-1](x))
            out[f"stage{k}_pre"] = pre.mean((2, 3))
            x = torch.relu(pre)
        else:
            x = layer(x)
        if f"stage{k}" in taps:
            out[f"stage{k}"] = x.mean((2, 3))
    pre = _block_pre_relu(m.layer4[-1], m.layer4[:-1](x))
    out["pre_relu"] = out["stage4_pre"] = pre.mean((2, 3))
    out["pooled"] = out["post_relu"] = out["stage4"] = torch.relu(pre).mean((2, 3))
    return out


def _block_pre_relu(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Bottleneck/BasicBlock up to ``bn(conv(..)) + identity``, without the final ReLU."""
    identity = block.downsample(x) if block.downsample is not None else x
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        return block.bn3(block.conv3(out)) + identity
    return block.bn2(block.conv2(out)) + identity


def _mobilenet_v2_taps(m: MobileNetV2, x: torch.Tensor, taps: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    stages = {i: f"stage{k}" for k, i in enumerate(MOBILENET_V2_STAGES, 1)}
    for i, layer in enumerate(m.features[:-1]):
        x = layer(x)
        if i in stages and {stages[i], f"{stages[i]}_pre"} & set(taps):
            out[stages[i]] = out[f"{stages[i]}_pre"] = x.mean((2, 3))
    last = m.features[-1]
    pre = last[1](last[0](x))
    # last[2] is ReLU6(inplace=True): calling it would overwrite ``pre``; relu6 out of place instead.
    out["pre_relu"] = pre.mean((2, 3))
    out["pooled"] = out["post_relu"] = nn.functional.relu6(pre).mean((2, 3))
    return out


def _input_of(head: nn.Module, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    captured = {}
    handle = head.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return captured["x"].flatten(1)


def _is_resnet(model: nn.Module) -> bool:
    return isinstance(model, ResNet) and isinstance(model.layer4[-1], (BasicBlock, Bottleneck))
