"""`convert`: stream batch zips into WebDataset tar shards and a manifest, never extracting.

Per zip, one process reads the central directory, pairs each fg_bg member with its bg, mask and
depth members, and writes the samples in a seeded random order into tar shards, reading every
member once. Memory holds the central directory, the ~100 backgrounds (shared by all samples) and
one sample, whatever the zip's size. A zip's shards are written under temp names, renamed, then a
record `DIR/.parts/batchNN.json` marks the zip done; the manifest is rebuilt from all records and
written last, so an interrupted run leaves no manifest and a re-run redoes only unfinished zips.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import queue as queue_lib
import random
import struct
import sys
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
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
    shard_name,
)
from pipeline.manifest import CHANNELS, build_manifest, write_json_atomic

log = logging.getLogger(__name__)

PARTS_DIR = ".parts"  # per-zip records: which zips are done, with their shards
RECORD_VERSION = 1
PROGRESS_EVERY = 200  # samples between progress messages: a queue put per sample would cost more
MODE_OF = {channels: mode for mode, channels in CHANNELS.items()}
# Tar members get fixed metadata so the same zip and seed give byte-identical shards.
TAR_BLOCK = 512
TAR_RECORD = tarfile.RECORDSIZE
LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a member's local header (APPNOTE 4.3.7)
LOCAL_MAGIC = b"PK\x03\x04"
RECORD_KEYS = {"zip", "batch", "split", "mode", "shard_samples", "seed", "bytes", "fingerprint"}
RECORD_KEYS |= {"samples", "shards", "skipped"}
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


# ---------------------------------------------------------------- tar shards, hashed as written


class _HashingFile:
    """A write-only file that hashes and counts the bytes going through it."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "wb", buffering=1 << 20)  # closed by close()
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        """Write, hash and count `data`."""
        self._file.write(data)
        self._sha.update(data)
        self.size += len(data)

    def close(self) -> str:
        """Close the file; return the hex sha256 of everything written."""
        self._file.close()
        return self._sha.hexdigest()


def _ustar_constants() -> tuple[bytes, bytes, bytes, int]:
    """The fixed parts of a ustar header and their byte sum (checksum field as spaces)."""
    ids = b"0000444\0" + b"0000000\0" * 2  # mode 0o444, uid 0, gid 0
    mtime = b"0" * 11 + b"\0"  # 1970: the same bytes whenever the shard is written
    # type "0" (file), linkname, magic+version, uname, gname, devmajor, devminor, prefix, padding
    tail = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (32 + 32 + 8 + 8 + 155 + 12)
    return ids, mtime, tail, sum(ids) + sum(mtime) + sum(tail) + 8 * ord(" ")


_IDS, _MTIME, _TAIL, _FIXED_SUM = _ustar_constants()


def tar_member(name: str, data: bytes) -> bytes:
    """One tar member (header, data, padding) with fixed metadata: mtime 0, uid/gid 0, 0o444."""
    # tarfile's header code costs ~80 us a member, more than everything else per sample; only
    # the name, size and checksum vary, so the header is assembled from precomputed parts.
    raw = name.encode()
    if len(raw) > 100 or len(data) >= 8**11:
        raise ValueError(f"{name}: name over 100 bytes or data over 8 GiB: not for a ustar header")
    size = b"%011o\0" % len(data)
    checksum = _FIXED_SUM + sum(raw) + sum(size)
    header = b"".join((raw.ljust(100, b"\0"), _IDS, size, _MTIME, b"%06o\0 " % checksum, _TAIL))
    return b"".join((header, data, b"\0" * (-len(data) % TAR_BLOCK)))


class ShardWriter:
    """Writes one zip's samples into `DIR/split/batchNN-XXXXXX.tar`, rolling over every N samples.

    Shards are written as `*.tar.tmp` and renamed only by `finish()`, so a crash never leaves a
    file with a final name but partial content.
    """

    def __init__(self, out: Path, split: str, batch: int, max_samples: int) -> None:
        self.out, self.split, self.batch, self.max_samples = out, split, batch, max_samples
        self.shards: list[dict] = []
        self._temps: list[Path] = []
        self._file: _HashingFile | None = None
        self._count = 0
        (out / split).mkdir(parents=True, exist_ok=True)

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """Append one sample: `KEY.<field>` for each field, in the given order."""
        if self._file is None or self._count == self.max_samples:
            self._roll()
        self._file.write(b"".join(tar_member(f"{key}.{ext}", data) for ext, data in fields.items()))
        self._count += 1

    def _roll(self) -> None:
        self._close_current()
        rel = shard_name(self.split, self.batch, len(self.shards))
        temp = self.out / f"{rel}.tmp"
        self._temps.append(temp)
        self._file = _HashingFile(temp)
        self._count = 0
        self.shards.append({"path": rel, "batch": self.batch, "samples": 0})

    def _close_current(self) -> None:
        if self._file is None:
            return
        # End of archive: two zero blocks, then zero padding to a whole record, as tarfile does.
        end = 2 * TAR_BLOCK
        end += -(self._file.size + end) % TAR_RECORD
        self._file.write(b"\0" * end)
        size = self._file.size
        self.shards[-1].update(samples=self._count, bytes=size, sha256=self._file.close())
        self._file = None

    def finish(self) -> list[dict]:
        """Close the last shard and give every shard its final name; return their entries."""
        self._close_current()
        for temp in self._temps:
            temp.replace(temp.with_suffix(""))
        self._temps = []
        return self.shards

    def abort(self) -> None:
        """Delete every shard written so far (the zip failed)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for temp in self._temps:
            temp.unlink(missing_ok=True)
        self._temps = []


# ---------------------------------------------------------------- one zip


class MemberReader:
    """Reads a zip's members by offset: a pread of the local header, one of the data, inflate.

    zipfile's own `read` costs ~35 us a member (a file object, a decompressor, several small
    reads); this costs a third of that, and convert reads ~120,000 members a zip. The CRC and
    size are checked as zipfile does. Encrypted or unusual members go through zipfile.
    """

    def __init__(self, zf: zipfile.ZipFile) -> None:
        self.zf = zf
        self._fd = zf.fp.fileno() if hasattr(os, "pread") and zf.fp is not None else None

    def read(self, name: str) -> bytes:
        """The member's uncompressed bytes; BadZipFile, zlib.error or EOFError if damaged."""
        info = self.zf.getinfo(name)
        fast = info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
        if self._fd is None or not fast or info.flag_bits & 1:
            return self.zf.read(info)
        header = os.pread(self._fd, LOCAL_HEADER.size, info.header_offset)
        if len(header) != LOCAL_HEADER.size or header[:4] != LOCAL_MAGIC:
            raise zipfile.BadZipFile("bad local header (damaged zip)")
        name_len, extra_len = LOCAL_HEADER.unpack(header)[-2:]
        start = info.header_offset + LOCAL_HEADER.size + name_len + extra_len
        raw = os.pread(self._fd, info.compress_size, start)
        if len(raw) != info.compress_size:
            raise EOFError("the zip ends inside this member")
        data = zlib.decompress(raw, -15) if info.compress_type == zipfile.ZIP_DEFLATED else raw
        if len(data) != info.file_size or zlib.crc32(data) != info.CRC:
            raise zipfile.BadZipFile("bad CRC-32 or size (damaged member)")
        return data


class _Pairing(NamedTuple):
    """One sample's members: fg_bg defines it; the others may be missing (None)."""

    sample: SampleId
    fg_bg: Member
    mask: Member | None
    depth: Member | None


def open_zip(path: Path) -> zipfile.ZipFile:
    """Open a zip for reading; ConvertError naming it if it is missing or not a zip."""
    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise ConvertError(f"{path}: cannot open it as a zip ({exc})") from None


def zip_fingerprint(path: Path, infos: Iterable[zipfile.ZipInfo]) -> str:
    """Identify a zip's content cheaply: its size and its members' names, CRCs and sizes."""
    listing = sorted(f"{i.filename}\0{i.CRC:08x}\0{i.file_size}\n" for i in infos)
    text = f"{Path(path).stat().st_size}\n" + "".join(listing)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def pair_members(zip_name: str, names: Iterable[str]) -> tuple[list[_Pairing], dict, list[dict]]:
    """Classify members: the samples (sorted), bg members by number, and duplicates skipped."""
    found: dict[str, dict] = {kind: {} for kind in FIELDS}
    skipped: list[dict] = []
    for name in names:
        member = classify(name)
        if member is None:
            continue
        ident = member.bg if member.kind == "bg" else member.sample
        first = found[member.kind].setdefault(ident, member)
        if first is not member and member.kind == "fg_bg":
            skipped.append(_skip(zip_name, name, f"duplicate of sample member {first.name}"))
    pairs = [
        _Pairing(sid, m, found["mask"].get(sid), found["depth"].get(sid))
        for sid, m in sorted(found["fg_bg"].items())
    ]
    return pairs, found["bg"], skipped


def _skip(zip_name: str, member: str, reason: str) -> dict:
    return {"zip": zip_name, "member": member, "reason": reason}


class ZipConverter:
    """Converts one opened zip: checks each sample cheaply and writes it to shards."""

    def __init__(self, job: ZipJob, zf: zipfile.ZipFile, report: Reporter | None) -> None:
        self.job, self.zf, self.report = job, zf, report
        self.reader = MemberReader(zf)
        self.mode = job.expected_mode
        self.skipped: list[dict] = []
        self.written = 0
        self._bgs: dict[int, tuple[bytes, JpegInfo | str]] = {}

    def run(self) -> dict:
        """Convert every sample; return the zip's record (see `.parts/`)."""
        infos = self.zf.infolist()
        pairs, bg_members, self.skipped = pair_members(self.job.name, (i.filename for i in infos))
        if not pairs:
            raise ConvertError(f"{self.job.path}: no fg_bg_jpg/ members: not a batch zip")
        if self.report:
            self.report("total", len(pairs))
        self._strict_check()
        self._read_backgrounds(bg_members)
        random.Random(f"{self.job.seed}:{self.job.batch}").shuffle(pairs)
        writer = ShardWriter(self.job.out, self.job.split, self.job.batch, self.job.shard_samples)
        try:
            self._write_all(pairs, bg_members, writer)
            shards = writer.finish()
        except BaseException:
            writer.abort()
            raise
        return self._record(infos, shards)

    def _write_all(self, pairs: list[_Pairing], bgs: dict[int, Member], writer: ShardWriter):
        done = 0
        for pair in pairs:
            try:
                fields, names = self._read_sample(pair, bgs.get(pair.sample.bg))
            except SkipSample as exc:
                self.skipped.append(_skip(self.job.name, pair.fg_bg.name, str(exc)))
                self._strict_check()
            else:
                fields["json"] = json.dumps({"batch": self.job.batch, **names}).encode()
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

    def _read_backgrounds(self, bg_members: dict[int, Member]) -> None:
        # Read once: ~100 backgrounds are shared by all samples of a zip.
        for number, member in bg_members.items():
            try:
                data = self.reader.read(member.name)
            except READ_ERRORS as exc:
                self._bgs[number] = (b"", f"bg member {member.name}: cannot read it ({exc})")
                continue
            try:
                self._bgs[number] = (data, check_jpeg(data))
            except JpegError as exc:
                self._bgs[number] = (data, f"bg member {member.name}: {exc}")

    def _read_sample(self, pair: _Pairing, bg: Member | None) -> tuple[dict, dict]:
        """The sample's four images (checked) and member names; SkipSample if any is unusable."""
        missing = [k for k, m in (("bg", bg), ("mask", pair.mask), ("depth", pair.depth)) if not m]
        if missing:
            raise SkipSample(f"missing {' and '.join(missing)} member(s) for {pair.sample.stem()}")
        fg_bg = self._read_checked("fg_bg", pair.fg_bg.name)
        bg_data, bg_info = self._bgs[pair.sample.bg]
        if isinstance(bg_info, str):
            raise SkipSample(bg_info)
        self._check_info("bg", bg.name, bg_info)
        fields = {
            "bg.jpg": bg_data,
            "fg_bg.jpg": fg_bg,
            "mask.jpg": self._read_checked("mask", pair.mask.name),
            "depth.jpg": self._read_checked("depth", pair.depth.name),
        }
        names = {"fg_bg": pair.fg_bg.name, "bg": bg.name}
        names.update(mask=pair.mask.name, depth=pair.depth.name)
        return fields, names

    def _read_checked(self, kind: str, name: str) -> bytes:
        try:
            data = self.reader.read(name)
        except READ_ERRORS as exc:
            raise SkipSample(f"{kind} member {name}: cannot read it ({exc})") from None
        try:
            info = check_jpeg(data)
        except JpegError as exc:
            raise SkipSample(f"{kind} member {name}: {exc}") from None
        self._check_info(kind, name, info)
        return data

    def _check_info(self, kind: str, name: str, info: JpegInfo) -> None:
        if (info.width, info.height) != SIZES[kind]:
            want = "x".join(map(str, SIZES[kind]))
            raise SkipSample(f"{kind} member {name}: {info.width}x{info.height}, expected {want}")
        if info.components not in MODE_OF:
            raise SkipSample(f"{kind} member {name}: {info.components} colour components")
        if kind in ("mask", "depth"):
            return  # read as single-channel whatever their mode
        if self.mode is None:
            self.mode = MODE_OF[info.components]  # the zip's mode: its first good fg_bg's
        if info.components != CHANNELS[self.mode]:
            raise self._mode_error(kind, name, info.components)

    def _mode_error(self, kind: str, name: str, components: int) -> Exception:
        if kind == "fg_bg" and self.written == 0 and self.job.expected_mode:
            # The first image already differs from the output's: the whole zip is of another mode.
            return ConvertError(
                f"{self.job.path}: its images have {components} colour components but "
                f"{self.job.out} holds {self.job.expected_mode} images; "
                "convert it into another folder"
            )
        want = CHANNELS[self.mode]
        return SkipSample(f"{kind} member {name}: {components} colour components, expected {want}")

    def _record(self, infos: list[zipfile.ZipInfo], shards: list[dict]) -> dict:
        job = self.job
        return {
            "version": RECORD_VERSION,
            "zip": job.name,
            "batch": job.batch,
            "split": job.split,
            "mode": self.mode,
            "shard_samples": job.shard_samples,
            "seed": job.seed,
            "bytes": job.path.stat().st_size,
            "fingerprint": zip_fingerprint(job.path, infos),
            "samples": self.written,
            "shards": shards,
            "skipped": self.skipped,
        }


def convert_zip(job: ZipJob, report: Reporter | None = None) -> dict:
    """Convert one zip into shards (temp names renamed at the end); return its record."""
    with open_zip(job.path) as zf:
        return ZipConverter(job, zf, report).run()


# ---------------------------------------------------------------- records of finished zips


def record_path(out: Path, batch: int) -> Path:
    """Where the record of a converted batch lives."""
    return out / PARTS_DIR / f"batch{batch:02d}.json"


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


def record_problem(record: dict | str, out: Path, test_batches: Iterable[int]) -> str | None:
    """Why a record cannot be trusted as it stands (None if its shards are all there)."""
    if isinstance(record, str):
        return record
    if record.get("version") != RECORD_VERSION or RECORD_KEYS - set(record):
        return f"{record_path(out, record['batch'])}: not a record of this version of convert"
    split = "test" if record["batch"] in set(test_batches) else "train"
    if record["split"] != split:
        return f"{record['zip']} was converted into {record['split']}, now belongs to {split}"
    for shard in record["shards"]:
        path = out / shard["path"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            return f"{record['zip']}: shard {path} is missing or has changed size"
    return None


def is_reusable(record: dict | str | None, job: ZipJob, test_batches: Iterable[int]) -> bool:
    """True when a record shows this very zip already converted with these options."""
    if record is None or record_problem(record, job.out, test_batches) is not None:
        return False
    same = (record["shard_samples"], record["seed"]) == (job.shard_samples, job.seed)
    if not same or (job.strict and record["skipped"]):
        return False
    if record["bytes"] != job.path.stat().st_size:
        return False
    with open_zip(job.path) as zf:
        return record["fingerprint"] == zip_fingerprint(job.path, zf.infolist())


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
    _write_manifest(out, config, {job.batch for job in jobs}, summary)
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
        try:
            record = records.get(job.batch)
            reuse = not config.force and is_reusable(record, job, config.test_batches)
        except (ConvertError, OSError) as exc:
            _fail(summary, job, exc)
            continue
        if reuse:
            log.info("%s: already converted, shards unchanged: reused", job.name)
            summary.reused.append(job.name)
        else:
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


def _write_manifest(out: Path, config: ConvertConfig, given: set[int], summary) -> None:
    """Rebuild the manifest from every record in DIR/.parts (other runs' zips included)."""
    good, mode = [], None
    for batch, record in sorted(load_records(out).items()):
        problem = record_problem(record, out, config.test_batches)
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
