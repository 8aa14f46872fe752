"""Convert one zip: pair its members into samples (`store.pairing`), check them, write shards.

One process reads the central directory, pairs each fg_bg member with its bg, mask and depth
members, and writes the samples in a seeded random order into tar shards (see `store.tar`),
reading every member once. Memory holds the central directory, the backgrounds its samples use (the
~100 shared by all samples, up to `BG_BYTES_HELD`; past that one is read again for each sample on
it) and one sample, whatever the zip's size or holds. The shards are written under temp names and
renamed at the end; the result is the zip's record (see `store.catalog`). Many zips, the pool and
the manifest are `store.runner`'s.
"""

from __future__ import annotations

import logging
import random
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as quote_json
from pathlib import Path

from pipeline.images import ImageError, ImageInfo, check_image, decode_problem, image_format
from pipeline.schema import (
    CHANNELS,
    FORMAT_EXTS,
    META,
    MODE_OF,
    SIZES,
    TARGETS,
    member_ext,
)
from pipeline.store.catalog import make_record
from pipeline.store.names import Member, sample_key
from pipeline.store.pairing import Pairing, Pairings, pair_members, skip_entry
from pipeline.store.tar import ShardWriter
from pipeline.store.zipread import MemberReader, zip_fingerprint

log = logging.getLogger(__name__)

PROGRESS_EVERY = 200  # samples between progress messages: a queue put per sample would cost more
SAMPLE_JSON = '{"batch": %d, "fg_bg": %s, "bg": %s, "mask": %s, "depth": %s}'
READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError)
# Background bytes kept in memory for the samples to come. A published zip's ~100 backgrounds of
# 5-20 KB fit ~30 times over (each is read once); a zip of many big ones can't make convert hold
# more: the backgrounds past the budget are read again for each sample that uses them.
BG_BYTES_HELD = 64 << 20

Reporter = Callable[[str, int], None]  # ("total" | "done", count)
# A background a sample uses: its bytes (None: read again when needed), its frame header or why
# it is unusable, its field name.
_Background = tuple[bytes | None, ImageInfo | str, str]


class ConvertError(Exception):
    """A whole zip failed; the message names the zip and what is wrong."""


class SkipSample(Exception):
    """One sample cannot be converted; the message is the reason."""


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
    decode: bool = False  # decode every image too (--decode), not only check its headers

    @property
    def name(self) -> str:
        """The zip's file name, as the manifest and the skip reports give it."""
        return self.path.name


# ---------------------------------------------------------------- one zip


def open_zip(path: Path) -> MemberReader:
    """Open a zip for reading; ConvertError naming it if it is missing or not a zip."""
    try:
        return MemberReader(path)
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as exc:
        # zipfile lists an unusual zip (a damaged one, ...) and refuses it whole for one odd entry.
        raise ConvertError(f"{path}: cannot open it as a zip ({exc})") from None


def sample_json(batch: int, fg_bg: str, bg: str, mask: str, depth: str) -> bytes:
    """A sample's json field: the bytes json.dumps gives for {"batch", "fg_bg", "bg", ...}."""
    # A template with json's own string quoting: a third of json.dumps's cost, same bytes.
    names = map(quote_json, (fg_bg, bg, mask, depth))
    return (SAMPLE_JSON % (batch, *names)).encode()


class ZipConverter:
    """Converts one opened zip: checks each sample cheaply and writes it to shards."""

    def __init__(self, job: ZipJob, reader: MemberReader, report: Reporter | None) -> None:
        self.job, self.reader, self.report = job, reader, report
        self.mode = job.expected_mode
        self.skipped: list[dict] = []
        self.written = 0
        self._bgs: dict[int, _Background] = {}  # by background number
        self.bg_budget = BG_BYTES_HELD
        self.bg_bytes_held = 0  # background bytes in self._bgs, at most bg_budget
        self.bg_rereads = 0  # backgrounds read again (past the budget): none for a published zip
        self._accepted: dict[str, frozenset[ImageInfo]] = {}
        self.formats: Counter[str] = Counter()  # image members written, by extension
        self._decoded: set[int] = set()  # backgrounds decoded whole (--decode)

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
        used = {pair.sample.bg for pair in pairs}
        self._read_backgrounds(found, used)
        self._report_unused_backgrounds(found, used)
        self._decide_mode()
        random.Random(f"{self.job.seed}:{self.job.batch}").shuffle(pairs)
        writer = ShardWriter(self.job.out, self.job.split, self.job.batch, self.job.shard_samples)
        try:
            self._write_all(pairs, found.bgs, writer)
            shards = writer.finish()
        except BaseException:
            writer.abort()
            raise
        job = self.job
        return make_record(
            zip_path=job.path,
            batch=job.batch,
            split=job.split,
            mode=self.mode,
            shard_samples=job.shard_samples,
            seed=job.seed,
            fingerprint=zip_fingerprint(job.path, infos),
            samples=self.written,
            shards=shards,
            skipped=self.skipped,
            formats=dict(sorted(self.formats.items())),
            decoded=job.decode,
        )

    def _write_all(self, pairs: list[Pairing], bgs: dict[int, Member], writer: ShardWriter):
        self._accepted = self._accepted_infos()
        done = 0
        for pair in pairs:
            try:
                fields = self._read_sample(pair, bgs.get(pair.sample.bg))
            except SkipSample as exc:
                self.skipped.append(skip_entry(self.job.name, pair.fg_bg.name, str(exc)))
                self._strict_check()
            else:
                writer.write(sample_key(self.job.batch, pair.sample), fields)
                self.written += 1
                self.formats.update(name.rpartition(".")[2] for name in fields if name != META)
            done += 1
            if self.report and done % PROGRESS_EVERY == 0:
                self.report("done", PROGRESS_EVERY)
        if self.report and done % PROGRESS_EVERY:
            self.report("done", done % PROGRESS_EVERY)
        if not self.written:  # the skips go nowhere else: say why, with the first
            first = min(self.skipped[-done:], key=lambda skip: skip["member"])  # by name
            raise ConvertError(
                f"{self.job.path}: no sample could be converted (all {done} skipped; the "
                f"first, {first['member']}: {first['reason']})"
            )

    def _strict_check(self) -> None:
        if self.job.strict and self.skipped:
            first = self.skipped[0]
            raise ConvertError(
                f"{self.job.path}: --strict: sample {first['member']} skipped: {first['reason']}"
            )

    def _read_backgrounds(self, found: Pairings, used: set[int]) -> None:
        """Check each background a sample uses, once; keep the bytes of good ones (budgeted)."""
        for number, member in found.bgs.items():
            if number in used:
                self._bgs[number] = self._read_background(member, found.bg_problems.get(number))

    def _read_background(self, member: Member, problem: str | None) -> _Background:
        if problem:
            return None, problem, ""
        try:
            data = self.reader.read(member.name)
        except READ_ERRORS as exc:
            return None, f"bg member {member.name}: cannot read it ({exc})", ""
        try:
            found, info = check_image(data)
        except ImageError as exc:
            return None, f"bg member {member.name}: {exc}", ""  # the reason, not the bytes
        field = member_ext("bg", FORMAT_EXTS[found])
        if self.bg_bytes_held + len(data) > self.bg_budget:
            return None, info, field  # read again for each sample on it
        self.bg_bytes_held += len(data)
        return data, info, field

    def _report_unused_backgrounds(self, found: Pairings, used: set[int]) -> None:
        """A background no sample uses is not read, but one its entry refuses (a bomb, a twin, an
        odd name or version) is reported: the zip may not be what it seems."""
        for number, member in sorted(found.bgs.items()):
            if number in used:
                continue
            reason = found.bg_problems.get(number)
            if reason is None:
                try:
                    self.reader.check(member.name)
                except READ_ERRORS as exc:
                    reason = f"bg member {member.name}: cannot read it ({exc})"
            if reason:
                reason = f"{reason} (no sample uses it)"
                self.skipped.append(skip_entry(self.job.name, member.name, reason))
        self._strict_check()

    def _decide_mode(self) -> None:
        """The zip's mode (L or RGB): that of most of its backgrounds, so a stray image can't."""
        counts = Counter(
            MODE_OF[info.components]
            for _, info, _ in self._bgs.values()
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

    def _read_sample(self, pair: Pairing, bg: Member | None) -> dict[str, bytes]:
        """The sample's fields: four images (checked), each named by its format, and its json;
        SkipSample if unusable."""
        mask, depth = pair.mask, pair.depth
        if bg is None or mask is None or depth is None:
            missing = [k for k, m in (("bg", bg), ("mask", mask), ("depth", depth)) if not m]
            raise SkipSample(f"missing {' and '.join(missing)} member(s) for {pair.sample.stem()}")
        if pair.problem:
            raise SkipSample(pair.problem)
        bg_data, bg_info, bg_field = self._bgs[pair.sample.bg]
        if isinstance(bg_info, str):
            raise SkipSample(bg_info)
        if bg_data is None:  # past the budget: read again (its CRC checked again)
            bg_data = self._reread_background(bg.name)
        if bg_info not in self._accepted["bg"]:  # first: the mode comes from the backgrounds
            self._check_info("bg", bg.name, bg_info)
        if self.job.decode and pair.sample.bg not in self._decoded:
            self._decode("bg", bg.name, bg_data, bg_info, pair.sample.bg)
        images = [(bg_field, bg_data)] + [
            self._read_checked(kind, member.name)
            for kind, member in (("fg_bg", pair.fg_bg), ("mask", mask), ("depth", depth))
        ]
        meta = sample_json(self.job.batch, pair.fg_bg.name, bg.name, mask.name, depth.name)
        return {**dict(images), META: meta}

    def _reread_background(self, name: str) -> bytes:
        self.bg_rereads += 1
        try:
            return self.reader.read(name)
        except READ_ERRORS as exc:
            raise SkipSample(f"bg member {name}: cannot read it again ({exc})") from None

    def _read_checked(self, kind: str, name: str) -> tuple[str, bytes]:
        """(field name, bytes) of a checked member: `mask.png` for PNG bytes, whatever its name."""
        try:
            data = self.reader.read(name)
        except READ_ERRORS as exc:
            raise SkipSample(f"{kind} member {name}: cannot read it ({exc})") from None
        try:
            found, info = check_image(data)
        except ImageError as exc:
            raise SkipSample(f"{kind} member {name}: {exc}") from None
        if info not in self._accepted[kind]:
            self._check_info(kind, name, info)
        if self.job.decode:
            self._decode(kind, name, data, info)
        return member_ext(kind, FORMAT_EXTS[found]), data

    def _decode(
        self, kind: str, name: str, data: bytes, info: ImageInfo, bg: int | None = None
    ) -> None:
        """--decode: SkipSample unless the image decodes whole (a background once: its
        failure then skips every sample on it, without decoding it again)."""
        problem = decode_problem(data, image_format(data), info.components)
        if problem is not None:
            reason = f"{kind} member {name}: {problem}"
            if bg is not None:
                self._bgs[bg] = None, reason, ""
            raise SkipSample(reason)
        if bg is not None:
            self._decoded.add(bg)

    def _accepted_infos(self) -> dict[str, frozenset[ImageInfo]]:
        """Per kind, the frame headers `_check_info` accepts (a set lookup is cheaper)."""
        accepted = {}
        for kind, (width, height) in SIZES.items():
            if kind in TARGETS:
                channels = set(MODE_OF)
            else:  # no mode (no usable background): every sample is skipped before this check
                channels = {CHANNELS[self.mode]} if self.mode else set()
            accepted[kind] = frozenset(ImageInfo(width, height, c) for c in channels)
        return accepted

    def _check_info(self, kind: str, name: str, info: ImageInfo) -> None:
        if (info.width, info.height) != SIZES[kind]:
            want = "x".join(map(str, SIZES[kind]))
            raise SkipSample(f"{kind} member {name}: {info.width}x{info.height}, expected {want}")
        if info.components not in MODE_OF:
            raise SkipSample(f"{kind} member {name}: {info.components} colour components")
        if kind in TARGETS:
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
