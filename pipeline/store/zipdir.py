"""A zip's member list, read fast: the end record found, the central directory parsed by struct.

zipfile builds a ZipInfo per member (~5 us each); a published zip has ~120,000 members. This
reads the same fields with one struct call each, as zipfile reads them: a zip comment, bytes
before the zip (a self-extracting stub), bytes after its end record beyond its comment (zipfile
finds that record in the last 64 KiB + 22 bytes, and so does this), ZIP64 end records and ZIP64
extra fields on members (sizes and offsets over 4 GiB, APPNOTE 4.5.3). A listing it does not
read (a Unicode-path field on a member, damage) gives None, for zipfile to list. An entry that
lies about where its member is (extra fields cut short, a ZIP64 offset or size past the end of
the zip) is listed with the reason it is refused, and only that member is. No torch here.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

from pipeline.store.names import NOT_UTF8

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
# zipfile looks for the end record in the file's last 64 KiB + 22 bytes (a comment's 65,535 bytes
# at most, and the record), whatever follows the record's comment; so does this.
END_SEARCH = (1 << 16) + END_RECORD.size
ZIP64_RECORDS = END64_RECORD.size + ZIP64_LOCATOR.size  # just before the end record in ZIP64
EXTRA_HEADER = struct.Struct("<2H")  # an extra field's id and length (APPNOTE 4.5.1)
ZIP64_EXTRA, UNICODE_PATH_EXTRA = 0x0001, 0x7075
SATURATED = 0xFFFFFFFF  # a 32-bit size or offset whose value is in the ZIP64 extra field
WIDE_VALUES = [struct.Struct(f"<{n}Q") for n in range(4)]  # a ZIP64 field's 0-3 values

Wide = tuple[int, int, int]  # an entry's uncompressed size, compressed size and offset


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
    refused: str = ""  # why its entry alone refuses it: extra fields cut short, a ZIP64 lie


ZIPINFO_FIELDS = ZipEntry._fields[:-1]  # the ZipInfo attributes of the same names


def read_central_directory(f) -> list[ZipEntry] | None:
    """A plain zip's members from its central directory, in order; None if it is not plain.

    zipfile builds a ZipInfo per member (~5 us each, a fifth of a second for a published zip);
    this reads the same fields with one struct call each. A zip comment, bytes before the zip (a
    self-extracting stub: every offset is shifted by its length), bytes after the end record's
    comment and ZIP64 extra fields on members are read as zipfile reads them. Anything else
    unusual (a Unicode-path field, damage) gives None: zipfile lists that zip instead. An entry
    zipfile would refuse the whole zip for (a name that is not valid UTF-8 though its flag says
    so, a version over 6.3, a cut-short extra field) or that points outside the zip (a ZIP64
    offset or size) is listed: `zipread.MemberReader.read` refuses that member alone.
    """
    fd = f.fileno()
    size = os.fstat(fd).st_size
    found = _find_directory(fd, size)
    if found is None:
        return None
    total, cd_size, cd_start, concat = found
    directory = os.pread(fd, cd_size, cd_start)
    entries = _parse_directory(directory, size - concat) if len(directory) == cd_size else None
    if entries is None or len(entries) != total:
        return None
    if concat:  # bytes before the zip: each member lies that much further on, as with zipfile
        entries = [e._replace(header_offset=e.header_offset + concat) for e in entries]
    return entries


def _find_directory(fd: int, size: int) -> tuple[int, int, int, int] | None:
    """(members, size, start, concat) of the central directory; None if no end record fits."""
    tail_size = min(size, ZIP64_RECORDS + END_RECORD.size)
    tail = os.pread(fd, tail_size, size - tail_size)
    found = _directory_place(tail, tail_size - END_RECORD.size, size)
    if found is not None:  # no comment: the end record ends the zip (one small read)
        return found
    # A comment (up to 65,535 bytes) follows the end record, and maybe other bytes. Search back
    # for its signature as zipfile does, but take a record only if its directory fits: the
    # comment and what follows may hold the signature too. A record whose comment ends the file
    # comes first; only if there is none, one followed by bytes beyond its comment.
    start = max(0, size - END_SEARCH - ZIP64_RECORDS)  # room for ZIP64 records too
    tail = os.pread(fd, size - start, start)
    lowest = max(0, size - END_SEARCH) - start  # zipfile's search goes no further back
    for exact in (True, False):
        pos = len(tail) - END_RECORD.size + len(END_MAGIC)  # a whole record fits before the end
        while found is None and (pos := tail.rfind(END_MAGIC, lowest, pos)) >= 0:
            found = _directory_place(tail, pos, size, exact)
            pos += len(END_MAGIC) - 1  # the next candidate starts before this one
        if found is not None:
            return found
    return None


def _directory_place(
    tail: bytes, record: int, size: int, exact: bool = True
) -> tuple[int, int, int, int] | None:
    """(members, size, start, concat) of the central directory from the end record at `record`
    in `tail`, the zip's last bytes; None if odd. concat: the bytes before the zip. exact: the
    record's comment must end the file (else it need only fit in it, and list a member)."""
    if record < 0:
        return None
    magic, disk, cd_disk, count, total, cd_size, cd_offset, comment = END_RECORD.unpack_from(
        tail, record
    )
    cd_end = size - len(tail) + record  # where the end record starts in the file
    comment_end = cd_end + END_RECORD.size + comment
    if magic != END_MAGIC or comment_end > size or (exact and comment_end != size):
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
    if not exact and not total:
        return None  # an empty directory fits before any 22 bytes: trailing bytes may hold one
    return total, cd_size, cd_end - cd_size, concat


def _parse_directory(directory: bytes, limit: int) -> list[ZipEntry] | None:
    """The directory's entries, or None if odd; limit: the zip's size from its first byte (the
    bound of a ZIP64 offset or size)."""
    entries, pos, end = [], 0, len(directory)
    unpack = CENTRAL_FIELDS.unpack_from
    # A ZipEntry made by tuple.__new__ (as namedtuple's _make does) skips its Python-level
    # __new__: ~10% of the listing, which makes up for the ZIP64 checks.
    make = tuple.__new__
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
        try:
            filename = name.decode("ascii")  # what cp437 and utf-8 give too, only faster
        except UnicodeDecodeError:
            # Invalid UTF-8 keeps its bytes as lone surrogates (distinct names stay distinct);
            # reading such a member is refused (`bad_name`), the rest of the zip is not.
            filename = name.decode("utf-8" if flags & 0x800 else "cp437", NOT_UTF8)
        refused = ""
        if extra_len or 0xFFFFFFFF in (csize, usize, offset):  # SATURATED: a ZIP64 value
            start = pos - comment_len - extra_len
            wide = _read_extra(directory, start, start + extra_len, (usize, csize, offset), limit)
            if wide is None:
                return None
            (usize, csize, offset), refused = wide
        entry = (filename, offset, method, flags, csize, usize, crc, version, refused)
        entries.append(make(ZipEntry, entry))
    return entries


def _read_extra(
    directory: bytes, pos: int, end: int, values: Wide, limit: int
) -> tuple[Wide, str] | None:
    """(values, why the member is refused or ""): an entry's sizes and offset with its ZIP64
    extra field's values in place, which must lie within the zip's `limit` bytes; None if it
    holds a Unicode-path field (zipfile lists that zip: newer ones read the field)."""
    zip64 = False
    while end - pos >= 4:
        kind, length = EXTRA_HEADER.unpack_from(directory, pos)
        pos += 4
        if pos + length > end:  # zipfile refuses the whole zip for it
            return values, (
                f"its extra field {kind:#06x} declares {length} bytes, more than the "
                f"{end - pos} left in its directory entry"
            )
        if kind == UNICODE_PATH_EXTRA:
            return None
        if kind == ZIP64_EXTRA:
            zip64 = True
            values, refused = _zip64_values(directory, pos, length, values)
            if refused:
                return values, refused
        pos += length
    if zip64:
        return values, _outside(values[2], values[1], limit)
    if SATURATED in values:
        return values, (
            "its directory entry leaves a size or its offset to a ZIP64 extra field "
            "(0xFFFFFFFF) and has none"
        )
    return values, ""


def _zip64_values(directory: bytes, pos: int, length: int, values: Wide) -> tuple[Wide, str]:
    """The values with the ZIP64 field's 64-bit ones in place of the saturated ones, in the
    APPNOTE's order (4.5.3), and "", or the refusal if the field is too short for them."""
    usize, csize, offset = values
    count = (usize == SATURATED) + (csize == SATURATED) + (offset == SATURATED)
    if length < 8 * count:  # zipfile refuses the whole zip for it
        return values, (
            f"its ZIP64 extra field holds {length} bytes, not the {8 * count} that its directory "
            "entry's saturated sizes and offset need"
        )
    wide = list(WIDE_VALUES[count].unpack_from(directory, pos))
    if usize == SATURATED:
        usize = wide.pop(0)
    if csize == SATURATED:
        csize = wide.pop(0)
    if offset == SATURATED:
        offset = wide.pop(0)
    return (usize, csize, offset), ""


def _outside(offset: int, compress_size: int, limit: int) -> str:
    """Why a ZIP64 entry's local header or data cannot lie in a zip of `limit` bytes; "" if
    they can (the read checks the rest). No offset reaches pread unchecked: it may be 2**64."""
    if offset + LOCAL_HEADER.size > limit:
        return (
            f"its ZIP64 directory entry puts its local header at byte {offset}, past the end of "
            f"the zip ({limit} bytes)"
        )
    if offset + LOCAL_HEADER.size + compress_size > limit:
        return (
            f"its ZIP64 directory entry gives it {compress_size} compressed bytes from byte "
            f"{offset}, past the end of the zip ({limit} bytes)"
        )
    return ""
