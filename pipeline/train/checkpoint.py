"""Checkpoints: one dict (model, optimizer, scheduler, epoch, step, config), saved atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pickle
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from model import UNet, UNetConfig
from model.unet import DEPTH_OUTPUTS
from pipeline.schema import CHANNELS

REQUIRED_KEYS = ("model", "config")
MAX_COUNT = 2**53  # the most epochs or steps a checkpoint may claim (more: not a run's)


def save_checkpoint(state: dict[str, Any], path: Path) -> Path:
    """Write a checkpoint to a temp file, then rename it: a crash never leaves half a file."""
    path = Path(path)
    bad = non_finite(state.get("model", {}))
    if bad:  # a NaN run must not replace a good best.pt or last.pt
        raise ValueError(f"{path}: not written, its weights hold NaN or inf ({_names(bad)})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state, tmp)
        _sync(tmp)  # on the disk before the rename: a power cut never leaves an empty last.pt
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # the rename itself (some file systems refuse)
            _sync(path.parent)
    except (RuntimeError, OSError) as exc:  # a full disk: torch says `enforce fail at ...`
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        why = _write_failure(exc, path.parent)
        raise OSError(f"{path}: could not write the checkpoint: {why}") from exc
    return path


def _sync(path: Path) -> None:
    """fsync a file or a folder (what os.replace renamed lives in its folder's entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def non_finite(weights: dict[str, Any]) -> list[str]:
    """The names of the floating-point tensors that hold NaN or inf (one host sync for all)."""
    names = [k for k, t in weights.items() if torch.is_tensor(t) and t.is_floating_point()]
    if not names:
        return []
    finite = torch.stack([weights[k].isfinite().all() for k in names]).tolist()
    return [name for name, ok in zip(names, finite, strict=True) if not ok]


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `pipeline train`, with clear errors for anything else."""
    path = Path(path)
    if path.is_dir():
        inside = ", ".join(str(path / n) for n in ("best.pt", "last.pt") if (path / n).is_file())
        hint = f" (give the checkpoint in it: {inside})" if inside else ""
        raise FileNotFoundError(f"{path}: a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        state = load_tensors(path, map_location)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        why = unreadable_reason(exc, "save a state_dict in a dict instead")
        raise ValueError(f"{path}: not a readable PyTorch checkpoint: {why}") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise ValueError(
            f"{path}: not a pipeline checkpoint (needs keys {', '.join(REQUIRED_KEYS)})"
        )
    _check_contents(state, path)
    return state


def load_tensors(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only (a file from elsewhere cannot run code: ours hold tensors
    and data), never inflating more than the file holds (`check_archive`), and without torch's
    two-line pickle-protocol warning for a plain pickle."""
    check_archive(Path(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location=map_location, weights_only=True)


def check_archive(path: Path) -> None:
    """ValueError if a torch.save zip archive could inflate beyond its file's size: torch stores
    its entries uncompressed, but a file from elsewhere may deflate them, and a few MB of zeros
    inflate to GBs. (A legacy, non-zip file's storages are read from the file as they lie.)"""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except zipfile.BadZipFile:
        return  # legacy, or damaged: torch.load says which
    squeezed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if squeezed:
        raise ValueError(
            f"its archive holds {len(squeezed)} compressed entries (torch.save writes none: "
            "they could inflate far beyond the file's size)"
        )
    claimed, size = sum(e.file_size for e in entries), path.stat().st_size
    if claimed > size:
        raise ValueError(f"its archive's entries claim {claimed:,} bytes, the file holds {size:,}")


def model_from_checkpoint(
    state: dict[str, Any], device: str | torch.device = "cpu", source: Path | str = "checkpoint"
) -> UNet:
    """Rebuild the network a checkpoint describes and load its weights, in eval mode.

    `source` names the checkpoint in errors (its path, where the caller has one).
    """
    model = UNet.from_args(state["config"].get("model_args", {}))
    problem = weights_problem(model.state_dict(), state["model"])
    if problem:
        raise ValueError(f"{source}: its weights do not fit the network it describes: {problem}")
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def _check_contents(state: dict[str, Any], path: Path) -> None:
    """`config` and `model_args` are dicts of what this version knows, `model` a dict of weights."""
    config = state["config"]
    if not isinstance(config, dict):
        raise ValueError(f"{path}: its config is {_kind(config)}, not a dict")
    if not isinstance(state["model"], dict):
        raise ValueError(f"{path}: its model is {_kind(state['model'])}, not a dict of weights")
    args = config.get("model_args", {})
    if not isinstance(args, dict):
        raise ValueError(f"{path}: its config's model_args is {_kind(args)}, not a dict")
    known = {f.name: f.default for f in dataclasses.fields(UNetConfig)}
    unknown = [str(k) for k in args if k not in known]
    if unknown:
        raise ValueError(
            f"{path}: its model_args hold unknown keys ({_names(unknown)}); "
            f"this version knows {', '.join(known)}"
        )
    for name, value in args.items():
        want = type(known[name])
        if known[name] not in (None, dataclasses.MISSING) and type(value) is not want:
            raise ValueError(
                f"{path}: its model_args {name} is {short(repr(value))}, not {want.__name__}"
            )
    channels = args.get("image_channels", UNetConfig.image_channels)
    if channels not in CHANNELS.values():
        raise ValueError(
            f"{path}: its model_args image_channels is {channels}, not one of "
            f"{', '.join(map(str, CHANNELS.values()))}"
        )
    depth = args.get("depth_output", UNetConfig.depth_output)
    if depth not in DEPTH_OUTPUTS:
        raise ValueError(
            f"{path}: its model_args depth_output is {short(repr(depth))}, not one of "
            f"{', '.join(DEPTH_OUTPUTS)}"
        )


def weights_problem(want: dict[str, Any], have: dict[str, Any]) -> str:
    """What keeps weights `have` from loading into a network whose state dict is `want` ('' if
    nothing): entries missing, unexpected, of another shape or kind, or not finite."""
    missing = [k for k in want if k not in have]
    unexpected = [str(k) for k in have if k not in want]
    common = [k for k in want if k in have]
    wrong = [k for k in common if not torch.is_tensor(have[k]) or have[k].shape != want[k].shape]
    odd = [k for k in common if k not in wrong and not_plain(have[k])]
    kind = [k for k in common if k not in wrong + odd and not same_kind(want[k], have[k])]
    found = [
        ("missing", missing),
        ("unexpected", unexpected),
        ("of another shape", wrong),
        ("not plain tensors holding their numbers (sparse, quantized or meta)", odd),
        ("of another kind of number", kind),
    ]
    if not any(names for _, names in found):
        found.append(("holding NaN or inf", non_finite(have)))
    return "; ".join(f"{len(names)} {label} ({_names(names)})" for label, names in found if names)


def not_plain(tensor: torch.Tensor) -> str:
    """What keeps a loaded tensor from being a dense one holding its numbers ('' if nothing):
    torch.load also rebuilds sparse, quantized and meta tensors (a shape without data)."""
    if tensor.is_meta:
        return "a meta tensor (a shape without numbers)"
    if tensor.is_quantized:
        return "a quantized tensor"
    if tensor.layout != torch.strided:
        return f"a {str(tensor.layout).removeprefix('torch.')} tensor"
    return ""


def same_kind(want: torch.Tensor, have: torch.Tensor) -> bool:
    """Whether `have` can stand for `want`: a real floating-point tensor for one (its precision
    may differ), an integer one for an integer one (never bool or complex)."""
    if have.dtype == torch.bool or have.is_complex():
        return False
    return want.is_floating_point() == have.is_floating_point()


def check_resume_state(state: dict[str, Any], path: Path) -> None:
    """ValueError naming `path` unless `state` holds what `train --resume` continues: the
    optimizer's and the schedule's states (dicts) and the epoch and step counts (ints >= 0)."""
    kinds = {"optimizer": dict, "scheduler": dict, "epoch": int, "step": int}
    for key, kind in kinds.items():
        if key not in state:
            raise ValueError(
                f"--resume: {path} has no {key}: not a run's checkpoint that training can "
                "continue (start a new run from its weights with --init)"
            )
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"--resume: {path}: its {key} is {_kind(value)}, not {kind.__name__}")
        if kind is int and not 0 <= value <= MAX_COUNT:  # TensorBoard's steps are int64
            raise ValueError(f"--resume: {path}: its {key} is {short(value)}, not 0 to 2**53")
    best = state.get("best_iou", 0.0)
    try:
        number = float(best) if type(best) in (float, int) else math.nan  # not a bool
    except OverflowError:  # an int of 400 digits
        number = math.nan
    if math.isnan(number):
        raise ValueError(f"--resume: {path}: its best_iou is {short(repr(best))}, not a number")
    scaler = state.get("scaler")
    if scaler is not None and not isinstance(scaler, dict):
        raise ValueError(f"--resume: {path}: its scaler is {_kind(scaler)}, not a dict")


def unreadable_reason(exc: Exception, advice: str) -> str:
    """Why torch could not load a file, in a few words (never its advice to drop weights_only);
    `advice` says what to save instead of pickled objects."""
    text = str(exc)
    # torch names a pickled global it does not allow, or one from a module it blocks (os, …)
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", text)
    if found:
        return (
            f"it holds pickled Python objects ({found.group(1)}), which could run code when "
            f"loaded, not just weights ({advice})"
        )
    if isinstance(exc, EOFError):
        return "the file is empty or cut short"
    if "wrong byte size" in text or "does not match expected size" in text:  # C++ text, raw
        return "a tensor claims more bytes than the file holds for it (truncated or damaged)"
    if "PytorchStreamReader" in text or "central directory" in text:
        return "the file is truncated or damaged (its zip archive is incomplete)"
    if isinstance(exc, pickle.UnpicklingError | KeyError):  # KeyError: its first byte's opcode
        return "it was not written by torch.save"
    return first_line(exc, 200)


def first_line(exc: BaseException, limit: int) -> str:
    """An exception's first line of text (its type's name if it has none), at most `limit`."""
    text = str(exc)
    return short(text.splitlines()[0] if text else type(exc).__name__, limit)


def _write_failure(exc: Exception, folder: Path) -> str:
    """Why torch could not write a checkpoint: the OS's words, or its writer's and free space."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)  # a C++ source line
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return text
    return f"{text} ({free:,} bytes free on its disk: is it full?)"


def _kind(value: Any) -> str:
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _names(names: list[str], shown: int = 3) -> str:
    more = f", … {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(short(n) for n in names[:shown]) + more


def refuse_init_over_run(out: Path) -> None:
    """ValueError if `train --init` would start its new run in a folder that holds one."""
    if (Path(out) / "last.pt").exists():
        raise ValueError(
            f"--init starts a new run, but {out} already holds one (last.pt): choose another "
            "--out, or continue that run with --resume"
        )


def init_weights(model: UNet, state: dict[str, Any], path: Path) -> None:
    """Load the weights of checkpoint `state` (read from `path`, named in errors) into a new
    run's network (`train --init`); ValueError naming the problem if they don't fit it."""
    have = state["config"].get("model_args", {}).get("image_channels", UNetConfig.image_channels)
    want = model.config.image_channels
    if have != want:
        raise ValueError(
            f"--init {path}: its network takes {have}-channel images, the shards hold "
            f"{want}-channel images"
        )
    problem = weights_problem(model.state_dict(), state["model"])
    if problem:
        raise ValueError(f"--init {path}: its weights do not fit this network ({problem})")
    model.load_state_dict(state["model"])
