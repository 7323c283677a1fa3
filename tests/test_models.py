"""The pooled taps against independent references: torchvision's FX feature extractor on the `add` node (with
ReLUs made non-inplace: an in-place ReLU overwrites the add node's output) for ResNets, a cloning hook on the last
BN for MobileNetV2, and `fc`'s input for post_relu; stage taps (and the pre-ReLU stage taps) against the FX
extractor's stage outputs (add nodes), pooled by hand. Also weights files (state
dicts, checkpoints, headless backbones, wrong architectures), names and refusals, and preprocessing: the weights'
transforms() metadata, and ImageNet normalisation on the device bit-identical to pipeline.data.views."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from pipeline.data.views import IMAGENET_MEAN, IMAGENET_STD, normalize_views
from pipeline.models import (
    IMAGENET_PREPROCESSING,
    FeatureTaps,
    ModelError,
    Normalize,
    Preprocessing,
    backbone_state_dict,
    build_model,
    model_preprocessing,
    parse_model_name,
    supported_taps,
)


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


@pytest.mark.parametrize(
    ("arch", "nodes", "pre_nodes"),
    [
        ("resnet18", ("layer1", "layer2", "layer3", "layer4"),
         ("layer1.1.add", "layer2.1.add", "layer3.1.add", "layer4.1.add")),
        ("mobilenet_v2", ("features.3", "features.6", "features.13", "features.17"),
         ("features.3", "features.6", "features.13", "features.17")),
    ],
)  # fmt: skip
def test_stage_taps_equal_the_fx_feature_extractor_pooled(arch, nodes, pre_nodes):
    """Stage K is GAP of layerK (ResNet) or of the last block at stride 4/8/16/32 (MobileNetV2, timm's grouping);
    stageK_pre is GAP of the last block's add node, before its ReLU (ReLUs made out of place for the reference, or
    the in-place ReLU overwrites it), and MobileNetV2's linear-bottleneck stage outputs themselves."""
    torch.manual_seed(0)
    model, _ = build_model(f"tv:{arch}", None)
    model.eval()
    stages = tuple(f"stage{k}" for k in range(1, 5))
    pre = tuple(f"stage{k}_pre" for k in range(1, 5))
    assert supported_taps(model) == ("pre_relu", "post_relu", "pooled", *stages, *pre)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = FeatureTaps(model, ("pooled", *stages, *pre))(x)
        alone = FeatureTaps(model, stages)(x)  # without the pre taps: the same stage values
        ref = create_feature_extractor(model, list(nodes))(x)
        pooled = _reference_post_relu(model, x)
        reference = copy.deepcopy(model)
        for m in reference.modules():
            if isinstance(m, torch.nn.ReLU):
                m.inplace = False
        ref_pre = create_feature_extractor(reference, list(pre_nodes))(x)
    for tap, node in zip(stages, nodes, strict=True):
        torch.testing.assert_close(ours[tap], ref[node].mean((2, 3)), rtol=1e-5, atol=1e-5)
        assert torch.equal(ours[tap], alone[tap])
    for tap, node in zip(pre, pre_nodes, strict=True):
        torch.testing.assert_close(ours[tap], ref_pre[node].mean((2, 3)), rtol=1e-5, atol=1e-5)
    if arch == "resnet18":
        assert all((ours[t] < 0).any() for t in pre)  # pre-ReLU: negative values appear
        with torch.no_grad():
            assert torch.equal(ours["stage4_pre"], FeatureTaps(model, ("pre_relu",))(x)["pre_relu"])
    else:
        assert all(torch.equal(ours[f"stage{k}_pre"], ours[f"stage{k}"]) for k in range(1, 5))
    torch.testing.assert_close(ours["pooled"], pooled, rtol=1e-5, atol=1e-5)


def test_other_torchvision_models_have_pooled_and_unknown_taps_name_the_known_ones():
    model = torchvision.models.efficientnet_b0().eval()
    assert supported_taps(model) == ("post_relu", "pooled")
    with pytest.raises(ModelError, match=r"EfficientNet has no tap 'stage1'; it has: post_relu, pooled"):
        FeatureTaps(model, ("stage1",))
    with pytest.raises(
        ModelError, match="ResNet has no tap 'stage5'; it has: pre_relu, post_relu, pooled, stage1"
    ):
        FeatureTaps(torchvision.models.resnet18(), ("stage5",))


def test_model_names_and_refusals():
    assert parse_model_name("resnet50") == parse_model_name("tv:resnet50") == ("torchvision", "resnet50")
    assert parse_model_name("timm:convnext_atto.d2_in1k") == ("timm", "convnext_atto.d2_in1k")
    with pytest.raises(
        ModelError, match=r"unknown model 'resnet19'; torchvision classification models include resnet18"
    ):
        build_model("resnet19")
    with pytest.raises(ModelError, match=r"model name 'keras:resnet50': use NAME or tv:NAME .* timm:NAME"):
        build_model("keras:resnet50")
    with pytest.raises(
        ModelError, match=r"has no torchvision weights 'a1_in1k'; known: IMAGENET1K_V1, DEFAULT"
    ):
        build_model("tv:resnet18", "a1_in1k")


def test_preprocessing_of_torchvision_weights_and_default_normalisation_is_bit_identical_to_the_views():
    """Metadata only (the weights' transforms()), nothing downloaded; ImageNet mean/std through FeatureTaps equal
    the data pipeline's normalisation bit for bit, so a [0, 1]/uint8 input path changes no cached number."""
    model = torchvision.models.resnet18().eval()
    prep = model_preprocessing(model, {"kind": "torchvision", "name": "ResNet50_Weights.IMAGENET1K_V2"})
    assert (prep.resolution, prep.interpolation, round(prep.crop_pct, 4)) == (
        224,
        "bilinear",
        round(224 / 232, 4),
    )
    assert prep.source == "torchvision:ResNet50_Weights.IMAGENET1K_V2.transforms()"
    assert (
        model_preprocessing(model) == model_preprocessing(model, {"kind": "random"}) == IMAGENET_PREPROCESSING
    )
    assert IMAGENET_PREPROCESSING.mean == IMAGENET_MEAN and IMAGENET_PREPROCESSING.std == IMAGENET_STD
    u8 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    x = u8.float() / 255
    norm = Normalize(IMAGENET_PREPROCESSING)
    assert torch.equal(norm(u8), normalize_views(u8))
    assert torch.equal(
        norm(x), (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    )
    with torch.no_grad():
        ours = FeatureTaps(model, ("pre_relu",), IMAGENET_PREPROCESSING)(u8)["pre_relu"]
        today = FeatureTaps(model, ("pre_relu",))(normalize_views(u8))["pre_relu"]
    assert torch.equal(ours, today)
    with pytest.raises(ModelError, match="interpolation 'area'"):
        Preprocessing((0.5,) * 3, (0.5,) * 3, 224, interpolation="area")
