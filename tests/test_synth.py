"""Synthetic zips: the published layout, image formats, determinism and learnable content."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import cli
from pipeline.store.names import IGNORED_DIRS, classify, member_names
from pipeline.store.synth import (
    ZIP_DIRS,
    encode_jpeg,
    make_background,
    make_foreground,
    render_sample,
    synth_zips,
)

SAMPLES = 40


@pytest.fixture(scope="module")
def zip_l(tmp_path_factory) -> Path:
    (path,) = synth_zips(tmp_path_factory.mktemp("l"), [1], SAMPLES)
    return path


@pytest.fixture(scope="module")
def zip_rgb(tmp_path_factory) -> Path:
    (path,) = synth_zips(tmp_path_factory.mktemp("rgb"), [4], 8, mode="RGB", seed=3)
    return path


def _image(zf: zipfile.ZipFile, name: str) -> Image.Image:
    image = Image.open(io.BytesIO(zf.read(name)))
    image.load()
    return image


def _samples(path: Path) -> list[dict[str, np.ndarray]]:
    """Every sample of a zip as grayscale arrays, keyed by field."""
    with zipfile.ZipFile(path) as zf:
        ids = [m.sample for m in map(classify, zf.namelist()) if m and m.kind == "fg_bg"]
        return [
            {k: np.asarray(_image(zf, n).convert("L")) for k, n in member_names(s).items()}
            for s in ids
        ]


def test_zip_layout(zip_l: Path) -> None:
    assert zip_l.name == "batch1_images.zip"
    with zipfile.ZipFile(zip_l) as zf:
        infos = zf.infolist()
    names = [i.filename for i in infos]
    assert len(names) == len(set(names))
    assert {n for n in names if n.endswith("/")} == {f"{d}/" for d in ZIP_DIRS}
    files = [i for i in infos if not i.filename.endswith("/")]
    assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in files)
    # No top-level folder: every entry sits in one of the published folders.
    assert {n.split("/")[0] for n in names} == set(ZIP_DIRS)
    members = {i.filename: classify(i.filename) for i in files}
    for name, member in members.items():
        assert (member is None) == (name.split("/")[0] in IGNORED_DIRS), name
    assert all(any(n.startswith(f"{d}/") and not n.endswith("/") for n in names) for d in ZIP_DIRS)
    ids = [m.sample for m in members.values() if m and m.kind == "fg_bg"]
    assert len(ids) == SAMPLES
    for sample in ids:
        assert set(member_names(sample).values()) <= set(names), sample
    bgs = {m.bg for m in members.values() if m and m.kind == "bg"}
    assert bgs == {s.bg for s in ids} and len(bgs) > 1
    assert {s.flip for s in ids} == {0, 1}


@pytest.mark.parametrize("fixture, mode", [("zip_l", "L"), ("zip_rgb", "RGB")])
def test_image_sizes_and_modes(fixture: str, mode: str, request) -> None:
    path = request.getfixturevalue(fixture)
    ref = Image.open(io.BytesIO(_pil_jpeg(np.zeros((8, 8), np.uint8), 75))).quantization[0]
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            member = classify(name)
            if member is None:
                continue
            image = _image(zf, name)
            assert image.format == "JPEG" and image.mode == mode, name
            assert image.quantization[0] == ref, f"{name} is not quality 75"
            assert image.size == ((80, 80) if member.kind == "depth" else (160, 160)), name


def _pil_jpeg(array: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "JPEG", quality=quality)
    return out.getvalue()


def test_encode_jpeg_channels() -> None:
    gray = np.full((16, 16), 200, np.uint8)
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 255  # pure red must stay red (no BGR mix-up)
    assert Image.open(io.BytesIO(encode_jpeg(gray))).mode == "L"
    decoded = np.asarray(Image.open(io.BytesIO(encode_jpeg(rgb))))
    assert decoded.shape == (16, 16, 3) and decoded[..., 0].mean() > 200 > decoded[..., 2].max()
    with pytest.raises(ValueError, match="uint8"):
        encode_jpeg(gray.astype(np.float32))


def test_deterministic(tmp_path: Path) -> None:
    first = synth_zips(tmp_path / "a", [1, 2], 6, seed=7)
    again = synth_zips(tmp_path / "b", [1, 2], 6, seed=7)
    other = synth_zips(tmp_path / "c", [1], 6, seed=8)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert first[0].read_bytes() != other[0].read_bytes()
    with zipfile.ZipFile(first[0]) as one, zipfile.ZipFile(first[1]) as two:
        assert one.read("bg_jpg/bg_img_1.jpg") != two.read("bg_jpg/bg_img_1.jpg")
    assert not list(tmp_path.glob("*/*.partial"))


def test_masks_are_binary_and_plausible(zip_l: Path) -> None:
    for sample in _samples(zip_l):
        mask = sample["mask"]
        assert np.mean((mask > 40) & (mask < 215)) < 0.03  # only JPEG ringing at the edges
        assert 0.002 < np.mean(mask > 127) < 0.6


def test_foreground_is_what_changed(zip_l: Path) -> None:
    """The composite differs from its background exactly where the mask says (learnable)."""
    for sample in _samples(zip_l):
        inside = sample["mask"] > 200
        diff = np.abs(sample["fg_bg"].astype(np.int16) - sample["bg"])
        far = ~cv2.dilate(inside.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        assert diff[inside].mean() > 20 and diff[far].mean() < 4


def test_depth_is_consistent(zip_l: Path) -> None:
    """The floor gets farther towards the top, and the shape is nearer than what's around it."""
    gaps = []
    for sample in _samples(zip_l):
        depth = sample["depth"].astype(np.float32)
        assert depth[:10].mean() > depth[-10:].mean() + 40
        shape = cv2.resize(sample["mask"], (80, 80), interpolation=cv2.INTER_AREA) > 127
        if shape.sum() < 6:
            continue
        near = cv2.dilate(shape.astype(np.uint8), np.ones((3, 3), np.uint8))
        ring = cv2.dilate(near, np.ones((5, 5), np.uint8)).astype(bool) & ~near.astype(bool)
        ring[np.nonzero(shape.any(axis=1))[0].max() + 1 :] = False  # only beside and behind
        gaps.append(depth[ring].mean() - depth[shape].mean())
    assert len(gaps) > SAMPLES // 2
    assert np.mean(np.array(gaps) > 0) >= 0.9 and np.mean(gaps) > 10


def test_flip_mirrors_the_foreground() -> None:
    bg = make_background(np.random.default_rng(1))
    fg = make_foreground(np.random.default_rng(2))
    checked = 0
    for seed in range(10):  # same placement twice, once mirrored
        plain = render_sample(np.random.default_rng(seed), bg, fg, flip=0)["mask"] > 0
        mirrored = render_sample(np.random.default_rng(seed), bg, fg, flip=1)["mask"] > 0
        if plain[[0, -1]].any() or plain[:, [0, -1]].any():
            continue  # cut off by an edge: the two cuts differ
        cols = np.nonzero(plain.any(axis=0))[0]
        window = np.s_[:, cols.min() : cols.max() + 1]
        got = mirrored[window]
        # Nearest-neighbour scaling may land the mirror image one column off.
        expected = [np.roll(plain[window][:, ::-1], shift, axis=1) for shift in (-1, 0, 1)]
        iou = max((e & got).sum() / (e | got).sum() for e in expected)
        assert iou > 0.95 and not np.array_equal(plain, mirrored), seed
        checked += 1
    assert checked >= 3


def test_small_sample_counts(tmp_path: Path) -> None:
    (one,) = synth_zips(tmp_path / "one", [1], 1)
    (two,) = synth_zips(tmp_path / "two", [1], 2)
    with zipfile.ZipFile(one) as zf:
        assert sum(n.startswith("bg_jpg/bg_img_") for n in zf.namelist()) == 1
    with zipfile.ZipFile(two) as zf:
        assert sum(n.startswith("bg_jpg/bg_img_") for n in zf.namelist()) == 2


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        synth_zips(tmp_path, [1], 2, mode="CMYK")
    with pytest.raises(ValueError, match="at least 1 sample"):
        synth_zips(tmp_path, [1], 0)


def test_cli_writes_zips(tmp_path: Path) -> None:
    out = tmp_path / "data"
    result = CliRunner().invoke(cli, ["synth", str(out), "--batches", "1-2", "--samples", "5"])
    assert result.exit_code == 0, result.output
    paths = [out / "batch1_images.zip", out / "batch2_images.zip"]
    assert result.output.split() == [str(p) for p in paths]
    for path in paths:
        assert len(_samples(path)) == 5


def test_png_masks_as_the_published_generator_wrote_them(tmp_path: Path) -> None:
    (jpeg_only,) = synth_zips(tmp_path / "a", [1], 12, seed=3)
    (published,) = synth_zips(tmp_path / "b", [1], 12, seed=3, png_masks=True)
    with zipfile.ZipFile(jpeg_only) as a, zipfile.ZipFile(published) as b:
        assert a.namelist() == b.namelist()  # the same names: PNG bytes keep their .jpg name
        pngs = 0
        for name in a.namelist():
            one, two = a.read(name), b.read(name)
            sample = classify(name)
            if sample is not None and sample.kind == "mask" and sample.sample.flip == 0:
                assert two.startswith(b"\x89PNG\r\n\x1a\n"), name
                image = Image.open(io.BytesIO(two))
                assert (image.format, image.mode, image.size) == ("PNG", "RGB", (160, 160))
                pixels = np.asarray(image)
                assert set(np.unique(pixels)) == {0, 255}  # white on black, as the generator's
                jpeg = np.asarray(Image.open(io.BytesIO(one)))
                assert np.mean(np.abs(pixels[:, :, 0].astype(int) - jpeg) > 60) < 0.01
                pngs += 1
            else:  # everything else, flip=1 masks included, is the same JPEG
                assert one == two, name
        assert 0 < pngs < 12
    result = CliRunner().invoke(
        cli, ["synth", str(tmp_path / "c"), "--batches", "1", "--samples", "12", "--seed", "3",
              "--png-masks"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c/batch1_images.zip").read_bytes() == published.read_bytes()


def test_does_not_import_torch() -> None:
    code = "import sys, pipeline.store.synth; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
