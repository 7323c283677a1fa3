"""`kdep inspect` and `kdep verify`: what a cache holds, and proof that its numbers can be recomputed.

    kdep inspect out/demo/cache.zarr
    kdep inspect out/demo/cache.zarr --json
    kdep verify out/demo/cache.zarr --samples 16

``inspect`` reads the store's metadata and markers: teacher, taps, D, K, images, shards done/total, bytes on disk,
bytes per view. ``verify`` recomputes N random (key, view) features from the source shards and the recorded
teacher and exits non-zero when the error is above tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipeline.cache.store import FeatureStore, open_store
from pipeline.cache.verify import verify_store
from stages.common import one_line_errors


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def summarize(store: FeatureStore) -> dict:
    """The facts a user asks about a cache, as a JSON-ready dict."""
    lay, prov = store.layout, store.provenance
    done = store.done()
    images = sum(m["samples"] for m in done.values())
    written = sum(m["written"] for m in done.values())
    feature_bytes = _dir_bytes(store.path / "features")
    views_cached = written * lay.views
    return {
        "store": str(store.path),
        "teacher": prov["teacher"]["arch"],
        "weights": prov["teacher"]["weights"]["name"],
        "taps": lay.dims,
        "views_per_image": lay.views,
        "recipe": prov["views"]["recipe"],
        "resolution": prov["preprocessing"]["resolution"],
        "dtype": lay.dtype,
        "images_total": sum(s["samples"] for s in lay.shards),
        "images_cached": images,
        "images_skipped": images - written,
        "shards_done": len(done),
        "shards_total": len(lay.shards),
        "bytes_on_disk": _dir_bytes(store.path),
        "feature_bytes_per_view": feature_bytes / views_cached if views_cached else None,
        "feature_bytes_per_view_raw": sum(lay.dims.values()) * (2 if lay.dtype == "float16" else 4),
        "fingerprint": store.fingerprint(),
    }


@one_line_errors
def inspect_command(
    store: Path = typer.Argument(..., help="Feature cache (Zarr store)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a cache's teacher, taps, D, K, images, shards done/total and bytes per view."""
    info = summarize(open_store(store))
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    for key, value in info.items():
        typer.echo(f"{key:28s} {value}")


@one_line_errors
def verify_command(
    store: Path = typer.Argument(..., help="Feature cache (Zarr store)."),
    samples: int = typer.Option(16, help="Random (key, view) pairs to recompute."),
    seed: int = typer.Option(0, help="Seed of the sample."),
    tolerance: float = typer.Option(None, help="Max relative error (default from the cache's precision)."),
    shards: str = typer.Option(
        "", help="The source shards, if they moved since caching (default: recorded)."
    ),
) -> None:
    """Recompute random cached features with the recorded teacher; exit 1 above tolerance."""
    report = verify_store(open_store(store), samples, seed, tolerance, shards)
    typer.echo(
        f"verified {report.pairs} (key, view) pairs: max abs error {report.max_abs_error:.3g}, "
        f"max rel error {report.max_rel_error:.3g} (tolerance {report.tolerance:.3g}; worst: {report.worst})"
    )
    if not report.ok:
        typer.echo("error: cached features do not match the recomputation", err=True)
        raise typer.Exit(1)
