"""Stage 2 `fit-svd`: fit a projection (teacher D_t -> student D_s) from the feature cache, out of core.

    kdep fit-svd out/demo/cache --dim 512 --method svd --transform pts --out out/demo/proj-r18.npz
    kdep fit-svd out/demo/cache --dim 1280 --out out/demo/proj-mnv2.npz          # same cache, other student
    kdep fit-svd CACHE --dim 512 --views 0 --fraction 0.1 --seed 0 --out proj.npz      # one view, 10% of images
    kdep fit-svd CACHE --dim 512 --scheduler tcp://host:8786 --out proj.npz           # on a dask cluster
    kdep fit-svd CACHE --dim 512 --lanes 8 --out proj.npz     # at most 8 slots at once (default: cores, memory)
    make fit-svd

Reads the cache (one pass over the done shards' valid rows; a second pass for the stds after ``pts``). Writes
``OUT`` (.npz: mean, basis, scale, ... see pipeline/projection/artefact.py), ``OUT.json`` (manifest, written last),
``<stem>.explained_variance.png``, ``<stem>.channel_std.png`` and ``config.fit_svd.json`` beside it.
Methods: svd, cs-var, cs-rand, interp; transforms: pts (default), sn, sm (= sm-linear), sm-linear, sm-rank, sm-match,
none (definitions in pipeline/projection/fit.py).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, replace
from pathlib import Path

import dask
import numpy as np
import typer
import zarr

import pipeline
from pipeline.cache.store import FeatureStore, open_store
from pipeline.manifest import ConfigError, config_to_dict
from pipeline.projection.artefact import Projection, manifest_path
from pipeline.projection.fit import SIGN_RULE, fit_projection, with_target_std
from pipeline.projection.lanes import LaneChoice, plan_lanes
from pipeline.projection.moments import RowSelection, accumulate_stats, select_rows, target_moments
from pipeline.projection.plots import write_plots
from stages.common import write_resolved_config
from stages.config import FitSvdConfig


@dataclass(frozen=True)
class FitSvdResult:
    projection: Projection  # the fitted projection (as saved)
    npz: Path  # the artefact
    manifest: Path  # its manifest (written last)
    plots: list[Path]  # explained variance, channel std


def check_against_cache(config: FitSvdConfig, store: FeatureStore) -> None:
    """Config values that depend on the cache: the tap, dim <= D_t, views < K."""
    d_t = store.feature_array(config.tap).shape[-1]
    if config.dim > d_t:
        raise ConfigError(
            f"key 'dim': {config.dim} is larger than D_t={d_t} (tap {config.tap!r} of {store.path}); "
            f"use --dim <= {d_t}"
        )
    k = store.layout.views
    bad = [v for v in config.views if v >= k]
    if bad:
        raise ConfigError(f"key 'views': {bad} out of range; {store.path} holds views 0..{k - 1}")


def describe(config: FitSvdConfig, store: FeatureStore, sel: RowSelection, lanes: LaneChoice | None) -> str:
    """Start-up banner: what is read, what is fitted and where (lanes: None on a cluster)."""
    array = store.feature_array(config.tap)
    chunk_bytes = array.nbytes // (array.shape[0] * array.shape[1]) * store.layout.slot_rows * len(sel.views)
    n_chunks = np.unique(np.flatnonzero(sel.rows) // store.layout.slot_rows).size
    where = f"local threads, {lanes.describe()}" if lanes else f"{config.scheduler}, {cluster_lanes(config)}"
    return (
        f"fit-svd: {store.path} tap {config.tap} D_t={array.shape[-1]} | shards {sel.shards_done}/"
        f"{sel.shards_total} done | {sel.images} images x {len(sel.views)} views = {sel.samples} rows | "
        f"{n_chunks} slots, {n_chunks * chunk_bytes / 2**20:.0f} MiB to read | {config.method} -> "
        f"D_s={config.dim}, {config.transform} | dask: {where}"
    )


def cluster_lanes(config: FitSvdConfig) -> str:
    return f"at most {config.lanes} lanes" if config.lanes else "one lane per worker thread"


def provenance(
    config: FitSvdConfig, store: FeatureStore, sel: RowSelection, lanes: LaneChoice | None
) -> dict:
    """What the manifest records about where the projection came from."""
    return {
        "cache_fingerprint": store.fingerprint(),
        "cache_path": str(Path(config.cache).resolve()),
        "cache_provenance": store.provenance,
        "tap": config.tap,
        "views": list(sel.views),
        "images": sel.images,
        "fraction": config.fraction,
        "fraction_unit": "images (cache rows), exact seeded subset",
        "seed": config.seed,
        "allow_partial": config.allow_partial,
        "shards_done": sel.shards_done,
        "shards_total": sel.shards_total,
        "sign_rule": SIGN_RULE,
        "lanes": lanes.record() if lanes else {"scheduler": config.scheduler, "lanes": cluster_lanes(config)},
        "std_after_source": "exact second pass" if config.transform == "pts" else "closed form (exact)",
        "config": config_to_dict(config),
        "versions": {
            "kdep": pipeline.__version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "dask": dask.__version__,
            "zarr": zarr.__version__,
        },
    }


def run(config: FitSvdConfig) -> FitSvdResult:
    """Select rows, accumulate stats (pass 1), fit, measure target stds (pass 2, pts only), plot, save."""
    store = open_store(config.cache)
    check_against_cache(config, store)
    sel = select_rows(store, config.views, config.fraction, config.seed, config.allow_partial)
    lanes = None if config.scheduler else plan_lanes(store, config.tap, sel, config.dim, config.lanes)
    n_lanes = lanes.lanes if lanes else config.lanes
    if not config.quiet:
        typer.echo(describe(config, store, sel, lanes), err=True)
    stats = accumulate_stats(store, config.tap, sel, config.scheduler, config.quiet, n_lanes)
    proj = fit_projection(
        stats, config.method, config.dim, config.transform, config.pts_t, config.pts_n, config.seed
    )
    if proj.transform == "pts":
        _, std_after = target_moments(store, config.tap, sel, proj, config.scheduler, config.quiet, n_lanes)
        proj = with_target_std(proj, std_after)
    proj = replace(proj, meta=provenance(config, store, sel, lanes))
    out = Path(config.out)
    plots = write_plots(proj, out)
    write_resolved_config(out.parent, "fit_svd", config, {"artefact": out.name})
    return FitSvdResult(proj, out, proj.save(out), plots)


def report(config: FitSvdConfig, result: FitSvdResult) -> None:
    s = result.projection.summary()
    typer.echo(
        f"wrote {result.npz} ({s['method']}+{s['transform']}, {s['dim_teacher']} -> {s['dim_student']}, "
        f"{s['n_rows']} rows): explained variance {s['explained_variance']:.1%}, Std Ratio "
        f"{s['std_ratio_before']} -> {s['std_ratio_after']}; manifest {manifest_path(result.npz).name}"
    )
