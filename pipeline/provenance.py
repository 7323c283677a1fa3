"""Provenance records and their comparison, plus the store's writer lock.

A cache records where every number came from: the teacher, its weights' identity, the taps,
the preprocessing, the augmentation recipe, K, the seed, the source shards and library versions. Resuming a cache
with a different request, or reading it with other data, is refused with a message that says what differs.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import socket
import uuid
from pathlib import Path

import numpy as np
import torch
import torchvision
import webdataset
import zarr

from pipeline.errors import KdepError


class ProvenanceError(KdepError):
    """An artefact does not match what it is used with; the message lists what differs."""


def library_versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "zarr": zarr.__version__, "numpy": np.__version__, "webdataset": webdataset.__version__}  # fmt: skip


def diff_records(stored: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested records, e.g. ``teacher.arch: 'resnet50' != 'resnet18'``."""
    out = []
    for key in sorted(set(stored) | set(new)):
        a, b = stored.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_records(a, b, f"{prefix}{key}.")
        elif json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            out.append(f"{prefix}{key}: stored {_short(a)} vs requested {_short(b)}")
    return out


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) < 80 else text[:77] + "..."


def require_same(what: str, stored: dict, new: dict, hint: str) -> None:
    """Raise ProvenanceError listing the differences (at most 5) between ``stored`` and ``new``."""
    diffs = diff_records(stored, new)
    if diffs:
        more = f" (+{len(diffs) - 5} more)" if len(diffs) > 5 else ""
        raise ProvenanceError(f"{what} differs: {'; '.join(diffs[:5])}{more}; {hint}")


class StoreLock:
    """An exclusive flock on ``<store>/writer.lock`` held by one job's rank 0 for the whole run.

    The lock file holds the job id for people (and for the refusal message of a second job). Other ranks of the
    job never read it: on a shared filesystem another node may see a stale copy. They join with the job id rank 0
    broadcast after taking the flock, which is the truth; a second job's rank 0 cannot take the flock and its
    ranks are refused. A crashed job's flock is released by the OS, so resuming needs no clean-up.
    """

    def __init__(self, store_path: str | Path) -> None:
        self.path = Path(store_path) / "writer.lock"
        self.fh = None
        self.job_id = ""

    def acquire(self) -> str:
        self.fh = open(self.path, "a+")  # noqa: SIM115 - held open for the run
        try:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "unknown"
            self.fh.close()
            self.fh = None
            raise ProvenanceError(
                f"{self.path.parent} is being written by another cache-teacher job ({holder}); "
                "wait for it to finish or use another --out"
            ) from None
        self.job_id = uuid.uuid4().hex
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"job {self.job_id} pid {os.getpid()} host {socket.gethostname()}\n")
        self.fh.flush()
        return self.job_id

    def join(self, job_id: str) -> None:
        """On a non-zero rank: write under ``job_id``, the id rank 0 broadcast after taking the flock."""
        if not job_id:
            raise ProvenanceError(f"{self.path.parent}: rank 0 holds no writer lock; refusing to write")
        self.job_id = job_id

    def release(self) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None
