"""Reading tar shards fast: the 512-byte headers parsed directly (no torch, no tarfile objects)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from pipeline.shardwriter import TAR_BLOCK

_ZERO_BLOCK = bytes(TAR_BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # tar types of regular files ("7": contiguous, read like one)


def tar_files(stream: BinaryIO, url: str) -> Iterator[dict]:
    """The regular files of a tar stream as webdataset file dicts {"fname", "data", "__url__"}.

    Python's tarfile spends ~70 us a member building header objects, more than decoding a
    160x160 JPEG; this reads the 512-byte headers directly (ustar, GNU long names, pax paths).
    """
    long_name = None  # set by a GNU `L` or pax `x` member, for the member after it
    while True:
        header = _read_exact(stream, TAR_BLOCK, end_ok=True)
        if not header or header == _ZERO_BLOCK:  # end of archive (or of a stream without one)
            return
        _check_header(header)
        size, kind = _member_size(header), header[156:157]
        data = _read_exact(stream, size)
        _read_exact(stream, -size % TAR_BLOCK)  # padding to a whole block
        if kind in (b"L", b"x"):
            long_name = _long_name(kind, data) or long_name
        elif kind in _REGULAR:
            name, long_name = long_name or _ustar_name(header), None
            yield {"fname": name, "data": data, "__url__": url}
        else:  # directories, links, pax globals: nothing a sample holds
            long_name = None


def _read_exact(stream: BinaryIO, size: int, end_ok: bool = False) -> bytes:
    """`size` bytes, or b"" at the end of the stream if `end_ok`; else short reads raise."""
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    if left == size and end_ok:
        return b""
    if left:
        raise ValueError(f"truncated tar ({size - left} of {size} bytes)")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _check_header(header: bytes) -> None:
    # The checksum counts the checksum field itself as 8 spaces.
    stored = header[148:156].strip(b"\0 ")
    actual = sum(header[:148]) + sum(header[156:]) + 8 * 32
    try:
        matches = int(stored, 8) == actual
    except ValueError:  # not octal digits at all
        matches = False
    if not matches:
        raise ValueError("a tar header's checksum does not match (not a tar, or damaged)")


def _member_size(header: bytes) -> int:
    field = header[124:136]
    if field[0] & 0x80:  # GNU base-256, for members over 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0" and header[345] != 0:  # POSIX prefix for long paths
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8")


def _long_name(kind: bytes, data: bytes) -> str | None:
    if kind == b"L":
        return data.split(b"\0", 1)[0].decode("utf-8")
    for record in data.decode("utf-8").splitlines():  # pax: "LEN key=value"
        key, _, value = record.partition(" ")[2].partition("=")
        if key == "path":
            return value
    return None
