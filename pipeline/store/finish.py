"""The end of a convert: the manifest, rebuilt from every zip's record in DIR/.parts and written
last (a folder with a manifest is finished), and the records that cannot go in it, reported or,
with --forget-failed, forgotten.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.schema import MANIFEST_NAME, SPLITS
from pipeline.store.catalog import (
    build_manifest,
    discard_batch,
    load_failures,
    load_records,
    record_path,
    record_problem,
    split_of,
    write_json_atomic,
    write_wids_indexes,
)
from pipeline.store.guard import is_locked
from pipeline.store.verify import MOVED

if TYPE_CHECKING:
    from pipeline.store.runner import ConvertConfig, ConvertSummary

log = logging.getLogger(__name__)


def batch_lock(batch: int) -> str:
    """The name of the lock a convert holds while it writes this batch."""
    return f"batch{batch:02d}"


def _other_split(record: dict | str, test_batches: Iterable[int]) -> bool:
    """Whether a record's only fault is its split: good shards, converted with other
    --test-batches (never forgotten: a forgotten option must not delete a good batch)."""
    if not isinstance(record, dict):
        return False
    return record["split"] != split_of(record["batch"], test_batches)


def converting(out: Path, batch: int) -> bool:
    """Whether another convert is writing this batch into `out` now."""
    return is_locked(out, batch_lock(batch))


def _fail_record(
    summary, out: Path, batch: int, record: dict | str, problem: str, moved: bool
) -> None:
    """A record that cannot go in the manifest, not reported yet: an earlier run's, or one of
    this run's zips that converted but whose record is refused. `moved`: its only fault is
    the split (good shards, other --test-batches): say how to keep them."""
    if moved:
        keep = "includes" if record["split"] == "test" else "leaves out"
        problem += f" ({MOVED} {keep} {batch}, or convert that zip again)"
        log.error("%s", problem)
    else:
        record_file = record_path(out, batch)
        log.error("%s; re-run convert with that zip, or delete %s", problem, record_file)
    summary.failed.append({"zip": _record_zip(record, batch), "error": problem})


def _record_zip(record: dict | str, batch: int) -> str:
    """The zip a record names (`batch N` for an unreadable record)."""
    named = record.get("zip") if isinstance(record, dict) else None
    return Path(named).name if isinstance(named, str) and named else f"batch {batch}"


def _failures(out: Path, summary: ConvertSummary) -> list[dict]:
    """What the manifest lists as not done: failure records, and this run's failures (one may
    have found no room to be recorded) and broken records of other runs."""
    failed = [{"zip": f["zip"], "error": f["error"]} for f in load_failures(out).values()]
    known = {f["error"] for f in failed}
    for failure in summary.failed:
        if failure["error"] not in known:
            failed.append({"zip": Path(failure["zip"]).name, "error": failure["error"]})
    return failed


def write_manifest(out: Path, config: ConvertConfig, given: set[int], checked: set[int], summary):
    """Rebuild the manifest from every record in DIR/.parts (other runs' zips included).

    Shards this run has not written or hashed (other runs' zips) are hashed here, so the
    manifest never lists a shard whose bytes differ from its record.
    """
    good, mode = [], None
    told = {Path(f["zip"]).name for f in summary.failed}  # this run's failures, reported
    for batch, record in sorted(load_records(out).items()):
        hashes = batch not in checked
        problem = record_problem(record, out, config.test_batches, hashes=hashes)
        if problem is None and mode is not None and record["mode"] != mode:
            problem = f"{record['zip']}: its images are {record['mode']}, the others' {mode}"
        if problem is not None:
            forget = config.forget_failed and batch not in given and not converting(out, batch)
            moved = _other_split(record, config.test_batches)
            if forget and not moved:
                discard_batch(out, batch)  # asked to go on without it: its record and shards
                log.warning(
                    "%s: forgotten (--forget-failed): %s", _record_zip(record, batch), problem
                )
            elif batch not in given or _record_zip(record, batch) not in told:
                _fail_record(summary, out, batch, record, problem, moved)
            continue
        good.append(record)
        mode = mode or record["mode"]
    if not good:
        log.error("no converted zip in %s: manifest not written", out)
        return
    manifest = build_manifest(good, config.test_batches, mode)
    manifest["failed"] = _failures(out, summary)
    told = {f["error"] for f in summary.failed}  # this run's failures are logged already
    for failed in manifest["failed"]:
        if failed["error"] not in told:
            log.warning("%s is not complete: %s: %s", out, failed["zip"], failed["error"])
    write_wids_indexes(out, manifest)
    write_json_atomic(out / MANIFEST_NAME, manifest)  # last: the folder is finished
    for split in SPLITS:
        summary.samples[split] = manifest["splits"][split]["samples"]
        summary.shards += len(manifest["splits"][split]["shards"])
        for ext, count in manifest["splits"][split]["formats"].items():
            summary.formats[ext] = summary.formats.get(ext, 0) + count
    summary.skipped = len(manifest["skipped"])
    if not manifest["splits"]["test"]["shards"]:
        log.warning(
            "the test split is empty: no converted zip is in --test-batches %s",
            ",".join(map(str, config.test_batches)) or "(none)",
        )
