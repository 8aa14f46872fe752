"""Per-zip records `DIR/.parts/batchNN.json`: which zips are done, and whether to trust them.

convert writes a zip's record after its shards have their final names, so a record means "this
zip is done"; the manifest is rebuilt from all records. A re-run reuses a zip only when its record
is of this version, was made with the same options from the same zip (its fingerprint), and every
shard it lists is there with its recorded size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.layout import SPLITS, batch_number

if TYPE_CHECKING:  # only for type hints: convert imports this module
    from pipeline.convert import ZipJob

PARTS_DIR = ".parts"  # per-zip records: which zips are done, with their shards
RECORD_VERSION = 1
RECORD_KEYS = {"zip", "batch", "split", "mode", "shard_samples", "seed", "bytes", "fingerprint"}
RECORD_KEYS |= {"samples", "shards", "skipped"}


def record_path(out: Path, batch: int) -> Path:
    """Where the record of a converted batch lives."""
    return out / PARTS_DIR / f"batch{batch:02d}.json"


def zip_fingerprint(path: Path, infos: Iterable[zipfile.ZipInfo]) -> str:
    """Identify a zip's content cheaply: its size and its members' names, CRCs and sizes."""
    listing = sorted(f"{i.filename}\0{i.CRC:08x}\0{i.file_size}\n" for i in infos)
    text = f"{Path(path).stat().st_size}\n" + "".join(listing)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def make_record(
    job: ZipJob, mode: str, infos: list[zipfile.ZipInfo], samples: int, shards: list, skipped: list
) -> dict:
    """The record of a zip just converted: its options, fingerprint, shards and skipped samples."""
    return {
        "version": RECORD_VERSION,
        "zip": job.name,
        "batch": job.batch,
        "split": job.split,
        "mode": mode,
        "shard_samples": job.shard_samples,
        "seed": job.seed,
        "bytes": job.path.stat().st_size,
        "fingerprint": zip_fingerprint(job.path, infos),
        "samples": samples,
        "shards": shards,
        "skipped": skipped,
    }


def load_records(out: Path) -> dict[int, dict | str]:
    """Every record in `DIR/.parts`, by batch; an unreadable one maps to an error message."""
    records: dict[int, dict | str] = {}
    for path in sorted((out / PARTS_DIR).glob("batch*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            records[int(record["batch"])] = record
        except (OSError, ValueError, KeyError, TypeError) as exc:
            records[batch_number(path)] = f"{path}: unreadable record ({exc})"
    return records


def discard_batch(out: Path, batch: int) -> None:
    """Remove a batch's record, then its shards and temp shards (in both splits)."""
    record_path(out, batch).unlink(missing_ok=True)
    for split in SPLITS:
        for path in (out / split).glob(f"batch{batch:02d}-*.tar*"):
            path.unlink(missing_ok=True)


def record_problem(
    record: dict | str, out: Path, test_batches: Iterable[int], *, hashes: bool = False
) -> str | None:
    """Why a record cannot be trusted as it stands (None if its shards are all there, intact).

    Shards are checked by size; with `hashes`, by sha256 too (it reads every byte).
    """
    if isinstance(record, str):
        return record
    if record.get("version") != RECORD_VERSION or RECORD_KEYS - set(record):
        return f"{record_path(out, record['batch'])}: not a record of this version of convert"
    split = "test" if record["batch"] in set(test_batches) else "train"
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


def reuse_problem(
    record: dict | str | None, job: ZipJob, test_batches: Iterable[int]
) -> str | None:
    """Why `job`'s zip must be converted again (None: its record and shards can be reused).

    Cheap checks come first; each shard's sha256 is recomputed last, only for a record that
    passes all of them. ValueError naming the zip if it cannot be read as a zip.
    """
    if record is None:
        return f"{job.name}: not converted yet"
    problem = record_problem(record, job.out, test_batches)
    if problem is not None:
        return problem
    was, now = (record["shard_samples"], record["seed"]), (job.shard_samples, job.seed)
    if was != now:
        options = "converted with --shard-samples {} --seed {}, now with {} and {}"
        return f"{job.name}: " + options.format(*was, *now)
    if job.strict and record["skipped"]:
        return f"{job.name}: --strict, and {len(record['skipped'])} sample(s) were skipped"
    if record["bytes"] != job.path.stat().st_size or record["fingerprint"] != _fingerprint(job):
        return f"{job.name}: the zip has changed since it was converted"
    return shards_problem(record, job.out, hashes=True)


def _fingerprint(job: ZipJob) -> str:
    try:
        with zipfile.ZipFile(job.path) as zf:
            return zip_fingerprint(job.path, zf.infolist())
    except (zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"{job.path}: cannot open it as a zip ({exc})") from None
