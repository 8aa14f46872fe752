"""convert: zips -> WebDataset shards + manifest; bad inputs, re-runs, interruptions, the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import struct
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import STUB, BatchZip, encode, wrap_zip, zip64_members

from pipeline.cli import cli
from pipeline.images import JpegError, check_jpeg
from pipeline.store.catalog import record_path, write_failure
from pipeline.store.names import SampleId, sample_key
from pipeline.store.runner import ConvertConfig, convert_zips
from pipeline.store.verify import verify_shards
from pipeline.store.zipdir import END_MAGIC, ZIPINFO_FIELDS, read_central_directory
from pipeline.store.zipread import MemberReader


def convert(zips, out: Path, **options):
    """convert_zips with test defaults: no progress bar."""
    options.setdefault("progress", False)
    return convert_zips([Path(z) for z in zips], ConvertConfig(out=out, **options))


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def read_back(out: Path) -> dict[str, dict]:
    """Every sample of every shard, read with plain WebDataset (no decoding), by key."""
    import webdataset as wds

    manifest = manifest_of(out)
    urls = [
        str(out / s["path"])
        for split in ("train", "test")
        for s in manifest["splits"][split]["shards"]
    ]
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        assert sample["__key__"] not in samples
        samples[sample["__key__"]] = sample
    return samples


def assert_matches_zip(
    samples: dict[str, dict], batch: int, zipped: dict[str, bytes], names: dict
) -> None:
    """Every field of every sample equals its zip member byte for byte, under the extension of
    its real format (`mask.png` for PNG bytes named .jpg); json names the members as zipped."""
    for sample_id, members in names.items():
        sample = samples[sample_key(batch, sample_id)]
        meta = json.loads(sample["json"])
        assert meta == {"batch": batch, **{k: members[k] for k in ("fg_bg", "bg", "mask", "depth")}}
        for kind, member in members.items():
            ext, other = ("png", "jpg") if zipped[member].startswith(b"\x89PNG") else ("jpg", "png")
            assert sample[f"{kind}.{ext}"] == zipped[member], (kind, member)
            assert f"{kind}.{other}" not in sample


def rewrite_zip(path: Path, replace: dict[str, bytes]) -> None:
    """Rewrite a zip in place with some members' bytes replaced or added (dict order kept)."""
    with zipfile.ZipFile(path) as zf:
        entries = {i.filename: zf.read(i) for i in zf.infolist()}
    entries.update(replace)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)


# ---------------------------------------------------------------- the JPEG header check


def test_check_jpeg_reads_size_and_components():
    gray, rgb = encode(160, 120, 1), encode(80, 80, 2, channels=3)
    assert check_jpeg(gray) == (160, 120, 1)
    assert check_jpeg(rgb) == (80, 80, 3)
    ok, progressive = cv2.imencode(
        ".jpg", np.full((30, 20), 9, np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
    )
    assert check_jpeg(progressive.tobytes()) == (20, 30, 1)
    assert check_jpeg(gray + b"\0\0\n") == (160, 120, 1)  # padding after EOI is harmless


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"PK\3\4 not a jpeg", "no start-of-image"),
        (encode(160, 160, 1)[:-300], "no end-of-image"),
        (b"\xff\xd8\xff\xda\0\2\xff\xd9", "before any frame header"),
        (b"\xff\xd8\xff\xe0\0\x10JFIF\xff\xd9", "truncated JPEG header"),
        (b"\xff\xd8\xff\xe0\0\x04abxx\xff\xd9", "corrupt JPEG header"),
    ],
)
def test_check_jpeg_rejects_broken_data(data: bytes, reason: str):
    with pytest.raises(JpegError, match=reason):
        check_jpeg(data)


def test_check_jpeg_agrees_with_the_general_walk_on_odd_headers():
    # The fast path hands over to the general marker walk at anything unusual: same outcome.
    from pipeline.images import _walk_segments, read_frame_header

    good = encode(16, 8, 1, 1)
    odd = [
        good[:2] + b"\xff\xff" + good[2:],  # fill bytes
        good[:2] + b"\xff\xd3" + good[2:],  # a standalone marker
        good[:2] + b"\xff\xc3\x00\x02" + good[2:],  # a lossless frame first
        good[:2] + b"\xff\xda\x00\x02" + good[2:],  # image data first
        good[:6],  # cut inside the first segment
    ]
    for data in [good, *odd]:
        outcomes = []
        for read in (read_frame_header, lambda d: _walk_segments(d, 2)):
            try:
                outcomes.append(read(data))
            except JpegError as exc:
                outcomes.append(str(exc))
        assert outcomes[0] == outcomes[1], data[:12]
    assert read_frame_header(odd[0]) == read_frame_header(odd[1]) == (16, 8, 1)


def test_classify_fast_path_agrees_with_the_general_path():
    # `FOLDER/file` names take a shortcut; under a top folder they take the general path.
    from pipeline.store.names import classify

    files = {
        "bg_jpg": ["bg_img_3.jpg", "bg_3.JPEG", "bg_x.jpg", "._bg_img_3.jpg", ".DS_Store"],
        "fg_bg_jpg": ["fg_bg_1_2_0_3.jpg", "fg_bg_1_2_2_3.jpg", "sub/fg_bg_1_2_0_3.jpg", ""],
        "mask_black_jpg": ["bg_mask_1_2_1_3.jpeg", "fg_bg_1_2_0_3.jpg"],
        "depth_fg_bg_jpg": ["depth_1_2_0_3.jpg", "depth_fg_bg_1_2_0_3.jpg", "depth_1_2.jpg"],
    }
    recognised = 0
    for folder, names in files.items():
        for file in names:
            fast, general = classify(f"{folder}/{file}"), classify(f"top/{folder}/{file}")
            assert (fast is None) == (general is None), (folder, file)
            if fast is not None:
                assert fast[:1] + fast[2:] == general[:1] + general[2:]
                recognised += 1
    assert recognised == 6


# ---------------------------------------------------------------- reading zips


def directory_of(path: Path):
    with open(path, "rb") as f:
        return read_central_directory(f)


def assert_lists_as_zipfile(path: Path) -> None:
    entries = directory_of(path)
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    assert entries is not None and len(entries) == len(infos)
    for entry, info in zip(entries, infos, strict=True):
        assert entry == (*(getattr(info, f) for f in ZIPINFO_FIELDS), "")  # none refused


@pytest.mark.parametrize(
    "options",
    [{}, {"top": "batch1/", "junk": True}, {"compression": zipfile.ZIP_STORED}, {"mode": "RGB"}],
)
def test_central_directory_is_read_as_zipfile_reads_it(make_zip, options: dict):
    assert_lists_as_zipfile(make_zip("batch1_images.zip", 4, **options).path)


def _zip64_end_records(path: Path, monkeypatch) -> Path:
    """A zip of 4 members with ZIP64 end records (and names that are not ASCII)."""
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 3)  # a ZIP64 end record from 4 members
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in ["fg_bg_jpg/a.jpg", "bg_jpg/é.jpg", "x/ü ß", "y/plain"]:
            zf.writestr(name, name.encode() * 3)
    monkeypatch.undo()
    return path


@pytest.mark.parametrize("comment, prefix", [(b"", b""), (b"made by hand", b""), (b"", STUB)])
def test_zip64_directory_and_unicode_names_are_read(tmp_path: Path, monkeypatch, comment, prefix):
    path = _zip64_end_records(tmp_path / "z64.zip", monkeypatch)
    wrap_zip(path, comment, prefix)  # a comment after its ZIP64 records, or the whole zip moved
    with open(path, "rb") as f:
        assert b"PK\x06\x06" in f.read()  # really ZIP64
    assert_lists_as_zipfile(path)


# A zip comment (the longest one too), bytes before the zip, and both.
WRAPPED = [(b"made by hand", b""), (b"", STUB), (b"made by hand", STUB), (b"c" * 0xFFFF, b"")]


@pytest.mark.parametrize("comment, prefix", WRAPPED)
def test_a_comment_or_bytes_before_the_zip_are_read_by_the_fast_reader(
    make_zip, comment: bytes, prefix: bytes
):
    z = make_zip("batch1_images.zip", 4)
    offsets = [e.header_offset for e in directory_of(z.path)]
    assert_lists_as_zipfile(wrap_zip(z.path, comment, prefix))  # zipfile's shifted offsets too
    assert [e.header_offset - len(prefix) for e in directory_of(z.path)] == offsets


def test_unusual_zips_convert_alike(make_zip, tmp_path: Path):
    # A comment, bytes before the zip, both, members streamed with data descriptors, bytes after
    # the end record that are not its comment, ZIP64 fields on every member: the fast reader
    # lists them all, and all give the plain zip's shards.
    z = make_zip("batch1_images.zip", 5)
    variants = []
    for i, (comment, prefix) in enumerate(WRAPPED[:3]):
        variants.append(tmp_path / f"v{i}" / "batch1_images.zip")
        variants[-1].parent.mkdir()
        wrap_zip(Path(shutil.copy(z.path, variants[-1])), comment, prefix)
    variants.append(tmp_path / "zc" / "batch1_images.zip")  # a comment written by zipfile
    variants[-1].parent.mkdir()
    with zipfile.ZipFile(shutil.copy(z.path, variants[-1]), "a") as zf:
        zf.comment = b"made by zipfile"
    streamed = tmp_path / "s" / "batch1_images.zip"
    streamed.parent.mkdir()
    with zipfile.ZipFile(streamed, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in z.members.items():
            with zf.open(name, "w") as f:
                f.write(data)
    trailing = tmp_path / "t" / "batch1_images.zip"
    trailing.parent.mkdir()
    trailing.write_bytes(z.path.read_bytes() + b"not a comment")
    wide = tmp_path / "z64" / "batch1_images.zip"
    wide.parent.mkdir()
    zip64_members(Path(shutil.copy(z.path, wide)))
    assert all(directory_of(path) is not None for path in [*variants, streamed, trailing, wide])
    assert convert([z.path], tmp_path / "ref").ok
    expected = (tmp_path / "ref/train/batch01-000000.tar").read_bytes()
    for i, path in enumerate([*variants, streamed, trailing, wide]):
        assert convert([path], tmp_path / f"out{i}").ok
        assert (tmp_path / f"out{i}/train/batch01-000000.tar").read_bytes() == expected, path


# Bytes after the end record beyond its comment: after a plain zip, after a comment, after a
# stub-prefixed zip, the longest zipfile finds the record before; holding the record's signature
# without a whole record behind it (zipfile takes that last signature and refuses the zip).
TRAILING = [
    (b"", b"", b"not a comment"),
    (b"made by hand", b"", b"\0" * 1000),
    (b"made by hand", STUB, b"trailing"),
    (b"", b"", b"t" * 0x10000),  # the record starts 64 KiB + 22 bytes before the end
    (b"", b"", b"PK\x05\x06 and PK\x05\x06 " + bytes(10)),
]


@pytest.mark.parametrize("comment, prefix, trailing", TRAILING)
def test_bytes_after_the_end_record_are_read_by_the_fast_reader(
    make_zip, comment: bytes, prefix: bytes, trailing: bytes
):
    z = make_zip("batch1_images.zip", 4)
    offsets = [e.header_offset for e in directory_of(z.path)]
    wrap_zip(z.path, comment, prefix)
    listed = directory_of(z.path)
    z.path.write_bytes(z.path.read_bytes() + trailing)
    assert directory_of(z.path) == listed
    assert [e.header_offset - len(prefix) for e in listed] == offsets
    if END_MAGIC in trailing:
        with pytest.raises(zipfile.BadZipFile):
            zipfile.ZipFile(z.path)
    else:
        assert_lists_as_zipfile(z.path)


@pytest.mark.parametrize("comment", [b"", b"made by hand"])
def test_bytes_after_zip64_end_records_are_read_by_the_fast_reader(
    tmp_path: Path, monkeypatch, comment: bytes
):
    path = _zip64_end_records(tmp_path / "z64.zip", monkeypatch)
    wrap_zip(path, comment)
    path.write_bytes(path.read_bytes() + b"not a comment, PK\x06\x07 neither")
    assert_lists_as_zipfile(path)


def test_an_empty_end_record_in_bytes_after_the_zip_is_not_taken_for_it(make_zip):
    # Behind the real record, 22 bytes that read as the end record of an empty zip: zipfile
    # takes the last signature it finds and lists nothing; the fast reader lists the members.
    z = make_zip("batch1_images.zip", 3)
    listed = directory_of(z.path)
    z.path.write_bytes(z.path.read_bytes() + b"trailing PK\x05\x06" + bytes(18) + b"...")
    assert directory_of(z.path) == listed
    with zipfile.ZipFile(z.path) as zf:
        assert zf.namelist() == []


def test_an_end_record_further_back_than_zipfile_looks_is_not_taken(make_zip):
    # zipfile searches the last 64 KiB + 22 bytes for the record, so the fast reader does too:
    # a zip it lists, zipfile lists.
    z = make_zip("batch1_images.zip", 3)
    z.path.write_bytes(z.path.read_bytes() + b"t" * 0x10001)
    assert directory_of(z.path) is None
    with pytest.raises(zipfile.BadZipFile, match="not a zip file"):
        zipfile.ZipFile(z.path)


def test_zip64_member_fields_are_read_as_zipfile_reads_them(make_zip, tmp_path: Path):
    # Sizes and offsets in ZIP64 extra fields (a zip past 4 GiB has them): the fast reader lists
    # the zip and reads every member, giving zipfile's bytes and the plain zip's shards.
    z = make_zip("batch1_images.zip", 4)
    plain = directory_of(z.path)
    assert convert([z.path], tmp_path / "ref").ok
    zip64_members(z.path)
    data = z.path.read_bytes()
    assert data.count(b"\xff" * 8) >= len(plain)  # a size pair saturated in every entry
    assert_lists_as_zipfile(z.path)
    wide = directory_of(z.path)
    assert [(e.filename, e.file_size, e.CRC) for e in wide] == [
        (e.filename, e.file_size, e.CRC) for e in plain
    ]
    with MemberReader(z.path) as reader, zipfile.ZipFile(z.path) as zf:
        for name in zf.namelist():
            assert reader.read(name) == zf.read(name)
    assert convert([z.path], tmp_path / "out").ok
    tar = "train/batch01-000000.tar"
    assert (tmp_path / "out" / tar).read_bytes() == (tmp_path / "ref" / tar).read_bytes()


def test_a_unicode_path_field_still_sends_the_zip_to_zipfile(make_zip):
    # zipfile reads Info-ZIP's Unicode-path field (0x7075) its own way in newer Pythons.
    z = make_zip("batch1_images.zip", 2)
    name = b"fg_jpg/caf\xc3\xa9.jpg"
    field = b"\x01" + struct.pack("<L", zlib.crc32(name)) + name
    info = zipfile.ZipInfo(name.decode())
    info.extra = struct.pack("<HH", 0x7075, len(field)) + field
    with zipfile.ZipFile(z.path, "a") as zf:
        zf.writestr(info, b"x")
    assert directory_of(z.path) is None


def test_a_comment_holding_the_end_record_signature_is_not_taken_for_it(make_zip, tmp_path: Path):
    # The comment holds a whole end record, of an empty zip, then the signature alone. zipfile
    # takes the last signature it finds for the record; its comment length must reach the end
    # of the file, and these do not.
    z = make_zip("batch1_images.zip", 4)
    listed = directory_of(z.path)
    assert convert([z.path], tmp_path / "ref").ok
    wrap_zip(z.path, b"see PK\x05\x06" + bytes(18) + b" and PK\x05\x06 alone")
    assert directory_of(z.path) == listed
    assert convert([z.path], tmp_path / "out").ok
    tar = "train/batch01-000000.tar"
    assert (tmp_path / "out" / tar).read_bytes() == (tmp_path / "ref" / tar).read_bytes()


def test_damaged_zip_ends_fall_back_to_zipfile(make_zip, tmp_path: Path):
    # A directory that does not parse is left to zipfile, which reports it as before.
    z = make_zip("batch1_images.zip", 3)
    data = bytearray(z.path.read_bytes())
    start = data.rindex(b"PK\x01\x02")
    data[start : start + 4] = b"PK\x01\x09"  # the last directory entry's signature
    z.path.write_bytes(bytes(data))
    assert directory_of(z.path) is None
    summary = convert([z.path], tmp_path / "out")
    assert not summary.ok and "cannot open it as a zip" in summary.failed[0]["error"]


@pytest.mark.parametrize(
    "damage, error",
    [
        ("comment cut short", None),  # zipfile reads a comment shorter than its length says
        ("end record cut", "File is not a zip file"),
        ("directory too big", "Bad offset for central directory"),
    ],
)
def test_a_damaged_end_record_of_a_commented_zip_is_left_to_zipfile(
    make_zip, tmp_path: Path, caplog, damage: str, error: str | None
):
    z = make_zip("batch1_images.zip", 3)
    wrap_zip(z.path, b"made by hand", STUB)
    assert directory_of(z.path) is not None  # intact, the fast reader lists it
    data = bytearray(z.path.read_bytes())
    record = data.rindex(b"PK\x05\x06")
    if damage == "comment cut short":
        del data[-1]  # the record's comment length reaches past the end of the file
    elif damage == "end record cut":
        del data[record + 10 :]
    else:
        struct.pack_into("<L", data, record + 12, len(data))  # the directory's size
    z.path.write_bytes(bytes(data))
    assert directory_of(z.path) is None
    result = CliRunner().invoke(cli, ["convert", str(z.path), "--out", str(tmp_path / "out")])
    assert isinstance(result.exception, SystemExit | None)
    assert "Traceback" not in result.output + caplog.text
    if error is None:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 1
        assert f"{z.path}: cannot open it as a zip ({error})" in caplog.messages


def test_sample_json_is_what_json_dumps_gives():
    from pipeline.store.convert import sample_json

    for name in ["fg_bg_jpg/fg_bg_1_2_0_3.jpg", 'a"b\\c', "é/ü\u2028", "tab\there"]:
        names = {"fg_bg": name, "bg": "bg_jpg/bg_img_2.jpg", "mask": name + "m", "depth": "d"}
        assert sample_json(7, *names.values()) == json.dumps({"batch": 7, **names}).encode()


def test_shards_hashed_across_many_buffers_match_their_bytes(make_zip, tmp_path: Path, monkeypatch):
    from pipeline.store import tar as shardwriter

    z = make_zip("batch1_images.zip", 9)
    assert convert([z.path], tmp_path / "ref", shard_samples=4).ok
    monkeypatch.setattr(shardwriter, "WRITE_BUFFER", 3000)  # a hand-over every sample or so
    out = tmp_path / "small"
    assert convert([z.path], out, shard_samples=4).ok
    for shard in manifest_of(out)["splits"]["train"]["shards"]:
        data = (out / shard["path"]).read_bytes()
        assert data == (tmp_path / "ref" / shard["path"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest() and shard["bytes"] == len(data)


# ---------------------------------------------------------------- round trips


def test_synth_round_trip_byte_for_byte(tmp_path: Path):
    from pipeline.store.synth import synth_zip, synth_zips

    zips = synth_zips(tmp_path / "zips", batches=[1, 10], samples=12)
    # Batch 2 as the published generator wrote it: its flip=0 masks are PNGs named .jpg.
    zips.append(synth_zip(tmp_path / "zips/batch2_images.zip", 2, 12, png_masks=True))
    out = tmp_path / "shards"
    summary = convert(zips, out, shard_samples=5)
    assert summary.ok and summary.samples == {"train": 24, "test": 12} and summary.skipped == 0
    assert summary.formats["png"] > 0 and summary.formats["jpg"] == 36 * 4 - summary.formats["png"]
    assert verify_shards(out, workers=1, progress=False).ok
    samples = read_back(out)
    assert len(samples) == 36
    assert (
        sum(name.endswith(".png") for s in samples.values() for name in s) == summary.formats["png"]
    )
    for path in zips:
        with zipfile.ZipFile(path) as zf:
            zipped = {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}
        batch = int(path.name[5:].split("_")[0])
        fg_bgs = [n for n in zipped if n.startswith("fg_bg_jpg/")]
        names = {}
        for name in fg_bgs:
            fg, bg, flip, seq = map(int, name[len("fg_bg_jpg/fg_bg_") : -4].split("_"))
            s = f"{fg}_{bg}_{flip}_{seq}"
            names[SampleId(fg, bg, flip, seq)] = {
                "bg": f"bg_jpg/bg_img_{bg}.jpg",
                "fg_bg": name,
                "mask": f"mask_black_jpg/bg_mask_{s}.jpg",
                "depth": f"depth_fg_bg_jpg/depth_fg_bg_{s}.jpg",
            }
        assert len(names) == 12
        assert_matches_zip(samples, batch, zipped, names)


def test_manifest_follows_the_format(make_zip, tmp_path: Path):
    z1, z10 = make_zip("batch1_images.zip", 7), make_zip("batch10_images.zip", 3)
    out = tmp_path / "shards"
    assert convert([z1.path, z10.path], out, shard_samples=3).ok
    m = manifest_of(out)
    assert (m["format"], m["version"], m["mode"], m["channels"]) == ("pipeline-shards", 1, "L", 1)
    assert m["sizes"] == {
        "bg": [160, 160],
        "fg_bg": [160, 160],
        "mask": [160, 160],
        "depth": [80, 80],
    }
    assert m["test_batches"] == [10] and m["skipped"] == []
    train, test = m["splits"]["train"], m["splits"]["test"]
    assert [s["path"] for s in train["shards"]] == [f"train/batch01-00000{i}.tar" for i in range(3)]
    assert [s["samples"] for s in train["shards"]] == [3, 3, 1] and train["samples"] == 7
    assert [s["path"] for s in test["shards"]] == ["test/batch10-000000.tar"] and test[
        "samples"
    ] == 3
    for shard in train["shards"] + test["shards"]:
        data = (out / shard["path"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
        with tarfile.open(out / shard["path"]) as tar:
            for info in tar.getmembers():
                assert (info.mtime, info.uid, info.gid, info.mode) == (0, 0, 0, 0o444)
    sources = {s["zip"]: s for s in m["sources"]}
    assert (
        sources["batch1_images.zip"]["split"] == "train"
        and sources["batch1_images.zip"]["samples"] == 7
    )
    assert sources["batch10_images.zip"]["bytes"] == z10.path.stat().st_size
    assert len(sources["batch10_images.zip"]["fingerprint"]) == 64


def test_rgb_zip_round_trip(make_zip, tmp_path: Path):
    z = make_zip("batch2_images.zip", 5, mode="RGB")
    out = tmp_path / "shards"
    assert convert([z.path], out).ok
    assert (manifest_of(out)["mode"], manifest_of(out)["channels"]) == ("RGB", 3)
    assert verify_shards(out, workers=1, progress=False).ok
    assert_matches_zip(read_back(out), 2, z.members, z.samples)


def test_png_members_named_jpg_are_kept_under_their_format(make_zip, tmp_path: Path):
    z = make_zip("batch3_images.zip", 10, png_masks=True)  # flips alternate: 5 PNG masks
    out = tmp_path / "shards"
    summary = convert([z.path], out)
    assert summary.ok and summary.samples["train"] == 10 and summary.skipped == 0
    assert summary.formats == {"jpg": 35, "png": 5}
    assert "0 skipped, 5 PNG members kept" in summary.summary_line()
    assert summary.to_dict()["formats"] == {"jpg": 35, "png": 5}
    manifest = manifest_of(out)
    assert manifest["splits"]["train"]["formats"] == {"jpg": 35, "png": 5}
    assert manifest["splits"]["test"]["formats"] == {"jpg": 0, "png": 0}
    samples = read_back(out)
    for sample_id, names in z.samples.items():
        sample = samples[sample_key(3, sample_id)]
        assert ("mask.png" in sample) == (sample_id.flip == 0)
        assert json.loads(sample["json"])["mask"] == names["mask"]  # the zip's .jpg name
    assert_matches_zip(samples, 3, z.members, z.samples)
    assert verify_shards(out, workers=1, progress=False).ok


def _pil(image, fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt)
    return buffer.getvalue()


def test_png_members_get_the_jpeg_checks_and_other_formats_are_named(make_zip, tmp_path: Path):
    z = make_zip("batch4_images.zip", 8)  # backgrounds 1, 2, 3 (gray)
    names = list(z.samples.values())
    black = np.zeros((160, 160), np.uint8)
    rewrite_zip(
        z.path,
        {
            names[0]["mask"]: _pil(black, "GIF"),
            names[1]["depth"]: b"neither JPEG nor PNG",
            names[2]["fg_bg"]: _pil(np.zeros((160, 160, 3), np.uint8), "PNG"),  # RGB in an L zip
            names[4]["mask"]: _pil(np.zeros((160, 168), np.uint8), "PNG"),  # wrong size
            names[5]["depth"]: _pil(np.zeros((80, 80, 4), np.uint8), "PNG"),  # RGBA
            names[6]["mask"]: _pil(black, "PNG")[:-20],  # truncated
            names[7]["fg_bg"]: _pil(black, "PNG"),  # a gray PNG fg_bg in an L zip: fine
        },
    )
    summary = convert([z.path], tmp_path / "shards")
    assert summary.ok and summary.samples["train"] == 2 and summary.formats["png"] == 1
    reasons = {s["member"]: s["reason"] for s in manifest_of(tmp_path / "shards")["skipped"]}
    fg = [n["fg_bg"] for n in names]
    assert reasons == {
        fg[0]: f"mask member {names[0]['mask']}: GIF, not a JPEG or PNG image",
        fg[1]: f"depth member {names[1]['depth']}: unknown format, not a JPEG or PNG image",
        fg[2]: f"fg_bg member {fg[2]}: 3 colour components, expected 1 (the zip's backgrounds "
        "are mostly L)",
        fg[4]: f"mask member {names[4]['mask']}: 168x160, expected 160x160",
        fg[5]: f"depth member {names[5]['depth']}: PNG with an alpha channel (RGBA), not supported",
        fg[6]: f"mask member {names[6]['mask']}: truncated PNG (no IEND chunk at the end)",
    }


def test_png_backgrounds_decide_the_mode_like_jpegs(make_zip, tmp_path: Path):
    z = make_zip("batch5_images.zip", 6, mode="RGB")  # backgrounds 1, 2, 3
    names = list(z.samples.values())
    rgb = np.dstack([np.full((160, 160), v, np.uint8) for v in (10, 120, 250)])
    rewrite_zip(z.path, {names[0]["bg"]: _pil(rgb, "PNG"), names[1]["bg"]: _pil(rgb, "PNG")})
    summary = convert([z.path], tmp_path / "shards")
    assert summary.ok and summary.skipped == 0 and manifest_of(tmp_path / "shards")["mode"] == "RGB"
    assert_matches_zip(
        read_back(tmp_path / "shards"), 5, {**z.members, **_members(z.path)}, z.samples
    )


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}


def test_a_record_of_the_previous_convert_is_converted_again(make_zip, tmp_path: Path, caplog):
    # Version 1 of convert skipped PNG members: its records must not be reused.
    z = make_zip("batch1_images.zip", 4)
    out = tmp_path / "shards"
    assert convert([z.path], out).ok
    record = json.loads(record_path(out, 1).read_text())
    record["version"] = 1
    del record["formats"]
    record_path(out, 1).write_text(json.dumps(record))
    with caplog.at_level(logging.INFO):
        again = convert([z.path], out)
    assert again.converted == ["batch1_images.zip"] and not again.reused
    assert "not a record of this version of convert" in caplog.text


def test_real_sample_packed_in_published_layout(real_sample_dir: Path, tmp_path: Path):
    members = {
        "bg_jpg/bg_img_51.jpg": "bg_img_51.jpg",
        "fg_bg_jpg/fg_bg_9_51_1_2.jpg": "fg_bg_9_51_1_2.jpg",
        "mask_black_jpg/bg_mask_9_51_1_2.jpg": "bg_mask_9_51_1_2.jpg",
        "depth_fg_bg_jpg/depth_fg_bg_9_51_1_2.jpg": "depth_fg_bg_9_51_1_2.jpg",
    }
    path = tmp_path / "batch10_images.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for folder in (
            "bg_jpg/",
            "fg_bg_jpg/",
            "mask_black_jpg/",
            "depth_fg_bg_jpg/",
            "fg_jpg/",
            "mask_jpg/",
        ):
            zf.writestr(folder, b"")
        for member, file in members.items():
            zf.writestr(member, (real_sample_dir / file).read_bytes())
    out = tmp_path / "shards"
    summary = convert([path], out)
    assert summary.ok and summary.samples == {"train": 0, "test": 1} and summary.skipped == 0
    assert manifest_of(out)["mode"] == "L"
    assert verify_shards(out, workers=1, progress=False).ok
    zipped = {m: (real_sample_dir / f).read_bytes() for m, f in members.items()}
    names = {
        SampleId(9, 51, 1, 2): dict(zip(("bg", "fg_bg", "mask", "depth"), members, strict=True))
    }
    assert_matches_zip(read_back(out), 10, zipped, names)


# ---------------------------------------------------------------- bad inputs


def test_broken_samples_are_skipped_and_reported(make_zip, tmp_path: Path, caplog):
    z = make_zip(
        samples=8, drop={1: "mask", 2: "depth"}, truncate={3: "fg_bg"}, wrong_size={4: "depth"}
    )
    out = tmp_path / "shards"
    with caplog.at_level(logging.WARNING):
        summary = convert([z.path], out, test_batches=())
    assert summary.ok and summary.samples["train"] == 4 and summary.skipped == 4
    skipped = {s["member"]: s for s in manifest_of(out)["skipped"]}
    ids = list(z.samples)
    reasons = {i: skipped[z.samples[ids[i]]["fg_bg"]]["reason"] for i in (1, 2, 3, 4)}
    assert "missing mask" in reasons[1] and "missing depth" in reasons[2]
    assert "truncated" in reasons[3] and "88x80, expected 80x80" in reasons[4]
    assert all(s["zip"] == "batch1_images.zip" for s in skipped.values())
    for member, skip in skipped.items():  # one warning line per skip: zip, member, reason
        assert any(member in r.message and skip["reason"] in r.message for r in caplog.records)
    assert verify_shards(out, workers=1, progress=False).ok


def test_damaged_member_is_skipped_and_stored_members_are_read(make_zip, tmp_path: Path):
    z = make_zip(samples=4)
    victim = z.samples[list(z.samples)[1]]["mask"]
    with zipfile.ZipFile(z.path) as zf:
        info = zf.getinfo(victim)
    data = bytearray(z.path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF  # inside the compressed bytes
    z.path.write_bytes(bytes(data))
    out = tmp_path / "shards"
    summary = convert([z.path], out)
    assert summary.ok and summary.samples["train"] == 3
    (skip,) = manifest_of(out)["skipped"]
    assert skip["reason"].startswith(f"mask member {victim}: cannot read it")
    stored = make_zip("batch2_images.zip", samples=3, compression=zipfile.ZIP_STORED)
    assert convert([stored.path], tmp_path / "stored").samples["train"] == 3
    assert_matches_zip(read_back(tmp_path / "stored"), 2, stored.members, stored.samples)


def test_missing_background_and_duplicates(make_zip, tmp_path: Path):
    z = make_zip(samples=4, drop={0: "bg"})  # bg 1 is shared by samples 0 and 3 (3 backgrounds)
    out = tmp_path / "shards"
    summary = convert([z.path], out, test_batches=())
    assert summary.samples["train"] == 2 and summary.skipped == 2
    assert all("missing bg" in s["reason"] for s in manifest_of(out)["skipped"])


def test_top_folder_and_junk_are_tolerated(make_zip, tmp_path: Path):
    z = make_zip(samples=5, top="batch1/", junk=True)
    out = tmp_path / "shards"
    summary = convert([z.path], out)
    assert summary.ok and summary.samples["train"] == 5 and summary.skipped == 0
    samples = read_back(out)
    assert_matches_zip(samples, 1, z.members, z.samples)  # names keep the top folder
    assert all(
        json.loads(s["json"])["fg_bg"].startswith("batch1/fg_bg_jpg/") for s in samples.values()
    )


def test_upper_case_folders_convert_and_odd_fg_bg_members_are_reported(make_zip, tmp_path: Path):
    z = make_zip(samples=4, junk=True)
    fg_bg, mask, depth = encode(160, 160, 1), encode(160, 160, 2), encode(80, 80, 3)
    extra = {}
    for top, s in (("", "7_1_0_9"), ("batch1/", "8_1_0_9")):  # upper-case sample folders
        extra[f"{top}FG_BG_JPG/fg_bg_{s}.jpg"] = fg_bg
        extra[f"{top}MASK_BLACK_JPG/bg_mask_{s}.jpg"] = mask
        extra[f"{top}Depth_Fg_Bg_Jpg/depth_fg_bg_{s}.jpg"] = depth
    odd = {  # each claims to be a sample; none may vanish without a word
        "fg_bg_jpg/sub/fg_bg_1_1_0_1.jpg": "in a folder inside fg_bg_jpg/",
        "batch1/FG_BG_JPG/deeper/fg_bg_9_1_0_9.jpg": "in a folder inside fg_bg_jpg/",
        "fg_bg_jpg/fg_bg_9_1_2_9.jpg": "flip 2 in its name is not 0 or 1",
        "fg_bg_jpg/fg_bg_9_1_0_9.png": "not a sample name",
    }
    extra.update(dict.fromkeys(odd, fg_bg))
    extra.update({"fg_bg_jpg/sub/": b"", "fg_bg_jpg/Thumbs.db": b"x", "mask_jpg/other.png": b"x"})
    with zipfile.ZipFile(z.path, "a") as zf:
        for name, data in extra.items():
            zf.writestr(name, data)
    out = tmp_path / "shards"
    summary = convert([z.path], out)
    assert summary.ok and summary.samples["train"] == 6  # 4 + both upper-case samples
    keys = set(read_back(out))
    assert {sample_key(1, SampleId(7, 1, 0, 9)), sample_key(1, SampleId(8, 1, 0, 9))} <= keys
    reasons = {s["member"]: s["reason"] for s in manifest_of(out)["skipped"]}
    assert set(reasons) == set(odd)  # junk, directories and other folders stay ignored
    for name, reason in odd.items():
        assert reason in reasons[name], name


def test_backslash_separated_names_convert_or_are_reported(make_zip, tmp_path: Path):
    # Windows tools (.NET's ZipFile before 4.6.1, Compress-Archive) write `fg_bg_jpg\\x.jpg`:
    # unzip reads the backslash as a folder. Such a sample was ignored without a word.
    z = make_zip(samples=4)
    with zipfile.ZipFile(z.path) as zf:
        entries = {i.filename: zf.read(i) for i in zf.infolist()}
    windows = {n.replace("/", "\\"): data for n, data in entries.items()}
    deeper = "fg_bg_jpg\\sub\\fg_bg_9_1_0_9.jpg"  # in a folder inside fg_bg_jpg/: reported
    windows[deeper] = entries["fg_bg_jpg/fg_bg_1_1_0_1.jpg"]
    with zipfile.ZipFile(z.path, "w") as zf:
        for name, data in windows.items():
            zf.writestr(name, data)
    out = tmp_path / "shards"
    summary = convert([z.path], out)
    assert summary.ok and summary.samples["train"] == 4
    assert [s["member"] for s in manifest_of(out)["skipped"]] == [deeper]
    meta = json.loads(read_back(out)[sample_key(1, SampleId(1, 1, 0, 1))]["json"])
    assert meta["fg_bg"] == "fg_bg_jpg\\fg_bg_1_1_0_1.jpg"  # the name as in the zip


def test_article_naming_style(make_zip, tmp_path: Path):
    z = make_zip(samples=4, article=True)
    assert any("/bg_1.jpg" in n for n in z.members) and any("/depth_1_" in n for n in z.members)
    out = tmp_path / "shards"
    assert convert([z.path], out).samples["train"] == 4
    assert_matches_zip(read_back(out), 1, z.members, z.samples)


def test_a_file_that_is_not_a_zip_fails_alone(make_zip, tmp_path: Path, caplog):
    good = make_zip("batch1_images.zip", 3)
    bad = tmp_path / "batch2_images.zip"
    bad.write_bytes(b"this is not a zip file at all")
    out = tmp_path / "shards"
    summary = convert([bad, good.path], out)
    assert not summary.ok and summary.samples["train"] == 3
    failed = {f["zip"]: f["error"] for f in summary.failed}
    assert set(failed) == {str(bad)}
    assert "cannot open it as a zip" in failed[str(bad)]
    assert any(str(bad) in r.message and r.levelno == logging.ERROR for r in caplog.records)
    # The good zip's shards are listed, but the folder is not complete: verify names the bad zip.
    assert [f["zip"] for f in manifest_of(out)["failed"]] == ["batch2_images.zip"]
    report = verify_shards(out, workers=1, progress=False)
    assert not report.ok and "batch2_images.zip was not converted" in report.problem_lines()[0]


def test_bad_arguments_raise_before_any_work(make_zip, tmp_path: Path):
    z = make_zip("batch1_images.zip", 2)
    out = tmp_path / "shards"
    with pytest.raises(ValueError, match="batch number"):
        convert([z.path, tmp_path / "images.zip"], out)
    twin = tmp_path / "other" / "batch01_images.zip"
    twin.parent.mkdir()
    twin.write_bytes(z.path.read_bytes())
    with pytest.raises(ValueError, match="both batch 1"):
        convert([z.path, twin], out)
    with pytest.raises(ValueError, match="batch3_images.zip: no such zip file"):
        convert([z.path, tmp_path / "batch3_images.zip"], out)
    assert not out.exists()


def test_zip_without_samples_fails(tmp_path: Path):
    path = tmp_path / "batch4_images.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "nothing here")
    summary = convert([path], tmp_path / "shards")
    assert not summary.ok and "no fg_bg_jpg/ members" in summary.failed[0]["error"]
    assert not (tmp_path / "shards" / "manifest.json").exists()


def test_a_zip_whose_every_sample_is_skipped_says_why(make_zip, tmp_path: Path):
    # Its skips go in no record: the error gave no reason ("all skipped") for any of them.
    z = make_zip(samples=3, wrong_size={i: "depth" for i in range(3)})
    summary = convert([z.path], tmp_path / "shards")
    error = summary.failed[0]["error"]
    assert not summary.ok and "all 3 skipped" in error
    assert "depth member depth_fg_bg_jpg/depth_fg_bg_" in error and "88x80, expected 80x80" in error
    first = min(names["fg_bg"] for names in z.samples.values())  # by name, not written order
    assert f"the first, {first}: depth member" in error


def test_strict_makes_a_skip_fatal(make_zip, tmp_path: Path):
    bad, good = (
        make_zip("batch1_images.zip", 4, truncate={2: "mask"}),
        make_zip("batch2_images.zip", 3),
    )
    out = tmp_path / "shards"
    summary = convert([bad.path, good.path], out, strict=True)
    assert not summary.ok and summary.samples["train"] == 3
    (failure,) = summary.failed
    assert (
        "--strict" in failure["error"]
        and bad.samples[list(bad.samples)[2]]["fg_bg"] in failure["error"]
    )
    assert not list((out / "train").glob("batch01-*")) and not record_path(out, 1).exists()
    # Without --strict the same zip converts; with it again, the completed record is not trusted.
    assert convert([bad.path], out).ok
    assert not convert([bad.path], out, strict=True).ok


def test_zip_of_another_mode_fails(make_zip, tmp_path: Path):
    out = tmp_path / "shards"
    assert convert([make_zip("batch1_images.zip", 3).path], out).ok
    summary = convert([make_zip("batch2_images.zip", 3, mode="RGB").path], out)
    assert not summary.ok and "holds L images" in summary.failed[0]["error"]
    assert manifest_of(out)["mode"] == "L" and summary.samples["train"] == 3


def test_the_mode_is_the_backgrounds_majority(make_zip, tmp_path: Path):
    # One RGB fg_bg in a gray zip, at each place in turn: wherever the shuffle puts it (first
    # included), the zip is L and only that sample is skipped, for its channel count.
    for stray in range(4):
        z = make_zip("batch1_images.zip", 4)  # one batch and seed: the same shuffled order
        member = z.samples[list(z.samples)[stray]]["fg_bg"]
        rewrite_zip(z.path, {member: encode(160, 160, 99, channels=3)})
        out = tmp_path / f"out{stray}"
        summary = convert([z.path], out)
        assert summary.ok and summary.samples["train"] == 3, stray
        (skip,) = manifest_of(out)["skipped"]
        assert skip["member"] == member and manifest_of(out)["mode"] == "L"
        assert skip["reason"].startswith(f"fg_bg member {member}: 3 colour components, expected 1")
    # A stray RGB background: the samples on it are skipped, naming it; the rest convert.
    z = make_zip("batch9_images.zip", 6)  # backgrounds 1, 2, 3; samples 1 and 4 use bg 2
    bg2 = z.samples[list(z.samples)[1]]["bg"]
    rewrite_zip(z.path, {bg2: encode(160, 160, 98, channels=3)})
    summary = convert([z.path], tmp_path / "bg")
    assert summary.ok and summary.samples["train"] == 4 and summary.skipped == 2
    reasons = {s["reason"] for s in manifest_of(tmp_path / "bg")["skipped"]}
    mostly = "(the zip's backgrounds are mostly L)"
    assert reasons == {f"bg member {bg2}: 3 colour components, expected 1 {mostly}"}


def test_duplicate_members_skip_the_samples_that_need_them(make_zip, tmp_path: Path, caplog):
    z = make_zip(samples=6)  # samples 0, 3 on bg 1; 1, 4 on bg 2; 2, 5 on bg 3
    ids = list(z.samples)
    names = [z.samples[i] for i in ids]
    twins = {
        "copy/" + names[0]["mask"]: encode(160, 160, 71),  # a top-folder copy beside the root one
        f"depth_fg_bg_jpg/depth_{ids[2].stem()}.jpg": encode(80, 80, 72),  # the article's name
        "bg_jpg/bg_2.jpg": encode(160, 160, 73),  # both naming styles of background 2
    }
    rewrite_zip(z.path, twins)
    out = tmp_path / "shards"
    with caplog.at_level(logging.WARNING):
        summary = convert([z.path], out)
    assert summary.ok and summary.samples["train"] == 2 and summary.skipped == 4
    skipped = {s["member"]: s["reason"] for s in manifest_of(out)["skipped"]}
    mask0, depth2, bg2 = twins
    assert skipped[names[0]["fg_bg"]] == (
        f"duplicate mask members for {ids[0].stem()}: {names[0]['mask']} and {mask0}"
    )
    assert skipped[names[2]["fg_bg"]] == (
        f"duplicate depth members for {ids[2].stem()}: {names[2]['depth']} and {depth2}"
    )
    for i in (1, 4):
        assert skipped[names[i]["fg_bg"]] == (
            f"duplicate bg members for background 2: {names[1]['bg']} and {bg2}"
        )
    assert sorted(json.loads(s["json"])["fg_bg"] for s in read_back(out).values()) == sorted(
        names[i]["fg_bg"] for i in (3, 5)
    )
    assert sum("duplicate" in r.message for r in caplog.records) == 4


@pytest.mark.parametrize("bad_first", [False, True])
def test_a_sample_member_listed_twice_under_one_name_is_not_guessed(
    make_zip, tmp_path: Path, bad_first: bool
):
    # Reads go by name and take the last entry: "the first is converted, this one reported"
    # reported the copy whose bytes were converted, or lost the sample to the other copy.
    z = make_zip(samples=3)
    name = z.samples[SampleId(1, 1, 0, 1)]["fg_bg"]
    with zipfile.ZipFile(z.path) as zf:
        entries = [(i.filename, zf.read(i)) for i in zf.infolist()]
    entries.insert(0 if bad_first else len(entries), (name, b"not an image"))
    with zipfile.ZipFile(z.path, "w") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        for member, data in entries:
            zf.writestr(member, data)
    out = tmp_path / "shards"
    assert convert([z.path], out).ok
    assert sample_key(1, SampleId(1, 1, 0, 1)) not in read_back(out)
    reasons = [s["reason"] for s in manifest_of(out)["skipped"]]
    assert reasons == [
        f"duplicate of sample member {name}",
        f"duplicate fg_bg members for 1_1_0_1: {name} and {name}",
    ]


# ---------------------------------------------------------------- re-runs and interruptions


def shard_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.tar")
    }


def test_rerun_redoes_nothing(make_zip, tmp_path: Path):
    zips = [make_zip("batch1_images.zip", 5).path, make_zip("batch10_images.zip", 2).path]
    out = tmp_path / "shards"
    first = convert(zips, out, shard_samples=2)
    before, manifest = shard_stats(out), manifest_of(out)
    again = convert(zips, out, shard_samples=2)
    assert again.ok and len(again.reused) == 2 and not again.converted
    assert again.to_dict()["reused"] == 2 and again.to_dict()["converted"] == 0
    assert shard_stats(out) == before and manifest_of(out) == manifest
    assert again.samples == first.samples
    forced = convert(zips, out, shard_samples=2, force=True)
    assert len(forced.converted) == 2 and manifest_of(out) == manifest  # same bytes again


def test_a_changed_shard_of_the_same_size_is_redone(make_zip, tmp_path: Path, caplog):
    z1, z2 = make_zip("batch1_images.zip", 5), make_zip("batch2_images.zip", 3)
    out = tmp_path / "shards"
    assert convert([z1.path, z2.path], out, shard_samples=3).ok
    shard = out / "train" / "batch01-000001.tar"
    good = shard.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 3] ^= 0xFF  # same size: only the sha256 can tell
    shard.write_bytes(bytes(bad))
    with caplog.at_level(logging.INFO):
        summary = convert([z1.path, z2.path], out, shard_samples=3)
    assert summary.ok and summary.converted == [z1.name] and summary.reused == [z2.name]
    assert any(str(shard) in r.message and "sha256" in r.message for r in caplog.records)
    (entry,) = [
        e
        for e in json.loads(record_path(out, 1).read_text())["shards"]
        if e["path"] == "train/batch01-000001.tar"
    ]
    assert shard.read_bytes() == good and hashlib.sha256(good).hexdigest() == entry["sha256"]
    assert verify_shards(out, workers=1, progress=False).ok
    # Another run's zip (not given) with a changed shard is left out of the manifest, and said so.
    shard.write_bytes(bytes(bad))
    summary = convert([z2.path], out)
    assert not summary.ok and summary.failed[0]["zip"] == z1.name
    assert "sha256 differs" in summary.failed[0]["error"]
    assert [s["zip"] for s in manifest_of(out)["sources"]] == [z2.name]


def test_changed_options_or_zip_redo_it(make_zip, tmp_path: Path):
    from conftest import build_zip

    z = make_zip("batch1_images.zip", 5)
    out = tmp_path / "shards"
    convert([z.path], out, shard_samples=2)
    assert len(convert([z.path], out, shard_samples=3).converted) == 1
    assert sorted(shard_stats(out)) == ["train/batch01-000000.tar", "train/batch01-000001.tar"]
    build_zip(z.path, 6, seed=1)  # new content, same name
    summary = convert([z.path], out, shard_samples=3)
    assert len(summary.converted) == 1 and summary.samples["train"] == 6
    summary = convert([z.path], out, shard_samples=3, test_batches=(1,))  # now a test batch
    assert len(summary.converted) == 1 and summary.samples == {"train": 0, "test": 6}
    assert not list((out / "train").glob("*.tar"))


def test_interrupted_conversion_is_completed(make_zip, tmp_path: Path):
    zips = [make_zip("batch1_images.zip", 4).path, make_zip("batch2_images.zip", 4).path]
    out = tmp_path / "shards"
    convert(zips, out, shard_samples=3)
    expected = manifest_of(out)
    # As if killed while writing batch 2: no manifest, no record, a temp shard and a stale shard.
    (out / "manifest.json").unlink()
    record_path(out, 2).unlink()
    (out / "train" / "batch02-000000.tar").rename(out / "train" / "batch02-000000.tar.tmp")
    with pytest.raises(ValueError, match="not a finished conversion"):
        verify_shards(out, workers=1, progress=False)
    summary = convert(zips, out, shard_samples=3)
    assert (
        summary.ok
        and summary.reused == ["batch1_images.zip"]
        and summary.converted == ["batch2_images.zip"]
    )
    assert manifest_of(out) == expected and not list(out.rglob("*.tmp"))
    assert verify_shards(out, workers=1, progress=False).ok


def test_a_crash_mid_zip_leaves_no_shard_or_record(make_zip, tmp_path: Path, monkeypatch):
    from pipeline.store import tar as shardwriter

    z = make_zip("batch1_images.zip", 6)
    out = tmp_path / "shards"
    original = shardwriter.ShardWriter.write

    def write(self, key, fields):
        if self._count == 2 and len(self.shards) == 2:
            raise OSError("No space left on device")
        original(self, key, fields)

    monkeypatch.setattr(shardwriter.ShardWriter, "write", write)
    summary = convert([z.path], out, shard_samples=3)
    assert not summary.ok and "No space left" in summary.failed[0]["error"]
    assert not list(out.rglob("*.tar*")) and not record_path(out, 1).exists()
    monkeypatch.undo()
    assert convert([z.path], out, shard_samples=3).ok


def test_adding_a_zip_later_keeps_the_others(make_zip, tmp_path: Path):
    z1, z2 = make_zip("batch1_images.zip", 3), make_zip("batch2_images.zip", 4)
    out = tmp_path / "shards"
    convert([z1.path], out)
    before = shard_stats(out)
    summary = convert([z2.path], out)  # another machine's subset, or a zip downloaded later
    assert summary.ok and summary.samples["train"] == 7 and summary.zips == 1
    assert {s["zip"] for s in manifest_of(out)["sources"]} == {z1.name, z2.name}
    assert all(shard_stats(out)[k] == v for k, v in before.items())
    assert verify_shards(out, workers=1, progress=False).ok


def test_a_folder_copied_without_its_records_does_not_lose_its_samples(make_zip, tmp_path: Path):
    # `cp -r shards/* copy/` leaves the hidden .parts behind; adding a zip to the copy rebuilt
    # the manifest from the records alone and dropped the 6 samples it listed, without a word.
    z1, z2 = make_zip("batch1_images.zip", 6), make_zip("batch2_images.zip", 4)
    first = tmp_path / "first"
    assert convert([z1.path], first).ok
    copy = tmp_path / "copy"
    shutil.copytree(first, copy, ignore=shutil.ignore_patterns(".parts"))
    assert verify_shards(copy, workers=1, progress=False).ok
    summary = convert([z2.path], copy)
    assert not summary.ok and "batch1_images.zip" in summary.failed[0]["error"]
    assert "lists 6 of its samples" in summary.failed[0]["error"]
    assert [f["zip"] for f in manifest_of(copy)["failed"]] == ["batch1_images.zip"]
    report = verify_shards(copy, workers=1, progress=False)
    assert not report.ok and "batch1_images.zip" in report.problems[0]["problem"]
    summary = convert([z1.path, z2.path], copy)  # given again: converted again, all there
    assert summary.ok and summary.samples["train"] == 10 and not manifest_of(copy)["failed"]
    assert verify_shards(copy, workers=1, progress=False).ok


def test_forgetting_a_killed_zip_removes_the_shards_it_left(make_zip, tmp_path: Path):
    # A convert killed (-9) mid-zip leaves its temp shards, or renamed ones without a record;
    # --forget-failed forgot the zip but left them (stray `*.tar` files are read by a glob).
    z1, z2 = make_zip("batch1_images.zip", 6), make_zip("batch2_images.zip", 4)
    out = tmp_path / "shards"
    assert convert([z1.path, z2.path], out, shard_samples=2).ok
    record_path(out, 2).unlink()  # as the kill leaves it: shards renamed, no record yet
    (out / "train" / "batch02-000000.tar").rename(out / "train" / "batch02-000000.tar.tmp")
    write_failure(out, 2, z2.name, "killed")
    summary = convert([z1.path], out, shard_samples=2, forget_failed=True)
    assert summary.ok and summary.samples["train"] == 6 and not manifest_of(out)["failed"]
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        f"batch01-00000{i}.tar" for i in range(3)
    ]


def test_split_routing_and_empty_test_warning(make_zip, tmp_path: Path, caplog):
    z1, z3 = make_zip("batch1_images.zip", 2), make_zip("batch3_images.zip", 3)
    with caplog.at_level(logging.WARNING):
        summary = convert([z1.path, z3.path], tmp_path / "a", test_batches=(3, 7))
    assert summary.samples == {"train": 2, "test": 3}
    assert (tmp_path / "a" / "test" / "batch03-000000.tar").is_file()
    assert not any("test split is empty" in r.message for r in caplog.records)
    with caplog.at_level(logging.WARNING):
        summary = convert([z1.path, z3.path], tmp_path / "b")
    assert summary.ok and summary.samples == {"train": 5, "test": 0}
    assert any("test split is empty" in r.message for r in caplog.records)


def test_two_workers_write_the_same_shards(make_zip, tmp_path: Path):
    zips = [make_zip(f"batch{b}_images.zip", 5, seed=b).path for b in (1, 2, 10)]
    one, two = tmp_path / "one", tmp_path / "two"
    assert convert(zips, one, shard_samples=2).ok
    assert convert(zips, two, shard_samples=2, workers=2).ok
    assert manifest_of(one)["splits"] == manifest_of(two)["splits"]


# ---------------------------------------------------------------- the command line


def test_cli_json_prints_only_the_summary(make_zip, tmp_path: Path):
    z = make_zip("batch1_images.zip", 3)
    out = tmp_path / "shards"
    result = CliRunner().invoke(cli, ["convert", str(z.path), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["converted"] == 1 and summary["samples"] == {"train": 3, "test": 0}
    assert summary["failed"] == [] and summary["out"] == str(out) and summary["shards"] == 1
    bad = tmp_path / "batch2_images.zip"
    bad.write_text("not a zip")
    result = CliRunner().invoke(
        cli, ["convert", str(z.path), str(bad), "--out", str(out), "--json"]
    )
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["reused"] == 1 and summary["failed"][0]["zip"] == str(bad)
    (tmp_path / "x.zip").write_bytes(z.path.read_bytes())
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "x.zip"), "--out", str(out)])
    assert result.exit_code == 1 and "batch number" in result.stderr


def test_rerun_of_the_same_zip_data_gives_identical_bytes(tmp_path: Path):
    # Same zip bytes converted twice into different folders: identical shards (fixed metadata).
    from conftest import build_zip

    z: BatchZip = build_zip(tmp_path / "batch5_images.zip", 4)
    a, b = convert([z.path], tmp_path / "a"), convert([z.path], tmp_path / "b")
    assert a.ok and b.ok
    assert (tmp_path / "a/train/batch05-000000.tar").read_bytes() == (
        tmp_path / "b/train/batch05-000000.tar"
    ).read_bytes()


def test_a_broken_record_of_another_run_is_reported(make_zip, tmp_path: Path):
    z1, z2 = make_zip("batch1_images.zip", 3), make_zip("batch2_images.zip", 2)
    out = tmp_path / "shards"
    convert([z1.path, z2.path], out)
    (out / "train" / "batch01-000000.tar").unlink()  # batch 1's shard lost; its zip not given
    summary = convert([z2.path], out)
    assert not summary.ok and summary.failed[0]["zip"] == "batch1_images.zip"
    assert "missing or has changed size" in summary.failed[0]["error"]
    assert [s["zip"] for s in manifest_of(out)["sources"]] == ["batch2_images.zip"]
    assert convert([z1.path, z2.path], out).ok  # given its zip again, batch 1 is redone


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_bar_counts_samples_on_a_terminal(make_zip, tmp_path: Path, monkeypatch, workers):
    zips = [make_zip(f"batch{b}_images.zip", 4 + b).path for b in (1, 2)]
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert convert(zips, tmp_path / "shards", workers=workers, progress=True).ok
    assert "11/11" in terminal.getvalue()


@pytest.mark.skipif(shutil.which("unzip") is None, reason="the unzip command is not installed")
def test_bench_convert_measures_every_step(make_zip, tmp_path: Path, monkeypatch):
    import tempfile

    from pipeline.bench.convert import run_bench_convert

    zips = [make_zip(f"batch{b}_images.zip", 6, seed=b).path for b in (1, 2)]
    result = run_bench_convert(zips, tmp_path / "work", repeat=1)
    assert result["samples"] == 6 and result["workers_samples"] == 12
    for key in ("unzip_s", "read_s", "convert_s", "workers1_s", "workers2_s"):
        assert result[key] > 0
    assert result["convert_vs_unzip"] > 0 and result["convert_vs_read"] > 0
    assert result["workers_speedup"] > 0
    assert not list((tmp_path / "work").iterdir())  # its temporary folders are gone
    # No zip and no --work: two zips synthesized in a temporary folder, removed afterwards.
    (tmp_path / "temp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    synthesized = run_bench_convert([], None, synth_samples=3, repeat=1)
    assert synthesized["samples"] == 3 and synthesized["workers_samples"] == 6
    assert not list((tmp_path / "temp").iterdir())


def test_bench_convert_refuses_bad_use(make_zip, tmp_path: Path):
    from pipeline.bench.convert import run_bench_convert

    z = make_zip("batch1_images.zip", 2).path
    nameless = tmp_path / "images.zip"
    nameless.write_bytes(z.read_bytes())
    for zips, synth, message in (
        ([], None, "give a ZIP, or --synth N"),
        ([z], 5, "not both"),
        ([z, z, z], None, "one or two zips"),
        ([z, nameless], None, "batch number"),
        ([z, z], None, "both batch 1"),
    ):
        with pytest.raises(ValueError, match=message):
            run_bench_convert(zips, tmp_path / "work", synth)
    assert not (tmp_path / "work").exists()  # refused before any work
    result = CliRunner().invoke(cli, ["bench", "convert", str(nameless)])
    assert result.exit_code == 1 and "error:" in result.stderr and "batch number" in result.stderr


def damaged_inside(data: bytes) -> bytes:
    """A JPEG whose scan data is zeroed, its headers and end marker kept: it passes the cheap
    checks and fails to decode."""
    return data[:200] + bytes(len(data) - 202) + data[-2:]


def test_decode_skips_images_damaged_past_their_headers(make_zip, tmp_path: Path):
    z = make_zip(samples=6)
    (first, names), (second, _) = sorted(z.samples.items())[:2]
    entries = dict(z.members)
    entries[names["fg_bg"]] = damaged_inside(entries[names["fg_bg"]])
    bg = z.samples[second]["bg"]  # the background of the second sample (and others on it)
    entries[bg] = damaged_inside(entries[bg])
    with zipfile.ZipFile(z.path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    on_bg = [s for s, n in z.samples.items() if n["bg"] == bg]
    assert first not in on_bg
    out = tmp_path / "shards"
    plain = convert([z.path], out, test_batches=())
    assert plain.ok and plain.written == 6  # the cheap checks pass them all
    found = CliRunner().invoke(cli, ["verify", str(out), "--workers", "1"])
    assert found.exit_code == 1 and "fg_bg.jpg: undecodable image" in found.stderr
    assert f"again with --decode (pipeline convert ZIP... --out {out} --decode)" in found.stderr
    again = convert([z.path], out, test_batches=(), decode=True)  # no --force: redone
    assert again.ok and again.converted == [z.name]
    assert again.written == 6 - 1 - len(on_bg) and again.skipped == 1 + len(on_bg)
    reasons = {
        s["member"]: s["reason"] for s in json.loads(record_path(out, 1).read_text())["skipped"]
    }
    assert reasons[names["fg_bg"]].startswith(f"fg_bg member {names['fg_bg']}: undecodable image")
    for sample in on_bg:
        assert reasons[z.samples[sample]["fg_bg"]].startswith(f"bg member {bg}: undecodable image")
    assert verify_shards(out, workers=1, progress=False).ok
    assert convert([z.path], out, test_batches=(), decode=True).reused == [z.name]
    assert convert([z.path], out, test_batches=()).reused == [z.name]  # decoded serves plain too
