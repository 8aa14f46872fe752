"""`convert`: stream batch zips into WebDataset tar shards and a manifest, never extracting.

Per zip, one process reads the central directory, pairs each fg_bg member with its bg, mask and
depth members, and writes the samples in a seeded random order into tar shards (see
`shardwriter`), reading every member once. Memory holds the central directory, the ~100
backgrounds (shared by all samples) and one sample, whatever the zip's size. A zip's shards are
written under temp names, renamed, then a record `DIR/.parts/batchNN.json` marks the zip done (see
`records`); the manifest is rebuilt from all records and written last, so an interrupted run
leaves no manifest and a re-run redoes only unfinished zips.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue as queue_lib
import random
import sys
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as quote_json
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.jpeg import JpegError, JpegInfo, check_jpeg
from pipeline.layout import (
    FIELDS,
    MANIFEST_NAME,
    SIZES,
    SPLITS,
    Member,
    SampleId,
    batch_number,
    classify,
    sample_key,
)
from pipeline.manifest import CHANNELS, build_manifest, write_json_atomic
from pipeline.records import (
    discard_batch,
    load_records,
    make_record,
    record_path,
    record_problem,
    reuse_problem,
)
from pipeline.shardwriter import ShardWriter
from pipeline.zipreader import MemberReader

log = logging.getLogger(__name__)

PROGRESS_EVERY = 200  # samples between progress messages: a queue put per sample would cost more
MODE_OF = {channels: mode for mode, channels in CHANNELS.items()}
SAMPLE_JSON = '{"batch": %d, "fg_bg": %s, "bg": %s, "mask": %s, "depth": %s}'
READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError)

Reporter = Callable[[str, int], None]  # ("total" | "done", count)


class ConvertError(Exception):
    """A whole zip failed; the message names the zip and what is wrong."""


class SkipSample(Exception):
    """One sample cannot be converted; the message is the reason."""


@dataclass
class ConvertConfig:
    """Options of `pipeline convert`."""

    out: Path  # output root: DIR/{train,test}/*.tar and DIR/manifest.json
    test_batches: tuple[int, ...] = (10,)  # the published recipe: batches 1-9 train, 10 tests
    shard_samples: int = 5000  # ~60 MB shards: few files, yet several per zip for shuffling
    workers: int = 1  # zips converted in parallel processes (one zip per process)
    seed: int = 0  # seed of the order samples are written in
    strict: bool = False  # any skipped sample fails its zip
    force: bool = False  # redo every zip, even those a record says are done
    progress: bool = True  # a progress bar, only when stderr is a terminal


@dataclass
class ZipJob:
    """One zip to convert, with everything a worker process needs (picklable)."""

    path: Path
    batch: int
    split: str
    out: Path
    shard_samples: int
    seed: int
    strict: bool
    expected_mode: str | None = None  # the mode of the zips already in the output

    @property
    def name(self) -> str:
        """The zip's file name, as the manifest and the skip reports give it."""
        return self.path.name


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
            f"{d['samples']['test']} test samples in {d['shards']} shards, {d['skipped']} skipped; "
            f"{d['seconds']:.1f} s ({d['samples_per_s']:.0f} samples/s)"
        )


# ---------------------------------------------------------------- one zip


class _Pairing(NamedTuple):
    """One sample's members: fg_bg defines it; the others may be missing (None)."""

    sample: SampleId
    fg_bg: Member
    mask: Member | None
    depth: Member | None
    problem: str | None = None  # why it cannot be used, found while pairing (a duplicate member)


class Pairings(NamedTuple):
    """A zip's members sorted out: its samples, its backgrounds, and what pairing ruled out."""

    pairs: list[_Pairing]  # sorted by sample id
    bgs: dict[int, Member]  # by background number
    bg_problems: dict[int, str]  # background number -> why no sample may use it (duplicates)
    skipped: list[dict]  # duplicate fg_bg members


def open_zip(path: Path) -> MemberReader:
    """Open a zip for reading; ConvertError naming it if it is missing or not a zip."""
    try:
        return MemberReader(path)
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise ConvertError(f"{path}: cannot open it as a zip ({exc})") from None


def pair_members(zip_name: str, names: Iterable[str]) -> Pairings:
    """Classify members into samples and backgrounds; duplicates are never resolved silently."""
    found: dict[str, dict] = {kind: {} for kind in FIELDS}
    twins: dict[tuple[str, object], list[str]] = {}  # (kind, bg number or sample) -> all names
    skipped: list[dict] = []
    for name in names:
        member = classify(name)
        if member is None:
            continue
        ident = member.bg if member.kind == "bg" else member.sample
        first = found[member.kind].setdefault(ident, member)
        if first is member:
            continue
        if member.kind == "fg_bg":  # the sample itself: the first is converted, this one reported
            skipped.append(_skip(zip_name, name, f"duplicate of sample member {first.name}"))
        else:  # which copy is right is unknown: the samples that need it are skipped
            twins.setdefault((member.kind, ident), [first.name]).append(name)
    bg_problems = {
        ident: f"duplicate bg members for background {ident}: {' and '.join(names)}"
        for (kind, ident), names in twins.items()
        if kind == "bg"
    }
    masks, depths = found["mask"], found["depth"]
    pairs = [
        _pair(sid, m, found, twins)
        if twins
        else _Pairing(sid, m, masks.get(sid), depths.get(sid))  # no duplicate: no problem
        for sid, m in sorted(found["fg_bg"].items())
    ]
    return Pairings(pairs, found["bg"], bg_problems, skipped)


def _pair(sample: SampleId, fg_bg: Member, found: dict, twins: dict) -> _Pairing:
    problem = None
    for kind in ("mask", "depth"):
        if (kind, sample) in twins:
            names = " and ".join(twins[kind, sample])
            problem = problem or f"duplicate {kind} members for {sample.stem()}: {names}"
    return _Pairing(sample, fg_bg, found["mask"].get(sample), found["depth"].get(sample), problem)


def sample_json(batch: int, fg_bg: str, bg: str, mask: str, depth: str) -> bytes:
    """A sample's json field: the bytes json.dumps gives for {"batch", "fg_bg", "bg", ...}."""
    # A template with json's own string quoting: a third of json.dumps's cost, same bytes.
    names = map(quote_json, (fg_bg, bg, mask, depth))
    return (SAMPLE_JSON % (batch, *names)).encode()


def _skip(zip_name: str, member: str, reason: str) -> dict:
    return {"zip": zip_name, "member": member, "reason": reason}


class ZipConverter:
    """Converts one opened zip: checks each sample cheaply and writes it to shards."""

    def __init__(self, job: ZipJob, reader: MemberReader, report: Reporter | None) -> None:
        self.job, self.reader, self.report = job, reader, report
        self.mode = job.expected_mode
        self.skipped: list[dict] = []
        self.written = 0
        self._bgs: dict[int, tuple[bytes, JpegInfo | str]] = {}
        self._accepted: dict[str, frozenset[JpegInfo]] = {}

    def run(self) -> dict:
        """Convert every sample; return the zip's record (see `records`)."""
        infos = self.reader.infos
        found = pair_members(self.job.name, (i.filename for i in infos))
        pairs, self.skipped = found.pairs, found.skipped
        if not pairs:
            raise ConvertError(f"{self.job.path}: no fg_bg_jpg/ members: not a batch zip")
        if self.report:
            self.report("total", len(pairs))
        self._strict_check()
        self._read_backgrounds(found.bgs, found.bg_problems)
        self._decide_mode()
        random.Random(f"{self.job.seed}:{self.job.batch}").shuffle(pairs)
        writer = ShardWriter(self.job.out, self.job.split, self.job.batch, self.job.shard_samples)
        try:
            self._write_all(pairs, found.bgs, writer)
            shards = writer.finish()
        except BaseException:
            writer.abort()
            raise
        return make_record(self.job, self.mode, infos, self.written, shards, self.skipped)

    def _write_all(self, pairs: list[_Pairing], bgs: dict[int, Member], writer: ShardWriter):
        self._accepted = self._accepted_infos()
        done = 0
        for pair in pairs:
            try:
                fields = self._read_sample(pair, bgs.get(pair.sample.bg))
            except SkipSample as exc:
                self.skipped.append(_skip(self.job.name, pair.fg_bg.name, str(exc)))
                self._strict_check()
            else:
                writer.write(sample_key(self.job.batch, pair.sample), fields)
                self.written += 1
            done += 1
            if self.report and done % PROGRESS_EVERY == 0:
                self.report("done", PROGRESS_EVERY)
        if self.report and done % PROGRESS_EVERY:
            self.report("done", done % PROGRESS_EVERY)
        if not self.written:
            raise ConvertError(f"{self.job.path}: no sample could be converted (all skipped)")

    def _strict_check(self) -> None:
        if self.job.strict and self.skipped:
            first = self.skipped[0]
            raise ConvertError(
                f"{self.job.path}: --strict: sample {first['member']} skipped: {first['reason']}"
            )

    def _read_backgrounds(self, bg_members: dict[int, Member], problems: dict[int, str]) -> None:
        # Read once: ~100 backgrounds are shared by all samples of a zip.
        for number, member in bg_members.items():
            if number in problems:
                self._bgs[number] = (b"", problems[number])
                continue
            try:
                data = self.reader.read(member.name)
            except READ_ERRORS as exc:
                self._bgs[number] = (b"", f"bg member {member.name}: cannot read it ({exc})")
                continue
            try:
                self._bgs[number] = (data, check_jpeg(data))
            except JpegError as exc:
                self._bgs[number] = (data, f"bg member {member.name}: {exc}")

    def _decide_mode(self) -> None:
        """The zip's mode (L or RGB): that of most of its backgrounds, so a stray image can't."""
        counts = Counter(
            MODE_OF[info.components]
            for _, info in self._bgs.values()
            if not isinstance(info, str) and info.components in MODE_OF
        )
        expected = self.job.expected_mode
        if not counts:
            return  # no usable background: every sample is skipped for it, mode or not
        # A tie keeps the output's mode, else the published one (L).
        self.mode = max(counts, key=lambda m: (counts[m], m == expected, m == "L"))
        if expected is not None and self.mode != expected:
            raise ConvertError(
                f"{self.job.path}: {counts[self.mode]} of its {counts.total()} backgrounds are "
                f"{self.mode} images but {self.job.out} holds {expected} images; "
                "convert it into another folder"
            )
        log.debug("%s: %s images (backgrounds: %s)", self.job.name, self.mode, dict(counts))

    def _read_sample(self, pair: _Pairing, bg: Member | None) -> dict[str, bytes]:
        """The sample's fields: four images (checked) and its json; SkipSample if unusable."""
        mask, depth = pair.mask, pair.depth
        if bg is None or mask is None or depth is None:
            missing = [k for k, m in (("bg", bg), ("mask", mask), ("depth", depth)) if not m]
            raise SkipSample(f"missing {' and '.join(missing)} member(s) for {pair.sample.stem()}")
        if pair.problem:
            raise SkipSample(pair.problem)
        bg_data, bg_info = self._bgs[pair.sample.bg]
        if isinstance(bg_info, str):
            raise SkipSample(bg_info)
        if bg_info not in self._accepted["bg"]:  # first: the mode comes from the backgrounds
            self._check_info("bg", bg.name, bg_info)
        return {
            "bg.jpg": bg_data,
            "fg_bg.jpg": self._read_checked("fg_bg", pair.fg_bg.name),
            "mask.jpg": self._read_checked("mask", mask.name),
            "depth.jpg": self._read_checked("depth", depth.name),
            "json": sample_json(self.job.batch, pair.fg_bg.name, bg.name, mask.name, depth.name),
        }

    def _read_checked(self, kind: str, name: str) -> bytes:
        try:
            data = self.reader.read(name)
        except READ_ERRORS as exc:
            raise SkipSample(f"{kind} member {name}: cannot read it ({exc})") from None
        try:
            info = check_jpeg(data)
        except JpegError as exc:
            raise SkipSample(f"{kind} member {name}: {exc}") from None
        if info not in self._accepted[kind]:
            self._check_info(kind, name, info)
        return data

    def _accepted_infos(self) -> dict[str, frozenset[JpegInfo]]:
        """Per kind, the frame headers `_check_info` accepts (a set lookup is cheaper)."""
        accepted = {}
        for kind, (width, height) in SIZES.items():
            if kind in ("mask", "depth"):
                channels = set(MODE_OF)
            else:  # no mode (no usable background): every sample is skipped before this check
                channels = {CHANNELS[self.mode]} if self.mode else set()
            accepted[kind] = frozenset(JpegInfo(width, height, c) for c in channels)
        return accepted

    def _check_info(self, kind: str, name: str, info: JpegInfo) -> None:
        if (info.width, info.height) != SIZES[kind]:
            want = "x".join(map(str, SIZES[kind]))
            raise SkipSample(f"{kind} member {name}: {info.width}x{info.height}, expected {want}")
        if info.components not in MODE_OF:
            raise SkipSample(f"{kind} member {name}: {info.components} colour components")
        if kind in ("mask", "depth"):
            return  # read as single-channel whatever their mode
        # Only reached after a usable background was checked, so the mode is decided.
        if info.components != CHANNELS[self.mode]:
            raise SkipSample(
                f"{kind} member {name}: {info.components} colour components, expected "
                f"{CHANNELS[self.mode]} (the zip's backgrounds are mostly {self.mode})"
            )


def convert_zip(job: ZipJob, report: Reporter | None = None) -> dict:
    """Convert one zip into shards (temp names renamed at the end); return its record."""
    with open_zip(job.path) as reader:
        return ZipConverter(job, reader, report).run()


# ---------------------------------------------------------------- many zips


def plan_jobs(zips: list[Path], config: ConvertConfig) -> list[ZipJob]:
    """One job per zip; ValueError for bad arguments (no batch number, a batch given twice)."""
    if not zips:
        raise ValueError("no zip to convert")
    if config.shard_samples < 1 or config.workers < 1:
        raise ValueError("shard_samples and workers must be at least 1")
    jobs: dict[int, ZipJob] = {}
    for path in map(Path, zips):
        batch = batch_number(path)
        if batch in jobs:
            raise ValueError(f"{jobs[batch].path} and {path} are both batch {batch}")
        split = "test" if batch in config.test_batches else "train"
        jobs[batch] = ZipJob(
            path, batch, split, Path(config.out), config.shard_samples, config.seed, config.strict
        )
    return list(jobs.values())


def convert_zips(zips: list[Path], config: ConvertConfig) -> ConvertSummary:
    """Convert zips into shards under `config.out` and (re)write its manifest last."""
    start = time.perf_counter()
    jobs = plan_jobs(zips, config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = ConvertSummary(out=out, zips=len(jobs))
    records = load_records(out)
    todo = _select_todo(jobs, records, config, summary)
    if todo:
        (out / MANIFEST_NAME).unlink(missing_ok=True)  # the output is unfinished from here on
        for job in todo:
            discard_batch(out, job.batch)
            records.pop(job.batch, None)
    mode = _reference_mode(records.values())
    for job in todo:
        job.expected_mode = mode
    for job, result in _run_jobs(todo, config):
        mode = _accept(job, result, mode, summary)
    done = set(summary.reused) | set(summary.converted)  # their shards are checked already
    checked = {job.batch for job in jobs if job.name in done}
    _write_manifest(out, config, {job.batch for job in jobs}, checked, summary)
    summary.seconds = time.perf_counter() - start
    return summary


def _fail_record(summary, out: Path, batch: int, record: dict | str, problem: str) -> None:
    """A record from an earlier run (not one of this run's zips) that cannot go in the manifest."""
    name = record["zip"] if isinstance(record, dict) else f"batch {batch}"
    summary.failed.append({"zip": name, "error": problem})
    log.error("%s; re-run convert with that zip, or delete %s", problem, record_path(out, batch))


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
    summary.converted.append(job.name)
    summary.written += result["samples"]
    shards, skipped = len(result["shards"]), len(result["skipped"])
    log.info(
        "%s: %d samples -> %d %s shard(s), %d skipped",
        *(job.name, result["samples"], shards, job.split, skipped),
    )
    return mode or result["mode"]


def _fail(summary: ConvertSummary, job: ZipJob, exc: BaseException) -> None:
    message = str(exc) if isinstance(exc, ConvertError) else f"{job.path}: {exc!r}"
    log.error("%s", message)
    summary.failed.append({"zip": str(job.path), "error": message})


def _run_jobs(jobs: list[ZipJob], config: ConvertConfig):
    """Yield (job, record or exception) as zips finish, with a progress bar on a terminal."""
    if not jobs:
        return
    show = config.progress and sys.stderr.isatty()
    if config.workers == 1 or len(jobs) == 1:
        yield from _run_here(jobs, show)
    else:
        yield from _run_pool(jobs, min(config.workers, len(jobs)), show)


@contextmanager
def _progress_bar(show: bool) -> Iterator[Reporter | None]:
    """A sample-counting bar on stderr, and logging routed around it; None when not shown."""
    if not show:
        yield None
        return
    with tqdm(total=0, unit="sample", file=sys.stderr, smoothing=0.1) as bar:
        with logging_redirect_tqdm():

            def report(kind: str, n: int) -> None:
                if kind == "total":  # each zip's count arrives when a worker has listed it
                    bar.total += n
                    bar.refresh()
                else:
                    bar.update(n)

            yield report


def _run_here(jobs: list[ZipJob], show: bool):
    # One process: no pool to start, no pickling; a failed zip does not stop the others.
    with _progress_bar(show) as report:
        for job in jobs:
            try:
                yield job, convert_zip(job, report)
            except Exception as exc:  # as in a pool: one zip's failure must not stop the others
                yield job, exc


_QUEUE = None  # a worker's progress channel to the parent


def _init_worker(progress_queue) -> None:
    global _QUEUE
    _QUEUE = progress_queue


def _queue_report(kind: str, n: int) -> None:
    _QUEUE.put((kind, n))


def _convert_in_worker(job: ZipJob) -> dict:
    return convert_zip(job, _queue_report if _QUEUE is not None else None)


def _run_pool(jobs: list[ZipJob], workers: int, show: bool):
    # A manager's queue: put() returns once the message is queued, so when a zip's result
    # arrives, all its progress messages are already there to drain.
    with multiprocessing.Manager() if show else nullcontext() as manager:
        progress_queue = manager.Queue() if show else None
        yield from _pool_results(jobs, workers, show, progress_queue)


def _pool_results(jobs: list[ZipJob], workers: int, show: bool, progress_queue):
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(progress_queue,)) as pool:
        # Submit before the bar exists: workers fork here, before tqdm starts its monitor thread.
        futures: dict[Future, ZipJob] = {pool.submit(_convert_in_worker, j): j for j in jobs}
        pending = set(futures)
        with _progress_bar(show) as report:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(progress_queue, report)
                for future in done:
                    exc = future.exception()
                    yield futures[future], exc if exc is not None else future.result()


def _drain(progress_queue, report: Reporter | None) -> None:
    while report is not None:
        try:
            report(*progress_queue.get_nowait())
        except queue_lib.Empty:
            return


def _write_manifest(out: Path, config: ConvertConfig, given: set[int], checked: set[int], summary):
    """Rebuild the manifest from every record in DIR/.parts (other runs' zips included).

    Shards this run has not written or hashed (other runs' zips) are hashed here, so the
    manifest never lists a shard whose bytes differ from its record.
    """
    good, mode = [], None
    for batch, record in sorted(load_records(out).items()):
        hashes = batch not in checked
        problem = record_problem(record, out, config.test_batches, hashes=hashes)
        if problem is None and mode is not None and record["mode"] != mode:
            problem = f"{record['zip']}: its images are {record['mode']}, the others' {mode}"
        if problem is not None:
            if batch not in given:  # this run's own failures are reported already
                _fail_record(summary, out, batch, record, problem)
            continue
        good.append(record)
        mode = mode or record["mode"]
    if not good:
        log.error("no converted zip in %s: manifest not written", out)
        return
    manifest = build_manifest(good, config.test_batches, mode)
    write_json_atomic(out / MANIFEST_NAME, manifest)
    for split in SPLITS:
        summary.samples[split] = manifest["splits"][split]["samples"]
        summary.shards += len(manifest["splits"][split]["shards"])
    summary.skipped = len(manifest["skipped"])
    if not manifest["splits"]["test"]["shards"]:
        log.warning(
            "the test split is empty: no converted zip is in --test-batches %s",
            ",".join(map(str, config.test_batches)) or "(none)",
        )
