"""Models by torchvision name, weights by enum name or local file, and the pooled feature taps.

Taps (METHOD.md):
- ``pre_relu``: KDEP's feature. ResNet family: the last residual block of ``layer4`` computed up to
  ``bn(conv(..)) + identity``, *before* its final ReLU, then global average pooling. MobileNetV2: the last
  ``Conv2dNormActivation`` (320 -> 1280) without its ReLU6, then GAP. Values can be negative.
- ``post_relu``: the usual pooled feature, i.e. the input of the model's last ``nn.Linear`` (what ``fc`` sees);
  defined for every torchvision classification model.

The last ResNet block is re-run by hand (not hooked) because torchvision blocks reuse one in-place ReLU module,
so a hook would see post-ReLU values (PITFALLS.md).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.mobilenetv2 import MobileNetV2
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from pipeline.choices import TAPS
from pipeline.errors import KdepError


class ModelError(KdepError):
    """Unknown model, tap or weights; the message says what exists."""


def build_model(
    arch: str, weights: str | None = None, num_classes: int | None = None
) -> tuple[nn.Module, dict]:
    """A torchvision model and its weights identity.

    ``weights``: None (random init), a torchvision enum name such as ``IMAGENET1K_V2`` or ``DEFAULT`` (fetched the
    way torchvision does, on the user's machine), or a path to a state dict / checkpoint (its sha256 is recorded).
    A file's classifier may have any number of classes, or be absent (a backbone saved without its head).
    """
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(
            f"unknown model {arch!r}; use a torchvision classification model name such as resnet50, resnet18 or mobilenet_v2"
        )
    if weights and not Path(weights).suffix and not Path(weights).exists():
        enum = torchvision.models.get_model_weights(arch)
        try:
            w = enum[weights]
        except KeyError:
            names = ", ".join(e.name for e in enum)
            raise ModelError(
                f"{arch} has no torchvision weights {weights!r}; known: {names}, or pass a weights file"
            ) from None
        try:
            model = torchvision.models.get_model(arch, weights=w)
        except (OSError, RuntimeError) as err:  # URLError is an OSError: no network, proxy, disk
            raise ModelError(
                f"could not load torchvision weights {enum.__name__}.{w.name} ({str(err).splitlines()[0]}); "
                "download them once with network access, or pass a local weights file"
            ) from None
        return model, {"kind": "torchvision", "name": f"{enum.__name__}.{w.name}", "url": w.url}
    if not weights:
        kwargs = {"num_classes": num_classes} if num_classes else {}
        return torchvision.models.get_model(arch, weights=None, **kwargs), {
            "kind": "random",
            "name": "random-init",
        }
    path = Path(weights)
    state = read_state_dict(path)
    model = torchvision.models.get_model(arch, weights=None)
    head = _head_name(model)
    if f"{head}.weight" in state:  # size the classifier like the file's
        model = torchvision.models.get_model(
            arch, weights=None, num_classes=int(state[f"{head}.weight"].shape[0])
        )
    return model, load_state(model, arch, state, path, head)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a file holding one, or a checkpoint holding one under 'state_dict'/'model'/'backbone'."""
    if not path.is_file():
        raise ModelError(f"no weights file at {path}; pass an existing file or a torchvision weights name")
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


def load_state(model: nn.Module, arch: str, state: dict, path: Path, head: str) -> dict:
    """Load strictly, except that the classifier may be absent; a mismatch names the file and the keys."""
    current = model.state_dict()
    missing = sorted(k for k in set(current) - set(state) if not k.startswith(f"{head}."))
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
    model.load_state_dict(state, strict=not any(k.startswith(f"{head}.") for k in set(current) - set(state)))
    return {"kind": "file", "name": path.name, "sha256": sha256_file(path), "path": str(path.resolve())}


def _head_name(model: nn.Module) -> str:
    head = last_linear(model)
    return next(n for n, m in model.named_modules() if m is head)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _block_pre_relu(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision Bottleneck/BasicBlock up to ``bn(conv(..)) + identity``, without the final ReLU."""
    identity = block.downsample(x) if block.downsample is not None else x
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        return block.bn3(block.conv3(out)) + identity
    return block.bn2(block.conv2(out)) + identity


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's final nn.Linear (its classifier)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(
            f"{type(model).__name__} has no final nn.Linear; post_relu is the input of that layer"
        )
    return linears[-1]


class FeatureTaps(nn.Module):
    """``(B, 3, H, W) -> {tap: (B, D)}`` for the requested taps (pre_relu and/or post_relu)."""

    def __init__(self, model: nn.Module, taps: tuple[str, ...]) -> None:
        super().__init__()
        for tap in taps:
            if tap not in TAPS:
                raise ModelError(f"unknown tap {tap!r}; known taps: {', '.join(TAPS)}")
        if "pre_relu" in taps and not (_is_resnet(model) or isinstance(model, MobileNetV2)):
            raise ModelError(
                f"the pre_relu tap is defined for ResNet and MobileNetV2 models, not {type(model).__name__}; use post_relu"
            )
        self.model, self.taps = model, tuple(taps)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if _is_resnet(self.model):
            pre = self._resnet_pre(x)
            return self._pick(pre.mean((2, 3)), torch.relu(pre).mean((2, 3)))
        if isinstance(self.model, MobileNetV2):
            last = self.model.features[-1]
            pre = last[1](last[0](self.model.features[:-1](x)))
            # last[2] is ReLU6(inplace=True): calling it would overwrite ``pre``; relu6 out of place instead.
            return self._pick(pre.mean((2, 3)), nn.functional.relu6(pre).mean((2, 3)))
        return {"post_relu": self._generic_post(x)}

    def _pick(self, pre: torch.Tensor, post: torch.Tensor) -> dict[str, torch.Tensor]:
        both = {"pre_relu": pre, "post_relu": post}
        return {t: both[t] for t in self.taps}

    def _resnet_pre(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        x = m.layer4[:-1](m.layer3(m.layer2(m.layer1(x))))
        return _block_pre_relu(m.layer4[-1], x)

    def _generic_post(self, x: torch.Tensor) -> torch.Tensor:
        captured = {}
        handle = last_linear(self.model).register_forward_pre_hook(
            lambda _m, args: captured.setdefault("x", args[0])
        )
        try:
            self.model(x)
        finally:
            handle.remove()
        return captured["x"].flatten(1)


def _is_resnet(model: nn.Module) -> bool:
    return isinstance(model, ResNet) and isinstance(model.layer4[-1], (BasicBlock, Bottleneck))


def tap_dims(model: nn.Module, taps: tuple[str, ...], resolution: int = 64) -> dict[str, int]:
    """Feature width of each tap, from one dummy forward on CPU."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = FeatureTaps(model, taps)(
            torch.zeros(1, 3, resolution, resolution, device=next(model.parameters()).device)
        )
    model.train(was_training)
    return {t: int(v.shape[1]) for t, v in out.items()}


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without its final classifier layer (loads with strict=True once that is dropped)."""
    prefix = f"{_head_name(model)}."
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith(prefix)}
