"""Member names: the published zip layout, how members pair into samples, sample keys, names
that are not UTF-8 (no I/O)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

# Folders of the published zips that hold a sample's members.
BG_DIR = "bg_jpg"
FG_BG_DIR = "fg_bg_jpg"
MASK_DIR = "mask_black_jpg"
DEPTH_DIR = "depth_fg_bg_jpg"
# Raw foregrounds and their masks: in the zips, never part of a sample.
IGNORED_DIRS = ("fg_jpg", "mask_jpg")
JUNK_PARTS = ("__MACOSX",)
JUNK_NAMES = (".DS_Store", "Thumbs.db", "desktop.ini")

# The published numbers have 1-4 digits. A bound keeps every key far inside a tar header's name
# field and every int small (5,000 digits exceed Python's int conversion limit).
MAX_DIGITS = 9
_NUM = rf"(\d{{1,{MAX_DIGITS}}})"
_IDS = rf"{_NUM}_{_NUM}_([01])_{_NUM}"
# Both naming styles: the published zips', and the article's (bg_{bg}.jpg, depth_{ids}.jpg).
_PATTERNS = {
    "bg": re.compile(rf"^{BG_DIR}/bg_(?:img_)?{_NUM}\.jpe?g$", re.IGNORECASE),
    "fg_bg": re.compile(rf"^{FG_BG_DIR}/fg_bg_{_IDS}\.jpe?g$", re.IGNORECASE),
    "mask": re.compile(rf"^{MASK_DIR}/bg_mask_{_IDS}\.jpe?g$", re.IGNORECASE),
    "depth": re.compile(rf"^{DEPTH_DIR}/depth_(?:fg_bg_)?{_IDS}\.jpe?g$", re.IGNORECASE),
}
_BATCH = re.compile(r"batch[_-]?(\d+)", re.IGNORECASE)
# The same patterns without their folder, for names directly in a sample folder (the usual case).
_FILE_PATTERNS = {
    BG_DIR: ("bg", re.compile(rf"bg_(?:img_)?{_NUM}\.jpe?g$", re.IGNORECASE)),
    FG_BG_DIR: ("fg_bg", re.compile(rf"fg_bg_{_IDS}\.jpe?g$", re.IGNORECASE)),
    MASK_DIR: ("mask", re.compile(rf"bg_mask_{_IDS}\.jpe?g$", re.IGNORECASE)),
    DEPTH_DIR: ("depth", re.compile(rf"depth_(?:fg_bg_)?{_IDS}\.jpe?g$", re.IGNORECASE)),
}
# A sample member's file name with numbers of any length: to say why classify refused it.
_ANY_FG_BG = re.compile(r"fg_bg_(\d+)_(\d+)_(\d+)_(\d+)\.jpe?g$", re.IGNORECASE)


class SampleId(NamedTuple):
    """The four numbers that name a sample: foreground, background, flip, placement."""

    fg: int
    bg: int
    flip: int
    seq: int

    def stem(self) -> str:
        return f"{self.fg}_{self.bg}_{self.flip}_{self.seq}"


class Member(NamedTuple):
    """A zip member recognised as part of a sample."""

    kind: str  # one of schema.FIELDS
    name: str  # the member's name exactly as in the zip
    bg: int  # the background number (for every kind)
    sample: SampleId | None  # None for a bg member, shared by many samples


def batch_number(zip_path: str | Path) -> int:
    """The batch number in a zip's file name (`batch7_images.zip` -> 7)."""
    name = Path(zip_path).name
    match = _BATCH.search(name)
    if not match:
        raise ValueError(
            f"{zip_path}: cannot tell the batch number from the file name "
            "(expected a name like batch7_images.zip)"
        )
    if len(match.group(1)) > MAX_DIGITS:  # a key must fit a tar header; int() has a limit
        raise ValueError(f"{zip_path}: a batch number of over {MAX_DIGITS} digits")
    number = int(match.group(1))
    if number < 1:  # the published zips are batch1 … batch10; a shard's batch is 1 or more
        raise ValueError(f"{zip_path}: batch number {number}: batches are numbered from 1")
    return number


def _parts(name: str) -> list[str]:
    # str.split, not PurePosixPath: this runs once per zip member, and pathlib costs ~10 us a call.
    # A backslash separates folders too: zips made on Windows (.NET's ZipFile before 4.6.1,
    # PowerShell's Compress-Archive) write `fg_bg_jpg\x.jpg`, which unzip reads as a folder.
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def is_junk(name: str) -> bool:
    """True for members that are never data: folders, macOS resource forks, .DS_Store."""
    parts = _parts(name)
    if name.endswith(("/", "\\")) or not parts:
        return True
    if any(p in JUNK_PARTS for p in parts) or parts[-1] in JUNK_NAMES:
        return True
    return parts[-1].startswith("._")


def strip_top_folder(name: str) -> str:
    """Drop a top-level folder added by hand-made zips (`batch3/fg_bg_jpg/x.jpg`)."""
    parts = _parts(name)
    known = (BG_DIR, FG_BG_DIR, MASK_DIR, DEPTH_DIR, *IGNORED_DIRS)
    for i, part in enumerate(parts[:-1]):
        if part.lower() in known:  # as the member patterns: `batch3/FG_BG_JPG/` is a sample folder
            return "/".join(parts[i:])
    return name


def classify(name: str) -> Member | None:
    """Recognise a member of a sample; None for anything else (junk, fg_jpg/, mask_jpg/, …)."""
    # Fast path, one regex on the file name: `FOLDER/file` with FOLDER a sample folder, as in
    # the published zips. What the general path would decide is the same: such a name is never
    # junk, needs no stripping, and only its folder's pattern can match it.
    folder, _, file = name.partition("/")
    found = _FILE_PATTERNS.get(folder)
    if found is not None and "/" not in file:
        kind, pattern = found
        match = pattern.match(file)
        if match is None:
            return None
        if kind == "bg":
            return Member(kind, name, int(match.group(1)), None)
        sample = SampleId(*map(int, match.groups()))
        return Member(kind, name, sample.bg, sample)
    if is_junk(name):
        return None
    inner = strip_top_folder(name)
    for kind, pattern in _PATTERNS.items():
        match = pattern.match(inner)
        if match is None:
            continue
        if kind == "bg":
            return Member(kind, name, int(match.group(1)), None)
        sample = SampleId(*(int(g) for g in match.groups()))
        return Member(kind, name, sample.bg, sample)
    return None


def refused_sample(name: str) -> str | None:
    """Why a member that classify did not recognise must still be reported: every file under a
    fg_bg_jpg/ folder (any case, any depth) claims to be a sample. None for junk, other names."""
    if is_junk(name):
        return None
    *folders, file = _parts(name)
    folders = [folder.lower() for folder in folders]
    if FG_BG_DIR not in folders:
        return None
    if folders[-1] != FG_BG_DIR:
        return f"in a folder inside {FG_BG_DIR}/: a sample's member is directly in {FG_BG_DIR}/"
    match = _ANY_FG_BG.match(file)
    if match and any(len(number) > MAX_DIGITS for number in match.groups()):
        return f"a number in its name has over {MAX_DIGITS} digits: not a sample name"
    if match and match.group(3) not in ("0", "1"):
        return f"flip {match.group(3)} in its name is not 0 or 1: not a sample name"
    return f"not a sample name (a {FG_BG_DIR}/ member is fg_bg_{{fg}}_{{bg}}_{{flip}}_{{seq}}.jpg)"


def member_names(sample: SampleId, prefix: str = "") -> dict[str, str]:
    """The published members of one sample (the names `synth` writes)."""
    s = sample.stem()
    return {
        "bg": f"{prefix}{BG_DIR}/bg_img_{sample.bg}.jpg",
        "fg_bg": f"{prefix}{FG_BG_DIR}/fg_bg_{s}.jpg",
        "mask": f"{prefix}{MASK_DIR}/bg_mask_{s}.jpg",
        "depth": f"{prefix}{DEPTH_DIR}/depth_fg_bg_{s}.jpg",
    }


def sample_key(batch: int, sample: SampleId) -> str:
    """A key unique across all batches, with no dot (WebDataset splits keys at the first dot)."""
    return f"b{batch:02d}_{sample.stem()}"


def parse_batches(spec: str) -> list[int]:
    """Parse `1-3,5` into [1, 2, 3, 5]."""
    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(
                f"bad batch list {spec!r}: use numbers and ranges like 1-3,5"
            ) from None
        if first < 1:
            raise ValueError(f"bad batch {part!r} in {spec!r}: batches are numbered from 1")
        if last < first:
            raise ValueError(f"bad batch range {part!r} in {spec!r}: its end is before its start")
        out.extend(range(first, last + 1))
    return sorted(set(out))


# A name's bytes that are not UTF-8 are kept as lone surrogates when it is listed (zip or tar):
# distinct names stay distinct, and such a member is refused alone.
NOT_UTF8 = "surrogateescape"


def shown_name(text: str) -> str:
    """Text holding names listed from bytes that are not valid UTF-8, with those bytes as
    `\\xff`: valid text for every reader (JSON, a terminal), where a lone surrogate is not."""
    return text.encode("utf-8", NOT_UTF8).decode("utf-8", "backslashreplace")


def bad_name(name: str) -> bool:
    """True for a name listed from bytes that are not valid UTF-8 (kept as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
