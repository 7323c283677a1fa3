"""`kdep inspect`: what a cache holds (`kdep verify`, in verify_cache.py, proves its numbers can be recomputed).

    kdep inspect out/demo/cache
    kdep inspect out/demo/cache --json

Reads the store's metadata and markers: layout version, teacher, taps, D, K, images, shards done/total, bytes on
disk, bytes per view, the chunking, and the files and inodes the cache folder uses (one walk of the folder, one stat
per file) next to the count its layout implies (pipeline/cache/inodes.py). Writes nothing.
"""

from __future__ import annotations

import json

import typer

from pipeline.cache.inodes import cache_inodes
from pipeline.cache.store import ZARR_DIR, FeatureStore, open_store
from pipeline.files import tree_usage
from pipeline.teachers import teacher_records
from stages.config import InspectConfig

FEATURES = f"{ZARR_DIR}/features"  # the feature arrays' folder inside a cache


def summarize(store: FeatureStore) -> dict:
    """The facts a user asks about a cache, as a JSON-ready dict."""
    lay, prov = store.layout, store.provenance
    done = store.done()
    images = sum(m["samples"] for m in done.values())
    written = sum(m["written"] for m in done.values())
    usage = tree_usage(store.path, (FEATURES,))  # the one walk of the cache folder
    feature_bytes = usage.bytes_under[FEATURES]
    layout_inodes = cache_inodes(len(done), lay.views, list(lay.dims))
    views_cached = written * lay.views
    teachers = teacher_records(prov)
    return {
        "store": str(store.path),
        "zarr_store": str(store.zarr_path),
        "layout_version": store.meta["layout_version"],
        "teacher": ", ".join(_labelled(t, t["arch"]) for t in teachers),
        "weights": ", ".join(_labelled(t, t["weights"]["name"]) for t in teachers),
        "taps": lay.dims,
        "views_per_image": lay.views,
        "recipe": prov["views"]["recipe"],
        "resolution": teachers[0]["resolution"]
        if len(teachers) == 1
        else ", ".join(_labelled(t, str(t["resolution"])) for t in teachers),
        "dtype": lay.dtype,
        "images_total": sum(s["samples"] for s in lay.shards),
        "images_cached": images,
        "images_skipped": images - written,
        "shards_done": len(done),
        "shards_total": len(lay.shards),
        "bytes_on_disk": usage.bytes,
        "files": usage.files,
        "inodes": usage.entries,
        "inodes_of_the_layout": layout_inodes.entries,
        "feature_bytes_per_view": feature_bytes / views_cached if views_cached else None,
        "feature_bytes_per_view_raw": sum(lay.dims.values()) * (2 if lay.dtype == "float16" else 4),
        "slot_rows": lay.slot_rows,
        "inner_chunk_rows": lay.inner_rows,
        "fingerprint": store.fingerprint(),
    }


def _labelled(teacher: dict, value: str) -> str:
    return f"{teacher['label']}={value}" if teacher["label"] else value


def run(config: InspectConfig) -> dict:
    return summarize(open_store(config.store))


def report(config: InspectConfig, info: dict) -> None:
    if config.json:
        typer.echo(json.dumps(info, indent=1))
        return
    for key, value in info.items():
        typer.echo(f"{key:28s} {value}")
