"""Where a run starts: the checkpoint it continues (`--resume`, OUT/last.pt) or takes its
network from (`--init`), read once, and checked before the run writes anything."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model import UNetConfig
from pipeline.train.checkpoint import (
    check_resume_state,
    first_line,
    load_checkpoint,
    non_finite,
    refuse_init_over_run,
    short,
    weights_problem,
)
from pipeline.train.config import TrainConfig

if TYPE_CHECKING:
    from pipeline.train.run import Run

log = logging.getLogger(__name__)


def saved_checkpoint(config: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint the run continues (--resume: OUT/last.pt) or starts from (--init), read
    once, on the CPU (loading a state moves it to the device); None for a run from scratch."""
    if config.resume:
        path = Path(config.out) / "last.pt"
        if not path.is_file():
            raise FileNotFoundError(f"--resume: {path} does not exist (nothing to resume)")
        return load_checkpoint(path)
    if config.init:
        refuse_init_over_run(Path(config.out))  # before reading: the cheap check first
        return load_checkpoint(Path(config.init))
    return None


def network_args(manifest: dict, saved: dict[str, Any] | None) -> dict:
    """The run's model_args: the shards' channels, and the depth output of the checkpoint it
    continues (--resume) or starts from (--init), so a published network stays one."""
    args = {"image_channels": manifest["channels"]}
    if saved is not None:
        known = saved["config"].get("model_args", {})
        args["depth_output"] = known.get("depth_output", UNetConfig.depth_output)
    return dataclasses.asdict(UNetConfig(**args))


# Restored with the optimizer's and schedule's state: a new value would be silently ignored.
RESUME_MUST_MATCH = ("optimizer", "lr", "momentum", "weight_decay", "step_size", "gamma")
SGD_ONLY_EXCLUDED = tuple(n for n in RESUME_MUST_MATCH if n != "momentum")  # AdamW ignores it
# A resumed run may change these, but then it no longer goes on as the run would have.
RESUME_SHOULD_MATCH = (
    "shards",  # other data (or the same, moved: then the warning is all)
    "steps_per_epoch",
    "batch_size",
    "seed",
    "workers",
    "shuffle_buffer",
    "augment",
    "hflip",
    "augment_on",
    "mask_weight",
    "depth_weight",
    "amp",
)


def resume(
    path: Path, state: dict[str, Any], run: Run, config: TrainConfig, main: bool = True
) -> None:
    """Load `state` (read from `path`, OUT/last.pt) into the run: weights, optimizer, schedule,
    scaler, epoch and step; ValueError naming the file if it can't be continued as asked.
    `main`: this is rank 0, which alone logs.

    Every rank reads the file, so under multi-node torchrun OUT must be on a shared disk.
    """
    check_resume_state(state, path)
    must = RESUME_MUST_MATCH if config.optimizer == "sgd" else SGD_ONLY_EXCLUDED
    changed = _changed_settings(state["config"], config, must)
    if changed:
        raise ValueError(
            f"--resume: {path} was trained with other settings ({changed}); "
            "resume with the same ones, or train into a new folder"
        )
    if state["epoch"] >= config.epochs:
        raise ValueError(
            f"--resume: {path} has trained {state['epoch']} epochs already, and --epochs is "
            f"{config.epochs}: nothing is left to train (give a larger --epochs)"
        )
    drifted = _changed_settings(state["config"], config, RESUME_SHOULD_MATCH, unsaved=False)
    ranks = state["config"].get("world_size")
    if ranks is not None and ranks != config.world_size:  # a step is world_size batches
        drifted = ", ".join(filter(None, (drifted, f"processes {ranks} -> {config.world_size}")))
    if drifted and main:
        log.warning(
            "--resume: %s was trained with other settings (%s): the run goes on, but not as "
            "it would have gone",
            path,
            drifted,
        )
    problem = weights_problem(run.model.state_dict(), state["model"])
    if problem:
        raise ValueError(
            f"--resume: {path} holds another network than these shards need ({problem})"
        )
    run.model.load_state_dict(state["model"])
    try:
        _check_schedule(state["scheduler"], run.scheduler, config, state["epoch"])
        _check_groups(state["optimizer"], run.stepper.optimizer.state_dict())
        run.stepper.optimizer.load_state_dict(state["optimizer"])
        _check_buffers(run.stepper.optimizer)
        run.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and run.stepper.scaler.is_enabled():
            run.stepper.scaler.load_state_dict(state["scaler"])
    except Exception as exc:  # torch raises many types for a state of another run or damaged
        raise ValueError(
            f"--resume: {path}: its optimizer, schedule or scaler state does not fit this run "
            f"({first_line(exc, 160)})"
        ) from None
    run.epoch, run.step = state["epoch"], state["step"]
    run.best_iou = float(state.get("best_iou", -math.inf))
    run.evaluated = run.best_iou != -math.inf  # an earlier epoch had test metrics
    if main:  # best_iou is rank 0's alone
        best = _saved_best(path.parent / "best.pt", run.epoch, run.best_iou)
        run.best_iou = -math.inf if best is None else max(run.best_iou, best)
        log.info("resuming %s after epoch %d (step %d)", path, run.epoch, run.step)


def _saved_best(path: Path, epoch: int, known: float) -> float | None:
    """What OUT/best.pt means for the resumed run: None when it is missing or unreadable (the
    next evaluated epoch then writes it, whatever last.pt's best_iou: a finished run must not
    end on a best.pt that cannot be read, or none); its best_iou when it was written after
    last.pt (epoch > `epoch`: the run stopped between the two saves), else -inf. The resumed
    run trains that epoch again, and on a GPU, not bit for bit: a slightly worse model of it
    must not replace best.pt. An improved epoch writes best.pt first. `known`: last.pt's
    best_iou (-inf: no epoch has made a best.pt yet)."""
    if not path.is_file():
        if known != -math.inf:
            log.warning("--resume: %s is missing: the next evaluated epoch writes it", path)
        return None
    try:
        best = load_checkpoint(path)
    except (OSError, ValueError) as exc:
        log.warning(
            "--resume: %s is unreadable, and the next evaluated epoch replaces it: %s",
            path,
            first_line(exc, 160),
        )
        return None
    saved_epoch, iou = best.get("epoch"), best.get("best_iou")
    if type(saved_epoch) is not int or type(iou) is not float or not math.isfinite(iou):
        return -math.inf
    if saved_epoch <= epoch:  # its epoch says it, not its mtime (lost by cp -r)
        return -math.inf
    log.info(
        "--resume: %s holds epoch %d, after last.pt's: it stays best.pt unless an epoch "
        "beats its IoU %.4f",
        path,
        saved_epoch,
        iou,
    )
    return iou


def _changed_settings(
    saved: dict[str, Any], config: TrainConfig, names: tuple[str, ...], *, unsaved: bool = True
) -> str:
    """The settings among `names` that differ from a checkpoint's config, as `--name old -> new`
    ('' if none); one the checkpoint lacks differs if `unsaved` (else it is a setting newer than
    the checkpoint, taken as it was)."""
    return ", ".join(
        f"--{name.replace('_', '-')} {saved.get(name)} -> {getattr(config, name)}"
        for name in names
        if (unsaved or name in saved) and saved.get(name) != getattr(config, name)
    )


def _check_schedule(saved: dict, scheduler, config: TrainConfig, epoch: int) -> None:
    """ValueError unless `saved` is a StepLR state of this run (`scheduler`: a new one). StepLR's
    load_state_dict makes every key an attribute (a `step` would replace its method, to fail
    an epoch later), and its step size, factor and epoch count are taken as they are. A key
    of another torch version's state (2.2-2.6 saved `verbose`) replaces nothing: taken."""
    fresh = scheduler.state_dict()
    unknown = [
        short(str(k))
        for k in saved
        if k not in fresh and (not isinstance(k, str) or hasattr(scheduler, k))
    ]
    if unknown:
        raise ValueError(f"its scheduler holds unknown keys ({', '.join(unknown[:3])})")
    for name, want in (("step_size", config.step_size), ("gamma", config.gamma)):
        if saved.get(name) != want:
            raise ValueError(f"its scheduler's {name} is {short(saved.get(name))}, not {want}")
    if saved.get("last_epoch") != epoch:
        raise ValueError(
            f"its scheduler's last_epoch is {short(saved.get('last_epoch'))}, its epoch {epoch}"
        )
    kinds = [
        k
        for k, v in saved.items()
        if k in fresh
        and k not in ("step_size", "gamma", "last_epoch")
        and type(v) is not type(fresh[k])
    ]
    if kinds:
        raise ValueError(f"its scheduler's {kinds[0]} is {short(saved[kinds[0]])}")


def _check_groups(saved: dict, fresh: dict) -> None:
    """ValueError unless the optimizer's saved settings are this run's (they replace them as
    they are: a NaN rate, `maximize`): each as a new optimizer has it, the rates finite."""
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(fresh["param_groups"]):
        return  # load_state_dict says what does not fit
    for group, new in zip(groups, fresh["param_groups"], strict=True):
        if not isinstance(group, dict):
            return
        for name in ("lr", "initial_lr"):
            rate = group.get(name, 0.0)
            if type(rate) not in (int, float) or not 0 <= rate < math.inf:
                raise ValueError(f"its optimizer's {name} is {short(rate)}")
        other = [
            k
            for k, v in new.items()
            if k not in ("params", "lr", "initial_lr") and k in group and group[k] != v
        ]
        if other:
            raise ValueError(
                f"its optimizer's {other[0]} is {short(group[other[0]])}, not "
                f"{short(new[other[0]])}"
            )


def _check_buffers(optimizer: torch.optim.Optimizer) -> None:
    """ValueError unless every loaded buffer (momentum, Adam's moments) is a tensor of its
    parameter's shape, finite: torch loads them unchecked, to fail in the first step."""
    buffers = {}  # every buffer, checked for NaN and inf at once (one host sync, not one each)
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if value is None:
                    continue
                if not torch.is_tensor(value) or (value.dim() and value.shape != param.shape):
                    shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                    raise ValueError(f"its optimizer's {name} is {shape}, not {tuple(param.shape)}")
                buffers[len(buffers), name] = value
    bad = non_finite(buffers)
    if bad:
        raise ValueError(f"its optimizer's {bad[0][1]} holds NaN or inf")
