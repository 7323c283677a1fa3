"""Shard listing, counting without decoding, truncation and duplicate-key detection, demo-data determinism."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.shards import ShardError, count_samples, iter_samples, list_shards, scan_shard, write_shard
from pipeline.demo.shards import DemoSpec, write_demo_data


def _digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_demo_data_is_byte_identical_for_a_seed_and_differs_for_another(tmp_path):
    spec = DemoSpec(seed=7, classes=3, train_per_class=4, val_per_class=2, per_shard=5)
    write_demo_data(spec, tmp_path / "a")
    write_demo_data(spec, tmp_path / "b")
    write_demo_data(
        DemoSpec(seed=8, classes=3, train_per_class=4, val_per_class=2, per_shard=5), tmp_path / "c"
    )
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b
    assert a["train-000000.tar"] != c["train-000000.tar"]


def test_demo_data_has_imagenet_like_variety(demo_shards):
    modes, sizes, exts = set(), set(), set()
    for info in list_shards(demo_shards["train"]):
        for sample in iter_samples(info.path):
            ext = next(e for e in sample.fields if e != "cls")
            exts.add(ext)
            import io

            with Image.open(io.BytesIO(sample.fields[ext])) as im:
                modes.add(im.mode)
                sizes.add(im.size)
            assert 0 <= int(sample.fields["cls"]) < 4
    assert {"jpg", "png"} <= exts
    assert {"RGB", "L", "CMYK", "RGBA"} <= modes
    assert len({w / h for w, h in sizes}) > 10 and all(64 <= s <= 256 for wh in sizes for s in wh)


def test_list_shards_from_dir_index_and_pattern(demo_shards):
    d = demo_shards["train"]
    from_dir = list_shards(d)
    assert [s.name for s in from_dir] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s.samples for s in from_dir] == [8, 8, 8]
    assert list_shards(d / "index.json") == from_dir
    by_pattern = list_shards(str(d / "train-{000000..000002}.tar"))
    assert [s.path for s in by_pattern] == [s.path for s in from_dir]
    assert all(s.samples is None for s in by_pattern)
    assert sum(count_samples(s) for s in from_dir) == 24


def test_missing_shard_is_named(demo_shards):
    with pytest.raises(ShardError, match="no shard at .*train-000003.tar"):
        list_shards(str(demo_shards["train"] / "train-{000002..000003}.tar"))


def _copy_truncated(src: Path, dst: Path, keep: int) -> Path:
    dst.write_bytes(src.read_bytes()[:keep])
    return dst


def test_truncated_tar_is_detected_mid_member_and_at_a_header_boundary(demo_shards, tmp_path):
    src = demo_shards["train"] / "train-000000.tar"
    with tarfile.open(src) as tar:
        members = tar.getmembers()
    boundary = members[6].offset  # cut exactly before the 4th sample's first header
    mid = members[6].offset_data + 100
    for cut in (boundary, mid):
        bad = _copy_truncated(src, tmp_path / f"cut{cut}.tar", cut)
        with pytest.raises(ShardError, match=rf"cut{cut}\.tar: truncated"):
            scan_shard(bad)


def test_count_mismatch_with_index_is_named(demo_shards):
    info = list_shards(demo_shards["train"])[0]
    from dataclasses import replace

    with pytest.raises(ShardError, match="8 samples in the tar but the index says 9"):
        count_samples(replace(info, samples=9))


def test_duplicate_key_in_a_shard_is_an_error(tmp_path):
    path = tmp_path / "dup.tar"
    write_shard(path, [("a", {"cls": b"1"}), ("b", {"cls": b"1"})])
    with tarfile.open(path, "a") as tar:  # append a second sample with key "a"
        import io

        info = tarfile.TarInfo("a.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"2"))
    with pytest.raises(ShardError, match="duplicate key 'a'"):
        scan_shard(path)


def test_write_shard_refuses_dotted_keys(tmp_path):
    with pytest.raises(ShardError, match="contains a dot"):
        write_shard(tmp_path / "x.tar", [("a.b", {"cls": b"1"})])


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile_for_long_names_and_formats(tmp_path, fmt):
    import io

    from pipeline.data.tarstream import iter_members

    path = tmp_path / "t.tar"
    names = [
        "a.jpg",
        "a.cls",
        "d/" + "x" * 120 + ".jpg",
        "d/" + "x" * 120 + ".cls",
        "p" * 90 + "/q" * 40 + ".png",
    ]
    if fmt == tarfile.USTAR_FORMAT:
        names = names[:2] + ["dir/" + "y" * 60 + ".jpg"]
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, name in enumerate(names):
            data = bytes([i]) * (100 + 700 * i)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        want = [(m.name, m.offset, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with open(path, "rb") as fh:
        got = list(iter_members(fh))
    assert [(n, d) for n, _, d in got] == [(n, d) for n, _, d in want]
    assert [o for _, o, _ in got][0] == 0


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_sample_spans_locate_every_member_and_fields_reads_only_those(tmp_path, fmt):
    """``iter_samples(fields=...)`` reads only the named members; every member's (data offset, size) span, read
    back from the file, equals the member's bytes as a full read gives them (long names and pax headers too)."""
    path = tmp_path / "t.tar"
    long_key = (
        "d" * 60 + "/" + "x" * 60 if fmt == tarfile.USTAR_FORMAT else "d/" + "x" * 120
    )  # prefix / long name
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, key in enumerate(["a", long_key, "b"]):
            for ext, data in (("jpg", bytes([i + 1]) * (300 + 900 * i)), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    full = list(iter_samples(path))
    only = list(iter_samples(path, fields=("cls",)))
    raw = path.read_bytes()
    assert [s.key for s in only] == [s.key for s in full] and len(full) == 3
    for a, b in zip(full, only, strict=True):
        assert set(b.fields) == {"cls"} and b.fields["cls"] == a.fields["cls"] and b.offset == a.offset
        assert a.spans == b.spans and set(a.spans) == {"jpg", "cls"}
        for ext, (start, size) in b.spans.items():
            assert raw[start : start + size] == a.fields[ext]
    with pytest.raises(ValueError, match="digest"):
        next(iter_samples(path, hashlib.sha256(), fields=("cls",)))


def test_corrupt_tar_header_is_named(demo_shards, tmp_path):
    bad = tmp_path / "bad.tar"
    data = bytearray((demo_shards["train"] / "train-000000.tar").read_bytes())
    data[5] ^= 0x55  # inside the first member's name: the header checksum no longer matches
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"bad\.tar: corrupt tar header at byte 0"):
        scan_shard(bad)


def test_write_shard_hashes_while_writing_the_bytes_plain_tarfile_writes(tmp_path):
    import io

    rng = np.random.default_rng(0)
    samples = [(f"k{i}", {"jpg": rng.bytes(n), "cls": b"3"}) for i, n in enumerate((1, 511, 40_000, 70_001))]
    record = write_shard(tmp_path / "s.tar", samples)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:  # the reference writer
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
    on_disk = (tmp_path / "s.tar").read_bytes()
    assert on_disk == buf.getvalue()
    assert record == {
        "name": "s.tar",
        "samples": 4,
        "bytes": len(on_disk),
        "sha256": hashlib.sha256(on_disk).hexdigest(),
    }
