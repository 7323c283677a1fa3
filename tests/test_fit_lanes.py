"""fit-svd's lanes (slots read at once): the choice against hand-computed caps with monkeypatched cores and memory
(psutil, the cgroup limit), the per-lane bytes against tracemalloc's peak of one lane step, the cap applied to the
scheduler (at most ``lanes`` chunk reads at once), the banner and the manifest, and the fit at 1, 2 and 3 lanes:
equal to float64 rounding (the summation order of the chunk partials changes; the bound is checked), and
bit-identical for the same lane count.
"""

from __future__ import annotations

import json
import threading
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import pipeline.projection.lanes as lanes_module
import pipeline.projection.passes as passes
from pipeline.cache.store import CacheLayout, ShardBlock, create_store, open_store
from pipeline.data.params import N_PARAMS
from pipeline.manifest import ConfigError
from pipeline.projection.fit import fit_projection
from pipeline.projection.lanes import (
    LANE_OVERHEAD,
    MEMORY_SHARE,
    cgroup_headroom,
    choose_lanes,
    lane_bytes,
    plan_lanes,
)
from pipeline.projection.moments import accumulate_stats, chunk_moments, chunk_target_moments, select_rows
from stages.fit_svd import FitSvdConfig, run

MIB = 2**20


def float_cache(path: Path, shards: int, rows: int, views: int, dim: int, dtype: str, seed: int = 0) -> Path:
    """A cache of ``shards`` x ``rows`` random rows (every array non-zero); float32 rows make float64 sums round."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((dim, dim)) * np.geomspace(3.0, 0.1, dim)[:, None]
    layout = CacheLayout(
        [{"name": f"s{i}", "samples": rows} for i in range(shards)], views, {"pre_relu": dim}, dtype=dtype
    )
    create_store(path, layout, {"teacher": "synthetic"})
    store = open_store(path, "r+")
    for i in range(shards):
        feats = (rng.standard_normal((rows, views, dim)) @ mixing + 0.7).astype(dtype)
        block = ShardBlock([f"k{i}-{j}" for j in range(rows)], {"pre_relu": feats},
                           rng.random((rows, views, N_PARAMS), dtype=np.float32) + 1,
                           np.full((rows, 2), 7, np.int32), np.full((rows, 16), 3, np.uint8),
                           np.ones(rows, bool))  # fmt: skip
        store.write_slot(i, block)
    return path


@pytest.fixture(scope="module")
def f32_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return float_cache(tmp_path_factory.mktemp("lanes") / "cache", 6, 40, 2, 16, "float32")


def test_choice_takes_the_smallest_cap_and_names_it():
    gib = 2**30
    per_lane = 200 * MIB
    # 192 cores, 8 GiB available: MEMORY_SHARE of it holds 20 lanes of 200 MiB
    auto = choose_lanes(0, 192, 1282, per_lane, 8 * gib)
    assert (auto.lanes, auto.limited_by, auto.by_memory) == (
        int(MEMORY_SHARE * 8 * gib // per_lane),
        "memory",
        20,
    )
    cores = choose_lanes(0, 2, 1282, per_lane, 64 * gib)
    assert (cores.lanes, cores.limited_by) == (2, "cores")
    flag = choose_lanes(4, 16, 1282, per_lane, 64 * gib)
    assert (flag.lanes, flag.limited_by) == (4, "--lanes")
    capped = choose_lanes(64, 192, 1282, per_lane, 4 * gib)  # the flag never exceeds what memory holds
    assert (capped.lanes, capped.limited_by) == (10, "memory")
    few = choose_lanes(0, 16, 3, per_lane, 64 * gib)
    assert (few.lanes, few.limited_by) == (3, "slots")
    starved = choose_lanes(0, 16, 100, per_lane, 100 * MIB)  # not even one lane fits: one, and said loudly
    assert (starved.lanes, starved.by_memory) == (1, 0)
    assert "NOT ENOUGH MEMORY FOR ONE LANE" in starved.describe()
    assert "10 lanes (memory: 0.20 GiB a lane, 4.0 GiB available, 192 cores, --lanes 64)" == capped.describe()


def test_plan_reads_cores_and_memory_from_the_system(f32_cache, monkeypatch):
    """plan_lanes with monkeypatched cores (affinity), psutil's available memory and no cgroup limit."""
    store = open_store(f32_cache)
    sel = select_rows(store, (), 1.0, 0, False)
    expected = lane_bytes(store.layout.slot_rows, 2, 16, 4, 4, copies_rows=False)
    monkeypatch.setattr(lanes_module.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(lanes_module, "cgroup_headroom", lambda: None)
    monkeypatch.setattr("psutil.virtual_memory", lambda: SimpleNamespace(available=3 * expected))
    choice = plan_lanes(store, "pre_relu", sel, 4)
    assert choice.lane_bytes == expected
    assert (choice.cores, choice.by_memory, choice.lanes, choice.limited_by) == (64, 1, 1, "memory")
    monkeypatch.setattr("psutil.virtual_memory", lambda: SimpleNamespace(available=1000 * expected))
    assert (
        plan_lanes(store, "pre_relu", sel, 4).lanes,
        plan_lanes(store, "pre_relu", sel, 4).limited_by,
    ) == (
        6,
        "slots",
    )
    assert plan_lanes(store, "pre_relu", sel, 4, requested=2).lanes == 2
    monkeypatch.setattr(lanes_module, "cgroup_headroom", lambda: 4 * expected)  # the job's limit is tighter
    assert plan_lanes(store, "pre_relu", sel, 4).by_memory == 2
    subset = select_rows(store, (), 0.5, 0, False)  # rows with gaps: each lane copies its selected rows
    assert plan_lanes(store, "pre_relu", subset, 4).lane_bytes == lane_bytes(
        store.layout.slot_rows, 2, 16, 4, 4, copies_rows=True
    )


def test_cgroup_headroom_reads_v2_and_v1_limits(tmp_path):
    assert cgroup_headroom(tmp_path) is None  # no cgroup files
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("100\n")
    assert cgroup_headroom(tmp_path) is None  # v2 without a limit
    (tmp_path / "memory.max").write_text("1000\n")
    assert cgroup_headroom(tmp_path) == 900
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("5000\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("1200\n")
    assert cgroup_headroom(v1) == 3800
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # v1's "no limit"
    assert cgroup_headroom(v1) is None


def _peak(fn, *args) -> int:
    """Peak bytes traced while ``fn(*args)`` runs (its result included), above what was allocated before."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result = fn(*args)
        peak = tracemalloc.get_traced_memory()[1] - before
        del result
        return peak
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_lane_bytes_bound_the_measured_peak_of_one_lane_step(tmp_path, fraction):
    """One lane step of each pass (read a slot, its partial sums, added to a running total) peaks below the
    computed per-lane bytes (less the untraced overhead), and above 60% of them: the formula is not loose."""
    dim, views, dim_s = 256, 4, 64
    path = float_cache(tmp_path / "c", 2, 500, views, dim, "float16")
    store = open_store(path)
    sel = select_rows(store, (), fraction, 0, False)
    r = store.layout.slot_rows
    local, columns = np.flatnonzero(sel.rows[:r]), tuple(range(views))
    source = (str(store.zarr_path), "pre_relu", 0, r, sel.views)
    prior = chunk_moments(passes.read_chunk(*source), local, columns, 0)
    stats = accumulate_stats(store, "pre_relu", sel)
    proj = fit_projection(stats, "svd", dim_s, "pts", 0.1, 3.0, 0)
    peak = max(
        _peak(passes.add_chunk, prior, chunk_moments, source, local, columns, 0),
        _peak(passes.add_chunk, None, chunk_target_moments, source, local, columns, 0, proj),
    )
    planned = lane_bytes(r, views, dim, 2, dim_s, copies_rows=fraction < 1) - LANE_OVERHEAD
    assert 0.6 * planned <= peak <= planned, (peak / MIB, planned / MIB)


def test_the_scheduler_runs_at_most_lanes_chunk_reads_at_once(f32_cache, monkeypatch):
    store = open_store(f32_cache)
    sel = select_rows(store, (), 1.0, 0, False)
    real, lock, state = passes.read_chunk, threading.Lock(), {"now": 0, "most": 0}

    def counting(*args):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.02)  # keep the read open, so concurrent reads overlap
        try:
            return real(*args)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(passes, "read_chunk", counting)
    for lanes in (1, 2):
        state["most"] = 0
        accumulate_stats(store, "pre_relu", sel, lanes=lanes)
        assert 1 <= state["most"] <= lanes


def test_fit_at_1_2_and_3_lanes_is_equal_to_float64_rounding(f32_cache):
    """float32 rows: every product is exact in float64 but the sums round, so the lane count (which changes how
    the six slots' partial sums associate) may change the last bits, within 2 x slots x eps x sum |x_i x_j|; the
    same lane count gives the same bits."""
    store = open_store(f32_cache)
    sel = select_rows(store, (), 1.0, 0, False)
    x = store.feature_array("pre_relu")[:].reshape(-1, 16)[np.repeat(store.valid(), 2)].astype(np.float64)
    eps2 = 2 * 6 * np.finfo(np.float64).eps  # two orders of six slot partials, each off by at most 6 eps
    bound, bound_sum = eps2 * (np.abs(x).T @ np.abs(x)), eps2 * np.abs(x).sum(axis=0)
    fits = {lanes: accumulate_stats(store, "pre_relu", sel, lanes=lanes) for lanes in (1, 2, 3)}
    for lanes in (2, 3):
        assert fits[lanes].n == fits[1].n == len(x)
        assert np.all(np.abs(fits[lanes].gram - fits[1].gram) <= bound)
        assert np.all(np.abs(fits[lanes].col_sum - fits[1].col_sum) <= bound_sum)
        np.testing.assert_allclose(fits[lanes].gram, x.T @ x, rtol=1e-12)
        a, b = (fit_projection(fits[n], "svd", 4, "pts", 0.1, 3.0, 0) for n in (1, lanes))
        np.testing.assert_allclose(a.basis, b.basis, atol=1e-6)  # float32 basis, same signs
    again = accumulate_stats(store, "pre_relu", sel, lanes=2)
    assert np.array_equal(again.gram, fits[2].gram) and np.array_equal(again.col_sum, fits[2].col_sum)


def test_banner_and_manifest_report_the_lanes(f32_cache, tmp_path, capsys):
    result = run(FitSvdConfig(cache=str(f32_cache), out=str(tmp_path / "p.npz"), dim=4, lanes=1))
    banner = capsys.readouterr().err.splitlines()[0]
    assert "dask: local threads, 1 lane (--lanes: " in banner and ", --lanes 1)" in banner
    recorded = json.loads(result.manifest.read_text())["provenance"]["lanes"]
    assert recorded["lanes"] == 1 and recorded["requested"] == 1 and recorded["limited_by"] == "--lanes"
    assert recorded["lane_bytes"] > 0 and recorded["available_bytes"] > 0 and recorded["slots"] == 6
    with pytest.raises(ConfigError, match="key 'lanes': value -1 is out of range"):
        FitSvdConfig(cache="c", out="p.npz", dim=4, lanes=-1)
