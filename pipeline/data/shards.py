"""WebDataset shards: listing, counting, reading and writing, with truncation and duplicate-key detection.

Every stage lists its input with :func:`list_shards`. A shard is a plain tar of ``<key>.<ext>`` members grouped by
key (the key is the member name up to its first dot, as WebDataset splits it). A shard index (``index.json``
beside the shards) records each shard's name, sample count, byte size and sha256, plus the class names.

Reading uses :mod:`pipeline.data.tarstream` rather than WebDataset's expander because we need two things it does not
give: the end-of-archive check (a tar cut at a member boundary ends silently in every WebDataset handler) and each
member's byte offset; it is also several times faster than :mod:`tarfile` at parsing headers.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import braceexpand

from pipeline.data.tarstream import BLOCK, TarFormatError, iter_member_spans, iter_members
from pipeline.errors import KdepError
from pipeline.files import HashingWriter, atomic_path, file_sha256, write_json_atomic

INDEX_NAME = "index.json"
INDEX_FORMAT = "kdep-shards/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")


class ShardError(KdepError, ValueError):
    """A shard is missing, truncated, corrupt or inconsistent with its index; the message names it."""


@dataclass(frozen=True)
class ShardInfo:
    """One input shard as listed: where it is and what the index says about it."""

    path: str  # absolute path of the .tar file
    name: str  # file name, e.g. "train-000012.tar"; the identity used in provenance
    samples: int | None  # sample count from the index (None when listed without an index)
    nbytes: int  # file size in bytes
    sha256: str | None  # hex digest from the index (None when listed without an index)


@dataclass
class Sample:
    """One sample's raw fields as read from a tar (no decoding)."""

    key: str
    fields: dict[str, bytes] = field(default_factory=dict)  # extension (e.g. "jpg", "cls") -> bytes
    offset: int = 0  # byte offset of the sample's first member header in the tar
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # extension -> (data offset, size)


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/n01440764_10026.jpg"`` -> ``("dir/n01440764_10026", "jpg")``: key up to the first dot of the basename."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


class _HashingReader:
    """A read-only file wrapper that feeds every byte read into ``digest`` (one pass: parse and hash together)."""

    def __init__(self, fh, digest) -> None:
        self.fh, self.digest = fh, digest

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.digest.update(data)
        return data

    def fileno(self) -> int:
        return self.fh.fileno()

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def iter_samples(path: str | Path, digest=None, fields: tuple[str, ...] | None = None) -> Iterator[Sample]:
    """Yield the samples of one shard in tar order; raise ShardError on truncation, corruption or duplicate keys.

    With ``digest`` (e.g. ``hashlib.sha256()``), every byte of the file is fed to it while reading, so the whole
    file's hash is ready once the last sample is yielded, without a second read of the shard. With ``fields``
    (extensions, e.g. ``("cls",)``), only those members' bytes are read and the file is read unbuffered: the
    other members are seeked over and absent from ``Sample.fields``; every member's place in the file is in
    ``Sample.spans`` either way (a random-access index of the shard for the price of its headers)."""
    path = str(path)
    if digest is not None and fields is not None:
        raise ValueError("iter_samples: a digest needs every byte; do not pass fields with it")
    seen: set[str] = set()
    current: Sample | None = None
    try:
        with open(path, "rb", buffering=1 << 20 if fields is None else 0) as raw:
            fh = _HashingReader(raw, digest) if digest is not None else raw
            wanted = (lambda _n: True) if fields is None else (lambda n: split_member_name(n)[1] in fields)
            for name, offset, size, data in iter_member_spans(fh, wanted):
                key, ext = split_member_name(name)
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    if key in seen:
                        raise ShardError(
                            f"{path}: duplicate key {key!r} (it appears twice in this shard); re-make the shard"
                        )
                    seen.add(key)
                    current = Sample(key=key, offset=offset)
                if ext in current.spans:
                    raise ShardError(f"{path}: duplicate member {name!r}; re-make the shard")
                current.spans[ext] = (offset + BLOCK, size)
                if fields is None or ext in fields:
                    current.fields[ext] = data
            if digest is not None:
                fh.drain()  # the padding after the end-of-archive marker belongs to the file's hash too
    except FileNotFoundError:
        raise ShardError(f"no shard at {path}; check the shard list") from None
    except (TarFormatError, UnicodeDecodeError, OSError) as err:
        raise ShardError(f"{path}: {err}; re-copy or re-make this shard") from None
    if current is not None:
        yield current


def scan_shard(path: str | Path) -> list[str]:
    """The keys of a shard in order, from its tar headers alone; raises ShardError on a bad tar or duplicate key."""
    path = str(path)
    keys: list[str] = []
    try:
        with open(path, "rb", buffering=1 << 16) as fh:
            for name, _offset, _data in iter_members(fh, with_data=False):
                key = split_member_name(name)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
    except FileNotFoundError:
        raise ShardError(f"no shard at {path}; check the shard list") from None
    except (TarFormatError, UnicodeDecodeError, OSError) as err:
        raise ShardError(f"{path}: {err}; re-copy or re-make this shard") from None
    if len(set(keys)) != len(keys):
        dup = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise ShardError(f"{path}: duplicate key {dup!r} (it appears twice in this shard); re-make the shard")
    return keys


def duplicate_keys(shards: list[ShardInfo]) -> dict[int, dict[str, str]]:
    """Keys that already appear in an earlier shard (in list order): {shard index: {key: earlier shard name}}."""
    return find_duplicates([s.name for s in shards], [scan_shard(s.path) for s in shards])


def find_duplicates(names: list[str], keys: list[list[str]]) -> dict[int, dict[str, str]]:
    """:func:`duplicate_keys` from already scanned key lists (``keys[i]``: shard ``names[i]``'s keys in order).

    The first occurrence wins, so which copy is kept never depends on ranks, workers or timing."""
    first: dict[str, str] = {}
    out: dict[int, dict[str, str]] = {}
    for i, (name, shard_keys) in enumerate(zip(names, keys, strict=True)):
        for key in shard_keys:
            owner = first.setdefault(key, name)
            if owner != name:
                out.setdefault(i, {})[key] = owner
    return out


def scan_counted(info: ShardInfo) -> tuple[ShardInfo, list[str]]:
    """One shard's keys (tar headers only) and its info with the sample count and sha256 filled in (hashed only
    when no index gave it); a count that differs from the index is an error naming the shard."""
    keys = scan_shard(info.path)
    if info.samples is not None and len(keys) != info.samples:
        raise ShardError(
            f"{info.path}: {len(keys)} samples in the tar but the index says {info.samples}; the shard is truncated or changed"
        )
    sha256 = info.sha256 or file_sha256(info.path)
    return ShardInfo(info.path, info.name, len(keys), info.nbytes, sha256), keys


def write_shard(path: str | Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> dict:
    """Write ``(key, {ext: bytes})`` samples to a tar, byte-identically for the same input, atomically.

    Members get mtime 0, uid/gid 0 and mode 0o444, so the same samples always give the same bytes. Returns the
    shard's index record: name, samples, bytes, sha256 (hashed while writing, not read back).
    """
    path = Path(path)
    count = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        out = HashingWriter(fh)  # hashed while written: the shard is never read back
        # copybufsize: a member's data in one write (tarfile's default 16 KiB steps cost a call each)
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT, copybufsize=1 << 22) as tar:
            for key, fields in samples:
                if "." in key.rpartition("/")[2]:
                    raise ShardError(
                        f"key {key!r} contains a dot; WebDataset would split it into key and extension"
                    )
                for ext, data in fields.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o444
                    tar.addfile(info, io.BytesIO(data))
                count += 1
    return {"name": path.name, "samples": count, "bytes": out.nbytes, "sha256": out.hexdigest()}


def write_index(directory: str | Path, shards: list[dict], classes: list[str], **extra) -> Path:
    """Write ``index.json`` (shard records + class names + extra fields) atomically; returns its path."""
    path = Path(directory) / INDEX_NAME
    body = {"format": INDEX_FORMAT, "classes": list(classes), "shards": shards, **extra}
    write_json_atomic(path, body)
    return path


def read_index(path: str | Path) -> dict:
    """Read and check a shard index file."""
    path = Path(path)
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(
            f"no shard index at {path}; run `kdep make-shards` or list shards by pattern"
        ) from None
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: not a valid shard index ({err})") from None
    if body.get("format") != INDEX_FORMAT or not isinstance(body.get("shards"), list):
        raise ShardError(
            f"{path}: not a kdep shard index (format {body.get('format')!r}, expected {INDEX_FORMAT!r})"
        )
    return body


def list_shards(spec: str | Path | Iterable[str]) -> list[ShardInfo]:
    """Shards from a brace pattern (``train-{000000..000146}.tar``), a directory, or an index file.

    A directory with an ``index.json`` is listed from the index (counts and hashes included); without one, its
    ``*.tar`` files are listed sorted. A missing shard is an error naming it.
    """
    if not isinstance(spec, (str, Path)):
        return [info for item in spec for info in list_shards(item)]
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            return _from_index(path / INDEX_NAME)
        tars = sorted(path.glob("*.tar"))
        if not tars:
            raise ShardError(
                f"{path}: no *.tar shards and no {INDEX_NAME}; point at a shard directory or index"
            )
        return [_from_file(t) for t in tars]
    if path.suffix == ".json":
        return _from_index(path)
    files = list(braceexpand.braceexpand(spec))
    return [_from_file(Path(f)) for f in files]


def _from_file(path: Path) -> ShardInfo:
    if not path.is_file():
        raise ShardError(f"no shard at {path}; check the shard pattern or directory")
    return ShardInfo(str(path.resolve()), path.name, None, path.stat().st_size, None)


def _from_index(index_path: Path) -> list[ShardInfo]:
    body = read_index(index_path)
    out = []
    for rec in body["shards"]:
        shard = index_path.parent / rec["name"]
        if not shard.is_file():
            raise ShardError(f"{index_path}: lists {rec['name']} but {shard} does not exist")
        size = shard.stat().st_size
        if size != rec["bytes"]:
            raise ShardError(
                f"{shard}: {size} bytes on disk but the index says {rec['bytes']}; the shard changed or is truncated"
            )
        out.append(ShardInfo(str(shard.resolve()), rec["name"], int(rec["samples"]), size, rec.get("sha256")))
    return out


def index_classes(spec: str | Path) -> list[str] | None:
    """Class names from the shard index beside ``spec`` (directory or index file), or None without an index."""
    path = Path(spec)
    index = path / INDEX_NAME if path.is_dir() else path
    if index.suffix == ".json" and index.is_file():
        return list(read_index(index).get("classes", []))
    return None


def count_samples(info: ShardInfo) -> int:
    """Count a shard's samples without decoding; a count that differs from the index is an error naming the shard."""
    n = len(scan_shard(info.path))
    if info.samples is not None and n != info.samples:
        raise ShardError(
            f"{info.path}: {n} samples in the tar but the index says {info.samples}; the shard is truncated or changed"
        )
    return n


def with_counts(shards: list[ShardInfo]) -> list[ShardInfo]:
    """Fill in sample counts and hashes for shards listed without an index (reads each shard once)."""
    out = []
    for info in shards:
        if info.samples is None or info.sha256 is None:
            info = ShardInfo(info.path, info.name, count_samples(info), info.nbytes, file_sha256(info.path))
        out.append(info)
    return out


def shard_record(info: ShardInfo) -> dict:
    """The provenance record of a shard (what a cache stores about its sources)."""
    return {k: v for k, v in asdict(info).items() if k != "path"}
