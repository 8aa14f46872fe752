"""The catalog of a shard folder: per-zip records `DIR/.parts/batchNN.json`, and the manifest.

convert writes a zip's record after its shards have their final names, so a record means "this
zip is done"; the manifest is rebuilt from all records and written last. A re-run reuses a zip
only when its record is of this version, was made with the same options from the same zip (its
fingerprint), and every shard it lists is there with its recorded size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.schema import (
    CHANNELS,
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_EXTS,
    SIZES,
    SPLITS,
    check_shard_entry,
    is_count,
    read_json_file,
    split_shards,
    wids_index,
    wids_index_name,
)

PARTS_DIR = ".parts"  # per-zip records: which zips are done, with their shards
# 2: image fields named by their format (PNG members kept as `.png`, counted in "formats");
# a version-1 record's zip is converted again, as version 1 skipped its PNG members.
RECORD_VERSION = 2
# A record's fields and their types: a record is data too (a damaged one is redone, never used).
RECORD_TYPES = {
    **{"zip": str, "batch": int, "split": str, "mode": str, "shard_samples": int, "seed": int},
    **{"bytes": int, "fingerprint": str, "samples": int, "shards": list, "skipped": list},
    "formats": dict,
}
RECORD_KEYS = set(RECORD_TYPES)
RECORD_NAME = re.compile(r"batch(\d{1,9})\.json")
FAILURE_NAME = re.compile(r"failed-batch(\d{1,9})\.json")


def record_path(out: Path, batch: int) -> Path:
    """Where the record of a converted batch lives."""
    return out / PARTS_DIR / f"batch{batch:02d}.json"


def make_record(
    *, zip_path: Path, batch: int, split: str, mode: str, shard_samples: int, seed: int,
    fingerprint: str, samples: int, shards: list, skipped: list, formats: dict[str, int],
    decoded: bool = False,
) -> dict:  # fmt: skip
    """The record of a zip just converted: its options, fingerprint, shards, skipped samples
    and the image members written by format (extension -> count); `decoded`: every image
    written was decoded whole (--decode)."""
    return {
        "version": RECORD_VERSION,
        "zip": Path(zip_path).name,
        "batch": batch,
        "split": split,
        "mode": mode,
        "shard_samples": shard_samples,
        "seed": seed,
        "bytes": Path(zip_path).stat().st_size,
        "fingerprint": fingerprint,
        "samples": samples,
        "shards": shards,
        "skipped": skipped,
        "formats": formats,
        "decoded": decoded,
    }


def load_records(out: Path) -> dict[int, dict | str]:
    """Every record in `DIR/.parts`, by batch; an unreadable, damaged or older one maps to the
    message saying so (its zip is converted again when given)."""
    records: dict[int, dict | str] = {}
    for path in sorted((out / PARTS_DIR).glob("batch*.json")):
        named = RECORD_NAME.fullmatch(path.name)
        if named is None:
            continue  # not a name convert writes (batchNN.json)
        batch = int(named[1])
        try:
            record = read_json_file(path)
        except (OSError, ValueError) as exc:
            records[batch] = f"{path}: unreadable record ({exc})"
            continue
        if isinstance(record, dict) and record.get("version") != RECORD_VERSION:
            records[batch] = f"{path}: not a record of this version of convert"
            continue
        try:
            check_record(record, batch)
            records[batch] = record
        except ValueError as exc:
            records[batch] = f"{path}: damaged record ({exc})"
    return records


def check_record(record: Any, batch: int) -> None:
    """ValueError naming the fault unless `record` is a well-typed record of `batch`."""
    if not isinstance(record, dict):
        raise ValueError(f"not an object: {type(record).__name__}")
    missing = RECORD_KEYS - set(record)
    if missing:
        raise ValueError(f"lacks {sorted(missing)}")
    for key, kind in RECORD_TYPES.items():
        value = record[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{key} must be {kind.__name__}, got {value!r:.60}")
    split, mode = record["split"], record["mode"]
    if record["batch"] != batch or split not in SPLITS or mode not in CHANNELS:
        raise ValueError(f"batch {record['batch']}, split {split!r}, mode {mode!r}")
    if min(record["samples"], record["bytes"], record["shard_samples"]) < 0:
        raise ValueError("a negative count")
    _check_record_lists(record)


def _check_record_lists(record: dict) -> None:
    """A record's shards (paths inside the folder, counts that add up), skips and formats."""
    for index, shard in enumerate(record["shards"]):
        check_shard_entry(shard, record["split"], f"shards[{index}]")
    if sum(shard["samples"] for shard in record["shards"]) != record["samples"]:
        raise ValueError(f"samples {record['samples']} is not the sum of its shards' samples")
    skip_keys = ("zip", "member", "reason")
    if not all(isinstance(s, dict) and _strings(s, *skip_keys) for s in record["skipped"]):
        raise ValueError('skipped must be a list of {"zip", "member", "reason"} strings')
    formats = record["formats"]
    if not all(ext in IMAGE_EXTS and is_count(n) for ext, n in formats.items()):
        exts = " and ".join(IMAGE_EXTS)
        raise ValueError(f"formats must count {exts} members, got {formats!r:.60}")


def _strings(data: dict, *keys: str) -> bool:
    return all(isinstance(data.get(key), str) for key in keys)


def discard_batch(out: Path, batch: int) -> None:
    """Remove a batch's record, then its shards and temp shards (in both splits)."""
    record_path(out, batch).unlink(missing_ok=True)
    for split in SPLITS:
        for path in (out / split).glob(f"batch{batch:02d}-*.tar*"):
            path.unlink(missing_ok=True)


def split_of(batch: int, test_batches: Iterable[int]) -> str:
    """The split a batch's samples go to: test for --test-batches, else train."""
    return "test" if batch in set(test_batches) else "train"


def record_problem(
    record: dict | str, out: Path, test_batches: Iterable[int], *, hashes: bool = False
) -> str | None:
    """Why a record cannot be trusted as it stands (None if its shards are all there, intact).

    Shards are checked by size; with `hashes`, by sha256 too (it reads every byte).
    """
    if isinstance(record, str):
        return record  # unreadable, damaged or older: load_records said why
    split = split_of(record["batch"], test_batches)
    if record["split"] != split:
        return f"{record['zip']} was converted into {record['split']}, now belongs to {split}"
    return shards_problem(record, out, hashes=hashes)


def shards_problem(record: dict, out: Path, *, hashes: bool) -> str | None:
    """Why a record's shards are not as it lists them (None: all there, as recorded)."""
    for shard in record["shards"]:
        path = out / shard["path"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            return f"{record['zip']}: shard {path} is missing or has changed size"
    if not hashes:
        return None
    # Sizes first, for all shards: a missing shard is found without reading any.
    for shard in record["shards"]:
        path = out / shard["path"]
        if file_sha256(path) != shard.get("sha256"):
            return f"{record['zip']}: shard {path} has changed (sha256 differs from the record's)"
    return None


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---------------------------------------------------------------- the manifest


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file beside `path`, fsync it, then rename it over `path`.

    The temp file is created as the shards are (mode 0666 less the umask: 0644 under umask
    022), not 0600 as mkstemp makes it, so whoever can read the shards can read the manifest.
    An OSError names the file (`cannot write DIR/manifest.json: No space left on device`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_manifest(records: Iterable[dict], test_batches: Iterable[int], mode: str) -> dict:
    """The manifest of a conversion from its per-zip records (see convert's `.parts/`)."""
    records = sorted(records, key=lambda r: r["batch"])
    splits: dict[str, dict] = {split: {"samples": 0, "shards": []} for split in SPLITS}
    formats: dict[str, Counter] = {split: Counter() for split in SPLITS}
    for record in records:
        split = splits[record["split"]]
        split["samples"] += record["samples"]
        split["shards"].extend(record["shards"])
        formats[record["split"]].update(record["formats"])
    for name, split in splits.items():  # image members by extension: {"jpg": n, "png": m}
        split["formats"] = {ext: formats[name][ext] for ext in IMAGE_EXTS}
    for split in splits.values():
        split["shards"].sort(key=lambda s: s["path"])
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "mode": mode,
        "channels": CHANNELS[mode],
        "sizes": {field: list(size) for field, size in SIZES.items()},
        "test_batches": sorted(set(test_batches)),
        "splits": splits,
        "skipped": [skip for record in records for skip in record["skipped"]],
        "sources": [_source(record) for record in records],
        "tool": f"pipeline {__version__}",
    }


def _source(record: dict) -> dict:
    keys = ("zip", "batch", "split", "samples")
    return {
        **{k: record[k] for k in keys},
        "skipped": len(record["skipped"]),
        "bytes": record["bytes"],
        "fingerprint": record["fingerprint"],
    }


def write_wids_indexes(out: Path, manifest: dict) -> None:
    """A wids index per split that has shards (`DIR/train.wids.json`); a stale one is removed."""
    for split in SPLITS:
        path = out / wids_index_name(split)
        if split_shards(manifest, split):
            write_json_atomic(path, wids_index(manifest, split))
        else:  # wids cannot open an index without shards
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------- failures


def failure_path(out: Path, batch: int) -> Path:
    """Where a zip that did not finish (failed, or is still being converted) is recorded."""
    return out / PARTS_DIR / f"failed-batch{batch:02d}.json"


def write_failure(out: Path, batch: int, zip_name: str, error: str) -> None:
    """Record that a batch is not done: a folder holding this never verifies as complete."""
    write_json_atomic(failure_path(out, batch), {"zip": zip_name, "batch": batch, "error": error})


def clear_failure(out: Path, batch: int | str) -> None:
    """Forget a batch's failure (it converted, or the user goes on without it); a str is the
    file name of one load_failures could not tell the batch of."""
    path = out / PARTS_DIR / batch if isinstance(batch, str) else failure_path(out, batch)
    path.unlink(missing_ok=True)


def load_failures(out: Path) -> dict[int | str, dict]:
    """Every failure record in `DIR/.parts`, by batch (an unreadable one still counts; one
    whose name has no batch number is keyed by its file name)."""
    failures: dict[int | str, dict] = {}
    for path in sorted((out / PARTS_DIR).glob("failed-batch*.json")):
        named = FAILURE_NAME.fullmatch(path.name)
        batch: int | str = int(named[1]) if named else path.name
        try:
            if named is None:
                raise ValueError("not a name convert writes (failed-batchNN.json)")
            record = read_json_file(path)
            failures[batch] = {"zip": str(record["zip"]), "error": str(record["error"])}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            zip_name = f"batch {batch}" if named else path.name
            failures[batch] = {"zip": zip_name, "error": f"{path}: unreadable ({exc})"}
    return failures
