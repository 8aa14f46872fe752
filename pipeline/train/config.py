"""The settings of `train` and `evaluate`, and the choices they allow (no torch: the CLI reads
these to build its options, and `pipeline --help` must stay quick).

Each default is written once, here; the CLI's options, the loader and the loss take theirs from
these dataclasses and constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

OPTIMIZERS = ("sgd", "adamw")
PROFILES = ("off", "cprofile", "torch")
DEVICES = ("auto", "cpu", "cuda")
AMP_CHOICES = ("auto", "off", "bf16", "fp16")
# Where the training augmentation runs: auto = device on a GPU (the workers are the bottleneck
# there, and the GPU does it in microseconds), workers on CPU (they idle while the model steps).
AUGMENT_ON = ("auto", "device", "workers")


class LossWeights(NamedTuple):
    """The weights of the loss's two parts: mask * BCE(mask) + depth * (1 - SSIM(depth))."""

    mask: float = 2.0  # the published recipe
    depth: float = 1.0


PUBLISHED_WEIGHTS = LossWeights()


@dataclass
class TrainConfig:
    """Everything a run depends on; defaults are the published recipe."""

    shards: str = "shards"  # a shard folder (or URL prefix) with manifest.json
    out: str = "runs/run"  # where checkpoints, TensorBoard events and config.json go
    epochs: int = 5  # the published run trained 5 epochs
    batch_size: int = 100  # per process; the published batch
    optimizer: str = "sgd"  # sgd = published; adamw learns much faster from few samples (demo)
    lr: float = 0.01  # published SGD learning rate
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-5
    step_size: int = 2  # StepLR: multiply lr by gamma every step_size epochs
    gamma: float = 0.1
    mask_weight: float = PUBLISHED_WEIGHTS.mask  # loss = mask_weight*BCE + depth_weight*(1-SSIM)
    depth_weight: float = PUBLISHED_WEIGHTS.depth
    workers: int = 4  # loader processes per training process
    shuffle_buffer: int = 1000  # samples held for shuffling in each loader worker (~10 kB each)
    augment: bool = True  # the published photometric jitter + noise on the inputs
    hflip: float = 0.0  # probability of flipping all four images of a sample together
    augment_on: str = "auto"  # auto = device on a GPU, workers on CPU (see AUGMENT_ON)
    device: str = "auto"  # auto = cuda when present
    amp: str = "auto"  # auto = bf16 where the GPU or CPU supports it natively, else off
    compile: bool = False  # torch.compile the model (minutes of warm-up, faster steps)
    channels_last: bool = True  # NHWC convolutions: faster on GPUs, and ~2x here on CPU too
    steps_per_epoch: int | None = None  # cap each epoch (smoke runs); None = the whole split
    eval_batches: int | None = None  # cap evaluation (smoke runs); None = the whole test split
    resume: bool = False  # continue from OUT/last.pt up to `epochs`
    overwrite: bool = False  # train into a folder holding an earlier run, replacing that run

    # Start a new run from these weights (a checkpoint: a run's, or `import-weights`'): only the
    # network is taken (and its depth output); optimizer, schedule and counters start afresh.
    init: str | None = None
    seed: int = 0
    log_every: int = 20  # steps between progress-bar/TensorBoard updates (each costs a sync)
    grid_rows: int = 8  # samples in the per-epoch picture grid
    profile: str = "off"  # off | cprofile (whole run) | torch (a few steps, TensorBoard trace)
    progress: bool = True  # a progress bar on a terminal
    world_size: int = 1  # filled in at run time from torchrun
    model_args: dict[str, Any] = field(default_factory=dict)  # filled in from the manifest

    @property
    def loss_weights(self) -> LossWeights:
        """The loss's weights as the loss takes them."""
        return LossWeights(self.mask_weight, self.depth_weight)

    def validate(self) -> None:
        """Raise ValueError for settings that can't work, before any work starts."""
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("profile", self.profile, PROFILES)
        _check_choice("device", self.device, DEVICES)
        _check_choice("amp", self.amp, AMP_CHOICES)
        _check_choice("augment_on", self.augment_on, AUGMENT_ON)
        for name in ("epochs", "batch_size", "step_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.workers < 0:
            raise ValueError("workers must be 0 or more")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        _check_finite(self)
        if self.gamma <= 0:
            raise ValueError(f"gamma must be above 0, not {self.gamma}")
        for name in ("lr", "momentum", "weight_decay", "mask_weight", "depth_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, not {getattr(self, name)}")
        if self.init and self.resume:
            raise ValueError(
                "--init starts a new run from a checkpoint's weights, --resume continues "
                "OUT/last.pt: give one of them"
            )


@dataclass
class EvaluateConfig:
    """Settings of `pipeline evaluate`."""

    checkpoint: Path  # a checkpoint written by `pipeline train`
    shards: str  # a shard folder (or URL prefix) with manifest.json
    split: str = "test"
    batch_size: int = TrainConfig.batch_size
    workers: int = 2  # evaluation decodes only: fewer loader processes than training needs
    device: str = "auto"
    amp: str = TrainConfig.amp  # auto: bf16 where the device computes it natively
    grid: Path | None = None  # save a picture grid of a few samples here
    grid_rows: int = TrainConfig.grid_rows


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: use one of {', '.join(choices)}")


def _check_finite(config: object) -> None:
    """NaN or inf in any float setting (a learning rate, a loss weight) only trains to NaN."""
    for setting in fields(config):
        value = getattr(config, setting.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{setting.name} must be a finite number, not {value}")
