"""The pooled taps against independent references: torchvision's FX feature extractor on the `add` node (with
ReLUs made non-inplace, PITFALLS.md) for ResNets, a cloning hook on the last BN for MobileNetV2, and `fc`'s input
for post_relu. Also weights files: state dicts, checkpoints, headless backbones and wrong architectures."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from pipeline.models import FeatureTaps, ModelError, backbone_state_dict, build_model


def _reference_pre_relu(model: nn.Module, arch: str, x: torch.Tensor) -> torch.Tensor:
    if arch.startswith("resnet"):
        for m in model.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False
        node = {"resnet18": "layer4.1.add", "resnet50": "layer4.2.add"}[arch]
        return create_feature_extractor(model, [node])(x)[node].mean((2, 3))
    captured = {}

    def keep(_module, _inputs, out):  # returns None: a hook's return value would replace the output
        captured["x"] = out.clone()

    handle = model.features[18][1].register_forward_hook(keep)
    model(x)
    handle.remove()
    return captured["x"].mean((2, 3))


def _reference_post_relu(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    head = model.fc if hasattr(model, "fc") else model.classifier[-1]
    captured = {}

    def keep(_module, args):
        captured["x"] = args[0].clone()

    handle = head.register_forward_pre_hook(keep)
    model(x)
    handle.remove()
    return captured["x"]


@pytest.mark.parametrize(("arch", "dim"), [("resnet18", 512), ("resnet50", 2048), ("mobilenet_v2", 1280)])
def test_pre_relu_tap_equals_the_reference_and_has_negative_values(arch, dim):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=10)
    for m in model.modules():  # non-trivial BN statistics so the pre-ReLU feature is not ~0
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = FeatureTaps(model, ("pre_relu", "post_relu"))(x)
        ref_post = _reference_post_relu(model, x)
        ref_pre = _reference_pre_relu(model, arch, x)
    assert ours["pre_relu"].shape == (2, dim)
    torch.testing.assert_close(ours["pre_relu"], ref_pre, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["post_relu"], ref_post, rtol=1e-5, atol=1e-5)
    assert (ours["pre_relu"] < 0).any() and (ours["post_relu"] >= 0).all()


def test_weights_files_state_dict_checkpoint_headless_and_wrong_arch(tmp_path):
    model = torchvision.models.resnet18(num_classes=7)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
        tmp_path / "ck.pt",
    )
    torch.save(backbone_state_dict(model), tmp_path / "backbone.pt")
    for name in ("sd.pt", "ck.pt", "backbone.pt"):
        loaded, ident = build_model("resnet18", str(tmp_path / name))
        assert ident["kind"] == "file" and len(ident["sha256"]) == 64
        torch.testing.assert_close(loaded.layer4[1].bn2.weight, model.layer4[1].bn2.weight)
    assert "fc.weight" not in backbone_state_dict(model)
    torchvision.models.resnet18().load_state_dict(
        {
            **backbone_state_dict(model),
            **{k: v for k, v in torchvision.models.resnet18().state_dict().items() if k.startswith("fc.")},
        },
        strict=True,
    )
    with pytest.raises(ModelError, match=r"sd\.pt does not fit mobilenet_v2"):
        build_model("mobilenet_v2", str(tmp_path / "sd.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"junk\.pt is not a readable PyTorch weights file"):
        build_model("resnet18", str(tmp_path / "junk.pt"))
    with pytest.raises(ModelError, match="has no torchvision weights 'IMAGENET9'"):
        build_model("resnet18", "IMAGENET9")


def test_pre_relu_is_refused_for_models_without_a_definition():
    model = torchvision.models.efficientnet_b0()
    with pytest.raises(ModelError, match="pre_relu tap is defined for ResNet and MobileNetV2"):
        FeatureTaps(model, ("pre_relu",))
    out = FeatureTaps(model.eval(), ("post_relu",))(torch.randn(1, 3, 32, 32))
    assert out["post_relu"].shape == (1, 1280)
