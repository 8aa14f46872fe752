"""The streaming loader: WebDataset shards -> decoded, augmented batches, built in the workers.

Each DataLoader worker runs the stages of `train.stages` over its share of the shards (see
`train.sources`). Every rank gets the same number of batches per epoch, so DDP never waits for a
rank that ran dry: in training each worker cycles over its shards endlessly (in a new order each
cycle) and the BatchStream stops after exactly `steps` batches. Evaluation reads each sample once.
The trainer's workers start once a run and stream its epochs back to back (`make_train_batches`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.handlers import reraise_exception

from pipeline.images import DEFAULT_DECODER, get_decoder
from pipeline.schema import field_sizes, split_samples, split_shards
from pipeline.train.augment import AugmentConfig
from pipeline.train.batches import BatchStream, TrainBatches
from pipeline.train.bgcache import DEFAULT_ENTRIES, DecodedCache
from pipeline.train.ring import BatchRing, check_shared_memory, handover
from pipeline.train.shards import read_shards
from pipeline.train.sources import (
    assign_shards,
    mix_seed,
    open_manifest,
    shard_order,
    shard_urls,
    slot_sample_counts,
    train_steps_per_epoch,
    trainable_samples,
    worker_slot,
)
from pipeline.train.stages import (
    CYCLE,
    LogOnce,
    SampleDecoder,
    SkipCounter,
    augment_batches,
    batch_shapes,
    decode_batches,
    keep_slot,
    shuffle_samples,
)

log = logging.getLogger(__name__)


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
    decoder: str = DEFAULT_DECODER  # see pipeline.images for the measurement
    bg_cache: int = DEFAULT_ENTRIES  # decoded backgrounds each worker keeps (see bgcache)


class ShardStream(IterableDataset):
    """The worker-side pipeline over a split's shards (epoch after epoch in training, one pass
    otherwise).

    In training each worker runs epoch after epoch without end, so its process never restarts:
    the DataLoader takes batch g of the whole run from worker g % workers, and epochs are `steps`
    batches each, so each worker knows which of its batches belong to which epoch. In each epoch
    it plays the part (the "role") of the worker that delivers the same batches in a fresh
    loader for that epoch, and switches to the next epoch (new seeds, new shard order) after
    exactly its share. So the batches of epoch e are the same whether the workers started at
    epoch 0 or at e (resume), and a batch prefetched across an epoch boundary is already the
    next epoch's. Every batch carries its "epoch".
    """

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
        steps: int = 1,
    ) -> None:
        super().__init__()
        self.urls, self.config, self.train = urls, config, train
        self.epoch, self.rank, self.world_size = epoch, rank, world_size
        self.steps = steps  # training: batches per epoch on this rank
        shards = split_shards(manifest, split)
        self.samples = sum(shard["samples"] for shard in shards)
        self.expected = {url: s["samples"] for url, s in zip(urls, shards, strict=True)}
        self.channels = manifest["channels"]
        self.sizes = field_sizes(manifest)

    def __iter__(self) -> Iterator[dict]:
        _, _, worker = worker_slot(self.rank, self.world_size)
        workers = max(1, self.config.workers)
        cache = DecodedCache(self.config.bg_cache)  # this worker's, kept across epochs
        # A training worker hands its batches over through a ring of shared buffers. Not an
        # evaluation worker: when the other workers of a pass have finished, DataLoader sends
        # their requests to the one still running, which can then be more batches ahead of the
        # trainer than any fixed ring has slots (see train.ring); each batch gets its own.
        in_worker = get_worker_info() is not None
        ring = BatchRing(ring_slots(self.config)) if in_worker and self.train else None
        if not self.train:  # a bad sample is reported once a worker, not once a pass
            warned = self.__dict__.setdefault("_warned", LogOnce())  # kept by persistent workers
            return self._batches(self.epoch, worker, workers, cache, warned, ring)
        return handover(self._epochs(worker, workers, cache, ring))

    def _epochs(
        self, worker: int, workers: int, cache: DecodedCache, ring: BatchRing | None
    ) -> Iterator[dict]:
        """This worker's share of every epoch's batches from `self.epoch` on, in order."""
        handler = LogOnce()  # a bad sample is reported once a run, not once an epoch
        for epoch in itertools.count(self.epoch):
            offset = (epoch - self.epoch) * self.steps % workers  # whose turn the epoch opens
            role = (worker - offset) % workers
            share = len(range(role, self.steps, workers))
            batches = self._batches(epoch, role, workers, cache, handler, ring)
            for batch in itertools.islice(batches, share):
                batch["epoch"] = epoch
                yield batch

    def _batches(
        self,
        epoch: int,
        role: int,
        workers: int,
        cache: DecodedCache,
        handler: LogOnce,
        ring: BatchRing | None = None,
    ) -> Iterator[dict]:
        """The batches of one epoch (train: endless) that loader worker `role` makes."""
        slot, slots = self.rank * workers + role, self.world_size * workers
        cfg, counter = self.config, SkipCounter()
        seed = mix_seed(2, cfg.seed, epoch, self.rank, role)
        if self.train:
            samples = self._endless_samples(epoch, slot, slots, counter, seed, handler)
        else:
            urls, by_sample = assign_shards(self.urls, slot, slots)
            samples = read_shards(urls, reraise_exception, self.expected)  # a bad one: fatal
            samples = keep_slot(samples, slot, slots) if by_sample else samples
        decoder = SampleDecoder(self.channels, self.sizes, get_decoder(cfg.decoder), cache)
        batches = decode_batches(
            samples, decoder, cfg.batch_size, counter, handler, not self.train, ring
        )
        if self.train and cfg.augment is not None:
            generator = torch.Generator().manual_seed(mix_seed(seed, 1))
            batches = augment_batches(batches, cfg.augment, generator)
        return batches

    def _endless_samples(
        self, epoch: int, slot: int, slots: int, counter: SkipCounter, seed: int, handler
    ) -> Iterator[dict]:
        """Cycle over this slot's shards forever, in a new shard order each cycle, each cycle
        shuffled on its own: the buffer is emptied at a cycle's end, so a pass gives every
        sample of the slot once before the next pass gives any again (a buffer mixing across
        cycles gave 156 distinct of 200 in an epoch of 200, and repeats)."""
        # No bigger than a pass over this slot's share: more would only hold repeats.
        size = min(self.config.shuffle_buffer, max(1, self.samples // slots))
        for cycle in itertools.count():
            order = shard_order(self.urls, self.config.seed, epoch, cycle)
            urls, by_sample = assign_shards(order, slot, slots)
            samples = read_shards(urls, handler, self.expected)
            samples = keep_slot(samples, slot, slots) if by_sample else samples
            rng = random.Random(mix_seed(seed, 3, cycle))
            seen = 0
            for sample in shuffle_samples(samples, size, rng):
                seen += 1
                sample[CYCLE] = cycle  # skips are counted in cycle 0 only (SkipCounter)
                yield sample
            if seen == 0:
                raise ValueError(f"worker slot {slot} of {slots}: its shards gave no sample")
            if counter.decoded == 0:  # the whole pass went through the decoder: all failed
                raise ValueError(f"worker slot {slot} of {slots}: no sample could be decoded")


def ring_slots(config: LoaderConfig) -> int:
    """Batches in a training worker's ring: never one not yet copied out (see train.ring)."""
    return config.prefetch_factor + 2


def check_ring_memory(manifest: dict, config: LoaderConfig, processes: int = 1) -> None:
    """ValueError unless the rings of `processes` training loaders' workers (their batch
    buffers, see ShardStream.__iter__) fit in the shared memory free now."""
    if config.workers > 0:
        shapes = batch_shapes(config.batch_size, manifest["channels"], field_sizes(manifest))
        check_shared_memory(config.workers, ring_slots(config), shapes, processes=processes)


def make_train_loader(
    location: str | Path,
    config: LoaderConfig,
    *,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    steps: int | None = None,
) -> BatchStream:
    """The training batches of one epoch for this rank: exactly `steps` of them (default: all).

    Its workers start with each iteration and stop at its end; a whole run's epochs from one set
    of workers is `make_train_batches`.
    """
    dataset, steps = _train_dataset(location, config, epoch, rank, world_size, steps)
    return BatchStream(_data_loader(dataset, config), steps, limit=steps, epoch=epoch)


def make_train_batches(
    location: str | Path,
    config: LoaderConfig,
    *,
    first_epoch: int,
    rank: int = 0,
    world_size: int = 1,
    steps: int | None = None,
) -> TrainBatches:
    """Every epoch's training batches from `first_epoch` on, from workers that start once."""
    dataset, steps = _train_dataset(location, config, first_epoch, rank, world_size, steps)
    return TrainBatches(_data_loader(dataset, config), steps, first_epoch)


def _train_dataset(
    location: str | Path,
    config: LoaderConfig,
    epoch: int,
    rank: int,
    world_size: int,
    steps: int | None,
) -> tuple[ShardStream, int]:
    """The training ShardStream from `epoch` on, and its steps per epoch (default: all)."""
    manifest = open_manifest(location)
    urls = shard_urls(location, manifest, "train")
    samples = split_samples(manifest, "train")
    slots = world_size * max(1, config.workers)
    if not urls or samples < slots:
        raise ValueError(
            f"{location}: the train split holds {samples} samples in {len(urls)} shards, "
            f"fewer than the {slots} readers ({world_size} ranks x {config.workers} workers)"
        )
    if not steps:
        held = trainable_samples(location, manifest)
        steps = train_steps_per_epoch(manifest, config.batch_size, world_size, held)
    check_ring_memory(manifest, config)
    dataset = ShardStream(
        urls,
        manifest,
        config,
        split="train",
        train=True,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        steps=steps,
    )
    return dataset, steps


def make_eval_loader(
    location: str | Path,
    split: str,
    config: LoaderConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    keep_workers: bool = False,
) -> BatchStream:
    """One pass over a split, unshuffled and unaugmented; over all ranks each sample once.

    `keep_workers`: every iteration is a pass by the same workers (the trainer evaluates each
    epoch); `close()` stops them.
    """
    manifest = open_manifest(location)
    if split not in manifest["splits"]:
        raise ValueError(f"{location}: no split {split!r} in the manifest")
    urls = shard_urls(location, manifest, split)
    counts = [shard["samples"] for shard in split_shards(manifest, split)]
    workers = max(1, config.workers)
    per_slot = slot_sample_counts(counts, world_size * workers)
    mine = per_slot[rank * workers : (rank + 1) * workers]
    length = sum(-(-n // config.batch_size) for n in mine)  # ceil, in integers
    plain = dataclasses.replace(config, augment=None)
    dataset = ShardStream(
        urls, manifest, plain, split=split, train=False, rank=rank, world_size=world_size
    )
    loader = _data_loader(dataset, plain, persistent=keep_workers)
    return BatchStream(loader, length, limit=None, keep_workers=keep_workers)


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


def _data_loader(
    dataset: ShardStream, config: LoaderConfig, persistent: bool = False
) -> DataLoader:
    extra = {"prefetch_factor": config.prefetch_factor} if config.workers > 0 else {}
    return DataLoader(
        dataset,
        batch_size=None,  # the workers batch
        num_workers=config.workers,
        pin_memory=config.pin_memory,
        worker_init_fn=init_worker,
        # Training streams run all epochs in one iteration (see ShardStream); only evaluation
        # iterates a loader again, and then its workers may stay.
        persistent_workers=persistent and config.workers > 0,
        **extra,
    )


def init_worker(_worker_id: int) -> None:
    """DataLoader worker set-up: one intra-op thread (and one OpenCV thread)."""
    # One thread per worker: the workers are the parallelism; more threads oversubscribe cores.
    torch.set_num_threads(1)
    if "cv2" in sys.modules:
        sys.modules["cv2"].setNumThreads(1)
