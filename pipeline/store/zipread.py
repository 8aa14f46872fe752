"""Reading batch zips fast: the central directory parsed with struct, members read by offset.

zipfile builds a ZipInfo per member and a file object per read (~40 us a member together); a
published zip has ~120,000 members. This reads the same fields and bytes with one struct call and
one pread + inflate each, checks CRCs and sizes as zipfile does, reads a zip comment and bytes
before the zip (a self-extracting stub) as zipfile does, and hands an unusual listing (ZIP64
fields on a member, damage) to zipfile. Encrypted members, compression methods other than stored
and deflate, a member needing a later zip version than 6.3 and one whose name is not the UTF-8 its
entry claims are refused, each alone: zipfile would refuse the whole zip for one such entry. No
torch here.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from pipeline.schema import MAX_MEMBER_BYTES

LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a member's local header (APPNOTE 4.3.7)
LOCAL_MAGIC = b"PK\x03\x04"
LOCAL_NAME_LENGTHS = struct.Struct("<2H")  # the last two fields of a local header
# A central directory entry's fields (APPNOTE 4.3.12) that matter here: signature, version
# needed, flags, method, CRC, sizes, name/extra/comment lengths, local header offset.
CENTRAL_FIELDS = struct.Struct("<4s2xBxHH4xLLLHHH8xL")
CENTRAL_MAGIC = b"PK\x01\x02"
END_RECORD = struct.Struct("<4s4H2LH")  # end of central directory record (APPNOTE 4.3.16)
END_MAGIC = b"PK\x05\x06"
ZIP64_LOCATOR = struct.Struct("<4sLQL")  # just before the end record in a ZIP64 zip (4.3.15)
ZIP64_LOCATOR_MAGIC = b"PK\x06\x07"
END64_RECORD = struct.Struct("<4sQ2H2L4Q")  # ZIP64 end of central directory record (4.3.14)
END64_MAGIC = b"PK\x06\x06"
ZIP_STORED, ZIP_DEFLATED = zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED
DEFLATE_SLACK = 1 << 16  # deflate may grow incompressible data a little: 5 bytes per 16 KB
MAX_EXTRACT_VERSION = 63  # the newest "version needed to extract" zipfile reads (6.3)
MAX_COMMENT = 0xFFFF  # a zip comment's length is a 16-bit field of the end record


class MemberRefused(zipfile.BadZipFile):
    """A member this reader will not read: encrypted, an unusual method or version, a bomb, or
    a name that is not the UTF-8 its entry claims.

    A BadZipFile, so every caller that skips an unreadable member skips this one with its reason.
    """


class ZipEntry(NamedTuple):
    """A member as the central directory lists it (the ZipInfo attributes convert uses)."""

    filename: str
    header_offset: int
    compress_type: int
    flag_bits: int
    compress_size: int
    file_size: int
    CRC: int
    extract_version: int  # "version needed to extract": over 6.3, the member is refused


def read_central_directory(f) -> list[ZipEntry] | None:
    """A plain zip's members from its central directory, in order; None if it is not plain.

    zipfile builds a ZipInfo per member (~5 us each, a fifth of a second for a published zip);
    this reads the same fields with one struct call each. A zip comment, and bytes before the zip
    (a self-extracting stub: every offset is shifted by its length), are read as zipfile reads
    them. Anything else unusual (ZIP64 fields in a member, a Unicode-path field, damage) gives
    None: zipfile lists that zip instead. An entry zipfile would refuse the whole zip for (a name
    that is not valid UTF-8 though its flag says so, a version over 6.3) is listed:
    `MemberReader.read` refuses that member alone.
    """
    fd = f.fileno()
    size = os.fstat(fd).st_size
    found = _find_directory(fd, size)
    if found is None:
        return None
    total, cd_size, cd_start, concat = found
    directory = os.pread(fd, cd_size, cd_start)
    entries = _parse_directory(directory) if len(directory) == cd_size else None
    if entries is None or len(entries) != total:
        return None
    if concat:  # bytes before the zip: each member lies that much further on, as with zipfile
        entries = [e._replace(header_offset=e.header_offset + concat) for e in entries]
    return entries


def _find_directory(fd: int, size: int) -> tuple[int, int, int, int] | None:
    """(members, size, start, concat) of the central directory; None if no end record fits."""
    tail_size = min(size, END64_RECORD.size + ZIP64_LOCATOR.size + END_RECORD.size)
    tail = os.pread(fd, tail_size, size - tail_size)
    found = _directory_place(tail, tail_size - END_RECORD.size, size)
    if found is not None:  # no comment: the end record ends the zip (one small read)
        return found
    # A comment (up to 65,535 bytes) follows the end record. Search back for its signature as
    # zipfile does, but take a record only if its comment ends the file and its directory fits:
    # the comment may hold the signature too.
    start = max(0, size - MAX_COMMENT - tail_size)
    tail = os.pread(fd, size - start, start)
    pos = len(tail) - END_RECORD.size + len(END_MAGIC)  # a whole record fits before the end
    while found is None and (pos := tail.rfind(END_MAGIC, 0, pos)) >= 0:
        found = _directory_place(tail, pos, size)
        pos += len(END_MAGIC) - 1  # the next candidate starts before this one
    return found


def _directory_place(tail: bytes, record: int, size: int) -> tuple[int, int, int, int] | None:
    """(members, size, start, concat) of the central directory from the end record at `record`
    in `tail`, the zip's last bytes; None if odd. concat: the bytes before the zip."""
    if record < 0:
        return None
    magic, disk, cd_disk, count, total, cd_size, cd_offset, comment = END_RECORD.unpack_from(
        tail, record
    )
    cd_end = size - len(tail) + record  # where the end record starts in the file
    if magic != END_MAGIC or cd_end + END_RECORD.size + comment != size:
        return None
    locator = record - ZIP64_LOCATOR.size
    if locator >= 0 and tail.startswith(ZIP64_LOCATOR_MAGIC, locator):
        # ZIP64 (over 65,535 members, as the published zips): the counts are in its own record.
        _, locator_disk, record_offset, disks = ZIP64_LOCATOR.unpack_from(tail, locator)
        if locator < END64_RECORD.size or locator_disk or disks > 1:
            return None
        magic, _, _, _, disk, cd_disk, count, total, cd_size, cd_offset = END64_RECORD.unpack_from(
            tail, locator - END64_RECORD.size
        )
        cd_end -= ZIP64_LOCATOR.size + END64_RECORD.size
        if magic != END64_MAGIC or record_offset != cd_offset + cd_size:
            return None
    concat = cd_end - cd_size - cd_offset  # zipfile's `concat`: 0 unless bytes precede the zip
    if disk or cd_disk or count != total or concat < 0:
        return None
    return total, cd_size, cd_end - cd_size, concat


def _parse_directory(directory: bytes) -> list[ZipEntry] | None:
    entries, pos, end = [], 0, len(directory)
    unpack = CENTRAL_FIELDS.unpack_from
    while pos < end:
        if end - pos < CENTRAL_FIELDS.size:
            return None
        (magic, version, flags, method, crc, csize, usize,
         name_len, extra_len, comment_len, offset) = unpack(directory, pos)  # fmt: skip
        pos += CENTRAL_FIELDS.size
        name = directory[pos : pos + name_len]
        pos += name_len + extra_len + comment_len
        if magic != CENTRAL_MAGIC or pos > end or b"\0" in name:
            return None  # zipfile rejects these, or (a NUL) reads them its own way
        if 0xFFFFFFFF in (csize, usize, offset):
            return None  # the real values are in a ZIP64 extra field
        if extra_len and not _plain_extra(directory, pos - comment_len - extra_len, extra_len):
            return None
        try:
            filename = name.decode("ascii")  # what cp437 and utf-8 give too, only faster
        except UnicodeDecodeError:
            # Invalid UTF-8 keeps its bytes as lone surrogates (distinct names stay distinct);
            # reading such a member is refused (`bad_name`), the rest of the zip is not.
            filename = name.decode("utf-8" if flags & 0x800 else "cp437", "surrogateescape")
        entries.append(ZipEntry(filename, offset, method, flags, csize, usize, crc, version))
    return entries


def _plain_extra(directory: bytes, start: int, length: int) -> bool:
    """True when the extra fields are well formed and none is one zipfile interprets."""
    pos, end = start, start + length
    while end - pos >= 4:
        kind, size = struct.unpack_from("<HH", directory, pos)
        if kind in (0x0001, 0x7075) or pos + 4 + size > end:  # ZIP64, Unicode path, damage
            return False
        pos += 4 + size
    return True


class MemberReader:
    """A zip's member list, and its members read by offset: one pread, one inflate each.

    zipfile's own `read` costs ~35 us a member (a file object, a decompressor, several small
    reads); this costs a fraction of that, and convert reads ~120,000 members a zip. The CRC and
    size are checked as zipfile does. A zip whose central directory is not plain is listed by
    zipfile; encrypted members and methods other than stored and deflate are refused.
    """

    def __init__(self, path: Path, max_member: int = MAX_MEMBER_BYTES) -> None:
        self.path = path
        self.max_member = max_member  # the most bytes read or inflated for one member
        self._file = open(path, "rb")  # closed by close()
        self._zf: zipfile.ZipFile | None = None
        try:
            plain = read_central_directory(self._file) if hasattr(os, "pread") else None
            if plain is None:  # the same fields, from zipfile's listing
                fields = ZipEntry._fields
                plain = [
                    ZipEntry(*(getattr(i, f) for f in fields)) for i in self._zipfile().infolist()
                ]
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
        needing a zip version over 6.3 or whose name is not valid UTF-8; one that inflates past
        its declared size is stopped there.
        """
        _, offset, method, flags, size, file_size, crc, version = self._by_name[name]
        self._check_member(name, method, flags, size, file_size, version)
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
        _, _, method, flags, size, file_size, _, version = self._by_name[name]
        self._check_member(name, method, flags, size, file_size, version)

    def _check_member(
        self, name: str, method: int, flags: int, size: int, file_size: int, version: int
    ) -> None:
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


def shown_name(text: str) -> str:
    """Text holding names listed from bytes that are not valid UTF-8, with those bytes as
    `\\xff`: valid text for every reader (JSON, a terminal), where a lone surrogate is not."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def bad_name(name: str) -> bool:
    """True for a name listed from bytes that are not valid UTF-8 (kept as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


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
