"""The loader workers' stages: each takes and returns an iterator of dicts (WebDataset style).

shard urls -> tar samples (raw bytes) -> keep this slot's samples -> shuffle buffer (train) ->
decode -> batch -> augment (train) -> inputs. Each is a plain generator, easy to test alone.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

import numpy as np
import torch
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception

from pipeline.images import Decoder, decode_image, decode_png
from pipeline.schema import FIELDS, IMAGE_EXTS, INPUTS, find_field
from pipeline.store.tar import read_samples
from pipeline.train import augment as augmentation
from pipeline.train.augment import AugmentConfig

log = logging.getLogger(__name__)

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
) -> Iterator[dict]:
    """Raw samples -> {"key", field: uint8 (H, W, C)}; a sample that fails is counted and handed
    to the handler (with its key and shard named), never half-yielded.

    A field is `FIELD.jpg` (decoded by `decoder`) or `FIELD.png` (by `images.decode_png`, the
    faster of cv2 and PIL as measured there): the same arrays either way, one channel for masks
    and depths whatever their colour type."""
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
                codec = decode_png if ext.endswith(".png") else decoder
                try:
                    decoded[field] = decode_image(data, depth, sizes[field], codec)
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
    samples: Iterable[dict], batch_size: int, counter: SkipCounter, partial: bool
) -> Iterator[dict]:
    """Stack samples into batches; `partial` keeps the last short batch (evaluation).

    A finished batch is held back until the next is made, so skips after the last batch of a
    finite stream are still reported (added to that last batch's "skipped").
    """
    held, pending = None, []
    for sample in samples:
        pending.append(sample)
        if len(pending) == batch_size:
            if held is not None:
                yield held
            held, pending = collate(pending, counter.take()), []
    if pending and partial:
        if held is not None:
            yield held
        held = collate(pending, counter.take())
    if held is not None:
        held["skipped"] += counter.take()
        yield held


def collate(samples: list[dict], skipped: int) -> dict[str, Any]:
    """Decoded samples -> "bg", "fg_bg", "mask", "depth" uint8 (B, C, H, W), "keys", "skipped"."""
    batch: dict[str, Any] = {"keys": [s["key"] for s in samples], "skipped": skipped}
    for field in FIELDS:
        # uint8 through stacking and the layout change: a quarter of float32's bytes to move.
        images = torch.from_numpy(np.stack([s[field] for s in samples]))  # (B, H, W, C)
        images = images.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)
        batch[field] = images
    return batch


def augment_batches(
    batches: Iterable[dict], config: AugmentConfig, generator: torch.Generator
) -> Iterator[dict]:
    """Apply the training augmentation to each batch (photometric on inputs, flip on all four)."""
    for batch in batches:
        images = {f: augmentation.to_float(batch[f]) if f in INPUTS else batch[f] for f in FIELDS}
        augmented = augmentation.augment_batch(images, config, generator)
        for field in INPUTS:
            # Back to uint8: a quarter of the bytes through shared memory, pinning and the copy
            # to the GPU; rounding to 1/255 is what jitter on 8-bit images does anyway.
            augmented[field] = augmented[field].mul_(255).round_().to(torch.uint8)
        yield {**batch, **augmented}


def join_inputs(batches: Iterable[dict]) -> Iterator[dict]:
    """Replace "fg_bg" and "bg" with "inputs" (B, 2C, H, W): fg_bg channels first, then bg."""
    for batch in batches:
        inputs = torch.cat([batch.pop(field) for field in INPUTS], dim=1)
        yield {"inputs": inputs, **batch}
