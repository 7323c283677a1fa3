"""KDEP's loss weight w against the KDEP supplement's Table S.3: auto (0) picks 20 for a standard supervised
ResNet-50 teacher (torchvision IMAGENET1K_V1/V2 and timm's copies), 1 for SWSL, 3 for Swin-B and, with a one-line
note, for teachers the table does not list; a given value is kept; teachers with different values are refused;
the reference manifests use the table's value for their teacher; a run records the value it used and its rule in
provenance.json, and a resume compares the value, not how it was chosen."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.manifest import ConfigError, resolve_config
from pipeline.student.loss_weight import DEFAULT_WEIGHT, resolve_loss_weight, table_row
from stages import train_student
from stages.config import CacheTeacherConfig, TrainStudentConfig
from stages.train_student import TargetSpec

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"


def _record(kind: str, name: str, arch: str = "resnet50", label: str = "") -> dict:
    return {"arch": arch, "weights": {"kind": kind, "name": name}, "label": label}


@pytest.mark.parametrize(
    ("kind", "name", "row", "w"),
    [
        ("torchvision", "ResNet50_Weights.IMAGENET1K_V1", "standard SP R50", 20.0),
        ("torchvision", "ResNet50_Weights.IMAGENET1K_V2", "standard SP R50", 20.0),
        ("timm", "resnet50.tv2_in1k", "standard SP R50", 20.0),
        ("timm", "resnet50.fb_swsl_ig1b_ft_in1k", "SWSL R50", 1.0),
        ("timm", "swin_base_patch4_window7_224.ms_in22k_ft_in1k", "Swin-B", 3.0),
    ],
)
def test_auto_takes_the_table_s3_value_of_the_teacher(kind, name, row, w):
    record = _record(kind, name)
    assert table_row(record) == row
    chosen = resolve_loss_weight(0.0, [record])
    assert chosen.value == w and chosen.note == ""
    assert chosen.rule == f"auto: resnet50 ({kind} {name}) is Table S.3's {row} -> w = {w:g}"


@pytest.mark.parametrize(
    "record",
    [
        _record("file", "teacher-r18.pt", arch="resnet18"),
        _record("random", "random-init"),
        _record("torchvision", "ResNet101_Weights.IMAGENET1K_V2", arch="resnet101"),  # supervised, not an R50
        _record("timm", "resnet50.a1_in1k"),  # timm's own recipe: not the standard SP R50 of the table
    ],
)
def test_a_teacher_the_table_does_not_list_gets_3_and_a_note(record):
    chosen = resolve_loss_weight(0.0, [record])
    assert chosen.value == DEFAULT_WEIGHT == 3.0
    assert "is not in Table S.3 -> w = 3 (default)" in chosen.rule
    assert chosen.note.count("\n") == 0 and "not in the KDEP supplement's Table S.3" in chosen.note
    assert "--loss-weight" in chosen.note


def test_a_given_weight_is_kept_and_different_teachers_need_one():
    standard = _record("torchvision", "ResNet50_Weights.IMAGENET1K_V2", label="cnn")
    dino = _record(
        "timm", "vit_base_patch14_dinov2.lvd142m", arch="timm:vit_base_patch14_dinov2", label="dino"
    )
    assert (
        resolve_loss_weight(3.0, [standard]).value == 3.0
        and resolve_loss_weight(3.0, [standard]).rule == "given"
    )
    assert resolve_loss_weight(20.0, [standard, dino]).value == 20.0
    with pytest.raises(
        ConfigError, match=r"cnn=resnet50 .*: 20, dino=timm:vit_base_patch14_dinov2 .*: 3\); set "
    ):
        resolve_loss_weight(0.0, [standard, dino])
    with pytest.raises(ConfigError, match="loss_weight"):
        TrainStudentConfig(cache="c", out="o", projection=("p",), loss_weight=-1.0)


def test_the_stage_takes_the_teachers_of_its_targets_from_the_cache(monkeypatch, capsys):
    import pipeline.cache.store as store

    provenance = {
        "teachers": [
            {**_record("torchvision", "ResNet50_Weights.IMAGENET1K_V2", label="cnn"), "taps": ["pre_relu"]},
            {**_record("file", "moco.pt", label="ssl"), "taps": ["post_relu"]},
        ]
    }
    monkeypatch.setattr(store, "open_store", lambda path: SimpleNamespace(provenance=provenance))
    config = TrainStudentConfig(cache="c", out="o", projection=("p",))
    chosen = train_student.choose_loss_weight(config, (TargetSpec("pre_relu", "cnn/pre_relu"),))
    assert chosen.value == 20.0 and capsys.readouterr().err == ""
    chosen = train_student.choose_loss_weight(config, (TargetSpec("post_relu", "ssl/post_relu"),))
    assert chosen.value == 3.0 and "ssl=resnet50 (file moco.pt) is not in" in capsys.readouterr().err
    coss = TrainStudentConfig(cache="c", out="o", loss="coss")  # coss ignores w: no note
    assert train_student.choose_loss_weight(coss, (TargetSpec("post_relu", "ssl/post_relu"),)).value == 3.0
    assert capsys.readouterr().err == ""
    with pytest.raises(ConfigError, match="different Table S.3 weights"):
        train_student.choose_loss_weight(
            config, (TargetSpec("pre_relu", "cnn/pre_relu"), TargetSpec("post_relu", "ssl/post_relu"))
        )


@pytest.mark.parametrize("name", ["imagenet10p-r50.yaml", "kdep-paper.yaml", "kdep-reference.yaml"])
def test_the_imagenet_manifests_use_20_for_their_standard_supervised_resnet50(name):
    cache = resolve_config(CacheTeacherConfig, "cache_teacher", MANIFESTS / name)
    train = resolve_config(TrainStudentConfig, "train_student", MANIFESTS / name)
    assert (cache.teacher, cache.weights) == (("resnet50",), ("IMAGENET1K_V2",))
    record = _record("torchvision", f"ResNet50_Weights.{cache.weights[0]}")
    assert train.loss_weight == resolve_loss_weight(0.0, [record]).value == 20.0


def test_a_run_records_the_weight_it_used_and_resumes_on_the_value(demo_shards, tmp_path, capsys):
    import torch
    import torchvision

    from stages.cache_teacher import run as cache_run
    from stages.fit_svd import FitSvdConfig
    from stages.fit_svd import run as fit_run

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), tmp_path / "teacher.pt")
    cache_run(CacheTeacherConfig(shards=str(demo_shards["train"]), out=str(tmp_path / "cache"), teacher="resnet18",
                                 weights=str(tmp_path / "teacher.pt"), views=1, resolution=32, batch_size=6,
                                 workers=0, device="cpu", quiet=True))  # fmt: skip
    fit_run(FitSvdConfig(cache=str(tmp_path / "cache"), out=str(tmp_path / "proj.npz"), dim=512, quiet=True))

    def config(out: str, **kw) -> TrainStudentConfig:
        base = dict(cache=str(tmp_path / "cache"), projection=(str(tmp_path / "proj.npz"),), student=("resnet18",),
                    out=str(tmp_path / out), epochs=1, max_steps=2, batch_size=8, workers=0, device="cpu",
                    quiet=True, lr=0.05)  # fmt: skip
        return TrainStudentConfig(**{**base, **kw})

    auto = train_student.run(config("auto"))
    assert "resnet18 (file teacher.pt) is not in the KDEP supplement's Table S.3" in capsys.readouterr().err
    given = train_student.run(config("given", loss_weight=3.0))
    assert capsys.readouterr().err == ""
    assert auto["students"]["resnet18"]["loss"] == given["students"]["resnet18"]["loss"]  # the same w = 3
    recorded = json.loads((tmp_path / "auto" / "provenance.json").read_text())["config"]
    assert recorded["loss_weight"] == 3.0 and recorded["loss_weight_rule"].startswith("auto: resnet18 (file")
    assert (
        json.loads((tmp_path / "given" / "provenance.json").read_text())["config"]["loss_weight_rule"]
        == "given"
    )
    train_student.run(config("auto", loss_weight=3.0))  # the same value: the finished run is taken as it is
    with pytest.raises(Exception, match="loss_weight"):
        train_student.run(config("auto", loss_weight=20.0))
