"""Whole-or-nothing file writes and the one file hash, shared by every stage.

Every artefact (shards, index and manifests, cache markers, projections, plots, features, checkpoints) is written
to a temporary sibling and renamed over its target, so a reader, or a resumed run after a kill, never sees a
half-written file: ``os.replace`` is atomic within a directory on POSIX. The temporary name is the target's name
plus ``.tmp``, so a file left by a killed writer never matches a glob on the real extension (``*.json`` markers,
``*.tar`` shards, ``epoch-*.pt`` checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HASH_CHUNK = 4 << 20  # bytes read per step when hashing a file


@contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; rename it over ``path`` only if the body succeeded.

    On any exception the temporary file is removed and ``path`` is left as it was. ``fsync=True`` makes the new
    bytes durable before the rename (for files a resumed run trusts: markers, manifests, checkpoints).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:  # Linux flushes the file's data through any descriptor
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: object) -> None:
    """Write ``obj`` as indented JSON, fsynced and renamed into place: readers never see a half-written file."""
    with atomic_path(path, fsync=True) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=False)
        fh.write("\n")


class HashingWriter:
    """A write-only wrapper of a file opened for writing at its start: every byte written also goes into a
    sha256, so a file's hash is ready when it is closed, without reading it back (``tarfile`` needs ``tell``)."""

    def __init__(self, fh) -> None:
        self.fh, self.digest, self.nbytes = fh, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.fh.write(data)
        self.digest.update(data)
        self.nbytes += len(data)
        return len(data)

    def tell(self) -> int:
        return self.nbytes

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def file_sha256(path: str | Path, chunk: int = HASH_CHUNK) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte steps (the identity recorded for shards and projections)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
