"""Tar shards: the one writer (convert) and the one reader (verify and the loader alike).

Writing: a member's ustar header is assembled from precomputed parts (only its name, size and
checksum vary), so the same samples always give byte-identical shards; each shard's sha256 and
size come from its bytes as they go out, so a shard is never read back.

Reading: Python's tarfile spends 35-70 us a member building header objects (measured at different
times on the shared development machine), about what decoding a 160x160 JPEG takes; `tar_files`
reads the 512-byte headers directly (ustar, GNU long names, pax paths, checksums checked) and
`group_samples` groups the files of one key into a sample, as WebDataset does. verify reads shards
with the same two functions as training, so a passing verify speaks for the reader that training
uses.
"""

from __future__ import annotations

import hashlib
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from pipeline.schema import MAX_MEMBER_BYTES, SAMPLE_EXTS, shard_name

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


# ---------------------------------------------------------------- reading

_ZERO_BLOCK = bytes(TAR_BLOCK)
# What one sample may hold, whatever its headers say: the reader keeps a sample's files until its
# key changes, so a shard of one key with a thousand extensions would otherwise be held whole.
# A shard sample has the four fields and the json; three more files leave room for a stray field
# (verify then names it), and the bytes are what five files at the member cap come to.
MAX_SAMPLE_FILES = len(SAMPLE_EXTS) + 3
MAX_SAMPLE_BYTES = len(SAMPLE_EXTS) * MAX_MEMBER_BYTES
_REGULAR = (b"0", b"\0", b"7")  # tar types of regular files ("7": contiguous, read like one)


def tar_files(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """The regular files of a tar stream as (name, data) pairs, in order."""
    long_name = None  # set by a GNU `L` or pax `x` member, for the member after it
    read = stream.read
    while True:
        header = read(TAR_BLOCK)
        if len(header) != TAR_BLOCK:  # the end of the stream, or a short read of a pipe
            if not header:
                return
            header += _read_exact(stream, TAR_BLOCK - len(header))
        if header == _ZERO_BLOCK:  # end of archive
            return
        _check_header(header)
        size, kind = _member_size(header), header[156:157]
        if size > MAX_MEMBER_BYTES:  # never trust a header with memory: refuse, don't allocate
            name = header[:100].split(b"\0", 1)[0].decode(errors="replace")
            raise ValueError(
                f"tar member {name!r} declares {size} bytes, over the {MAX_MEMBER_BYTES} bytes "
                "a sample's file may have (damaged, or not a shard)"
            )
        padded = -(-size // TAR_BLOCK) * TAR_BLOCK  # the data and its padding: one read
        data = read(padded)
        if len(data) != padded:
            data += _read_exact(stream, padded - len(data))
        if padded != size:
            data = data[:size]
        if kind in _REGULAR:
            yield long_name or _ustar_name(header), data
            long_name = None
        elif kind in (b"L", b"x"):
            long_name = _long_name(kind, data) or long_name
        else:  # directories, links, pax globals: nothing a sample holds
            long_name = None


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    """The rest of a short read: `size` more bytes (a pipe may give fewer a call), or raise."""
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise ValueError(f"truncated tar ({size - left} of {size} more bytes)")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _check_header(header: bytes) -> None:
    # The checksum is the byte sum of the header, its own field counted as 8 spaces. adler32's
    # low half is 1 + the byte sum mod 65521, exact for 256 bytes (at most 65,280): two C calls
    # instead of summing 512 Python ints (a tenth of the loader's time reading a shard).
    stored = header[148:156].strip(b"\0 ")
    halves = (zlib.adler32(header[:256]) & 0xFFFF) + (zlib.adler32(header[256:]) & 0xFFFF) - 2
    actual = halves - sum(header[148:156]) + 8 * 32
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
    return name.decode("utf-8", NOT_UTF8)


# A name's bytes that are not UTF-8 become lone surrogates (found by `_escaped`): its sample is
# refused alone, where a decoding error would have lost the rest of an intact shard.
NOT_UTF8 = "surrogateescape"


def _long_name(kind: bytes, data: bytes) -> str | None:
    if kind == b"L":
        return data.split(b"\0", 1)[0].decode("utf-8", NOT_UTF8)
    for record in data.decode("utf-8", NOT_UTF8).splitlines():  # pax: "LEN key=value"
        key, _, value = record.partition(" ")[2].partition("=")
        if key == "path":
            return value
    return None


def split_name(name: str) -> tuple[str, str] | tuple[None, None]:
    """(key, extension) of a member name: the key ends at the first dot of the file name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:  # no dot, or a name that starts with one: not part of a sample
        return None, None
    return name[:dot], name[dot + 1 :].lower()


# A sample's entry saying why its readers must refuse it (a file twice): the sample is damaged,
# not the shard. A member named as one of the readers' own entries (`KEY.__key__`, or any
# `KEY.__NAME...`: the loader adds `__cycle__`) is refused so, never stored beside them.
REFUSED = "__refused__"


def group_samples(files: Iterable[tuple[str, bytes]], url: str) -> Iterator[dict]:
    """Consecutive files sharing a key -> one sample {"__key__", "__url__", ext: bytes, ...}.

    WebDataset's grouping, with two differences: a second file of the same extension in one
    sample is never silently dropped: the sample carries `REFUSED` (why), and its readers
    refuse that sample alone (the tar itself is intact, and the samples after it are read); and
    a sample of over MAX_SAMPLE_FILES files or MAX_SAMPLE_BYTES bytes is a ValueError, never
    held whole.
    """
    sample: dict | None = None
    for name, data in files:
        escaped = None if name.isascii() else _escaped(name)
        if escaped is not None:
            name = escaped
        key, ext = split_name(name)
        if key is None:
            continue
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if escaped is not None:
            sample.setdefault(REFUSED, f"{name}: a member name that is not UTF-8, in sample {key}")
            continue
        if ext.startswith("__"):  # the readers' own entries: __key__, __url__, __cycle__, ...
            why = f"{name}: a file named as a reader's own entry (__NAME__) in sample {key}"
            sample.setdefault(REFUSED, why)
            continue  # never stored: the loader's __cycle__ steers how a skip is counted
        if ext in sample:
            sample.setdefault(REFUSED, f"{name}: a second {ext} file for sample {key}")
            continue  # the first is kept; the sample is refused where it is used
        sample[ext] = data
        if len(sample) > _USUAL_SIZE:  # only then can it pass either bound (see _check_size)
            _check_size(sample)
    if sample is not None:
        yield sample


def _escaped(name: str) -> str | None:
    """A name whose bytes were not all UTF-8 (see NOT_UTF8) with those bytes as `\\xff`
    escapes, printable and loggable; None for a name that was UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", NOT_UTF8).decode("utf-8", "backslashreplace")
    return None


# A sample as convert writes it, with __key__ and __url__. Up to this many files of at most
# MAX_MEMBER_BYTES each (tar_files refuses bigger), a sample is within both bounds.
_USUAL_SIZE = len(SAMPLE_EXTS) + 2


def _check_size(sample: dict) -> None:
    """Raise if a sample being gathered has over MAX_SAMPLE_FILES files or MAX_SAMPLE_BYTES."""
    files = len(sample) - 2  # less __key__ and __url__
    held = sum(len(data) for ext, data in sample.items() if ext not in ("__key__", "__url__"))
    if files > MAX_SAMPLE_FILES or held > MAX_SAMPLE_BYTES:
        raise ValueError(
            f"sample {sample['__key__']} has over {MAX_SAMPLE_FILES} files or "
            f"{MAX_SAMPLE_BYTES} bytes, more than a shard sample holds (damaged, or not a shard)"
        )


def read_samples(stream: BinaryIO, url: str) -> Iterator[dict]:
    """The samples of one tar stream (see `tar_files` and `group_samples`)."""
    return group_samples(tar_files(stream), url)
