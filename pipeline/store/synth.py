"""Synthetic batch zips in the published layout: learnable scenes with exact masks and depths.

A scene is a room (a wall above a horizon, a perspective floor below it, some furniture) with a
person-like shape standing on the floor. Depth is brighter = farther: the floor gets farther
towards the horizon, the wall is farthest, and a pasted shape is a little nearer than anything it
covers, so its depth is darker than the floor around and behind it.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.schema import CHANNELS, DEPTH_SIZE, IMAGE_SIZE
from pipeline.store.names import (
    BG_DIR,
    DEPTH_DIR,
    FG_BG_DIR,
    IGNORED_DIRS,
    MASK_DIR,
    SampleId,
    member_names,
)

log = logging.getLogger(__name__)

MODES = tuple(CHANNELS)  # L (grayscale, as published) or RGB
JPEG_QUALITY = 75  # the published zips' quality
MAX_IDS = 100  # the published data has 100 foregrounds and 100 backgrounds
FG_DIR, FG_MASK_DIR = IGNORED_DIRS  # raw foregrounds and their masks, as the published zips have
ZIP_DIRS = (BG_DIR, FG_BG_DIR, MASK_DIR, DEPTH_DIR, FG_DIR, FG_MASK_DIR)
# A fixed timestamp and creator so the same arguments give byte-identical zips on any machine.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_UNIX = 3
_W, _H = IMAGE_SIZE
_FG_H, _FG_W = 128, 96  # canvas a foreground is drawn on, before it is scaled into a scene
_MIN_CONTRAST = 35.0  # least mean brightness gap between a pasted shape and what it covers


@dataclass
class Background:
    """A room: its RGB image, its depth (brighter = farther) and per-row floor depth."""

    image: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32, 0..255
    floor: np.ndarray  # (H,) float32: depth of the floor at each row (wall rows: the wall's)
    horizon: int  # first floor row


@dataclass
class Foreground:
    """A person-like shape cropped to its bounding box: RGB texture and boolean mask."""

    image: np.ndarray  # (h, w, 3) float32, 0..255
    mask: np.ndarray  # (h, w) bool


def _color(rng: np.random.Generator, lo: float, hi: float, tint: float = 0.3) -> np.ndarray:
    """A random colour whose brightness is in [lo, hi]; its hue varies by up to `tint`."""
    return np.float32(rng.uniform(lo, hi)) * (1 + rng.uniform(-tint, tint, 3)).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, cells: int, amp: float) -> np.ndarray:
    """Low-frequency noise of the image size, roughly within +-amp."""
    coarse = rng.normal(0.0, amp, (cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (_W, _H), interpolation=cv2.INTER_CUBIC)


def _columns(rng: np.random.Generator, min_width: int, max_width: int) -> tuple[int, int]:
    """A random band of columns [x0, x1), at least one wide, that may be cut by the edges."""
    width = int(rng.integers(min_width, max_width))
    x0 = int(rng.integers(-width // 2, _W - width // 2))
    return max(x0, 0), min(x0 + width, _W)


def _floor_depth(rng: np.random.Generator, horizon: int) -> np.ndarray:
    """Depth per row: the wall far and flat, the floor nearer and nearer towards the bottom."""
    far = rng.uniform(185, 230)
    near = rng.uniform(10, 45)
    rows = np.arange(_H, dtype=np.float32)
    t = np.clip((rows - horizon + 1) / (_H - horizon), 0, 1)
    floor = far - (far - near) * t ** rng.uniform(0.5, 0.9)
    floor[:horizon] = min(255.0, far + rng.uniform(5, 20))
    return floor.astype(np.float32)


def _paint_wall(rng: np.random.Generator, img: np.ndarray, horizon: int) -> None:
    """Wall above the horizon: a vertical gradient with doors, curtains and windows."""
    ys = np.arange(horizon, dtype=np.float32)[:, None, None] / max(horizon, 1)
    img[:horizon] = _color(rng, 50, 230) * (1 + rng.uniform(-0.25, 0.25) * (ys - 0.5))
    for _ in range(int(rng.integers(2, 7))):
        x0, x1 = _columns(rng, 6, 32)
        top = int(rng.integers(0, max(horizon // 2, 1)))
        shade = np.broadcast_to(_color(rng, 20, 250), (1, x1 - x0, 3))
        if rng.random() < 0.5:  # curtain-like folds
            xs = np.arange(x0, x1, dtype=np.float32)
            shade = shade * (1 + 0.15 * np.sin(xs * rng.uniform(0.5, 1.2)))[None, :, None]
        img[top:horizon, x0:x1] = shade


def _paint_floor(rng: np.random.Generator, img: np.ndarray, horizon: int) -> None:
    """Floor below the horizon: perspective tiles converging on a vanishing point."""
    wall_mean = float(img[:horizon].mean()) if horizon else 128.0
    gap = rng.uniform(40, 100) * (1 if wall_mean < 128 else -1)
    base = _color(rng, np.clip(wall_mean + gap, 20, 235), np.clip(wall_mean + gap, 20, 235))
    ys, xs = np.mgrid[horizon:_H, 0:_W].astype(np.float32)
    dist = 1.0 / (ys - horizon + 1.5)  # proportional to the floor's distance at a row
    across = (xs - rng.uniform(0, _W)) * dist
    tiles = np.sign(np.sin(dist * rng.uniform(40, 120)) * np.sin(across * rng.uniform(3, 10)))
    shade = 1 + rng.uniform(0, 0.2) * tiles + rng.uniform(-0.2, 0.2) * (ys - horizon) / _H
    img[horizon:] = base * shade[..., None]


def _add_boxes(
    rng: np.random.Generator, img: np.ndarray, depth: np.ndarray, floor: np.ndarray, horizon: int
) -> None:
    """Furniture standing on the floor, as deep as the floor at its base."""
    for _ in range(int(rng.integers(0, 3))):
        base = int(rng.integers(horizon + 4, min(horizon + 40, _H)))
        height = int((base - horizon) * rng.uniform(1.0, 2.5)) + 6
        x0, x1 = _columns(rng, 15, 60)
        top = max(base - height, 0)
        img[top:base, x0:x1] = _color(rng, 20, 240)
        img[top : top + 3, x0:x1] *= 1.2  # a lit top edge reads as a solid object
        depth[top:base, x0:x1] = floor[base - 1]


def make_background(rng: np.random.Generator) -> Background:
    """A random room: textured wall and floor, furniture, and its depth map."""
    horizon = int(rng.integers(45, 96))
    floor = _floor_depth(rng, horizon)
    img = np.empty((_H, _W, 3), np.float32)
    _paint_wall(rng, img, horizon)
    _paint_floor(rng, img, horizon)
    depth = np.repeat(floor[:, None], _W, axis=1)
    _add_boxes(rng, img, depth, floor, horizon)
    for _ in range(int(rng.integers(2, 7))):  # soft light and shadow blobs
        cy, cx, r = rng.uniform(0, _H), rng.uniform(0, _W), rng.uniform(10, 45)
        ys, xs = np.ogrid[:_H, :_W]
        blob = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * r * r)).astype(np.float32)
        img += rng.uniform(-45, 45) * blob[..., None]
    img += _smooth_noise(rng, 20, rng.uniform(3, 10))[..., None]
    img += rng.normal(0, 2.5, img.shape).astype(np.float32)
    return Background(_to_uint8(img), depth, floor, horizon)


def _draw_person(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Masks (uint8 0/1) of a person's parts on the foreground canvas; arms differ side to side."""
    parts = {k: np.zeros((_FG_H, _FG_W), np.uint8) for k in ("head", "torso", "legs", "arms")}
    cx, head_r = _FG_W // 2, int(rng.integers(9, 14))
    head_y = head_r + 2
    cv2.ellipse(parts["head"], (cx, head_y), (int(head_r * 0.8), head_r), 0, 0, 360, 1, -1)
    top = head_y + head_r - 1
    hips, half = top + int(rng.integers(36, 48)), int(rng.integers(12, 19))
    waist = int(half * rng.uniform(0.7, 1.0))
    torso = np.array(
        [[cx - half, top + 4], [cx + half, top + 4], [cx + waist, hips], [cx - waist, hips]],
        np.int32,
    )
    cv2.fillConvexPoly(parts["torso"], torso, 1)
    cv2.ellipse(parts["torso"], (cx, top + 6), (half, 6), 0, 180, 360, 1, -1)  # round shoulders
    leg_w = int(rng.integers(7, 12))
    for side in (-1, 1):
        hip = (cx + side * waist // 2, hips - 2)
        foot = (cx + side * int(rng.integers(3, 18)), _FG_H - 1 - leg_w // 2)
        cv2.line(parts["legs"], hip, foot, 1, leg_w)
        angle = np.deg2rad(rng.uniform(-15, 95))  # from hanging down to raised sideways
        length = rng.uniform(28, 44)
        shoulder = (cx + side * (half - 2), top + 7)
        hand = (
            int(shoulder[0] + side * length * np.sin(angle)),
            int(shoulder[1] + length * np.cos(angle)),
        )
        cv2.line(parts["arms"], shoulder, hand, 1, int(rng.integers(5, 9)))
    return parts


def make_foreground(rng: np.random.Generator) -> Foreground:
    """A random person-like shape: head, torso, arms, legs, each with its own texture."""
    parts = _draw_person(rng)
    img = np.zeros((_FG_H, _FG_W, 3), np.float32)
    shirt, skin = _color(rng, 15, 245, tint=0.5), _color(rng, 60, 230)
    colors = {"legs": _color(rng, 10, 200, 0.5), "torso": shirt, "arms": shirt, "head": skin}
    for name in ("legs", "torso", "arms", "head"):  # later parts cover earlier ones
        img[parts[name] > 0] = colors[name]
    if rng.random() < 0.6:  # striped clothes: texture that no background has
        ys = np.arange(_FG_H, dtype=np.float32)[:, None]
        stripes = 1 + rng.uniform(0.2, 0.5) * np.sign(np.sin(ys * rng.uniform(0.5, 1.5)))
        cloth = (parts["torso"] | parts["arms"]) > 0
        img[cloth] *= np.broadcast_to(stripes, cloth.shape)[cloth][:, None]
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    mask = (parts["head"] | parts["torso"] | parts["legs"] | parts["arms"]) > 0
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return Foreground(np.clip(img, 0, 255)[box] * mask[box][..., None], mask[box].copy())


def _place(rng: np.random.Generator, bg: Background, fg: Foreground) -> tuple[int, int, int, int]:
    """Where a shape stands: (top, left, height, width), taller the nearer its feet are."""
    feet = int(rng.integers(bg.horizon + 12, _H + 8))  # may be cut off by the bottom edge
    height = int(np.clip((feet - bg.horizon) * rng.uniform(1.2, 2.2), 24, 150))
    width = max(4, round(height * fg.mask.shape[1] / fg.mask.shape[0]))
    centre = int(rng.integers(_W // 10, _W - _W // 10))
    return feet - height, centre - width // 2, height, width


def _scaled(fg: Foreground, flip: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The foreground's texture and boolean mask at (height, width), mirrored if flip."""
    image, mask = (fg.image[:, ::-1], fg.mask[:, ::-1]) if flip else (fg.image, fg.mask)
    image = cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    return image, mask > 0


def _shape_depth(mask: np.ndarray, nearest: float) -> np.ndarray:
    """Depth of the shape's pixels: `nearest` at its rim, up to 8 levels nearer in its middle."""
    # A zero border so that a shape cut by the image's edge is still rounded there.
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    inside = cv2.distanceTransform(padded, cv2.DIST_L2, 3)[1:-1, 1:-1][mask]
    return nearest - 8.0 * inside / max(float(inside.max()), 1.0)


def render_sample(
    rng: np.random.Generator, bg: Background, fg: Foreground, flip: int
) -> dict[str, np.ndarray]:
    """Paste `fg` (mirrored if flip) on `bg`: RGB uint8 fg_bg, 0/255 mask and 80x80 depth."""
    top, left, height, width = _place(rng, bg, fg)
    image, mask = _scaled(fg, flip, height, width)
    # Only the window inside the image: the shape may be cut off by the image's edges.
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + height, _H), min(left + width, _W)
    win = np.s_[y0:y1, x0:x1]
    mask = mask[y0 - top : y1 - top, x0 - left : x1 - left]
    if not mask.any():  # a shape cut off completely: place it again
        return render_sample(rng, bg, fg, flip)
    pixels = image[y0 - top : y1 - top, x0 - left : x1 - left][mask]
    covered = float(bg.image[win][mask].mean())
    gap = float(pixels.mean()) - covered
    if abs(gap) < _MIN_CONTRAST:  # lighting that keeps the shape visible against what it covers
        # Towards the side with room, so clipping at 0 or 255 cannot undo it.
        pixels = pixels + ((-1 if covered > 127.5 else 1) * _MIN_CONTRAST - gap)
    fg_bg = bg.image.copy()
    fg_bg[win][mask] = _to_uint8(pixels)
    full = np.zeros((_H, _W), np.uint8)
    full[win][mask] = 255
    # Nearer than anything it covers and than the floor at its feet.
    feet = float(bg.floor[min(top + height, _H) - 1])
    depth = bg.depth.copy()
    nearest = min(feet, float(depth[win][mask].min())) - rng.uniform(4, 12)
    depth[win][mask] = _shape_depth(mask, nearest)
    small = cv2.resize(np.clip(depth, 0, 255), DEPTH_SIZE, interpolation=cv2.INTER_AREA)
    return {"fg_bg": fg_bg, "mask": full, "depth": _to_uint8(small)}


def _to_uint8(array: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def to_mode(array: np.ndarray, mode: str) -> np.ndarray:
    """An image (gray HxW or RGB HxWx3, uint8) as mode L (HxW) or RGB (HxWx3)."""
    if mode == "L":
        return array if array.ndim == 2 else cv2.cvtColor(array, cv2.COLOR_RGB2GRAY)
    if mode == "RGB":
        return array if array.ndim == 3 else cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
    raise ValueError(f"unknown image mode {mode!r}: use one of {', '.join(MODES)}")


def encode_jpeg(array: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of a uint8 image: HxW gives a 1-channel JPEG, HxWx3 (RGB) a 3-channel one."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(
            f"encode_jpeg needs a uint8 HxW or HxWx3 array, got {array.dtype} {array.shape}"
        )
    bgr = array if array.ndim == 2 else cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"could not encode a JPEG of shape {array.shape}")
    return data.tobytes()


def plan_samples(rng: np.random.Generator, samples: int) -> tuple[int, list[SampleId]]:
    """(n, sample ids) over n foregrounds and n backgrounds, all used; seq numbers placements."""
    # A few samples per background, like the published data, but never a single background.
    n_ids = min(MAX_IDS, samples, max(2, samples // 4))
    bgs = rng.permutation(np.arange(samples) % n_ids) + 1
    fgs = rng.permutation(np.arange(samples) % n_ids) + 1
    flips = rng.integers(0, 2, samples)
    seen: dict[tuple[int, int, int], int] = {}
    ids = []
    for fg, bg, flip in zip(fgs.tolist(), bgs.tolist(), flips.tolist(), strict=True):
        seen[fg, bg, flip] = seq = seen.get((fg, bg, flip), 0) + 1
        ids.append(SampleId(fg, bg, flip, seq))
    return n_ids, ids


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.create_system = _UNIX
    if name.endswith("/"):
        info.external_attr = (0o40755 << 16) | 0x10  # a directory, as zip tools mark it
    else:
        info.external_attr = 0o100644 << 16  # a regular file, rw-r--r--
        info.compress_type = zipfile.ZIP_DEFLATED
    return info


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image as PIL writes them (what the dataset's generator used)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _write(zf: zipfile.ZipFile, name: str, array: np.ndarray, mode: str) -> None:
    zf.writestr(_zip_info(name), encode_jpeg(to_mode(array, mode)))


def _write_members(
    zf: zipfile.ZipFile, rng: np.random.Generator, samples: int, mode: str, png_masks: bool
) -> None:
    """Every entry of one zip, streamed: folders, backgrounds, raw foregrounds, then samples."""
    n_ids, ids = plan_samples(rng, samples)
    for folder in ZIP_DIRS:
        zf.writestr(_zip_info(f"{folder}/"), b"")
    backgrounds = [make_background(rng) for _ in range(n_ids)]
    for number, bg in enumerate(backgrounds, start=1):
        _write(zf, member_names(SampleId(0, number, 0, 0))["bg"], bg.image, mode)
    foregrounds = [make_foreground(rng) for _ in range(n_ids)]
    for number, fg in enumerate(foregrounds, start=1):
        _write(zf, f"{FG_DIR}/fg_{number}.jpg", _to_uint8(fg.image), mode)
        _write(zf, f"{FG_MASK_DIR}/mask_{number}.jpg", fg.mask.astype(np.uint8) * 255, mode)
    for sample in ids:
        images = render_sample(
            rng, backgrounds[sample.bg - 1], foregrounds[sample.fg - 1], sample.flip
        )
        names = member_names(sample)
        for kind in ("fg_bg", "mask", "depth"):
            if kind == "mask" and png_masks and sample.flip == 0:
                # As the generator did: an RGB white-on-black PNG under the mask's .jpg name.
                png = encode_png(to_mode(images[kind], "RGB"))
                zf.writestr(_zip_info(names[kind]), png)
            else:
                _write(zf, names[kind], images[kind], mode)


def synth_zip(
    path: Path, batch: int, samples: int, mode: str = "L", seed: int = 0, png_masks: bool = False
) -> Path:
    """Write one synthetic zip of `samples` samples for batch number `batch` at `path`.

    `png_masks`: every flip=0 mask is PNG bytes under its .jpg name, as the published generator
    saved them; otherwise every member is a JPEG.
    """
    if mode not in MODES:
        raise ValueError(f"unknown image mode {mode!r}: use one of {', '.join(MODES)}")
    if samples < 1 or batch < 1:
        raise ValueError(
            f"{path}: need at least 1 sample and a batch number >= 1, "
            f"got samples={samples}, batch={batch}"
        )
    # Seeded by (seed, batch): same arguments, same bytes; every batch its own scenes.
    rng = np.random.default_rng([seed % 2**64, batch])
    tmp = path.with_name(path.name + ".partial")
    # Written under a temporary name so an interrupted run leaves no zip that looks complete.
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            _write_members(zf, rng, samples, mode, png_masks)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    log.info("wrote %s: %d samples, mode %s, %d bytes", path, samples, mode, path.stat().st_size)
    return path


def synth_zips(
    out: Path,
    batches: Sequence[int] = (1, 2, 3),
    samples: int = 200,  # the published zips hold 40,000; 200 make a quick demo or test
    mode: str = "L",
    seed: int = 0,
    png_masks: bool = False,  # JPEG only: the one real sample we hold is a JPEG
) -> list[Path]:
    """Write `batch{N}_images.zip` for each batch number into `out`; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [
        synth_zip(out / f"batch{batch}_images.zip", batch, samples, mode, seed, png_masks)
        for batch in batches
    ]
