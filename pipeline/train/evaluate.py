"""`pipeline evaluate`: a checkpoint's metrics over a split of a shard folder, and a grid."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from pipeline.schema import split_samples
from pipeline.train.checkpoint import load_checkpoint, model_from_checkpoint
from pipeline.train.config import PUBLISHED_WEIGHTS, EvaluateConfig, LossWeights
from pipeline.train.loader import LoaderConfig, make_eval_loader
from pipeline.train.loop import evaluate
from pipeline.train.pictures import save_png
from pipeline.train.runtime import resolve_amp, resolve_device
from pipeline.train.sources import open_manifest, warn_if_incomplete

log = logging.getLogger(__name__)


def evaluate_checkpoint(config: EvaluateConfig) -> dict:
    """Load a checkpoint and measure it on a split of a shard folder (or URL)."""
    manifest = open_manifest(config.shards)
    warn_if_incomplete(config.shards, manifest)
    if split_samples(manifest, config.split) == 0:
        others = [s for s in manifest["splits"] if s != config.split and split_samples(manifest, s)]
        hint = f" (--split {others[0]} holds some)" if others else ""
        raise ValueError(f"{config.shards}: the {config.split} split holds no samples{hint}")
    dev = resolve_device(config.device)
    state = load_checkpoint(config.checkpoint, map_location=dev)
    model = model_from_checkpoint(state, dev, config.checkpoint)
    _check_channels(model, manifest, config.checkpoint)
    loaders = LoaderConfig(
        batch_size=config.batch_size, workers=config.workers, pin_memory=dev.type == "cuda"
    )
    loader = make_eval_loader(config.shards, config.split, loaders, rank=0, world_size=1)
    amp = resolve_amp(config.amp, dev)
    rows = config.grid_rows if config.grid else 0
    weights = _loss_weights(state["config"], config.checkpoint)
    metrics, picture = evaluate(model, loader, dev, amp, weights, rows)
    if config.grid is not None and picture is not None:
        save_png(picture, config.grid)
        shown = min(config.grid_rows, metrics["samples"])
        log.info("grid of %d samples written to %s", shown, config.grid)
    metrics.update(split=config.split, checkpoint=str(config.checkpoint), amp=amp)
    return metrics


def _loss_weights(config: dict, checkpoint: Path) -> LossWeights:
    """The weights a checkpoint trained with (the published ones if it does not say)."""
    weights = LossWeights(
        config.get("mask_weight", PUBLISHED_WEIGHTS.mask),
        config.get("depth_weight", PUBLISHED_WEIGHTS.depth),
    )
    for name, value in zip(("mask_weight", "depth_weight"), weights, strict=True):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ValueError(f"{checkpoint}: its config's {name} is {value!r}, not a finite number")
    return LossWeights(*map(float, weights))


def _check_channels(model: torch.nn.Module, manifest: dict, checkpoint: Path) -> None:
    """A gray model can't read RGB shards (or the reverse): say so instead of a shape error."""
    want, have = model.config.image_channels, manifest["channels"]
    if want != have:
        raise ValueError(
            f"{checkpoint}: the model takes {want}-channel images but the shards hold "
            f"{have}-channel ({manifest['mode']}) images"
        )
