"""timm models for :mod:`pipeline.models`: building with weights, taps, preprocessing and classifier names.

Imported on first use of a ``timm:`` model (``import timm`` takes seconds). Call it through :mod:`pipeline.models`
(``build_model('timm:NAME', ...)``, ``FeatureTaps``, ``model_preprocessing``, ``backbone_state_dict``); the tap
definitions are in that module's docstring, and :mod:`pipeline.models.from_torchvision` has the same functions for
torchvision. Nothing here downloads unless pretrained weights are asked for.

timm blocks own their activations (unlike torchvision's shared in-place ReLU), so ``pre_relu`` is a forward
pre-hook on the last one that pools its input before the in-place ReLU overwrites it.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path

import timm
import torch
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from pipeline.models import ModelError, Preprocessing, is_weights_name, load_state, read_state_dict

# weights names meaning "timm's weights for this name": its tag, else timm's default tag
PRETRAINED = ("pretrained", "DEFAULT")
VIT_STAGES = 4  # stages of a model whose feature_info has a single stride (ViTs): evenly spaced blocks


def build(name: str, weights: str | None, num_classes: int | None, kwargs: dict) -> tuple[nn.Module, dict]:
    """``timm.create_model`` for ``NAME`` or ``NAME.tag`` with random, pretrained or file weights; see
    :func:`pipeline.models.build_model`."""
    base, _, tag = name.partition(".")
    _check_name(base, tag)
    if weights and is_weights_name(weights):
        return _pretrained(base, tag, weights, kwargs)
    if not weights:
        sized = {"num_classes": num_classes} if num_classes else {}
        model = timm.create_model(name, pretrained=False, **sized, **kwargs)
        return model, {"kind": "random", "name": "random-init"}
    path = Path(weights)
    state = read_state_dict(path)
    cfg = timm.models.get_pretrained_cfg(name)  # metadata: the classifier's name without building the model
    heads = _as_names(cfg.classifier if cfg else "head")
    sized = (
        {"num_classes": int(state[f"{heads[0]}.weight"].shape[0])} if f"{heads[0]}.weight" in state else {}
    )
    model = timm.create_model(name, pretrained=False, **sized, **kwargs)  # classifier sized like the file's
    return model, load_state(model, f"timm:{name}", state, path, head_names(model))


def _check_name(base: str, tag: str) -> None:
    if not timm.is_model(base):
        close = ", ".join(difflib.get_close_matches(base, timm.list_models(), n=3)) or "none close"
        stem = re.split(r"[_\d]", base)[0] or base
        raise ModelError(
            f"unknown timm model {base!r} (close: {close}); list them with timm.list_models('*{stem}*')"
        )
    if tag and f"{base}.{tag}" not in timm.list_pretrained(f"{base}.*"):
        raise ModelError(
            f"timm model {base} has no pretrained tag {tag!r}; known: {', '.join(_known_tags(base)) or 'none'}"
        )


def _known_tags(base: str) -> list[str]:
    return [n.partition(".")[2] for n in timm.list_pretrained(f"{base}.*")]


def _pretrained(base: str, tag: str, weights: str, kwargs: dict) -> tuple[nn.Module, dict]:
    if weights in PRETRAINED:
        default = timm.models.get_pretrained_cfg(base)
        weights = tag or (default.tag if default else "")
    elif tag and weights != tag:
        raise ModelError(f"timm:{base}.{tag} with weights {weights!r}: name the tag once")
    known = _known_tags(base)
    if not known:
        raise ModelError(
            f"timm has no pretrained weights for {base}; pass a weights file, or none (random init)"
        )
    if weights not in known:
        raise ModelError(
            f"timm model {base} has no pretrained weights {weights!r}; known: pretrained (timm's default), "
            f"{', '.join(known)}, or pass a weights file"
        )
    try:
        model = timm.create_model(f"{base}.{weights}", pretrained=True, **kwargs)
    except Exception as err:  # hub, HTTP, disk and checkpoint errors have no common base class
        raise ModelError(
            f"could not load timm weights {base}.{weights} ({str(err).splitlines()[0]}); download them once with "
            "network access (timm caches them in the Hugging Face cache), or pass a local weights file"
        ) from None
    cfg = model.pretrained_cfg
    return model, {
        "kind": "timm",
        "name": f"{base}.{weights}",
        "hf_hub_id": cfg.get("hf_hub_id") or "",
        "url": cfg.get("url") or "",
    }


def last_linear(model: nn.Module) -> nn.Linear:
    """``get_classifier()`` (the first of DeiT-distilled's two)."""
    head = model.get_classifier()
    head = head[0] if isinstance(head, tuple) else head
    if not isinstance(head, nn.Linear):
        raise ModelError(f"timm model {type(model).__name__} has no nn.Linear classifier (num_classes=0?)")
    return head


def head_names(model: nn.Module) -> tuple[str, ...]:
    """The classifier module name(s) of ``pretrained_cfg['classifier']`` (``fc``, ``head.fc``, or DeiT's two)."""
    return _as_names(model.pretrained_cfg.get("classifier") or "head")


def _as_names(names: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


def preprocessing(model: nn.Module, identity: dict | None = None) -> Preprocessing:
    """From ``timm.data.resolve_data_config(model=model)`` (the ``pretrained_cfg``: metadata, never a download);
    the resolution is the model's fixed input size when it has one (a ViT built with ``img_size``)."""
    cfg = timm.data.resolve_data_config({}, model=model)
    height, width = cfg["input_size"][1:]
    if height != width:
        raise ModelError(f"timm input_size {cfg['input_size']} is not square; make a Preprocessing by hand")
    pretrained = model.pretrained_cfg
    return Preprocessing(
        mean=cfg["mean"],
        std=cfg["std"],
        resolution=fixed_input_size(model) or int(width),
        interpolation=cfg["interpolation"],
        crop_pct=float(cfg["crop_pct"]),
        source=f"timm:{pretrained.get('architecture')}.{pretrained.get('tag')} pretrained_cfg",
    )


def fixed_input_size(model: nn.Module) -> int | None:
    """The one input side a timm model accepts (a ViT without ``dynamic_img_size``), else None."""
    embed = getattr(model, "patch_embed", None)
    if (
        embed is None
        or getattr(model, "dynamic_img_size", False)
        or not getattr(embed, "strict_img_size", False)
    ):
        return None
    return int(embed.img_size[0])


def _pre_relu_act(model: nn.Module) -> nn.Module | None:
    """The activation whose input is KDEP's pre-ReLU map, else None: the final one of a timm ResNet's last block
    (input: bn(conv(..)) + shortcut), or ``bn2.act`` of a ReLU/ReLU6 EfficientNet-class model such as
    mobilenetv2_100 (input: conv_head + BN, as torchvision MobileNetV2's ``features[18]`` without ReLU6)."""
    if isinstance(model, ResNet):
        block = model.layer4[-1]
        if isinstance(block, Bottleneck):
            return block.act3
        return block.act2 if isinstance(block, BasicBlock) else None
    act = getattr(getattr(model, "bn2", None), "act", None)
    relu = isinstance(act, (nn.ReLU, nn.ReLU6))
    return act if isinstance(model, EfficientNet) and relu else None


def stage_indices(model: nn.Module) -> list[int]:
    """``feature_info`` / ``forward_intermediates`` index of stage1..stageN (see pipeline.models)."""
    info = list(getattr(model, "feature_info", None) or [])
    if not info or not hasattr(model, "forward_intermediates"):
        return []
    if len({f["reduction"] for f in info}) == 1 and len(info) > VIT_STAGES:  # isotropic: evenly spaced blocks
        return [math.ceil(k * len(info) / VIT_STAGES) - 1 for k in range(1, VIT_STAGES + 1)]
    return [i for i, f in enumerate(info) if f["reduction"] >= 4]


def tap_definitions(model: nn.Module) -> dict[str, str]:
    defs = {}
    act = _pre_relu_act(model)
    if act is not None:
        where = "layer4[-1] up to bn(conv(..)) + shortcut" if isinstance(model, ResNet) else "conv_head + bn2"
        defs["pre_relu"] = f"GAP of {where}, before its final activation ({type(act).__name__})"
    pooled = f"forward_head(forward_features(x), pre_logits=True) (global_pool {_pool_kind(model)})"
    defs["post_relu"] = defs["pooled"] = pooled
    info = list(getattr(model, "feature_info", None) or [])
    isotropic = len({f["reduction"] for f in info}) == 1
    for k, i in enumerate(stage_indices(model), 1):
        what = "mean of the patch tokens of" if isotropic else "GAP of"
        defs[f"stage{k}"] = f"{what} {info[i]['module']}"
    return defs


def _pool_kind(model: nn.Module) -> str:
    for owner in (model, getattr(model, "head", None)):
        pool = getattr(owner, "global_pool", None)
        if isinstance(pool, str):
            return repr(pool)
        if pool is not None and hasattr(pool, "pool_type"):
            return repr(pool.pool_type)
    return "of the model"


def run_taps(model: nn.Module, x: torch.Tensor, taps: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """One forward -> ``{tap: (B, D)}`` for ``taps`` (already checked against :func:`tap_definitions`)."""
    out: dict[str, torch.Tensor] = {}
    handle = None
    if "pre_relu" in taps:  # pool the activation's input before its in-place ReLU overwrites it
        handle = _pre_relu_act(model).register_forward_pre_hook(
            lambda _m, args: out.__setitem__("pre_relu", args[0].mean((2, 3)))
        )
    try:
        final = _forward_stages(model, x, [t for t in taps if t.startswith("stage")], out)
    finally:
        if handle is not None:
            handle.remove()
    if "pooled" in taps or "post_relu" in taps:
        out["pooled"] = out["post_relu"] = model.forward_head(final, pre_logits=True).flatten(1)
    return out


def _forward_stages(model: nn.Module, x: torch.Tensor, stages: list[str], out: dict) -> torch.Tensor:
    """forward_features(x), putting the pooled stage maps into ``out`` (one forward_intermediates when asked)."""
    if not stages:
        return model.forward_features(x)
    index = stage_indices(model)
    wanted = {t: index[int(t.removeprefix("stage")) - 1] for t in stages}
    order = sorted(set(wanted.values()))  # forward_intermediates returns maps in model order
    final, maps = model.forward_intermediates(x, indices=order)
    by_index = dict(zip(order, maps, strict=True))
    for t, i in wanted.items():
        m = by_index[i]
        out[t] = m.mean((2, 3)) if m.ndim == 4 else m.mean(1)  # NCHW map, or (B, N, C) tokens
    return final
