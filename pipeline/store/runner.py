"""Convert many zips: plan re-runs, run zips in a pool with a progress bar, write the manifest.

Each zip is independent (`store.convert` converts one); a zip's shards are written under temp
names, renamed, then a record `DIR/.parts/batchNN.json` marks the zip done (`store.catalog`). The
manifest is rebuilt from all records and written last, so an interrupted run leaves no manifest
and a re-run redoes only unfinished zips.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.schema import MANIFEST_NAME, SPLITS, load_manifest, shard_entries
from pipeline.store.catalog import (
    PARTS_DIR,
    clear_failure,
    discard_batch,
    load_failures,
    load_records,
    record_path,
    record_problem,
    shards_problem,
    split_of,
    write_failure,
    write_json_atomic,
)
from pipeline.store.convert import READ_ERRORS, ConvertError, ZipJob
from pipeline.store.finish import batch_lock, converting, write_manifest
from pipeline.store.guard import locked
from pipeline.store.names import batch_number
from pipeline.store.pool import run_jobs
from pipeline.store.zipread import fingerprint_zip

log = logging.getLogger(__name__)


@dataclass
class ConvertConfig:
    """Options of `pipeline convert`."""

    out: Path  # output root: DIR/{train,test}/*.tar and DIR/manifest.json
    test_batches: tuple[int, ...] = (10,)  # the published recipe: batches 1-9 train, 10 tests
    shard_samples: int = 5000  # ~60 MB shards: few files, yet several per zip for shuffling
    workers: int = 1  # zips converted in parallel processes (one zip per process)
    seed: int = 0  # seed of the order samples are written in
    strict: bool = False  # any skipped sample fails its zip
    decode: bool = False  # decode every image, not only check its headers (about 2.5x slower)
    force: bool = False  # redo every zip, even those a record says are done
    progress: bool = True  # a progress bar, only when stderr is a terminal
    wait: bool = True  # another convert is writing the same batches: wait for it (else refuse)
    forget_failed: bool = False  # drop the failures of zips not given: go on without them


@dataclass
class ConvertSummary:
    """What a conversion did; `ok` is False when any zip failed."""

    out: Path
    zips: int
    converted: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    samples: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    skipped: int = 0
    shards: int = 0
    formats: dict[str, int] = field(default_factory=dict)  # image members by extension
    written: int = 0  # samples written by this run (reused zips excluded)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every zip converted (skipped samples allowed, unless --strict)."""
        return not self.failed

    def to_dict(self) -> dict:
        """The JSON summary (`convert --json`)."""
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        return {
            "ok": self.ok,
            "zips": self.zips,
            "converted": len(self.converted),
            "reused": len(self.reused),
            "failed": self.failed,
            "samples": dict(self.samples),
            "skipped": self.skipped,
            "shards": self.shards,
            "formats": dict(self.formats),
            "written": self.written,
            "seconds": round(self.seconds, 3),
            "samples_per_s": round(rate, 1),
            "out": str(self.out),
        }

    def summary_line(self) -> str:
        """One human line: what was done and what the output holds."""
        d = self.to_dict()
        status = "ok" if self.ok else f"FAILED ({len(self.failed)} zip(s))"
        return (
            f"convert {status}: {d['zips']} zip(s), {d['converted']} converted, "
            f"{d['reused']} reused; {self.out} holds {d['samples']['train']} train + "
            f"{d['samples']['test']} test samples in {d['shards']} shards, {d['skipped']} skipped, "
            f"{self.formats.get('png', 0)} PNG members kept; "
            f"{d['seconds']:.1f} s ({d['samples_per_s']:.0f} samples/s)"
        )


def plan_jobs(zips: list[Path], config: ConvertConfig) -> list[ZipJob]:
    """One job per zip; ValueError for bad arguments (no batch number, a batch given twice)."""
    if not zips:
        raise ValueError("no zip to convert")
    if config.shard_samples < 1 or config.workers < 1:
        raise ValueError("shard_samples and workers must be at least 1")
    jobs: dict[int, ZipJob] = {}
    for path in map(Path, zips):
        batch = batch_number(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such zip file")
        if batch in jobs:
            raise ValueError(f"{jobs[batch].path} and {path} are both batch {batch}")
        split = split_of(batch, config.test_batches)
        jobs[batch] = ZipJob(
            path,
            batch,
            split,
            Path(config.out),
            config.shard_samples,
            config.seed,
            config.strict,
            decode=config.decode,
        )
    return list(jobs.values())


def convert_zips(zips: list[Path], config: ConvertConfig) -> ConvertSummary:
    """Convert zips into shards under `config.out` and (re)write its manifest last.

    The batches given are locked for the whole run (`store.guard`): a second convert of the same
    batches waits for this one (or refuses); converts of other batches run alongside.
    """
    start = time.perf_counter()
    jobs = plan_jobs(zips, config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = ConvertSummary(out=out, zips=len(jobs))
    with locked(out, [batch_lock(job.batch) for job in jobs], wait=config.wait):
        _convert_locked(jobs, config, summary)
    summary.seconds = time.perf_counter() - start
    return summary


UNFINISHED = "its conversion did not finish (the convert writing it stopped, or still runs)"


def _convert_locked(jobs: list[ZipJob], config: ConvertConfig, summary: ConvertSummary) -> None:
    out = Path(config.out)
    records = load_records(out)
    _mark_unrecorded(out, records, jobs, config, summary)
    todo = _select_todo(jobs, records, config, summary)
    for job in jobs:
        if job.name in summary.reused:
            clear_failure(out, job.batch)
    if todo:
        # Each zip is marked unfinished before anything of it or the manifest goes: if a mark
        # cannot be written (a full disk), nothing is removed, and what was there still stands.
        _mark_unfinished(out, todo)
        with locked(out, ["manifest"]):
            (out / MANIFEST_NAME).unlink(missing_ok=True)  # the output is unfinished from here on
        for job in todo:
            discard_batch(out, job.batch)
            records.pop(job.batch, None)
    mode = _reference_mode(records.values())
    for job in todo:
        job.expected_mode = mode
    results = run_jobs(todo, config.workers, config.progress)
    try:
        for job, result in results:
            mode = _accept(job, result, mode, summary)
    except KeyboardInterrupt:
        results.close()  # stop the pool first: no worker may write after the clean-up
        _interrupted(out, todo, summary)
        raise
    if config.forget_failed:
        _forget_failures(out, {job.batch for job in jobs})
    done = set(summary.reused) | set(summary.converted)  # their shards are checked already
    checked = {job.batch for job in jobs if job.name in done}
    with locked(out, ["manifest"]):
        write_manifest(out, config, {job.batch for job in jobs}, checked, summary)


def _mark_unrecorded(out: Path, records: dict, jobs: list[ZipJob], config, summary) -> None:
    """The batches the manifest lists that DIR/.parts has no record of (a copy of the folder
    without its hidden .parts): marked not done, as the manifest rewritten from the records
    would drop their samples without a word. Their zips given, they are converted again."""
    try:
        manifest = load_manifest(out)
    except ValueError:
        return  # none, or not one to trust: it promises nothing
    listed: dict[int, int] = {}  # batch -> samples the manifest lists of it
    for _, shard in shard_entries(manifest):
        batch = shard.get("batch")
        if isinstance(batch, int) and batch not in records:
            listed[batch] = listed.get(batch, 0) + shard["samples"]
    # Looked at again now, after the manifest: another convert may have written it meanwhile.
    given, failures = {job.batch for job in jobs}, load_failures(out)
    for batch in list(listed):
        done = record_path(out, batch).exists() or batch in failures
        if batch in given or done or converting(out, batch):
            del listed[batch]
    sources = manifest.get("sources")  # optional, unchecked: only a zip's name is taken from it
    names = {
        s["batch"]: s.get("zip")
        for s in (sources if isinstance(sources, list) else [])
        if isinstance(s, dict) and isinstance(s.get("batch"), int)
    }
    for batch, samples in sorted(listed.items()):
        name = names.get(batch)
        zip_name = Path(name).name if isinstance(name, str) and name else f"batch {batch}"
        error = (
            f"{zip_name}: {out / MANIFEST_NAME} lists {samples} of its samples, but "
            f"{out / PARTS_DIR} holds no record of it (the folder copied without .parts?): "
            "convert that zip into it again, or go on without it (--forget-failed)"
        )
        write_failure(out, batch, zip_name, error)
        if not config.forget_failed:
            log.error("%s", error)
            summary.failed.append({"zip": zip_name, "error": error})


def _mark_unfinished(out: Path, todo: list[ZipJob]) -> None:
    """Mark each zip to convert as not done (until it is); if a mark cannot be written (a full
    disk), take back the marks this wrote where there was none, so the folder is as it was."""
    marked = set(load_failures(out))
    try:
        for job in todo:
            write_failure(out, job.batch, job.name, UNFINISHED)
    except OSError:
        for job in todo:
            if job.batch not in marked:
                clear_failure(out, job.batch)
        raise


def _interrupted(out: Path, todo: list[ZipJob], summary: ConvertSummary) -> None:
    """Ctrl-C: remove what unfinished zips wrote, record them, say what was finished."""
    given_up = {Path(f["zip"]).name for f in summary.failed}
    unfinished = [j for j in todo if j.name not in summary.converted and j.name not in given_up]
    for job in unfinished:
        discard_batch(out, job.batch)
        _record_failure(out, job, "interrupted (Ctrl-C) before it was finished")
    finished = [*summary.converted, *summary.reused]
    log.error(
        "interrupted: %d zip(s) finished (%s), %d not finished (%s); no manifest written: "
        "run the same command again to finish",
        len(finished), ", ".join(finished) or "none",
        len(unfinished), ", ".join(j.name for j in unfinished) or "none",
    )  # fmt: skip


def _forget_failures(out: Path, given: set[int]) -> None:
    """--forget-failed: drop failure records of zips not given (unless another convert runs);
    their records that cannot be used (damaged, its shards changed) go in finish.write_manifest."""
    for batch, failure in load_failures(out).items():
        if isinstance(batch, int) and (batch in given or converting(out, batch)):
            continue
        if isinstance(batch, int) and not record_path(out, batch).exists():
            discard_batch(out, batch)  # what its convert left, killed: temp or renamed shards
        clear_failure(out, batch)
        log.warning("%s: forgotten (--forget-failed): %s", failure["zip"], failure["error"])


def _record_failure(out: Path, job: ZipJob, error: str) -> None:
    try:
        write_failure(out, job.batch, job.name, error)
    except OSError as exc:  # a full disk: the manifest will list it from this run's summary
        log.error("%s", exc)


def _select_todo(jobs, records, config: ConvertConfig, summary: ConvertSummary) -> list[ZipJob]:
    todo = []
    for job in jobs:
        record = records.get(job.batch)
        try:
            problem = "--force" if config.force else reuse_problem(record, job, config.test_batches)
        except (ValueError, OSError) as exc:
            _fail(summary, job, ConvertError(str(exc)) if isinstance(exc, ValueError) else exc)
            continue
        if problem is None:
            log.info("%s: already converted, shards unchanged: reused", job.name)
            summary.reused.append(job.name)
            continue
        if record is not None and not config.force:
            log.info("%s; converting it again", problem)
        todo.append(job)
    return todo


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
    if job.decode and record.get("decoded") is not True:
        return f"{job.name}: --decode, and it was converted without"
    changed = record["bytes"] != job.path.stat().st_size
    if changed or record["fingerprint"] != _fingerprint(job.path):
        return f"{job.name}: the zip has changed since it was converted"
    return shards_problem(record, job.out, hashes=True)


def _fingerprint(path: Path) -> str:
    try:
        return fingerprint_zip(path)
    except (*READ_ERRORS, ValueError) as exc:  # zipfile's refusals too: a changed zip
        raise ValueError(f"{path}: cannot open it as a zip ({exc})") from None


def _reference_mode(records: Iterable[dict | str]) -> str | None:
    modes = [r["mode"] for r in records if isinstance(r, dict) and r.get("mode")]
    return modes[0] if modes else None


def _accept(job: ZipJob, result: dict | BaseException, mode: str | None, summary) -> str | None:
    """Record a finished zip (or its failure); return the output's mode."""
    if isinstance(result, BaseException):
        discard_batch(job.out, job.batch)
        _fail(summary, job, result)
        return mode
    if mode is not None and result["mode"] != mode:
        discard_batch(job.out, job.batch)
        msg = f"{job.path}: its images are {result['mode']} but {job.out} holds {mode} images"
        _fail(summary, job, ConvertError(msg + "; convert it into another folder"))
        return mode
    for skip in result["skipped"]:
        log.warning("%s: skipped %s: %s", skip["zip"], skip["member"], skip["reason"])
    write_json_atomic(record_path(job.out, job.batch), result)
    clear_failure(job.out, job.batch)
    summary.converted.append(job.name)
    summary.written += result["samples"]
    shards, skipped = len(result["shards"]), len(result["skipped"])
    log.info(
        "%s: %d samples -> %d %s shard(s), %d skipped, %d PNG members",
        *(job.name, result["samples"], shards, job.split, skipped, result["formats"].get("png", 0)),
    )
    return mode or result["mode"]


def _fail(summary: ConvertSummary, job: ZipJob, exc: BaseException) -> None:
    message = str(exc) if isinstance(exc, ConvertError) else f"{job.path}: {_describe(exc)}"
    log.error("%s", message)
    if not isinstance(exc, ConvertError):  # maybe a bug: where it happened, for `-v`
        # From a pool, the worker's own traceback rides in exc.__cause__, printed with it.
        log.debug("%s: traceback of the failure:", job.path, exc_info=exc)
    summary.failed.append({"zip": str(job.path), "error": message})
    _record_failure(job.out, job, message)  # verify fails on the folder until it is redone


def _describe(exc: BaseException) -> str:
    """An error in words: an OSError's own text (naming its file), else its repr."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    return repr(exc)
