"""`verify`: prove a shard folder matches its manifest, reading it the way the loader does.

Per shard (in parallel processes): the file exists, its size and sha256 match (hashed while the
tar streams through the tar reader the training loader uses, `store.tarread`), every sample has its
four images (each a JPEG or a PNG, as its extension says) and its json, every image's header
declares its expected size (checked before decoding) and the image decodes, and the sample count
matches. Then across shards: keys are unique over all shards and both splits, and the split
totals match.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.images import ImageError, check_field, decoder_for
from pipeline.schema import (
    FIELDS,
    IMAGE_EXTS,
    INPUTS,
    META,
    SPLITS,
    check_shard_path,
    field_names,
    load_manifest,
    parse_json,
    read_json_file,
    shard_entries,
    split_shards,
    wids_index,
    wids_index_name,
)
from pipeline.store.tarread import REFUSED, OddMembers, read_samples

READ_CHUNK = 1 << 20


@dataclass
class VerifyReport:
    """What verify found; `ok` only when there is no problem."""

    root: Path
    shards: int = 0
    samples: int = 0
    problems: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def to_dict(self) -> dict:
        """The JSON report (`verify --json`)."""
        return {
            "ok": self.ok,
            "shards": self.shards,
            "samples": self.samples,
            "problems": self.problems,
            "seconds": round(self.seconds, 3),
        }

    def problem_lines(self) -> list[str]:
        """One human line per problem: shard, sample (where known), what is wrong."""
        lines = []
        for p in self.problems:
            where = [str(part) for part in (p["shard"], p["sample"]) if part]
            lines.append(f"{': '.join(where) or self.root}: {p['problem']}")
        if any(p["sample"] and UNDECODABLE in p["problem"] for p in self.problems):
            lines.append(
                f"{self.root}: to skip samples whose images do not decode, convert their zips "
                f"into it again with --decode (pipeline convert ZIP... --out {self.root} --decode)"
            )
        return lines

    def summary_line(self) -> str:
        """One line: ok or how many problems, over how many shards and samples."""
        status = "ok" if self.ok else f"FAILED: {len(self.problems)} problem(s)"
        return (
            f"verify {status}: {self.shards} shards, {self.samples} samples in {self.root} "
            f"({self.seconds:.1f} s)"
        )


def problem(shard: str | None, sample: str | None, text: str) -> dict:
    """A problem as reported: the shard's path (relative), the sample key, what is wrong."""
    return {"shard": shard, "sample": sample, "problem": text}


class _HashingReader:
    """A read-only file that hashes and counts what is read from it."""

    def __init__(self, file) -> None:
        self._file = file
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        """Read up to `n` bytes (all if -1), hashing them."""
        data = self._file.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read (and hash) whatever the tar reader left unread, e.g. the end-of-archive blocks."""
        while self.read(READ_CHUNK):
            pass


UNDECODABLE = "undecodable image"  # a problem that convert --decode turns into a skip
MOVED = "give a --test-batches that"  # a failed zip's own remedy (store.finish): no other


@dataclass
class ShardCheck:
    """One shard's outcome: samples read, their keys, problems."""

    path: str
    split: str
    samples: int = 0
    keys: list[str] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)


def check_image(name: str, data: bytes, size: list[int], channels: int | None) -> str | None:
    """Check one JPEG or PNG's header, then decode it (as its name says); the problem, or None.

    `channels` None: any count will do, decoded as one channel as the loader reads masks and
    depths. Each format is decoded with the loader's decoder, and only once its header's size
    and channels are right: a small PNG may declare 30000x30000.
    """
    try:
        width, height, found = check_field(name, data)
    except ImageError as exc:
        return f"{name}: {UNDECODABLE} ({exc})"
    if [width, height] != list(size):
        return f"{name}: {width}x{height}, expected {size[0]}x{size[1]}"
    if channels is not None and found != channels:
        return f"{name}: {found} channel(s), the manifest's mode has {channels}"
    try:
        decoder_for(name)(data, channels or 1)
    except ValueError as exc:
        return f"{name}: {UNDECODABLE} ({exc})"
    return None


def check_sample(sample: dict, manifest: dict, batch: int | None) -> list[str]:
    """Every problem of one sample as the loader reads it (missing fields, bad images, bad json)."""
    fields = {k for k in sample if not k.startswith("__")}
    problems = [sample[REFUSED]] if REFUSED in sample else []
    present = {kind: [n for n in field_names(kind) if n in fields] for kind in FIELDS}
    missing = [f"{kind}.{'|'.join(IMAGE_EXTS)}" for kind, names in present.items() if not names]
    missing += [META] if META not in fields else []
    allowed = {META}.union(*map(field_names, FIELDS))
    extra = fields - allowed
    extra |= {n for names in present.values() if len(names) > 1 for n in names}  # jpg and png
    if missing or extra:
        problems.append(f"fields missing {sorted(missing)}, unexpected {sorted(extra)}")
    for kind, names in present.items():
        if len(names) == 1:
            channels = manifest["channels"] if kind in INPUTS else None
            ext = names[0]
            found = check_image(ext, sample[ext], manifest["sizes"][kind], channels)
            problems.extend([found] if found else [])
    if META in sample:
        try:
            meta = parse_json(sample[META])
            if batch is not None and meta["batch"] != batch:
                problems.append(f"json: batch {meta['batch']}, the shard's is {batch}")
        except (ValueError, TypeError, KeyError) as exc:
            problems.append(f"json: not the provenance record ({exc!r})")
    return problems


def verify_shard(root: Path, split: str, entry: dict, manifest: dict) -> ShardCheck:
    """Check one shard against its manifest entry: file, size, sha256, samples, count."""
    rel = check_shard_path(split, entry["path"])  # never a file outside the folder
    result = ShardCheck(rel, split)
    path = Path(root) / rel
    if not path.is_file():  # a FIFO or a device is never opened: it could block or never end
        text = "not a regular file" if path.exists() else "shard file is missing"
        result.problems.append(problem(rel, None, text))
        return result
    size = path.stat().st_size
    if size != entry["bytes"]:
        result.problems.append(problem(rel, None, f"{size} bytes, manifest says {entry['bytes']}"))
    with open(path, "rb") as file:
        reader = _HashingReader(file)
        _read_samples(reader, result, manifest, entry.get("batch"))
        reader.drain()
    if reader.sha.hexdigest() != entry["sha256"]:
        result.problems.append(problem(rel, None, "sha256 differs from the manifest's (changed)"))
    if result.samples != entry["samples"]:
        text = f"holds {result.samples} readable samples, manifest says {entry['samples']}"
        result.problems.append(problem(rel, None, text))
    return result


def _read_samples(reader: _HashingReader, result: ShardCheck, manifest: dict, batch) -> None:
    key = None
    odd = OddMembers()
    try:
        for sample in read_samples(reader, result.path, odd):
            key = sample["__key__"]
            result.samples += 1
            result.keys.append(key)
            for text in check_sample(sample, manifest, batch):
                result.problems.append(problem(result.path, key, text))
    except (ValueError, UnicodeDecodeError) as exc:  # what the tar reader raises on damage
        after = f" after sample {key}" if key else ""
        text = f"truncated or corrupt tar{after}: {exc}"
        result.problems.append(problem(result.path, None, text))
    for line in odd.lines:  # the readers skip them, and convert never writes one
        result.problems.append(problem(result.path, None, f"member {line}, not a sample's file"))
    if odd.more:
        text = f"{odd.more} more members that are no sample's file"
        result.problems.append(problem(result.path, None, text))


def _verify_task(args: tuple) -> ShardCheck:
    return verify_shard(*args)


def cross_checks(manifest: dict, checks: list[ShardCheck]) -> list[dict]:
    """Problems across shards: duplicate keys (within or across splits), split totals."""
    problems = []
    seen: dict[str, ShardCheck] = {}
    for check in checks:
        for key in check.keys:
            first = seen.get(key)
            if first is None:
                seen[key] = check
                continue
            where = "twice in this shard" if first is check else f"also in {first.path}"
            problems.append(problem(check.path, key, f"duplicate key ({where}, {first.split})"))
    for split in SPLITS:
        listed = sum(s["samples"] for s in manifest["splits"][split]["shards"])
        total = manifest["splits"][split]["samples"]
        if listed != total:
            text = f"{split}: manifest says {total} samples, its shards list {listed}"
            problems.append(problem(None, None, text))
    return problems


def check_wids_indexes(root: Path, manifest: dict) -> list[dict]:
    """Problems with each split's wids index: missing, or not listing the manifest's shards."""
    problems = []
    for split in SPLITS:
        if not split_shards(manifest, split):
            continue
        name = wids_index_name(split)
        try:
            found = read_json_file(root / name)
        except FileNotFoundError:
            problems.append(problem(None, None, f"{name} is missing (re-run convert to write it)"))
            continue
        except (OSError, ValueError) as exc:
            problems.append(problem(None, None, f"{name}: unreadable ({exc})"))
            continue
        if found != wids_index(manifest, split):
            problems.append(
                problem(None, None, f"{name} does not list the manifest's {split} shards")
            )
    return problems


def failed_zips(manifest: dict) -> list[dict]:
    """A zip that a convert could not finish makes the folder incomplete, whatever its shards."""
    found = []
    for failed in manifest.get("failed", []):
        text = f"{failed['zip']} was not converted ({failed['error']})"
        if MOVED not in failed["error"]:  # else its error says what to do
            text += "; convert it again, or convert with --forget-failed to go on without it"
        found.append(problem(None, None, text))
    return found


def verify_shards(shards: Path, workers: int = 2, progress: bool = True) -> VerifyReport:
    """Verify every shard of a conversion against its manifest; ValueError if none there."""
    start = time.perf_counter()
    root = Path(shards)
    manifest = load_manifest(root)
    entries = shard_entries(manifest)
    report = VerifyReport(root, shards=len(entries))
    spec = {"channels": manifest["channels"], "sizes": manifest["sizes"]}  # what workers need
    tasks = [(root, split, entry, spec) for split, entry in entries]
    checks = []
    with ExitStack() as stack:
        results = _start(tasks, workers, stack)
        show = progress and sys.stderr.isatty()
        bar = stack.enter_context(tqdm(total=len(tasks), unit="shard", disable=not show))
        for check in results:
            checks.append(check)
            report.samples += check.samples
            report.problems.extend(check.problems)
            bar.update(1)
    report.problems.extend(cross_checks(manifest, checks))
    report.problems.extend(check_wids_indexes(root, manifest))

    report.problems.extend(failed_zips(manifest))
    report.seconds = time.perf_counter() - start
    return report


def _start(tasks: list[tuple], workers: int, stack: ExitStack) -> Iterator[ShardCheck]:
    """Start checking shards (in a pool when workers > 1); results come in manifest order."""
    if workers == 1 or len(tasks) <= 1:
        return map(_verify_task, tasks)
    pool = stack.enter_context(ProcessPoolExecutor(min(workers, len(tasks))))
    # map() submits every task now, so workers fork before tqdm starts its monitor thread.
    return pool.map(_verify_task, tasks)
