"""The demo pipeline end to end on a reduced size (every stage, re-run reuses finished stages), and the bench
JSON in a tiny profile: every stable key present with finite values (no timing thresholds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from stages import demo


def _tiny_manifest(tmp: Path) -> Path:
    out = tmp / "demo"
    text = f"""
demo_data: {{out: {out}/data, classes: 4, train_per_class: 6, val_per_class: 3, per_shard: 8}}
demo_teacher: {{train: {out}/data/train, out: {out}/teacher.pt, arch: resnet18, epochs: 1, batch_size: 8, resolution: 32}}
cache_teacher: {{shards: {out}/data/train, out: {out}/cache, teacher: resnet18, weights: {out}/teacher.pt,
                views: 2, resolution: 32, batch_size: 8, workers: 0, device: cpu}}
fit_svd: {{cache: {out}/cache, out: {out}/proj.npz, dim: 512}}
train_student: {{cache: {out}/cache, projection: [{out}/proj.npz], student: [resnet18], out: {out}/student,
                epochs: 1, batch_size: 8, workers: 0, device: cpu}}
eval: {{train: {out}/data/train, val: {out}/data/val, out: {out}/eval, resolution: 32, knn_k: 3,
       backbones: [random=resnet18:random, kdep=resnet18:{out}/student/backbone-resnet18.pt,
                   teacher=resnet18:{out}/teacher.pt]}}
"""
    path = tmp / "tiny.yaml"
    path.write_text(text)
    return path


def test_demo_runs_every_stage_and_reuses_finished_ones(tmp_path):
    manifest = _tiny_manifest(tmp_path)
    results = demo.run(manifest, quiet=True)
    names = [row["name"] for row in results["backbones"]]
    assert names == ["random", "kdep", "teacher"]
    for row in results["backbones"]:
        assert 0.0 <= row["probe_top1"] <= 1.0 and 0.0 <= row["knn_top1"] <= 1.0
    out = tmp_path / "demo"
    for produced in (
        "teacher.pt",
        "cache/store.zarr/zarr.json",
        "proj.npz.json",
        "student/done.json",
        "eval/results.json",
        "eval/results.png",
        "student/loss.png",
    ):
        assert (out / produced).exists(), produced
    stamps = {p: (out / p).stat().st_mtime_ns for p in ("teacher.pt", "proj.npz", "student/done.json")}
    again = demo.run(manifest, quiet=True)
    assert [r["probe_top1"] for r in again["backbones"]] == [r["probe_top1"] for r in results["backbones"]]
    assert stamps == {p: (out / p).stat().st_mtime_ns for p in stamps}


def test_bench_json_has_every_key_with_finite_values(tmp_path):
    """The quick profile's code path at a tinier size (the real `make bench QUICK=1` is the slow test below)."""
    from benchmarks.bench import RESULT_KEYS, Profile, run_bench

    tiny = Profile("cpu", "resnet18", "resnet18", 32, 2, 40, 8, 2, (2_000,), 64)
    results = run_bench("cpu", quick=True, out_dir=tmp_path, profile=tiny)
    _check_bench(results, RESULT_KEYS)


@pytest.mark.slow
def test_bench_quick_profile(tmp_path):
    from benchmarks.bench import RESULT_KEYS, run_bench

    _check_bench(run_bench("cpu", quick=True, out_dir=tmp_path), RESULT_KEYS)


def _check_bench(results: dict, keys: tuple[str, ...]) -> None:
    """Every stable key with finite values; every agreement check recorded in the JSON and within tolerance."""
    body = json.loads(Path(results["written"]).read_text())
    for key in keys:
        assert key in body, key
        values = body[key].values() if isinstance(body[key], dict) else [body[key]]
        if key not in ("machine", "checks"):
            assert all(v is not None and math.isfinite(float(v)) for v in values), key
    verdicts = {c["figure"]: c["passed"] for c in body["checks"]}
    assert {"svd_max_subspace_error_vs_numpy", "cached_vs_online_target_max_rel_error"} <= set(verdicts)
    assert all(verdicts.values()), verdicts
    assert Path(results["written"]).with_suffix(".png").is_file()


def test_bench_refuses_an_epoch_too_short_for_the_timed_steps(tmp_path):
    """Issue 14's `--device cuda` hang in small: more workers than each can fill one batch (20 images, 4 workers,
    batch 8: ~5 samples each, one short batch per worker) and more steps than the epoch has. The student
    benchmark times one epoch and never starts another loader, so this is an error naming the numbers, raised
    before any image is generated."""
    from benchmarks.bench import Profile, run_bench
    from pipeline.errors import KdepError

    degenerate = Profile("cpu", "resnet18", "resnet18", 32, 2, 20, 8, 4, (2_000,), 64, workers=4)
    with pytest.raises(KdepError, match=r"gives 4 batches .*20 images, 4 workers, batch 8.* needs 6"):
        run_bench("cpu", quick=True, out_dir=tmp_path, profile=degenerate)
    assert not (tmp_path / "bench-data").exists()


class _Loaders:
    """Stands in for PairLoaders: every epoch gives the same fixed batches."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes

    def for_epoch(self, epoch: int) -> list:
        import torch

        return [(torch.zeros(n, 3, 32, 32), torch.zeros(n, 512, dtype=torch.float16), torch.zeros(n, 3, dtype=torch.int64))
                for n in self.sizes]  # fmt: skip


@pytest.mark.parametrize("sizes", [[], [1, 1, 1, 1], [8, 1, 8]])
def test_student_timing_ends_with_an_error_when_the_epoch_runs_out(sizes):
    """An epoch with no usable batch (empty, or every worker's batch a singleton that stage 3 leaves out) or too
    few: a KdepError, never a wrap into further epochs (which used to spin forever on singletons)."""
    import torch

    from benchmarks.bench import Profile
    from benchmarks.bench_stages import _student_rate
    from pipeline.errors import KdepError
    from pipeline.student.specs import LossSpec
    from pipeline.student.training import StepContext

    prof = Profile("cpu", "resnet18", "resnet18", 32, 2, 20, 8, 2, (2_000,), 64, workers=4)
    ctx = StepContext(torch.device("cpu"), "off", LossSpec("kdep", 3.0))
    with pytest.raises(KdepError, match=f"gives {sum(n >= 2 for n in sizes)} batches"):
        _student_rate(_Loaders(sizes), ctx, None, prof)


def test_bench_images_are_imagenet_sized_jpegs_made_once(tmp_path):
    """The bench's generated shards: 375-500 px RGB JPEGs, byte-identical for the same spec, reused when present."""
    from benchmarks.bench_data import BenchData, bench_shards
    from pipeline.data.images import decode_rgb, image_bytes
    from pipeline.data.shards import iter_samples, list_shards

    spec = BenchData(images=6, shards=2, val_images=2)
    train = bench_shards(spec, tmp_path / "a")
    shards = list_shards(train)
    assert [s.samples for s in shards] == [3, 3]
    for info in shards:
        for s in iter_samples(info.path):
            assert "jpg" in s.fields
            assert all(375 <= side <= 500 for side in decode_rgb(image_bytes(s, info.path)).shape[1:])
    again = bench_shards(spec, tmp_path / "b")
    assert [s.sha256 for s in list_shards(again)] == [s.sha256 for s in shards]
    stamp = Path(shards[0].path).stat().st_mtime_ns
    assert bench_shards(spec, tmp_path / "a") == train
    assert Path(shards[0].path).stat().st_mtime_ns == stamp  # reused, not rewritten


@pytest.mark.slow
def test_bench_neighbours_runs_at_tiny_sizes_and_the_tables_agree(tmp_path):
    """``python -m benchmarks.bench_neighbours`` end to end at tiny sizes: every figure present and finite, the old
    and the new mining's neighbour sets equal, the samplers the same number of batches."""
    from benchmarks.bench_neighbours import main

    out = main(["--mine-rows", "700", "--sampler-rows", "5000", "--access-shards", "3", "4", "--access-rows",
                "100", "--access-dim", "32", "--warm", "1", "--timed", "2", "--dir", str(tmp_path),
                "--json", str(tmp_path / "nb.json")])  # fmt: skip
    assert json.loads((tmp_path / "nb.json").read_text()) == json.loads(json.dumps(out))
    assert out["mining"][0]["agreement"]["sets_differing"] == 0
    assert out["sampler"]["old"]["batches"] == out["sampler"]["new"]["batches"] == 5000 // (16 * 8)
    figures = out["imagenet_1k"]
    assert [row["shards"] for row in out["access"]] == [3, 4]
    assert all(math.isfinite(v) for part in ("mining_cpu_core_hours", "sampler_seconds_per_epoch")
               for v in figures[part].values())  # fmt: skip
