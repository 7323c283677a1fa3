"""`make-shards` round trip from a temporary ImageFolder: bytes kept, keys stable, corrupt files, exact --fraction."""

from __future__ import annotations

import re
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


def _outputs(out: Path) -> dict[str, bytes]:
    """Every output file's bytes except the resolved config (it records the worker count and the out path)."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "config.make_shards.json"
    }


def _stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}


@pytest.mark.parametrize(("fraction", "corrupt"), [(1.0, "b/b_bad.JPEG"), (0.6, None)])
def test_output_is_byte_identical_for_one_and_two_workers(tmp_path, fraction, corrupt):
    src = _folder(tmp_path / "src", {"a": 9, "b": 7, "c": 6}, corrupt=corrupt)
    (src / "c" / "c_0.JPEG").write_bytes(_png_bytes())  # a PNG named .JPEG, stored as .png
    outputs, results = {}, {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        cfg = MakeShardsConfig(
            from_folder=str(src), out=str(out), per_shard=4, fraction=fraction, seed=2, skip_bad=True,
            workers=workers,
        )  # fmt: skip
        results[workers], outputs[workers] = run(cfg), _outputs(out)
    assert outputs[1] == outputs[2]
    shards = [k for k in outputs[1] if k.endswith(".tar")]
    assert len(shards) == len(results[1].shards) >= 3
    assert {"index.json", "kept.txt", "skipped.txt", "done/train-000000.json"} <= set(outputs[1])
    assert (
        results[1].skipped == results[2].skipped == ([(corrupt, results[1].skipped[0][1])] if corrupt else [])
    )
    assert results[1].kept == results[2].kept and results[1].reused == results[2].reused == 0


def _png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_rerun_after_a_crash_keeps_finished_shards_and_matches_a_straight_run(tmp_path, monkeypatch):
    import pipeline.data.folder as folder_module
    from pipeline.data.pool import TaskError

    src = _folder(tmp_path / "src", {"a": 8, "b": 7})  # 15 images, 3 per shard: 5 shards
    cfg = {"from_folder": str(src), "per_shard": 3, "workers": 0}
    run(MakeShardsConfig(out=str(tmp_path / "straight"), **cfg))
    want, out = _outputs(tmp_path / "straight"), tmp_path / "out"
    real = folder_module.make_shard

    def crash_at_shard_3(task):
        if task.out.endswith("train-000003.tar"):
            raise RuntimeError("simulated crash")
        return real(task)

    monkeypatch.setattr(folder_module, "make_shard", crash_at_shard_3)
    with pytest.raises(TaskError, match=r"train-000003\.tar: RuntimeError: simulated crash"):
        run(MakeShardsConfig(out=str(out), **cfg))
    monkeypatch.undo()
    assert sorted(p.name for p in out.glob("*.tar")) == [f"train-00000{i}.tar" for i in range(3)]
    assert not (out / "index.json").exists()
    (out / "train-000003.tar.tmp").write_bytes(b"left by a killed writer")
    before = _stats(out)
    res = run(MakeShardsConfig(out=str(out), **cfg))
    assert res.reused == 3 and _outputs(out) == want
    assert {k: v for k, v in _stats(out).items() if k in before} == before  # not rewritten, not even touched


def test_rerun_rewrites_deleted_and_corrupted_shards_only(tmp_path):
    src = _folder(tmp_path / "src", {"a": 8, "b": 7})
    cfg = MakeShardsConfig(from_folder=str(src), out=str(tmp_path / "out"), per_shard=3, workers=2)
    run(cfg)
    out = tmp_path / "out"
    want = _outputs(out)
    data = bytearray((out / "train-000001.tar").read_bytes())
    data[600] ^= 0xFF  # same size, different bytes: only the sha256 tells
    (out / "train-000001.tar").write_bytes(bytes(data))
    (out / "train-000003.tar").unlink()
    (out / "index.json").unlink()
    before = _stats(out)
    res = run(cfg)
    assert res.reused == 3 and _outputs(out) == want
    after = _stats(out)
    assert {n: after[n] for n in ("train-000000.tar", "train-000002.tar", "train-000004.tar")} == {
        n: before[n] for n in ("train-000000.tar", "train-000002.tar", "train-000004.tar")
    }
    assert after["train-000001.tar"] != before["train-000001.tar"]
    assert run(cfg).reused == 5 and _outputs(out) == want


def test_rerun_rewrites_shards_whose_inputs_or_plan_changed(tmp_path):
    src = _folder(tmp_path / "src", {"a": 8, "b": 7}, corrupt="a/a_bad.JPEG")
    out = tmp_path / "out"
    cfg = {"from_folder": str(src), "out": str(out), "per_shard": 3, "skip_bad": True}
    first = run(MakeShardsConfig(**cfg))
    with pytest.raises(
        ImageError, match=r"a_bad\.JPEG"
    ):  # a shard with a skip is not kept without --skip-bad
        run(MakeShardsConfig(**{**cfg, "skip_bad": False}))
    Image.fromarray(np.full((9, 9, 3), 7, np.uint8)).save(src / "b" / "b_2.JPEG")  # a changed image
    second = run(MakeShardsConfig(**cfg))
    holder = next(s["name"] for s in second.shards if s not in first.shards)
    assert second.reused == len(first.shards) - 1
    sample = {s.key: s for s in iter_samples(out / holder)}["b_2"]
    assert sample.fields["jpg"] == (src / "b" / "b_2.JPEG").read_bytes()
    run(MakeShardsConfig(**{**cfg, "per_shard": 8}))  # a smaller plan: the shards beyond it are removed
    run(MakeShardsConfig(**{**cfg, "per_shard": 8, "out": str(tmp_path / "fresh")}))
    assert _outputs(out) == _outputs(tmp_path / "fresh")


def test_errors_in_workers_are_one_line_naming_the_file_or_shard(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    src = _folder(tmp_path / "src", {"a": 6, "b": 6}, corrupt="b/b_bad.JPEG")
    args = ["make-shards", "--from-folder", str(src), "--per-shard", "2", "--workers", "2"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o1")])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(errors) == 1 and re.search(r"unreadable image .*b_bad\.JPEG.*--skip-bad", errors[0])
    (tmp_path / "o2" / "train-000004.tar.tmp").mkdir(
        parents=True
    )  # the shard's temporary file cannot be made
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o2"), "--skip-bad"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(errors) == 1 and re.search(r"cannot write .*train-000004\.tar: .*directory", errors[0])


def test_a_shard_whose_images_are_all_skipped_is_an_empty_tar_in_the_index(tmp_path):
    from pipeline.data.shards import count_samples

    src = _folder(tmp_path / "src", {"a": 3}, corrupt="a/a_bad.JPEG")
    res = run(MakeShardsConfig(from_folder=str(src), out=str(tmp_path / "o"), per_shard=1, skip_bad=True))
    shards = list_shards(tmp_path / "o")
    assert len(shards) == 4 and sorted(s.samples for s in shards) == [0, 1, 1, 1]
    assert [count_samples(s) for s in shards] == [s.samples for s in shards]
    assert [p for p, _ in res.skipped] == ["a/a_bad.JPEG"] and len(res.kept) == 3


def test_listing_matches_pathlib_rglob_order_on_nested_folders(tmp_path):
    from pipeline.data.folder import IMAGE_SUFFIXES, list_folder

    src = tmp_path / "src"
    names = ["a/x-z.jpg", "a/x/y.jpg", "a/x/y2.PNG", "a/B.jpeg", "a/b.jpg", "a/sub/deep/q.webp", "a/.h.jpg",
             "b/10.jpg", "b/2.jpg", "b/z/0.jpg", "b/z-0.jpg", "b/z.0.jpg", "b/readme.txt", "c d/é.jpg"]  # fmt: skip
    for name in names:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(b"x")
    (src / "a" / "link").symlink_to(src / "b" / "z")  # a symlinked folder: listed by neither, not entered
    (src / "a" / "l2.jpg").symlink_to(src / "b" / "2.jpg")  # a symlinked file: listed
    classes, files = list_folder(src)
    reference = {  # what make-shards listed before (pathlib objects, sorted as paths)
        c: [
            str(p.relative_to(src))
            for p in sorted((src / c).rglob("*"))
            if p.suffix.lower() in IMAGE_SUFFIXES
        ]
        for c in classes
    }
    assert classes == ["a", "b", "c d"] and files == reference
    assert "a/l2.jpg" in files["a"] and files["b"].index("b/z/0.jpg") < files["b"].index("b/z-0.jpg")
