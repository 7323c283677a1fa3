"""The cache layout (kdep-cache/2): round trips, view-major and row-granular reads, core Zarr types that an
independent reader (tensorstore) opens bit-exactly, the old-layout refusal, and stage 1's float16 range guard."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cache.store import (
    CacheLayout,
    ShardBlock,
    StoreError,
    create_store,
    decode_keys,
    encode_keys,
    open_store,
)
from pipeline.cache.workers import CacheError, ShardAssembly, ShardTask
from pipeline.data.params import N_PARAMS

SIZES = [5, 7, 3]  # rows per input shard
K, D = 4, 16


def _features(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((sum(SIZES), K, D)).astype(np.float16)


def _write(path: Path, inner_rows: int = 2) -> tuple[Path, np.ndarray]:
    feats = _features()
    shards = [{"name": f"shard-{i}", "samples": n} for i, n in enumerate(SIZES)]
    layout = CacheLayout(shards, views=K, dims={"pre_relu": D}, inner_rows=inner_rows)
    create_store(path, layout, provenance={"teacher": "synthetic", "views": {"center_first": False}})
    store, start = open_store(path, "r+"), 0
    for i, n in enumerate(SIZES):
        rows = slice(start, start + n)
        params = np.arange(n * K * N_PARAMS, dtype=np.float32).reshape(n, K, N_PARAMS) + 1000 * i
        block = ShardBlock(
            keys=[f"img-{j}-é" for j in range(start, start + n)],
            features={"pre_relu": feats[rows]},
            params=params,
            hw=np.full((n, 2), 7 + i, np.int32),
            hashes=np.full((n, 16), i, np.uint8),
            valid=np.arange(n) != 1,
            offsets=np.arange(n, dtype=np.int64) * 1536 + 10**10 * i,  # beyond 2**32: int64 is needed
        )
        store.write_slot(i, block)
        start += n
    return path, feats


def test_round_trip_whole_and_per_view(tmp_path):
    path, feats = _write(tmp_path / "c")
    store = open_store(path)
    assert (
        store.layout.slot_rows == 8 and store.layout.inner_rows == 2
    )  # 7 rows rounded up to whole inner chunks
    start = 0
    for i, n in enumerate(SIZES):
        whole = store.read_slot(i)
        np.testing.assert_array_equal(whole.features["pre_relu"], feats[start : start + n])
        assert whole.keys == [f"img-{j}-é" for j in range(start, start + n)]
        one = store.read_slot(i, taps=["pre_relu"], views=[2])
        assert one.features["pre_relu"].shape == (n, 1, D) and one.views == (2,)
        for row in range(n):
            np.testing.assert_array_equal(one.feature("pre_relu", row, 2), feats[start + row, 2])
            np.testing.assert_array_equal(one.view_params(row, 2), whole.params[row, 2])
        with pytest.raises(StoreError, match="view 1 was not read"):
            one.feature("pre_relu", 0, 1)
        rows = [n - 1, 0, n - 1]  # any order, repeats allowed
        np.testing.assert_array_equal(
            store.read_rows(i, rows, 3, "pre_relu"), feats[start + np.array(rows), 3]
        )
        assert store.shard_keys(i) == whole.keys
        assert store.read_offsets(i).tolist() == [j * 1536 + 10**10 * i for j in range(n)]
        start += n
    every = {i: store.read_slot(i).keys for i in range(len(SIZES))}
    assert (
        store.keys_of([2, 0], run=2) == {0: every[0], 2: every[2]} and store.keys_of(range(3), run=1) == every
    )
    raw = store.array("member_offset")[:]
    assert (raw[store.layout.slot(2)][SIZES[2] :] == -1).all()  # padding rows
    assert store.valid().sum() == sum(SIZES) - len(SIZES)  # row 1 of each shard is invalid; padding is too


def test_the_folder_is_a_pure_zarr_hierarchy_of_core_types(tmp_path):
    path, _ = _write(tmp_path / "c")
    assert sorted(p.name for p in path.iterdir()) == ["markers", "store.zarr"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zarr warns about anything in the hierarchy that is not a node
        group = zarr.open_group(str(path / "store.zarr"), mode="r")
        names = sorted(name for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array))
    assert names == [
        "features/pre_relu",
        "image_hash",
        "image_hw",
        "keys",
        "member_offset",
        "valid",
        "view_params",
    ]
    for name in names:
        meta = json.loads((path / "store.zarr" / name / "zarr.json").read_text())
        assert meta["data_type"] in {"bool", "uint8", "int32", "int64", "float16", "float32"}, name


def test_tensorstore_reads_every_array_bit_exactly(tmp_path):
    ts = pytest.importorskip("tensorstore")
    path, _ = _write(tmp_path / "c")
    group = zarr.open_group(str(path / "store.zarr"), mode="r")
    for name, node in group.members(max_depth=None):
        if not isinstance(node, zarr.Array):
            continue
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "store.zarr" / name)}}
        other = ts.open(spec, read=True).result().read().result()
        ours = node[...]
        assert other.dtype == ours.dtype and other.shape == ours.shape, name
        np.testing.assert_array_equal(other, ours, err_msg=name)
    keys = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "store.zarr/keys")}},
                   read=True).result().read().result()  # fmt: skip
    assert decode_keys(keys[:3]) == ["img-0-é", "img-1-é", "img-2-é"]


def _counting_reads(monkeypatch) -> dict[str, int]:
    """Bytes zarr reads per array (through its LocalStore)."""
    read: dict[str, int] = {}
    original = zarr.storage.LocalStore.get

    async def get(self, key, prototype=None, byte_range=None):
        buf = await original(self, key, prototype, byte_range)
        if buf is not None:
            name = key.split("/c/")[0]
            read[name] = read.get(name, 0) + len(buf)
        return buf

    monkeypatch.setattr(zarr.storage.LocalStore, "get", get)
    return read


def test_an_epoch_block_reads_one_view_and_a_row_read_reads_its_chunk(tmp_path, monkeypatch):
    path, _ = _write(tmp_path / "c", inner_rows=1)
    files = sorted((path / "store.zarr/features/pre_relu/c/1").rglob("*"))
    view_files = {int(f.parent.name): f.stat().st_size for f in files if f.is_file()}
    assert sorted(view_files) == list(range(K))  # one Zarr shard file per (input shard, view)
    store = open_store(path)
    store.feature_array("pre_relu")  # metadata read outside the count
    read = _counting_reads(monkeypatch)
    store.read_slot(1, taps=["pre_relu"], views=[2])
    assert read["features/pre_relu"] == view_files[2]  # exactly the epoch's view: no other view is read
    read.clear()
    store.read_rows(1, [3], 0, "pre_relu")
    row_chunk = D * 2  # one row per inner chunk here; blosc adds a small header
    index = 16 * store.layout.slot_rows + 4  # the shard index: offset + length per inner chunk, crc32c
    assert read["features/pre_relu"] <= index + row_chunk + 64
    assert read["features/pre_relu"] < view_files[0]


def test_keys_are_fixed_width_utf8_and_long_keys_are_refused():
    raw = encode_keys(["a", "n01440764_10026", "ключ"], width=32)
    assert raw.dtype == np.uint8 and raw.shape == (3, 32)
    assert decode_keys(raw) == ["a", "n01440764_10026", "ключ"]
    with pytest.raises(StoreError, match="at most 8 bytes"):
        encode_keys(["a-very-long-key"], width=8, where="shard x.tar")


def test_a_cache_made_before_offsets_opens_reads_and_resumes_without_them(tmp_path):
    path, feats = _write(tmp_path / "c")
    shutil.rmtree(path / "store.zarr" / "member_offset")  # what a cache made before the array existed holds
    store = open_store(path, "r+")
    pending = replace(store.read_slot(1), keys=[f"new-{j}" for j in range(SIZES[1])])
    (path / "markers" / "000001.json").unlink()  # shard 1 still pending
    assert not store.has_offsets and store.read_offsets(0) is None
    block = store.read_slot(0)
    store.write_slot(1, replace(pending, offsets=np.zeros(SIZES[1], np.int64)))  # a resumed run's write
    assert store.shard_keys(1) == [f"new-{j}" for j in range(SIZES[1])]
    assert not (path / "store.zarr" / "member_offset").exists()
    np.testing.assert_array_equal(block.features["pre_relu"], feats[: SIZES[0]])


def test_an_old_layout_cache_is_refused_with_the_rebuild_message(tmp_path):
    old = tmp_path / "old.zarr"
    group = zarr.open_group(str(old), mode="w")
    group.attrs["kdep"] = {"layout_version": "kdep-cache/1", "layout": {}, "provenance": {}}
    with pytest.raises(StoreError, match=r"layout kdep-cache/1.*rebuild it with `kdep cache-teacher"):
        open_store(old)
    shards = [{"name": "s", "samples": 1}]
    with pytest.raises(StoreError, match="rebuild"):
        create_store(old, CacheLayout(shards, views=1, dims={"t": 4}), {})
    with pytest.raises(StoreError, match="no feature cache"):
        open_store(tmp_path / "missing")


def test_stale_markers_of_a_deleted_store_are_not_trusted(tmp_path):
    path, _ = _write(tmp_path / "c")
    assert len(open_store(path).done()) == len(SIZES)
    import shutil

    shutil.rmtree(path / "store.zarr")  # the data is gone; its markers remain
    create_store(path, CacheLayout([{"name": "s", "samples": 2}], views=1, dims={"t": 4}), {"views": {}})
    assert open_store(path).done() == {}


def test_the_store_zarr_path_opens_its_cache_folder(tmp_path):
    path, _ = _write(tmp_path / "c")
    assert open_store(path / "store.zarr").path == path


def _assembly(out_of_range: str = "error") -> ShardAssembly:
    task = ShardTask(index=0, path="train-0.tar", name="train-0.tar", samples=3, sha256=None)
    return ShardAssembly(task, views=2, dims={"pooled": 4}, dtype="float16", out_of_range=out_of_range)


def _msg(feats: np.ndarray) -> tuple[dict, dict]:
    n = len(feats) // 2
    msg = {"positions": list(range(n)), "keys": [f"k{i}" for i in range(n)],
           "params": np.zeros((n, 2, N_PARAMS), np.float32), "hw": np.ones((n, 2), np.int32),
           "hashes": np.zeros((n, 16), np.uint8), "offsets": np.arange(n, dtype=np.int64) * 1024}  # fmt: skip
    return msg, {"pooled": feats}


@pytest.mark.parametrize(
    ("value", "what"),
    [(1e-9, "below float16's normal range"), (7e4, "stored as inf"), (-1e5, "stored as inf")],
)
def test_the_range_guard_stops_on_features_float16_cannot_hold(value, what):
    feats = np.ones((6, 4), np.float32)
    feats[3] = [value, 0, value / 2, 0]  # image k1, its second view
    with pytest.raises(
        CacheError, match=rf"train-0.tar key 'k1': teacher tap 'pooled': .*{what}.*--dtype float32"
    ):
        _assembly().add(*_msg(feats))


def test_the_range_guard_accepts_zeros_and_normal_values():
    feats = np.ones((6, 4), np.float32)
    feats[0] = 0.0  # an all-zero row is stored exactly
    feats[1] = [
        6.2e-5,
        6e4,
        -6e4,
        1e-8,
    ]  # extremes inside the range; a subnormal next to a normal peak is fine
    assembly = _assembly()
    assembly.add(*_msg(feats))
    assert assembly.valid.all()


def test_the_range_guard_skips_and_counts_when_asked():
    feats = np.ones((6, 4), np.float32)
    feats[2] = 1e-9  # image k1
    assembly = _assembly("skip")
    assembly.add(*_msg(feats))
    block = assembly.finish({"samples": 3, "skipped": []})
    assert block.valid.tolist() == [True, False, True]
    assert not block.features["pooled"][1].any()  # nothing degraded is stored
    assert block.skipped == [{"key": "k1", "reason": "tap 'pooled' out of float16 range"}]
    assert block.offsets.tolist() == [0, 1024, 2048]  # a skipped row keeps its place in the shard


def test_rows_of_several_slots_are_read_in_one_call_in_the_order_asked(tmp_path, monkeypatch):
    """``read_rows_at``: global rows of any slots, unordered, with repeats, equal the slots' own rows, reading one
    inner chunk per distinct row (here one row per chunk) in a single store call."""
    path, feats = _write(tmp_path / "c", inner_rows=1)
    store = open_store(path)
    r = store.layout.slot_rows
    starts = np.cumsum([0, *SIZES])
    wanted = [(2, 2), (0, 4), (1, 6), (0, 4), (2, 0)]  # (slot, row): three slots, a repeat, out of order
    got = store.read_rows_at([s * r + row for s, row in wanted], 3, "pre_relu")
    np.testing.assert_array_equal(got, np.stack([feats[starts[s] + row, 3] for s, row in wanted]))
    for s in range(3):
        rows = [row for slot, row in wanted if slot == s]
        np.testing.assert_array_equal(
            store.read_rows(s, rows, 3, "pre_relu"), feats[starts[s] + np.array(rows), 3]
        )
    calls = []
    original = type(store.feature_array("pre_relu")).get_orthogonal_selection
    monkeypatch.setattr(type(store.feature_array("pre_relu")), "get_orthogonal_selection",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))  # fmt: skip
    read = _counting_reads(monkeypatch)
    store.read_rows_at([s * r + row for s, row in wanted], 3, "pre_relu")
    assert len(calls) == 1
    index = 16 * r + 4
    assert read["features/pre_relu"] <= 3 * index + 4 * (D * 2 + 64)  # 3 shard indexes + 4 distinct rows
