"""`fit-svd` against references: numpy.linalg.svd on the same rows (singular values, subspace, signed basis),
two differently chunked caches of the same rows, hand-computed CS.var/CS.rand/interp channels and PTS/SN/SM
values, PTS at known points, the artefact round trip, every bad input's message, the dask.distributed path (slow)
and `run` end to end on a tiny cache.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.cache.store import CacheLayout, ShardBlock, StoreError, create_store, open_store
from pipeline.data.params import N_PARAMS
from pipeline.manifest import ConfigError
from pipeline.projection.artefact import (
    Projection,
    ProjectionError,
    load_projection,
    manifest_path,
    pts_numpy,
)
from pipeline.projection.fit import fit_projection, fix_signs, target_std, transform_scale
from pipeline.projection.moments import (
    EmptyCacheError,
    IncompleteCacheError,
    NonFiniteError,
    accumulate_stats,
    select_rows,
)
from stages.cli import app
from stages.fit_svd import FitSvdConfig, run

K, D = 2, 24  # views, teacher width of the synthetic caches


def make_features(n: int, seed: int = 0) -> np.ndarray:
    """(n, K, D) float16 with a decaying, well separated spectrum and a non-zero mean."""
    rng = np.random.default_rng(seed)
    mixing = np.linalg.qr(rng.standard_normal((D, D)))[0] * np.geomspace(4.0, 0.05, D)[:, None]
    return (rng.standard_normal((n, K, D)) @ mixing + 0.5).astype(np.float16)


def write_cache(
    path: Path,
    feats: np.ndarray,
    sizes: list[int],
    chunk_rows: int,
    valid: np.ndarray | None = None,
    done: set[int] | None = None,
) -> Path:
    """A cache holding ``feats`` split into shards of ``sizes`` rows (keys img<i>); only ``done`` shards written."""
    slot = chunk_rows * math.ceil(max(sizes) / chunk_rows)
    shards = [{"name": f"shard-{i}", "samples": n} for i, n in enumerate(sizes)]
    layout = CacheLayout(
        shards, views=feats.shape[1], dims={"pre_relu": feats.shape[2]}, slot_rows=slot, inner_rows=chunk_rows
    )
    create_store(path, layout, provenance={"teacher": "synthetic"})
    store, start = open_store(path, "r+"), 0
    valid = np.ones(len(feats), bool) if valid is None else valid
    for i, n in enumerate(sizes):
        rows = slice(start, start + n)
        if done is None or i in done:
            block = ShardBlock(
                keys=[f"img{j}" for j in range(start, start + n)],
                features={"pre_relu": feats[rows]},
                params=np.zeros((n, feats.shape[1], N_PARAMS), np.float32),
                hw=np.zeros((n, 2), np.int32),
                hashes=np.zeros((n, 16), np.uint8),
                valid=valid[rows],
            )
            store.write_slot(i, block)
        start += n
    return path


def fit(path: Path, dim: int, method: str = "svd", transform: str = "none", **sel) -> Projection:
    store = open_store(path)
    selection = select_rows(
        store, sel.get("views", ()), sel.get("fraction", 1.0), 0, sel.get("partial", False)
    )
    return fit_projection(accumulate_stats(store, "pre_relu", selection), method, dim, transform, seed=3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """150 images x 2 views; 5 invalid rows hold NaN (they must never be read); (path, reference rows (N, D))."""
    feats = make_features(150)
    valid = np.ones(150, bool)
    valid[[3, 40, 77, 120, 149]] = False
    feats[~valid] = np.nan
    path = write_cache(tmp_path_factory.mktemp("c") / "cache.zarr", feats, [60, 50, 40], 16, valid)
    return path, feats[valid].reshape(-1, D).astype(np.float64)


def test_svd_equals_numpy_svd(cache):
    path, x = cache
    proj = fit(path, 6)
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    np.testing.assert_allclose(proj.stats["singular_values"], s, rtol=1e-5)
    v = fix_signs(vt.T[:, :6])
    np.testing.assert_allclose(proj.basis, v, atol=1e-6)  # same subspace, same signs
    assert int(proj.stats["n_rows"]) == len(x)
    np.testing.assert_allclose(proj.targets_numpy(x), (x - x.mean(0)) @ v, atol=1e-5)
    np.testing.assert_allclose(proj.stats["std_before"], s[:6] / math.sqrt(len(x)), rtol=1e-6)
    np.testing.assert_allclose(proj.stats["explained_variance_ratio"], s[:6] ** 2 / (s**2).sum(), rtol=1e-6)


def test_result_does_not_depend_on_chunking(tmp_path):
    feats = make_features(90, seed=1)
    a = write_cache(tmp_path / "a.zarr", feats, [90], 8)
    b = write_cache(tmp_path / "b.zarr", feats, [25, 25, 25, 15], 5)
    for fraction in (1.0, 0.4):
        pa, pb = fit(a, 5, fraction=fraction), fit(b, 5, fraction=fraction)
        np.testing.assert_allclose(pa.basis, pb.basis, atol=1e-12)
        np.testing.assert_allclose(pa.mean, pb.mean, atol=1e-12)
        np.testing.assert_allclose(pa.stats["singular_values"], pb.stats["singular_values"], rtol=1e-12)
        assert int(pa.stats["n_rows"]) == int(pb.stats["n_rows"]) == round(90 * fraction) * K


def test_channel_methods_match_hand_computed_channels(cache):
    path, x = cache
    var = x.var(0)
    expected = {
        "cs-var": np.argsort(-var, kind="stable")[:5],
        "cs-rand": np.sort(np.random.default_rng(3).choice(D, 5, replace=False)),
        "interp": np.array([0, 4, 9, 14, 19]),  # floor(j * 24 / 5)
    }
    for method, channels in expected.items():
        proj = fit(path, 5, method)
        np.testing.assert_array_equal(proj.channels, channels)
        np.testing.assert_array_equal(proj.basis[channels, np.arange(5)], 1.0)
        assert proj.basis.sum() == 5 and not proj.mean.any()  # a 0/1 selection, uncentred
        np.testing.assert_allclose(proj.targets_numpy(x), x[:, channels], rtol=1e-12)
        np.testing.assert_allclose(proj.stats["std_before"], x[:, channels].std(0), rtol=1e-6)


def test_transforms_match_hand_computed_values(cache):
    path, x = cache
    pts = fit(path, 6, transform="pts")
    z = (x - pts.mean) @ pts.basis.astype(np.float64)  # the stored float32 mean and basis
    z_std, raw_std = z.std(0), x.std(0)
    np.testing.assert_allclose(pts.targets_numpy(x), np.sign(z) * np.abs(z / 0.1) ** (1 / 3), rtol=1e-6)
    sn = fit(path, 6, transform="sn")
    np.testing.assert_allclose(sn.targets_numpy(x).std(0), 1.0, rtol=1e-5)
    np.testing.assert_allclose(sn.scale, z_std, rtol=1e-5)
    ratio = raw_std.max() / raw_std.min()
    linear = fit(path, 6, transform="sm")
    assert linear.transform == "sm-linear"
    # KDEP src/resnet.py, "step2 > method 1", transcribed: s = singular values of the fit, R = STD_PRE_PCA
    s = linear.stats["singular_values"][:6]
    matching_term = (s[0] - ratio * s[-1] + (ratio - 1) * s) / (s[0] - s[-1])
    np.testing.assert_allclose(linear.targets_numpy(x).std(0), matching_term, rtol=1e-5)
    rank = fit(path, 6, transform="sm-rank")
    np.testing.assert_allclose(rank.targets_numpy(x).std(0), np.linspace(ratio, 1, 6), rtol=1e-5)
    assert np.abs(matching_term - np.linspace(ratio, 1, 6)).max() > 1e-3  # the two really differ here
    match = fit(path, 6, transform="sm-match")
    np.testing.assert_allclose(match.targets_numpy(x).std(0), np.sort(raw_std)[::-1][:6], rtol=1e-5)
    for proj in (sn, linear, rank, match):  # closed-form stds after = measured ones
        np.testing.assert_allclose(proj.stats["std_after"], proj.targets_numpy(x).std(0), rtol=1e-5)
    assert np.isnan(pts.stats["std_after"]).all()  # filled by the second pass in run()


def test_sm_linear_is_linear_in_the_std_and_sm_rank_in_the_rank():
    """By hand: stds (4, 1, 2), R = 3 -> sm-linear (1 + 2 s) / 3 = (3, 1, 5/3); sm-rank by rank = (3, 1, 2)."""
    std = np.array([4.0, 1.0, 2.0])
    raw = np.array([3.0, 1.0, 0.0, 2.0])  # R = 3 over the non-constant raw channels
    np.testing.assert_allclose(target_std("sm-linear", std, raw), [3.0, 1.0, 5 / 3])
    np.testing.assert_allclose(target_std("sm-rank", std, raw), [3.0, 1.0, 2.0])
    np.testing.assert_allclose(transform_scale("sm-linear", std, raw), [4 / 3, 1.0, 2 / (5 / 3)])
    np.testing.assert_allclose(target_std("sm-linear", np.array([2.0, 2.0]), raw), [3.0, 3.0])  # all equal: R
    np.testing.assert_allclose(target_std("sm-linear", np.array([5.0]), raw), [3.0])  # D_s = 1: R
    with_dead = target_std("sm-linear", np.array([4.0, 0.0, 1.0]), raw)  # a constant channel is left out ...
    np.testing.assert_allclose(with_dead[[0, 2]], [3.0, 1.0])
    assert transform_scale("sm-linear", np.array([4.0, 0.0, 1.0]), raw)[1] == 1.0  # ... and keeps scale 1


def _identity(transform: str = "pts", t: float = 0.1, n: float = 3.0) -> Projection:
    eye = np.eye(3, dtype=np.float32)
    return Projection(
        "svd", transform, np.zeros(3, np.float32), eye, np.ones(3, np.float32), np.zeros(0, np.int64), t, n
    )


def test_pts_is_odd_monotone_and_exact_at_known_points():
    z = torch.tensor([[0.8, 0.1, 2.7], [-0.8, 0.0, 0.0001]])
    y = _identity().targets(z)
    np.testing.assert_allclose(y.numpy(), [[2.0, 1.0, 3.0], [-2.0, 0.0, 0.1]], rtol=1e-6)
    np.testing.assert_allclose(pts_numpy(np.array([0.8, -0.8, 0.1 * 2**5]), 0.1, 5), [8**0.2, -(8**0.2), 2])
    grid = torch.linspace(-5, 5, 3000).reshape(-1, 3)
    flat = _identity(t=0.3, n=2.5).targets(grid).reshape(-1)
    assert torch.equal(_identity(t=0.3, n=2.5).targets(-grid).reshape(-1), -flat)  # odd, exactly
    assert (flat.diff() > 0).all()  # strictly increasing


def test_artefact_round_trip_and_tamper_checks(cache, tmp_path):
    path, x = cache
    result = run(FitSvdConfig(cache=str(path), out=str(tmp_path / "p.npz"), dim=7, quiet=True))
    loaded = load_projection(result.npz)
    assert loaded.meta["npz_sha256"] == json.loads(manifest_path(result.npz).read_text())["npz_sha256"]
    with np.load(result.npz) as data:
        assert set(data.files) >= {"mean", "basis", "scale", "channels", "transform", "pts_t", "pts_n"}
    for key in ("mean", "basis", "scale", "channels"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(result.projection, key))
    feats = torch.from_numpy(x[:32]).to(torch.float16)
    out = loaded.targets(feats)
    assert out.dtype == torch.float32 and out.shape == (32, 7)
    assert torch.equal(out, result.projection.targets(feats))
    np.testing.assert_allclose(out.numpy(), loaded.targets_numpy(feats.numpy()), atol=2e-5)
    with torch.inference_mode():  # a first call in inference mode must not poison later autograd use
        fresh = load_projection(result.npz)
        fresh.targets(feats)
    leaf = feats.float().requires_grad_()
    fresh.targets(leaf).sum().backward()  # cached mean/basis are normal tensors: autograd may save them
    assert leaf.grad is not None
    # std after pts: an exact second pass over the same rows
    np.testing.assert_allclose(loaded.stats["std_after"], loaded.targets_numpy(x).std(0), rtol=1e-6)
    man = manifest_path(result.npz)
    record = json.loads(man.read_text())
    man.write_text(json.dumps({**record, "npz_sha256": "0" * 64}))
    with pytest.raises(ProjectionError, match="does not match its manifest"):
        load_projection(result.npz)
    man.unlink()
    with pytest.raises(ProjectionError, match="has no manifest .*rerun `kdep fit-svd"):
        load_projection(result.npz)
    with pytest.raises(ProjectionError, match="width 5 given to a projection fitted on D_t=24"):
        loaded.targets(torch.zeros(2, 5))


def test_run_end_to_end_writes_everything(cache, tmp_path):
    path, _ = cache
    out = tmp_path / "sub" / "cs.npz"
    cfg = FitSvdConfig(
        cache=str(path),
        out=str(out),
        dim=4,
        method="cs-var",
        transform="sn",
        views=(1,),
        fraction=0.5,
        quiet=True,
    )
    result = run(cfg)
    record = json.loads(manifest_path(out).read_text())
    prov = record["provenance"]
    assert record["method"] == "cs-var" and record["transform"] == "sn" and record["dim_student"] == 4
    assert prov["cache_fingerprint"] == open_store(path).fingerprint() and prov["views"] == [1]
    assert prov["images"] == 72 and record["n_rows"] == 72 and prov["fraction"] == 0.5  # round(0.5 * 145)
    assert all(p.is_file() and p.stat().st_size > 1000 for p in result.plots)
    assert json.loads((out.parent / "config.fit_svd.json").read_text())["config"]["dim"] == 4
    assert record["std_ratio_after"] == pytest.approx(1.0)


def test_command_line_and_one_line_errors(cache, tmp_path):
    path, _ = cache
    runner = CliRunner()
    out = tmp_path / "p.npz"
    ok = runner.invoke(
        app, ["fit-svd", str(path), "--dim", "3", "--views", "0", "--out", str(out), "--quiet"]
    )
    assert ok.exit_code == 0, ok.output
    assert "wrote" in ok.output and load_projection(out).meta["views"] == [0]
    bad = runner.invoke(app, ["fit-svd", str(path), "--dim", "99", "--out", str(out)])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1
    assert "key 'dim': 99 is larger than D_t=24" in bad.output


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dim": 0}, "key 'dim': set the student width"),
        ({"dim": -2}, "key 'dim': value -2 is out of range"),
        ({"method": "pca"}, "key 'method': 'pca' is not one of 'svd', 'cs-var'"),
        ({"transform": "zca"}, "key 'transform': 'zca' is not one of 'pts'"),
        ({"pts_t": 0.0}, r"key 'pts_t': value 0.0 is out of range \(0.0, inf\]"),
        ({"pts_n": -1.0}, r"key 'pts_n': value -1.0 is out of range \(0.0, inf\]"),
        ({"fraction": 1.5}, "key 'fraction'"),
        ({"out": "p.pt"}, "must end in .npz"),
        ({"views": (0, 0)}, "repeats a view"),
        ({"cache": ""}, "keys 'cache' and 'out' are required"),
    ],
)
def test_bad_config_values_are_named(values, message):
    with pytest.raises(ConfigError, match=message):
        FitSvdConfig(**{"cache": "c.zarr", "out": "p.npz", "dim": 4, **values})


def test_bad_caches_are_refused_with_the_fix(cache, tmp_path):
    path, _ = cache

    def cfg(p: Path, **kw) -> FitSvdConfig:
        return FitSvdConfig(
            **{"cache": str(p), "out": str(tmp_path / "p.npz"), "dim": 2, "quiet": True, **kw}
        )

    with pytest.raises(ConfigError, match="larger than D_t=24"):
        run(cfg(path, dim=25))
    with pytest.raises(ConfigError, match=r"key 'views': \[2\] out of range; .* holds views 0..1"):
        run(cfg(path, views=(2,)))
    with pytest.raises(StoreError, match="has no tap 'post_relu'"):
        run(cfg(path, tap="post_relu"))
    with pytest.raises(StoreError, match="no feature cache at .*run `kdep cache-teacher`"):
        run(cfg(tmp_path))
    feats = make_features(30)
    empty = write_cache(tmp_path / "empty.zarr", feats, [10, 10, 10], 5, done=set())
    with pytest.raises(EmptyCacheError, match="has no finished shard"):
        run(cfg(empty))
    none_valid = write_cache(tmp_path / "nv.zarr", feats, [10, 20], 5, valid=np.zeros(30, bool))
    with pytest.raises(EmptyCacheError, match="hold no valid row"):
        run(cfg(none_valid))
    partial = write_cache(tmp_path / "partial.zarr", feats, [10, 10, 10], 5, done={0, 2})
    with pytest.raises(IncompleteCacheError, match="only 2 of 3 shards are done.*--allow-partial"):
        run(cfg(partial))
    record = run(cfg(partial, allow_partial=True)).projection.meta
    assert record["allow_partial"] and record["shards_done"] == 2 and record["images"] == 20


def test_nan_and_inf_rows_are_named_by_key(tmp_path):
    feats = make_features(30)
    feats[7, 1, 3] = np.nan
    feats[22, 0, 0] = np.inf
    path = write_cache(tmp_path / "bad.zarr", feats, [10, 10, 10], 4)
    with pytest.raises(
        NonFiniteError, match=r"2 rows of tap 'pre_relu' hold NaN/Inf: keys img7, img22 .*shard-0"
    ):
        run(FitSvdConfig(cache=str(path), out=str(tmp_path / "p.npz"), dim=2, quiet=True))


@pytest.mark.slow
@pytest.mark.parametrize("processes", [False, True])
def test_distributed_cluster_gives_the_local_result(cache, tmp_path, processes):
    from distributed import LocalCluster

    path, _ = cache
    local = run(FitSvdConfig(cache=str(path), out=str(tmp_path / "l.npz"), dim=5, quiet=True)).projection
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=processes, dashboard_address=None
    ) as cluster:
        cfg = FitSvdConfig(
            cache=str(path), out=str(tmp_path / "d.npz"), dim=5, scheduler=cluster.scheduler_address
        )
        dist = run(cfg).projection
    np.testing.assert_allclose(dist.basis, local.basis, atol=1e-12)
    np.testing.assert_allclose(dist.stats["std_after"], local.stats["std_after"], rtol=1e-12)
    assert dist.meta["config"]["scheduler"].startswith("tcp://") or dist.meta["config"][
        "scheduler"
    ].startswith("inproc://")


def test_cluster_progress_in_a_log_is_lines_counting_every_chunk(cache, tmp_path, capfd, monkeypatch):
    from distributed import LocalCluster

    monkeypatch.setenv("KDEP_PROGRESS_SECONDS", "0.2")
    path, _ = cache
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        run(
            FitSvdConfig(
                cache=str(path), out=str(tmp_path / "d.npz"), dim=5, scheduler=cluster.scheduler_address
            )
        )
    err = capfd.readouterr().err
    assert "\r" not in err
    for name in ("kdep-stats", "kdep-targets"):  # every chunk holding selected rows is counted once
        assert re.search(rf"^{name}: (\d+)/\1 chunk \(100%\)", err, flags=re.M), err


@pytest.mark.slow
def test_unreachable_scheduler_is_a_one_line_error(cache, tmp_path):
    from pipeline.projection.passes import SchedulerError

    path, _ = cache
    cfg = FitSvdConfig(
        cache=str(path), out=str(tmp_path / "p.npz"), dim=2, quiet=True, scheduler="tcp://127.0.0.1:1"
    )
    with pytest.raises(SchedulerError, match="cannot reach the dask scheduler at tcp://127.0.0.1:1"):
        run(cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_targets_on_cuda_are_float32_even_with_tf32_enabled(cache):
    path, x = cache
    proj = fit(path, 6, transform="pts")
    feats = torch.from_numpy(x[:64]).to(torch.float16)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        gpu = proj.targets(feats.cuda())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), proj.targets(feats), rtol=1e-5, atol=1e-5)
