"""Stage 1's start-up and the recorded member offsets, against references: the 512-byte header scan against the
full parse and tarfile (offsets and bytes read); a resume against the files it opens (no done shard is read) and
against a straight run (byte-identical store); shard buffers against the order of messages (made at a shard's first
batch, freed once written); offset reads against the streamed samples of every cached row, and their users (verify,
the held-out split) against the whole-shard path, with and without the offsets array."""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import tarfile
import weakref
from pathlib import Path

import numpy as np
import pytest
from conftest import store_bytes

from pipeline.cache import join as join_module
from pipeline.cache import teacher as teacher_module
from pipeline.cache.join import source_samples
from pipeline.cache.store import FeatureStore, open_store
from pipeline.cache.verify import verify_store
from pipeline.cache.workers import CacheError, ShardAssembly
from pipeline.data.random_access import read_samples_at
from pipeline.data.shards import ShardError, iter_samples, list_shards, scan_samples, write_index, write_shard
from pipeline.process.batches import SearchSpec, SearchStream
from pipeline.provenance import ProvenanceError
from stages.cache_teacher import CacheTeacherConfig, run


def _config(shards, out, weights, **kw) -> CacheTeacherConfig:
    base = dict(shards=str(shards), out=str(out), teacher="resnet18", weights=str(weights), taps=("pre_relu",),
                views=2, resolution=32, batch_size=4, workers=0, device="cpu", quiet=True)  # fmt: skip
    return CacheTeacherConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def cached(demo_shards, teacher_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("c") / "cache"
    run(_config(demo_shards["train"], out, teacher_file))
    return out


def _long_name_tar(path: Path, fmt: int) -> Path:
    """Samples whose member names need GNU long-name or pax records (key > 100 bytes), between short ones."""
    names = ["a.jpg", "a.cls", "d/" + "x" * 120 + ".jpg", "d/" + "x" * 120 + ".cls", "p" * 90 + "/q" * 40 + ".png",
             "b.jpg"]  # fmt: skip
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, name in enumerate(names):
            data = bytes([i]) * (100 + 700 * i)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _tarfile_samples(path: Path) -> list[tuple[str, int]]:
    """(key, offset of the first header of its first member) per sample, from Python's tarfile."""
    out: list[tuple[str, int]] = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            base = m.name.rpartition("/")
            key = base[0] + base[1] + base[2].partition(".")[0]
            if not out or out[-1][0] != key:
                out.append((key, m.offset))
    return out


def _count_pread(monkeypatch) -> list[int]:
    sizes: list[int] = []
    original = os.pread

    def pread(fd, n, offset):
        data = original(fd, n, offset)
        sizes.append(len(data))
        return data

    monkeypatch.setattr(os, "pread", pread)
    return sizes


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_header_scan_equals_the_full_parse_and_tarfile_with_long_names(tmp_path, fmt, monkeypatch):
    path = _long_name_tar(tmp_path / "long.tar", fmt)
    full = [(s.key, s.offset) for s in iter_samples(path)]
    assert full == _tarfile_samples(path)  # offsets: the extension header, as tarfile's TarInfo.offset
    sizes = _count_pread(monkeypatch)
    assert scan_samples(path) == full
    assert set(sizes) - {512} and max(sizes) <= 512  # headers, plus the short long-name records
    for (key, offset), sample in zip(full, iter_samples(path), strict=True):
        assert read_samples_at(path, [(offset, key)])[0].fields == sample.fields  # the long name is recovered


def test_the_header_scan_reads_only_headers_of_the_demo_shards(demo_shards, monkeypatch):
    for info in list_shards(demo_shards["train"]):
        with tarfile.open(info.path) as tar:
            headers = len(tar.getmembers()) + 1  # + the end-of-archive block
        full = [(s.key, s.offset) for s in iter_samples(info.path)]
        sizes = _count_pread(monkeypatch)
        assert scan_samples(info.path) == full == _tarfile_samples(Path(info.path))
        assert sizes == [512] * headers  # not one byte of member data
        monkeypatch.undo()


def test_offset_reads_equal_the_streamed_samples_for_every_cached_row(cached, demo_shards):
    store = open_store(cached)
    for s, info in enumerate(list_shards(demo_shards["train"])):
        streamed = list(iter_samples(info.path))
        offsets = store.read_offsets(s)
        assert offsets.tolist() == [x.offset for x in streamed] and store.shard_keys(s) == [
            x.key for x in streamed
        ]
        by_offset = list(source_samples(store, s, range(len(streamed)), info.path))
        assert [(x.key, x.offset, x.fields) for x in by_offset] == [
            (x.key, x.offset, x.fields) for x in streamed
        ]
    raw = store.array("member_offset")[:]
    assert (raw[~store.valid()] == -1).all() and (raw[store.valid()] >= 0).all()  # -1 on padding rows only


def test_a_changed_shard_is_named_with_the_key_not_read_silently(cached, demo_shards, tmp_path):
    store = open_store(cached)
    info = list_shards(demo_shards["train"])[1]
    keys, offsets = store.shard_keys(1), store.read_offsets(1)
    with pytest.raises(ShardError, match=rf"{info.name}: sample '{keys[2]}' is not at byte {offsets[3]} "
                                         rf"\(found '{keys[3]}' there\); the shard changed"):  # fmt: skip
        read_samples_at(info.path, [(offsets[3], keys[2])])
    moved = tmp_path / info.name
    moved.write_bytes(b"\0" * 512 + Path(info.path).read_bytes())  # everything 512 bytes later
    with pytest.raises(ShardError, match=rf"sample '{keys[0]}' is not at byte 0 .*shard changed since"):
        list(source_samples(store, 1, [0], str(moved)))
    with pytest.raises(
        ShardError, match=rf"sample '{keys[4]}' is not at byte {offsets[4]} \(corrupt tar header"
    ):
        list(source_samples(store, 1, [4], str(moved)))


def _same_store(a: Path, b: Path) -> bool:
    """Byte-identical stores, but for the recorded source folder (a copy of the shards is read here)."""
    first, second = store_bytes(a), store_bytes(b)
    meta = [json.loads(x.pop("store.zarr/zarr.json")) for x in (first, second)]
    for m in meta:
        m["attributes"]["kdep"]["provenance"]["recorded"].pop("source")
    return first == second and meta[0] == meta[1]


def _opened_tars(monkeypatch) -> list[str]:
    opened: list[str] = []
    original = builtins.open

    def recording(file, *args, **kwargs):
        if str(file).endswith(".tar"):
            opened.append(Path(file).name)
        return original(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording)
    return opened


def _crash_after(monkeypatch, written: int) -> None:
    original, calls = FeatureStore.write_slot, []

    def write_then_crash(self, shard_index, block):
        calls.append(shard_index)
        if len(calls) > written:
            raise KeyboardInterrupt("simulated kill")
        original(self, shard_index, block)

    monkeypatch.setattr(FeatureStore, "write_slot", write_then_crash)


@pytest.mark.parametrize("with_index", [True, False])
def test_a_resume_reads_no_byte_of_a_done_shard(
    cached, demo_shards, teacher_file, tmp_path, monkeypatch, with_index
):
    data = tmp_path / "data"
    shutil.copytree(demo_shards["train"], data)
    if not with_index:
        (data / "index.json").unlink()  # the resume must not hash the done shards either
    out = tmp_path / "c"
    _crash_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(_config(data, out, teacher_file))
    monkeypatch.undo()
    assert sorted(open_store(out).done()) == [0, 1]
    opened = _opened_tars(monkeypatch)
    assert run(_config(data, out, teacher_file))["shards"] == 1
    assert set(opened) == {
        "train-000002.tar"
    }  # header scan + the worker's read (and hash) of the pending shard
    assert _same_store(out, cached)
    opened.clear()
    assert run(_config(data, out, teacher_file))["shards"] == 0 and opened == []


def test_a_done_shard_changed_in_size_or_a_different_listing_is_refused_on_resume(
    cached, demo_shards, teacher_file, tmp_path
):
    data = tmp_path / "data"
    shutil.copytree(demo_shards["train"], data)
    (data / "index.json").unlink()
    out = tmp_path / "c"
    shutil.copytree(cached, out)
    with open(data / "train-000000.tar", "ab") as fh:
        fh.write(b"\0" * 512)
    with pytest.raises(
        ProvenanceError, match=r"shard .*train-000000\.tar changed since the cache .*bytes \d+ now"
    ):
        run(_config(data, out, teacher_file))
    (data / "train-000000.tar").unlink()
    with pytest.raises(ProvenanceError, match=r"2 listed, 3 recorded; first difference at position 0: "
                                              r"train-000001.tar vs recorded train-000000.tar"):  # fmt: skip
        run(_config(data, out, teacher_file))


def test_a_pending_shard_changed_in_place_without_an_index_is_caught_by_its_recorded_hash(
    demo_shards, teacher_file, tmp_path, monkeypatch
):
    data = tmp_path / "data"
    shutil.copytree(demo_shards["train"], data)
    (data / "index.json").unlink()
    out = tmp_path / "c"
    _crash_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run(_config(data, out, teacher_file))
    monkeypatch.undo()
    shard = bytearray((data / "train-000002.tar").read_bytes())
    shard[700] ^= 0xFF  # inside the first image: same size, same headers
    (data / "train-000002.tar").write_bytes(bytes(shard))
    with pytest.raises(CacheError, match=r"train-000002\.tar: content changed since this cache was started"):
        run(_config(data, out, teacher_file))


def test_keys_repeated_in_a_done_shard_are_found_from_the_cache_record(
    demo_shards, teacher_file, tmp_path, monkeypatch
):
    good = [(s.key, dict(s.fields)) for s in iter_samples(list_shards(demo_shards["train"])[0].path)]
    d = tmp_path / "shards"
    d.mkdir()
    names = {"s-000000.tar": good[:3], "s-000001.tar": good[3:5], "s-000002.tar": [good[5], good[0]]}
    write_index(d, [write_shard(d / name, samples) for name, samples in names.items()], ["a", "b"])
    straight = tmp_path / "straight"
    run(_config(d, straight, teacher_file, skip_bad=True))
    out = tmp_path / "c"
    _crash_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(_config(d, out, teacher_file, skip_bad=True))
    monkeypatch.undo()
    opened = _opened_tars(monkeypatch)
    with pytest.raises(
        CacheError, match=rf"key '{good[0][0]}' appears in shard s-000000.tar and in shard s-000002"
    ):
        run(_config(d, out, teacher_file))
    assert "s-000000.tar" not in opened  # its keys came from the cache
    stats = run(_config(d, out, teacher_file, skip_bad=True))
    assert stats["shards"] == 1 and stats["skipped"] == 1
    assert _same_store(out, straight)


def test_shard_buffers_are_made_at_a_shards_first_batch_and_freed_once_written(
    demo_shards, teacher_file, tmp_path, monkeypatch
):
    events: list[tuple[str, int]] = []
    blocks: dict[int, weakref.ref] = {}
    alive_at_write: dict[int, list[int]] = {}

    class Recorded(ShardAssembly):
        def __post_init__(self) -> None:
            events.append(("make", self.task.index))
            super().__post_init__()

        def finish(self, end):
            events.append(("finish", self.task.index))
            return super().finish(end)

    original = FeatureStore.write_slot

    def write(self, shard_index, block):
        alive_at_write[shard_index] = [i for i, ref in blocks.items() if ref() is not None]
        blocks[shard_index] = weakref.ref(block.features["pre_relu"])
        original(self, shard_index, block)

    monkeypatch.setattr(teacher_module, "ShardAssembly", Recorded)
    monkeypatch.setattr(FeatureStore, "write_slot", write)
    run(_config(demo_shards["train"], tmp_path / "c", teacher_file))
    assert events == [("make", 0), ("finish", 0), ("make", 1), ("finish", 1), ("make", 2), ("finish", 2)]
    assert alive_at_write == {0: [], 1: [], 2: []}  # no earlier shard's buffers exist once it is written


def test_verify_reads_samples_by_offset_and_falls_back_for_a_cache_without_offsets(
    cached, tmp_path, monkeypatch
):
    def no_whole_shard(path, digest=None):
        raise AssertionError(f"parsed the whole shard {path}")

    with monkeypatch.context() as m:
        m.setattr(join_module, "iter_samples", no_whole_shard)
        report = verify_store(open_store(cached), samples=5, seed=2)
    assert report.pairs == 5 and report.ok
    old = tmp_path / "old"
    shutil.copytree(cached, old)
    shutil.rmtree(old / "store.zarr" / "member_offset")  # a cache made before offsets were recorded
    store = open_store(old)
    assert not store.has_offsets
    again = verify_store(store, samples=5, seed=2)
    assert (again.pairs, again.max_abs_error, again.worst) == (
        report.pairs,
        report.max_abs_error,
        report.worst,
    )


@pytest.mark.parametrize("offsets", [True, False])
def test_the_held_out_split_reads_its_samples_by_offset_and_equals_the_whole_shard_path(
    cached, demo_shards, tmp_path, monkeypatch, offsets
):
    cache = cached
    if not offsets:
        cache = tmp_path / "old"
        shutil.copytree(cached, cache)
        shutil.rmtree(cache / "store.zarr" / "member_offset")
    paths = tuple(s.path for s in list_shards(demo_shards["train"]))
    spec = SearchSpec(str(cache), paths, ("pre_relu",), 32, seed=1, val_fraction=0.3)

    def items(split: str) -> list:
        return [(x.numpy(), rows["pre_relu"].numpy()) for x, rows, _ in SearchStream(spec, split, 0)]

    with monkeypatch.context() as m:
        m.setattr(SearchStream, "_samples", lambda self, store, shard, block, path: iter_samples(path))
        reference = {split: items(split) for split in ("train", "val")}
    with monkeypatch.context() as m:
        if offsets:  # the held-out split never parses a whole shard
            m.setattr(join_module, "iter_samples", lambda *a, **k: pytest.fail("whole-shard parse"))
        val = items("val")
    assert len(val) == len(reference["val"]) > 0
    for (x, f), (rx, rf) in zip(val, reference["val"], strict=True):
        np.testing.assert_array_equal(x, rx)
        np.testing.assert_array_equal(f, rf)
    train = items("train")
    assert len(train) == len(reference["train"]) and all(
        np.array_equal(a[0], b[0]) for a, b in zip(train, reference["train"], strict=True)
    )
