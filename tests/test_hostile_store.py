"""Hostile and unlucky inputs on the store side (issue 9): a manifest is data, memory is bounded,
a failed, killed or concurrent convert never looks finished, files get the shards' permissions."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import STUB, build_zip, wrap_zip, zip64_members
from test_guard import error_line

from pipeline.cli import cli
from pipeline.schema import MAX_MEMBER_BYTES, SAMPLE_MIN_BYTES, validate_manifest
from pipeline.store import convert as convert_module
from pipeline.store import tar as tar_module
from pipeline.store.catalog import failure_path
from pipeline.store.convert import ZipConverter, ZipJob, open_zip
from pipeline.store.guard import locked
from pipeline.store.names import shown_name
from pipeline.store.runner import ConvertConfig, convert_zips
from pipeline.store.tarread import read_samples
from pipeline.store.verify import verify_shards
from pipeline.store.zipdir import read_central_directory
from pipeline.store.zipread import MemberReader, MemberRefused

PWN = "pipe:id > pwned.txt; cat train/batch01-000000.tar"


def convert(zips, out: Path, **options):
    options.setdefault("progress", False)
    return convert_zips([Path(z) for z in zips], ConvertConfig(out=out, **options))


def verify(out: Path):
    return verify_shards(out, workers=1, progress=False)


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def edit_manifest(out: Path, change) -> None:
    manifest = manifest_of(out)
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


def first_train_shard(manifest: dict) -> dict:
    return manifest["splits"]["train"]["shards"][0]


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """A finished conversion: batch 1 (train, 2 shards) and batch 10 (test)."""
    zips = [build_zip(tmp_path / "batch1_images.zip", 4).path]
    zips.append(build_zip(tmp_path / "batch10_images.zip", 2, seed=3).path)
    out = tmp_path / "shards"
    assert convert(zips, out, shard_samples=2).ok
    return out


# ---------------------------------------------------------------- 1. a manifest is data

# Every command that reads a shard folder's manifest, run inside that folder.
MANIFEST_READERS = [
    ["verify", "."],
    ["train", "--shards", ".", "--out", "run", "--device", "cpu", "--steps-per-epoch", "1"],
    ["evaluate", "model.pt", "--shards", ".", "--device", "cpu"],
]


def test_a_manifest_path_cannot_run_a_command(shards: Path, monkeypatch):
    edit_manifest(shards, lambda m: first_train_shard(m).update(path=PWN))
    monkeypatch.chdir(shards)
    runner = CliRunner()
    for args in MANIFEST_READERS:
        result = runner.invoke(cli, args)
        assert result.exit_code == 1, (args, result.output)
        assert isinstance(result.exception, SystemExit)  # a message, not a traceback
        (line,) = result.stderr.strip().splitlines()[-1:]
        assert line.startswith("error: manifest.json: splits.train.shards[0]: shard path")
        assert repr(PWN) in line and "train/NAME.tar" in line
    assert not (shards / "pwned.txt").exists()
    assert not Path("run").exists()


def test_a_manifest_read_over_a_url_is_checked_too(shards: Path, monkeypatch):
    from pipeline.train.sources import open_manifest, shard_urls

    edit_manifest(shards, lambda m: first_train_shard(m).update(path=PWN))
    monkeypatch.chdir(shards)
    with pytest.raises(ValueError, match="shard path 'pipe:id"):
        open_manifest(f"file://{shards}")
    # shard_urls checks each path again, even for a manifest that skipped validation.
    with pytest.raises(ValueError, match="shard path 'pipe:id"):
        shard_urls("pipe:cat", manifest_of(shards), "train")
    assert not (shards / "pwned.txt").exists()


@pytest.mark.parametrize(
    "path",
    [
        "../outside.tar",
        "/etc/hostname",
        "train/../../outside.tar",
        "train/sub/x.tar",
        "test/batch01-000000.tar",  # another split's folder
        "train/.hidden.tar",
        "train/x.tar; rm -rf ~",
        "https://host/x.tar",
        "train/x.zip",
    ],
)
def test_verify_refuses_a_path_outside_the_folder(shards: Path, path: str):
    outside = shards.parent / "outside.tar"
    outside.write_bytes(b"\0" * 1234)
    edit_manifest(shards, lambda m: first_train_shard(m).update(path=path))
    with pytest.raises(ValueError, match="is not of the form train/NAME.tar") as info:
        verify(shards)
    assert repr(path) in str(info.value) and "1234" not in str(info.value)


@pytest.mark.parametrize(
    ("change", "fault"),
    [
        (lambda m: m["splits"].update(train="abc"), "splits.train must be an object"),
        (lambda m: first_train_shard(m).update(samples="2"), "samples must be a count"),
        (lambda m: first_train_shard(m).update(path=None), "shard path None"),
        (lambda m: first_train_shard(m).update(bytes=-1), "bytes must be a count"),
        (lambda m: first_train_shard(m).update(sha256=7), "sha256 must be 64 hex digits"),
        (lambda m: m["splits"]["train"].update(samples=None), "splits.train.samples must be"),
        (lambda m: m["splits"]["train"]["shards"].append("x"), "a shard entry must be an object"),
        (lambda m: m["sizes"].pop("fg_bg"), "sizes.fg_bg must be [width, height]"),
        (lambda m: m.update(mode=["L"]), "unknown image mode"),
        (lambda m: m.update(channels=True), "'channels' is True"),
        (lambda m: m.update(failed="none"), "'failed' must be a list"),
        (
            lambda m: m["sizes"].update(bg=[400000, 400000]),
            "sizes.bg is [400000, 400000]: bg images are 160x160",
        ),
        (
            lambda m: m["splits"]["train"]["shards"].append(first_train_shard(m)),
            "splits.train.shards[2]: train/batch01-000000.tar is listed twice",
        ),
    ],
)
def test_a_manifest_of_wrong_types_is_one_line_naming_the_fault(shards: Path, change, fault):
    edit_manifest(shards, change)
    result = CliRunner().invoke(cli, ["verify", str(shards)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {shards / 'manifest.json'}: ") and fault in line


def test_validate_manifest_accepts_what_convert_writes(shards: Path):
    validate_manifest(manifest_of(shards), "m.json")  # the new strictness fits our own output


def test_verify_json_reports_a_missing_manifest(shards: Path):
    (shards / "manifest.json").unlink()
    result = CliRunner().invoke(cli, ["verify", str(shards), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["shards"] == 0
    assert "not a finished conversion" in report["problems"][0]["problem"]


DEEP = "[" * 200000 + "]" * 200000  # json recurses once per level: a RecursionError


def test_a_deeply_nested_manifest_is_one_line_for_every_reader(shards: Path, monkeypatch):
    from pipeline.train.sources import open_manifest

    (shards / "manifest.json").write_text(DEEP)
    monkeypatch.chdir(shards)
    runner = CliRunner()
    for args in MANIFEST_READERS:
        result = runner.invoke(cli, args)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), args
        (line,) = result.stderr.strip().splitlines()
        assert line == "error: manifest.json: not valid JSON (nested too deeply)", args
    result = runner.invoke(cli, ["verify", ".", "--json"])
    assert result.exit_code == 1
    (found,) = json.loads(result.stdout)["problems"]
    assert found["problem"] == "manifest.json: not valid JSON (nested too deeply)"
    with pytest.raises(ValueError, match="manifest.json: cannot read the manifest .not valid JSON"):
        open_manifest(f"file://{shards}")  # a manifest over a URL


def test_deeply_nested_records_and_sample_json_are_problems_not_crashes(shards: Path):
    from pipeline.store.catalog import load_failures, load_records
    from pipeline.store.verify import check_sample

    records = shards / ".parts"
    (records / "batch01.json").write_text(DEEP)
    (records / "failed-batch10.json").write_text(DEEP)
    assert load_records(shards)[1] == (
        f"{records / 'batch01.json'}: unreadable record (not valid JSON (nested too deeply))"
    )
    assert "unreadable (not valid JSON (nested too deeply))" in load_failures(shards)[10]["error"]
    path = shards / first_train_shard(manifest_of(shards))["path"]
    with open(path, "rb") as f:
        sample = next(iter(read_samples(f, str(path))))
    (problem,) = check_sample({**sample, "json": DEEP.encode()}, manifest_of(shards), 1)
    assert problem.startswith("json: not the provenance record") and "nested too deeply" in problem


def edit_record(out: Path, batch: int, change) -> None:
    path = out / ".parts" / f"batch{batch:02d}.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps(change(record)))


def _with(record: dict, **fields) -> dict:
    return {**record, **fields}


def _shard_path(record: dict, path: str) -> dict:
    record["shards"][0]["path"] = path
    return record


@pytest.mark.parametrize(
    ("change", "fault"),
    [
        (lambda r: _with(r, shards=5), "shards must be list, got 5"),
        (lambda r: _with(r, batch="1"), "batch must be int, got '1'"),
        (lambda r: _with(r, batch=True), "batch must be int, got True"),
        (lambda r: _with(r, split="valid"), "split 'valid'"),
        (lambda r: _with(r, samples=10**30), "is not the sum of its shards' samples"),
        (lambda r: _with(r, skipped=[1]), "skipped must be a list of"),
        (lambda r: _with(r, formats={"jpg": "1"}), "formats must count jpg and png members"),
        (lambda r: _shard_path(r, "../outside.tar"), "shard path '../outside.tar' is not"),
        (lambda r: _shard_path(r, "/etc/hostname"), "shard path '/etc/hostname' is not"),
        (lambda r: _shard_path(r, "test/batch10-000000.tar"), "is not of the form train/"),
        (lambda r: [r], "not an object: list"),
    ],
)
def test_a_damaged_record_is_a_record_problem_and_its_zip_is_redone(
    shards: Path, change, fault, caplog
):
    edit_record(shards, 1, change)
    z1, z10 = shards.parent / "batch1_images.zip", shards.parent / "batch10_images.zip"
    # Batch 1 not given: its record is reported, not used (and no traceback).
    summary = convert([z10], shards, shard_samples=2)
    (failed,) = summary.failed
    assert failed["zip"] == "batch 1" and "batch01.json: damaged record (" in failed["error"]
    assert fault in failed["error"]
    assert [s["batch"] for s in manifest_of(shards)["sources"]] == [10]
    # Given again, its zip is converted again.
    with caplog.at_level("INFO", logger="pipeline.store.runner"):
        again = convert([z1, z10], shards, shard_samples=2)
    assert again.ok and again.converted == ["batch1_images.zip"]
    assert "damaged record" in caplog.text and "converting it again" in caplog.text
    assert verify(shards).ok


def test_a_record_never_makes_convert_read_outside_the_folder(shards: Path, monkeypatch):
    import pipeline.store.catalog as catalog

    record = json.loads((shards / ".parts" / "batch01.json").read_text())
    outside = shards.parent / "outside.tar"
    outside.write_bytes(bytes(record["shards"][0]["bytes"]))  # the size the record says
    edit_record(shards, 1, lambda r: _shard_path(r, "../outside.tar"))
    hashed = []
    real = catalog.file_sha256
    monkeypatch.setattr(catalog, "file_sha256", lambda path: hashed.append(path) or real(path))
    convert([shards.parent / "batch10_images.zip"], shards, shard_samples=2)
    assert hashed and all(shards in Path(p).resolve().parents for p in hashed)
    assert outside not in [Path(p).resolve() for p in hashed]


def test_a_failure_record_of_an_odd_name_is_named_and_still_counts(shards: Path):
    odd = shards / ".parts" / "failed-batchXX.json"
    odd.write_text("{}")
    summary = convert([shards.parent / "batch10_images.zip"], shards, shard_samples=2)
    assert summary.ok  # its own zips converted
    (failed,) = manifest_of(shards)["failed"]
    assert failed["zip"] == "failed-batchXX.json"
    assert f"{odd}: unreadable (not a name convert writes" in failed["error"]
    assert not verify(shards).ok
    convert([shards.parent / "batch10_images.zip"], shards, shard_samples=2, forget_failed=True)
    assert not odd.exists() and verify(shards).ok


@pytest.mark.parametrize("digits", [90, 5000])
def test_a_sample_named_with_huge_numbers_is_skipped_not_fatal(tmp_path: Path, digits: int):
    z = build_zip(tmp_path / "batch1_images.zip", 3)
    first = next(iter(z.samples.values()))
    huge = f"{'9' * digits}_1_0_1"  # 90 digits: a key over the tar name field; 5000: over int's
    names = {
        "fg_bg": f"fg_bg_jpg/fg_bg_{huge}.jpg",
        "mask": f"mask_black_jpg/bg_mask_{huge}.jpg",
        "depth": f"depth_fg_bg_jpg/depth_fg_bg_{huge}.jpg",
        "bg": f"bg_jpg/bg_img_{'9' * digits}.jpg",
    }
    with zipfile.ZipFile(z.path, "a") as zf:
        for kind, name in names.items():
            zf.writestr(name, z.members[first[kind]])
        zf.writestr(f"top/{names['fg_bg']}", z.members[first["fg_bg"]])  # in a top folder too
    out = tmp_path / "shards"
    summary = convert([z.path], out)
    assert summary.ok and summary.samples["train"] == 3
    reasons = {s["member"]: s["reason"] for s in manifest_of(out)["skipped"]}
    assert set(reasons) == {names["fg_bg"], f"top/{names['fg_bg']}"}  # every sample accounted for
    assert all("a number in its name has over 9 digits" in r for r in reasons.values())
    assert verify(out).ok


def test_the_longest_key_fits_a_tar_name_field():
    from pipeline.store.names import MAX_DIGITS, SampleId, batch_number, classify, sample_key
    from pipeline.store.tar import NAME_FIELD

    top = "9" * MAX_DIGITS
    member = classify(f"fg_bg_jpg/fg_bg_{top}_{top}_1_{top}.jpg")
    assert member is not None and member.sample == SampleId(int(top), int(top), 1, int(top))
    assert classify(f"fg_bg_jpg/fg_bg_1{top}_1_1_1.jpg") is None
    longest = f"{sample_key(int(top), member.sample)}.fg_bg.jpg"  # a 9-digit batch too
    assert len(longest) <= NAME_FIELD
    assert batch_number(f"batch{top}_images.zip") == int(top)
    with pytest.raises(ValueError, match="batch1" + top + "_images.zip: a batch number of over 9"):
        batch_number(f"batch1{top}_images.zip")


# ---------------------------------------------------------------- 2. bounded memory


def add_member(path: Path, name: str, size: int) -> None:
    """Append a member of `size` zero bytes, written in chunks (never held whole)."""
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open(name, "w") as member:
            left = size
            while left > 0:
                member.write(bytes(min(left, 1 << 20)))
                left -= 1 << 20


def patch_headers(path: Path, name: str, fmt: str, local: int, central: int, value: int) -> None:
    """Write `value` into one member's local header (at `local`) and its directory entry (at
    `central`), as struct format `fmt`: make the zip lie about that member."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        offset = zf.getinfo(name).header_offset
    struct.pack_into(fmt, data, offset + local, value)
    entry = data.rfind(b"PK\x01\x02", 0, data.rindex(name.encode()))
    struct.pack_into(fmt, data, entry + central, value)
    path.write_bytes(bytes(data))


def declare_size(path: Path, name: str, size: int) -> None:
    """Make a member's headers (local and central) lie about its uncompressed size."""
    patch_headers(path, name, "<L", 22, 24, size)


def peak_of(read) -> int:
    """Peak bytes Python allocated while `read()` ran (it is expected to raise MemberRefused)."""
    tracemalloc.start()
    try:
        with pytest.raises(MemberRefused) as info:
            read()
        return tracemalloc.get_traced_memory()[1], str(info.value)
    finally:
        tracemalloc.stop()


def test_a_deflate_bomb_is_refused_without_inflating_it(tmp_path: Path):
    path = build_zip(tmp_path / "batch1_images.zip", 2).path
    bomb = 16 << 20  # 16 MiB of zeros: 16 KB in the zip
    add_member(path, "fg_bg_jpg/honest_bomb.jpg", bomb)
    add_member(path, "fg_bg_jpg/lying_bomb.jpg", bomb)
    declare_size(path, "fg_bg_jpg/lying_bomb.jpg", 9000)
    with MemberReader(path) as reader:
        peak, reason = peak_of(lambda: reader.read("fg_bg_jpg/honest_bomb.jpg"))
        assert f"declares {bomb} bytes, over the {MAX_MEMBER_BYTES}" in reason
        assert peak < 1 << 20  # refused from its header: nothing read
        peak, reason = peak_of(lambda: reader.read("fg_bg_jpg/lying_bomb.jpg"))
        assert "inflates past the 9000 bytes its header declares" in reason
        assert peak < 1 << 20  # the inflate stopped at 9,001 bytes


@pytest.mark.parametrize(
    "method, kind", [(zipfile.ZIP_BZIP2, "bzip2"), (zipfile.ZIP_LZMA, "lzma"), (99, "unknown")]
)
def test_other_compression_methods_are_refused_unread(tmp_path: Path, method: int, kind: str):
    path = build_zip(tmp_path / "batch1_images.zip", 2).path
    name = "fg_bg_jpg/other_bomb.jpg"
    known = method in zipfile.compressor_names
    with zipfile.ZipFile(path, "a", compression=method if known else zipfile.ZIP_STORED) as zf:
        zf.writestr(name, bytes(16 << 20))  # 16 MiB of zeros: a few KB compressed
    declare_size(path, name, 3000)  # a header that lies, as a bomb's does
    if not known:
        set_method(path, name, method)
    with MemberReader(path) as reader:
        peak, reason = peak_of(lambda: reader.read(name))
    assert f"compression method {method} ({kind}) is not read" in reason
    assert peak < 1 << 20  # refused from its header: nothing inflated


def set_method(path: Path, name: str, method: int) -> None:
    """Set one member's compression method in its local header and its directory entry."""
    patch_headers(path, name, "<H", 8, 10, method)


def test_a_bzip2_member_skips_its_sample_with_the_method_named(tmp_path: Path):
    z = build_zip(tmp_path / "batch1_images.zip", 4)
    mask = list(z.samples.values())[1]["mask"]
    with zipfile.ZipFile(z.path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    with zipfile.ZipFile(z.path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data, zipfile.ZIP_BZIP2 if name == mask else None)
    out = tmp_path / "shards"
    summary = convert([z.path], out)
    assert summary.ok and summary.samples["train"] == 3
    (skip,) = manifest_of(out)["skipped"]
    assert skip["member"] == list(z.samples.values())[1]["fg_bg"]
    assert "compression method 12 (bzip2) is not read" in skip["reason"]


def test_convert_skips_bombs_with_their_reason_and_converts_the_rest(tmp_path: Path):
    z = build_zip(tmp_path / "batch1_images.zip", 4)
    sample = next(iter(z.samples.values()))
    fg_bg = sample["fg_bg"]
    with zipfile.ZipFile(z.path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members.pop(fg_bg)
    with zipfile.ZipFile(z.path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    add_member(z.path, fg_bg, 8 << 20)  # one sample's fg_bg inflates to 8 MiB
    add_member(z.path, "bg_jpg/bg_img_77.jpg", 8 << 20)  # a background no sample uses
    out = tmp_path / "shards"
    summary = convert([z.path], out)
    assert summary.ok and summary.samples["train"] == 3
    reasons = {s["member"]: s["reason"] for s in manifest_of(out)["skipped"]}
    assert "declares 8388608 bytes" in reasons[fg_bg]
    assert "declares 8388608 bytes" in reasons["bg_jpg/bg_img_77.jpg"]
    assert "no sample uses it" in reasons["bg_jpg/bg_img_77.jpg"]
    assert verify(out).ok


JUNK_JPEG = b"\xff\xd8" + bytes((4 << 20) - 4) + b"\xff\xd9"  # 4 MiB, JPEG ends, no frame


def convert_here(path: Path, out: Path) -> tuple[ZipConverter, dict]:
    """Convert one zip in this process; the converter too, for its counts."""
    job = ZipJob(path, 1, "train", out, shard_samples=100, seed=0, strict=False)
    with open_zip(path) as reader:
        converter = ZipConverter(job, reader, None)
        return converter, converter.run()


def test_many_big_unused_or_broken_backgrounds_cost_no_memory(tmp_path: Path):
    # A zip bomb by count: 24 backgrounds no sample uses and one that two samples use, each
    # 4 MiB (the most one member may have; 4 KB in the zip) and no image. Held, they were 100 MiB.
    z = build_zip(tmp_path / "batch1_images.zip", 6)  # samples 1 and 4 use background 2
    names = list(z.samples.values())
    with zipfile.ZipFile(z.path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members[names[1]["bg"]] = JUNK_JPEG
    with zipfile.ZipFile(z.path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for i in range(24):
            zf.writestr(f"bg_jpg/bg_img_{1000 + i}.jpg", JUNK_JPEG)
    assert z.path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        converter, record = convert_here(z.path, tmp_path / "shards")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # one 4 MiB member read at a time, never all of them
    good = sum(len(members[n["bg"]]) for n in names if n["bg"] != names[1]["bg"]) // 2
    assert converter.bg_bytes_held == good and converter.bg_rereads == 0
    # Every sample is in a shard or the skip report; the unused backgrounds are not samples.
    assert record["samples"] == 4
    skipped = {s["member"]: s["reason"] for s in record["skipped"]}
    assert sorted(skipped) == sorted(names[i]["fg_bg"] for i in (1, 4))
    assert all(r.startswith(f"bg member {names[1]['bg']}: ") for r in skipped.values())


def test_backgrounds_past_the_budget_are_read_again_with_the_same_bytes(tmp_path, monkeypatch):
    z = build_zip(tmp_path / "batch1_images.zip", 9)  # 3 backgrounds, 3 samples each
    converter, _ = convert_here(z.path, tmp_path / "all")
    assert converter.bg_rereads == 0  # a published zip's backgrounds are all held: read once
    bg_sizes = {len(z.members[n["bg"]]) for n in z.samples.values()}
    assert converter.bg_bytes_held == sum(sorted(bg_sizes))
    monkeypatch.setattr(convert_module, "BG_BYTES_HELD", max(bg_sizes))  # room for one
    converter, record = convert_here(z.path, tmp_path / "budget")
    assert converter.bg_bytes_held <= max(bg_sizes) and converter.bg_rereads >= 3
    assert record["samples"] == 9 and not record["skipped"]
    tar = "train/batch01-000000.tar"
    assert (tmp_path / "budget" / tar).read_bytes() == (tmp_path / "all" / tar).read_bytes()


def set_encrypted(path: Path, name: str) -> None:
    """Set the 'encrypted' flag of one member in its local header and its directory entry."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        offset = zf.getinfo(name).header_offset
    data[offset + 6] |= 1
    central = data.rfind(b"PK\x01\x02", 0, data.rindex(name.encode()))
    data[central + 8] |= 1
    path.write_bytes(bytes(data))


def test_an_encrypted_member_skips_its_sample_only(tmp_path: Path):
    z = build_zip(tmp_path / "batch1_images.zip", 4)
    mask = list(z.samples.values())[1]["mask"]
    set_encrypted(z.path, mask)
    out = tmp_path / "shards"
    summary = convert([z.path], out)
    assert summary.ok and summary.samples["train"] == 3
    (skip,) = manifest_of(out)["skipped"]
    assert skip["member"] == list(z.samples.values())[1]["fg_bg"]
    assert f"mask member {mask}: cannot read it (encrypted member" in skip["reason"]


def spoil_name(path: Path, name: str) -> str:
    """Make a member's directory entry name invalid UTF-8 (its UTF-8 flag stays set): its "é"
    becomes bytes ff fe. Returns the name as the reader lists it."""
    data = bytearray(path.read_bytes())
    at = data.rindex(name.encode()) + name.encode().index("é".encode())
    data[at : at + 2] = b"\xff\xfe"
    path.write_bytes(bytes(data))
    return name.replace("é", "\udcff\udcfe")


def test_a_name_that_is_not_utf8_refuses_that_member_only(tmp_path: Path):
    z = build_zip(tmp_path / "batch1_images.zip", 4)
    first = list(z.samples.values())[0]
    with zipfile.ZipFile(z.path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    mask = "dé/" + first["mask"]  # a top-level folder with a non-ASCII name
    members[mask] = members.pop(first["mask"])
    members["fg_jpg/café.jpg"] = b"x"  # ignored, as fg_jpg/ is
    with zipfile.ZipFile(z.path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    spoil_name(z.path, "fg_jpg/café.jpg")
    listed = spoil_name(z.path, mask)
    with MemberReader(z.path) as reader:
        assert listed in {e.filename for e in reader.infos}  # listed by the fast reader
        with pytest.raises(MemberRefused, match="name is not valid UTF-8"):
            reader.read(listed)
    out = tmp_path / "shards"
    summary = convert([z.path], out)
    assert summary.ok and summary.samples["train"] == 3
    (skip,) = manifest_of(out)["skipped"]  # the junk is ignored, the sample is reported
    assert skip["member"] == first["fg_bg"]
    shown = listed.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    assert "\\x" in shown and shown != listed  # its odd bytes as text, no lone surrogate
    assert skip["reason"] == (
        f"mask member {shown}: cannot read it (its name is not valid UTF-8 though its entry "
        "says it is)"
    )
    (out / "manifest.json").read_text(encoding="utf-8").encode("utf-8")  # strict UTF-8 text
    assert "\\ud" not in (out / "manifest.json").read_text()
    assert verify(out).ok


@pytest.mark.parametrize("oddity", ["comment", "stub", "trailing bytes", "zip64"])
def test_a_name_that_is_not_utf8_in_an_unusual_zip_refuses_that_member_only(
    tmp_path: Path, oddity: str
):
    # zipfile refuses the whole zip for it, so the fast reader must list a zip with a comment,
    # with bytes before it or after its end record, or with ZIP64 fields on its members.
    z = build_zip(tmp_path / "batch1_images.zip", 4)
    first = list(z.samples.values())[0]
    with zipfile.ZipFile(z.path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    depth = "dé/" + first["depth"]
    members[depth] = members.pop(first["depth"])
    with zipfile.ZipFile(z.path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    if oddity == "zip64":
        zip64_members(z.path)
    listed = spoil_name(z.path, depth)
    if oddity in ("comment", "stub"):
        wrap_zip(
            z.path, b"made by hand; PK\x05\x06 is in here too", STUB if oddity == "stub" else b""
        )
    elif oddity == "trailing bytes":
        z.path.write_bytes(z.path.read_bytes() + b"not a comment; PK\x05\x06 neither")
    with open(z.path, "rb") as f:
        assert listed in {e.filename for e in read_central_directory(f)}
    out = tmp_path / "shards"
    summary = convert([z.path], out)
    assert summary.ok and summary.samples["train"] == 3
    (skip,) = manifest_of(out)["skipped"]
    assert skip["member"] == first["fg_bg"]
    assert skip["reason"] == (
        f"depth member {shown_name(listed)}: cannot read it (its name is not valid UTF-8 though "
        "its entry says it is)"
    )
    assert verify(out).ok


def set_version(path: Path, name: str, version: int) -> None:
    """Set the "version needed to extract" of one member's directory entry."""
    data = bytearray(path.read_bytes())
    data[data.rfind(b"PK\x01\x02", 0, data.rindex(name.encode())) + 6] = version
    path.write_bytes(bytes(data))


def test_a_member_of_a_later_zip_version_is_refused_alone(tmp_path: Path):
    z = build_zip(tmp_path / "batch1_images.zip", 4)
    second = list(z.samples.values())[1]
    set_version(z.path, second["depth"], 83)  # zipfile refuses the whole zip for it
    set_version(z.path, "fg_jpg/fg_1.jpg", 83)  # ignored
    out = tmp_path / "shards"
    summary = convert([z.path], out)
    assert summary.ok and summary.samples["train"] == 3
    (skip,) = manifest_of(out)["skipped"]
    assert skip["member"] == second["fg_bg"]
    assert skip["reason"].endswith(
        "cannot read it (needs zip version 8.3 to extract: versions up to 6.3 are read)"
    )
    # A zip with a comment is listed by the fast reader too: that member alone is refused.
    (tmp_path / "c").mkdir()
    commented = build_zip(tmp_path / "c" / "batch2_images.zip", 4)
    set_version(
        wrap_zip(commented.path, b"made by hand"), list(commented.samples.values())[0]["mask"], 83
    )
    # So is one with bytes after its end record, and one with ZIP64 fields on its members.
    (tmp_path / "t").mkdir()
    trailing = build_zip(tmp_path / "t" / "batch3_images.zip", 4)
    set_version(trailing.path, list(trailing.samples.values())[2]["bg"], 83)
    trailing.path.write_bytes(trailing.path.read_bytes() + b"not a comment")
    (tmp_path / "w").mkdir()
    wide = build_zip(tmp_path / "w" / "batch4_images.zip", 4)
    set_version(zip64_members(wide.path), list(wide.samples.values())[3]["fg_bg"], 83)
    # A zip that zipfile lists (a Unicode-path field on a member) fails alone, with a clear error.
    (tmp_path / "u").mkdir()
    unicode_path = build_zip(tmp_path / "u" / "batch5_images.zip", 4).path
    add_unicode_path_member(unicode_path, "fg_jpg/café.jpg")
    set_version(unicode_path, "fg_jpg/fg_1.jpg", 83)
    summary = convert([commented.path, trailing.path, wide.path, unicode_path, z.path], out)
    assert summary.samples["train"] == 12 and [f["error"] for f in summary.failed] == [
        f"{unicode_path}: cannot open it as a zip (zip file version 8.3)"
    ]
    skipped = [s["member"] for s in manifest_of(out)["skipped"]]
    assert skipped == [
        second["fg_bg"],
        list(commented.samples.values())[0]["fg_bg"],
        list(trailing.samples.values())[2]["fg_bg"],
        list(wide.samples.values())[3]["fg_bg"],
    ]


def add_unicode_path_member(path: Path, name: str) -> None:
    """Append a member whose entry holds Info-ZIP's Unicode-path extra field (0x7075)."""
    raw = name.encode()
    field = b"\x01" + struct.pack("<L", zlib.crc32(raw)) + raw
    info = zipfile.ZipInfo(name)
    info.extra = struct.pack("<HH", 0x7075, len(field)) + field
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(info, b"x")


def zip64_field(data: bytes, name: str) -> int:
    """Where the ZIP64 extra field of a member's directory entry starts in `data`: its id,
    length, then the uncompressed size, compressed size and offset that zip64_members put."""
    entry = data.rfind(b"PK\x01\x02", 0, data.rindex(name.encode()))
    field = entry + 46 + struct.unpack_from("<H", data, entry + 28)[0]
    assert struct.unpack_from("<HH", data, field) == (1, 24)
    return field


# Each lie edits one ZIP64 field (at `field` in the zip's bytes) and returns the reason expected.
def lie_offset(data: bytearray, field: int) -> str:
    """The member's offset: 2**64 - 1."""
    struct.pack_into("<Q", data, field + 20, 2**64 - 1)  # past anything pread takes too
    return (
        f"its ZIP64 directory entry puts its local header at byte {2**64 - 1}, past the end of "
        f"the zip ({len(data)} bytes)"
    )


def lie_size(data: bytearray, field: int) -> str:
    """The member's compressed size: the zip's size."""
    struct.pack_into("<Q", data, field + 12, len(data))  # under 4 MiB: only the bound refuses it
    offset = struct.unpack_from("<Q", data, field + 20)[0]
    return (
        f"its ZIP64 directory entry gives it {len(data)} compressed bytes from byte {offset}, "
        f"past the end of the zip ({len(data)} bytes)"
    )


def lie_short(data: bytearray, field: int) -> str:
    """The field too short for the three values its entry leaves to it."""
    struct.pack_into("<H", data, field + 2, 16)  # the sizes only, the offset left out
    struct.pack_into("<HH", data, field + 20, 0xCAFE, 4)  # its 8 bytes: another field
    return (
        "its ZIP64 extra field holds 16 bytes, not the 24 that its directory entry's saturated "
        "sizes and offset need"
    )


def lie_cut(data: bytearray, field: int) -> str:
    """The field's length past the end of the entry's extra fields."""
    struct.pack_into("<H", data, field + 2, 40)
    return "its extra field 0x0001 declares 40 bytes, more than the 24 left in its directory entry"


def lie_missing(data: bytearray, field: int) -> str:
    """No ZIP64 field at all, though the entry's sizes and offset are 0xFFFFFFFF."""
    struct.pack_into("<H", data, field, 0xCAFE)  # another field, of the same bytes
    return (
        "its directory entry leaves a size or its offset to a ZIP64 extra field (0xFFFFFFFF) "
        "and has none"
    )


@pytest.mark.parametrize("lie", [lie_offset, lie_size, lie_short, lie_cut, lie_missing])
def test_a_zip64_field_that_lies_refuses_its_member_alone(tmp_path: Path, lie):
    # zipfile refuses the whole zip for a ZIP64 field cut short, and lists a member whose ZIP64
    # offset or size reaches past the zip's end; the fast reader refuses that member alone.
    z = build_zip(tmp_path / "batch1_images.zip", 4)
    mask = list(z.samples.values())[1]["mask"]
    data = bytearray(zip64_members(z.path).read_bytes())
    reason = lie(data, zip64_field(data, mask))
    z.path.write_bytes(bytes(data))
    with open(z.path, "rb") as f:
        assert read_central_directory(f) is not None  # listed by the fast reader
    with MemberReader(z.path) as reader:
        with pytest.raises(MemberRefused) as info:
            reader.read(mask)
        assert str(info.value) == reason
    out = tmp_path / "shards"
    summary = convert([z.path], out)
    assert summary.ok and summary.samples["train"] == 3
    (skip,) = manifest_of(out)["skipped"]
    assert skip["member"] == list(z.samples.values())[1]["fg_bg"]
    assert skip["reason"] == f"mask member {mask}: cannot read it ({reason})"
    assert verify(out).ok


def absurd_tar(size: int) -> bytes:
    """A tar whose only member's header declares `size` bytes (GNU base-256 above 8 GiB)."""
    info = tarfile.TarInfo("b01_1_1_0_1.fg_bg.jpg")
    info.size = size
    return info.tobuf(format=tarfile.GNU_FORMAT) + bytes(1024)


def test_a_tar_header_of_an_absurd_size_is_a_clear_error():
    with pytest.raises(ValueError, match="declares 10000000000 bytes, over the 4194304"):
        list(read_samples(io.BytesIO(absurd_tar(10**10)), "train/x.tar"))


def test_training_skips_an_absurd_shard_and_verify_reports_it(shards: Path, caplog):
    from pipeline.train.shards import read_shards
    from pipeline.train.stages import LogOnce

    manifest = manifest_of(shards)
    bad, good = (s["path"] for s in manifest["splits"]["train"]["shards"])
    (shards / bad).write_bytes(absurd_tar(10**10))
    samples = list(read_shards([str(shards / bad), str(shards / good)], LogOnce()))
    assert len(samples) == 2  # the good shard's, after a warning for the bad one
    warned = [r.message for r in caplog.records if "declares 10000000000 bytes" in r.message]
    assert len(warned) == 1 and bad in warned[0]
    report = verify(shards)
    lines = [line for line in report.problem_lines() if "declares 10000000000" in line]
    assert len(lines) == 1 and lines[0].startswith(bad)


def one_key_tar(path: Path, files: int, size: int) -> None:
    """A tar of one sample key with `files` distinct extensions of `size` bytes each."""
    with open(path, "wb") as f:
        for i in range(files):
            f.write(tar_module.tar_member(f"b01_1_1_0_1.e{i}", bytes(size)))
        f.write(bytes(1024))


def test_a_sample_of_too_many_files_or_bytes_is_refused_while_read(tmp_path: Path):
    many, big = tmp_path / "many.tar", tmp_path / "big.tar"
    one_key_tar(many, 200, 1000)  # 200 small files under one key: never gathered whole
    with open(many, "rb") as f:
        read = iter(read_samples(f, str(many)))
        with pytest.raises(ValueError, match="sample b01_1_1_0_1 has over 8 files"):
            next(read)
        assert f.tell() < 20 * 1536  # stopped at the 9th file, not at the 200th
    one_key_tar(big, 6, MAX_MEMBER_BYTES)  # six files, each at the member cap: 24 MiB
    with open(big, "rb") as f:
        with pytest.raises(ValueError, match=f"or {20971520} bytes"):
            list(read_samples(f, str(big)))


def test_training_and_verify_call_a_sample_of_too_many_files_a_damaged_shard(shards: Path, caplog):
    from pipeline.train.shards import read_shards
    from pipeline.train.stages import LogOnce

    manifest = manifest_of(shards)
    bad, good = (s["path"] for s in manifest["splits"]["train"]["shards"])
    one_key_tar(shards / bad, 200, 1000)
    samples = list(read_shards([str(shards / bad), str(shards / good)], LogOnce()))
    assert len(samples) == 2  # the good shard's, after one warning for the bad one
    warned = [r.message for r in caplog.records if "has over 8 files" in r.message]
    assert len(warned) == 1 and bad in warned[0]
    lines = [line for line in verify(shards).problem_lines() if "has over 8 files" in line]
    assert len(lines) == 1 and lines[0].startswith(bad) and "b01_1_1_0_1" in lines[0]
    assert "e199" not in lines[0] and len(lines[0]) < 300  # short: no list of 200 extensions


# ---------------------------------------------------------------- 3. a full disk


def four_zips(tmp_path: Path) -> list[Path]:
    return [build_zip(tmp_path / f"batch{b}_images.zip", 4, seed=b).path for b in (1, 2, 3, 4)]


def fill_disk_after(monkeypatch, capacity: int) -> None:
    """Shard writes raise ENOSPC once `capacity` bytes have been written, as a full disk."""
    written = [0]
    original = tar_module._HashingFile.__init__

    class FullDisk:
        def __init__(self, file) -> None:
            self._file = file

        def write(self, data) -> int:
            if written[0] + len(data) > capacity:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written[0] += len(data)
            return self._file.write(data)

        def close(self) -> None:
            self._file.close()

    def init(self, path: Path) -> None:
        original(self, path)
        self._file = FullDisk(self._file)

    monkeypatch.setattr(tar_module._HashingFile, "__init__", init)


def test_after_a_full_disk_the_folder_never_verifies(tmp_path: Path, monkeypatch):
    zips = four_zips(tmp_path)
    sizes = tmp_path / "sizes"
    convert(zips[:2], sizes)
    room = sum(p.stat().st_size for p in sizes.rglob("*.tar"))
    fill_disk_after(monkeypatch, room + 100)  # the third zip does not fit
    out = tmp_path / "shards"
    summary = convert(zips, out)
    assert not summary.ok and summary.converted == ["batch1_images.zip", "batch2_images.zip"]
    error = summary.failed[0]["error"]
    assert error.endswith(
        f"cannot write {out}/train/batch03-000000.tar.tmp: No space left on device"
    )
    failed = {f["zip"]: f["error"] for f in manifest_of(out)["failed"]}
    assert set(failed) == {"batch3_images.zip", "batch4_images.zip"}
    assert not list(out.rglob("*.tmp"))
    report = verify(out)
    assert not report.ok
    assert any("batch3_images.zip was not converted" in line for line in report.problem_lines())
    # Another run that does not give those zips does not make the folder complete either.
    monkeypatch.undo()
    assert convert(zips[:2], out).ok and not verify(out).ok
    # A bigger disk: the same command completes the folder, and verify passes.
    summary = convert(zips, out)
    assert summary.ok and summary.reused == ["batch1_images.zip", "batch2_images.zip"]
    assert manifest_of(out)["failed"] == [] and verify(out).ok
    assert not failure_path(out, 3).exists()


def test_forget_failed_goes_on_without_the_failed_zips(tmp_path: Path, monkeypatch, caplog):
    zips = four_zips(tmp_path)
    out = tmp_path / "shards"
    fill_disk_after(monkeypatch, 0)
    assert not convert(zips[2:], out).ok
    monkeypatch.undo()
    assert convert(zips[:2], out).ok and not verify(out).ok
    result = CliRunner().invoke(
        cli, ["convert", *map(str, zips[:2]), "--out", str(out), "--forget-failed"]
    )
    assert result.exit_code == 0, result.output
    assert any(
        "batch3_images.zip: forgotten (--forget-failed)" in r.message for r in caplog.records
    )
    assert manifest_of(out)["failed"] == [] and verify(out).ok


# ---------------------------------------------------------------- 6. permissions


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_manifest_and_records_get_the_shards_permissions(tmp_path: Path, umask: int):
    z = build_zip(tmp_path / "batch1_images.zip", 2)
    old = os.umask(umask)
    try:
        out = tmp_path / "shards"
        assert convert([z.path], out).ok
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    shard = next(out.rglob("*.tar"))
    assert shard.stat().st_mode & 0o777 == want
    for path in [out / "manifest.json", *(out / ".parts").glob("*.json")]:
        assert path.stat().st_mode & 0o777 == want, path


# ---------------------------------------------------------------- usage errors


def test_a_missing_zip_is_a_usage_error_leaving_no_folder(tmp_path: Path):
    out = tmp_path / "shards"
    result = CliRunner().invoke(
        cli, ["convert", str(tmp_path / "batch1_images.zip"), "--out", str(out)]
    )
    assert result.exit_code == 2 and "does not exist" in result.stderr
    assert not out.exists()


# ---------------------------------------------------------------- 4, 5. other processes

SLOW_CONVERT = """
import faulthandler, os, signal, sys, time
faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hung run's stacks, for the test
# Ctrl-C as from a terminal, also where this suite runs with SIGINT ignored (started as a
# background job of a non-interactive shell: the ignoring is inherited, and Python keeps it).
signal.signal(signal.SIGINT, signal.default_int_handler)
import pipeline.store.pool as pool
from pipeline.cli import main

real = pool.convert_zip
def slow(job, report=None):
    if job.batch == 1:
        return real(job, report)
    (job.out.parent / f"worker-{job.batch}.pid").write_text(str(os.getpid()))
    time.sleep(120)
    return real(job, report)
pool.convert_zip = slow
sys.argv = ["pipeline", "convert", *sys.argv[1:]]
main()
"""


def start_convert(args: list, script: str | None = None) -> subprocess.Popen:
    code = textwrap.dedent(script) if script else "from pipeline.cli import main; main()"
    cmd = [sys.executable, "-c", code, *([] if script else ["convert"]), *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, timeout: float = 60.0) -> None:
    """Poll `condition` until it holds; fail after `timeout` s (a bound on a hang, not a speed)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie that no one reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def worker_pids(root: Path, batches) -> list[int]:
    return [int((root / f"worker-{b}.pid").read_text()) for b in batches]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_convert(tmp_path: Path):
    zips = [build_zip(tmp_path / f"batch{b}_images.zip", 3, seed=b).path for b in (2, 3)]
    out = tmp_path / "shards"
    proc = start_convert([*zips, "--out", out, "--workers", "2"], SLOW_CONVERT)
    wait_until(lambda: all((tmp_path / f"worker-{b}.pid").exists() for b in (2, 3)))
    workers = worker_pids(tmp_path, (2, 3))
    proc.kill()
    proc.wait()
    wait_until(lambda: not any(map(alive, workers)), timeout=20)
    # The killed run's zips are recorded as unfinished: a later run of another zip
    # writes a manifest, but verify names them.
    other = build_zip(tmp_path / "batch4_images.zip", 3, seed=4).path
    assert convert([other], out).ok
    failed = {f["zip"] for f in manifest_of(out)["failed"]}
    assert failed == {"batch2_images.zip", "batch3_images.zip"}
    assert not verify(out).ok


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_cancels_queued_zips_and_says_what_was_finished(tmp_path: Path):
    zips = [build_zip(tmp_path / f"batch{b}_images.zip", 3, seed=b).path for b in (1, 2, 3, 4)]
    out = tmp_path / "shards"
    proc = start_convert([*zips, "--out", out, "--workers", "2"], SLOW_CONVERT)
    wait_until(lambda: (out / ".parts" / "batch01.json").exists())
    wait_until(lambda: all((tmp_path / f"worker-{b}.pid").exists() for b in (2, 3)))
    workers = worker_pids(tmp_path, (2, 3))
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=30)  # without cancelling: 120 s per queued zip
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # where it hangs: every thread's stack on stderr
        time.sleep(2)
        proc.kill()
        pytest.fail(f"convert did not stop on Ctrl-C:\n{proc.communicate()[1]}")
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted: 1 zip(s) finished (batch1_images.zip), 3 not finished" in stderr
    assert "Traceback" not in stderr
    assert not any(map(alive, workers))
    assert not (tmp_path / "worker-4.pid").exists()  # the queued zip never started
    assert sorted(p.name for p in (out / ".parts").glob("batch*.json")) == ["batch01.json"]
    assert not list(out.rglob("*.tmp")) and not (out / "manifest.json").exists()


def test_ctrl_c_in_one_process_keeps_what_was_finished(tmp_path: Path, monkeypatch, caplog):
    import pipeline.store.pool as pool

    zips = [build_zip(tmp_path / f"batch{b}_images.zip", 3, seed=b).path for b in (1, 2, 3)]
    real = pool.convert_zip

    def interrupted(job, report=None):
        if job.batch == 2:
            raise KeyboardInterrupt
        return real(job, report)

    monkeypatch.setattr(pool, "convert_zip", interrupted)
    out = tmp_path / "shards"
    with pytest.raises(KeyboardInterrupt):
        convert(zips, out)
    assert "interrupted: 1 zip(s) finished (batch1_images.zip), 2 not finished" in caplog.text
    assert sorted(p.name for p in (out / ".parts").glob("*.json")) == [
        "batch01.json",
        "failed-batch02.json",
        "failed-batch03.json",
    ]
    monkeypatch.undo()
    summary = convert(zips, out)  # the same command finishes the folder
    assert summary.ok and summary.reused == ["batch1_images.zip"] and verify(out).ok


BUGGY_CONVERT = """
import sys
import pipeline.store.pool as pool
from pipeline.cli import main

def a_buggy_step(job, report=None):
    raise KeyError("a bug, not bad input")
pool.convert_zip = a_buggy_step
sys.argv = ["pipeline", *sys.argv[1:]]
main()
"""


def test_a_bug_in_a_worker_keeps_its_traceback_with_v(tmp_path: Path):
    zips = [build_zip(tmp_path / f"batch{b}_images.zip", 1, seed=b).path for b in (1, 2)]
    args = ["convert", *map(str, zips), "--out", str(tmp_path / "out"), "--workers", "2"]
    quiet = start_convert(args, BUGGY_CONVERT).communicate(timeout=120)[1]
    verbose = start_convert(["-v", *args], BUGGY_CONVERT).communicate(timeout=120)[1]
    assert "KeyError('a bug, not bad input')" in quiet and "Traceback" not in quiet
    # The worker's traceback, where the bug is, comes through the pool (as exc.__cause__).
    assert "traceback of the failure" in verbose and "in a_buggy_step" in verbose
    assert "Traceback" in verbose


def test_a_bug_in_one_process_keeps_its_traceback_at_debug(tmp_path: Path, monkeypatch, caplog):
    import pipeline.store.pool as pool

    def a_buggy_step(job, report=None):
        raise KeyError("a bug, not bad input")

    monkeypatch.setattr(pool, "convert_zip", a_buggy_step)
    z = build_zip(tmp_path / "batch1_images.zip", 1).path
    with caplog.at_level("DEBUG", logger="pipeline.store.runner"):
        assert not convert([z], tmp_path / "out").ok
    (record,) = [r for r in caplog.records if r.exc_info]
    assert record.levelname == "DEBUG" and isinstance(record.exc_info[1], KeyError)
    assert "a_buggy_step" in caplog.text


def test_a_second_convert_of_the_same_batch_waits_or_refuses(tmp_path: Path):
    z = build_zip(tmp_path / "batch1_images.zip", 3).path
    out = tmp_path / "shards"
    out.mkdir()
    with locked(out, ["batch01"]):  # this process plays the first convert
        refused = start_convert([z, "--out", out, "--no-wait"])
        _, stderr = refused.communicate(timeout=60)
        assert refused.returncode == 1
        assert f"another convert (pid {os.getpid()} on" in stderr and "writing batch01" in stderr
        waiting = start_convert([z, "--out", out])
        lines = []
        wait_until(lambda: lines.append(waiting.stderr.readline()) or "waiting" in lines[-1])
        assert waiting.poll() is None and not (out / "manifest.json").exists()
        # Another batch is not held up by this one.
        other = build_zip(tmp_path / "batch2_images.zip", 3, seed=2).path
        disjoint = start_convert([other, "--out", out, "--no-wait"])
        assert disjoint.wait(timeout=60) == 0
    assert waiting.wait(timeout=60) == 0
    waiting.stderr.close()
    assert verify(out).ok and manifest_of(out)["splits"]["train"]["samples"] == 6


def test_a_lock_file_that_is_a_symlink_or_a_fifo_is_refused_never_written(tmp_path: Path):
    from pipeline.store.guard import is_locked

    zips = [build_zip(tmp_path / f"batch{b}_images.zip", 2, seed=b).path for b in (1, 2)]
    out, victim = tmp_path / "shards", tmp_path / "victim.txt"
    victim.write_text("precious data\n")
    (out / ".parts").mkdir(parents=True)
    for batch in ("batch01", "batch02"):  # both at one file: following them would deadlock
        (out / ".parts" / f"{batch}.lock").symlink_to(victim)
    with pytest.raises(
        ValueError, match=r"batch01\.lock: a lock file must be a regular file, not a sym"
    ):
        convert(zips, out)
    with pytest.raises(ValueError, match=r"batch02\.lock: .* not a symlink"):
        is_locked(out, "batch02")
    assert victim.read_text() == "precious data\n" and not is_locked(out, "batch03")
    for batch in ("batch01", "batch02"):
        (out / ".parts" / f"{batch}.lock").unlink()
    os.mkfifo(out / ".parts" / "batch01.lock")
    with pytest.raises(ValueError, match=r"batch01\.lock: .* not a FIFO"):
        convert(zips, out)
    (out / ".parts" / "batch01.lock").unlink()
    os.link(victim, out / ".parts" / "batch01.lock")  # a hard link: the same file, another name
    with pytest.raises(ValueError, match=r"batch01\.lock: .* not a hard link to another file"):
        convert(zips, out)
    assert victim.read_text() == "precious data\n"


def test_two_converts_of_the_same_zips_both_end_complete(tmp_path: Path):
    zips = [build_zip(tmp_path / f"batch{b}_images.zip", 60, seed=b).path for b in (1, 2, 10)]
    for attempt in range(3):  # without the lock, most attempts end with shards missing
        out = tmp_path / f"shards{attempt}"
        runs = [start_convert([*zips, "--out", out, "--shard-samples", "5"]) for _ in range(2)]
        for run in runs:
            _, stderr = run.communicate(timeout=120)
            assert run.returncode == 0, stderr
        assert verify(out).ok and manifest_of(out)["failed"] == []


# ---------------------------------------------------------------- a review's findings


def test_an_oversized_manifest_is_refused_unread(shards: Path, monkeypatch):
    from pipeline import schema
    from pipeline.train.sources import open_manifest

    size = (shards / "manifest.json").stat().st_size
    monkeypatch.setattr(schema, "MAX_JSON_BYTES", size - 1)  # as if it were over 128 MB
    monkeypatch.chdir(shards)
    for args in MANIFEST_READERS:
        line = CliRunner().invoke(cli, args).stderr.strip().splitlines()[-1]
        assert line == (
            f"error: manifest.json: over {size - 1:,} bytes: more than any JSON file convert writes"
        ), args
    with pytest.raises(ValueError, match="cannot read the manifest .over"):
        open_manifest(f"file://{shards}")


@pytest.mark.parametrize("count", [10**400, 2**53 + 1])
def test_an_absurd_count_is_refused_not_a_traceback(shards: Path, count: int):
    def absurd(manifest):
        manifest["splits"]["test"]["samples"] = count
        manifest["splits"]["test"]["shards"][0]["samples"] = count

    edit_manifest(shards, absurd)
    result = CliRunner().invoke(
        cli, ["train", "--shards", shards, "--out", shards.parent / "run", "--workers", "0"]
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "samples must be a count" in result.stderr.strip().splitlines()[-1]


def test_a_count_its_shards_bytes_cannot_hold_is_refused_by_every_reader(shards: Path, monkeypatch):
    # The sha256 and bytes are right: only the count lies. Training took it as the epoch's
    # length, repeating the shard's 2 samples for ever, with one warning line.
    entry = first_train_shard(manifest_of(shards))
    edit_manifest(shards, lambda m: first_train_shard(m).update(samples=2**40))
    monkeypatch.chdir(shards)
    most = entry["bytes"] // SAMPLE_MIN_BYTES
    expected = (
        f"error: manifest.json: splits.train.shards[0]: {entry['path']} says {2**40} samples in "
        f"{entry['bytes']} bytes, more than the {most} those bytes can hold (a sample is 5 tar "
        f"members, each at least a 512-byte header and a 512-byte block: 5120 bytes)"
    )
    no_steps = ["train", "--shards", ".", "--out", "run2", "--device", "cpu", "--workers", "0"]
    for args in [*MANIFEST_READERS, no_steps]:
        assert error_line(CliRunner().invoke(cli, args)) == expected, args
    result = CliRunner().invoke(cli, ["verify", ".", "--json"])
    (found,) = json.loads(result.stdout)["problems"]
    assert result.exit_code == 1 and found["problem"] == expected.removeprefix("error: ")
    assert not Path("run").exists() and not Path("run2").exists()


def test_a_count_at_its_bytes_bound_is_accepted_one_over_is_not(shards: Path):
    manifest = manifest_of(shards)
    entry = first_train_shard(manifest)
    entry["samples"] = entry["bytes"] // SAMPLE_MIN_BYTES
    validate_manifest(manifest, "m.json")
    entry.update(samples=3, bytes=3 * SAMPLE_MIN_BYTES)  # the bound itself, exactly
    validate_manifest(manifest, "m.json")
    entry["bytes"] -= 1
    with pytest.raises(ValueError, match=r"m.json: splits.train.shards\[0\]: .* says 3 samples"):
        validate_manifest(manifest, "m.json")
    entry.update(samples=0, bytes=0)  # an empty shard holds nothing
    validate_manifest(manifest, "m.json")


# The real sample's members in the published layout (tests/fixtures/real-sample/README.md).
REAL_MEMBERS = {
    "bg_jpg/bg_img_51.jpg": "bg_img_51.jpg",
    "fg_bg_jpg/fg_bg_9_51_1_2.jpg": "fg_bg_9_51_1_2.jpg",
    "mask_black_jpg/bg_mask_9_51_1_2.jpg": "bg_mask_9_51_1_2.jpg",
    "depth_fg_bg_jpg/depth_fg_bg_9_51_1_2.jpg": "depth_fg_bg_9_51_1_2.jpg",
}


def _smallest_zip(path: Path, real_sample: Path, samples: int) -> Path:
    """A zip of the real sample and `samples` of the smallest images convert keeps: solid gray
    PNGs, each under one 512-byte tar block (as the json is)."""
    import cv2
    import numpy as np

    def png(size: int) -> bytes:
        return cv2.imencode(".png", np.full((size, size), 7, np.uint8))[1].tobytes()

    with zipfile.ZipFile(path, "w") as zf:
        for member, file in REAL_MEMBERS.items():
            zf.writestr(member, (real_sample / file).read_bytes())
        zf.writestr("bg_jpg/bg_img_1.jpg", png(160))
        for i in range(1, samples + 1):
            zf.writestr(f"fg_bg_jpg/fg_bg_{i}_1_0_1.jpg", png(160))
            zf.writestr(f"mask_black_jpg/bg_mask_{i}_1_0_1.jpg", png(160))
            zf.writestr(f"depth_fg_bg_jpg/depth_fg_bg_{i}_1_0_1.jpg", png(80))
    return path


def test_convert_writes_counts_within_the_bound_for_the_smallest_samples(
    tmp_path: Path, real_sample_dir: Path
):
    zips = [_smallest_zip(tmp_path / "batch1_images.zip", real_sample_dir, 12)]
    zips.append(build_zip(tmp_path / "batch10_images.zip", 7, seed=2).path)  # conftest's JPEGs
    out = tmp_path / "shards"
    assert convert(zips, out, shard_samples=4).ok and verify(out).ok  # both validate
    manifest = manifest_of(out)
    assert manifest["splits"]["train"]["samples"] == 13
    smallest = 0
    for shard in manifest["splits"]["train"]["shards"]:
        with tarfile.open(out / shard["path"]) as tar:
            members = tar.getmembers()
        # the shard's samples, before its end-of-archive blocks: how small a sample can be
        end = members[-1].offset_data + -(-members[-1].size // 512) * 512
        if all(member.size <= 512 for member in members):
            assert end == shard["samples"] * SAMPLE_MIN_BYTES  # the bound is reached
            smallest += 1
        assert shard["samples"] <= shard["bytes"] // SAMPLE_MIN_BYTES
    assert smallest >= 2  # 12 smallest samples (and the real one) in shards of 4


def test_batch_zero_is_refused_by_name(tmp_path: Path):
    zero = build_zip(tmp_path / "batch0_images.zip", 2).path
    with pytest.raises(ValueError, match=f"{zero}: batch number 0: batches are numbered from 1"):
        convert([zero], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_refused_record_of_this_run_is_reported(tmp_path: Path, monkeypatch):
    from pipeline.store import finish

    zips = [build_zip(tmp_path / f"batch{n}_images.zip", 2, seed=n).path for n in (1, 2)]
    real = finish.record_problem

    def refuse_batch2(record, out, test_batches, **options):
        if isinstance(record, dict) and record["batch"] == 2:
            return "batch2_images.zip: its record is refused"
        return real(record, out, test_batches, **options)

    monkeypatch.setattr(finish, "record_problem", refuse_batch2)
    summary = convert(zips, tmp_path / "out", test_batches=())
    assert not summary.ok
    assert [f["zip"] for f in summary.failed] == ["batch2_images.zip"]
    assert summary.samples["train"] == 2  # batch 1's, and batch 2 is in the report


def test_redoing_a_zip_on_a_full_disk_keeps_what_was_there(shards: Path, monkeypatch):
    from pipeline.store import runner

    before = {p.relative_to(shards): p.read_bytes() for p in shards.rglob("*") if p.is_file()}

    def full(out, batch, zip_name, error):
        raise OSError(errno.ENOSPC, f"cannot write the failure of batch {batch}")

    monkeypatch.setattr(runner, "write_failure", full)
    zips = [shards.parent / "batch1_images.zip"]
    with pytest.raises(OSError, match="cannot write the failure of batch 1"):
        convert(zips, shards, shard_samples=2, force=True)
    after = {p.relative_to(shards): p.read_bytes() for p in shards.rglob("*") if p.is_file()}
    assert after == before  # the record, its shards and the manifest: nothing removed
    assert verify(shards).ok


def test_a_converted_zip_replaced_by_garbage_of_its_size_fails_alone(tmp_path: Path):
    zips = [build_zip(tmp_path / f"batch{n}_images.zip", 2, seed=n).path for n in (1, 2)]
    out = tmp_path / "out"
    assert convert(zips, out).ok
    zips[0].write_bytes(b"\0" * zips[0].stat().st_size)  # same size: its fingerprint is read
    summary = convert(zips, out)
    (failed,) = summary.failed
    assert failed["zip"] == str(zips[0]) and "cannot open it as a zip" in failed["error"]
    assert summary.reused == ["batch2_images.zip"]


def test_forget_failed_forgets_damaged_records_never_good_shards(tmp_path: Path):
    zips = [build_zip(tmp_path / f"batch{n}_images.zip", 2, seed=n).path for n in (1, 2, 3)]
    out = tmp_path / "out"
    assert convert(zips, out, test_batches=(3,)).ok
    (out / ".parts" / "batch02.json").write_text('{"shards": 5}')  # damaged
    # batch 3 was converted into test; with --test-batches 1 it belongs to train
    summary = convert(zips[:1], out, test_batches=(1,))
    assert sorted(Path(f["zip"]).name for f in summary.failed) == [
        "batch 2",
        "batch3_images.zip",
    ]
    assert not verify(out).ok
    summary = convert(zips[:1], out, test_batches=(1,), forget_failed=True)
    assert not (out / ".parts" / "batch02.json").exists()  # damaged: forgotten
    # Batch 3's shards are good, in the split of the --test-batches it was converted with: a
    # forgotten option must not delete them, so it stays reported.
    assert [Path(f["zip"]).name for f in summary.failed] == ["batch3_images.zip"]
    assert len(list(out.glob("test/batch03-*.tar"))) == 1
    summary = convert(zips[:1], out, test_batches=(1, 3), forget_failed=True)
    assert summary.ok and summary.samples == {"train": 0, "test": 4}
    assert verify(out).ok


def test_a_zip_added_with_other_test_batches_says_which_keep_the_others(tmp_path: Path, caplog):
    zips = [build_zip(tmp_path / f"batch{n}_images.zip", 2, seed=n).path for n in (1, 2, 10)]
    out = tmp_path / "out"
    assert convert(zips[:2], out, test_batches=(2,)).ok  # batch 2 is the test split
    with caplog.at_level("ERROR"):
        summary = convert(zips[2:], out)  # adding batch 10 with the default --test-batches 10
    (failed,) = summary.failed
    remedy = "(give a --test-batches that includes 2, or convert that zip again)"
    assert failed["zip"] == "batch2_images.zip" and failed["error"].endswith(remedy)
    assert remedy in caplog.text and "delete" not in caplog.text  # its shards are good
    (said,) = [p["problem"] for p in verify(out).problems]  # verify says the same, no more
    assert said.endswith(remedy + ")") and "--forget-failed" not in said  # which forgets none
    assert convert(zips[2:], out, test_batches=(2, 10)).ok
    assert verify(out).ok
    caplog.clear()
    with caplog.at_level("ERROR"):  # and the other way: batch 1 (train) is now asked for test
        convert(zips[2:], out, test_batches=(1, 2, 10))
    assert "(give a --test-batches that leaves out 1, or convert that zip again)" in caplog.text


def test_a_mark_that_cannot_be_written_takes_back_the_others(shards: Path, monkeypatch):
    from pipeline.store import catalog, runner

    zips = [shards.parent / "batch1_images.zip", shards.parent / "batch10_images.zip"]
    writing = catalog.write_failure

    def full_for_batch10(out, batch, zip_name, error):
        if batch == 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        writing(out, batch, zip_name, error)

    monkeypatch.setattr(runner, "write_failure", full_for_batch10)
    with pytest.raises(OSError):
        convert(zips, shards, shard_samples=2, force=True)
    assert not list((shards / ".parts").glob("failed-*.json"))  # batch 1's mark taken back
    monkeypatch.setattr(runner, "write_failure", writing)
    assert verify(shards).ok
    more = build_zip(shards.parent / "batch2_images.zip", 2, seed=5).path
    assert convert([more], shards, shard_samples=2).ok and verify(shards).ok


def test_the_loader_trusts_the_shards_counts_not_the_splits_total(shards: Path):
    from pipeline.train.sources import open_manifest, train_steps_per_epoch

    edit_manifest(shards, lambda m: m["splits"]["train"].update(samples=2**53))
    manifest = open_manifest(shards)
    assert train_steps_per_epoch(manifest, batch_size=2, world_size=1) == 2  # 4 samples
    assert not verify(shards).ok  # verify names the total that lies


def _unblock_fifo(fifo: Path) -> None:
    """Give a reader blocked on a FIFO its end of file (a writer that opens and closes it)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader is waiting: nothing to unblock
        pass


def _within(seconds: float, fifo: Path, call):
    """call()'s result, failing (not hanging) if it does not return within `seconds`."""
    import threading

    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(value=call()), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        _unblock_fifo(fifo)  # let the thread end before the test's folder goes
        thread.join(10)
        pytest.fail(f"blocked on the FIFO {fifo.name} for {seconds} s")
    return result["value"]


def test_a_fifo_for_a_wids_index_or_a_record_is_refused_never_waited_on(shards: Path):
    index = shards / "train.wids.json"
    index.unlink()
    os.mkfifo(index)
    report = _within(20, index, lambda: verify(shards))
    assert [p["problem"] for p in report.problems] == [
        "train.wids.json: unreadable (not a regular file)"
    ]
    record = shards / ".parts" / "batch01.json"
    record.unlink()
    os.mkfifo(record)
    zips = sorted(shards.parent.glob("batch1_images.zip"))
    summary = _within(60, record, lambda: convert(zips, shards, shard_samples=2))
    assert summary.ok  # the record is unreadable, so its zip is converted again


def test_a_directory_entry_pointing_at_another_members_data_is_refused(tmp_path: Path):
    """An entry whose offset, CRC and sizes are another member's would read that member's
    bytes, CRC intact: its local header's name says so (zipfile checks it too)."""
    zip_ = build_zip(tmp_path / "batch1_images.zip", 3)
    with zipfile.ZipFile(zip_.path) as zf:
        masks = sorted(n for n in zf.namelist() if n.startswith("mask_black_jpg/") and "." in n)
    victim, source = masks[0], masks[1]
    data = bytearray(zip_.path.read_bytes())
    entries = {}
    for name in (victim, source):
        at = data.rfind(b"PK\x01\x02", 0, data.rindex(name.encode()))
        entries[name] = at
    for start, end in ((16, 28), (42, 46)):  # CRC and sizes; the local header's offset
        fields = data[entries[source] + start : entries[source] + end]
        data[entries[victim] + start : entries[victim] + end] = fields
    zip_.path.write_bytes(bytes(data))
    with MemberReader(zip_.path) as reader, pytest.raises(zipfile.BadZipFile, match="another"):
        reader.read(victim)
    with zipfile.ZipFile(zip_.path) as zf, pytest.raises(zipfile.BadZipFile):
        zf.read(victim)  # the reference reader agrees
    out = tmp_path / "shards"
    summary = convert([zip_.path], out, test_batches=[])
    assert summary.ok and summary.written == 2 and summary.skipped == 1
    record = json.loads((out / ".parts" / "batch01.json").read_text())
    (skip,) = record["skipped"]
    assert "local header names another member" in skip["reason"] and victim in skip["reason"]


def _unicode_path_zip(path: Path, folder: str) -> Path:
    """The batch zip build_zip writes, inside `folder`, as Info-ZIP writes a non-ASCII name:
    its headers hold the name's UTF-8 bytes without the UTF-8 flag (so cp437 by the spec),
    and a Unicode-path extra field (0x7075) holds it as UTF-8."""
    plain = build_zip(path.with_name("plain.zip"), 4)
    placeholder = "x" * len(folder.encode())
    with zipfile.ZipFile(plain.path) as source, zipfile.ZipFile(path, "w") as zf:
        for old in source.infolist():
            name = f"{folder}/{old.filename}"
            body = struct.pack("<BL", 1, zlib.crc32(name.encode())) + name.encode()
            info = zipfile.ZipInfo(f"{placeholder}/{old.filename}", old.date_time)
            info.extra = struct.pack("<HH", 0x7075, len(body)) + body
            zf.writestr(info, source.read(old), zipfile.ZIP_DEFLATED)
    data = path.read_bytes().replace(placeholder.encode() + b"/", folder.encode() + b"/")
    path.write_bytes(data)
    return path


def _zipfile_reads_unicode_paths(monkeypatch) -> None:
    """Before 3.12 zipfile ignores the Unicode-path field: name members by it, as 3.12+ does."""
    if sys.version_info >= (3, 12):
        return
    listing = zipfile.ZipFile._RealGetContents

    def contents(self):
        listing(self)
        for info in self.filelist:
            extra = info.extra
            while len(extra) >= 4:
                kind, size = struct.unpack("<HH", extra[:4])
                if kind == 0x7075:
                    info.filename = extra[9 : 4 + size].decode()
                extra = extra[4 + size :]
        self.NameToInfo = {info.filename: info for info in self.filelist}

    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", contents)


def test_a_member_named_by_its_unicode_path_field_is_read(tmp_path: Path, monkeypatch):
    """zipfile (3.12+) names such a member by its field, not by the bytes its local header
    holds: the check that the local header names the member compares those bytes."""
    _zipfile_reads_unicode_paths(monkeypatch)
    path = _unicode_path_zip(tmp_path / "batch1_images.zip", "données")
    with open(path, "rb") as f:
        assert read_central_directory(f) is None  # zipfile's listing, then
    with MemberReader(path) as reader:
        names = [i.filename for i in reader.infos if not i.filename.endswith("/")]
        assert names and all(n.startswith("données/") for n in names)
        for name in names:
            reader.read(name)
    summary = convert([path], tmp_path / "shards", test_batches=[])
    assert summary.ok and summary.written == 4 and summary.skipped == 0
