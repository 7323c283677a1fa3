"""One sample of a shard read by its byte offset: only that sample's headers and data, checked against its key.

A feature cache records where each sample starts in its source shard (``member_offset``, the offset of the sample's
first tar header, as :func:`pipeline.data.shards.scan_samples` and :func:`~pipeline.data.shards.iter_samples` give
it). Readers that pick individual samples (``verify``, a held-out split, neighbour batches) read just those::

    from pipeline.data.random_access import read_samples_at
    samples = read_samples_at("train-000012.tar", [(offset, key), ...])   # [Sample], in the order asked

Each read is: the header at ``offset`` (plus a long name's extension record), that member's data, then the next
header, until the key changes or the archive ends: 1-2 KiB of headers per sample besides its data. The key found
there must be the one expected; anything else (another key, no tar header at all) means the shard changed since
the offset was recorded, and is an error naming the shard, the key and the offset.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.data.shards import Sample, ShardError, split_member_name
from pipeline.data.tarstream import TarFormatError, walk_headers


def read_sample_at(fd: int, offset: int, key: str, path: str = "") -> Sample:
    """The sample ``key`` whose first header is at byte ``offset`` of the shard open as ``fd`` (``path`` names it
    in errors): its fields read with ``os.pread``, nothing else of the shard. Raises ShardError when the shard holds
    anything else there."""
    sample = Sample(key=key, offset=offset)
    try:
        for member in walk_headers(fd, offset):
            found, ext = split_member_name(member.name)
            if found != key:
                if not sample.fields:
                    raise _moved(path, key, offset, f"found {found!r} there")
                break
            if ext in sample.fields:
                raise ShardError(f"{path}: duplicate member {member.name!r}; re-make the shard")
            sample.fields[ext] = _read_exact(fd, member.size, member.data_offset, path)
    except (TarFormatError, UnicodeDecodeError) as err:
        raise _moved(path, key, offset, str(err)) from None
    if not sample.fields:
        raise _moved(path, key, offset, "the archive ends there")
    return sample


def read_samples_at(path: str | Path, wanted: Iterable[tuple[int, str]]) -> list[Sample]:
    """The samples ``(offset, key)`` of one shard, in the order asked, opening the shard once."""
    return list(iter_samples_at(path, wanted))


def iter_samples_at(path: str | Path, wanted: Iterable[tuple[int, str]]) -> Iterator[Sample]:
    """:func:`read_samples_at` one sample at a time (a stream holds one sample's bytes, not all of them)."""
    path = str(path)
    try:
        with open(path, "rb", buffering=0) as fh:
            for offset, key in wanted:
                yield read_sample_at(fh.fileno(), int(offset), key, path)
    except FileNotFoundError:
        raise ShardError(f"no shard at {path}; check the shard list") from None
    except OSError as err:
        raise ShardError(f"{path}: {err}; re-copy this shard") from None


def _read_exact(fd: int, size: int, offset: int, path: str) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) < size:  # walk_headers checked the size first: the file shrank since
        raise ShardError(f"{path}: member at byte {offset} is cut short; the shard changed")
    return data


def _moved(path: str, key: str, offset: int, what: str) -> ShardError:
    return ShardError(
        f"{path}: sample {key!r} is not at byte {offset} ({what}); the shard changed since that offset was "
        "recorded (since caching): restore the original shard, or re-run cache-teacher on the new one"
    )
