"""Image formats: sniffing, cheap header checks and decoding to uint8 arrays (numpy only, no torch).

Convert, verify and the loader all use this one module, so the three agree on what an image is.

Formats: a member's format is known from its first bytes (`image_format`), never from its name:
the dataset's generator saved every flip=0 mask as PNG bytes under a `.jpg` name. JPEG and PNG
are accepted (`check_image`); anything else is named (`GIF`, `unknown format`, ...) and refused.

Checks: convert checks ~120,000 members a zip, so no pixel is decoded there: it reads only the
first few hundred bytes of each JPEG (the markers before the frame header) and its last bytes,
and of each PNG its IHDR chunk (size, bit depth, colour type, checksum) and its last 12 bytes.

Decoding: three decoders were measured on the dataset's own kind of image (160x160 gray JPEGs,
quality 75, one thread, `measure_decoders`, on a shared 2-core machine): simplejpeg 10,500-14,400
images/s, cv2.imdecode 9,200-13,700 (within noise of each other; simplejpeg ahead in most runs),
PIL 3,900-6,300. simplejpeg (libjpeg-turbo) is the default. All three refuse truncated data
(simplejpeg with `strict=True`, which also turns libjpeg's recoverable-corruption warnings into
errors).

PNG members (the published masks with flip=0) are decoded by OpenCV's imdecode (libpng): on
160x160 masks as the generator wrote them (RGB PNG, white on black) read as one channel, one
thread (`benchmarks/png_decoders.py`, docs/BENCHMARKS.md), cv2 decoded 5,800-5,900 a second and
PIL 3,900-4,000 (cv2 1.5x faster); both refuse truncated or damaged data. A PNG is decoded into
the array a JPEG of the same image gives: uint8 (H, W, channels), gray = 0.299R + 0.587G + 0.114B.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import simplejpeg

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
# Baseline, extended and progressive Huffman frames: what libjpeg-based loaders decode.
SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2})
# Other frame types (lossless, hierarchical, arithmetic): valid JPEG, not supported here.
OTHER_SOF = frozenset({0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Markers that stand alone, with no length field after them.
STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
SOS = 0xDA
# Markers that end read_frame_header's fast path (fill bytes, standalone, image data, errors).
NOT_PLAIN = frozenset({0xFF, SOS, 0xD9, *STANDALONE, *OTHER_SOF})
SEGMENT = struct.Struct(">BBH")  # 0xFF, a marker, the segment's length
# Some writers pad a file after its EOI; that is harmless to decoders.
PADDING = b"\x00\r\n\t "


class ImageError(ValueError):
    """A member that is not a usable JPEG or PNG; the message says why."""


class JpegError(ImageError):
    """A member that is not a usable JPEG; the message says why."""


class PngError(ImageError):
    """A member that is not a usable PNG; the message says why."""


class ImageInfo(NamedTuple):
    """What the header says: size in pixels and number of colour components."""

    width: int
    height: int
    components: int


JpegInfo = ImageInfo  # a JPEG's frame header and a PNG's IHDR say the same three things

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# (first bytes, format) of the formats a member may be; only JPEG and PNG are accepted.
MAGIC = (
    (SOI, "JPEG"),
    (PNG_SIGNATURE, "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\0", "TIFF"),
    (b"MM\0*", "TIFF"),
    (b"\0\0\0\x0cjP  \r\n\x87\n", "JPEG 2000"),
)
ACCEPTED = ("JPEG", "PNG")


def image_format(data: bytes) -> str:
    """The format a member's first bytes say: JPEG, PNG, GIF, ..., or `unknown format`."""
    for magic, name in MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return "empty member" if not data else "unknown format"


def check_image(data: bytes) -> tuple[str, ImageInfo]:
    """(format, header) of a JPEG or PNG found by its bytes; ImageError for anything else."""
    found = image_format(data)
    if found == "JPEG":
        return found, check_jpeg(data)
    if found == "PNG":
        return found, check_png(data)
    raise ImageError(f"{found}, not a JPEG or PNG image")


def check_jpeg(data: bytes) -> JpegInfo:
    """Check the SOI/EOI markers and parse the frame header; raise JpegError if broken."""
    if len(data) < 4 or not data.startswith(SOI):
        raise JpegError("not a JPEG (no start-of-image marker)")
    if not data.endswith(EOI) and not data.rstrip(PADDING).endswith(EOI):
        raise JpegError("truncated JPEG (no end-of-image marker)")
    return read_frame_header(data)


def read_frame_header(data: bytes) -> JpegInfo:
    """Walk the marker segments up to the frame header (SOFn) and return what it says."""
    # Fast path: segments that are a marker then a length, as writers make them, one struct
    # call each. At anything else (fill bytes, standalone markers, errors, the end of the
    # data), the general walk takes over from the same place, so the outcome is the same.
    pos, end = 2, len(data)
    while pos + 4 <= end:
        prefix, marker, length = SEGMENT.unpack_from(data, pos)
        if prefix != 0xFF or marker in NOT_PLAIN:
            break
        if marker in SOF_MARKERS:
            return _parse_sof(data, pos + 2, length)
        pos += 2 + length
    return _walk_segments(data, pos)


def _walk_segments(data: bytes, pos: int) -> JpegInfo:
    """read_frame_header's general walk, from the marker at `pos` on."""
    end = len(data)
    while pos < end:
        if data[pos] != 0xFF:
            raise JpegError(f"corrupt JPEG header (no marker at byte {pos})")
        while pos < end and data[pos] == 0xFF:  # fill bytes may precede a marker
            pos += 1
        if pos >= end:
            break
        marker = data[pos]
        pos += 1
        if marker in STANDALONE:
            continue
        if marker == SOS or marker == 0xD9:
            raise JpegError("corrupt JPEG (image data before any frame header)")
        if pos + 2 > end:
            break
        (length,) = struct.unpack_from(">H", data, pos)
        if marker in SOF_MARKERS:
            return _parse_sof(data, pos, length)
        if marker in OTHER_SOF:
            raise JpegError(f"unsupported JPEG process (frame marker 0xFF{marker:02X})")
        pos += length
    raise JpegError("truncated JPEG header (no frame header)")


def _parse_sof(data: bytes, pos: int, length: int) -> JpegInfo:
    """Read height, width and components from a SOFn segment starting at its length field."""
    if length < 8 or pos + 8 > len(data):
        raise JpegError("truncated JPEG frame header")
    _, height, width, components = struct.unpack_from(">BHHB", data, pos + 2)
    if width == 0 or height == 0 or components == 0:
        raise JpegError(f"invalid JPEG frame header ({width}x{height}, {components} components)")
    return JpegInfo(width, height, components)


# PNG colour types -> components as decoded: gray, RGB, palette (its entries are RGB).
PNG_COMPONENTS = {0: 1, 2: 3, 3: 3}
PNG_ALPHA = {4: "gray with alpha", 6: "RGBA"}  # valid PNG, refused: what would alpha mean here?
IHDR = struct.Struct(">I4sIIBBBBBI")  # length, type, width, height, depth, colour, ..., crc
IEND = b"\0\0\0\0IEND\xaeB`\x82"  # the empty IEND chunk every PNG ends with


def check_png(data: bytes) -> ImageInfo:
    """Check the PNG signature, its IHDR chunk and its IEND end; raise PngError if unusable."""
    if not data.startswith(PNG_SIGNATURE):
        raise PngError("not a PNG (no PNG signature)")
    if len(data) < len(PNG_SIGNATURE) + IHDR.size:
        raise PngError("truncated PNG header")
    length, kind, width, height, depth, colour, _, _, _, crc = IHDR.unpack_from(data, 8)
    if length != 13 or kind != b"IHDR" or zlib.crc32(data[12:29]) != crc:
        raise PngError("corrupt PNG header (no valid IHDR chunk first)")
    if not data.rstrip(PADDING).endswith(IEND):
        raise PngError("truncated PNG (no IEND chunk at the end)")
    if width == 0 or height == 0:
        raise PngError(f"invalid PNG header ({width}x{height})")
    if colour in PNG_ALPHA:
        raise PngError(f"PNG with an alpha channel ({PNG_ALPHA[colour]}), not supported")
    if colour not in PNG_COMPONENTS or depth not in (1, 2, 4, 8, 16):
        raise PngError(f"invalid PNG header (colour type {colour}, bit depth {depth})")
    if depth == 16:  # 8-bit arrays only: scaling 16 bits down is a choice the data never needed
        raise PngError("16-bit PNG, not supported")
    return ImageInfo(width, height, PNG_COMPONENTS[colour])


# ---------------------------------------------------------------- decoding

# A decoder: (image bytes, channels 1 or 3) -> uint8 array (H, W, channels).
Decoder = Callable[[bytes, int], np.ndarray]


def decode_simplejpeg(data: bytes, channels: int, out: np.ndarray | None = None) -> np.ndarray:
    """Decode with simplejpeg (libjpeg-turbo), strict: recoverable errors raise too. With `out`
    (writable, C-contiguous, big enough: check the header first), into its memory."""
    colorspace = "GRAY" if channels == 1 else "RGB"
    return simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=True, buffer=out)


def decode_cv2(data: bytes, channels: int) -> np.ndarray:
    """Decode a JPEG or PNG with OpenCV's imdecode (BGR turned into RGB)."""
    import cv2

    buf = np.frombuffer(data, np.uint8)
    if channels == 1:
        image = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    else:
        image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("cv2 cannot decode the image")
    if channels == 1:
        return image[:, :, None]
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_pil(data: bytes, channels: int) -> np.ndarray:
    """Decode a JPEG or PNG with PIL (the published workflow's way)."""
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=("JPEG", "PNG")) as image:
        array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    return array[:, :, None] if channels == 1 else array


DECODERS: dict[str, Decoder] = {
    "simplejpeg": decode_simplejpeg,
    "cv2": decode_cv2,
    "pil": decode_pil,
}
DEFAULT_DECODER = "simplejpeg"  # the fastest measured; see the module docstring
# simplejpeg reads JPEG only: PNG fields are decoded by one of these.
PNG_DECODERS: dict[str, Decoder] = {"cv2": decode_cv2, "pil": decode_pil}
DEFAULT_PNG_DECODER = "cv2"  # the faster measured; see the module docstring


def decode_png(data: bytes, channels: int) -> np.ndarray:
    """Decode a PNG with the faster measured decoder (see the module docstring)."""
    return PNG_DECODERS[DEFAULT_PNG_DECODER](data, channels)


def get_decoder(name: str = DEFAULT_DECODER) -> Decoder:
    """The decoder function called `name` (one of DECODERS)."""
    try:
        return DECODERS[name]
    except KeyError:
        raise ValueError(f"unknown JPEG decoder {name!r}: use one of {sorted(DECODERS)}") from None


def decode_problem(data: bytes, found: str, components: int) -> str | None:
    """Why an image whose header was checked (`check_image`: its format and size) does not
    decode whole with the loader's decoder for its format, strictly; None when it does."""
    decoder = decode_png if found == "PNG" else decode_simplejpeg
    try:
        decoder(data, 1 if components == 1 else 3)
    except ValueError as exc:
        return f"undecodable image ({exc})"
    return None


def field_is_png(name: str) -> bool:
    """True when a shard field is a PNG: its name ends in `.png` (convert names each field by
    its real format), else it is a JPEG. The one place that rule is written."""
    return name.endswith(".png")


def check_field(name: str, data: bytes) -> ImageInfo:
    """A shard field's header, checked as the format its name says; ImageError if unusable."""
    return check_png(data) if field_is_png(name) else check_jpeg(data)


def named_format(name: str) -> str:
    """The format a shard field's name says it holds: PNG for `.png`, else JPEG."""
    return "PNG" if field_is_png(name) else "JPEG"


def decoder_for(name: str, jpeg_decoder: Decoder | None = None) -> Decoder:
    """The decoder of a shard field by its name: PNG's for `.png`, else `jpeg_decoder`
    (simplejpeg by default)."""
    return decode_png if field_is_png(name) else (jpeg_decoder or decode_simplejpeg)


def decode_image(
    data: bytes,
    channels: int,
    size: tuple[int, int],
    decoder: Decoder | None = None,
    out: np.ndarray | None = None,
    expect: str | None = None,
) -> np.ndarray:
    """Decode one image with `decoder` (simplejpeg by default) to uint8 (H, W, channels),
    checking its (width, height) against `size` first, from its header, and with `expect`
    ("JPEG" or "PNG": what its name says) that its bytes are that format.

    With `out`, a uint8 (H, W, channels) array, the pixels end in `out`, which is returned:
    simplejpeg decodes straight into it when it is C-contiguous; other decoders' arrays are
    copied in."""
    # The header before the pixels: a 1 MB PNG may declare 30000x30000 (900 MB decoded).
    found, (width, height, _) = check_image(data)
    if expect is not None and found != expect:
        raise ImageError(f"holds {found} bytes, not the {expect} its name says")
    if (width, height) != tuple(size):
        raise ImageError(f"image is {width}x{height}, expected {size[0]}x{size[1]}")
    decoder = decoder or decode_simplejpeg
    direct = (
        decoder is decode_simplejpeg
        and out is not None
        and out.shape == (height, width, channels)
        and out.flags.c_contiguous
    )
    image = decode_simplejpeg(data, channels, out) if direct else decoder(data, channels)
    height, width = image.shape[:2]
    if (width, height) != tuple(size):
        raise ValueError(f"image is {width}x{height}, expected {size[0]}x{size[1]}")
    if out is None:
        return image
    if not direct:  # a decoder that cannot write into `out`, or an `out` it cannot use
        out[...] = image
    return out


def measure_decoders(
    jpegs: Sequence[bytes],
    channels: int = 1,
    seconds: float = 0.5,
    decoders: dict[str, Decoder] = DECODERS,
) -> dict[str, float]:
    """Images per second of each decoder on `jpegs`, each run for about `seconds` on this thread."""
    rates = {}
    for name, decoder in decoders.items():
        decoder(jpegs[0], channels)  # warm-up: imports and library initialisation
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for data in jpegs:
                decoder(data, channels)
            count += len(jpegs)
        rates[name] = count / (time.perf_counter() - start)
    return rates
