"""The loop: `train_one_epoch` and `evaluate`, plain functions over a loader (no sync a step)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from pipeline.schema import INPUTS
from pipeline.train.config import PUBLISHED_WEIGHTS, LossWeights
from pipeline.train.loader import to_device
from pipeline.train.loss import compute_loss
from pipeline.train.metrics import MetricAccumulator, batch_iou
from pipeline.train.pictures import make_grid
from pipeline.train.runtime import all_reduce_sum, autocast, raise_together

# Failures of an evaluation that leave the epoch's training intact (data that cannot be read).
EVAL_FAILURES = (ValueError, OSError)


class LossCheck(Protocol):
    """What watches the losses for NaN and inf (see `train.guard.LossWatch`)."""

    every: int  # steps between checks

    def update(self, values: torch.Tensor, step: int) -> None: ...

    def check(self) -> None: ...


class StepLog(Protocol):
    """Where the loop reports progress (rank 0's bar and TensorBoard; see `train.report`)."""

    every: int  # steps between reports: each costs one host sync

    def log(self, values: dict[str, float], steps: int) -> None: ...

    def tick(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class Stepper:
    """What a training step needs: the network, its optimizer and scaler, where and how it runs."""

    net: torch.nn.Module  # what trains: the model, maybe wrapped in DDP and/or compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: str = "off"  # the resolved precision: off, bf16 or fp16
    channels_last: bool = False
    weights: LossWeights = PUBLISHED_WEIGHTS


@dataclass
class EpochStats:
    """What one epoch of training measured (summed over this rank's steps)."""

    steps: int = 0
    samples: int = 0
    loss: float = 0.0
    loss_mask: float = 0.0
    loss_depth: float = 0.0
    iou: float = 0.0
    train_s: float = 0.0  # wall time of the training loop
    data_s: float = 0.0  # of which spent waiting for the loader
    skipped: int = 0  # samples the loader could not decode

    @property
    def step_s(self) -> float:
        return self.train_s - self.data_s


# The running sums of an epoch, in one float64 vector (one all_reduce at the end).
_SUMS = ("loss", "loss_mask", "loss_depth", "iou", "samples", "skipped")


# (inputs, mask, depth) -> the same augmented, on the device (`device_augment.DeviceAugment`).
BatchAugment = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]


def train_one_epoch(
    stepper: Stepper,
    loader: Iterable[dict],
    logger: StepLog | None = None,
    profiler=None,
    augment: BatchAugment | None = None,
    watch: LossCheck | None = None,
) -> EpochStats:
    """One pass over the loader; losses and IoU are summed on the device (no per-step sync).

    `augment`, if given, augments each batch on the device right after the copy. `watch` (on
    every rank alike) raises when a loss was not finite, at its checks.
    """
    net, device = stepper.net, stepper.device
    net.train()
    sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
    stats = EpochStats()
    start = time.perf_counter()
    batches = iter(loader)
    while True:
        wait = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        inputs, mask, depth = to_device(batch, device, channels_last=stepper.channels_last)
        stats.data_s += time.perf_counter() - wait
        if augment is not None:
            with torch.no_grad():
                inputs, mask, depth = augment(inputs, mask, depth)
        values = train_step(stepper, inputs, mask, depth)
        n = inputs.shape[0]
        with torch.no_grad():
            sums[:4] += values.double() * n
            sums[4] += n  # Python numbers are kernel arguments: no host-to-device copy, no sync
            sums[5] += batch.get("skipped", 0)
        stats.steps += 1
        if watch is not None:
            watch.update(values, stats.steps)
            if stats.steps % watch.every == 0:
                watch.check()
        if profiler is not None:
            profiler.step()
        if logger is not None:
            if stats.steps % logger.every == 0:
                logger.log(running_means(sums), stats.steps)
            logger.tick()
    if logger is not None:
        if stats.steps % logger.every:  # the epoch's last point, so short runs log too
            logger.log(running_means(sums), stats.steps)
        logger.close()
    if watch is not None:
        watch.check()  # before anything is evaluated or saved
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.train_s = time.perf_counter() - start
    return _reduced_stats(stats, sums)


def train_step(
    stepper: Stepper, inputs: torch.Tensor, mask: torch.Tensor, depth: torch.Tensor
) -> torch.Tensor:
    """One optimizer step; returns [loss, loss_mask, loss_depth, iou] on the device (no sync)."""
    with autocast(stepper.device, stepper.amp):
        mask_logits, depth_pred = stepper.net(inputs)
    loss, loss_mask, loss_depth = compute_loss(
        mask_logits.float(), depth_pred.float(), mask, depth, stepper.weights
    )
    stepper.optimizer.zero_grad(set_to_none=True)
    stepper.scaler.scale(loss).backward()
    stepper.scaler.step(stepper.optimizer)
    stepper.scaler.update()
    with torch.no_grad():
        iou = batch_iou(mask_logits.detach(), mask)
        return torch.stack([loss.detach(), loss_mask.detach(), loss_depth.detach(), iou])


def _reduced_stats(stats: EpochStats, sums: torch.Tensor) -> EpochStats:
    """Fill the epoch's means from its sums, reduced over all ranks."""
    all_reduce_sum(sums)
    s = dict(zip(_SUMS, sums.tolist(), strict=True))
    stats.skipped = int(s["skipped"])
    samples = max(s["samples"], 1.0)
    stats.samples = int(samples)
    stats.loss, stats.loss_mask = s["loss"] / samples, s["loss_mask"] / samples
    stats.loss_depth, stats.iou = s["loss_depth"] / samples, s["iou"] / samples
    return stats


def running_means(sums: torch.Tensor) -> dict[str, float]:
    """The running means of an epoch's sums so far (one host sync)."""
    s = dict(zip(_SUMS, sums.tolist(), strict=True))
    samples = max(s["samples"], 1.0)
    return {name: s[name] / samples for name in _SUMS[:4]}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable[dict],
    device: torch.device,
    amp: str = "off",
    weights: LossWeights = PUBLISHED_WEIGHTS,
    grid_rows: int = 0,
    max_batches: int | None = None,
    channels_last: bool = False,
) -> tuple[dict[str, float], np.ndarray | None]:
    """Metrics of `model` over every batch of `loader`, summed across ranks; optionally a grid.

    When any rank fails, every rank raises before the metrics' all_reduce (none is left waiting
    in it): a ValueError when each failure was one of EVAL_FAILURES, else a RuntimeError.
    """
    was_training = model.training
    model.eval()
    acc = MetricAccumulator(device)
    grid, failure = None, None
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            inputs, mask, depth = to_device(batch, device, channels_last=channels_last)
            with autocast(device, amp):
                mask_logits, depth_pred = model(inputs)
            mask_logits, depth_pred = mask_logits.float(), depth_pred.float()
            loss, _, _ = compute_loss(mask_logits, depth_pred, mask, depth, weights)
            acc.update(mask_logits, depth_pred, mask, depth, loss=loss)
            if grid is None and grid_rows > 0:
                grid = grid_of(inputs, mask, depth, mask_logits, depth_pred, grid_rows)
    except Exception as exc:  # raised again below, on every rank alike
        failure = exc
    acc.add_skipped(getattr(loader, "skipped", 0))  # a BatchStream's, for this pass
    model.train(was_training)
    raise_together(failure, device, EVAL_FAILURES)  # before the one collective of the metrics
    acc.all_reduce()
    return acc.compute(), grid


def split_inputs(inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's input (B, 2C, H, W) back into its images, by field (see schema.INPUTS)."""
    return dict(zip(INPUTS, inputs.chunk(len(INPUTS), dim=1), strict=True))


def grid_of(inputs, mask, depth, mask_logits, depth_pred, rows: int) -> np.ndarray:
    """The grid picture: bg, fg_bg, true and predicted mask, true and predicted depth."""
    images = split_inputs(inputs[:rows])
    return make_grid(
        images["bg"].float().cpu(),
        images["fg_bg"].float().cpu(),
        mask[:rows].cpu(),
        torch.sigmoid(mask_logits[:rows]).cpu(),
        depth[:rows].cpu(),
        depth_pred[:rows].cpu(),
        max_rows=rows,
    )
