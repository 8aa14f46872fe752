"""Tar shards: the one writer (convert); `store.tarread` is the one reader.

A member's ustar header is assembled from precomputed parts (only its name, size and checksum
vary), so the same samples always give byte-identical shards; each shard's sha256 and size come
from its bytes as they go out, so a shard is never read back.
"""

from __future__ import annotations

import hashlib
import tarfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from pipeline.schema import shard_name

# Tar members get fixed metadata so the same zip and seed give byte-identical shards.
TAR_BLOCK = 512
TAR_RECORD = tarfile.RECORDSIZE
WRITE_BUFFER = 1 << 20  # a shard goes out in 1 MB writes, not one per member
NAME_FIELD = 100  # bytes in a ustar header's name field
MAX_SIZE = 8**11  # a ustar size field holds 11 octal digits


class _HashingFile:
    """A write-only file that hashes and counts the bytes going through it.

    Bytes gather in a megabyte buffer; a full one is hashed and written by a helper thread
    (both release the GIL) while the next fills, so hashing and writing overlap the caller's
    work. At most two buffers are held; an error in the thread is raised by the next call.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = open(path, "wb", buffering=0)  # closed by close() or discard()
        except OSError as exc:
            raise write_error(path, exc) from None
        self._sha = hashlib.sha256()
        self._buffer = bytearray()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self._pending: Future | None = None  # the buffer the thread is writing
        self.size = 0  # every byte given to write(), buffered ones included

    def write(self, data: bytes) -> None:
        """Write, hash and count `data`."""
        self._buffer += data
        self.size += len(data)
        if len(self._buffer) >= WRITE_BUFFER:
            self._hand_over()

    def _hand_over(self) -> None:
        self._wait()  # in order, and never more than two buffers
        chunk, self._buffer = self._buffer, bytearray()
        self._pending = self._thread.submit(self._hash_and_write, chunk)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _hash_and_write(self, chunk: bytearray) -> None:
        self._sha.update(chunk)
        view, done = memoryview(chunk), 0
        try:
            while done < len(view):  # a raw file may write less than it was given
                done += self._file.write(view[done:])
        except OSError as exc:  # a full disk: say which file could not be written
            raise write_error(self.path, exc) from None
        finally:
            view.release()

    def close(self) -> str:
        """Write what is buffered and close the file; return the hex sha256 of all written."""
        try:
            self._wait()
            self._hash_and_write(self._buffer)
        finally:
            self._thread.shutdown()
            self._file.close()
        return self._sha.hexdigest()

    def discard(self) -> None:
        """Close the file, dropping what is buffered (the shard is about to be deleted)."""
        self._thread.shutdown()  # waits for the buffer being written; its error is moot
        self._file.close()


def write_error(path: Path, exc: OSError) -> OSError:
    """`exc` as an OSError whose message names the file: `cannot write PATH: No space left…`."""
    return OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}")


def _ustar_constants() -> tuple[bytes, bytes, bytes, int]:
    """The fixed parts of a ustar header and their byte sum (checksum field as spaces)."""
    ids = b"0000444\0" + b"0000000\0" * 2  # mode 0o444, uid 0, gid 0
    mtime = b"0" * 11 + b"\0"  # 1970: the same bytes whenever the shard is written
    # type "0" (file), linkname, magic+version, uname, gname, devmajor, devminor, prefix, padding
    tail = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (32 + 32 + 8 + 8 + 155 + 12)
    return ids, mtime, tail, sum(ids) + sum(mtime) + sum(tail) + 8 * ord(" ")


_IDS, _MTIME, _TAIL, _FIXED_SUM = _ustar_constants()
# A header is its NUL-padded name, then this with the size and checksum filled in.
_AFTER_NAME = _IDS + b"%011o\0" + _MTIME + b"%06o\0 " + _TAIL
_ZEROS = bytes(TAR_BLOCK)


def _header(raw_name: bytes, name_sum: int, size: int) -> bytes:
    """A ustar header from the encoded name, that name's byte sum and the data size."""
    if len(raw_name) > NAME_FIELD or size >= MAX_SIZE:
        name = raw_name.decode(errors="replace")
        raise ValueError(f"{name}: name over 100 bytes or data over 8 GiB: not for a ustar header")
    checksum = _FIXED_SUM + name_sum + sum(b"%011o" % size)  # the size field's NUL adds 0
    return raw_name.ljust(NAME_FIELD, b"\0") + _AFTER_NAME % (size, checksum)


def tar_member(name: str, data: bytes) -> bytes:
    """One tar member (header, data, padding) with fixed metadata: mtime 0, uid/gid 0, 0o444."""
    # tarfile's header code costs ~80 us a member, more than everything else per sample; only
    # the name, size and checksum vary, so the header is assembled from precomputed parts.
    raw = name.encode()
    return b"".join((_header(raw, sum(raw), len(data)), data, _ZEROS[: -len(data) % TAR_BLOCK]))


_SUFFIXES: dict[str, tuple[bytes, int]] = {}  # field name -> (b".field", its byte sum)


def _suffix(ext: str) -> tuple[bytes, int]:
    found = _SUFFIXES.get(ext)
    if found is None:
        raw = f".{ext}".encode()
        found = _SUFFIXES[ext] = (raw, sum(raw))
    return found


def sample_members(key: str, fields: dict[str, bytes]) -> bytes:
    """A sample's tar members, `KEY.<field>` for each field in order (as tar_member writes)."""
    # tar_member's work, with the key's bytes and byte sum shared by all its fields' headers.
    raw_key = key.encode()
    key_sum = _FIXED_SUM + sum(raw_key)
    room = NAME_FIELD - len(raw_key)  # what the name field has left after the key
    parts = []
    for ext, data in fields.items():
        suffix, suffix_sum = _SUFFIXES.get(ext) or _suffix(ext)
        size = len(data)
        if len(suffix) > room or size >= MAX_SIZE:
            _header(raw_key + suffix, 0, size)  # raises, naming the member
        checksum = key_sum + suffix_sum + sum(b"%011o" % size)  # the size field's NUL adds 0
        parts += (raw_key, suffix.ljust(room, b"\0"), _AFTER_NAME % (size, checksum), data)
        parts.append(_ZEROS[: -size % TAR_BLOCK])
    return b"".join(parts)


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
        self._file.write(sample_members(key, fields))
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
            self._file.discard()
            self._file = None
        for temp in self._temps:
            temp.unlink(missing_ok=True)
        self._temps = []
