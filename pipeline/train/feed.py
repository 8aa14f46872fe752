"""How a run is fed: its loaders' settings, where the augmentation runs, and the loaders that
stay up for the whole run (training batches of every epoch, a test pass per epoch)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pipeline.train.augment import AugmentConfig
from pipeline.train.batches import BatchStream, TrainBatches
from pipeline.train.config import TrainConfig
from pipeline.train.device_augment import DeviceAugment
from pipeline.train.loader import (
    LoaderConfig,
    check_ring_memory,
    make_eval_loader,
    make_train_batches,
)
from pipeline.train.runtime import DistInfo, resolve_augment_on


def loader_config(config: TrainConfig, device: torch.device) -> LoaderConfig:
    """The training loader's settings for a run (evaluation uses the same, unaugmented)."""
    on_workers = resolve_augment_on(config.augment_on, device) == "workers"
    return LoaderConfig(
        batch_size=config.batch_size,
        workers=config.workers,
        shuffle_buffer=config.shuffle_buffer,
        augment=augment_config(config) if on_workers else None,
        pin_memory=device.type == "cuda",
        seed=config.seed,
    )


def augment_config(config: TrainConfig) -> AugmentConfig | None:
    """The training augmentation a run asks for, wherever it runs (None: none at all)."""
    return AugmentConfig(hflip_p=config.hflip) if config.augment else _flip_only(config)


def _flip_only(config: TrainConfig) -> AugmentConfig | None:
    """With --no-augment, keep only the geometric flip (if asked for)."""
    if config.hflip <= 0:
        return None
    return AugmentConfig(
        brightness=0, contrast=0, saturation=0, hue=0, noise_p=0, hflip_p=config.hflip
    )


def device_augment(config: TrainConfig, device: torch.device, rank: int) -> DeviceAugment | None:
    """The trainer's own augmentation with `--augment-on device` (None: the workers augment)."""
    augment = augment_config(config)
    if augment is None or resolve_augment_on(config.augment_on, device) != "device":
        return None
    return DeviceAugment(augment, device, seed=config.seed, rank=rank)


@dataclass
class Feed:
    """A run's loaders, started once: their workers live from the first epoch to the last."""

    batches: TrainBatches  # every epoch's training batches
    evaluation: BatchStream | None  # the test split, one pass per iteration; None without one
    augment: DeviceAugment | None  # --augment-on device: the trainer augments each batch

    def close(self) -> None:
        """Stop every worker (also when an epoch failed)."""
        self.batches.close()
        if self.evaluation is not None:
            self.evaluation.close()


def check_feed_memory(config: TrainConfig, dist: DistInfo, manifest: dict) -> None:
    """ValueError unless the training workers of all this machine's ranks fit in its shared
    memory. Called before any rank starts its workers (they start after DDP's broadcast of the
    weights, which every rank must reach first); each loader checks its own need again."""
    if dist.local_world_size > 1:
        check_ring_memory(manifest, loader_config(config, dist.device), dist.local_world_size)


def open_feed(
    config: TrainConfig, dist: DistInfo, *, first_epoch: int, steps: int, has_test: bool
) -> Feed:
    """The loaders of a run that trains `steps` batches an epoch from `first_epoch` on."""
    loaders = loader_config(config, dist.device)
    batches = make_train_batches(
        config.shards,
        loaders,
        first_epoch=first_epoch,
        rank=dist.rank,
        world_size=dist.world_size,
        steps=steps,
    )
    evaluation = None
    if has_test:
        plain = dataclasses.replace(loaders, augment=None)
        evaluation = make_eval_loader(
            config.shards,
            "test",
            plain,
            rank=dist.rank,
            world_size=dist.world_size,
            keep_workers=True,
        )
    return Feed(batches, evaluation, device_augment(config, dist.device, dist.rank))
