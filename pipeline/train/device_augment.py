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

from pipeline.schema import INPUTS
from pipeline.train.augment import AugmentConfig, augment_batch
from pipeline.train.sources import mix_seed

_STREAM = 3  # mix_seed's first number for these draws (the loader's own streams use 1 and 2)


def augment_inputs(
    inputs: Tensor, mask: Tensor, depth: Tensor, config: AugmentConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """`augment_batch` on a batch as the model takes it: inputs (B, 2C, H, W) in [0, 1] (fg_bg
    channels, then bg), mask and depth; new tensors, the arguments are left as they are."""
    images = dict(zip(INPUTS, inputs.chunk(len(INPUTS), dim=1), strict=True))
    out = augment_batch({**images, "mask": mask, "depth": depth}, config, generator)
    joined = torch.cat([out[field] for field in INPUTS], dim=1)
    if inputs.is_contiguous(memory_format=torch.channels_last):
        joined = joined.contiguous(memory_format=torch.channels_last)
    return joined, out["mask"], out["depth"]


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
        """The augmented (inputs, mask, depth) of one batch (see `augment_inputs`)."""
        return augment_inputs(inputs, mask, depth, self.config, self.generator)
