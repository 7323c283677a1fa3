"""Stage 1 against references: the online teacher on the replayed view equals the cached row; the store is the same
from 1 or 2 ranks and from an interrupted-then-resumed run; every bad input is named or counted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import store_bytes

from pipeline.cache.store import FeatureStore, open_store
from pipeline.cache.verify import verify_store
from pipeline.cache.workers import CacheError
from pipeline.data.images import decode_rgb, image_bytes
from pipeline.data.shards import ShardError, iter_samples, list_shards, write_index, write_shard
from pipeline.data.views import CENTER_BOX_RULES, replay_view, sample_views
from pipeline.models import FeatureTaps, ModelError
from pipeline.provenance import ProvenanceError, StoreLock
from pipeline.runtime import Dist
from stages.cache_teacher import CacheTeacherConfig, center_boxes, finish_run, run
from stages.inspect_cache import summarize


def _config(shards, out, weights, **kw) -> CacheTeacherConfig:
    base = dict(
        shards=str(shards),
        out=str(out),
        teacher="resnet18",
        weights=str(weights),
        taps=("pre_relu", "post_relu"),
        views=3,
        resolution=32,
        batch_size=6,
        workers=0,
        device="cpu",
        quiet=True,
    )
    base.update(kw)
    return CacheTeacherConfig(**base)


@pytest.fixture(scope="module")
def straight(demo_shards, teacher_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("c") / "straight.zarr"
    run(_config(demo_shards["train"], out, teacher_file, workers=2))
    return out


def test_cached_rows_equal_the_online_teacher_on_the_replayed_view(straight, demo_shards, teacher_file):
    store = open_store(straight)
    state = torch.load(teacher_file)
    model = torchvision.models.resnet18(num_classes=4)
    model.load_state_dict(state)
    taps = FeatureTaps(model.eval(), ("pre_relu", "post_relu"))
    rng = np.random.default_rng(1)
    shards = list_shards(demo_shards["train"])
    checked = 0
    for s, info in enumerate(shards):
        block = store.read_slot(s)
        for sample in iter_samples(info.path):
            row = block.keys.index(sample.key)
            image = decode_rgb(image_bytes(sample, info.path))
            params = sample_views("paper", 0, sample.key, 3, *image.shape[1:], False)
            np.testing.assert_array_equal(block.params[row], params)  # parameters are a pure function
            assert tuple(block.hw[row]) == tuple(image.shape[1:])
            view = int(rng.integers(3))
            with torch.inference_mode():
                online = taps(replay_view(image, params[view], 32)[None])
            for tap in ("pre_relu", "post_relu"):
                cached = block.features[tap][row, view].astype(np.float32)
                ref = online[tap][0].numpy()
                np.testing.assert_allclose(
                    cached, ref, rtol=1e-3, atol=1e-4
                )  # float16 storage: 2^-10 relative
            checked += 1
    assert checked == 24
    pre = store.feature_array("pre_relu")[:]
    assert (pre < 0).any(), "the pre-ReLU tap must have negative values"


def test_store_metadata_inspect_and_verify(straight, demo_shards):
    store = open_store(straight)
    info = summarize(store)
    assert info["shards_done"] == info["shards_total"] == 3 and info["images_cached"] == 24
    assert info["taps"] == {"pre_relu": 512, "post_relu": 512} and info["views_per_image"] == 3
    assert info["feature_bytes_per_view"] <= 2 * 2 * 512
    entries = subprocess.run(["find", str(straight)], capture_output=True, text=True, check=True).stdout
    regular = subprocess.run(
        ["find", str(straight), "-type", "f"], capture_output=True, text=True, check=True
    )
    assert info["inodes"] == len(entries.splitlines()) and info["files"] == len(regular.stdout.splitlines())
    bookkeeping = {
        "config.cache_teacher.json",
        "runs.jsonl",
        "writer.lock",
    }  # the stage's files beside the store
    assert bookkeeping <= {p.name for p in straight.iterdir()}
    assert info["inodes"] == info["inodes_of_the_layout"] + len(bookkeeping)
    prov = store.provenance
    assert prov["teacher"]["weights"]["kind"] == "file" and len(prov["teacher"]["weights"]["sha256"]) == 64
    assert prov["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert [s["samples"] for s in prov["shards"]] == [8, 8, 8]
    report = verify_store(store, samples=6, seed=3)
    assert report.pairs == 6 and report.ok and report.max_rel_error < 2e-3
    moved = verify_store(store, samples=2, seed=4, shards=str(demo_shards["train"] / "index.json"))
    assert moved.pairs == 2 and moved.ok


def test_two_ranks_under_torchrun_give_a_byte_identical_store(straight, demo_shards, teacher_file, tmp_path):
    out = tmp_path / "two.zarr"
    kdep = Path(sys.executable).parent / "kdep"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "--no-python", str(kdep), "cache-teacher",
           "--shards", str(demo_shards["train"]), "--out", str(out), "--teacher", "resnet18", "--weights", str(teacher_file),
           "--tap", "pre_relu", "--tap", "post_relu", "--views", "3", "--resolution", "32", "--batch-size", "6",
           "--workers", "0", "--device", "cpu", "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert store_bytes(out) == store_bytes(straight)


def test_interrupted_then_resumed_equals_a_straight_run(
    straight, demo_shards, teacher_file, tmp_path, monkeypatch
):
    out = tmp_path / "resumed.zarr"
    original = FeatureStore.write_slot
    calls = []

    def crash_on_second(self, shard_index, block):
        calls.append(shard_index)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        original(self, shard_index, block)

    monkeypatch.setattr(FeatureStore, "write_slot", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run(_config(demo_shards["train"], out, teacher_file))
    monkeypatch.setattr(FeatureStore, "write_slot", original)
    assert len(open_store(out).done()) == 1
    stats = run(_config(demo_shards["train"], out, teacher_file))
    assert stats["shards"] == 2
    assert store_bytes(out) == store_bytes(straight)
    assert run(_config(demo_shards["train"], out, teacher_file))["shards"] == 0  # nothing left to do


def test_resume_with_other_settings_is_refused_naming_the_difference(
    straight, demo_shards, teacher_file, tmp_path
):
    out = tmp_path / "c.zarr"
    shutil.copytree(straight, out)
    with pytest.raises(ProvenanceError, match=r"views.k: stored 3 vs requested 4"):
        run(_config(demo_shards["train"], out, teacher_file, views=4))
    other = tmp_path / "other.pt"
    torch.manual_seed(5)
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), other)
    with pytest.raises(ProvenanceError, match=r"teacher.weights.sha256"):
        run(_config(demo_shards["train"], out, other))


def test_a_second_concurrent_writer_is_refused(demo_shards, teacher_file, tmp_path):
    out = tmp_path / "locked.zarr"
    out.mkdir()
    holder = StoreLock(out)
    holder.acquire()
    try:
        with pytest.raises(ProvenanceError, match="being written by another cache-teacher job"):
            run(_config(demo_shards["train"], out, teacher_file))
    finally:
        holder.release()


def _shard_dir(tmp_path: Path, shards: dict[str, list[tuple[str, dict]]]) -> Path:
    d = tmp_path / "shards"
    d.mkdir()
    records = [write_shard(d / name, samples) for name, samples in shards.items()]
    write_index(d, records, ["a", "b"])
    return d


def _good_samples(demo_shards, n: int, prefix: str = "") -> list[tuple[str, dict]]:
    out = []
    for s in iter_samples(list_shards(demo_shards["train"])[0].path):
        out.append((prefix + s.key, dict(s.fields)))
        if len(out) == n:
            break
    return out


def test_corrupt_image_is_named_or_skipped_counted_and_recorded(demo_shards, teacher_file, tmp_path):
    good = _good_samples(demo_shards, 4)
    bad = ("broken_0001", {"jpg": b"\xff\xd8\xff\xe0garbage", "cls": b"1"})
    d = _shard_dir(tmp_path, {"s-000000.tar": [*good[:2], bad, *good[2:]]})
    with pytest.raises(CacheError, match=r"s-000000\.tar key 'broken_0001': cannot decode image"):
        run(_config(d, tmp_path / "a.zarr", teacher_file))
    stats = run(_config(d, tmp_path / "b.zarr", teacher_file, skip_bad=True))
    assert stats["skipped"] == 1 and stats["images"] == 4
    block = open_store(tmp_path / "b.zarr").read_slot(0)
    assert block.keys[2] == "broken_0001" and not block.valid[2] and block.valid.sum() == 4
    assert block.skipped[0]["key"] == "broken_0001" and "cannot decode" in block.skipped[0]["reason"]
    assert not block.features["pre_relu"][2].any()


def test_sample_without_image_and_dotted_key(demo_shards, teacher_file, tmp_path):
    good = _good_samples(demo_shards, 2)
    d = _shard_dir(tmp_path, {"s-000000.tar": [*good, ("noimage_1", {"cls": b"0"})]})
    with pytest.raises(CacheError, match=r"sample 'noimage_1' has no image \(fields: cls\)"):
        run(_config(d, tmp_path / "a.zarr", teacher_file))
    dotted = tmp_path / "dotted"
    dotted.mkdir()
    import io
    import tarfile

    with tarfile.open(dotted / "d-000000.tar", "w") as tar:
        for name, data in (
            ("img.v2.jpg", good[0][1]["jpg"] if "jpg" in good[0][1] else good[0][1]["png"]),
            ("img.v2.cls", b"1"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(CacheError, match=r"sample 'img' has no image .*keys must not contain dots"):
        run(_config(dotted, tmp_path / "b.zarr", teacher_file))


def test_duplicate_key_across_shards(demo_shards, teacher_file, tmp_path):
    good = _good_samples(demo_shards, 4)
    d = _shard_dir(tmp_path, {"s-000000.tar": good[:3], "s-000001.tar": [good[3], good[0]]})
    with pytest.raises(
        CacheError, match=rf"key '{good[0][0]}' appears in shard s-000000.tar and in shard s-000001.tar"
    ):
        run(_config(d, tmp_path / "a.zarr", teacher_file))
    stats = run(_config(d, tmp_path / "b.zarr", teacher_file, skip_bad=True))
    assert stats["skipped"] == 1
    assert open_store(tmp_path / "b.zarr").read_slot(1).valid.tolist() == [True, False]


def test_truncated_tar_is_an_error_not_a_short_shard(demo_shards, teacher_file, tmp_path):
    d = tmp_path / "trunc"
    shutil.copytree(demo_shards["train"], d)
    import tarfile

    path = d / "train-000001.tar"
    with tarfile.open(path) as tar:
        cut = tar.getmembers()[8].offset  # a header boundary: WebDataset would end silently here
    data = path.read_bytes()[:cut]
    path.write_bytes(data)
    listed = d / "listed"
    listed.mkdir()
    for p in d.glob("*.tar"):
        shutil.copy(p, listed / p.name)
    with pytest.raises(ShardError, match=r"train-000001\.tar"):
        run(_config(d, tmp_path / "a.zarr", teacher_file))  # index size check
    with pytest.raises(ShardError, match=r"train-000001\.tar: truncated tar"):
        run(_config(listed, tmp_path / "b.zarr", teacher_file))  # no index: the end-of-archive check


def test_shard_changed_since_the_store_was_started_is_caught_on_resume(
    demo_shards, teacher_file, tmp_path, monkeypatch
):
    d = tmp_path / "data"
    shutil.copytree(demo_shards["train"], d)
    shutil.copy(d / "index.json", tmp_path / "index.json")
    out = tmp_path / "c.zarr"
    original = FeatureStore.write_slot

    def crash(self, shard_index, block):
        raise KeyboardInterrupt

    monkeypatch.setattr(FeatureStore, "write_slot", crash)
    with pytest.raises(KeyboardInterrupt):
        run(_config(d, out, teacher_file))
    monkeypatch.setattr(FeatureStore, "write_slot", original)
    # Same size, other bytes: swap two shards' contents and keep the index (sizes match by chance? force it)
    a, b = d / "train-000000.tar", d / "train-000002.tar"
    data = bytearray(a.read_bytes())
    data[700] ^= 0xFF  # flip one byte inside the first image
    a.write_bytes(bytes(data))
    with pytest.raises((CacheError, ProvenanceError), match=r"train-000000\.tar"):
        run(_config(d, out, teacher_file))
    assert b.exists()


def test_bad_teacher_inputs(demo_shards, teacher_file, tmp_path):
    shards = demo_shards["train"]
    with pytest.raises(ModelError, match="no weights file at .*missing.pt"):
        run(_config(shards, tmp_path / "a.zarr", tmp_path / "missing.pt"))
    with pytest.raises(ModelError, match=r"does not fit resnet50 .*another architecture"):
        run(_config(shards, tmp_path / "b.zarr", teacher_file, teacher="resnet50"))
    with pytest.raises(ModelError, match="unknown model 'resnet19'"):
        run(_config(shards, tmp_path / "c.zarr", teacher_file, teacher="resnet19"))
    from pipeline.manifest import ConfigError

    with pytest.raises(ConfigError, match="key 'taps': 'pre_relux' is not a cache tap"):
        replace(_config(shards, tmp_path / "d.zarr", teacher_file), taps=("pre_relux",))


def test_grayscale_cmyk_and_png_alpha_are_cached(straight, demo_shards):
    """The demo shards hold grayscale and CMYK JPEGs and PNGs with alpha; all decode to 3-channel rows."""
    import io

    from PIL import Image

    modes = {}
    for info in list_shards(demo_shards["train"]):
        for s in iter_samples(info.path):
            data = image_bytes(s, info.path)
            modes[s.key] = Image.open(io.BytesIO(data)).mode
    store = open_store(straight)
    keys = store.keys_at(range(store.layout.rows))
    valid = store.valid()
    for mode in ("L", "CMYK", "RGBA"):
        key = next(k for k, m in modes.items() if m == mode)
        assert valid[keys.index(key)], mode


def test_a_bad_shard_on_rank_1_ends_both_ranks_with_one_line_errors(demo_shards, teacher_file, tmp_path):
    """Rank 1 alone reads shard 1's headers; its error must reach rank 0 (which would otherwise wait for it)."""
    d = tmp_path / "shards"
    d.mkdir()
    for p in list_shards(demo_shards["train"])[:2]:
        shutil.copy(p.path, d / p.name)
    (d / "train-000001.tar").write_bytes(b"not a tar " * 200)  # no index: only the scan finds it
    kdep = Path(sys.executable).parent / "kdep"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "--no-python", str(kdep), "cache-teacher",
           "--shards", str(d), "--out", str(tmp_path / "c.zarr"), "--teacher", "resnet18", "--weights", str(teacher_file),
           "--views", "2", "--resolution", "32", "--workers", "0", "--device", "cpu", "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDEP_DIST_TIMEOUT_S": "120"}
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert time.monotonic() - start < 60
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert any(line.startswith("error: rank 1 failed: ") and "train-000001.tar" in line for line in errors), (
        errors
    )
    own = [line for line in errors if "train-000001.tar" in line and "failed:" not in line]
    assert own, proc.stderr  # rank 1's own one-line message


def test_cpu_cache_records_tf32_off(straight):
    assert open_store(straight).provenance["compute"]["tf32"] is False


def test_final_check_trusts_the_ranks_reports_not_rank_0s_listing(
    straight, demo_shards, teacher_file, tmp_path
):
    """On a shared filesystem rank 0 may not see another node's fresh markers; the ranks' own reports decide."""
    out = tmp_path / "c.zarr"
    shutil.copytree(straight, out)
    store = open_store(out)
    shutil.rmtree(out / "markers")  # what a stale directory listing on rank 0 would show
    config = _config(demo_shards["train"], out, teacher_file)
    stats = {"images": 8, "skipped": 0, "shards": 1, "seconds": 1.0, "images_per_s": 8.0}
    assert finish_run(store, Dist(), config, [(stats, [1])], done=[0, 2]) == stats
    with pytest.raises(CacheError, match=r"1 shard\(s\) have no done marker .*train-000002\.tar"):
        finish_run(store, Dist(), config, [(stats, [1])], done=[0])


def test_other_ranks_join_the_lock_by_the_broadcast_job_id(tmp_path):
    lock = StoreLock(tmp_path)
    lock.join("abc123")  # no lock file needed: the id rank 0 broadcast is the truth
    assert lock.job_id == "abc123" and not lock.path.exists()
    with pytest.raises(ProvenanceError, match="rank 0 holds no writer lock"):
        lock.join("")


def test_a_teacher_with_tiny_features_is_refused_in_float16_and_cached_in_float32(demo_shards, tmp_path):
    """A randomly initialised MobileNetV2's pooled features are ~1e-9: float16 would store zeros without a word."""
    torch.manual_seed(0)
    weights = tmp_path / "mnv2.pt"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), weights)
    config = _config(
        demo_shards["train"], tmp_path / "a", weights, teacher="mobilenet_v2", taps=("pre_relu",)
    )
    with pytest.raises(
        CacheError, match=r"key '.*': teacher tap 'pre_relu': .*normal range.*--dtype float32"
    ):
        run(config)
    stats = run(replace(config, out=str(tmp_path / "b"), out_of_range="skip"))
    assert stats["images"] == 0 and stats["skipped"] == 24
    run(replace(config, out=str(tmp_path / "c"), dtype="float32"))
    feats = open_store(tmp_path / "c").read_slot(0).features["pre_relu"]
    assert feats.dtype == np.float32 and 0 < np.abs(feats).max() < 1e-6


def test_the_coss_centre_view_is_cached_as_view_0(demo_shards, teacher_file, tmp_path):
    config = _config(demo_shards["train"], tmp_path / "c", teacher_file, taps=("post_relu",), views=2,
                     center_view=True, center_recipe="center-coss")  # fmt: skip
    run(config)
    store = open_store(tmp_path / "c")
    assert store.provenance["views"]["center_recipe"] == "center-coss"
    # the box rule is recorded (a cache begun with the older box is refused on resume); other caches: no record
    assert store.provenance["views"]["center_box"] == {"center-coss": CENTER_BOX_RULES["center-coss"]}
    assert center_boxes(replace(config, center_recipe="center")) == {}
    assert center_boxes(replace(config, center_view=False, recipe="center-coss")) == {
        "center_box": store.provenance["views"]["center_box"]
    }
    info = list_shards(demo_shards["train"])[0]
    block = store.read_slot(0)
    for sample in iter_samples(info.path):
        image = decode_rgb(image_bytes(sample, info.path))
        expected = sample_views("paper", 0, sample.key, 2, *image.shape[1:], True, "center-coss")
        np.testing.assert_array_equal(block.params[block.keys.index(sample.key)], expected)
        assert not np.array_equal(
            expected[0], sample_views("paper", 0, sample.key, 2, *image.shape[1:], True)[0]
        )
