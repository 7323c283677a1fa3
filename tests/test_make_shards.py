"""`make-shards` round trip from a temporary ImageFolder: bytes kept, keys stable, corrupt files, exact --fraction."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.folder import ImageError
from pipeline.data.shards import iter_samples, list_shards
from stages.make_shards import MakeShardsConfig, run


def _folder(root: Path, per_class: dict[str, int], corrupt: str | None = None) -> Path:
    rng = np.random.default_rng(0)
    for c, n in per_class.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 255, size=(20 + i, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{c}_{i}.JPEG", quality=90)
    if corrupt:
        (root / corrupt).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_round_trip_keeps_bytes_labels_and_keys(tmp_path):
    src = _folder(tmp_path / "src", {"cats": 5, "dogs": 3})
    res = run(MakeShardsConfig(from_folder=str(src), out=str(tmp_path / "out"), per_shard=3))
    shards = list_shards(tmp_path / "out")
    assert [s.samples for s in shards] == [3, 3, 2] and res.classes == ["cats", "dogs"]
    seen = {}
    for info in shards:
        for sample in iter_samples(info.path):
            seen[sample.key] = sample
    assert len(seen) == 8 and all("." not in k for k in seen)
    s = seen["cats_3"]
    assert s.fields["jpg"] == (src / "cats" / "cats_3.JPEG").read_bytes()
    assert int(s.fields["cls"]) == 0 and int(seen["dogs_1"].fields["cls"]) == 1
    assert (tmp_path / "out" / "config.make_shards.json").is_file()


def test_corrupt_file_is_named_or_skipped_and_listed(tmp_path):
    src = _folder(tmp_path / "src", {"cats": 4, "dogs": 2}, corrupt="dogs/dogs_bad.JPEG")
    with pytest.raises(ImageError, match=r"unreadable image .*dogs_bad\.JPEG.*--skip-bad"):
        run(MakeShardsConfig(from_folder=str(src), out=str(tmp_path / "o1")))
    res = run(MakeShardsConfig(from_folder=str(src), out=str(tmp_path / "o2"), skip_bad=True))
    assert [p for p, _ in res.skipped] == ["dogs/dogs_bad.JPEG"]
    assert "dogs/dogs_bad.JPEG" in (tmp_path / "o2" / "skipped.txt").read_text()
    assert sum(s.samples for s in list_shards(tmp_path / "o2")) == 6


def test_fraction_keeps_exact_per_class_counts_seeded(tmp_path):
    src = _folder(tmp_path / "src", {"a": 20, "b": 30, "c": 11})
    res = run(MakeShardsConfig(from_folder=str(src), out=str(tmp_path / "o1"), fraction=0.1, seed=4))
    per_class = Counter(p.split("/")[0] for p in res.kept)
    assert per_class == {"a": 2, "b": 3, "c": 1}
    again = run(MakeShardsConfig(from_folder=str(src), out=str(tmp_path / "o2"), fraction=0.1, seed=4))
    other = run(MakeShardsConfig(from_folder=str(src), out=str(tmp_path / "o3"), fraction=0.5, seed=5))
    assert sorted(again.kept) == sorted(res.kept)
    assert Counter(p.split("/")[0] for p in other.kept) == {"a": 10, "b": 15, "c": 6}
    kept_file = (tmp_path / "o1" / "kept.txt").read_text().split()
    assert sorted(kept_file) == sorted(res.kept)
