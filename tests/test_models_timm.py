"""timm models through pipeline.models, random-init and small (nothing is downloaded).

Compared against independent references: a timm ResNet-18's ``pre_relu`` against a hook-free manual forward of its
last block (values and gradients) and against the torchvision ResNet-18 holding the same weights (every tap); a
timm MobileNetV2's ``pre_relu`` against its forward written out with ``bn2`` as a plain batch norm;
``pooled`` against ``forward_head(forward_features(x), pre_logits=True)`` and, for the ViT, the CLS token of
``forward_features``; stage taps against a ``features_only`` model (ResNet) or forward hooks on the stage / block
modules (ConvNeXt, ViT), pooled by hand. Also: preprocessing read from ``pretrained_cfg`` (metadata only), on-device
normalisation, strict loading of exported backbones into ``timm.create_model(NAME, num_classes=0)``, refusals.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision
from torch import nn

from pipeline.models import (
    FeatureTaps,
    ModelError,
    Preprocessing,
    backbone_state_dict,
    build_model,
    last_linear,
    model_preprocessing,
    supported_taps,
    tap_definitions,
    tap_dims,
)

STAGES = ("stage1", "stage2", "stage3", "stage4")
# ViTs keep PyTorch's default init: timm's trunc-normal init takes ~2 s per ViT on CPU
FAST_VIT = {"weight_init": "skip"}


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics so that pre-activation features are not ~0 and have both signs."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def _hooked_outputs(model: nn.Module, modules: dict[str, nn.Module], run) -> dict[str, torch.Tensor]:
    """``run()`` with forward hooks cloning each module's output."""
    captured = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, out, name=name: captured.setdefault(name, out.clone()))
        for name, m in modules.items()
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return captured


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    model, identity = build_model("timm:resnet18", None, num_classes=10)
    assert identity == {"kind": "random", "name": "random-init"}
    return _randomise_norms(model)


def _vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    vit, _ = build_model("timm:vit_tiny_patch16_224", None, model_kwargs={**kwargs, **FAST_VIT})
    for p in (vit.cls_token, vit.pos_embed):  # weight_init='skip' leaves these two as torch.empty
        nn.init.normal_(p, std=0.02)
    return vit.eval()


@pytest.fixture(scope="module")
def vit32() -> nn.Module:
    """A ViT-Ti/16 at a fixed 32 px input (2 x 2 patches)."""
    return _vit(img_size=32)


@pytest.fixture(scope="module")
def vit_dynamic() -> nn.Module:
    """A ViT-Ti/16 that takes any input size (``dynamic_img_size``)."""
    return _vit(dynamic_img_size=True)


@pytest.fixture(scope="module")
def convnext() -> nn.Module:
    torch.manual_seed(0)
    return build_model("timm:convnext_atto", None)[0].eval()


def _manual_pre_relu(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ResNet-18 written out: stem, layers 1-3, layer4[0], then layer4[1] up to bn2(conv2) + x, GAP."""
    x = m.maxpool(torch.relu(m.bn1(m.conv1(x))))
    x = m.layer4[0](m.layer3(m.layer2(m.layer1(x))))
    block = m.layer4[1]
    out = torch.relu(block.bn1(block.conv1(x)))
    return (block.bn2(block.conv2(out)) + x).mean((2, 3))


def test_timm_resnet_taps_equal_a_manual_forward_features_only_and_torchvision(resnet18):
    x = torch.randn(2, 3, 64, 64)
    taps = supported_taps(resnet18)
    assert taps == ("pre_relu", "post_relu", "pooled", *STAGES)
    with torch.no_grad():
        ours = FeatureTaps(resnet18, taps)(x)
        pooled_ref = resnet18.forward_head(resnet18.forward_features(x), pre_logits=True)
        features = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4))
        features.load_state_dict(backbone_state_dict(resnet18), strict=True)
        stage_ref = [f.mean((2, 3)) for f in features.eval()(x)]
        pre_ref = _manual_pre_relu(resnet18, x)
    torch.testing.assert_close(ours["pre_relu"], pre_ref, rtol=1e-5, atol=1e-5)
    assert (ours["pre_relu"] < 0).any() and (ours["pooled"] >= 0).all()
    torch.testing.assert_close(ours["pooled"], pooled_ref, rtol=0, atol=0)
    torch.testing.assert_close(ours["post_relu"], ours["pooled"], rtol=0, atol=0)
    for tap, ref in zip(STAGES, stage_ref, strict=True):
        torch.testing.assert_close(ours[tap], ref, rtol=1e-5, atol=1e-5)
    tv = torchvision.models.resnet18(num_classes=10)
    tv.load_state_dict(resnet18.state_dict(), strict=True)  # same architecture, same key names
    with torch.no_grad():
        theirs = FeatureTaps(tv.eval(), taps)(x)
    for tap in taps:
        torch.testing.assert_close(ours[tap], theirs[tap], rtol=1e-5, atol=1e-5)


def test_timm_resnet_pre_relu_gradients_equal_the_manual_forward(resnet18):
    """The tap is a pre-hook on the in-place activation: autograd must still see the pre-ReLU sum."""
    x = torch.randn(2, 3, 32, 32)
    FeatureTaps(resnet18, ("pre_relu",))(x)["pre_relu"].square().sum().backward()
    ours = resnet18.conv1.weight.grad.clone()
    resnet18.zero_grad()
    _manual_pre_relu(resnet18, x).square().sum().backward()
    torch.testing.assert_close(ours, resnet18.conv1.weight.grad, rtol=1e-4, atol=1e-6)
    resnet18.zero_grad()


def test_timm_mobilenetv2_pre_relu_is_conv_head_bn_before_relu6():
    """Reference: the forward written out, bn2 as a plain F.batch_norm (no activation)."""
    torch.manual_seed(0)
    model = _randomise_norms(build_model("timm:mobilenetv2_100", None)[0])
    assert supported_taps(model)[:3] == ("pre_relu", "post_relu", "pooled")
    x = torch.randn(2, 3, 64, 64)
    bn = model.bn2
    with torch.no_grad():
        ours = FeatureTaps(model, ("pre_relu", "pooled", "stage4"))(x)
        blocks = model.blocks(model.bn1(model.conv_stem(x)))
        head = model.conv_head(blocks)
        pre = nn.functional.batch_norm(
            head, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
        )
    torch.testing.assert_close(ours["pre_relu"], pre.mean((2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["pooled"], nn.functional.relu6(pre).mean((2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["stage4"], blocks.mean((2, 3)), rtol=1e-5, atol=1e-5)  # blocks.6: 320 ch
    assert (ours["pre_relu"] < 0).any()


@pytest.mark.parametrize(("fixture", "sizes"), [("vit32", (32,)), ("vit_dynamic", (32, 48))])
def test_vit_pooled_is_the_cls_token_and_stages_are_mean_patch_tokens_of_4_blocks(fixture, sizes, request):
    vit = request.getfixturevalue(fixture)
    defs = tap_definitions(vit)
    assert "pre_relu" not in defs
    assert [defs[t] for t in STAGES] == [f"mean of the patch tokens of blocks.{i}" for i in (2, 5, 8, 11)]
    for side in sizes:
        x = torch.randn(2, 3, side, side)
        blocks = {f"stage{k}": vit.blocks[i] for k, i in enumerate((2, 5, 8, 11), 1)}
        with torch.no_grad():
            ours = FeatureTaps(vit, ("pooled", *STAGES))(x)
            ref = _hooked_outputs(vit, blocks, lambda x=x: vit.forward_features(x))
            tokens = vit.forward_features(x)
        torch.testing.assert_close(ours["pooled"], tokens[:, 0], rtol=0, atol=0)  # CLS after the final norm
        torch.testing.assert_close(ours["pooled"], vit.forward_head(tokens, pre_logits=True), rtol=0, atol=0)
        for tap, out in ref.items():
            torch.testing.assert_close(
                ours[tap], out[:, vit.num_prefix_tokens :].mean(1), rtol=1e-5, atol=1e-5
            )
    assert tap_dims(vit, ("pooled", "stage2")) == {"pooled": 192, "stage2": 192}  # at 32 px when fixed


def test_convnext_pooled_and_stages_and_refused_pre_relu(convnext):
    model = convnext
    x = torch.randn(2, 3, 64, 64)
    stages = {f"stage{k}": model.stages[k - 1] for k in range(1, 5)}
    with torch.no_grad():
        ours = FeatureTaps(model, ("pooled", *STAGES))(x)
        ref = _hooked_outputs(model, stages, lambda: model.forward_features(x))
        final = model.forward_features(x)
        pooled_ref = model.head.norm(final.mean((2, 3), keepdim=True)).flatten(1)  # GAP then LayerNorm2d
    torch.testing.assert_close(ours["pooled"], pooled_ref, rtol=1e-5, atol=1e-5)
    for tap, out in ref.items():
        torch.testing.assert_close(ours[tap], out.mean((2, 3)), rtol=1e-5, atol=1e-5)
    assert tap_dims(model, supported_taps(model)) == {
        "post_relu": 320, "pooled": 320, "stage1": 40, "stage2": 80, "stage3": 160, "stage4": 320,
    }  # fmt: skip
    with pytest.raises(
        ModelError, match=r"pre_relu tap is defined .* ConvNeXt has taps: post_relu, pooled, stage1"
    ):
        FeatureTaps(model, ("pre_relu",))
    with pytest.raises(
        ModelError, match=r"ConvNeXt has no tap 'stage5'; it has: post_relu, pooled, stage1, .*stage4"
    ):
        FeatureTaps(model, ("pooled", "stage5"))


def test_preprocessing_comes_from_pretrained_cfg_serialises_and_normalises_on_the_device(vit32, vit_dynamic):
    prep = model_preprocessing(vit_dynamic)
    assert (prep.mean, prep.std, prep.resolution, prep.interpolation, prep.crop_pct) == (
        (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 224, "bicubic", 0.9,
    )  # fmt: skip
    assert prep.source == "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k pretrained_cfg"
    assert Preprocessing.from_dict(json.loads(json.dumps(prep.to_dict()))) == prep
    small = vit32
    assert model_preprocessing(small).resolution == 32  # the input size the model takes
    tagged, _ = build_model("timm:resnet18.tv_in1k", None)  # a tag picks its metadata; weights stay random
    assert (model_preprocessing(tagged).interpolation, model_preprocessing(tagged).crop_pct) == (
        "bilinear",
        0.875,
    )
    custom = prep.override(mean=(0.4, 0.5, 0.6))
    assert custom.mean == (0.4, 0.5, 0.6) and custom.source == f"{prep.source} + override(mean)"
    with pytest.raises(ModelError, match=r"std \(0\.5, 0\.0, 0\.5\) must be > 0"):
        prep.override(std=(0.5, 0.0, 0.5))
    with pytest.raises(ModelError, match="no field 'men'; fields: mean, std, resolution"):
        prep.override(men=(0.5, 0.5, 0.5))
    x = torch.rand(2, 3, 32, 32)
    u8 = (x * 255).round().to(torch.uint8)
    mean, std = torch.tensor(custom.mean).view(3, 1, 1), torch.tensor(custom.std).view(3, 1, 1)
    with torch.no_grad():
        ours = FeatureTaps(small, ("pooled",), custom)(x)["pooled"]
        ref = FeatureTaps(small, ("pooled",))((x - mean) / std)["pooled"]
        ours_u8 = FeatureTaps(small, ("pooled",), custom)(u8)["pooled"]
        ref_u8 = FeatureTaps(small, ("pooled",))((u8.float() / 255 - mean) / std)["pooled"]
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(ours_u8, ref_u8, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("fixture", "name", "kwargs", "files"),
    [  # files read back through build_model: the headless export (random head) and/or a full state dict
        ("resnet18", "resnet18", {}, ("backbone.pt", "full.pt")),
        ("convnext", "convnext_atto", {}, ("full.pt",)),  # classifier head.fc sized like the file's
        ("vit32", "vit_tiny_patch16_224", {"img_size": 32, **FAST_VIT}, ("backbone.pt",)),
    ],
)
def test_exported_backbone_loads_strictly_into_timm_create_model_without_head(
    fixture, name, kwargs, files, request, tmp_path
):
    model = request.getfixturevalue(fixture)
    state = backbone_state_dict(model)
    assert not any(k.startswith(("fc.", "head.fc.", "head.weight", "head.bias")) for k in state)
    headless = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    headless.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = FeatureTaps(model, ("pooled",))(x)["pooled"]
        torch.testing.assert_close(headless.eval()(x), pooled, rtol=0, atol=0)
    torch.save(state, tmp_path / "backbone.pt")
    torch.save(model.state_dict(), tmp_path / "full.pt")
    for file in files:
        loaded, identity = build_model(f"timm:{name}", str(tmp_path / file), model_kwargs=kwargs)
        assert identity["kind"] == "file" and len(identity["sha256"]) == 64
        assert identity.get("model_kwargs", {}) == kwargs
        with torch.no_grad():
            again = FeatureTaps(loaded.eval(), ("pooled",))(x)["pooled"]
        torch.testing.assert_close(again, pooled, rtol=0, atol=0)
        if file == "full.pt":
            assert last_linear(loaded).out_features == last_linear(model).out_features


def test_refusals_name_what_exists(monkeypatch, tmp_path):
    with pytest.raises(
        ModelError,
        match=r"unknown timm model 'resnet19' \(close: resnet18.*timm\.list_models\('\*resnet\*'\)",
    ):
        build_model("timm:resnet19")
    with pytest.raises(
        ModelError,
        match=r"resnet18 has no pretrained weights 'IMAGENET1K_V1'; known: pretrained .*a1_in1k.*tv_in1k",
    ):
        build_model("timm:resnet18", "IMAGENET1K_V1")
    with pytest.raises(ModelError, match=r"no pretrained tag 'xx'; known: a1_in1k"):
        build_model("timm:resnet18.xx")
    with pytest.raises(ModelError, match="name the tag once"):
        build_model("timm:resnet18.a1_in1k", "a2_in1k")
    with pytest.raises(ModelError, match=r"model name 'tf:resnet18': use NAME or tv:NAME"):
        build_model("tf:resnet18")
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pt")
    with pytest.raises(ModelError, match=r"r18\.pt does not fit timm:convnext_atto"):
        build_model("timm:convnext_atto", str(tmp_path / "r18.pt"))

    def offline(*_args, **_kwargs):
        raise OSError("offline: no route to huggingface.co")

    monkeypatch.setattr(timm, "create_model", offline)  # never download in a test
    with pytest.raises(ModelError, match=r"could not load timm weights resnet18\.a1_in1k \(offline"):
        build_model("timm:resnet18", "pretrained")
