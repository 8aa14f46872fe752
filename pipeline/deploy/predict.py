"""Predict the mask and depth for a user's own (bg, fg_bg) pairs: single files or two folders."""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.schema import IMAGE_SIZE, INPUTS
from pipeline.train.checkpoint import load_checkpoint, model_from_checkpoint
from pipeline.train.pictures import plasma, save_png
from pipeline.train.runtime import resolve_device

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
# A larger image is refused from its header, before it is decoded (it would be shrunk to 160x160
# anyway): a 20,000x20,000 file of a few kB would otherwise take over a GB to decode.
MAX_PIXELS = 8192 * 8192


# What predict opens, whatever a file's name: raster formats PIL decodes itself (never EPS, which
# PIL hands to Ghostscript, a PostScript interpreter, to run).
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF")


def read_image(path: Path, mode: str, sizes: list | None = None) -> np.ndarray:
    """Read an image as `mode` (L or RGB) at 160x160, resizing (and saying so) when needed;
    its size as found is appended to `sizes`, if given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with _own_pixel_bound(), Image.open(path, formats=IMAGE_FORMATS) as img:
            too_big = _too_many_pixels(path, img.size) or _too_deep(path, img.mode)
            if not too_big:  # as a viewer shows it: a phone's EXIF orientation applied
                img = ImageOps.exif_transpose(img).convert(mode)
    except UnidentifiedImageError:
        raise ValueError(
            f"{path}: not an image of a format predict reads ({', '.join(IMAGE_FORMATS)})"
        ) from None
    except Exception as exc:  # PIL's plugins raise many types for a damaged file
        raise ValueError(f"{path}: not a readable image ({exc})") from None
    if too_big:
        raise ValueError(too_big)
    if sizes is not None:
        sizes.append(img.size)  # as found, before the resize
    if img.size != IMAGE_SIZE:
        log.info("%s: %dx%d resized to %dx%d", path, *img.size, *IMAGE_SIZE)
        img = img.resize(IMAGE_SIZE, Image.BILINEAR)
    array = np.asarray(img, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array  # (H, W, C)


@contextlib.contextmanager
def _own_pixel_bound():
    """PIL's bomb check (a module global) raises without the image's size, or only warns, while
    opening it: switch it off for the header read, which `_too_many_pixels` bounds instead."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _too_many_pixels(path: Path, size: tuple[int, int]) -> str:
    """Why an image of this size is refused unread ('' if it is not)."""
    width, height = size
    if width * height <= MAX_PIXELS:
        return ""
    return (
        f"{path}: a {width}x{height} image ({width * height:,} pixels) is larger than "
        f"predict reads ({MAX_PIXELS:,} pixels at most): shrink it first"
    )


# PIL's modes of more than 8 bits a channel: its convert to L or RGB clips them at 255 (a 16-bit
# gray PNG comes out nearly white, a float TIFF black), so predict refuses them, as convert does.
DEEP_MODES = ("I", "F")


def _too_deep(path: Path, image_mode: str) -> str:
    """Why an image of this PIL mode is refused unread ('' if it is not)."""
    if image_mode.split(";")[0] not in DEEP_MODES:
        return ""
    return (
        f"{path}: an image of more than 8 bits a channel (PIL mode {image_mode}): predict reads "
        "8-bit images; save it with 8 bits a channel"
    )


def make_input(bg: np.ndarray, fg_bg: np.ndarray) -> torch.Tensor:
    """The network's input, (1, 2C, 160, 160) in [0, 1], its images in schema.INPUTS order."""
    images = {"bg": bg, "fg_bg": fg_bg}
    pair = np.concatenate([images[field] for field in INPUTS], axis=2).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(pair)).float().div_(255).unsqueeze(0)


def pair_paths(bg: Path, fg_bg: Path) -> list[tuple[Path, Path, str]]:
    """(bg, fg_bg, output stem) triples: one pair of files, or two folders matched by file name."""
    bg, fg_bg = Path(bg), Path(fg_bg)
    if bg.is_dir() != fg_bg.is_dir() and bg.exists() and fg_bg.exists():
        raise ValueError("--bg and --fg-bg must both be files or both be folders")
    if not bg.is_dir():
        return [(bg, fg_bg, fg_bg.stem)]
    if not fg_bg.exists():
        raise FileNotFoundError(f"{fg_bg}: no such folder (--fg-bg, as --bg {bg} is a folder)")
    bgs, fgs = _images_in(bg), _images_in(fg_bg)
    unmatched = sorted(set(bgs) ^ set(fgs))
    if unmatched:
        raise ValueError(
            f"images without a partner of the same name in {bg} and {fg_bg}: "
            + ", ".join(unmatched[:10])
            + (" …" if len(unmatched) > 10 else "")
        )
    if not bgs:
        raise ValueError(f"no images in {bg} and {fg_bg}")
    # Outputs are named by stem; stems equal but for case collide where names ignore case
    # (macOS, Windows): `a.jpg` and `A.png` are refused too.
    folded = Counter(Path(name).stem.casefold() for name in bgs)
    clashes = sorted({Path(n).stem for n in bgs if folded[Path(n).stem.casefold()] > 1})
    if clashes:
        raise ValueError(
            f"{fg_bg}: several images share the name {', '.join(clashes)} (outputs would collide)"
        )
    return [(bgs[name], fgs[name], Path(name).stem) for name in sorted(bgs)]


def _images_in(folder: Path) -> dict[str, Path]:
    """A folder's images by file name; a sub-folder named like an image is skipped, with a word."""
    images = {}
    for path in folder.iterdir():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if not path.is_file():  # a folder x.jpg/ (or a pipe, which would block a read)
            kind = "a folder" if path.is_dir() else "not a regular file"
            log.warning("%s: %s, not an image: skipped", path, kind)
            continue
        images[path.name] = path
    return images


def outputs_of(out: Path, stem: str) -> tuple[Path, Path, Path]:
    """The mask, depth and coloured depth PNGs predict writes for the pair named `stem`."""
    return out / f"{stem}_mask.png", out / f"{stem}_depth.png", out / f"{stem}_depth_plasma.png"


def refuse_writing_over_inputs(pairs: list[tuple[Path, Path, str]], out: Path) -> None:
    """ValueError, before anything is written, if an output would replace one of the images
    read (`--out` is an input folder holding `x.png` and `x_mask.png`: predicting x would
    overwrite x_mask.png, then predict on its own output)."""
    inputs = {path.resolve(): path for pair in pairs for path in pair[:2]}
    for *_, stem in pairs:
        for path in outputs_of(out, stem):
            if path.resolve() in inputs:
                raise ValueError(
                    f"{path}: predict would write over its input image {inputs[path.resolve()]}: "
                    "give --out a folder of its own"
                )


@torch.no_grad()
def predict(checkpoint: Path, bg: Path, fg_bg: Path, out: Path, device: str = "auto") -> list[Path]:
    """Write mask, depth and coloured depth PNGs for each pair; returns the files written."""
    pairs = pair_paths(bg, fg_bg)
    refuse_writing_over_inputs(pairs, Path(out))
    dev = resolve_device(device)
    model = model_from_checkpoint(load_checkpoint(checkpoint, map_location=dev), dev, checkpoint)
    mode = "RGB" if model.config.image_channels == 3 else "L"
    written: list[Path] = []
    for bg_path, fg_bg_path, stem in pairs:
        sizes: list = []
        images = read_image(bg_path, mode, sizes), read_image(fg_bg_path, mode, sizes)
        if sizes[0] != sizes[1]:  # not the same photo: each is stretched on its own
            log.warning(
                "%s is %dx%d and %s is %dx%d: a composite is its background with a person "
                "pasted in, at its size; predicting on the two resized apart",
                bg_path,
                *sizes[0],
                fg_bg_path,
                *sizes[1],
            )
        inputs = make_input(*images).to(dev)
        mask_logits, depth = model(inputs)
        mask = (torch.sigmoid(mask_logits)[0, 0].cpu().numpy() * 255).round().astype(np.uint8)
        depth01 = depth[0, 0].float().clamp(0, 1).cpu().numpy()
        depth8 = (depth01 * 255).round().astype(np.uint8)
        mask_path, depth_path, plasma_path = outputs_of(Path(out), stem)
        written += [
            save_png(mask, mask_path),
            save_png(depth8, depth_path),
            save_png(plasma(depth01), plasma_path),
        ]
    log.info("%d pair%s predicted into %s", len(pairs), "" if len(pairs) == 1 else "s", out)
    return written
