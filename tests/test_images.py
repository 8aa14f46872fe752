"""images: a member's format from its bytes, PNG header checks, PNG decoding like JPEG's."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from conftest import encode, encode_png_mask
from PIL import Image

from pipeline.images import (
    PNG_DECODERS,
    PNG_SIGNATURE,
    ImageError,
    ImageInfo,
    PngError,
    check_image,
    check_png,
    decode_image,
    decode_png,
    decode_simplejpeg,
    decoder_for,
    image_format,
)


def pil_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def gray_scene(seed: int = 0) -> np.ndarray:
    """A 160x160 gray picture with edges and texture."""
    rng = np.random.default_rng(seed)
    image = np.add.outer(np.arange(160), np.arange(160)).astype(np.uint8)
    image[40:120, 50:90] = 230
    return (image + rng.integers(0, 20, image.shape)).astype(np.uint8)


def test_the_format_comes_from_the_bytes_not_the_name():
    gray = Image.fromarray(gray_scene())
    assert image_format(encode(160, 160, 1)) == "JPEG"
    assert image_format(encode_png_mask(160, 160, 1)) == "PNG"
    assert image_format(pil_bytes(gray, "GIF")) == "GIF"
    assert image_format(pil_bytes(gray, "BMP")) == "BMP"
    assert image_format(pil_bytes(gray, "TIFF")) == "TIFF"
    assert image_format(pil_bytes(gray.convert("RGB"), "WEBP")) == "WebP"
    assert image_format(b"hello, not an image") == "unknown format"
    assert image_format(b"") == "empty member"


def test_check_image_accepts_jpeg_and_png_and_names_anything_else():
    assert check_image(encode(160, 160, 1)) == ("JPEG", ImageInfo(160, 160, 1))
    assert check_image(encode(80, 80, 2, channels=3)) == ("JPEG", ImageInfo(80, 80, 3))
    assert check_image(encode_png_mask(160, 160, 1)) == ("PNG", ImageInfo(160, 160, 3))
    gif = pil_bytes(Image.fromarray(gray_scene()), "GIF")
    with pytest.raises(ImageError, match="^GIF, not a JPEG or PNG image$"):
        check_image(gif)
    with pytest.raises(ImageError, match="^unknown format, not a JPEG or PNG image$"):
        check_image(b"PK\3\4 something else")


@pytest.mark.parametrize(
    ("mode", "components"), [("L", 1), ("RGB", 3), ("P", 3), ("1", 1)]
)  # gray, RGB, palette (RGB entries), 1-bit gray
def test_png_header_gives_size_and_components(mode: str, components: int):
    image = Image.fromarray(gray_scene()).resize((120, 90)).convert(mode)
    assert check_png(pil_bytes(image, "PNG")) == (120, 90, components)


def test_png_header_refuses_alpha_16_bit_truncation_and_damage():
    rgba = pil_bytes(Image.fromarray(gray_scene()).convert("RGBA"), "PNG")
    with pytest.raises(PngError, match=r"alpha channel \(RGBA\)"):
        check_png(rgba)
    la = pil_bytes(Image.fromarray(gray_scene()).convert("LA"), "PNG")
    with pytest.raises(PngError, match=r"alpha channel \(gray with alpha\)"):
        check_png(la)
    ok, deep = cv2.imencode(".png", gray_scene().astype(np.uint16) * 200)
    with pytest.raises(PngError, match="16-bit PNG"):
        check_png(deep.tobytes())
    good = encode_png_mask(160, 160, 3)
    with pytest.raises(PngError, match="truncated PNG"):
        check_png(good[: len(good) // 2])
    with pytest.raises(PngError, match="truncated PNG header"):
        check_png(good[:20])
    damaged = bytearray(good)
    damaged[18] ^= 0x01  # the width, so the IHDR checksum fails
    with pytest.raises(PngError, match="corrupt PNG header"):
        check_png(bytes(damaged))
    assert check_png(good + b"\n") == (160, 160, 3)  # padding after IEND is harmless


def test_png_decoders_agree_and_read_an_rgb_mask_as_one_channel():
    png = encode_png_mask(160, 160, 7)
    rgb = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    arrays = {name: decoder(png, 1) for name, decoder in PNG_DECODERS.items()}
    for array in arrays.values():
        assert array.shape == (160, 160, 1) and array.dtype == np.uint8
        assert np.array_equal(array[:, :, 0], rgb[:, :, 0])  # white on black: gray = any channel
    assert set(np.unique(arrays["cv2"])) == {0, 255}
    assert np.array_equal(decode_png(png, 1), arrays["cv2"])


def test_a_png_decodes_to_the_array_a_jpeg_of_the_same_image_gives():
    scene = gray_scene(3)
    for channels, image in ((1, scene), (3, np.dstack([scene, scene[::-1], scene.T]))):
        png = pil_bytes(Image.fromarray(image), "PNG")
        jpeg = pil_bytes(Image.fromarray(image), "JPEG", quality=100, subsampling=0)
        from_png = decode_image(png, channels, (160, 160), decode_png)
        from_jpeg = decode_image(jpeg, channels, (160, 160), decode_simplejpeg)
        assert from_png.shape == from_jpeg.shape == (160, 160, channels)
        assert from_png.dtype == from_jpeg.dtype == np.uint8
        assert np.array_equal(from_png.reshape(image.shape), image)  # lossless
        assert np.abs(from_png.astype(int) - from_jpeg).mean() < 1.5  # JPEG is lossy


def test_an_rgb_png_read_as_gray_matches_a_gray_jpeg_of_it():
    colour = np.dstack([gray_scene(1), gray_scene(2), gray_scene(4)])
    png = pil_bytes(Image.fromarray(colour), "PNG")
    jpeg = pil_bytes(Image.fromarray(colour), "JPEG", quality=100, subsampling=0)
    gray_png, gray_jpeg = decode_png(png, 1), decode_simplejpeg(jpeg, 1)
    assert gray_png.shape == gray_jpeg.shape == (160, 160, 1)
    assert np.abs(gray_png.astype(int) - gray_jpeg).max() <= 3  # one formula, 0.299R+0.587G+0.114B


@pytest.mark.parametrize("name", sorted(PNG_DECODERS))
def test_png_decoders_refuse_truncated_and_damaged_data(name: str):
    png = pil_bytes(Image.fromarray(gray_scene()), "PNG")
    damaged = bytearray(png)
    damaged[len(png) // 2] ^= 0xFF  # inside the compressed image data
    for data in (png[: len(png) // 2], bytes(damaged)):
        with pytest.raises(Exception):  # noqa: B017 - each library raises its own kind
            PNG_DECODERS[name](data, 1)


def declaring_png(width: int, height: int) -> bytes:
    """A small gray PNG whose IHDR declares `width`x`height` (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(bytes(width + 1) * 64, 9)  # a few rows: the rest is never reached
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def declaring_jpeg(width: int, height: int) -> bytes:
    """A real 160x160 JPEG whose frame header is changed to declare `width`x`height`."""
    data = bytearray(encode(160, 160, 1))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def refuse_to_decode(data: bytes, channels: int) -> np.ndarray:
    raise AssertionError("the decoder was called on an image of the wrong declared size")


@pytest.mark.parametrize("name", ["mask.png", "fg_bg.jpg"])
def test_decode_image_checks_the_declared_size_before_decoding(name: str):
    data = (declaring_png if name.endswith(".png") else declaring_jpeg)(30000, 30000)
    assert check_image(data)[1][:2] == (30000, 30000)
    with pytest.raises(ImageError, match="image is 30000x30000, expected 160x160"):
        decode_image(data, 1, (160, 160), refuse_to_decode)


def test_decoder_for_goes_by_the_field_name():
    assert decoder_for("mask.png") is decode_png
    assert decoder_for("mask.jpg") is decode_simplejpeg
    assert decoder_for("bg.jpg", refuse_to_decode) is refuse_to_decode
    assert decoder_for("bg.png", refuse_to_decode) is decode_png
