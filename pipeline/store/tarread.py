"""Tar shards read: the one reader, of verify and the training loader alike.

Python's tarfile spends 35-70 us a member building header objects (measured at different times on
the shared development machine), about what decoding a 160x160 JPEG takes; `tar_files` reads the
512-byte headers directly (ustar, GNU long names, pax paths, checksums checked) and
`group_samples` groups the files of one key into a sample, as WebDataset does. verify reads shards
with the same two functions as training, so a passing verify speaks for the reader that training
uses.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from pipeline.schema import MAX_MEMBER_BYTES, SAMPLE_EXTS
from pipeline.store.names import NOT_UTF8, bad_name, shown_name
from pipeline.store.tar import TAR_BLOCK

_ZERO_BLOCK = bytes(TAR_BLOCK)
# What one sample may hold, whatever its headers say: the reader keeps a sample's files until its
# key changes, so a shard of one key with a thousand extensions would otherwise be held whole.
# A shard sample has the four fields and the json; three more files leave room for a stray field
# (verify then names it), and the bytes are what five files at the member cap come to.
MAX_SAMPLE_FILES = len(SAMPLE_EXTS) + 3
MAX_SAMPLE_BYTES = len(SAMPLE_EXTS) * MAX_MEMBER_BYTES
_REGULAR = (b"0", b"\0", b"7")  # tar types of regular files ("7": contiguous, read like one)


class OddMembers:
    """What a shard holds that is no sample's: the first `shown` members named, the rest
    counted (a shard of a million links is never held whole). Verify reports them."""

    def __init__(self, shown: int = 5) -> None:
        self.shown, self.lines, self.more = shown, [], 0

    def append(self, line: str) -> None:
        if len(self.lines) < self.shown:
            self.lines.append(line)
        else:
            self.more += 1


# A tar type's name, for a member no sample holds (verify's report of it).
_KINDS = {b"1": "hard link", b"2": "symlink", b"3": "device", b"4": "device", b"5": "directory",
          b"6": "FIFO", b"g": "pax global header"}  # fmt: skip


def tar_files(stream: BinaryIO, odd: OddMembers | None = None) -> Iterator[tuple[str, bytes]]:
    """The regular files of a tar stream as (name, data) pairs, in order. `odd`, if given,
    gets a line for each member that is not a regular file (a link, a directory, ...)."""
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
            if odd is not None:
                kind_name = _KINDS.get(kind, f"tar type {kind!r}")
                odd.append(f"{shown_name(long_name or _ustar_name(header))}: a {kind_name}")
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


def group_samples(
    files: Iterable[tuple[str, bytes]], url: str, odd: OddMembers | None = None
) -> Iterator[dict]:
    """Consecutive files sharing a key -> one sample {"__key__", "__url__", ext: bytes, ...}.

    WebDataset's grouping, with two differences: a second file of the same extension in one
    sample is never silently dropped: the sample carries `REFUSED` (why), and its readers
    refuse that sample alone (the tar itself is intact, and the samples after it are read); and
    a sample of over MAX_SAMPLE_FILES files or MAX_SAMPLE_BYTES bytes is a ValueError, never
    held whole. A file whose name is no KEY.EXT is skipped (`odd`, if given, gets a line).
    """
    sample: dict | None = None
    for name, data in files:
        not_utf8 = not name.isascii() and bad_name(name)  # its sample is refused alone
        if not_utf8:
            name = shown_name(name)
        key, ext = split_name(name)
        if key is None:
            if odd is not None:
                odd.append(f"{name}: a file of {len(data)} bytes with no KEY.EXT name")
            continue
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if not_utf8:
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


def read_samples(stream: BinaryIO, url: str, odd: OddMembers | None = None) -> Iterator[dict]:
    """The samples of one tar stream (see `tar_files` and `group_samples`); `odd`, if given,
    gets a line for each member that is none of theirs (the loader skips those unsaid)."""
    return group_samples(tar_files(stream, odd), url, odd)
