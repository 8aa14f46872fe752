"""The shard contract (docs/FORMAT.md): what convert writes and verify and the loader read.

One definition of each fact both halves rely on: the fields of a sample and their file names,
image sizes, the model's input order, modes and channels, shard paths, and the manifest's strict
validation with accessors, so that no reader has to guess a value the manifest lacks.
No I/O here beyond reading a local manifest file; no torch.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any, BinaryIO

# Field names inside a shard sample: `KEY.bg.jpg`, `KEY.fg_bg.jpg`, `KEY.mask.jpg`, `KEY.depth.jpg`
# (or `.png`: a field's extension says its format, see IMAGE_EXTS).
FIELDS = ("bg", "fg_bg", "mask", "depth")
# The image formats a shard may hold, by the name images.image_format gives, and the extension
# their fields take. The generator saved half of the published masks as PNG under `.jpg` names.
FORMAT_EXTS = {"JPEG": "jpg", "PNG": "png"}
IMAGE_EXTS = tuple(FORMAT_EXTS.values())  # every extension an image field may have
IMAGE_EXT = FORMAT_EXTS["JPEG"]  # the usual one
META = "json"  # the provenance field: `KEY.json`
INPUTS = ("fg_bg", "bg")  # the model's input, concatenated along channels in this order
TARGETS = ("mask", "depth")  # read as one channel whatever their mode
IMAGE_SIZE = (160, 160)  # (width, height) of bg, fg_bg, mask
DEPTH_SIZE = (80, 80)  # (width, height) of depth
SIZES = {"bg": IMAGE_SIZE, "fg_bg": IMAGE_SIZE, "mask": IMAGE_SIZE, "depth": DEPTH_SIZE}
SPLITS = ("train", "test")
MANIFEST_NAME = "manifest.json"
CHANNELS = {"L": 1, "RGB": 3}  # image mode -> channels of bg and fg_bg
MODE_OF = {channels: mode for mode, channels in CHANNELS.items()}

FORMAT_NAME = "pipeline-shards"
FORMAT_VERSION = 1
# Beside the manifest, a shard index per split for webdataset's indexed reader (wids): random
# access by sample index with no scan, e.g. wids.ShardListDataset("shards/train.wids.json").
WIDS_KIND = "wids-shard-index-v1"
WIDS_VERSION = 1

# The most bytes one file of a sample may have, in a zip and in a shard. A 160x160 image is
# 5-80 KB in any format (raw RGB is 77 KB); 4 MiB leaves room for metadata and odd encoders,
# yet bounds what a reader holds per member, whatever a header claims (a deflate bomb or a
# tar header declaring 10 GB is refused before any byte of it is inflated or read).
MAX_MEMBER_BYTES = 4 << 20
# The largest JSON file convert writes (a manifest, a zip's record, a wids index) that is read:
# a manifest of 400,000 samples every one of them skipped, at 300 bytes an entry, is 120 MB.
MAX_JSON_BYTES = 128 << 20
# The largest count (samples, bytes) a manifest or record may hold: exact as a float (2**53),
# so a count in arithmetic never overflows; a dataset is some 10**6 samples and 10**10 bytes.
MAX_COUNT = 1 << 53

# A shard's path in a manifest: `SPLIT/NAME.tar`, NAME of letters, digits, `.`, `_`, `-`, not
# starting with a dot. A manifest is data: its paths are appended to the folder or to the URL
# prefix the user typed (`pipe:ssh host cat /data/shards` + `/train/x.tar`), so a path must
# never climb out (`..`, `/abs`), carry a scheme (`pipe:`), or hold a character a shell reads.
SHARD_PATH = re.compile(r"(?P<split>[a-z]+)/[A-Za-z0-9_-][A-Za-z0-9._-]*\.tar")


def member_ext(field: str, ext: str = IMAGE_EXT) -> str:
    """A field's extension inside a sample: `bg` -> `bg.jpg` (the tar member is `KEY.bg.jpg`)."""
    return f"{field}.{ext}"


# The files of an all-JPEG sample, in the order written (a PNG field ends in `.png` instead).
SAMPLE_EXTS = (*map(member_ext, FIELDS), META)
# The fewest bytes a sample takes in a shard: each of its files (the four images and the json,
# none of them empty) is a 512-byte tar header and at least one 512-byte block of data. So a
# shard's `bytes` bounds its `samples`: the trainer takes an epoch's length from the counts, and a
# count its bytes cannot hold would repeat the shard's samples for as long as it says.
SAMPLE_MIN_BYTES = len(SAMPLE_EXTS) * 2 * 512


_FIELD_NAMES = {field: tuple(member_ext(field, ext) for ext in IMAGE_EXTS) for field in FIELDS}


def field_names(field: str) -> tuple[str, ...]:
    """Every name a field may have in a sample: `mask` -> (`mask.jpg`, `mask.png`)."""
    return _FIELD_NAMES[field]


def find_field(sample: dict, field: str) -> str | None:
    """The name under which a sample holds `field` (`mask.jpg` or `mask.png`); None if absent."""
    for name in field_names(field):
        if name in sample:
            return name
    return None


def shard_name(split: str, batch: int, index: int) -> str:
    """A shard's path relative to the output root: `train/batch01-000000.tar`."""
    return f"{split}/batch{batch:02d}-{index:06d}.tar"


def field_channels(manifest: dict, field: str) -> int:
    """Channels a field decodes to: the manifest's for the inputs, 1 for mask and depth."""
    return manifest["channels"] if field in INPUTS else 1


def field_sizes(manifest: dict) -> dict[str, tuple[int, int]]:
    """Each field's (width, height) as the manifest gives them."""
    return {field: tuple(manifest["sizes"][field]) for field in FIELDS}


def max_shard_samples(nbytes: int) -> int:
    """The most samples a shard of `nbytes` bytes can hold (each takes SAMPLE_MIN_BYTES)."""
    return nbytes // SAMPLE_MIN_BYTES


def split_samples(manifest: dict, split: str) -> int:
    """Samples the manifest's shards of a split hold (0 for a split it lacks): the sum of their
    counts, which reading checks shard by shard, not the split's total, which verify checks."""
    return sum(shard["samples"] for shard in split_shards(manifest, split))


def split_shards(manifest: dict, split: str) -> list[dict]:
    """The shard entries of a split, in manifest order."""
    return manifest["splits"].get(split, {}).get("shards", [])


def shard_entries(manifest: dict) -> list[tuple[str, dict]]:
    """Every shard of the manifest as (split, entry), train first."""
    return [(split, shard) for split in SPLITS for shard in split_shards(manifest, split)]


def wids_index_name(split: str) -> str:
    """The wids index of a split, beside the manifest: `train.wids.json`."""
    return f"{split}.wids.json"


def wids_index(manifest: dict, split: str) -> dict:
    """A split's wids index: its shards (urls relative to the index's folder) and their counts."""
    return {
        "__kind__": WIDS_KIND,
        "wids_version": WIDS_VERSION,
        "name": split,
        "shardlist": [
            {"url": shard["path"], "nsamples": shard["samples"], "filesize": shard["bytes"]}
            for shard in split_shards(manifest, split)
        ],
    }


def parse_json(data: bytes | str) -> Any:
    """JSON from text or UTF-8 bytes; ValueError `not valid JSON (...)` for anything else.

    json recurses once per nesting level, so `'[' * 200000` raises RecursionError: that is
    invalid data too, not a crash.
    """
    try:
        return json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except RecursionError:
        raise ValueError("not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"not valid JSON ({exc})") from None


def read_json_file(path: Path) -> Any:
    """The JSON in a file of at most MAX_JSON_BYTES (read no further); ValueError saying why.

    Only a regular file is read: a FIFO planted at the name of a wids index or a record would
    block its reader forever (in open() or read()), and a device is not a file convert wrote.
    """
    with open(open_regular(path), "rb") as file:
        return read_json(file)


def open_regular(path: str | Path) -> int:
    """A file descriptor of `path` opened for reading, if it is a regular file; ValueError if it
    is not (a FIFO, a device: one could block its reader forever, in open() or read())."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO's open() returns at once
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_json(stream: BinaryIO, limit: int | None = None) -> Any:
    """The JSON in a stream of at most `limit` bytes (MAX_JSON_BYTES if None): only limit + 1
    are ever read."""
    limit = MAX_JSON_BYTES if limit is None else limit
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"over {limit:,} bytes: more than any JSON file convert writes")
    return parse_json(data)


def load_manifest(root: Path) -> dict:
    """Load and validate `root/manifest.json`; ValueError if absent or not one of ours."""
    path = Path(root) / MANIFEST_NAME
    if not Path(root).is_dir():
        there = Path(root).exists()
        why = f"not a folder (give the one holding {MANIFEST_NAME})" if there else "no such folder"
        raise ValueError(f"{root}: {why}")
    if not path.is_file():
        raise ValueError(
            f"{root}: no {MANIFEST_NAME}, so not a finished conversion "
            "(run `pipeline convert ... --out` into it, or finish the interrupted one)"
        )
    try:
        data = read_json_file(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    validate_manifest(data, path)
    return data


def validate_manifest(data: Any, path: Path | str) -> None:
    """Raise ValueError naming `path` unless `data` holds everything FORMAT.md promises."""
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a pipeline shard manifest (format != {FORMAT_NAME!r})")
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: manifest version {data.get('version')!r}, this tool reads {FORMAT_VERSION}"
        )
    mode = data.get("mode")
    if not isinstance(mode, str) or mode not in CHANNELS:
        raise ValueError(f"{path}: unknown image mode {mode!r}")
    if not _positive_int(data.get("channels")) or data["channels"] != CHANNELS[mode]:
        raise ValueError(
            f"{path}: 'channels' is {data.get('channels')!r}, mode {mode} has {CHANNELS[mode]}"
        )
    _check_sizes(data.get("sizes"), path)
    splits = data.get("splits")
    if not isinstance(splits, dict) or any(s not in splits for s in SPLITS):
        raise ValueError(f"{path}: 'splits' must hold {' and '.join(SPLITS)}")
    for split in SPLITS:
        _check_split(splits[split], split, path)
    _check_failed(data.get("failed", []), path)


def check_shard_path(split: str, rel: Any) -> str:
    """`rel` if it is a shard path of `split` (`train/NAME.tar`); else ValueError naming it."""
    found = SHARD_PATH.fullmatch(rel) if isinstance(rel, str) else None
    if found is None or found["split"] != split:
        raise ValueError(
            f"shard path {rel!r} is not of the form {split}/NAME.tar inside the folder "
            "(a manifest's paths never hold '..', '/', a scheme or spaces)"
        )
    return rel


def _check_split(split_data: Any, split: str, path: Path | str) -> None:
    """A split is {"samples": count, "shards": [entries]}, every entry strictly typed."""
    where = f"{path}: splits.{split}"
    if not isinstance(split_data, dict) or not isinstance(split_data.get("shards", []), list):
        raise ValueError(f"{where} must be an object with a 'shards' list")
    if not is_count(split_data.get("samples", 0)):
        raise ValueError(f"{where}.samples must be a count, got {split_data.get('samples')!r}")
    seen: set[str] = set()
    for index, shard in enumerate(split_data.get("shards", [])):
        check_shard_entry(shard, split, f"{where}.shards[{index}]")
        if shard["path"] in seen:
            raise ValueError(f"{where}.shards[{index}]: {shard['path']} is listed twice")
        seen.add(shard["path"])


def check_shard_entry(shard: Any, split: str, where: str) -> None:
    """A shard entry (of a manifest or a convert record) is strictly typed, its path inside
    the folder; else ValueError starting with `where`."""
    if not isinstance(shard, dict):
        raise ValueError(f"{where}: a shard entry must be an object, got {shard!r}")
    missing = {"path", "samples", "bytes", "sha256"} - set(shard)
    if missing:
        raise ValueError(f"{where}: a {split} shard lacks {sorted(missing)}: {shard}")
    try:
        check_shard_path(split, shard["path"])
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    for key in ("samples", "bytes"):
        if not is_count(shard[key]):
            raise ValueError(f"{where}: {key} must be a count, got {shard[key]!r}")
    most = max_shard_samples(shard["bytes"])
    if shard["samples"] > most:
        raise ValueError(
            f"{where}: {shard['path']} says {shard['samples']} samples in {shard['bytes']} "
            f"bytes, more than the {most} those bytes can hold (a sample is {len(SAMPLE_EXTS)} "
            f"tar members, each at least a 512-byte header and a 512-byte block: "
            f"{SAMPLE_MIN_BYTES} bytes)"
        )
    if not (isinstance(shard["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", shard["sha256"])):
        raise ValueError(f"{where}: sha256 must be 64 hex digits, got {shard['sha256']!r}")
    if "batch" in shard and not _positive_int(shard["batch"]):
        raise ValueError(f"{where}: batch must be a positive integer, got {shard['batch']!r}")


def _check_failed(failed: Any, path: Path | str) -> None:
    """`failed` (zips a convert could not finish) is a list of {"zip", "error"} strings."""
    good = isinstance(failed, list) and all(
        isinstance(f, dict) and isinstance(f.get("zip"), str) and isinstance(f.get("error"), str)
        for f in failed
    )
    if not good:
        raise ValueError(f'{path}: \'failed\' must be a list of {{"zip", "error"}} objects')


def _check_sizes(sizes: Any, path: Path | str) -> None:
    """`sizes` must give [width, height] for every field."""
    if not isinstance(sizes, dict):
        raise ValueError(f"{path}: 'sizes' must give [width, height] for {', '.join(FIELDS)}")
    for field in FIELDS:
        size = sizes.get(field)
        if not (isinstance(size, list) and len(size) == 2 and all(_positive_int(v) for v in size)):
            raise ValueError(f"{path}: sizes.{field} must be [width, height], got {size!r}")
        if tuple(size) != SIZES[field]:  # what convert writes and the network takes
            want = "x".join(map(str, SIZES[field]))
            raise ValueError(f"{path}: sizes.{field} is {size!r}: {field} images are {want}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_count(value: Any) -> bool:
    """A non-negative int (not a bool) up to MAX_COUNT: a count read from JSON."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT
