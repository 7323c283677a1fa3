"""Reference set-ups in one step: manifests/kdep-paper.yaml, kdep-reference.yaml and coss.yaml resolve to the
documented values, a CoSS run that is not the reference set-up says what differs (once), the cosine schedule, and
cosine-coss against coss-pytorch's ``adjust_learning_rate`` (tools/utils.py) transcribed."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.manifest import resolve_config
from pipeline.student.training import lr_at
from stages import train_student
from stages.config import CacheTeacherConfig, FitSvdConfig, TrainStudentConfig

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"


def _load(name: str) -> dict:
    path = MANIFESTS / name
    out = {"cache": resolve_config(CacheTeacherConfig, "cache_teacher", path),
           "train": resolve_config(TrainStudentConfig, "train_student", path)}  # fmt: skip
    if name != "coss.yaml":
        out["fit"] = resolve_config(FitSvdConfig, "fit_svd", path)
    return out


@pytest.mark.parametrize(
    ("name", "recipe"), [("kdep-paper.yaml", "paper"), ("kdep-reference.yaml", "kdep-reference")]
)
def test_the_kdep_presets_are_the_paper_recipe(name, recipe):
    m = _load(name)
    c, f, t = m["cache"], m["fit"], m["train"]
    assert (c.teacher, c.weights, c.taps, c.recipe, c.resolution) == (
        ("resnet50",),
        ("IMAGENET1K_V2",),
        ("pre_relu",),
        recipe,
        224,
    )
    assert f.cache == c.out and t.cache == c.out and t.projection == (f.out,)
    assert (f.tap, f.method, f.transform, f.pts_t, f.pts_n, f.dim) == (
        "pre_relu",
        "svd",
        "pts",
        0.1,
        3.0,
        512,
    )
    assert (t.loss, t.loss_weight, t.tap, t.student_tap, t.student) == (
        "kdep",
        20.0,
        "pre_relu",
        "pre_relu",
        ("resnet18",),
    )
    assert (t.epochs, t.batch_size, t.lr, t.weight_decay, t.lr_schedule, t.data_fraction) == (
        90,
        512,
        0.3,
        5e-4,
        "step",
        0.1,
    )


def test_the_coss_preset_is_the_reference_set_up():
    m = _load("coss.yaml")
    c, t = m["cache"], m["train"]
    assert (c.taps, c.recipe, c.center_view, c.center_recipe) == (("post_relu",), "coss", True, "center-coss")
    assert t.cache == c.out and (t.epochs, t.loss, t.projection) == (25, "coss", ())
    assert (t.coss_l0, t.coss_l1, t.coss_tau_t, t.coss_tau_s) == (1.0, 1.0, 0.07, 0.1)
    views = {"recipe": c.recipe, "center_first": c.center_view, "center_recipe": c.center_recipe}
    assert train_student.coss_differences(t, views) == []
    assert t.lr_schedule == train_student.COSS_REFERENCE["lr_schedule"] == "cosine-coss"


def test_a_coss_run_off_the_reference_says_what_differs_once(monkeypatch, capsys):
    config = TrainStudentConfig(cache="c", out="o", loss="coss", student=("resnet18",))
    views = {"recipe": "paper", "center_first": False, "center_recipe": None}
    diffs = train_student.coss_differences(config, views)
    assert (
        "tap pre_relu (post_relu)" in diffs
        and "neighbours 0 (15)" in diffs
        and "lr_schedule step (cosine-coss)" in diffs
    )
    assert "cache recipe paper (coss)" in diffs and "cache center_first False (True)" in diffs
    import pipeline.cache.store as store

    monkeypatch.setattr(store, "open_store", lambda path: SimpleNamespace(provenance={"views": views}))
    train_student.warn_if_not_coss_reference(config)
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "differs from CoSS's reference set-up" in err and "neighbours 0 (15)" in err
    )
    train_student.warn_if_not_coss_reference(
        TrainStudentConfig(cache="c", out="o", projection=("p",))
    )  # kdep: silent
    assert capsys.readouterr().err == ""


def test_the_cosine_schedule_per_epoch():
    assert [lr_at(e, 4, 0.03, "cosine") for e in range(4)] == pytest.approx(
        [0.03 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    )
    assert lr_at(0, 4, 0.03, "cosine") == 0.03 and lr_at(2, 4, 0.03, "cosine") == pytest.approx(0.015)
    assert [lr_at(e, 90, 0.3) for e in (0, 29, 30, 59, 60, 89)] == pytest.approx(
        [0.3, 0.3, 0.03, 0.03, 0.003, 0.003]
    )


def _coss_reference_lr(epoch: int, epochs: int, lr: float) -> float:
    """coss-pytorch tools/utils.py ``adjust_learning_rate`` with the values train_sampled_coss.py sets (lr_mult 1,
    warmup_epochs 5) and ``--cos``, transcribed."""
    lr_mult, warmup_epochs = 1.0, 5
    out = lr * lr_mult
    if epoch < warmup_epochs:
        out = lr + (lr * lr_mult - lr) / warmup_epochs * epoch
    else:
        out *= 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return out


@pytest.mark.parametrize("epochs", [25, 8, 3])
def test_the_coss_reference_schedule_is_flat_for_5_epochs_then_cosine(epochs):
    ours = [lr_at(e, epochs, 0.03, "cosine-coss") for e in range(epochs)]
    assert ours == pytest.approx([_coss_reference_lr(e, epochs, 0.03) for e in range(epochs)], abs=1e-15)
    plain = [lr_at(e, epochs, 0.03, "cosine") for e in range(epochs)]
    assert ours[5:] == plain[5:] and ours[: min(5, epochs)] == [0.03] * min(5, epochs)
    if epochs == 25:  # what plain cosine loses before epoch 5: up to 6.2%
        assert 1 - plain[4] / ours[4] == pytest.approx(0.0618, abs=5e-4)


def test_the_dinov2_manifest_resolves():
    path = MANIFESTS / "dinov2-vitb14-r18.yaml"
    c = resolve_config(CacheTeacherConfig, "cache_teacher", path)
    f = resolve_config(FitSvdConfig, "fit_svd", path)
    t = resolve_config(TrainStudentConfig, "train_student", path)
    assert (c.teacher, c.weights, c.taps, c.resolution) == (
        ("timm:vit_base_patch14_dinov2.lvd142m",),
        ("pretrained",),
        ("pooled",),
        224,
    )
    assert (
        f.cache == c.out == t.cache
        and t.projection == (f.out,)
        and (f.tap, t.tap, f.dim) == ("pooled", "pooled", 512)
    )


def test_the_two_teacher_manifest_resolves():
    path = MANIFESTS / "two-teachers-r18.yaml"
    c = resolve_config(CacheTeacherConfig, "cache_teacher", path)
    f = resolve_config(FitSvdConfig, "fit_svd", path)
    t = resolve_config(TrainStudentConfig, "train_student", path)
    assert c.teacher == ("cnn=resnet50", "dino=timm:vit_base_patch14_dinov2.lvd142m")
    assert c.taps == ("cnn/pre_relu", "dino/pooled") and c.weights == ("IMAGENET1K_V2", "pretrained")
    assert f.cache == c.out == t.cache and f.tap == "cnn/pre_relu"
    assert t.target_pairs == (("pre_relu", "cnn/pre_relu"), ("pre_relu", "dino/pooled"))
    assert t.projection_paths[0][0] == f.out and t.projection_paths[0][1].endswith("dino-svd512-pts.npz")
