"""The loader workers' stages: each takes and returns an iterator of dicts (WebDataset style).

shard urls -> tar samples (raw bytes) -> keep this slot's samples -> shuffle buffer (train) ->
decode -> batch (the model's "inputs" joined as it is filled) -> augment (train, when the workers
augment). Each is a plain generator, easy to test alone.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

import torch
from torch.utils.data import get_worker_info
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception

from pipeline.images import Decoder, decode_image, decoder_for
from pipeline.schema import FIELDS, IMAGE_EXTS, INPUTS, field_names, find_field
from pipeline.store.tar import read_samples
from pipeline.train import augment as augmentation
from pipeline.train.augment import AugmentConfig
from pipeline.train.bgcache import DecodedCache
from pipeline.train.ring import RING_KEY, BatchRing

log = logging.getLogger(__name__)

TARGETS = tuple(field for field in FIELDS if field not in INPUTS)  # mask, depth

Handler = Callable[[Exception], bool]  # webdataset semantics: True continue, False stop, or raise


class SkipCounter:
    """Per-worker tally shared by the decode and batch stages (one process, plain ints)."""

    def __init__(self) -> None:
        self.skipped = 0  # samples that failed to decode, in total
        self.decoded = 0
        self._reported = 0

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
            log.warning("skipped: %s", message)
        return True


def read_shards(urls: Iterable[str], handler: Handler = reraise_exception) -> Iterator[dict]:
    """Open each shard with gopen (path, http://, pipe:, …) and yield its raw samples."""
    for url in urls:
        try:
            stream = gopen(url)
        except Exception as exn:
            if handler(ValueError(f"{url}: cannot open the shard ({exn})")):
                continue
            return
        try:
            yield from read_samples(stream, url)
        except (OSError, ValueError) as exn:
            if not handler(ValueError(f"{url}: cannot read the shard ({exn})")):
                return
        finally:
            failed = _close(stream, url)  # a pipe: or http shard reports its errors on close
        if failed is not None and not handler(failed):
            return


def _close(stream: BinaryIO, url: str) -> ValueError | None:
    """Close a shard's stream; the error closing it raised, if any (a failed pipe command)."""
    try:
        stream.close()
    except OSError as exn:
        return ValueError(f"{url}: the shard's stream failed ({exn})")
    return None


def keep_slot(samples: Iterable[dict], slot: int, slots: int) -> Iterator[dict]:
    """Keep the samples whose index in the stream is slot modulo slots."""
    for index, sample in enumerate(samples):
        if index % slots == slot:
            yield sample


def shuffle_samples(samples: Iterable[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle through a buffer of `size` samples (each new sample swaps out a random one)."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


def decode_samples(
    samples: Iterable[dict],
    channels: int,
    sizes: dict[str, tuple[int, int]],
    counter: SkipCounter,
    handler: Handler,
    decoder: Decoder | None = None,
    cache: DecodedCache | None = None,
) -> Iterator[dict]:
    """Raw samples -> {"key", field: uint8 (H, W, C)}; a sample that fails is counted and handed
    to the handler (with its key and shard named), never half-yielded. With a `cache`, each
    distinct background is decoded once (its arrays are read-only).

    A field is `FIELD.jpg` (decoded by `decoder`) or `FIELD.png` (by `images.decode_png`, the
    faster of cv2 and PIL as measured there): the same arrays either way, one channel for masks
    and depths whatever their colour type."""
    # The decoding function of each field name (`mask.jpg`, `mask.png`, ...), made once.
    codecs = {
        name: functools.partial(decode_image, decoder=decoder_for(name, decoder))
        for field in FIELDS
        for name in field_names(field)
    }
    for sample in samples:
        key, url = sample.get("__key__"), sample.get("__url__")
        try:
            decoded = {"key": key}
            for field in FIELDS:
                ext = find_field(sample, field)
                if ext is None:
                    raise ValueError(f"missing {field}.{'|'.join(IMAGE_EXTS)}")
                data = sample[ext]
                depth = channels if field in INPUTS else 1  # masks and depths: one channel
                codec = codecs[ext]
                try:
                    if cache is not None and field == "bg":  # shared by many samples
                        decoded[field] = cache.decode(data, depth, sizes[field], codec)
                    else:
                        decoded[field] = codec(data, depth, sizes[field])
                except Exception as exc:  # any decoder's failure skips the sample
                    raise ValueError(f"{ext}: {exc}") from None
        except ValueError as exc:
            counter.skipped += 1
            if handler(ValueError(f"sample {key} in {url}: {exc}")):
                continue
            return
        counter.decoded += 1
        yield decoded


def batch_samples(
    samples: Iterable[dict],
    batch_size: int,
    counter: SkipCounter,
    partial: bool,
    ring: BatchRing | None = None,
) -> Iterator[dict]:
    """Stack samples into batches; `partial` keeps the last short batch (evaluation).

    A finished batch is held back until the next is made, so skips after the last batch of a
    finite stream are still reported (added to that last batch's "skipped"). With a `ring` (a
    loader worker's), batches are written into its buffers.
    """
    held, pending = None, []
    for sample in samples:
        pending.append(sample)
        if len(pending) == batch_size:
            if held is not None:
                yield held
            held, pending = collate(pending, counter.take(), ring), []
    if pending and partial:
        if held is not None:
            yield held
        held = collate(pending, counter.take(), ring)
    if held is not None:
        held["skipped"] += counter.take()
        yield held


def collate(samples: list[dict], skipped: int, ring: BatchRing | None = None) -> dict[str, Any]:
    """Decoded samples -> "inputs" uint8 (B, 2C, H, W) (fg_bg channels, then bg), "mask" and
    "depth" uint8 (B, 1, H, W), "keys", "skipped".

    Each image is copied once, straight into its place in the batch (no stacking, no
    concatenation after it). In a loader worker the batch lies in shared memory from the start
    (in the worker's `ring`, if given: see train.ring), so handing it over copies nothing more.
    """
    # uint8 all the way: a quarter of float32's bytes to move, pin and copy to the GPU.
    first, n = samples[0], len(samples)
    height, width, channels = first[INPUTS[0]].shape
    shapes = ((n, len(INPUTS) * channels, height, width),)
    shapes += tuple((n, 1, *first[field].shape[:2]) for field in TARGETS)
    batch: dict[str, Any] = {"keys": [s["key"] for s in samples], "skipped": skipped}
    if ring is not None:
        tensors, batch[RING_KEY] = ring.take(shapes), True
    else:
        tensors = [_batch_tensor(shape) for shape in shapes]
    arrays = {}
    for field, tensor in zip(("inputs", *TARGETS), tensors, strict=True):
        batch[field], arrays[field] = tensor, tensor.numpy()
    for i, sample in enumerate(samples):
        for j, field in enumerate(INPUTS):
            image = sample[field].transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
            arrays["inputs"][i, j * channels : (j + 1) * channels] = image
        for field in TARGETS:
            arrays[field][i, 0] = sample[field][:, :, 0]
    return batch


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
        for field, tensor in zip(("inputs", *TARGETS), augmented, strict=True):
            if field == "inputs":
                tensor = tensor.mul_(255).round_()
            if tensor is not batch[field]:
                batch[field].copy_(tensor)
        yield batch
