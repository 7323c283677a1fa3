"""The world-size matrix: every stage and stage-3 mode at world 1 (in this process) and world 2 (torchrun, two gloo
ranks on the CPU), and on 2 nodes x 1 rank (two torchrun launchers, c10d rendezvous on 127.0.0.1; `slow`).

Each run must finish and keep the world-1 guarantees, checked on its outputs:
- stage 1: the store is byte-identical to the world-1 store (one teacher; two teachers at their own sides);
- stage 3: every epoch delivered every scheduled (image, view) exactly once over all ranks and workers (the run's
  own order-free fingerprint of the ids it received, against the schedule's: ``coverage`` "exact" in
  metrics.jsonl; neighbour batches, which sample anchors, are "n/a" and must count their batches), finite losses, a
  strict export of every student, the world size recorded in provenance.json, and the parameters that no target
  reaches frozen and listed (the ones DDP would otherwise fail on at the second step);
- kill and resume: a run resumed from the checkpoint a killed run leaves ends with the uninterrupted run's weights;
- `search-process` (and `eval`) on several ranks: refused in one line before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import store_bytes
from world import run_kdep

from pipeline.models import build_for_resolution, parse_model_name
from pipeline.process.artefact import load_process, searched_rows
from stages.cache_teacher import CacheTeacherConfig
from stages.cache_teacher import run as cache_run
from stages.fit_svd import FitSvdConfig
from stages.fit_svd import run as fit_run
from stages.search_process import SearchProcessConfig
from stages.search_process import run as search_run

timm = pytest.importorskip("timm")

WORLDS = [1, 2]
NODES = pytest.param("2 nodes", marks=pytest.mark.slow)
IMAGES = 24  # the demo fixture's train split: 3 shards of 8 (uneven over 2 ranks: 2 shards and 1)
COMMON = (
    "--epochs",
    "2",
    "--batch-size",
    "4",
    "--workers",
    "1",
    "--device",
    "cpu",
    "--quiet",
    "--lr",
    "0.05",
)


@pytest.fixture(scope="module")
def m(demo_shards, tmp_path_factory) -> dict:
    """A ResNet-18 cache (32 px, centre view + 2 training views, every tap), its projections, a searched DistPro
    process, and a two-teacher cache (ResNet-18 at 32 px + ViT-Ti at 48 px, float16)."""
    d = tmp_path_factory.mktemp("matrix")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), d / "r18.pt")
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=48).state_dict(), d / "vit.pt")
    shards = str(demo_shards["train"])
    base = dict(shards=shards, views=3, batch_size=12, workers=0, device="cpu", quiet=True)
    cache_run(CacheTeacherConfig(out=str(d / "cache"), teacher="resnet18", weights=str(d / "r18.pt"), resolution=32,
                                 center_view=True, taps=("pre_relu", "post_relu", "stage2", "stage3", "stage4"),
                                 **base))  # fmt: skip
    fits = {"p512": ("pre_relu", 512), "p1280": ("post_relu", 512), "s2": ("stage2", 128), "s3": ("stage3", 256),
            "s3vit": ("stage3", 192), "s4mnv2": ("stage4", 160)}  # fmt: skip
    for name, (tap, dim) in fits.items():
        fit_run(
            FitSvdConfig(cache=str(d / "cache"), out=str(d / f"{name}.npz"), tap=tap, dim=dim, quiet=True)
        )
    cache_run(CacheTeacherConfig(out=str(d / "two"), teacher=("cnn=resnet18", "vit=timm:vit_tiny_patch16_224"),
                                 weights=(str(d / "r18.pt"), str(d / "vit.pt")), teacher_resolution=(32, 48),
                                 taps=("cnn/pre_relu", "vit/pooled"), **base))  # fmt: skip
    fit_run(
        FitSvdConfig(
            cache=str(d / "two"), out=str(d / "two-cnn.npz"), tap="cnn/pre_relu", dim=512, quiet=True
        )
    )
    fit_run(
        FitSvdConfig(cache=str(d / "two"), out=str(d / "two-vit.npz"), tap="vit/pooled", dim=128, quiet=True)
    )
    # a short search; the threshold drops its 4 weakest pathways (kept: any step above it)
    staged = d / "stages"
    cache_run(CacheTeacherConfig(out=str(staged), teacher="resnet18", weights=str(d / "r18.pt"), resolution=32,
                                 taps=("stage1", "stage2", "stage3", "stage4"), **base))  # fmt: skip
    process = search_run(SearchProcessConfig(cache=str(staged), out=str(d / "process"), student="resnet18", epochs=1,
                                             batch_size=6, hidden=16, val_fraction=0.3, workers=0, device="cpu",
                                             quiet=True)).path  # fmt: skip
    threshold = float(np.sort(searched_rows(load_process(process)).max(axis=0))[4])
    return {
        "dir": d,
        "shards": shards,
        "process": str(process),
        "threshold": threshold,
        "staged": str(staged),
    }


def stage3_rows(m: dict) -> dict[str, tuple[tuple[str, ...], dict]]:
    """Row -> (train-student arguments, what to expect: students, a parameter-name prefix each must have frozen)."""
    d = m["dir"]
    cache, two = ("--cache", str(d / "cache")), ("--cache", str(d / "two"))
    p = {name: str(d / f"{name}.npz") for name in ("p512", "p1280", "s2", "s3", "s3vit", "s4mnv2")}
    return {
        "kdep": ((*cache, "--student", "resnet18", "--projection", p["p512"]), {"frozen": {"resnet18": None}}),
        "coss, neighbour batches": ((*cache, "--student", "resnet18", "--loss", "coss", "--tap", "post_relu",
                                     "--student-tap", "post_relu", "--neighbours", "3", "--neighbour-pool", "5",
                                     "--anchors", "1"), {"neighbours": True}),
        "stage-tap targets": ((*cache, "--student", "resnet18", "--targets", "stage2=stage2", "--targets",
                               "stage3=stage3", "--projection", f"{p['s2']},{p['s3']}"),
                              {"frozen": {"resnet18": "backbone.layer4."}}),
        "distpro, pathways dropped": (("--cache", m["staged"], "--student", "resnet18", "--loss", "distpro",
                                       "--process", m["process"], "--alpha-threshold", str(m["threshold"])), {}),
        "timm MobileNetV2 on stage4": ((*cache, "--student", "timm:mobilenetv2_050", "--targets", "stage4=stage4",
                                        "--projection", p["s4mnv2"]),
                                       {"frozen": {"timm:mobilenetv2_050": "backbone.conv_head."}}),
        "ViT student on stage3": ((*cache, "--student", "timm:vit_tiny_patch16_224", "--targets", "stage3=stage3",
                                   "--projection", p["s3vit"]),
                                  {"frozen": {"timm:vit_tiny_patch16_224": "backbone.blocks.11."}}),
        "several students": ((*cache, "--student", "resnet18", "--student", "mobilenet_v2", "--tap", "post_relu",
                              "--student-tap", "post_relu", "--loss", "coss", "--lr", "0.01"), {}),
        "online teacher": ((*cache, "--student", "resnet18", "--projection", p["p512"], "--online-teacher",
                            "--resolution", "40"), {}),
        "online teacher, fresh views": ((*cache, "--student", "resnet18", "--projection", p["p512"], "--online-teacher",
                                         "--fresh-views"), {}),
        "online teacher, two teachers": ((*two, "--student", "resnet18", "--targets", "pre_relu=cnn/pre_relu",
                                          "--targets", "stage2=vit/pooled", "--projection",
                                          f"{d / 'two-cnn.npz'},{d / 'two-vit.npz'}", "--online-teacher"), {}),
    }  # fmt: skip


ROWS = list(stage3_rows({"dir": Path("."), "process": "", "threshold": 0.0, "staged": ""}))


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def assert_strict_export(arch: str, path: Path) -> None:
    """The exported backbone loads strictly into a fresh model of its library, classifier removed."""
    library, name = parse_model_name(arch)
    state = torch.load(path)
    if library == "timm":
        model, _ = build_for_resolution(arch, None, 32)  # its export loads at any input side it was built for
        model.reset_classifier(0)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and not [k for k in missing if "pos_embed" not in k], (missing, unexpected)
        return
    model = torchvision.models.get_model(name)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and {k.split(".")[0] for k in missing} <= {"fc", "classifier"}, (
        missing,
        unexpected,
    )


def check_stage3(out: Path, world: int | str, expect: dict, epochs: int = 2) -> None:
    done = json.loads((out / "done.json").read_text())
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["run"]["world_size"] == (2 if world == "2 nodes" else world)
    records = [r for r in _records(out) if r["kind"] == "epoch"]
    assert sorted({r["epoch"] for r in records}) == list(range(epochs))
    for r in records:
        assert np.isfinite(r["loss"]), r
        if expect.get("neighbours"):
            assert r["coverage"] == "n/a" and r["images"] > 0, r
        else:
            assert r["coverage"] == "exact" and r["images"] == IMAGES, r
    for name, student in done["students"].items():
        arch = next(a for a in prov["config"]["student"] if name.startswith(a))
        assert_strict_export(arch, Path(student["backbone"]))
    for name, prefix in expect.get("frozen", {}).items():  # prefix None: nothing may be frozen
        frozen = prov["frozen_parameters"][name]
        assert any(n.startswith(prefix) for n in frozen) if prefix else not frozen, (name, frozen)


@pytest.mark.parametrize("world", [*WORLDS, NODES])
@pytest.mark.parametrize("row", ROWS)
def test_stage3_row(m, row, world, tmp_path):
    args, expect = stage3_rows(m)[row]
    out = tmp_path / "run"
    result = run_kdep(world, "train-student", *COMMON, *args, "--out", str(out))  # a row's flags win
    assert result.code == 0, result.output[-4000:]
    assert "Warning" not in result.output, result.output[
        -4000:
    ]  # no warning from our own calls in a clean run
    check_stage3(out, world, expect)


@pytest.mark.parametrize("world", [*WORLDS, NODES])
def test_kill_and_resume(m, world, tmp_path):
    """A killed run leaves its newest checkpoints; resumed (rank 0 picks the checkpoint, every rank loads it), it
    ends with the uninterrupted run's weights, bit for bit."""
    d, out = m["dir"], tmp_path / "run"
    args = ("train-student", "--cache", str(d / "cache"), "--student", "resnet18", "--projection",
            str(d / "p512.npz"), *COMMON, "--epochs", "3", "--out", str(out))  # fmt: skip
    assert (r := run_kdep(world, *args)).code == 0, r.output[-4000:]
    straight = torch.load(out / "backbone-resnet18.pt")
    for name in ("done.json", "backbone-resnet18.pt", "checkpoints/epoch-0002.pt"):
        (out / name).unlink()  # what a kill during epoch 3's checkpoint leaves: epochs 1 and 2's checkpoints
    result = run_kdep(world, *args[:-2], "--no-quiet", "--out", str(out))
    assert result.code == 0, result.output[-4000:]
    assert "resuming" in result.output and "after epoch 2" in result.output
    resumed = torch.load(out / "backbone-resnet18.pt")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    check_stage3(out, world, {}, epochs=3)


@pytest.mark.parametrize("world", [2, NODES])
@pytest.mark.parametrize("teachers", ["one teacher", "two teachers"])
def test_stage1_store_is_byte_identical_at_any_world_size(m, teachers, world, tmp_path):
    d = m["dir"]
    args = ("--shards", m["shards"], "--views", "3", "--batch-size", "12", "--workers", "0", "--device", "cpu",
            "--quiet")  # fmt: skip
    if teachers == "one teacher":
        args += ("--teacher", "resnet18", "--weights", str(d / "r18.pt"), "--resolution", "32", "--center-view",
                 "--tap", "pre_relu", "--tap", "post_relu", "--tap", "stage2", "--tap", "stage3", "--tap", "stage4")  # fmt: skip
        reference = d / "cache"
    else:
        args += ("--teacher", "cnn=resnet18", "--teacher", "vit=timm:vit_tiny_patch16_224", "--weights",
                 str(d / "r18.pt"), "--weights", str(d / "vit.pt"), "--teacher-resolution", "32",
                 "--teacher-resolution", "48", "--tap", "cnn/pre_relu", "--tap", "vit/pooled")  # fmt: skip
        reference = d / "two"
    result = run_kdep(world, "cache-teacher", *args, "--out", str(tmp_path / "c"))
    assert result.code == 0, result.output[-4000:]
    assert store_bytes(tmp_path / "c") == store_bytes(reference)


@pytest.mark.parametrize("world", [2])
def test_search_process_is_refused_on_several_ranks_in_one_line(m, world, tmp_path):
    out = tmp_path / "process"
    result = run_kdep(world, "search-process", "--cache", m["staged"], "--out", str(out), "--device", "cpu",
                      "--quiet")  # fmt: skip
    assert result.code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == ["error: kdep search-process runs in one process, not on 2 ranks; run it without torchrun "
                      "(one device: --device cuda); the search is short, and train-student then runs the process "
                      "on every rank"] * 2  # fmt: skip
    assert not out.exists()


def test_eval_is_refused_on_several_ranks_in_one_line(m, demo_shards, tmp_path):
    out = tmp_path / "eval"
    result = run_kdep(2, "eval", "--train", str(demo_shards["train"]), "--val", str(demo_shards["val"]), "--out",
                      str(out), "--backbone", "r=resnet18:random", "--resolution", "32")  # fmt: skip
    assert result.code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == ["error: kdep eval runs in one process, not on 2 ranks; run it without torchrun (it uses one "
                      "device: --device cuda)"] * 2  # fmt: skip
    assert not out.exists()


def test_an_error_on_one_rank_ends_both_ranks_within_a_minute_naming_the_shard(m, tmp_path):
    """A source shard that only rank 1 reads is changed after caching (same size, no index, so only the join can
    see it): rank 1 fails in the middle of epoch 1 while rank 0 waits in DDP's all-reduce; both exit non-zero with
    the line naming the shard and key, within a minute (not after the collective timeout)."""
    import shutil

    from pipeline.data.shards import iter_samples
    from pipeline.student.pairs import consumer_plan, shard_order

    bad = tmp_path / "shards"
    shutil.copytree(m["shards"], bad)
    (bad / "index.json").unlink()
    paths = sorted(bad.glob("*.tar"))
    rank1_shard = consumer_plan(shard_order(0, 0, len(paths)), 1, 2)[0][0]  # rank 1, worker 0, epoch 0
    path = paths[rank1_shard]
    sample = next(iter(iter_samples(path)))
    data = bytearray(path.read_bytes())
    start = sample.offset + 512 + 100  # inside the first image's bytes: same size, another image
    data[start : start + 64] = bytes(b ^ 0xFF for b in data[start : start + 64])
    path.write_bytes(bytes(data))
    result = run_kdep(2, "train-student", "--cache", str(m["dir"] / "cache"), "--shards", str(bad), "--student",
                      "resnet18", "--projection", str(m["dir"] / "p512.npz"), *COMMON, "--out", str(tmp_path / "r"),
                      env={"KDEP_DIST_TIMEOUT_S": "600"})  # fmt: skip
    assert result.code != 0 and result.seconds < 60, (result.seconds, result.output[-3000:])
    message = (
        f"{path} key {sample.key!r}: image differs from the cached one (hash or size); re-run cache-teacher"
    )
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert sorted(errors) == sorted([f"error: {message} on these shards",
                                     f"error: rank 1 failed: {message} on these shards"]), result.output[-3000:]  # fmt: skip
