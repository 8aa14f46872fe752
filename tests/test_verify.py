"""verify: a good conversion passes; each kind of damage fails with the shard (and sample) named."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import build_zip, encode, encode_png_mask
from test_images import declaring_jpeg, declaring_png

import pipeline.images
from pipeline.cli import cli
from pipeline.store.catalog import write_wids_indexes
from pipeline.store.runner import ConvertConfig, convert_zips
from pipeline.store.tar import tar_member
from pipeline.store.verify import verify_shards

TRAIN0 = "train/batch01-000000.tar"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A finished conversion (batch 1: 7 train samples in 3 shards, batch 10: 3 test samples)."""
    root = tmp_path_factory.mktemp("converted")
    zips = [build_zip(root / "batch1_images.zip", 7).path]
    zips.append(build_zip(root / "batch10_images.zip", 3, seed=5).path)
    summary = convert_zips(
        zips, ConvertConfig(out=root / "shards", shard_samples=3, progress=False)
    )
    assert summary.ok
    return root / "shards"


@pytest.fixture
def shards(converted: Path, tmp_path: Path) -> Path:
    """A private copy of the conversion, for a test to damage."""
    return Path(shutil.copytree(converted, tmp_path / "shards"))


def verify(root: Path, workers: int = 1):
    return verify_shards(root, workers=workers, progress=False)


def problems_of(report) -> list[tuple[str | None, str | None, str]]:
    return [(p["shard"], p["sample"], p["problem"]) for p in report.problems]


def edit_manifest(root: Path, change) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def replace_shard(root: Path, rel: str, data: bytes) -> None:
    """Write a shard and update its manifest entry, so only its content can be at fault."""
    (root / rel).write_bytes(data)

    def change(manifest):
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                if shard["path"] == rel:
                    shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        write_wids_indexes(root, manifest)  # the indexes list sizes too

    edit_manifest(root, change)


def members_of(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    return b"".join(tar_member(n, d) for n, d in members) + b"\0" * 1024


def test_a_good_conversion_passes(converted: Path):
    report = verify(converted, workers=2)
    assert report.ok, report.problem_lines()
    assert (report.shards, report.samples) == (4, 10)
    assert report.to_dict()["ok"] and report.to_dict()["problems"] == []
    assert "verify ok: 4 shards, 10 samples" in report.summary_line()


def test_no_manifest_is_not_a_finished_conversion(shards: Path):
    (shards / "manifest.json").unlink()
    with pytest.raises(ValueError, match="not a finished conversion"):
        verify(shards)


def test_flipped_byte_is_found(shards: Path):
    path = shards / TRAIN0
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x40
    path.write_bytes(bytes(data))
    report = verify(shards, workers=2)
    assert not report.ok
    assert (TRAIN0, None, "sha256 differs from the manifest's (changed)") in problems_of(report)
    assert {p["shard"] for p in report.problems} == {TRAIN0}
    assert any(line.startswith(f"{TRAIN0}: sha256") for line in report.problem_lines())


def test_deleted_shard_is_found(shards: Path):
    (shards / "test/batch10-000000.tar").unlink()
    report = verify(shards)
    assert problems_of(report) == [("test/batch10-000000.tar", None, "shard file is missing")]


def test_a_shard_that_is_a_fifo_is_not_a_regular_file(shards: Path):
    import os

    (shards / TRAIN0).unlink()
    os.mkfifo(shards / TRAIN0)  # opened, it would wait for a writer forever
    report = verify(shards)
    assert problems_of(report) == [(TRAIN0, None, "not a regular file")]


def test_truncated_tar_is_found(shards: Path):
    path = shards / TRAIN0
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    report = verify(shards)
    texts = [p for s, _, p in problems_of(report) if s == TRAIN0]
    assert any("truncated or corrupt tar" in t for t in texts)
    assert any(
        t.startswith(f"{len(data) // 2 + 100} bytes, manifest says {len(data)}") for t in texts
    )
    assert any("readable samples, manifest says 3" in t for t in texts)


def test_changed_count_is_found(shards: Path):
    edit_manifest(shards, lambda m: m["splits"]["train"]["shards"][1].update(samples=4))
    report = verify(shards)
    problems = problems_of(report)
    assert (
        "train/batch01-000001.tar",
        None,
        "holds 3 readable samples, manifest says 4",
    ) in problems
    assert (None, None, "train: manifest says 7 samples, its shards list 8") in problems


def test_duplicate_key_across_splits_is_found(shards: Path):
    # A train shard copied into the test split: its keys are in both splits.
    shutil.copy(shards / TRAIN0, shards / "test/batch10-000009.tar")

    def change(manifest):
        entry = dict(manifest["splits"]["train"]["shards"][0], path="test/batch10-000009.tar")
        manifest["splits"]["test"]["shards"].append(entry)
        manifest["splits"]["test"]["samples"] += entry["samples"]

    edit_manifest(shards, change)
    report = verify(shards)
    dupes = [p for p in report.problems if "duplicate key" in p["problem"]]
    assert len(dupes) == 3
    assert all(p["shard"] == "test/batch10-000009.tar" and TRAIN0 in p["problem"] for p in dupes)
    assert all(p["sample"].startswith("b01_") for p in dupes)


def test_undecodable_and_wrong_images_are_found(shards: Path):
    members = members_of(shards / TRAIN0)
    keys = sorted({name.split(".")[0] for name, _ in members})
    changed = []
    for name, data in members:
        if name == f"{keys[0]}.mask.jpg":
            data = data[:200] + bytes(len(data) - 200)  # scan data zeroed: decodes with errors
        elif name == f"{keys[1]}.depth.jpg":
            data = encode(160, 160, 3)  # a depth of the wrong size
        elif name == f"{keys[2]}.fg_bg.jpg":
            data = encode(160, 160, 4, channels=3)  # RGB in an L dataset
        changed.append((name, data))
    replace_shard(shards, TRAIN0, tar_of(changed))
    problems = {p["sample"]: p["problem"] for p in verify(shards).problems}
    assert set(problems) == set(keys)
    assert problems[keys[0]].startswith("mask.jpg: undecodable image")
    assert problems[keys[1]] == "depth.jpg: 160x160, expected 80x80"
    assert problems[keys[2]] == "fg_bg.jpg: 3 channel(s), the manifest's mode has 1"


def test_a_declared_huge_size_is_refused_before_any_decoding(shards: Path, monkeypatch):
    members = members_of(shards / TRAIN0)
    keys = sorted({name.split(".")[0] for name, _ in members})
    bombs = {declaring_png(30000, 30000), declaring_jpeg(30000, 30000)}
    changed = []
    for name, data in members:
        if name == f"{keys[0]}.mask.jpg":
            name, data = f"{keys[0]}.mask.png", declaring_png(30000, 30000)
        elif name == f"{keys[1]}.fg_bg.jpg":
            data = declaring_jpeg(30000, 30000)
        changed.append((name, data))
    replace_shard(shards, TRAIN0, tar_of(changed))

    def guarded(decoder):
        def decode(data: bytes, channels: int):
            assert data not in bombs, "decoded an image whose header declares 30000x30000"
            return decoder(data, channels)

        return decode

    monkeypatch.setattr(
        pipeline.images, "decode_simplejpeg", guarded(pipeline.images.decode_simplejpeg)
    )
    for name, decoder in list(pipeline.images.PNG_DECODERS.items()):
        monkeypatch.setitem(pipeline.images.PNG_DECODERS, name, guarded(decoder))
    problems = {p["sample"]: p["problem"] for p in verify(shards).problems}
    assert problems == {
        keys[0]: "mask.png: 30000x30000, expected 160x160",
        keys[1]: "fg_bg.jpg: 30000x30000, expected 160x160",
    }


def test_missing_field_and_bad_json_are_found(shards: Path):
    members = members_of(shards / TRAIN0)
    keys = sorted({name.split(".")[0] for name, _ in members})
    changed = [(n, d) for n, d in members if n != f"{keys[0]}.bg.jpg"]
    changed = [(n, b"{not json" if n == f"{keys[1]}.json" else d) for n, d in changed]
    replace_shard(shards, TRAIN0, tar_of(changed))
    problems = {p["sample"]: p["problem"] for p in verify(shards).problems}
    assert problems[keys[0]] == "fields missing ['bg.jpg|png'], unexpected []"
    assert problems[keys[1]].startswith("json: not the provenance record")


def test_png_members_are_decoded_and_checked(tmp_path: Path):
    z = build_zip(tmp_path / "batch1_images.zip", 8, png_masks=True)
    out = tmp_path / "shards"
    assert convert_zips([z.path], ConvertConfig(out=out, progress=False)).ok
    assert verify(out).ok
    members = members_of(out / TRAIN0)
    keys = sorted({n.split(".")[0] for n, _ in members if n.endswith(".mask.png")})
    assert len(keys) == 4
    changed = []
    for name, data in members:
        if name == f"{keys[0]}.mask.png":
            data = data[: len(data) // 2]  # truncated
        elif name == f"{keys[1]}.mask.png":
            data = encode_png_mask(168, 160, 1)  # the wrong size
        elif name == f"{keys[2]}.mask.png":
            changed.append((f"{keys[2]}.mask.jpg", encode(160, 160, 2)))  # two masks
        elif name == f"{keys[3]}.mask.png":
            data = encode(160, 160, 3)  # JPEG bytes under a .png name
        changed.append((name, data))
    replace_shard(out, TRAIN0, tar_of(changed))
    problems = {p["sample"]: p["problem"] for p in verify(out).problems}
    assert set(problems) == set(keys)
    assert problems[keys[0]].startswith("mask.png: undecodable image (truncated PNG")
    assert problems[keys[1]] == "mask.png: 168x160, expected 160x160"
    assert problems[keys[2]] == "fields missing [], unexpected ['mask.jpg', 'mask.png']"
    assert problems[keys[3]].startswith("mask.png: undecodable image (not a PNG")


def test_cli_verify_json_and_exit_codes(converted: Path, shards: Path):
    result = CliRunner().invoke(cli, ["verify", str(converted), "--json", "--workers", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and (report["shards"], report["samples"]) == (4, 10)
    (shards / TRAIN0).write_bytes(b"")
    result = CliRunner().invoke(cli, ["verify", str(shards), "--workers", "1"])
    assert result.exit_code == 1 and result.stdout == ""
    assert f"{TRAIN0}: 0 bytes, manifest says" in result.stderr and "verify FAILED" in result.stderr
    result = CliRunner().invoke(cli, ["verify", str(shards.parent / "nowhere")])
    assert result.exit_code == 1 and "no such folder" in result.stderr


def test_names_from_the_data_reach_a_terminal_escaped(shards: Path):
    # A member name is data: `ESC[8m` in a key concealed everything verify printed after it,
    # its verdict included; in a log line (a training skip) it did the same.
    import logging

    from pipeline.cli.common import ShownFormatter

    members = members_of(shards / TRAIN0)
    key = members[0][0].split(".")[0]
    bad = "k\x1b[8m\r\nverify ok: 4 shards"  # a newline in a name would forge a line
    hostile = [(n.replace(key, bad), b"broken" if n.endswith("mask.jpg") else d)
               for n, d in members]  # fmt: skip
    replace_shard(shards, TRAIN0, tar_of(hostile))
    result = CliRunner().invoke(cli, ["verify", str(shards), "--workers", "1"])
    assert result.exit_code == 1 and "\x1b" not in result.stderr and "\r" not in result.stderr
    shown = "k\\x1b[8m\\x0d\\x0averify ok: 4 shards"
    assert f"{TRAIN0}: {shown}: mask.jpg: undecodable image" in result.stderr
    assert not any(line.startswith("verify ok") for line in result.stderr.splitlines())
    result = CliRunner().invoke(cli, ["verify", str(shards), "--json", "--workers", "1"])
    samples = {p["sample"] for p in json.loads(result.stdout)["problems"]}
    assert bad in samples  # JSON keeps the name as it is (escaped by JSON itself)
    record = logging.LogRecord("x", logging.WARNING, "", 0, "skipped: %s", ("k\x1b[8m\n",), None)
    assert ShownFormatter("%(message)s").format(record) == "skipped: k\\x1b[8m\\x0a"
    try:
        raise ValueError("sample k\x1b[8m\r in x.tar")  # -v logs it with its traceback
    except ValueError:
        record.exc_info = sys.exc_info()
    text = ShownFormatter("%(message)s").format(record)
    assert "\x1b" not in text and "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "skipped: k\\x1b[8m\\x0a"
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: sample k\\x1b[8m\\x0d in x.tar"  # its lines stay lines


def test_the_command_line_logs_through_the_escaping_formatter(monkeypatch):
    # Under pytest the root logger has handlers already, and cli()'s basicConfig does nothing:
    # without them, as in a real run, its handler must be the one that escapes.
    import logging

    from pipeline.cli.common import ShownFormatter

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    CliRunner().invoke(cli, ["verify", "--help"])
    assert [type(h.formatter) for h in root.handlers] == [ShownFormatter]


def test_problem_dicts_are_json_ready(shards: Path):
    (shards / TRAIN0).unlink()
    data = verify(shards).to_dict()
    assert json.loads(json.dumps(data)) == data and not data["ok"]
    assert data["problems"] == [
        {"shard": TRAIN0, "sample": None, "problem": "shard file is missing"}
    ]


def test_tar_members_match_the_stdlib_layout():
    data = b"\xff\xd8" + bytes(700) + b"\xff\xd9"
    info = tarfile.TarInfo("b01_1_2_0_3.bg.jpg")
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    mine = tar_member(info.name, data)
    expected = buf.getvalue()[: len(mine)]

    # Byte for byte the same but for the checksum and device fields, which differ between Python
    # versions (the checksum is checked when the member is read back below).
    def masked(b: bytes) -> bytes:
        return b[:148] + b[156:329] + b[345:]

    assert masked(mine) == masked(expected)
    assert members_of_bytes(mine + bytes(1024)) == [(info.name, data, 0o444, 0, 0, 0)]


def test_a_sample_is_its_fields_as_tar_members():
    from pipeline.store.tar import sample_members

    fields = {"bg.jpg": bytes(range(256)) * 3, "json": b"{}", "depth.jpg": b"", "x.jpg": bytes(512)}
    expected = b"".join(tar_member(f"b01_1_2_0_3.{ext}", d) for ext, d in fields.items())
    assert sample_members("b01_1_2_0_3", fields) == expected
    with pytest.raises(ValueError, match="over 100 bytes"):
        sample_members("k" * 95, fields)


def members_of_bytes(data: bytes) -> list[tuple]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [
            (m.name, tar.extractfile(m).read(), m.mode, m.mtime, m.uid, m.gid)
            for m in tar.getmembers()
        ]


def test_members_that_are_no_samples_are_named_not_passed(shards: Path):
    """Both readers skip a link, a directory or a file named as no KEY.EXT; convert never
    writes one, so verify names them (five, then a count) where before it said ok."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members_of(shards / TRAIN0):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("x.bg.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        tar.addfile(tarfile.TarInfo("README"), io.BytesIO(b""))
        for i in range(5):
            folder = tarfile.TarInfo(f"d{i}")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
    replace_shard(shards, TRAIN0, out.getvalue())
    report = verify(shards)
    assert not report.ok
    readme = "member README: a file of 0 bytes with no KEY.EXT name, not a sample's file"
    assert problems_of(report) == [
        (TRAIN0, None, "member x.bg.jpg: a symlink, not a sample's file"),
        (TRAIN0, None, readme),
        *[(TRAIN0, None, f"member d{i}/: a directory, not a sample's file") for i in range(3)],
        (TRAIN0, None, "2 more members that are no sample's file"),
    ]  # fmt: skip
    assert report.samples == 10  # the samples themselves all read and passed
