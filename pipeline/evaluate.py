"""Evaluation: metrics over a split (reduced across ranks) and a picture grid of a few samples."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint import load_checkpoint, model_from_checkpoint
from pipeline.data import LoaderConfig, make_eval_loader, open_manifest, to_device
from pipeline.dist import resolve_device
from pipeline.metrics import MetricAccumulator, compute_loss
from pipeline.precision import autocast, resolve_amp
from pipeline.visual import make_grid, save_png

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    loader: Iterable[dict],
    device: torch.device,
    amp: str = "off",
    loss_weights: tuple[float, float] = (2.0, 1.0),
    grid_rows: int = 0,
    max_batches: int | None = None,
    channels_last: bool = False,
) -> tuple[dict[str, float], np.ndarray | None]:
    """Metrics of `model` over every batch of `loader`, summed across ranks; optionally a grid."""
    was_training = model.training
    model.eval()
    acc = MetricAccumulator(device)
    grid = None
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        inputs, mask, depth = to_device(batch, device, channels_last=channels_last)
        with autocast(device, amp):
            mask_logits, depth_pred = model(inputs)
        mask_logits, depth_pred = mask_logits.float(), depth_pred.float()
        loss, _, _ = compute_loss(mask_logits, depth_pred, mask, depth, *loss_weights)
        acc.update(mask_logits, depth_pred, mask, depth, loss=loss)
        if grid is None and grid_rows > 0:
            grid = _grid_of(inputs, mask, depth, mask_logits, depth_pred, grid_rows)
    acc.all_reduce()
    model.train(was_training)
    return acc.compute(), grid


def _grid_of(inputs, mask, depth, mask_logits, depth_pred, rows: int) -> np.ndarray:
    """The grid picture: bg, fg_bg, true and predicted mask, true and predicted depth."""
    channels = inputs.shape[1] // 2
    fg_bg, bg = inputs[:rows, :channels], inputs[:rows, channels:]
    return make_grid(
        bg.float().cpu(),
        fg_bg.float().cpu(),
        mask[:rows].cpu(),
        torch.sigmoid(mask_logits[:rows]).cpu(),
        depth[:rows].cpu(),
        depth_pred[:rows].cpu(),
        max_rows=rows,
    )


def evaluate_checkpoint(
    checkpoint: Path,
    shards: str | Path,
    split: str = "test",
    batch_size: int = 100,
    workers: int = 2,
    device: str = "auto",
    grid: Path | None = None,
    grid_rows: int = 8,
) -> dict:
    """Load a checkpoint and measure it on a split of a shard folder (or URL)."""
    manifest = open_manifest(shards)
    if manifest["splits"].get(split, {}).get("samples", 0) == 0:
        raise ValueError(f"{shards}: the {split} split holds no samples")
    dev = resolve_device(device)
    state = load_checkpoint(checkpoint, map_location=dev)
    model = model_from_checkpoint(state, dev)
    _check_channels(model, manifest, checkpoint)
    config = LoaderConfig(batch_size=batch_size, workers=workers, pin_memory=dev.type == "cuda")
    loader = make_eval_loader(shards, split, config, rank=0, world_size=1)
    amp = resolve_amp("auto", dev)
    loss_weights = _loss_weights(state["config"])
    metrics, picture = evaluate_model(
        model, loader, dev, amp, loss_weights, grid_rows=grid_rows if grid else 0
    )
    if grid is not None and picture is not None:
        save_png(picture, grid)
        log.info("grid of %d samples written to %s", min(grid_rows, metrics["samples"]), grid)
    metrics.update(split=split, checkpoint=str(checkpoint), skipped=loader.skipped)
    return metrics


def _loss_weights(config: dict) -> tuple[float, float]:
    return float(config.get("mask_weight", 2.0)), float(config.get("depth_weight", 1.0))


def _check_channels(model: torch.nn.Module, manifest: dict, checkpoint: Path) -> None:
    """A gray model can't read RGB shards (or the reverse): say so instead of a shape error."""
    want = model.config.image_channels
    have = int(manifest.get("channels", 1))
    if want != have:
        raise ValueError(
            f"{checkpoint}: the model takes {want}-channel images but the shards hold "
            f"{have}-channel ({manifest.get('mode')}) images"
        )
