"""Tar shards written the way convert needs them: fixed metadata, hashed as written, renamed last.

A member's ustar header is assembled from precomputed parts (only its name, size and checksum
vary), so the same samples always give byte-identical shards; each shard's sha256 and size come
from its bytes as they go out, so a shard is never read back.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

from pipeline.layout import shard_name

# Tar members get fixed metadata so the same zip and seed give byte-identical shards.
TAR_BLOCK = 512
TAR_RECORD = tarfile.RECORDSIZE
WRITE_BUFFER = 1 << 20  # a shard goes out in 1 MB writes, not one per member


class _HashingFile:
    """A write-only file that hashes and counts the bytes going through it."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "wb", buffering=WRITE_BUFFER)  # closed by close()
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        """Write, hash and count `data`."""
        self._file.write(data)
        self._sha.update(data)
        self.size += len(data)

    def close(self) -> str:
        """Close the file; return the hex sha256 of everything written."""
        self._file.close()
        return self._sha.hexdigest()


def _ustar_constants() -> tuple[bytes, bytes, bytes, int]:
    """The fixed parts of a ustar header and their byte sum (checksum field as spaces)."""
    ids = b"0000444\0" + b"0000000\0" * 2  # mode 0o444, uid 0, gid 0
    mtime = b"0" * 11 + b"\0"  # 1970: the same bytes whenever the shard is written
    # type "0" (file), linkname, magic+version, uname, gname, devmajor, devminor, prefix, padding
    tail = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (32 + 32 + 8 + 8 + 155 + 12)
    return ids, mtime, tail, sum(ids) + sum(mtime) + sum(tail) + 8 * ord(" ")


_IDS, _MTIME, _TAIL, _FIXED_SUM = _ustar_constants()


def tar_member(name: str, data: bytes) -> bytes:
    """One tar member (header, data, padding) with fixed metadata: mtime 0, uid/gid 0, 0o444."""
    # tarfile's header code costs ~80 us a member, more than everything else per sample; only
    # the name, size and checksum vary, so the header is assembled from precomputed parts.
    raw = name.encode()
    if len(raw) > 100 or len(data) >= 8**11:
        raise ValueError(f"{name}: name over 100 bytes or data over 8 GiB: not for a ustar header")
    size = b"%011o\0" % len(data)
    checksum = _FIXED_SUM + sum(raw) + sum(size)
    header = b"".join((raw.ljust(100, b"\0"), _IDS, size, _MTIME, b"%06o\0 " % checksum, _TAIL))
    return b"".join((header, data, b"\0" * (-len(data) % TAR_BLOCK)))


class ShardWriter:
    """Writes one zip's samples into `DIR/split/batchNN-XXXXXX.tar`, rolling over every N samples.

    Shards are written as `*.tar.tmp` and renamed only by `finish()`, so a crash never leaves a
    file with a final name but partial content.
    """

    def __init__(self, out: Path, split: str, batch: int, max_samples: int) -> None:
        self.out, self.split, self.batch, self.max_samples = out, split, batch, max_samples
        self.shards: list[dict] = []
        self._temps: list[Path] = []
        self._file: _HashingFile | None = None
        self._count = 0
        (out / split).mkdir(parents=True, exist_ok=True)

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """Append one sample: `KEY.<field>` for each field, in the given order."""
        if self._file is None or self._count == self.max_samples:
            self._roll()
        self._file.write(b"".join(tar_member(f"{key}.{ext}", data) for ext, data in fields.items()))
        self._count += 1

    def _roll(self) -> None:
        self._close_current()
        rel = shard_name(self.split, self.batch, len(self.shards))
        temp = self.out / f"{rel}.tmp"
        self._temps.append(temp)
        self._file = _HashingFile(temp)
        self._count = 0
        self.shards.append({"path": rel, "batch": self.batch, "samples": 0})

    def _close_current(self) -> None:
        if self._file is None:
            return
        # End of archive: two zero blocks, then zero padding to a whole record, as tarfile does.
        end = 2 * TAR_BLOCK
        end += -(self._file.size + end) % TAR_RECORD
        self._file.write(b"\0" * end)
        size = self._file.size
        self.shards[-1].update(samples=self._count, bytes=size, sha256=self._file.close())
        self._file = None

    def finish(self) -> list[dict]:
        """Close the last shard and give every shard its final name; return their entries."""
        self._close_current()
        for temp in self._temps:
            temp.replace(temp.with_suffix(""))
        self._temps = []
        return self.shards

    def abort(self) -> None:
        """Delete every shard written so far (the zip failed)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for temp in self._temps:
            temp.unlink(missing_ok=True)
        self._temps = []
