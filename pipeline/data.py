"""The streaming loader: WebDataset shards -> decoded, augmented batches, built in the workers.

Each DataLoader worker runs a list of small generator stages (`Iterator[dict] -> Iterator[dict]`):
shard urls -> tar samples (raw bytes) -> keep this slot's samples -> shuffle buffer (train) ->
decode -> batch -> augment (train) -> inputs. Work is split over `slots = world_size x workers`:
every rank and worker reads different shards (or, with fewer shards than slots, different samples).

Every rank gets the same number of batches per epoch, so DDP never waits for a rank that ran dry:
in training each worker cycles over its shards endlessly (in a new order each cycle) and the
BatchStream stops after exactly `steps` batches. Evaluation reads each sample exactly once.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import random
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys

from pipeline import augment as augmentation
from pipeline.augment import AugmentConfig
from pipeline.jpegdecode import DEFAULT_DECODER, Decoder, decode_image, get_decoder
from pipeline.layout import FIELDS, INPUTS, MANIFEST_NAME, SIZES
from pipeline.manifest import CHANNELS, load_manifest, validate_manifest
from pipeline.shardreader import tar_files

log = logging.getLogger(__name__)

Handler = Callable[[Exception], bool]  # webdataset semantics: True continue, False stop, or raise


@dataclass
class LoaderConfig:
    """How batches are made; one config serves training (augment set) and evaluation (None)."""

    batch_size: int = 100  # the published recipe's batch
    workers: int = 4  # decoding processes per rank; 0 decodes in the training process
    shuffle_buffer: int = 1000  # samples mixed across shards; raw bytes, ~10 kB a sample
    augment: AugmentConfig | None = None  # None = no augmentation (evaluation)
    pin_memory: bool = False  # page-locked batches make host-to-GPU copies asynchronous
    seed: int = 0  # with the epoch, rank and worker, seeds every shuffle and augmentation
    prefetch_factor: int = 4  # batches each worker keeps ready, to ride out slow shards
    decoder: str = DEFAULT_DECODER  # see pipeline.jpegdecode for the measurement


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


# ---------------------------------------------------------------------------------------------
# Locations and the manifest


def is_url(location: str | Path) -> bool:
    """True for `http://…`, `pipe:…`, `file://…` and the like; False for a local path."""
    return len(urlparse(str(location)).scheme) > 1  # one letter is a Windows drive


def open_manifest(location: str | Path) -> dict:
    """The manifest of a local shard folder or of a URL prefix (`URL/manifest.json` via gopen)."""
    if not is_url(location):
        return load_manifest(Path(location))
    url = f"{str(location).rstrip('/')}/{MANIFEST_NAME}"
    try:
        with gopen(url) as stream:
            data = json.loads(stream.read())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{url}: cannot read the manifest ({exc})") from None
    validate_manifest(data, url)
    return data


def shard_urls(location: str | Path, manifest: dict, split: str) -> list[str]:
    """The split's shards in manifest order: local paths, or URLs (base + "/" + path)."""
    shards = manifest["splits"].get(split, {}).get("shards", [])
    if is_url(location):
        base = str(location).rstrip("/")
        return [f"{base}/{shard['path']}" for shard in shards]
    return [str(Path(location) / shard["path"]) for shard in shards]


def train_steps_per_epoch(manifest: dict, batch_size: int, world_size: int) -> int:
    """Batches each rank runs per epoch: floor(samples / (world_size x batch)), at least 1."""
    samples = manifest["splits"]["train"]["samples"]
    if samples == 0:
        raise ValueError("the train split holds no samples")
    return max(1, samples // (world_size * batch_size))


# ---------------------------------------------------------------------------------------------
# Splitting the work: shard order per epoch, shards or samples per slot


def shard_order(urls: list[str], seed: int, epoch: int, cycle: int = 0) -> list[str]:
    """A permutation of `urls` that depends on (seed, epoch, cycle) only, so every slot agrees."""
    order = list(urls)
    random.Random(_mix(1, seed, epoch, cycle)).shuffle(order)
    return order


def assign_shards(urls: list[str], slot: int, slots: int) -> tuple[list[str], bool]:
    """This slot's shards, and whether it must also keep only every slots-th sample.

    With at least `slots` shards each slot takes every slots-th shard; with fewer, every slot
    reads them all and keeps samples with index % slots == slot, so tiny datasets still work
    with several workers and ranks, and no sample is read twice in a pass.
    """
    if len(urls) >= slots:
        return urls[slot::slots], False
    return list(urls), True


def slot_sample_counts(counts: list[int], slots: int) -> list[int]:
    """Samples each slot reads in one pass, given the shards' sample counts (in reading order)."""
    if len(counts) >= slots:
        return [sum(counts[slot::slots]) for slot in range(slots)]
    total = sum(counts)
    return [total // slots + (1 if slot < total % slots else 0) for slot in range(slots)]


def worker_slot(rank: int, world_size: int) -> tuple[int, int, int]:
    """(slot, slots, worker id) of the calling DataLoader worker (or main process)."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world_size * workers, worker


# ---------------------------------------------------------------------------------------------
# Stages: each takes and returns an iterator of dicts


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
            yield from group_by_keys(tar_files(stream, url), handler=handler)
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
    to the handler (with its key and shard named), never half-yielded."""
    for sample in samples:
        key, url = sample.get("__key__"), sample.get("__url__")
        try:
            decoded = {"key": key}
            for field in FIELDS:
                data = sample.get(f"{field}.jpg")
                if data is None:
                    raise ValueError(f"missing {field}.jpg")
                depth = channels if field in INPUTS else 1  # masks and depths: one channel
                try:
                    decoded[field] = decode_image(data, depth, sizes[field], decoder)
                except Exception as exc:  # any decoder's failure skips the sample
                    raise ValueError(f"{field}.jpg: {exc}") from None
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


# ---------------------------------------------------------------------------------------------
# The dataset each worker iterates, and the stream the trainer iterates


class ShardStream(IterableDataset):
    """The worker-side pipeline over a split's shards (endless in training, one pass otherwise)."""

    def __init__(
        self,
        urls: list[str],
        manifest: dict,
        config: LoaderConfig,
        *,
        split: str,
        train: bool,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.urls, self.config, self.train = urls, config, train
        self.epoch, self.rank, self.world_size = epoch, rank, world_size
        self.samples = sum(shard["samples"] for shard in manifest["splits"][split]["shards"])
        self.channels = manifest.get("channels") or CHANNELS[manifest["mode"]]
        sizes = manifest.get("sizes") or SIZES
        self.sizes = {field: tuple(sizes[field]) for field in FIELDS}

    def __iter__(self) -> Iterator[dict]:
        slot, slots, worker = worker_slot(self.rank, self.world_size)
        cfg, counter = self.config, SkipCounter()
        seed = _mix(2, cfg.seed, self.epoch, self.rank, worker)
        if self.train:
            # No bigger than a pass over this slot's share: more would only hold repeats.
            size = min(cfg.shuffle_buffer, max(1, self.samples // slots))
            samples = self._endless_samples(slot, slots, counter, size)
            samples = shuffle_samples(samples, size, random.Random(seed))
        else:
            urls, by_sample = assign_shards(self.urls, slot, slots)
            samples = read_shards(urls, reraise_exception)  # a missing test shard is fatal
            samples = keep_slot(samples, slot, slots) if by_sample else samples
        decoder = get_decoder(cfg.decoder)
        samples = decode_samples(samples, self.channels, self.sizes, counter, LogOnce(), decoder)
        batches = batch_samples(samples, cfg.batch_size, counter, partial=not self.train)
        if self.train and cfg.augment is not None:
            generator = torch.Generator().manual_seed(_mix(seed, 1))
            batches = augment_batches(batches, cfg.augment, generator)
        return join_inputs(batches)

    def _endless_samples(
        self, slot: int, slots: int, counter: SkipCounter, buffer: int
    ) -> Iterator[dict]:
        """Cycle over this slot's shards forever, in a new shard order each cycle."""
        handler, seen = LogOnce(), 0
        for cycle in itertools.count():
            order = shard_order(self.urls, self.config.seed, self.epoch, cycle)
            urls, by_sample = assign_shards(order, slot, slots)
            samples = read_shards(urls, handler)
            before = seen
            for sample in keep_slot(samples, slot, slots) if by_sample else samples:
                seen += 1
                yield sample
            if seen == before:
                raise RuntimeError(f"worker slot {slot} of {slots}: its shards gave no sample")
            if counter.decoded == 0 and seen > buffer + 1:
                raise RuntimeError(f"worker slot {slot} of {slots}: no sample could be decoded")


class BatchStream:
    """The batches of one epoch (train) or one pass (eval); `skipped` totals undecodable samples."""

    def __init__(self, loader: DataLoader, length: int, limit: int | None) -> None:
        self.loader = loader
        self.length = length  # batches it will yield (eval: fewer if whole batches are skipped)
        self.limit = limit  # stop after this many batches: the workers' train streams are endless
        self.skipped = 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict]:
        self.skipped = 0
        batches = iter(self.loader)
        try:
            for batch in itertools.islice(batches, self.limit):
                self.skipped += batch["skipped"]
                yield batch
        except (RuntimeError, ValueError, OSError) as exc:
            raise ValueError(f"the loader failed: {_worker_message(exc)}") from None
        finally:
            # Stop the workers now rather than when the iterator is garbage-collected: endless
            # train workers would otherwise keep decoding into their queues.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def _worker_message(exc: Exception) -> str:
    """The original message of a DataLoader worker's error, without the re-raised traceback."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].split(": ", 1)[-1] if lines else text


def make_train_loader(
    location: str | Path,
    config: LoaderConfig,
    *,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    steps: int | None = None,
) -> BatchStream:
    """The training batches of one epoch for this rank: exactly `steps` of them (default: all)."""
    manifest = open_manifest(location)
    urls = shard_urls(location, manifest, "train")
    samples = manifest["splits"]["train"]["samples"]
    slots = world_size * max(1, config.workers)
    if not urls or samples < slots:
        raise ValueError(
            f"{location}: the train split holds {samples} samples in {len(urls)} shards, "
            f"fewer than the {slots} readers ({world_size} ranks x {config.workers} workers)"
        )
    steps = steps or train_steps_per_epoch(manifest, config.batch_size, world_size)
    dataset = ShardStream(
        urls,
        manifest,
        config,
        split="train",
        train=True,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
    )
    return BatchStream(_data_loader(dataset, config), steps, limit=steps)


def make_eval_loader(
    location: str | Path, split: str, config: LoaderConfig, *, rank: int = 0, world_size: int = 1
) -> BatchStream:
    """One pass over a split, unshuffled and unaugmented; over all ranks each sample once."""
    manifest = open_manifest(location)
    if split not in manifest["splits"]:
        raise ValueError(f"{location}: no split {split!r} in the manifest")
    urls = shard_urls(location, manifest, split)
    counts = [shard["samples"] for shard in manifest["splits"][split]["shards"]]
    workers = max(1, config.workers)
    per_slot = slot_sample_counts(counts, world_size * workers)
    mine = per_slot[rank * workers : (rank + 1) * workers]
    length = sum(math.ceil(n / config.batch_size) for n in mine)
    plain = dataclasses.replace(config, augment=None)
    dataset = ShardStream(
        urls, manifest, plain, split=split, train=False, rank=rank, world_size=world_size
    )
    return BatchStream(_data_loader(dataset, plain), length, limit=None)


def to_device(
    batch: dict, device: torch.device | str, channels_last: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """(inputs, mask, depth) on `device`: shipped as uint8, made [0, 1] floats there."""
    inputs = batch["inputs"].to(device, non_blocking=True).float().div_(255.0)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    mask = batch["mask"].to(device, non_blocking=True).float().div_(255.0)
    depth = batch["depth"].to(device, non_blocking=True).float().div_(255.0)
    return inputs, mask, depth


def _data_loader(dataset: ShardStream, config: LoaderConfig) -> DataLoader:
    extra = {"prefetch_factor": config.prefetch_factor} if config.workers > 0 else {}
    return DataLoader(
        dataset,
        batch_size=None,  # the workers batch
        num_workers=config.workers,
        pin_memory=config.pin_memory,
        worker_init_fn=init_worker,
        persistent_workers=False,  # a fresh loader per epoch carries the epoch's seeds
        **extra,
    )


def init_worker(_worker_id: int) -> None:
    """DataLoader worker set-up: one intra-op thread (and one OpenCV thread)."""
    # One thread per worker: the workers are the parallelism; more threads oversubscribe cores.
    torch.set_num_threads(1)
    if "cv2" in sys.modules:
        sys.modules["cv2"].setNumThreads(1)


def _mix(*numbers: int) -> int:
    """A 63-bit seed from several small integers (well mixed, the same in every process)."""
    state = np.random.SeedSequence([abs(int(n)) for n in numbers]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])
