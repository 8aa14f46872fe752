"""The workers' decode-into-batch stage: the same batches as decoding each sample and collating,
written in place (no array of its own per image where simplejpeg can decode into the batch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import encode, encode_png_mask

from pipeline.images import decode_image, decode_png
from pipeline.train.bgcache import DecodedCache
from pipeline.train.ring import RING_KEY, BatchRing, SharedRing
from pipeline.train.stages import (
    LogOnce,
    SampleDecoder,
    SkipCounter,
    batch_shapes,
    collate,
    decode_batches,
    decode_samples,
)

SIZES = {"bg": (160, 160), "fg_bg": (160, 160), "mask": (160, 160), "depth": (80, 80)}


def raw(n: int, channels: int = 1, png_every: int = 0, backgrounds: int = 2) -> list[dict]:
    """n raw samples as the tar reader gives them; every `png_every`-th mask a PNG."""
    bgs = [encode(160, 160, 900 + b, channels) for b in range(backgrounds)]
    samples = []
    for i in range(n):
        sample = {
            "__key__": f"k{i}",
            "__url__": "mem.tar",
            "bg.jpg": bgs[i % backgrounds],
            "fg_bg.jpg": encode(160, 160, i, channels),
            "depth.jpg": encode(80, 80, 300 + i),
        }
        if png_every and i % png_every == 0:
            sample["mask.png"] = encode_png_mask(160, 160, i)
        else:
            sample["mask.jpg"] = encode(160, 160, 600 + i)
        samples.append(sample)
    return samples


def broken(key: str) -> dict:
    """A sample whose fg_bg is fine and whose mask is not a JPEG: it fails half-decoded."""
    return {**raw(1)[0], "__key__": key, "mask.jpg": b"\xff\xd8 not a jpeg"}


def batches(samples, channels=1, batch_size=4, cache=None, finite=True, ring=None, counter=None):
    decoder = SampleDecoder(channels, SIZES, None, cache)
    counter = counter or SkipCounter()
    return list(decode_batches(samples, decoder, batch_size, counter, LogOnce(), finite, ring))


def collated(samples, channels=1, batch_size=4) -> list[dict]:
    decoder = SampleDecoder(channels, SIZES)
    decoded = list(decode_samples(samples, decoder, SkipCounter(), LogOnce()))
    return [collate(decoded[i : i + batch_size], 0) for i in range(0, len(decoded), batch_size)]


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a["keys"] == b["keys"]
        for field in ("inputs", "mask", "depth"):
            assert a[field].dtype == torch.uint8 and a[field].shape == b[field].shape
            assert torch.equal(a[field], b[field]), field


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("cached", [False, True])
def test_decoding_into_the_batch_gives_the_collated_batches(channels, cached):
    samples = raw(10, channels, png_every=3)
    cache = DecodedCache(8) if cached else None
    got = batches(samples, channels, cache=cache)
    assert [len(b["keys"]) for b in got] == [4, 4, 2]  # the last, short batch kept
    assert got[-1]["inputs"].untyped_storage().nbytes() == got[-1]["inputs"].nbytes  # its size
    assert_same(got, collated(samples, channels))
    if cached:
        assert (cache.misses, cache.hits) == (2, 8)


def test_a_sample_failing_half_decoded_leaves_no_trace_in_its_place():
    good = raw(6)
    samples = [good[0], broken("bad1"), good[1], good[2], broken("bad2"), broken("bad3")]
    samples += good[3:]
    counter = SkipCounter()
    got = batches(samples, counter=counter)
    # bad1's fg_bg was written into place 1 before its mask failed: good[1] overwrote all of it
    assert_same(got, collated(good))
    assert [b["keys"] for b in got] == [["k0", "k1", "k2", "k3"], ["k4", "k5"]]
    assert [b["skipped"] for b in got] == [3, 0] and counter.skipped == 3  # all before k3


def test_trailing_skips_reach_the_last_batch():
    got = batches([*raw(5), broken("x"), broken("y")], batch_size=2)
    assert [len(b["keys"]) for b in got] == [2, 2, 1]
    assert [b["skipped"] for b in got] == [0, 0, 2]


def test_an_endless_stream_hands_each_batch_over_once_full():
    # The ring's guarantee (train.ring): a worker writes batch j + 1 only after handing over j.
    consumed = []

    def counted():
        for i, sample in enumerate(raw(8)):
            consumed.append(i)
            yield sample

    decoder = SampleDecoder(1, SIZES)
    stream = decode_batches(counted(), decoder, 4, SkipCounter(), LogOnce(), False, BatchRing(3))
    first = next(stream)
    assert len(consumed) == 4  # not a sample of batch 2 read yet
    assert isinstance(first[RING_KEY], SharedRing)  # its ring, for the worker's handover
    second = next(stream)
    assert len(consumed) == 8 and second["inputs"].data_ptr() != first["inputs"].data_ptr()
    assert list(stream) == []  # no short batch in training


def test_a_finite_stream_cannot_use_a_ring():
    with pytest.raises(ValueError, match="ring"):
        batches(raw(2), ring=BatchRing(3))


def test_one_size_for_the_model_inputs():
    with pytest.raises(ValueError, match="bg and fg_bg of one size"):
        batch_shapes(4, 1, {**SIZES, "bg": (80, 80)})
    assert batch_shapes(4, 3, SIZES) == ((4, 6, 160, 160), (4, 1, 160, 160), (4, 1, 80, 80))


def test_decode_image_writes_into_out():
    data = encode(160, 120, 5)
    fresh = decode_image(data, 1, (160, 120))
    out = np.full((120, 160, 1), 7, np.uint8)
    assert decode_image(data, 1, (160, 120), out=out) is out
    assert np.array_equal(out, fresh)
    png = encode_png_mask(160, 120, 1)  # a decoder that cannot write into `out`: copied in
    assert decode_image(png, 1, (160, 120), decode_png, out=out) is out
    assert np.array_equal(out, decode_png(png, 1))
    with pytest.raises(ValueError, match="expected 80x80"):
        decode_image(data, 1, (80, 80), out=np.zeros((80, 80, 1), np.uint8))
