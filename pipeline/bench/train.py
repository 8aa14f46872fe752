"""`pipeline bench train`: training samples/s on synthetic tensors (model alone) and from shards."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator

import torch

from pipeline.schema import DEPTH_SIZE, IMAGE_SIZE
from pipeline.train.augment import AugmentConfig
from pipeline.train.config import TrainConfig
from pipeline.train.device_augment import DeviceAugment
from pipeline.train.feed import augment_config, device_augment, loader_config
from pipeline.train.loader import make_train_loader, to_device
from pipeline.train.loop import BatchAugment, Stepper, train_one_epoch
from pipeline.train.run import build_stepper
from pipeline.train.runtime import resolve_augment_on, resolve_device
from pipeline.train.sources import open_manifest

log = logging.getLogger(__name__)


class RepeatedBatch:
    """A stand-in loader that yields one device-resident batch `steps` times (no data cost)."""

    def __init__(self, batch: dict, steps: int) -> None:
        self.batch, self.steps, self.skipped = batch, steps, 0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict]:
        return (self.batch for _ in range(self.steps))


class Take:
    """The next `n` batches of a running iterator, so warm-up and measured steps share workers."""

    def __init__(self, iterator: Iterator[dict], n: int) -> None:
        self.iterator, self.n, self.skipped = iterator, n, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[dict]:
        for _ in range(self.n):
            batch = next(self.iterator, None)
            if batch is None:
                return
            self.skipped += int(batch.get("skipped", 0))
            yield batch


def synthetic_batch(batch_size: int, channels: int, device: torch.device) -> dict:
    """A random batch in the loader's format, already on the device."""
    (w, h), (dw, dh) = IMAGE_SIZE, DEPTH_SIZE
    return {
        "inputs": torch.randint(
            0, 256, (batch_size, 2 * channels, h, w), dtype=torch.uint8, device=device
        ),
        "mask": torch.randint(0, 256, (batch_size, 1, h, w), dtype=torch.uint8, device=device),
        "depth": torch.randint(0, 256, (batch_size, 1, dh, dw), dtype=torch.uint8, device=device),
    }


def _run(stepper: Stepper, loader, augment: BatchAugment | None = None) -> dict:
    stats = train_one_epoch(stepper, loader, augment=augment)
    return {
        "samples_per_s": stats.samples / max(stats.train_s, 1e-9),
        "data_wait_fraction": stats.data_s / max(stats.train_s, 1e-9),
        "steps": stats.steps,
        "seconds": stats.train_s,
    }


def time_augment(batch: dict, augment: DeviceAugment, stepper: Stepper, repeats: int) -> float:
    """Milliseconds the device augmentation takes for one batch (after one untimed call)."""
    inputs, mask, depth = to_device(batch, stepper.device, channels_last=stepper.channels_last)
    times = []
    for _ in range(repeats + 1):
        _sync(stepper.device)
        start = time.perf_counter()
        with torch.no_grad():
            augment(inputs, mask, depth)
        _sync(stepper.device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(
    config: TrainConfig, steps: int = 50, warmup: int = 10, shards: str | None = None
) -> dict:
    """Samples/s of training steps on synthetic tensors, and from shards when given.

    `model_only` is the step alone; with `--augment-on device` (the default on a GPU) the
    augmentation's own time per batch is measured apart (`device_augment_ms_per_batch`) and is
    part of every `from_shards` step, as in training. Before the timed steps from shards, the
    batches the workers made ahead during the warm-up (up to workers x prefetch_factor) are
    taken untimed (`from_shards.backlog_skipped`): timed, a loader slower than the step would
    look as fast as the step for as many batches, and as not keeping the device waiting.
    """
    channels = open_manifest(shards)["channels"] if shards else 1
    device = resolve_device(config.device)
    model, stepper = build_stepper(config, device, {"image_channels": channels})
    if config.compile:
        stepper.net = torch.compile(model)
    batch = synthetic_batch(config.batch_size, channels, device)
    _run(stepper, RepeatedBatch(batch, warmup))  # cudnn autotuning, compilation
    augment = device_augment(config, device, rank=0)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch_size": config.batch_size,
        "amp": stepper.amp,
        "compile": config.compile,
        "channels_last": config.channels_last,
        "augment_on": resolve_augment_on(config.augment_on, device),
        "threads": torch.get_num_threads(),
        "model_only": _run(stepper, RepeatedBatch(batch, steps)),
    }
    measured = augment or DeviceAugment(augment_config(config) or AugmentConfig(), device)
    result["device_augment_ms_per_batch"] = round(time_augment(batch, measured, stepper, 10), 3)
    if shards:
        loader_cfg = loader_config(config, device)
        backlog = config.workers * loader_cfg.prefetch_factor
        loader = make_train_loader(shards, loader_cfg, epoch=0, steps=warmup + backlog + steps)
        batches = iter(loader)
        _run(stepper, Take(batches, warmup), augment)  # worker start-up is not the steady state
        for _ in Take(batches, backlog):  # made ahead while the warm-up stepped: not timed
            pass
        result["from_shards"] = _run(stepper, Take(batches, steps), augment)
        result["from_shards"].update(workers=config.workers, backlog_skipped=backlog)
        for _ in batches:  # drain, so the workers shut down cleanly
            pass
    return result
