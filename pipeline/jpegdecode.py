"""Decode the shards' JPEG bytes into uint8 arrays (numpy only: no torch, so verify can use it).

Three decoders were measured on the dataset's own kind of image (160x160 gray JPEGs, quality 75,
one thread, `measure_decoders`, on a shared 2-core machine): simplejpeg 10,500-14,400 images/s,
cv2.imdecode 9,200-13,700 (within noise of each other; simplejpeg ahead in most runs), PIL
3,900-6,300. simplejpeg (libjpeg-turbo) is the default. All three refuse truncated data (simplejpeg
with `strict=True`, which also turns libjpeg's recoverable-corruption warnings into errors)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence

import numpy as np
import simplejpeg

# A decoder: (jpeg bytes, channels 1 or 3) -> uint8 array (H, W, channels).
Decoder = Callable[[bytes, int], np.ndarray]


def decode_simplejpeg(data: bytes, channels: int) -> np.ndarray:
    """Decode with simplejpeg (libjpeg-turbo), strict: recoverable errors raise too."""
    return simplejpeg.decode_jpeg(data, colorspace="GRAY" if channels == 1 else "RGB", strict=True)


def decode_cv2(data: bytes, channels: int) -> np.ndarray:
    """Decode with OpenCV's imdecode (BGR turned into RGB)."""
    import cv2

    buf = np.frombuffer(data, np.uint8)
    if channels == 1:
        image = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    else:
        image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("cv2 cannot decode the JPEG")
    if channels == 1:
        return image[:, :, None]
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_pil(data: bytes, channels: int) -> np.ndarray:
    """Decode with PIL (the published workflow's way)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    return array[:, :, None] if channels == 1 else array


DECODERS: dict[str, Decoder] = {
    "simplejpeg": decode_simplejpeg,
    "cv2": decode_cv2,
    "pil": decode_pil,
}
DEFAULT_DECODER = "simplejpeg"  # the fastest measured; see the module docstring


def get_decoder(name: str = DEFAULT_DECODER) -> Decoder:
    """The decoder function called `name` (one of DECODERS)."""
    try:
        return DECODERS[name]
    except KeyError:
        raise ValueError(f"unknown JPEG decoder {name!r}: use one of {sorted(DECODERS)}") from None


def decode_image(
    data: bytes, channels: int, size: tuple[int, int], decoder: Decoder | None = None
) -> np.ndarray:
    """Decode one JPEG to uint8 (H, W, channels), checking its (width, height) against `size`."""
    image = (decoder or decode_simplejpeg)(data, channels)
    height, width = image.shape[:2]
    if (width, height) != tuple(size):
        raise ValueError(f"image is {width}x{height}, expected {size[0]}x{size[1]}")
    return image


def measure_decoders(
    jpegs: Sequence[bytes], channels: int = 1, seconds: float = 0.5
) -> dict[str, float]:
    """Images per second of each decoder on `jpegs`, each run for about `seconds` on this thread."""
    rates = {}
    for name, decoder in DECODERS.items():
        decoder(jpegs[0], channels)  # warm-up: imports and library initialisation
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for data in jpegs:
                decoder(data, channels)
            count += len(jpegs)
        rates[name] = count / (time.perf_counter() - start)
    return rates
