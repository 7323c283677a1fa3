"""The cache's inode budget: the layout's formula (pipeline/cache/inodes.py) against `find CACHE | wc -l` on caches
of several shapes (shards, views, taps, teacher labels, some shards not done), and the one-pass folder walk
(pipeline.files.tree_usage) against find and an os.walk + stat reference: same counts and bytes, each folder listed
once, no os.stat / Path.stat per file. `kdep inspect`'s figures on a real cache are checked in test_cache_teacher.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import pipeline.files as files_module
from pipeline.cache.inodes import cache_inodes
from pipeline.cache.store import CacheLayout, ShardBlock, create_store, open_store
from pipeline.data.params import N_PARAMS
from pipeline.files import tree_usage

needs_find = pytest.mark.skipif(shutil.which("find") is None, reason="needs find(1)")


def find_count(root: Path, *args: str) -> int:
    """Lines of `find ROOT [args]`: the reference count."""
    out = subprocess.run(["find", str(root), *args], capture_output=True, text=True, check=True).stdout
    return len(out.splitlines())


def write_cache(path: Path, shards: int, views: int, taps: list[str], done: int) -> Path:
    """``shards`` shards of 3..5 rows, the first ``done`` written, every array off its fill value (Zarr skips such
    chunks)."""
    rng = np.random.default_rng(0)
    sizes = [3 + i % 3 for i in range(shards)]
    layout = CacheLayout(
        [{"name": f"s{i}", "samples": n} for i, n in enumerate(sizes)], views, dict.fromkeys(taps, 8)
    )
    create_store(path, layout, {"teacher": "synthetic"})
    store = open_store(path, "r+")
    for i, n in enumerate(sizes[:done]):
        feats = {t: rng.random((n, views, 8), dtype=np.float32) + 1 for t in taps}
        store.write_slot(i, ShardBlock([f"k{i}-{j}" for j in range(n)], feats,
                                       rng.random((n, views, N_PARAMS), dtype=np.float32) + 1,
                                       np.full((n, 2), 9, np.int32), np.full((n, 16), 5, np.uint8),
                                       np.ones(n, bool), offsets=np.arange(n, dtype=np.int64) * 1024 + 1))  # fmt: skip
    return path


@needs_find
@pytest.mark.parametrize(
    "shards,views,taps,done",
    [
        (1, 1, ["pre_relu"], 1),
        (3, 4, ["pre_relu"], 3),
        (4, 2, ["pre_relu", "stage1", "stage2", "stage3", "stage4"], 4),
        (2, 3, ["cnn/pre_relu", "vit/pooled", "vit/tokens"], 2),  # two teacher labels
        (5, 2, ["pre_relu"], 3),  # two shards not cached yet
    ],
)
def test_the_layouts_inode_formula_equals_find_on_the_cache(tmp_path, shards, views, taps, done):
    cache = write_cache(tmp_path / "cache", shards, views, taps, done)
    expected = cache_inodes(done, views, taps)
    assert expected.entries == find_count(cache)
    assert expected.files == find_count(cache, "-type", "f")
    usage = tree_usage(cache)
    assert (usage.entries, usage.files) == (expected.entries, expected.files)


def test_the_formula_as_written_in_the_docstring():
    """entries = 21 + 2L + 9S + (T+1)(2SK + S + 3), files = 7 + L + 6S + (T+1)(SK + 1); ImageNet's numbers."""
    for s, k, taps in [(1282, 10, ["pre_relu"]), (14198, 10, ["a/x", "a/y", "b/z"]), (7, 3, ["t1", "t2"])]:
        t, labels = len(taps), len({x.split("/")[0] for x in taps if "/" in x})
        got = cache_inodes(s, k, taps)
        assert got.entries == 21 + 2 * labels + 9 * s + (t + 1) * (2 * s * k + s + 3)
        assert got.files == 7 + labels + 6 * s + (t + 1) * (s * k + 1)
    assert cache_inodes(1282, 10, ["pre_relu"]).entries == 65_409
    assert cache_inodes(1282, 10, ["pre_relu", "stage1", "stage2", "stage3", "stage4"]).entries == 173_109


@needs_find
def test_tree_usage_walks_once_and_stats_each_file_once(tmp_path, monkeypatch):
    """Counts and bytes equal find and an os.walk + os.stat reference; every folder is listed once (no second
    walk for the features' bytes) and os.stat / Path.stat are never called (sizes come from the DirEntry)."""
    cache = write_cache(tmp_path / "cache", 3, 2, ["pre_relu"], 3)
    (cache / "runs.jsonl").write_text("{}\n")
    os.symlink(cache / "runs.jsonl", cache / "link")  # a link counts as an entry, never followed
    reference, under = 0, 0
    for folder, _dirs, names in os.walk(cache):
        for name in names:
            size = os.lstat(os.path.join(folder, name)).st_size
            reference += size
            under += size if Path(folder).is_relative_to(cache / "store.zarr" / "features") else 0
    listed: list[str] = []
    real_scandir = os.scandir

    def counting_scandir(path):
        listed.append(str(path))
        return real_scandir(path)

    def no_stat(*args, **kwargs):
        raise AssertionError("a per-file stat call outside the walk's DirEntry")

    monkeypatch.setattr(files_module.os, "scandir", counting_scandir)
    monkeypatch.setattr(files_module.os, "stat", no_stat)
    monkeypatch.setattr(Path, "stat", no_stat)
    usage = tree_usage(cache, ("store.zarr/features",))
    monkeypatch.undo()
    assert sorted(listed) == sorted(
        {str(p) for p in [cache, *cache.rglob("*")] if p.is_dir() and not p.is_symlink()}
    )
    assert len(listed) == usage.dirs == find_count(cache, "-type", "d")
    assert usage.files == find_count(cache, "!", "-type", "d")
    assert usage.entries == find_count(cache)
    assert usage.bytes == reference and usage.bytes_under == {"store.zarr/features": under} and under > 0
