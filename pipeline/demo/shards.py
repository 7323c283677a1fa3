"""A small ImageNet-like labelled image set made locally (no download), written as WebDataset shards.

Ten classes that differ in shape, texture and colour structure, images of varied size and aspect ratio
(64-256 px per side), and, as in real ImageNet, a few grayscale JPEGs, CMYK JPEGs and PNGs (one with alpha)
among the RGB JPEGs. The same seed gives byte-identical shards.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.shards import write_index, write_shard

Painter = Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class DemoSpec:
    """What to generate: class count, images per class per split, shard size and seed."""

    seed: int = 0  # base seed; every image's RNG derives from (seed, split, class, index)
    classes: int = 10  # number of classes (at most len(CLASS_NAMES))
    train_per_class: int = 60  # train images per class
    val_per_class: int = 20  # held-out images per class
    per_shard: int = 100  # samples per shard
    min_side: int = 64  # smallest image side in pixels
    max_side: int = 256  # largest image side in pixels


def _palette(rng: np.random.Generator, base: tuple[float, float, float]) -> np.ndarray:
    """A colour for one image. Hues are random (not tied to the class) so that colour statistics alone, which even a
    random network picks up, do not give the class away; ``base`` pulls it half way towards a class tint."""
    return np.clip(0.5 * rng.uniform(0, 1, 3) + 0.5 * np.array(base), 0, 1)


def _disc(rng, yy, xx):
    cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.35)
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
    return _two_tone(rng, mask, (0.9, 0.3, 0.1), (0.1, 0.3, 0.6))


def _hstripes(rng, yy, xx):
    period = rng.uniform(0.08, 0.2)
    mask = np.sin(2 * np.pi * (yy / period + rng.uniform())) > 0
    return _two_tone(rng, mask, (0.95, 0.9, 0.2), (0.2, 0.2, 0.2))


def _checker(rng, yy, xx):
    cell = rng.uniform(0.08, 0.18)
    mask = ((np.floor(yy / cell) + np.floor(xx / cell)) % 2) == 0
    return _two_tone(rng, mask, (0.95, 0.95, 0.95), (0.6, 0.1, 0.5))


def _triangle(rng, yy, xx):
    top, base, half = rng.uniform(0.1, 0.3), rng.uniform(0.7, 0.9), rng.uniform(0.2, 0.4)
    cx = rng.uniform(0.4, 0.6)
    frac = (yy - top) / (base - top)
    mask = (frac >= 0) & (frac <= 1) & (np.abs(xx - cx) <= frac * half)
    return _two_tone(rng, mask, (0.1, 0.7, 0.2), (0.85, 0.8, 0.7))


def _rings(rng, yy, xx):
    cy, cx, period = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.06, 0.14)
    mask = np.sin(2 * np.pi * np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / period) > 0
    return _two_tone(rng, mask, (0.1, 0.2, 0.9), (0.9, 0.9, 0.3))


def _dots(rng, yy, xx):
    cell = rng.uniform(0.1, 0.2)
    fy, fx = (yy / cell) % 1 - 0.5, (xx / cell) % 1 - 0.5
    mask = fy**2 + fx**2 < rng.uniform(0.04, 0.1)
    return _two_tone(rng, mask, (0.9, 0.1, 0.2), (0.95, 0.85, 0.85))


def _blobs(rng, yy, xx):
    h, w = yy.shape
    coarse = rng.normal(size=(4, 4))
    field = np.array(Image.fromarray(coarse.astype(np.float32), mode="F").resize((w, h), Image.BICUBIC))
    t = (field - field.min()) / (np.ptp(field) + 1e-6)
    low, high = _palette(rng, (0.05, 0.3, 0.1)), _palette(rng, (0.6, 0.9, 0.4))
    return low + t[..., None] * (high - low)


def _gradient(rng, yy, xx):
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    low, high = _palette(rng, (0.9, 0.5, 0.0)), _palette(rng, (0.3, 0.0, 0.5))
    return low + t[..., None] * (high - low)


def _cross(rng, yy, xx):
    cy, cx, arm, thick = (
        rng.uniform(0.35, 0.65),
        rng.uniform(0.35, 0.65),
        rng.uniform(0.2, 0.35),
        rng.uniform(0.05, 0.1),
    )
    vertical = (np.abs(xx - cx) < thick) & (np.abs(yy - cy) < arm)
    horizontal = (np.abs(yy - cy) < thick) & (np.abs(xx - cx) < arm)
    return _two_tone(rng, vertical | horizontal, (0.95, 0.95, 0.95), (0.8, 0.1, 0.1))


def _speckle(rng, yy, xx):
    noise = rng.uniform(size=yy.shape)
    base = _palette(rng, (0.5, 0.5, 0.55))
    return np.clip(base + (noise[..., None] - 0.5) * 0.8, 0, 1)


def _two_tone(rng: np.random.Generator, mask: np.ndarray, fg: tuple, bg: tuple) -> np.ndarray:
    return np.where(mask[..., None], _palette(rng, fg), _palette(rng, bg))


CLASS_PAINTERS: dict[str, Painter] = {
    "disc": _disc,
    "hstripes": _hstripes,
    "checker": _checker,
    "triangle": _triangle,
    "rings": _rings,
    "dots": _dots,
    "blobs": _blobs,
    "gradient": _gradient,
    "cross": _cross,
    "speckle": _speckle,
}
CLASS_NAMES = tuple(CLASS_PAINTERS)


def paint_image(rng: np.random.Generator, label: int, min_side: int, max_side: int) -> np.ndarray:
    """One (H, W, 3) uint8 image of class ``label`` with a random size and aspect ratio."""
    h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w) * (w / h), indexing="ij")
    rgb = CLASS_PAINTERS[CLASS_NAMES[label]](rng, yy, xx)
    rgb = rgb + rng.normal(0, 0.03, size=rgb.shape)  # sensor-like noise
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def encode_image(pixels: np.ndarray, kind: str) -> tuple[str, bytes]:
    """Encode as ``kind`` in {rgb, gray, cmyk, png, png-alpha}; returns (extension, bytes)."""
    image = Image.fromarray(pixels, mode="RGB")
    buf = io.BytesIO()
    if kind == "png":
        image.save(buf, format="PNG")
        return "png", buf.getvalue()
    if kind == "png-alpha":
        alpha = Image.fromarray(np.full(pixels.shape[:2], 200, np.uint8), mode="L")
        image.putalpha(alpha)
        image.save(buf, format="PNG")
        return "png", buf.getvalue()
    image = {"gray": image.convert("L"), "cmyk": image.convert("CMYK")}.get(kind, image)
    image.save(buf, format="JPEG", quality=90)
    return "jpg", buf.getvalue()


def _format_for(i: int) -> str:
    """Like ImageNet: mostly RGB JPEG, some grayscale, a CMYK JPEG, a PNG and a PNG with alpha per split."""
    special = {3: "cmyk", 7: "png", 11: "png-alpha"}
    if i in special:
        return special[i]
    return "gray" if i % 23 == 5 else "rgb"


def make_split(spec: DemoSpec, split: str, per_class: int) -> list[tuple[str, dict[str, bytes]]]:
    """All samples of one split, in a seeded shuffled order (classes interleaved, as in real shards)."""
    split_id = {"train": 0, "val": 1}[split]
    items = [(c, i) for c in range(spec.classes) for i in range(per_class)]
    order = np.random.default_rng([spec.seed, split_id, 9999]).permutation(len(items))
    samples = []
    for pos, idx in enumerate(order):
        label, i = items[idx]
        rng = np.random.default_rng([spec.seed, split_id, label, i])
        pixels = paint_image(rng, label, spec.min_side, spec.max_side)
        ext, data = encode_image(pixels, _format_for(pos))
        key = f"{split}_{CLASS_NAMES[label]}_{i:05d}"
        samples.append((key, {ext: data, "cls": str(label).encode()}))
    return samples


def write_demo_data(spec: DemoSpec, out: str | Path) -> dict[str, Path]:
    """Write ``out/train`` and ``out/val`` shard directories (each with ``index.json``); returns them."""
    if not 1 <= spec.classes <= len(CLASS_NAMES):
        raise ValueError(f"--classes {spec.classes}: must be between 1 and {len(CLASS_NAMES)}")
    out = Path(out)
    dirs = {}
    for split, per_class in (("train", spec.train_per_class), ("val", spec.val_per_class)):
        directory = out / split
        directory.mkdir(parents=True, exist_ok=True)
        samples = make_split(spec, split, per_class)
        records = []
        for s, start in enumerate(range(0, len(samples), spec.per_shard)):
            chunk = samples[start : start + spec.per_shard]
            records.append(write_shard(directory / f"{split}-{s:06d}.tar", chunk))
        write_index(
            directory,
            records,
            list(CLASS_NAMES[: spec.classes]),
            split=split,
            source="kdep demo-data",
            seed=spec.seed,
        )
        dirs[split] = directory
    return dirs
