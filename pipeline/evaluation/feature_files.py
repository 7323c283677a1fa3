"""Evaluation's feature files: rows written in place as batches arrive, one memory-mapped .npy per tap.

    OUT/features/<name>.<split>.<key>/<tap>.npy   (N, D) float16 (or float32), rows in split order
                                      labels.npy  (N,) int64 class indices
                                      keys.npy    (N,) sample keys

``<key>`` (:func:`feature_key`) names the backbone's weights, the data, the view and the numerics (device type and
autocast). Each file is written under a ``.tmp`` name and renamed into place when complete, so a killed run leaves
no file that looks finished; a folder is reused only when its tap file, labels and keys are all there (in the asked
dtype). A ``<name>.<split>.<key>.npz`` written by earlier versions (every tap, float32, in memory) is still read.
Before a row is stored as float16 it is checked against float16's range (:func:`pipeline.dtypes.range_problem`):
a backbone whose features float16 cannot hold is an error that names the fix (``--feature-dtype float32``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.shards import ShardInfo, shard_record
from pipeline.dtypes import range_problem
from pipeline.evaluation.backbones import EvalError
from pipeline.files import atomic_path

FEATURES_FORMAT = "kdep-eval-features/1"  # the format tag of the legacy .npz files
CPU_FLOAT32 = {"device": "cpu", "amp": "off"}  # the numerics of keys made before numerics were keyed
LABELS, KEYS = "labels.npy", "keys.npy"


@dataclass
class SplitFeatures:
    """Pooled features of one backbone on one split, rows in split order (shards in list order, tar order)."""

    taps: dict[str, np.ndarray]  # tap -> (N, D) float16 or float32 (a copy-on-write memmap when from a file)
    labels: np.ndarray  # (N,) int64 class indices
    keys: list[str]  # (N,) sample keys


def feature_key(
    identity: dict,
    arch: str,
    split: list[ShardInfo],
    resolution: int,
    recipe: str,
    seed: int,
    numerics: dict | None = None,
) -> str:
    """16-hex digest naming one backbone's features on one split (weights, data, view, and the device type and
    autocast of ``pipeline.evaluation.features.eval_numerics``). CPU float32 (or ``numerics`` None) leaves the key
    as it was before the numerics were keyed, so CPU feature caches made then are still reused."""
    body: dict = {
        "arch": arch,
        "weights": identity,
        "shards": [{**shard_record(s), "path": s.path} for s in split],
        "resolution": resolution,
        "recipe": recipe,
        "seed": seed if recipe != "center" else None,
    }
    if numerics is not None and numerics != CPU_FLOAT32:
        body["numerics"] = numerics
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def feature_dir(folder: str | Path, name: str, split_name: str, key: str) -> Path:
    """``<folder>/<name>.<split>.<key>``: one backbone's feature files on one split."""
    return Path(folder) / f"{name}.{split_name}.{key}"


class TapRows:
    """One tap's (N, D) rows, written where they belong as batches arrive (in any order): into a ``.tmp`` .npy
    memmap that :meth:`finish` renames to ``path``, or into memory when ``path`` is None. D comes with the first
    batch."""

    def __init__(self, path: Path | None, rows: int, dtype: str, what: str) -> None:
        self.path, self.rows, self.dtype, self.what = path, rows, np.dtype(dtype), what
        self.tmp = None if path is None else path.with_name(path.name + ".tmp")
        self.array: np.ndarray | None = None

    def write(self, first: int, values: np.ndarray, keys: list[str]) -> None:
        """Rows ``first .. first + B - 1`` <- ``values`` (B, D) float32, after float16's range check."""
        bad, problem = range_problem(values, self.dtype)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise EvalError(
                f"{self.what}, row {first + i} (key {keys[i]!r}): {problem}; store its features as float32 "
                "(--feature-dtype float32)"
            )
        if self.array is None:
            self.array = self._allocate(values.shape[1])
        self.array[first : first + len(values)] = values

    def _allocate(self, dim: int) -> np.ndarray:
        if self.tmp is None:
            return np.empty((self.rows, dim), self.dtype)
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(self.tmp, mode="w+", dtype=self.dtype, shape=(self.rows, dim))

    def finish(self) -> np.ndarray:
        """The complete (N, D) rows: flushed, renamed into place and re-opened copy-on-write (file unchanged)."""
        if self.array is None:
            raise EvalError(f"{self.what}: no rows were written")
        if self.tmp is None:
            return self.array
        self.array.flush()
        self.array = None  # closes the map
        os.replace(self.tmp, self.path)
        return np.load(self.path, mmap_mode="c")

    def discard(self) -> None:
        """Drop a half-written file (after an error)."""
        self.array = None
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


def save_rows(directory: Path, labels: np.ndarray, keys: list[str]) -> None:
    """``labels.npy`` and ``keys.npy`` of a feature folder, each renamed into place."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in ((LABELS, labels), (KEYS, np.array(keys))):
        with atomic_path(directory / name) as tmp, open(tmp, "wb") as fh:  # a file object: no ".npy" appended
            np.save(fh, array, allow_pickle=False)


def load_features(directory: Path, tap: str, dtype: str) -> SplitFeatures | None:
    """``tap``'s saved rows (a copy-on-write memmap) with labels and keys, or None when they are not saved in
    ``dtype``. A legacy ``<directory>.npz`` (float32, finer than either dtype) is read when it has ``tap``."""
    files = [directory / f"{tap}.npy", directory / LABELS, directory / KEYS]
    if all(f.is_file() for f in files):
        rows = np.load(files[0], mmap_mode="c")
        if rows.dtype != np.dtype(dtype):
            return None
        labels, keys = np.load(files[1]), np.load(files[2]).tolist()
        if not len(rows) == len(labels) == len(keys):
            raise EvalError(
                f"{directory}: {len(rows)} feature rows, {len(labels)} labels and {len(keys)} keys; delete the "
                "folder to recompute"
            )
        return SplitFeatures({tap: rows}, labels, keys)
    return load_legacy(directory.with_name(directory.name + ".npz"), tap)


def load_legacy(path: Path, tap: str) -> SplitFeatures | None:
    """``tap`` from an .npz written by earlier versions, or None when there is none (or it lacks ``tap``)."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        if str(z["format"]) != FEATURES_FORMAT:
            raise EvalError(f"{path}: not a kdep eval feature file; delete it to recompute")
        if f"tap_{tap}" not in z.files:
            return None
        return SplitFeatures({tap: z[f"tap_{tap}"]}, z["labels"], [str(k) for k in z["keys"]])
