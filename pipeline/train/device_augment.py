"""The training augmentation on the training device, right after the copy (`--augment-on device`).

The loader's workers then only read, decode and batch uint8; the trainer applies the published
recipe (`augment.augment_batch`: jitter and noise on fg_bg and bg, each image its own draw, and
the optional flip of all four images together) to each batch where it is cheapest. On a GPU that
is microseconds a batch, while in a worker it is about half of the worker's time. The draws come
from a generator on the device seeded from (seed, epoch, rank), so the same seed gives the same
run, and a run resumed at epoch e draws what an uninterrupted one drew there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.train import augment as augmentation
from pipeline.train.augment import AugmentConfig
from pipeline.train.sources import mix_seed

_STREAM = 3  # mix_seed's first number for these draws (the loader's own streams use 1 and 2)


class DeviceAugment:
    """The trainer's augmentation of each training batch on `device`, seeded per epoch."""

    def __init__(
        self, config: AugmentConfig, device: torch.device, seed: int = 0, rank: int = 0
    ) -> None:
        self.config, self.seed, self.rank = config, seed, rank
        self.generator = torch.Generator(device=device)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Seed the draws of `epoch` from (seed, epoch, rank)."""
        self.generator.manual_seed(mix_seed(_STREAM, self.seed, epoch, self.rank))

    def __call__(self, inputs: Tensor, mask: Tensor, depth: Tensor) -> tuple[Tensor, ...]:
        """The augmented (inputs, mask, depth) of one batch (see `augment.augment_inputs`)."""
        return augmentation.augment_inputs(inputs, mask, depth, self.config, self.generator)
