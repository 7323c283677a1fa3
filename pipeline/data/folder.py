"""ImageFolder (one sub-folder per class) -> WebDataset shards with stable keys and a shard index.

Encoded image bytes are stored as they are (never re-encoded); each image is fully decoded once to prove it is
readable. ``fraction`` keeps that fraction of the images of *every* class (KDEP's 10% ImageNet subset), chosen
with a seeded generator per class, and the kept file list is written beside the shards.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.shards import write_index, write_shard
from pipeline.errors import KdepError
from pipeline.progress import progress_bar

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


class ImageError(KdepError, ValueError):
    """An image cannot be read; the message names the file."""


@dataclass
class FolderResult:
    """What ``folder_to_shards`` wrote and skipped."""

    shards: list[dict] = field(default_factory=list)  # index records
    classes: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # relative paths of the images written
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)


def list_folder(root: Path) -> tuple[list[str], dict[str, list[Path]]]:
    """Class names (sorted sub-folders) and each class's image files (sorted)."""
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root}; pass a directory with one sub-folder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class sub-folders; expected ImageFolder layout root/<class>/<image>")
    files = {
        c: sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) for c in classes
    }
    return classes, files


def select_fraction(files: list[Path], fraction: float, seed: int, class_name: str) -> list[Path]:
    """Keep fraction * n files rounded half up (at least 1), chosen by a generator seeded from (seed, class name)."""
    if fraction >= 1.0:
        return list(files)
    k = max(1, int(fraction * len(files) + 0.5))  # round half up
    rng = np.random.default_rng([seed, *class_name.encode()])
    keep = np.sort(rng.choice(len(files), size=k, replace=False))
    return [files[i] for i in keep]


def make_key(class_name: str, path: Path) -> str:
    """A stable key without dots: the file stem (class-prefixed unless it already is), unsafe characters -> '_'."""
    stem = path.name.split(".")[0]
    key = stem if stem.startswith(f"{class_name}_") else f"{class_name}_{stem}"
    return _UNSAFE.sub("_", key)


def read_image_file(path: Path) -> tuple[str, bytes]:
    """Read and fully decode an image to prove it is readable; returns (extension by real format, bytes)."""
    data = path.read_bytes()
    try:
        with Image.open(path) as image:
            fmt = (image.format or "").lower()
            image.load()
    except Exception as err:  # PIL raises many types for bad files
        raise ImageError(f"unreadable image {path}: {err}; remove it or pass --skip-bad") from None
    return {"jpeg": "jpg", "mpo": "jpg"}.get(fmt, fmt or path.suffix.lstrip(".").lower()), data


def _iter_samples(
    root: Path, items: list[tuple[Path, int, str]], result: FolderResult
) -> Iterator[tuple[str, dict]]:
    for path, label, key in progress_bar(items, desc="make-shards", unit="img", mininterval=1.0):
        rel = str(path.relative_to(root))
        try:
            ext, data = read_image_file(path)
        except ImageError as err:
            if result.skipped is None:
                raise
            result.skipped.append((rel, str(err)))
            continue
        result.kept.append(rel)
        yield key, {ext: data, "cls": str(label).encode()}


def folder_to_shards(
    root: str | Path,
    out: str | Path,
    per_shard: int = 1000,
    fraction: float = 1.0,
    seed: int = 0,
    skip_bad: bool = False,
    prefix: str = "train",
) -> FolderResult:
    """Write ``out/<prefix>-NNNNNN.tar`` shards (samples in a seeded shuffled order) plus ``index.json``."""
    root, out = Path(root), Path(out)
    classes, files = list_folder(root)
    items, keys = [], {}
    for label, c in enumerate(classes):
        for path in select_fraction(files[c], fraction, seed, c):
            key = make_key(c, path)
            if key in keys:
                raise ValueError(f"{path} and {keys[key]} both map to key {key!r}; rename one of them")
            keys[key] = path
            items.append((path, label, key))
    order = np.random.default_rng([seed, 1]).permutation(len(items))
    items = [items[i] for i in order]
    out.mkdir(parents=True, exist_ok=True)
    result = FolderResult(classes=classes, skipped=[] if skip_bad else None)
    stream = _iter_samples(root, items, result)
    while chunk := _take(stream, per_shard):
        result.shards.append(write_shard(out / f"{prefix}-{len(result.shards):06d}.tar", chunk))
    result.skipped = result.skipped or []
    _write_lists(out, result)
    write_index(
        out,
        result.shards,
        classes,
        split=prefix,
        source=str(root.resolve()),
        fraction=fraction,
        seed=seed,
        skipped=len(result.skipped),
    )
    return result


def _take(stream: Iterator, n: int) -> list:
    chunk = []
    for item in stream:
        chunk.append(item)
        if len(chunk) == n:
            break
    return chunk


def _write_lists(out: Path, result: FolderResult) -> None:
    (out / "kept.txt").write_text("".join(f"{p}\n" for p in result.kept))
    (out / "skipped.txt").write_text("".join(f"{p}\t{why}\n" for p, why in result.skipped))
