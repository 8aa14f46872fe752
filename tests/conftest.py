"""Shared fixtures: small batch zips in the published layout, with the faults convert handles."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.schema import DEPTH_SIZE, IMAGE_SIZE
from pipeline.store.names import SampleId

REPO = Path(__file__).resolve().parents[1]
# The real sample: shared/ beside the checkout (CI clones elsewhere with shared/ beside it too),
# or a copy inside the repository.
REAL_SAMPLE_DIRS = (
    REPO.parent / "shared" / "fixtures" / "real-sample",
    REPO / "tests" / "fixtures" / "real-sample",
)
FOLDERS = ("bg_jpg/", "fg_bg_jpg/", "mask_black_jpg/", "depth_fg_bg_jpg/", "fg_jpg/", "mask_jpg/")


def encode(width: int, height: int, seed: int, channels: int = 1) -> bytes:
    """A small JPEG whose content depends on `seed` (so members differ byte for byte)."""
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    ramp = np.add.outer(np.arange(height), np.arange(width)) * (1 + seed % 3)
    image = ramp.reshape(height, width, *([1] if channels == 3 else [])) + rng.integers(
        0, 40, shape
    )
    ok, data = cv2.imencode(".jpg", (image % 256).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 75])
    assert ok
    return data.tobytes()


def encode_png_mask(width: int, height: int, seed: int) -> bytes:
    """An RGB PNG of a white box on black, as the published generator saved flip=0 masks."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
    image[y0 : y0 + height // 3, x0 : x0 + width // 4] = 255
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


@dataclass
class BatchZip:
    """A test zip: its path, every member's bytes, and the members of each sample."""

    path: Path
    members: dict[str, bytes] = field(default_factory=dict)
    samples: dict[SampleId, dict[str, str]] = field(default_factory=dict)  # id -> kind -> name

    @property
    def name(self) -> str:
        return self.path.name


def sample_ids(count: int, backgrounds: int = 3) -> list[SampleId]:
    """Distinct sample ids over a few backgrounds, both flips."""
    return [SampleId(i + 1, i % backgrounds + 1, i % 2, 1 + i // 50) for i in range(count)]


def names_for(sample: SampleId, article: bool, top: str) -> dict[str, str]:
    """A sample's member names in the published naming style or the article's."""
    s = sample.stem()
    return {
        "bg": f"{top}bg_jpg/{'bg_' if article else 'bg_img_'}{sample.bg}.jpg",
        "fg_bg": f"{top}fg_bg_jpg/fg_bg_{s}.jpg",
        "mask": f"{top}mask_black_jpg/bg_mask_{s}.jpg",
        "depth": f"{top}depth_fg_bg_jpg/{'depth_' if article else 'depth_fg_bg_'}{s}.jpg",
    }


def build_zip(
    path: Path,
    samples: int = 6,
    *,
    mode: str = "L",
    top: str = "",
    junk: bool = False,
    article: bool = False,
    drop: dict[int, str] | None = None,
    truncate: dict[int, str] | None = None,
    wrong_size: dict[int, str] | None = None,
    seed: int = 0,
    compression: int = zipfile.ZIP_DEFLATED,
    png_masks: bool = False,
) -> BatchZip:
    """Write a zip in the published layout; drop/truncate/wrong_size map sample index -> kind.

    `png_masks`: every flip=0 mask is an RGB PNG (white on black) under its .jpg name, as the
    published generator saved them.
    """
    drop, truncate, wrong_size = drop or {}, truncate or {}, wrong_size or {}
    channels = 3 if mode == "RGB" else 1
    out = BatchZip(Path(path))
    entries: dict[str, bytes] = {}
    for folder in FOLDERS:
        entries[f"{top}{folder}"] = b""
    entries[f"{top}fg_jpg/fg_1.jpg"] = encode(40, 60, seed + 7, channels)  # ignored by convert
    ids = sample_ids(samples)
    dropped: set[str] = set()
    for i, sample in enumerate(ids):
        names = names_for(sample, article, top)
        out.samples[sample] = names
        for kind, name in names.items():
            if drop.get(i) == kind:
                dropped.add(name)  # a dropped bg stays missing for every sample sharing it
            if name in dropped or (kind == "bg" and name in entries):
                continue
            width, height = DEPTH_SIZE if kind == "depth" else IMAGE_SIZE
            if wrong_size.get(i) == kind:
                width, height = width + 8, height
            data = encode(width, height, seed * 1000 + i * 4 + len(kind), channels)
            if png_masks and kind == "mask" and sample.flip == 0:
                data = encode_png_mask(width, height, seed * 1000 + i)
            if truncate.get(i) == kind:
                data = data[: len(data) // 2]
            entries[name] = data
    if junk:
        entries["__MACOSX/"] = b""
        entries[f"__MACOSX/{top}fg_bg_jpg/._fg_bg_1_1_0_1.jpg"] = b"\0\5\26\7junk"
        entries[f"{top}.DS_Store"] = b"\0\0\0\1Bud1"
        entries[f"{top}fg_bg_jpg/.DS_Store"] = b"\0\0\0\1Bud1"
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    out.members = {k: v for k, v in entries.items() if not k.endswith("/")}
    return out


STUB = b'#!/bin/sh\nexec unzip "$0"\n'  # a self-extracting zip's stub: its offsets move


def wrap_zip(path: Path, comment: bytes = b"", prefix: bytes = b"") -> Path:
    """Give a zip without a comment the end-record comment `comment` and put `prefix` before it,
    byte by byte (its offsets stay those of the zip alone, as `cat stub.bin x.zip` leaves them)."""
    data = path.read_bytes()
    assert data[-22:-18] == b"PK\x05\x06" and data[-2:] == b"\0\0"  # an end record, no comment
    path.write_bytes(prefix + data[:-2] + len(comment).to_bytes(2, "little") + comment)
    return path


def zip64_members(path: Path) -> Path:
    """Rewrite a zip as zipfile writes one past 4 GiB, its members in the same order: each size
    and offset over 0 in a ZIP64 extra field of its directory entry (its 32-bit field
    0xFFFFFFFF), a ZIP64 field in every local header (force_zip64) and ZIP64 end records."""
    with zipfile.ZipFile(path) as zf:
        members = [(info, zf.read(info)) for info in zf.infolist()]
    limit = zipfile.ZIP64_LIMIT
    zipfile.ZIP64_LIMIT = 0  # zipfile's own rule for ZIP64 fields, applied from 1 byte on
    try:
        with zipfile.ZipFile(path, "w") as zf:
            for info, data in members:
                copy = zipfile.ZipInfo(info.filename, info.date_time)
                copy.compress_type, copy.external_attr = info.compress_type, info.external_attr
                with zf.open(copy, "w", force_zip64=True) as f:
                    f.write(data)
    finally:
        zipfile.ZIP64_LIMIT = limit
    return path


@pytest.fixture
def make_zip(tmp_path: Path):
    """Build a test zip in tmp_path/zips: make_zip("batch1_images.zip", samples=6, ...)."""
    folder = tmp_path / "zips"
    folder.mkdir(exist_ok=True)

    def make(name: str = "batch1_images.zip", samples: int = 6, **options) -> BatchZip:
        return build_zip(folder / name, samples, **options)

    return make


@pytest.fixture
def real_sample_dir() -> Path:
    """The folder of the four real files; the test is skipped if no copy is present."""
    for folder in REAL_SAMPLE_DIRS:
        if (folder / "fg_bg_9_51_1_2.jpg").is_file():
            return folder
    pytest.skip(f"real sample not found in {' or '.join(map(str, REAL_SAMPLE_DIRS))}")


# --- Shards and a trained run shared by the trainer, evaluate, predict, export tests ----------


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Synthetic zips (batch 1 train, batch 2 test) converted into small shards, once a session."""
    from pipeline.store.runner import ConvertConfig, convert_zips
    from pipeline.store.synth import synth_zips

    root = tmp_path_factory.mktemp("tiny")
    zips = synth_zips(root / "zips", batches=[1, 2], samples=48, seed=1)
    config = ConvertConfig(out=root / "shards", test_batches=(2,), shard_samples=16, progress=False)
    summary = convert_zips(zips, config)
    assert summary.ok
    return root / "shards"


def smoke_config(shards: Path, out: Path, **overrides):
    """A tiny CPU training run: one epoch of one step, one evaluation batch, no progress bar."""
    from pipeline.train.config import TrainConfig

    settings = dict(
        epochs=1,
        steps_per_epoch=1,
        batch_size=4,
        workers=0,
        device="cpu",
        eval_batches=1,
        progress=False,
    )
    return TrainConfig(shards=str(shards), out=str(out), **{**settings, **overrides})


@pytest.fixture(scope="session")
def tiny_run(tiny_shards: Path, tmp_path_factory) -> Path:
    """A 2-step CPU training run of the published recipe on the tiny shards."""
    from pipeline.train.run import train

    run = tmp_path_factory.mktemp("run") / "r1"
    train(smoke_config(tiny_shards, run, steps_per_epoch=2, batch_size=8, eval_batches=2))
    return run
