"""predict on hostile inputs: an image too large to decode, a folder named like an image."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_guard import error_line

from pipeline.cli import cli
from pipeline.deploy.predict import MAX_PIXELS, pair_paths, predict, read_image

REAL = Path(__file__).parent / "fixtures" / "real-sample"


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height (a few bytes: no real pixel data follows)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat))
    return path


def test_a_huge_image_is_refused_from_its_header(tiny_run: Path, tmp_path: Path) -> None:
    for width, height in ((20_000, 20_000), (9_000, 9_000)):  # above PIL's bound, above ours
        bomb = png_header_only(tmp_path / f"bomb{width}.png", width, height)
        result = CliRunner().invoke(
            cli,
            [
                "predict",
                str(tiny_run / "best.pt"),
                "--bg",
                str(REAL / "bg_img_51.jpg"),
                "--fg-bg",
                str(bomb),
                "--out",
                str(tmp_path / "pred"),
                "--device",
                "cpu",
            ],
        )
        line = error_line(result)
        assert f"{bomb}: a {width}x{height} image ({width * height:,} pixels)" in line
        assert f"{MAX_PIXELS:,} pixels at most" in line
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's own bound is back for everyone else


def test_a_folder_named_like_an_image_is_skipped(tiny_run: Path, tmp_path: Path, caplog) -> None:
    bgs, fgs = tmp_path / "bg", tmp_path / "fg"
    for folder in (bgs, fgs):
        folder.mkdir()
        (folder / "x.jpg").mkdir()  # both sides: it would be a pair of "images"
    (bgs / "only.png").mkdir()  # one side: it would be an image without a partner
    Image.open(REAL / "bg_img_51.jpg").save(bgs / "a.png")
    Image.open(REAL / "fg_bg_9_51_1_2.jpg").save(fgs / "a.png")
    with caplog.at_level("WARNING"):
        assert [stem for _, _, stem in pair_paths(bgs, fgs)] == ["a"]
    assert f"{bgs / 'x.jpg'}: a folder, not an image: skipped" in caplog.text
    assert f"{bgs / 'only.png'}: a folder" in caplog.text
    written = predict(tiny_run / "best.pt", bgs, fgs, tmp_path / "out", device="cpu")
    assert sorted(p.name for p in written) == ["a_depth.png", "a_depth_plasma.png", "a_mask.png"]


def test_postscript_named_jpg_is_refused_unrun(tmp_path: Path, monkeypatch) -> None:
    """PIL would hand an EPS file, whatever its name, to Ghostscript: predict never opens one."""
    ran = tmp_path / "gs-ran"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "gs").write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    (fake / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    evil = tmp_path / "evil.jpg"
    evil.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 160 160\nshowpage\n")
    with pytest.raises(ValueError) as raised:
        read_image(evil, "L")
    assert str(raised.value).startswith(f"{evil}: not an image of a format predict reads (JPEG")
    assert not ran.exists()


def test_a_damaged_image_names_its_file(tmp_path: Path) -> None:
    cut = tmp_path / "cut.png"
    cut.write_bytes((REAL / "bg_img_51.jpg").read_bytes()[:300])
    with pytest.raises(ValueError, match=f"^{cut}: not a readable image"):
        read_image(cut, "L")


def test_a_pair_of_two_sizes_is_predicted_with_a_warning(tiny_run: Path, tmp_path: Path, caplog):
    bg, fg_bg = tmp_path / "bg.png", tmp_path / "fg_bg.png"
    Image.open(REAL / "bg_img_51.jpg").resize((320, 200)).save(bg)
    Image.open(REAL / "fg_bg_9_51_1_2.jpg").save(fg_bg)  # 160x160: not the same photo
    with caplog.at_level("WARNING"):
        written = predict(tiny_run / "best.pt", bg, fg_bg, tmp_path / "out", device="cpu")
    assert len(written) == 3
    assert f"{bg} is 320x200 and {fg_bg} is 160x160" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # one photo and its composite: no word
        predict(tiny_run / "best.pt", REAL / "bg_img_51.jpg", fg_bg, tmp_path / "o2", device="cpu")
    assert "WARNING" not in [r.levelname for r in caplog.records]


@pytest.mark.parametrize(
    ("name", "image"),
    [
        ("gray16.png", Image.new("I;16", (160, 160), 20_000)),  # 8-bit: 78, clipped to 255
        ("int32.tif", Image.new("I", (160, 160), 20_000)),
        ("float.tif", Image.new("F", (160, 160), 0.3)),  # 8-bit: 77, clipped to 0
    ],
)
def test_an_image_of_more_than_8_bits_is_refused_not_clipped(tmp_path: Path, name, image):
    image.save(tmp_path / name)
    with pytest.raises(ValueError, match=r"more than 8 bits a channel \(PIL mode (I|F)"):
        read_image(tmp_path / name, "L")


def test_predict_never_writes_over_its_input_images(tiny_run: Path, tmp_path: Path) -> None:
    bgs, fgs = tmp_path / "bg", tmp_path / "fg"
    for folder in (bgs, fgs):
        folder.mkdir()
        for name in ("x.png", "x_mask.png"):  # predicting x writes x_mask.png
            Image.new("L", (160, 160), 90).save(folder / name)
    before = (fgs / "x_mask.png").read_bytes()
    with pytest.raises(ValueError, match=r"x_mask.png: predict would write over its input image"):
        predict(tiny_run / "best.pt", bgs, fgs, fgs, device="cpu")
    assert (fgs / "x_mask.png").read_bytes() == before
    assert sorted(p.name for p in fgs.iterdir()) == ["x.png", "x_mask.png"]


def test_a_missing_fg_bg_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "bg").mkdir()
    with pytest.raises(FileNotFoundError, match=r"fg: no such folder \(--fg-bg, as --bg"):
        pair_paths(tmp_path / "bg", tmp_path / "fg")


def test_a_16_bit_colour_png_is_read_as_8_bits(tmp_path: Path) -> None:
    """PIL reads a 16-bit RGB PNG as RGB, each channel's high byte: not one of the refused modes."""
    height, width, level = 4, 6, 0xC3FF
    rows = b"".join(b"\0" + struct.pack(">H", level) * 3 * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, RGB
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
    (tmp_path / "rgb16.png").write_bytes(png + chunk(b"IEND", b""))
    assert (read_image(tmp_path / "rgb16.png", "RGB") == 0xC3).all()


def test_a_photo_is_read_the_way_its_exif_orientation_shows_it(tmp_path: Path) -> None:
    """A phone stores a portrait photo as landscape pixels and an EXIF orientation tag:
    predict reads what a viewer shows (and so its outputs lie over the photo as seen)."""
    pixels = np.zeros((100, 200), dtype=np.uint8)
    pixels[:, :100] = 255  # left half white, as stored
    stored = Image.fromarray(pixels)
    tagged, plain = tmp_path / "tagged.png", tmp_path / "shown.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to show
    stored.save(tagged, exif=exif)
    stored.transpose(Image.Transpose.ROTATE_270).save(plain)  # what a viewer shows
    sizes: list = []
    assert np.array_equal(read_image(tagged, "L", sizes), read_image(plain, "L"))
    assert sizes == [(100, 200)]  # its size as shown: portrait
