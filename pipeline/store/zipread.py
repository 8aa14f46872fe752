"""Reading batch zips fast: the central directory parsed with struct, members read by offset.

zipfile builds a ZipInfo per member and a file object per read (~40 us a member together); a
published zip has ~120,000 members. This lists them with `zipdir` (one struct call each) and reads
each with one pread + inflate, checking CRCs and sizes as zipfile does. `zipdir` reads as zipfile
does a zip comment, bytes before the zip (a self-extracting stub), bytes after its end record
beyond its comment and ZIP64 fields on members; an unusual listing (a Unicode-path field on a
member, damage) is left to zipfile. Encrypted members, compression methods other than stored and
deflate, a member needing a later zip version than 6.3, one whose name is not the UTF-8 its entry
claims, and one whose directory entry lies (extra fields cut short, a ZIP64 offset or size past
the end of the zip) are refused, each alone: zipfile would refuse the whole zip for most of
these, and read wherever the last points. No torch here.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path

from pipeline.schema import MAX_MEMBER_BYTES
from pipeline.store.names import NOT_UTF8, bad_name
from pipeline.store.zipdir import (
    LOCAL_HEADER,
    LOCAL_MAGIC,
    LOCAL_NAME_LENGTHS,
    ZIPINFO_FIELDS,
    ZipEntry,
    read_central_directory,
)

ZIP_STORED, ZIP_DEFLATED = zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED
DEFLATE_SLACK = 1 << 16  # deflate may grow incompressible data a little: 5 bytes per 16 KB
MAX_EXTRACT_VERSION = 63  # the newest "version needed to extract" zipfile reads (6.3)


class MemberRefused(zipfile.BadZipFile):
    """A member this reader will not read: encrypted, an unusual method or version, a bomb, a
    name that is not the UTF-8 its entry claims, or a directory entry that lies about it.

    A BadZipFile, so every caller that skips an unreadable member skips this one with its reason.
    """


class MemberReader:
    """A zip's member list, and its members read by offset: one pread, one inflate each.

    zipfile's own `read` costs ~35 us a member (a file object, a decompressor, several small
    reads); this costs a fraction of that, and convert reads ~120,000 members a zip. The CRC and
    size are checked as zipfile does. A zip whose central directory the fast reader does not
    list is listed by zipfile; encrypted members and methods other than stored and deflate are
    refused.
    """

    def __init__(self, path: Path, max_member: int = MAX_MEMBER_BYTES) -> None:
        self.path = path
        self.max_member = max_member  # the most bytes read or inflated for one member
        self._file = open(path, "rb")  # closed by close()
        self._zf: zipfile.ZipFile | None = None
        self._header_names: dict[str, str] = {}  # name -> the one its headers hold, if other
        try:
            plain = read_central_directory(self._file) if hasattr(os, "pread") else None
            if plain is None:  # the same fields, from zipfile's listing
                listed = self._zipfile().infolist()
                plain = [ZipEntry(*(getattr(i, f) for f in ZIPINFO_FIELDS)) for i in listed]
                # Python 3.12+ names a member by its Unicode-path field, where its headers may
                # hold the name in another encoding (Info-ZIP, 7-Zip, Windows' own zip).
                self._header_names = {
                    i.filename: i.orig_filename for i in listed if i.orig_filename != i.filename
                }
            self.infos = plain
        except BaseException:
            self.close()
            raise
        self._fd = self._file.fileno() if hasattr(os, "pread") else None
        self._extra_guess = 0  # local headers' extra fields are usually all alike
        # The last member of a name wins, as with zipfile's getinfo.
        self._by_name = {info.filename: info for info in self.infos}

    def _zipfile(self) -> zipfile.ZipFile:
        if self._zf is None:
            self._zf = zipfile.ZipFile(self._file)
        return self._zf

    def close(self) -> None:
        """Close the zip."""
        if self._zf is not None:
            self._zf.close()
        self._file.close()

    def __enter__(self) -> MemberReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, name: str) -> bytes:
        """The member's uncompressed bytes; BadZipFile, zlib.error or EOFError if damaged.

        Memory is bounded whatever the zip claims: an encrypted member, one compressed with
        another method than stored or deflate, or one whose header declares more than
        `max_member` bytes, is refused before any byte is read (MemberRefused), as is one
        needing a zip version over 6.3, whose name is not valid UTF-8 or whose directory entry
        lies (extra fields cut short, a ZIP64 offset or size past the zip's end); one that
        inflates past its declared size is stopped there.
        """
        entry = self._by_name[name]
        self._check_member(entry)
        _, offset, method, flags, size, file_size, crc, _, _ = entry
        if self._fd is None:
            return self._zipfile().read(name)  # zipfile inflates deflate in bounded steps
        # One pread for the local header and the data, guessing the header's name and extra
        # fields from the last member's; a second one when the guess is wrong.
        guess = LOCAL_HEADER.size + len(name) + self._extra_guess
        chunk = os.pread(self._fd, guess + size, offset)
        if len(chunk) < LOCAL_HEADER.size or not chunk.startswith(LOCAL_MAGIC):
            raise zipfile.BadZipFile("bad local header (damaged zip)")
        name_len, extra_len = LOCAL_NAME_LENGTHS.unpack_from(chunk, LOCAL_HEADER.size - 4)
        start = LOCAL_HEADER.size + name_len + extra_len
        header_name = _raw_name(self._header_names.get(name, name), flags)
        if chunk[LOCAL_HEADER.size : LOCAL_HEADER.size + name_len] != header_name:
            # As zipfile checks: an entry pointing at another member's data is a damaged zip.
            raise zipfile.BadZipFile("its local header names another member (damaged zip)")
        if start == guess:
            raw = memoryview(chunk)[start:]
        else:
            self._extra_guess = start - LOCAL_HEADER.size - len(name)
            raw = os.pread(self._fd, size, offset + start)
        if len(raw) != size:
            raise EOFError("the zip ends inside this member")
        data = _inflate(raw, file_size) if method == ZIP_DEFLATED else bytes(raw)
        if len(data) != file_size or zlib.crc32(data) != crc:
            raise zipfile.BadZipFile("bad CRC-32 or size (damaged member)")
        return data

    def check(self, name: str) -> None:
        """MemberRefused if `read` would refuse the member from its directory entry alone."""
        self._check_member(self._by_name[name])

    def _check_member(self, entry: ZipEntry) -> None:
        name, _, method, flags, size, file_size, _, version, refused = entry
        if refused:
            raise MemberRefused(refused)
        if not name.isascii() and bad_name(name):
            raise MemberRefused("its name is not valid UTF-8 though its entry says it is")
        if version > MAX_EXTRACT_VERSION:
            raise MemberRefused(
                f"needs zip version {version / 10:.1f} to extract: versions up to "
                f"{MAX_EXTRACT_VERSION / 10:.1f} are read"
            )
        if flags & 1:
            raise MemberRefused("encrypted member (no password to read it)")
        if method not in (ZIP_STORED, ZIP_DEFLATED):
            # zipfile inflates bzip2 and LZMA without a bound (785 bytes of bzip2 gave 1 GiB
            # at once); the published zips use deflate only.
            kind = zipfile.compressor_names.get(method, "unknown")
            raise MemberRefused(
                f"compression method {method} ({kind}) is not read: only stored and deflate are"
            )
        if file_size > self.max_member or size > self.max_member + DEFLATE_SLACK:
            raise MemberRefused(
                f"declares {max(size, file_size)} bytes, over the {self.max_member} bytes "
                "one image may have: a deflate bomb, or not an image"
            )


def _inflate(raw: memoryview, file_size: int) -> bytes:
    """Inflate at most `file_size` + 1 bytes: a stream that would give more is refused."""
    inflater = zlib.decompressobj(-15)
    data = inflater.decompress(raw, file_size + 1)
    if len(data) > file_size or inflater.unconsumed_tail:
        raise MemberRefused(
            f"inflates past the {file_size} bytes its header declares: a deflate bomb"
        )
    if not inflater.eof:
        raise zlib.error("incomplete or truncated deflate stream")
    return data


def zip_fingerprint(path: Path, entries: Iterable[ZipEntry]) -> str:
    """Identify a zip's content cheaply: its size and its members' names, CRCs and sizes."""
    listing = sorted(f"{e.filename}\0{e.CRC:08x}\0{e.file_size}\n" for e in entries)
    text = f"{Path(path).stat().st_size}\n" + "".join(listing)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def fingerprint_zip(path: Path) -> str:
    """`zip_fingerprint` of a zip on disk, listed by the same reader convert uses."""
    with MemberReader(path) as reader:
        return zip_fingerprint(path, reader.infos)


def _raw_name(name: str, flags: int) -> bytes:
    """A member's name as its headers hold it (see zipdir's decoding)."""
    if name.isascii():
        return name.encode("ascii")
    return name.encode("utf-8" if flags & 0x800 else "cp437", NOT_UTF8)
