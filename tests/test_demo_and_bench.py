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
cache_teacher: {{shards: {out}/data/train, out: {out}/cache.zarr, teacher: resnet18, weights: {out}/teacher.pt,
                views: 2, resolution: 32, batch_size: 8, workers: 0, device: cpu}}
fit_svd: {{cache: {out}/cache.zarr, out: {out}/proj.npz, dim: 512}}
train_student: {{cache: {out}/cache.zarr, projection: [{out}/proj.npz], student: [resnet18], out: {out}/student,
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
        "cache.zarr/zarr.json",
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
    body = json.loads(Path(results["written"]).read_text())
    for key in keys:
        assert key in body, key
        values = body[key].values() if isinstance(body[key], dict) else [body[key]]
        if key != "machine":
            assert all(v is not None and math.isfinite(float(v)) for v in values), key
    assert Path(results["written"]).with_suffix(".png").is_file()
