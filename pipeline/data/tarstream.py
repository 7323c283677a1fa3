"""A minimal streaming tar reader for shards: regular members with their byte offsets, strict about the end.

Python's tarfile spends most of a small-image shard's read time parsing headers field by field; this reads each
512-byte header once, checks its checksum, and handles the extensions shard writers use (GNU long names ``L``,
pax ``x`` path records; global pax ``g`` and directories are skipped). A tar must end with a zero block: one that
stops at a member boundary without it is truncated (every WebDataset handler would end silently there).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import BinaryIO

BLOCK = 512


class TarFormatError(ValueError):
    """The bytes are not a complete, well-formed tar (the caller adds the file name)."""


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").lstrip(b" ")
    if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    try:
        return int(field or b"0", 8)
    except ValueError:
        raise TarFormatError(f"bad number field {field!r} in a tar header") from None


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156])
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if stored == unsigned:
        return True
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 8 * 32  # old writers
    return stored == signed


def _pax_path(data: bytes) -> str | None:
    for record in data.split(b"\n"):
        _, _, kv = record.partition(b" ")
        if kv.startswith(b"path="):
            return kv[5:].decode("utf-8")
    return None


def iter_members(fh: BinaryIO, with_data: bool = True) -> Iterator[tuple[str, int, bytes]]:
    """Yield ``(name, header offset, data)`` for every regular file member, in order (``data`` is b"" and the file
    is seeked over when ``with_data`` is False: a key scan reads only the headers)."""
    for name, offset, _size, data in iter_member_spans(fh, lambda _name: with_data):
        yield name, offset, data


def iter_member_spans(fh: BinaryIO, read: Callable[[str], bool]) -> Iterator[tuple[str, int, int, bytes]]:
    """Yield ``(name, header offset, size, data)`` for every regular file member, in order; the member's data
    is bytes ``[offset + 512, offset + 512 + size)`` of the file. ``data`` is read only for names where
    ``read(name)`` is true; the others are seeked over (b""), so with an unbuffered ``fh`` only headers and the
    chosen members are read."""
    offset, long_name = 0, None
    while True:
        header = fh.read(BLOCK)
        if len(header) < BLOCK:
            raise TarFormatError(f"truncated tar: no end-of-archive marker after byte {offset}")
        if header == bytes(BLOCK):
            return  # end-of-archive marker
        if not _checksum_ok(header):
            raise TarFormatError(f"corrupt tar header at byte {offset}")
        size, kind = _octal(header[124:136]), header[156:157]
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        name = long_name or _header_name(header)
        if kind in (b"L", b"x") or read(name):
            data = fh.read(padded)
            if len(data) < padded:
                raise TarFormatError(f"truncated tar: member at byte {offset} is cut short")
            data = data[:size]
        else:
            data = b""
            if fh.seek(padded, 1) > _size(fh):
                raise TarFormatError(f"truncated tar: member at byte {offset} is cut short")
        long_name = None
        if kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8")
        elif kind == b"x":
            long_name = _pax_path(data)
        elif kind in (b"0", b"\0", b"7"):
            yield name, offset, size, data
        offset += BLOCK + padded


def _size(fh: BinaryIO) -> int:
    return os.fstat(fh.fileno()).st_size


def _header_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
    if header[257:263] == b"ustar\0":  # POSIX ustar; GNU ("ustar  ") keeps other fields there
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
        if prefix:
            name = f"{prefix}/{name}"
    return name
