"""The loader workers' background cache: fresh-decode arrays, bounded, never changed in place."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import encode

from pipeline.images import decode_image
from pipeline.train.bgcache import DecodedCache
from pipeline.train.stages import (
    LogOnce,
    SampleDecoder,
    SkipCounter,
    decode_batches,
    decode_samples,
)

SIZE = (160, 160)


def fresh(data: bytes, channels: int, size) -> np.ndarray:
    return decode_image(data, channels, size)


def raw_samples(n: int, backgrounds: int, channels: int = 1) -> list[dict]:
    """n raw samples over a few backgrounds (distinct bytes each), as the tar reader gives."""
    bgs = [encode(160, 160, 1000 + b, channels) for b in range(backgrounds)]
    return [
        {
            "__key__": f"k{i}",
            "__url__": "mem.tar",
            "bg.jpg": bgs[i % backgrounds],
            "fg_bg.jpg": encode(160, 160, i, channels),
            "mask.jpg": encode(160, 160, 500 + i),
            "depth.jpg": encode(80, 80, 700 + i),
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("channels", [1, 3])
def test_cached_arrays_are_identical_to_a_fresh_decode(channels):
    cache = DecodedCache(8)
    images = [encode(160, 160, seed, channels) for seed in range(5)]
    for _ in range(3):  # the first round decodes, the next two hit
        for data in images:
            got = cache.decode(data, channels, SIZE, fresh)
            want = fresh(data, channels, SIZE)
            assert got.dtype == want.dtype and np.array_equal(got, want)
    assert (cache.misses, cache.hits) == (5, 10)


def test_the_key_is_the_bytes_not_the_object():
    cache = DecodedCache(8)
    data = encode(160, 160, 3)
    first = cache.decode(data, 1, SIZE, fresh)
    assert cache.decode(bytes(bytearray(data)), 1, SIZE, fresh) is first  # equal bytes: a hit
    other = encode(160, 160, 4)
    assert not np.array_equal(cache.decode(other, 1, SIZE, fresh), first)
    assert cache.decode(data, 3, SIZE, fresh).shape == (160, 160, 3)  # channels are in the key


def test_the_cache_stays_within_its_bound_dropping_the_least_recent():
    cache = DecodedCache(4)
    images = [encode(160, 160, seed) for seed in range(10)]
    for data in images:
        cache.decode(data, 1, SIZE, fresh)
        assert len(cache) <= 4
        assert cache.nbytes <= 4 * 160 * 160  # the bound: entries x one decoded image
    cache.decode(images[6], 1, SIZE, fresh)  # recently used: kept
    cache.decode(images[0], 1, SIZE, fresh)  # evicted long ago: decoded again
    misses = cache.misses
    cache.decode(images[6], 1, SIZE, fresh)
    assert cache.misses == misses  # 6 survived the insertion of 0


def test_a_failed_decode_is_not_cached():
    cache = DecodedCache(4)
    with pytest.raises(ValueError):
        cache.decode(encode(80, 80, 1), 1, SIZE, fresh)  # wrong size
    assert len(cache) == 0


def test_cached_arrays_are_read_only_and_batches_are_copies():
    samples = raw_samples(6, backgrounds=2)
    cache = DecodedCache(8)
    sizes = {"bg": SIZE, "fg_bg": SIZE, "mask": SIZE, "depth": (80, 80)}
    decoder = SampleDecoder(1, sizes, None, cache)
    decoded = list(decode_samples(samples, decoder, SkipCounter(), LogOnce()))
    assert (cache.misses, cache.hits) == (2, 4)
    assert decoded[0]["bg"] is decoded[2]["bg"]  # one array for the shared background
    with pytest.raises(ValueError, match="read-only"):
        decoded[0]["bg"][0, 0, 0] = 1
    # The loader's stage: each cached background copied into its place in the batch.
    batch = next(decode_batches(samples, decoder, 6, SkipCounter(), LogOnce(), True))
    batch["inputs"].add_(1)  # a later stage writing into its batch (e.g. an in-place augmentation)
    again = cache.decode(samples[0]["bg.jpg"], 1, SIZE, fresh)
    assert np.array_equal(again, fresh(samples[0]["bg.jpg"], 1, SIZE))
    bg = batch["inputs"][0, 1:]  # channel 0 is fg_bg, 1 is bg
    assert torch.equal(bg.permute(1, 2, 0), torch.from_numpy(again.copy()) + 1)


def test_decoding_with_and_without_the_cache_gives_the_same_samples():
    samples = raw_samples(9, backgrounds=3, channels=3)
    sizes = {"bg": SIZE, "fg_bg": SIZE, "mask": SIZE, "depth": (80, 80)}
    plain = list(decode_samples(samples, SampleDecoder(3, sizes), SkipCounter(), LogOnce()))
    decoder = SampleDecoder(3, sizes, None, DecodedCache())
    cached = list(decode_samples(samples, decoder, SkipCounter(), LogOnce()))
    for a, b in zip(plain, cached, strict=True):
        assert a.keys() == b.keys()
        for field in ("bg", "fg_bg", "mask", "depth"):
            assert np.array_equal(a[field], b[field])


def test_a_cached_png_background_does_not_pass_as_a_jpeg_of_the_same_bytes():
    from pipeline.store.synth import encode_png

    png = encode_png(np.full((160, 160), 90, np.uint8))
    first, second = raw_samples(2, backgrounds=1)
    first.pop("bg.jpg")
    first["bg.png"] = png
    second["bg.jpg"] = png  # the same bytes under a JPEG's name: a mistake decoding would catch
    sizes = {"bg": SIZE, "fg_bg": SIZE, "mask": SIZE, "depth": (80, 80)}
    decoder = SampleDecoder(1, sizes, None, DecodedCache())
    counter, problems = SkipCounter(), []
    decoded = list(decode_samples([first, second], decoder, counter, problems.append))
    assert [s["key"] for s in decoded] == ["k0"] and counter.skipped == 1
    assert "bg.jpg: holds PNG bytes, not the JPEG its name says" in str(problems[0])
