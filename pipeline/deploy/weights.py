"""`pipeline import-weights`: the published network's saved weights -> a pipeline checkpoint.

The published training code saved `torch.save(model.state_dict(), ...)`: a plain state_dict of
170 entries (tests/test_weights.py writes its layout out), maybe with DataParallel's `module.`
prefix on every key. Its
modules are model/unet.py's in the same order, so entry i of its state_dict has the shape of
entry i of ours; only the names differ (`inc.double_conv.0…` for our `inc.0…`, `outc` for our
`mask_head`, `outd` for our `depth_head`). `published_name` spells that correspondence out, and
the file must hold exactly those names in that order, each with our shape: the first entry that
is missing, unexpected, out of place or of another shape is named.

The published depth head had no sigmoid; its raw output was min-max normalised per image. An
imported checkpoint therefore says `depth_output: "minmax"`, so evaluate, predict and export give
the published depth.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from model import UNet, UNetConfig
from pipeline.schema import CHANNELS, MODE_OF
from pipeline.train.checkpoint import (
    load_tensors,
    non_finite,
    not_plain,
    same_kind,
    save_checkpoint,
    unreadable_reason,
)
from pipeline.train.config import PUBLISHED_WEIGHTS

log = logging.getLogger(__name__)

DATA_PARALLEL_PREFIX = "module."
FIRST_LAYER = "inc.double_conv.0.depthwise.weight"  # (2C, 1, 3, 3): tells gray from RGB
HEADS = {"mask_head": "outc", "depth_head": "outd"}


def published_name(key: str) -> str:
    """Our state_dict key -> the published network's: `down1.1.0.depthwise.weight` ->
    `down1.maxpool_conv.1.double_conv.0.depthwise.weight`."""
    module, rest = key.split(".", 1)
    if module == "inc":
        return f"inc.double_conv.{rest}"
    if module.startswith("down"):  # ours: Sequential(MaxPool, DoubleConv) -> `downK.1.<conv>`
        return f"{module}.maxpool_conv.1.double_conv.{rest.removeprefix('1.')}"
    if module.startswith("up"):
        return f"{module}.conv.double_conv.{rest.removeprefix('conv.')}"
    return f"{HEADS[module]}.conv.{rest}"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict file read without running any of its code; ValueError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        state = load_tensors(path)
    except Exception as exc:  # torch raises many types for a file that is not one of its own
        why = unreadable_reason(exc, "save `model.state_dict()` from the published code")
        raise ValueError(f"{path}: not a readable PyTorch weights file: {why}") from None
    if isinstance(state, Mapping) and {"model", "config"} <= set(state):
        raise ValueError(f"{path}: already a pipeline checkpoint: use it as it is")
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path}: not a state_dict (a mapping of names to tensors)")
    return dict(state)


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DataParallel's `module.` prefix when every key has it."""
    if state and all(k.startswith(DATA_PARALLEL_PREFIX) for k in state):
        return {k.removeprefix(DATA_PARALLEL_PREFIX): v for k, v in state.items()}
    return state


def file_mode(state: dict[str, torch.Tensor], path: Path) -> str:
    """L or RGB, from the channels the first layer takes (fg_bg and bg stacked)."""
    first = state.get(FIRST_LAYER)
    if first is None:
        raise ValueError(f"{path}: no entry {FIRST_LAYER}: not the published network's weights")
    channels = first.shape[0] // 2 if first.dim() == 4 and first.shape[0] % 2 == 0 else None
    if channels not in MODE_OF:
        raise ValueError(
            f"{path}: {FIRST_LAYER} has shape {tuple(first.shape)}: takes neither 2 (L) nor "
            "6 (RGB) channels"
        )
    return MODE_OF[channels]


def map_published(
    state: dict[str, torch.Tensor], model: UNet, path: Path
) -> dict[str, torch.Tensor]:
    """The published entries under our names, entry i onto entry i; ValueError at the first
    entry that is missing, unexpected, out of place or of another shape."""
    ours = model.state_dict()
    wanted = [published_name(key) for key in ours]
    theirs = list(state)
    for index, name in enumerate(wanted):
        have = theirs[index] if index < len(theirs) else None
        if have == name:
            continue
        if name not in state:
            raise ValueError(f"{path}: missing key {name} (entry {index} of {len(wanted)})")
        if have not in wanted:
            raise ValueError(f"{path}: unexpected key {have} (entry {index})")
        raise ValueError(f"{path}: entry {index} is {have}, the published layout has {name}")
    if len(theirs) > len(wanted):
        raise ValueError(f"{path}: unexpected key {theirs[len(wanted)]} (entry {len(wanted)})")
    for target, name in zip(ours.values(), wanted, strict=True):
        if state[name].shape != target.shape:
            raise ValueError(
                f"{path}: {name} has shape {tuple(state[name].shape)}, the network needs "
                f"{tuple(target.shape)}"
            )
        odd = not_plain(state[name])
        if odd:
            raise ValueError(f"{path}: {name} is {odd}, not one holding its numbers")
        if not same_kind(target, state[name]):
            raise ValueError(
                f"{path}: {name} holds {state[name].dtype} numbers, the network needs "
                f"{target.dtype}"
            )
    bad = non_finite(state)
    if bad:
        raise ValueError(f"{path}: {len(bad)} entries hold NaN or inf ({', '.join(bad[:3])})")
    return {key: state[name] for key, name in zip(ours, wanted, strict=True)}


def import_weights(source: Path, out: Path, mode: str | None = None) -> dict:
    """Write a pipeline checkpoint (depth_output minmax) from the published weights in `source`.

    `mode` (L or RGB) must agree with the file's first layer; None reads it from there.
    """
    source, out = Path(source), Path(out)
    if out.exists() and out.resolve() == source.resolve():
        raise ValueError(
            f"--out {out} is the weights file being imported: give the checkpoint another path"
        )
    raw = read_state_dict(source)
    state = strip_prefix(raw)
    found = file_mode(state, source)
    if mode is not None and mode != found:
        raise ValueError(
            f"{source}: holds weights for {found} images ({FIRST_LAYER} takes "
            f"{2 * CHANNELS[found]} channels), not {mode}: drop --mode or give --mode {found}"
        )
    config = UNetConfig(image_channels=CHANNELS[found], depth_output="minmax")
    model = UNet(config)
    model.load_state_dict(map_published(state, model, source))
    with open(source, "rb") as file:
        sha256 = hashlib.file_digest(file, "sha256").hexdigest()
    checkpoint = {
        "model": model.state_dict(),
        "config": {
            "model_args": dataclasses.asdict(config),
            "mask_weight": PUBLISHED_WEIGHTS.mask,  # the loss it was trained with
            "depth_weight": PUBLISHED_WEIGHTS.depth,
            "imported_from": str(source),
            "imported_sha256": sha256,
        },
    }
    save_checkpoint(checkpoint, out)
    params = sum(p.numel() for p in model.parameters())
    log.debug("%s: %d entries, %s, %s parameters -> %s", source, len(state), found, params, out)
    return {
        "checkpoint": str(out),
        "source": str(source),
        "sha256": sha256,
        "entries": len(state),
        "data_parallel_prefix": state is not raw,
        "mode": found,
        "params": params,
        "depth_output": config.depth_output,
    }
