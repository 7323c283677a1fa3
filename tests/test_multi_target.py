"""Several distillation targets per student (multi-layer KD): a run with ``targets=()`` equals the same run naming its
one target; two targets' loss equals w_1 * loss_1 + w_2 * loss_2 computed by hand from the student's taps and the
projected rows read with ``store.read_rows``; the stream and the neighbour dataset carry each tap's rows (compared
with ``store.read_rows``); the online teacher's two taps equal the cached rows to float16 rounding; mismatched
counts, unknown taps, projections fitted on another tap or width, and a resume with changed targets are refused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.data import DataLoader

from pipeline.cache.store import StoreError, open_store
from pipeline.data.shards import list_shards
from pipeline.manifest import ConfigError, resolve_config
from pipeline.models import ModelError
from pipeline.projection.artefact import load_projection
from pipeline.provenance import ProvenanceError
from pipeline.student.neighbours import RandomAccessPairs
from pipeline.student.online import build_online_teacher
from pipeline.student.pairs import PairStream, StreamSpec
from pipeline.student.specs import LossSpec, TargetSpec
from pipeline.student.training import StepContext, Student, teacher_rows, train_step
from stages.cache_teacher import CacheTeacherConfig
from stages.cache_teacher import run as cache_run
from stages.fit_svd import FitSvdConfig
from stages.fit_svd import run as fit_run
from stages.train_student import TrainStudentConfig
from stages.train_student import run as train_run

TAPS = ("pre_relu", "stage2", "stage3")
WIDTH = {"pre_relu": 512, "stage2": 128, "stage3": 256}  # ResNet-18's pooled widths


@pytest.fixture(scope="module")
def staged(demo_shards, tmp_path_factory) -> dict:
    """A random-init ResNet-18 teacher cached with pre_relu, stage2 and stage3 (3 views, 32 px) and one SVD + PTS
    projection per tap to the student's width at that tap."""
    d = tmp_path_factory.mktemp("multi")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), d / "teacher.pt")
    cache_run(CacheTeacherConfig(shards=str(demo_shards["train"]), out=str(d / "cache"), teacher="resnet18",
                                 weights=str(d / "teacher.pt"), taps=TAPS, views=3, resolution=32, batch_size=6,
                                 workers=0, device="cpu", quiet=True))  # fmt: skip
    proj = {}
    for tap in TAPS:
        proj[tap] = d / f"proj-{tap}.npz"
        fit_run(FitSvdConfig(cache=str(d / "cache"), out=str(proj[tap]), tap=tap, dim=WIDTH[tap], quiet=True))
    return {"dir": d, "cache": d / "cache", "proj": proj, "shards": demo_shards["train"]}


def _config(staged, out, targets=("stage2=stage2", "pre_relu=pre_relu"), **kw) -> TrainStudentConfig:
    taps = [t.rpartition("=")[2] for t in targets]
    base = dict(cache=str(staged["cache"]), student=("resnet18",), out=str(out), epochs=1, batch_size=8,
                workers=0, device="cpu", quiet=True, shuffle_buffer=4, lr=0.05, log_every=1, targets=targets,
                projection=(",".join(str(staged["proj"].get(t, staged["proj"]["stage2"])) for t in taps),))  # fmt: skip
    base.update(kw)
    return TrainStudentConfig(**base)


def _backbone(result: dict) -> dict:
    return torch.load(next(iter(result["students"].values()))["backbone"])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_naming_the_one_target_changes_nothing(staged, tmp_path):
    """``targets=()`` (student_tap=tap) and ``targets=("pre_relu=pre_relu",)`` with weight 1: the same steps, the
    same losses and the same weights, bit for bit."""
    proj = (str(staged["proj"]["pre_relu"]),)
    plain = train_run(_config(staged, tmp_path / "plain", targets=(), projection=proj))
    named = train_run(
        _config(
            staged, tmp_path / "named", targets=("pre_relu=pre_relu",), target_weights=(1.0,), projection=proj
        )
    )
    a, b = _backbone(plain), _backbone(named)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in _metrics(tmp_path / name)] for name in ("plain", "named")]
    assert losses[0] == losses[1] and len(losses[0]) >= 3
    assert all(
        k in ("mse",) or not k.startswith(("loss/", "mse/")) for r in _metrics(tmp_path / "plain") for k in r
    )


def _batch(staged, taps: tuple[str, ...]):
    paths = tuple(s.path for s in list_shards(staged["shards"]))
    spec = StreamSpec(store=str(staged["cache"]), shard_paths=paths, tap=taps[0], resolution=32, seed=0,
                      shuffle_buffer=0, taps=taps)  # fmt: skip
    return next(iter(DataLoader(PairStream(spec), batch_size=8)))


def _read_rows(store, ids: torch.Tensor, tap: str) -> torch.Tensor:
    return torch.from_numpy(
        np.stack([store.read_rows(int(s), [int(r)], int(v), tap)[0] for s, r, v in ids.tolist()])
    )


def test_the_stream_and_the_neighbour_dataset_carry_each_taps_rows(staged):
    store = open_store(staged["cache"])
    taps = ("stage3", "pre_relu", "stage2")
    x, rows, ids = _batch(staged, taps)
    assert rows.dtype == torch.float16 and rows.shape == (8, 256 + 512 + 128)
    assert torch.equal(rows, torch.cat([_read_rows(store, ids, t) for t in taps], dim=1))
    ctx = StepContext(torch.device("cpu"), "off", LossSpec("kdep"), tap="stage3",
                      targets=tuple(TargetSpec(t, t) for t in taps), widths=(256, 512, 128))  # fmt: skip
    split = teacher_rows(rows, x, ctx)
    for tap in taps:
        assert torch.equal(split[tap], _read_rows(store, ids, tap).float())
    paths = tuple(s.path for s in list_shards(staged["shards"]))
    valid = np.flatnonzero(store.valid())
    ds = RandomAccessPairs(str(staged["cache"]), paths, valid, "stage3", 32, seed=0, taps=taps)
    items = ds.__getitems__([0, 5, 17])
    got = torch.stack([item[1] for item in items])
    want = torch.cat([_read_rows(store, torch.stack([item[2] for item in items]), t) for t in taps], dim=1)
    assert torch.equal(got, want)


def test_two_targets_loss_is_the_weighted_sum_of_each_targets_loss_by_hand(staged):
    store = open_store(staged["cache"])
    targets = (TargetSpec("stage2", "stage2", 0.5), TargetSpec("pre_relu", "pre_relu", 2.0))
    taps = ("stage2", "pre_relu")
    x, rows, ids = _batch(staged, taps)
    torch.manual_seed(3)
    student = Student("resnet18", taps, "kdep", (128, 512), 32)
    ctx = StepContext(torch.device("cpu"), "off", LossSpec("kdep", 3.0), tap="stage2", targets=targets,
                      widths=(128, 512))  # fmt: skip
    projections = [load_projection(staged["proj"][t]) for t in taps]
    with torch.no_grad():
        feats = student.taps(x)  # train mode, as the step: batch statistics
    by_hand = {}
    for t, proj in zip(taps, projections, strict=True):
        target = proj.targets(_read_rows(store, ids, t).float())
        by_hand[t] = 3.0 * torch.mean((feats[t] - target) ** 2).item()
    raw = teacher_rows(rows, x, ctx)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    loss, parts = train_step(
        student, opt, x, [p.targets(raw[t]) for p, t in zip(projections, taps, strict=True)], ctx
    )
    assert parts["loss/stage2=stage2"] == pytest.approx(by_hand["stage2"], rel=1e-5)
    assert parts["loss/pre_relu=pre_relu"] == pytest.approx(by_hand["pre_relu"], rel=1e-5)
    assert loss == pytest.approx(0.5 * by_hand["stage2"] + 2.0 * by_hand["pre_relu"], rel=1e-5)
    assert parts["mse/stage2=stage2"] == pytest.approx(by_hand["stage2"] / 3.0, rel=1e-5)


def test_online_teacher_with_two_taps_gives_the_cached_rows_to_float16_rounding(staged):
    taps = ("stage2", "pre_relu")
    x, rows, _ids = _batch(staged, taps)
    store = open_store(staged["cache"])
    targets = (TargetSpec("stage2", "stage2"), TargetSpec("pre_relu", "pre_relu"))
    cached = StepContext(torch.device("cpu"), "off", LossSpec("kdep"), tap="stage2", targets=targets,
                         widths=(128, 512))  # fmt: skip
    live = StepContext(torch.device("cpu"), "off", LossSpec("kdep"), tap="stage2", targets=targets,
                       teacher=build_online_teacher(store, taps, torch.device("cpu")))  # fmt: skip
    a, b = teacher_rows(rows, x, cached), teacher_rows(rows, x, live)
    for tap in taps:
        scale = a[tap].abs().max().item()
        assert torch.allclose(b[tap].half().float(), a[tap], rtol=2e-3, atol=2e-3 * scale), tap


def test_a_multi_layer_run_records_its_targets_and_refuses_changed_ones_on_resume(staged, tmp_path):
    out = tmp_path / "run"
    result = train_run(_config(staged, out, target_weights=(0.5, 1.0)))
    assert np.isfinite(result["students"]["resnet18"]["loss"])
    epoch = [r for r in _metrics(out) if r["kind"] == "epoch"][-1]
    step = [r for r in _metrics(out) if r["kind"] == "step"][0]
    assert {"loss/stage2=stage2", "loss/pre_relu=pre_relu"} <= set(epoch) and "mse/stage2=stage2" in step
    assert step["loss"] == pytest.approx(
        0.5 * step["loss/stage2=stage2"] + step["loss/pre_relu=pre_relu"], rel=1e-5
    )
    provenance = json.loads((out / "provenance.json").read_text())
    assert [t["name"] for t in provenance["targets"]] == ["stage2=stage2", "pre_relu=pre_relu"]
    assert [p["target"] for p in provenance["projections"]] == ["stage2=stage2", "pre_relu=pre_relu"]
    assert (out / "loss.png").is_file()
    state = torch.load(out / "backbone-resnet18.pt")
    model = torchvision.models.resnet18()
    del model.fc
    model.load_state_dict(state, strict=True)  # heads are not in the backbone
    with pytest.raises(ProvenanceError, match="targets"):
        train_run(_config(staged, out, epochs=2, target_weights=(0.5, 2.0)))
    with pytest.raises(ProvenanceError, match="targets"):
        train_run(_config(staged, out, epochs=2, targets=("stage3=stage3", "pre_relu=pre_relu")))


def test_mismatched_counts_unknown_taps_and_wrong_projections_are_refused(staged, tmp_path):
    with pytest.raises(ConfigError, match=r"key 'target_weights': 1 weight\(s\) for 2 target\(s\)"):
        _config(staged, tmp_path / "a", target_weights=(1.0,))
    with pytest.raises(ConfigError, match=r"key 'projection': .* names 1 projection\(s\) for 2 target\(s\)"):
        _config(staged, tmp_path / "a", projection=(str(staged["proj"]["stage2"]),))
    with pytest.raises(ConfigError, match="key 'targets': student tap 'stage9'"):
        _config(staged, tmp_path / "a", targets=("stage9=stage2", "pre_relu=pre_relu"))
    with pytest.raises(ConfigError, match="key 'targets': 'stage2' is not STUDENT_TAP=CACHE_TAP"):
        _config(staged, tmp_path / "a", targets=("stage2", "pre_relu=pre_relu"))
    with pytest.raises(ConfigError, match="keys 'tap'/'student_tap'"):
        _config(staged, tmp_path / "a", tap="stage2")
    with pytest.raises(ModelError, match="student resnet18: ResNet has no tap 'stage6'"):
        train_run(_config(staged, tmp_path / "b", targets=("stage6=stage2", "pre_relu=pre_relu")))
    with pytest.raises(StoreError, match="has no tap 'vit/pooled'"):
        train_run(_config(staged, tmp_path / "c", targets=("stage2=vit/pooled", "pre_relu=pre_relu")))
    wrong_tap = ",".join(str(staged["proj"][t]) for t in ("stage3", "pre_relu"))
    with pytest.raises(ProvenanceError, match=r"projection .*proj-stage3\.npz differs: tap"):
        train_run(_config(staged, tmp_path / "d", projection=(wrong_tap,)))
    with pytest.raises(
        ModelError, match=r"stage3 width is 256 but the projection gives 128; .*--tap stage2 --dim 256"
    ):
        train_run(_config(staged, tmp_path / "e", targets=("stage3=stage2", "pre_relu=pre_relu")))


def test_targets_weights_and_projection_lists_parse_from_flags_manifests_and_set(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text("train_student:\n  cache: c\n  out: o\n  targets: [stage2=stage2, pre_relu=pre_relu]\n"
                        "  target_weights: [0.5, 1]\n  projection: [a.npz,b.npz]\n")  # fmt: skip
    config = resolve_config(TrainStudentConfig, "train_student", manifest)
    assert config.target_pairs == (("stage2", "stage2"), ("pre_relu", "pre_relu"))
    assert config.weights == (0.5, 1.0) and config.projection_paths == (("a.npz", "b.npz"),)
    sets = [
        "train_student.targets=[stage3=r50/stage3, pre_relu=vit/pooled]",
        "train_student.target_weights=[]",
    ]
    config = resolve_config(TrainStudentConfig, "train_student", manifest, None, sets)
    assert config.target_pairs == (("stage3", "r50/stage3"), ("pre_relu", "vit/pooled"))
    assert config.weights == (1.0, 1.0)
    single = TrainStudentConfig(cache="c", out="o", projection=("p,q.npz",), tap="resnet50/pre_relu")
    assert single.target_pairs == (("pre_relu", "resnet50/pre_relu"),)
    assert single.projection_paths == (("p,q.npz",),)  # one target: the path as given
    two = TrainStudentConfig(cache="c", out="o", student=("resnet18", "resnet34"), projection=("a,b", "c,d"),
                             targets=("stage2=stage2", "pre_relu=pre_relu"))  # fmt: skip
    assert two.projection_paths == (("a", "b"), ("c", "d"))
    assert replace(two, projection=("a", "b", "c", "d")).projection_paths == two.projection_paths
    with pytest.raises(ConfigError, match=r"key 'projection': 3 given for 2 student\(s\)"):
        replace(two, projection=("a", "b", "c"))
