"""The loader workers' stages: each takes and returns an iterator of dicts (WebDataset style).

shard urls -> tar samples (raw bytes) -> keep this slot's samples -> shuffle buffer (train) ->
decode into batches (each image written into its place in the batch, the model's "inputs"
joined as it is filled) -> augment (train, when the workers augment). Each is a plain
generator, easy to test alone.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from pipeline.images import Decoder, decode_image, decoder_for, named_format
from pipeline.schema import FIELDS, IMAGE_EXTS, INPUTS, field_names, find_field
from pipeline.store.tarread import REFUSED
from pipeline.train import augment as augmentation
from pipeline.train.augment import AugmentConfig
from pipeline.train.bgcache import DecodedCache
from pipeline.train.ring import RING_KEY, BatchRing, SharedRing
from pipeline.train.shards import Handler, ShardMiscounted

log = logging.getLogger(__name__)

TARGETS = tuple(field for field in FIELDS if field not in INPUTS)  # mask, depth
BATCH_FIELDS = ("inputs", *TARGETS)  # a batch's tensors, in `batch_shapes`' order


CYCLE = "__cycle__"  # a training sample's cycle over the epoch's shards (loader._endless_samples)


class SkipCounter:
    """Per-worker tally shared by the decode and batch stages (one process, plain ints), of
    one epoch or pass. An endless training stream counts a sample that fails only in its
    epoch's first cycle over the shards (`CYCLE`), which deals every sample to exactly one
    worker of one rank: read again later, by whichever worker, it is not counted again."""

    def __init__(self) -> None:
        self.skipped = 0  # samples that failed to decode, in total
        self.decoded = 0
        self._reported = 0

    def failed(self, sample: dict) -> None:
        """Count a sample that failed (unless it is a later cycle's reading of it)."""
        if sample.get(CYCLE, 0) == 0:
            self.skipped += 1

    def take(self) -> int:
        """Skips since the previous call: what the next batch reports."""
        new, self._reported = self.skipped - self._reported, self.skipped
        return new


class LogOnce:
    """A webdataset-style handler that logs each distinct problem once and continues.

    webdataset's own `warn_and_continue` uses `warnings` and sleeps 0.5 s per call; a training
    stream that cycles over its shards would also repeat the same sample's warning every cycle.
    """

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, exn: Exception) -> bool:
        message = str(exn)
        if message not in self.seen:
            self.seen.add(message)
            if isinstance(exn, ShardMiscounted):  # nothing of it was left out
                log.warning("%s; training on the samples it holds", message)
            else:
                log.warning("skipped: %s", message)
        return True


def keep_slot(samples: Iterable[dict], slot: int, slots: int) -> Iterator[dict]:
    """Keep the samples whose index in the stream is slot modulo slots."""
    for index, sample in enumerate(samples):
        if index % slots == slot:
            yield sample


# The raw bytes a shuffle buffer may hold, per sample it has room for. A shard sample is some
# 10 kB (four 160x160 images of 5-80 KB each at the most), but the tar reader lets one hold up
# to 20 MiB, so a buffer of 1000 counted in samples alone could hold 20 GB per worker (a sparse
# shard of zero-padded JPEGs costs a few MB of disk). Data within this never notices it.
SHUFFLE_SAMPLE_BYTES = 256 << 10


def shuffle_samples(
    samples: Iterable[dict], size: int, rng: random.Random, max_bytes: int | None = None
) -> Iterator[dict]:
    """Shuffle through a buffer of `size` samples (each new sample swaps out a random one)
    holding at most `max_bytes` of their files (default size x SHUFFLE_SAMPLE_BYTES): past
    that, random ones go out first, so outsized samples shrink the buffer, never grow memory."""
    budget = size * SHUFFLE_SAMPLE_BYTES if max_bytes is None else max_bytes
    buffer: list[dict] = []
    sizes: list[int] = []  # each buffered sample's bytes
    held = 0
    for sample in samples:
        nbytes = sum(len(v) for v in sample.values() if isinstance(v, bytes))
        held += nbytes
        while held > budget and buffer:
            index = rng.randrange(len(buffer))
            held -= sizes.pop(index)
            yield buffer.pop(index)
        if len(buffer) < size:
            buffer.append(sample)
            sizes.append(nbytes)
            continue
        index = rng.randrange(size)
        held -= sizes[index]
        yield buffer[index]
        buffer[index], sizes[index] = sample, nbytes
    rng.shuffle(buffer)
    yield from buffer


class SampleDecoder:
    """Decodes the four fields of raw samples, each checked against its manifest size first.

    A field is `FIELD.jpg` (decoded by `decoder`) or `FIELD.png` (by `images.decode_png`, the
    faster of cv2 and PIL as measured there): the same arrays either way, one channel for masks
    and depths whatever their colour type. With a `cache`, each distinct background is decoded
    once (its arrays are read-only). A field that cannot be decoded is a ValueError naming it.
    """

    def __init__(
        self,
        channels: int,
        sizes: dict[str, tuple[int, int]],
        decoder: Decoder | None = None,
        cache: DecodedCache | None = None,
    ) -> None:
        self.channels, self.sizes, self.cache = channels, sizes, cache
        # The decoding function of each field name (`mask.jpg`, `mask.png`, ...), made once.
        self._codecs = {
            name: functools.partial(
                decode_image, decoder=decoder_for(name, decoder), expect=named_format(name)
            )
            for field in FIELDS
            for name in field_names(field)
        }

    def field(self, sample: dict, field: str, out: np.ndarray | None = None) -> np.ndarray:
        """`field` of `sample` as uint8 (H, W, C); written into `out`, of that shape, if given."""
        ext = find_field(sample, field)
        if ext is None:
            raise ValueError(f"missing {field}.{'|'.join(IMAGE_EXTS)}")
        data, codec = sample[ext], self._codecs[ext]
        depth = self.channels if field in INPUTS else 1  # masks and depths: one channel
        try:
            if self.cache is None or field != "bg":
                return codec(data, depth, self.sizes[field], out=out)
            image = self.cache.decode(data, depth, self.sizes[field], codec, ext)  # read-only
        except Exception as exc:  # any decoder's failure skips the sample
            raise ValueError(f"{ext}: {exc}") from None
        if out is None:
            return image
        out[...] = image
        return out

    def sample(self, sample: dict) -> dict:
        """{"key", field: uint8 (H, W, C)}: each field in an array of its own."""
        if REFUSED in sample:
            raise ValueError(sample[REFUSED])
        return {"key": sample.get("__key__"), **{f: self.field(sample, f) for f in FIELDS}}

    def into(self, sample: dict, arrays: dict[str, np.ndarray], index: int) -> None:
        """Decode `sample` into place `index` of a batch's arrays (collate's layout). A
        one-channel image is decoded straight into the batch where its decoder can (simplejpeg):
        no array of its own, no copy; the others are copied in, as collate does."""
        if REFUSED in sample:
            raise ValueError(sample[REFUSED])
        for field, slot in _slots(arrays, index, self.channels):  # slot: (C, H, W)
            if slot.shape[0] == 1:  # (1, H, W) is (H, W, 1) in memory
                self.field(sample, field, out=slot[0][:, :, None])
            else:
                slot[...] = self.field(sample, field).transpose(2, 0, 1)


def _slots(arrays: dict[str, np.ndarray], index: int, channels: int) -> Iterator[tuple]:
    """(field, its (C, H, W) view) of place `index` in a batch: the model's inputs (fg_bg
    channels, then bg) and the targets."""
    for j, field in enumerate(INPUTS):
        yield field, arrays["inputs"][index, j * channels : (j + 1) * channels]
    for field in TARGETS:
        yield field, arrays[field][index]


def _skip(sample: dict, exc: Exception, counter: SkipCounter, handler: Handler) -> bool:
    """Count a sample that failed and hand it to the handler, its key and shard named: True
    goes on, False stops the stream."""
    key, url = sample.get("__key__"), sample.get("__url__")
    counter.failed(sample)
    return handler(ValueError(f"sample {key} in {url}: {exc}"))


def decode_samples(
    samples: Iterable[dict], decoder: SampleDecoder, counter: SkipCounter, handler: Handler
) -> Iterator[dict]:
    """Raw samples -> {"key", field: uint8 (H, W, C)}; a sample that fails is counted and handed
    to the handler (with its key and shard named), never half-yielded."""
    for sample in samples:
        try:
            decoded = decoder.sample(sample)
        except ValueError as exc:
            if _skip(sample, exc, counter, handler):
                continue
            return
        counter.decoded += 1
        yield decoded


def decode_batches(
    samples: Iterable[dict],
    decoder: SampleDecoder,
    batch_size: int,
    counter: SkipCounter,
    handler: Handler,
    finite: bool,
    ring: BatchRing | None = None,
) -> Iterator[dict]:
    """Raw samples -> batches (see `collate` for their layout), each sample decoded straight
    into its place in the batch; a sample that fails is counted, handed to the handler and its
    place reused. With a `ring` (a training worker's), batches are written into its buffers.

    A `finite` stream (evaluation) keeps its last short batch, and holds each batch back until
    the next is made, so that skips after its last batch are still reported (added to that
    batch's "skipped"; a stream that made no batch ends with one of no sample, to carry them).
    An endless one (training) yields each batch once it is full: its worker starts writing
    batch j + 1 only after handing over batch j, which the ring relies on.
    """
    if finite and ring is not None:
        raise ValueError("a finite stream's batches cannot use a ring (see train.ring)")
    batches = _fill_batches(samples, decoder, batch_size, counter, handler, finite, ring)
    if not finite:
        yield from batches
        return
    held = None
    for batch in batches:
        if held is not None:
            yield held
        held = batch
    if held is not None:
        held["skipped"] += counter.take()
        yield held
    elif counter.skipped:  # no batch to carry the skips: one of no sample does (BatchStream)
        yield {"keys": [], "skipped": counter.take()}


def _fill_batches(
    samples: Iterable[dict],
    decoder: SampleDecoder,
    batch_size: int,
    counter: SkipCounter,
    handler: Handler,
    partial: bool,
    ring: BatchRing | None,
) -> Iterator[dict]:
    """decode_batches' batches as soon as each is full (and the last short one if `partial`)."""
    shapes = batch_shapes(batch_size, decoder.channels, decoder.sizes)
    tensors: list[torch.Tensor] = []
    keys: list[str] = []
    for sample in samples:
        if not tensors:  # the first sample of a batch: its buffers now, not before
            shared, tensors, arrays = _new_batch(shapes, ring)
        try:
            decoder.into(sample, arrays, len(keys))
        except ValueError as exc:
            if _skip(sample, exc, counter, handler):
                continue
            break
        counter.decoded += 1
        keys.append(sample.get("__key__"))
        if len(keys) == batch_size:
            yield _batch(tensors, keys, counter.take(), shared)
            tensors, keys = [], []
    if keys and partial:  # into tensors of its size: a view would carry the whole batch's
        short = [_batch_tensor((len(keys), *t.shape[1:])) for t in tensors]
        for whole, part in zip(tensors, short, strict=True):
            part.numpy()[...] = whole.numpy()[: len(keys)]  # numpy's copy: see ring._copy
        yield _batch(short, keys, counter.take(), None)


def batch_shapes(
    batch_size: int, channels: int, sizes: dict[str, tuple[int, int]]
) -> tuple[tuple[int, ...], ...]:
    """The shapes of a batch's "inputs", "mask" and "depth" (uint8, channels first)."""
    if sizes["bg"] != sizes["fg_bg"]:
        bg, fg_bg = sizes["bg"], sizes["fg_bg"]
        raise ValueError(f"the model needs bg and fg_bg of one size, not {bg} and {fg_bg}")
    width, height = sizes[INPUTS[0]]
    shapes = ((batch_size, len(INPUTS) * channels, height, width),)
    return shapes + tuple((batch_size, 1, sizes[f][1], sizes[f][0]) for f in TARGETS)


def _new_batch(
    shapes: tuple[tuple[int, ...], ...], ring: BatchRing | None
) -> tuple[SharedRing | None, list[torch.Tensor], dict[str, np.ndarray]]:
    """A batch's uninitialised tensors (the next slot of a ring, if given, and that ring) and
    numpy views of them, by field."""
    if ring is None:
        shared, tensors = None, [_batch_tensor(shape) for shape in shapes]
    else:
        shared, tensors = ring.take(shapes)
    return shared, tensors, dict(zip(BATCH_FIELDS, (t.numpy() for t in tensors), strict=True))


def _batch(tensors: list[torch.Tensor], keys: list, skipped: int, ring: SharedRing | None) -> dict:
    batch: dict[str, Any] = dict(zip(BATCH_FIELDS, tensors, strict=True))
    batch.update(keys=keys, skipped=skipped)
    if ring is not None:
        batch[RING_KEY] = ring  # the worker's handover sends it as a RingBatch (train.ring)
    return batch


def collate(samples: list[dict], skipped: int, ring: BatchRing | None = None) -> dict[str, Any]:
    """Decoded samples -> "inputs" uint8 (B, 2C, H, W) (fg_bg channels, then bg), "mask" and
    "depth" uint8 (B, 1, H, W), "keys", "skipped".

    Each image is copied once, straight into its place in the batch (no stacking, no
    concatenation after it). In a loader worker the batch lies in shared memory from the start
    (in the worker's `ring`, if given: see train.ring), so handing it over copies nothing more.
    The loader's workers skip even that copy where they can (`decode_batches`).
    """
    # uint8 all the way: a quarter of float32's bytes to move, pin and copy to the GPU.
    first = samples[0]
    sizes = {field: first[field].shape[1::-1] for field in FIELDS}  # (width, height)
    channels = first[INPUTS[0]].shape[2]
    shared, tensors, arrays = _new_batch(batch_shapes(len(samples), channels, sizes), ring)
    for i, sample in enumerate(samples):
        for field, slot in _slots(arrays, i, channels):
            slot[...] = sample[field].transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
    return _batch(tensors, [s["key"] for s in samples], skipped, shared)


def _batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor; in shared memory when made in a loader worker."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    # As PyTorch's default collate does: the queue to the trainer then sends a handle, not bytes.
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def augment_batches(
    batches: Iterable[dict], config: AugmentConfig, generator: torch.Generator
) -> Iterator[dict]:
    """Apply the training augmentation to each batch (photometric on inputs, flip on all four)."""
    for batch in batches:
        inputs = augmentation.to_float(batch["inputs"])
        augmented = augmentation.augment_inputs(
            inputs, batch["mask"], batch["depth"], config, generator
        )
        # Back to uint8, into the batch's own (shared) tensors: rounding to 1/255 is what
        # jitter on 8-bit images does anyway, and the trip to the trainer stays a handle.
        for field, tensor in zip(BATCH_FIELDS, augmented, strict=True):
            if field == "inputs":
                tensor = tensor.mul_(255).round_()
            if tensor is not batch[field]:
                batch[field].copy_(tensor)
        yield batch
