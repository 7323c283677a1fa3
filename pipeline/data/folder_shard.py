"""One output shard of `make-shards`: read its images once, check them, write the tar, mark it done; or keep it.

A task lists its images ``(relative path, label, key)`` in write order, so its shard is a pure function of the
task and the image files, whichever process runs it. Each image file is opened once: its bytes are checked by a
full decode from memory and stored as they are. The tar is hashed while it is written, renamed into place, and
only then marked done in ``done/<shard>.json`` (its index record, the images it skipped, and a digest of its
inputs: paths, labels, keys, sizes and modification times). A rerun keeps a shard whose marker matches the new
task and whose file still has the recorded size and sha256; anything else is written again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.data.shards import write_shard
from pipeline.errors import KdepError
from pipeline.files import atomic_path, file_sha256

DONE_DIR = "done"  # per-shard done markers, beside the shards
_EXT_BY_FORMAT = {"jpeg": "jpg", "mpo": "jpg"}


class ImageError(KdepError, ValueError):
    """An image cannot be decoded; the message names the file. ``--skip-bad`` skips (and lists) these."""


class InputError(KdepError):
    """An image file cannot be read at all (missing, permissions, I/O error); never skipped."""


class ShardWriteError(KdepError):
    """An output shard cannot be written; the message names it."""


@dataclass(frozen=True)
class ShardTask:
    """What one worker writes: small and picklable (paths as strings)."""

    root: str  # the ImageFolder root, as given
    out: str  # the shard to write, e.g. "/data/shards/train-000012.tar"
    items: tuple[tuple[str, int, str], ...]  # (path relative to root, label, key) in write order
    skip_bad: bool  # skip undecodable images (listed in the outcome) instead of raising ImageError


@dataclass(frozen=True)
class ShardOutcome:
    """What a task wrote (or found already written): the shard's index record and the images it skipped."""

    record: dict  # name, samples, bytes, sha256
    skipped: tuple[tuple[str, str], ...]  # (relative path, reason), in write order
    reused: bool  # True: a finished shard from an earlier run was kept


def marker_path(shard: str | Path) -> Path:
    shard = Path(shard)
    return shard.parent / DONE_DIR / f"{shard.stem}.json"


def image_ext(path: Path, data: bytes) -> str:
    """Fully decode ``data`` (the bytes of ``path``) to prove it is readable; returns the extension of its real
    format (a PNG named .JPEG gets "png")."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = (image.format or "").lower()
            image.load()
    except Exception as err:  # PIL raises many types for bad files
        raise ImageError(f"unreadable image {path}: {err}; remove it or pass --skip-bad") from None
    return _EXT_BY_FORMAT.get(fmt, fmt or path.suffix.lstrip(".").lower())


def read_input(path: Path) -> tuple[bytes, os.stat_result]:
    """The file's bytes and its stat, from one open."""
    try:
        with open(path, "rb") as fh:
            return fh.read(), os.fstat(fh.fileno())
    except OSError as err:
        raise InputError(
            f"cannot read {path}: {err.strerror or err}; fix or remove the file and rerun"
        ) from None


def input_line(item: tuple[str, int, str], stat: os.stat_result) -> bytes:
    """One image's contribution to a task's input digest: path, label, key, size and mtime (ns)."""
    return json.dumps([*item, stat.st_size, stat.st_mtime_ns]).encode() + b"\n"


def make_shard(task: ShardTask) -> ShardOutcome:
    """Keep the task's shard if an earlier run finished it for the same inputs, else write it (the pool's task)."""
    kept = finished_outcome(task)
    return kept if kept is not None else write_task(task)


def finished_outcome(task: ShardTask) -> ShardOutcome | None:
    """The outcome recorded by an earlier run if its marker matches this task (inputs unchanged, no skips unless
    skipping is allowed) and the shard file still has the recorded size and sha256; None otherwise."""
    try:
        marker = json.loads(marker_path(task.out).read_text())
        record, skipped = marker["record"], [tuple(s) for s in marker["skipped"]]
        if record["name"] != Path(task.out).name or (skipped and not task.skip_bad):
            return None
        if os.stat(task.out).st_size != record["bytes"] or marker["inputs"] != _stat_digest(task):
            return None
        if file_sha256(task.out) != record["sha256"]:  # last: the one check that reads the shard
            return None
    except (OSError, ValueError, KeyError, TypeError):  # no marker, a damaged one, a missing file
        return None
    return ShardOutcome(record, tuple(skipped), reused=True)


def _stat_digest(task: ShardTask) -> str:
    digest = hashlib.sha256()
    for item in task.items:
        digest.update(input_line(item, os.stat(Path(task.root) / item[0])))
    return digest.hexdigest()


def write_task(task: ShardTask) -> ShardOutcome:
    """Read, check and write the task's images to its shard (atomically), then write its done marker."""
    marker = marker_path(task.out)  # an old marker may stay until replaced: it names the old tar's sha256
    inputs, skipped = hashlib.sha256(), []
    try:
        record = write_shard(task.out, _samples(task, inputs, skipped))
        marker.parent.mkdir(exist_ok=True)
        with atomic_path(marker) as tmp:  # no fsync: a rerun re-hashes the shard before it trusts a marker
            body = {"record": record, "skipped": skipped, "inputs": inputs.hexdigest()}
            tmp.write_text(json.dumps(body, indent=1) + "\n")
    except OSError as err:
        raise ShardWriteError(f"cannot write {task.out}: {err}; check the output folder and rerun") from None
    return ShardOutcome(record, tuple(skipped), reused=False)


def _samples(task: ShardTask, inputs, skipped: list):
    for item in task.items:
        rel, label, key = item
        path = Path(task.root) / rel
        data, stat = read_input(path)
        inputs.update(input_line(item, stat))
        try:
            ext = image_ext(path, data)
        except ImageError as err:
            if not task.skip_bad:
                raise
            skipped.append((rel, str(err)))
            continue
        yield key, {ext: data, "cls": str(label).encode()}
