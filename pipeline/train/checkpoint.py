"""Checkpoints: one dict (model, optimizer, scheduler, epoch, step, config), saved atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from model import UNet

REQUIRED_KEYS = ("model", "config")


def save_checkpoint(state: dict[str, Any], path: Path) -> Path:
    """Write a checkpoint to a temp file, then rename it: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `pipeline train`, with clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        # weights_only: a checkpoint from elsewhere cannot run code; ours hold tensors, plain data.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise ValueError(
            f"{path}: not a pipeline checkpoint (needs keys {', '.join(REQUIRED_KEYS)})"
        )
    return state


def model_from_checkpoint(state: dict[str, Any], device: str | torch.device = "cpu") -> UNet:
    """Rebuild the network a checkpoint describes and load its weights, in eval mode."""
    model = UNet.from_args(state["config"].get("model_args", {}))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def init_weights(model: UNet, path: Path, out: Path) -> None:
    """Load a checkpoint's weights into a new run's network (`train --init`); ValueError naming
    the problem if the run folder already holds a run or the weights don't fit the network."""
    if (Path(out) / "last.pt").exists():
        raise ValueError(
            f"--init starts a new run, but {out} already holds one (last.pt): choose another "
            "--out, or continue that run with --resume"
        )
    state = load_checkpoint(path)
    have = state["config"].get("model_args", {}).get("image_channels", 1)
    want = model.config.image_channels
    if have != want:
        raise ValueError(
            f"--init {path}: its network takes {have}-channel images, the shards hold "
            f"{want}-channel images"
        )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(f"--init {path}: its weights do not fit this network ({exc})") from None
