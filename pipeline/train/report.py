"""What a run tells its user: the progress bar, TensorBoard, the epoch line, the profilers.

Rank 0 alone reports; the other ranks get no writer and no bar.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.train.loop import EpochStats

log = logging.getLogger(__name__)

PROFILE_STEPS = (1, 1, 3)  # torch.profiler: steps to skip, to warm up, to record


def open_writer(out: Path, config: Any, resumed_step: int | None = None):
    """Write the resolved config to OUT/config.json and open TensorBoard's writer (rank 0).

    `resumed_step`: the step a resumed run continues after. What the interrupted run logged
    beyond it (the unfinished epoch's train/* points, an epoch whose last.pt was never written)
    is purged from TensorBoard's view, not shown beside the points the resumed run logs again.
    """
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    purge = None if resumed_step is None else resumed_step + 1
    return SummaryWriter(log_dir=str(out), purge_step=purge)


@dataclass
class StepLogger:
    """Rank 0's running means every `every` steps: the progress bar and TensorBoard's train/*."""

    every: int  # steps between reports (each costs the loop one host sync)
    total: int  # steps in the epoch, for the bar
    desc: str  # the bar's label, e.g. "epoch 1/5"
    writer: Any = None  # TensorBoard's SummaryWriter, or None
    start_step: int = 0  # optimizer steps before this epoch: TensorBoard's x axis continues
    optimizer: torch.optim.Optimizer | None = None  # for the logged learning rate
    show_bar: bool = True
    _bar: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=self.total,
            desc=self.desc,
            unit="step",
            disable=not self.show_bar or None,  # None: shown only on a terminal
            leave=False,
            dynamic_ncols=True,
        )

    def log(self, values: dict[str, float], steps: int) -> None:
        """Show and log the running means after `steps` steps of this epoch."""
        self._bar.set_postfix(loss=f"{values['loss']:.4f}", iou=f"{values['iou']:.3f}")
        if self.writer is None:
            return
        step = self.start_step + steps
        for name, value in values.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        if self.optimizer is not None:
            self.writer.add_scalar("lr", self.optimizer.param_groups[0]["lr"], step)

    def tick(self) -> None:
        """One more step done."""
        self._bar.update(1)

    def close(self) -> None:
        """The epoch is over: remove the bar."""
        self._bar.close()


def epoch_perf(stats: EpochStats, device: torch.device, eval_s: float, total_s: float):
    """(perf, timing) of an epoch: samples/s, data-wait fraction, peak memory; time by phase."""
    perf = {
        "samples_per_s": stats.samples / max(stats.train_s, 1e-9),
        "data_wait_fraction": stats.data_s / max(stats.train_s, 1e-9),
    }
    if device.type == "cuda":
        perf["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    timing = {
        "train_step_s": stats.step_s,
        "data_wait_s": stats.data_s,
        "eval_s": eval_s,
        "other_s": max(total_s - stats.train_s - eval_s, 0.0),
    }
    return perf, timing


def log_epoch_scalars(writer, step: int, stats: EpochStats, metrics, grid, perf, timing) -> None:
    """TensorBoard at the epoch's last step: reduced training means, test metrics, timings."""
    scalars = {
        # The whole epoch over all ranks (train/* are rank 0's running means, every log_every).
        "train_epoch/loss": stats.loss,
        "train_epoch/loss_mask": stats.loss_mask,
        "train_epoch/loss_depth": stats.loss_depth,
        "train_epoch/iou": stats.iou,
        "data/skipped_samples": stats.skipped,
        **({"data/skipped_test_samples": metrics["skipped"]} if "skipped" in metrics else {}),
        **{f"perf/{k}": v for k, v in perf.items()},
        **{f"time/{k}": v for k, v in timing.items()},
        **{f"test/{k}": v for k, v in metrics.items() if isinstance(v, float)},
    }
    for name, value in scalars.items():
        writer.add_scalar(name, value, step)
    if grid is not None:
        writer.add_image("test/grid", grid, step, dataformats="HWC")
    writer.flush()


def epoch_line(epoch: str, step: int, lr: float, stats: EpochStats, metrics, perf, timing) -> str:
    """The one summary line printed after each epoch (`epoch` is e.g. "1/5")."""
    test = (
        f"test loss {metrics['loss']:.4f} iou {metrics['iou']:.3f} "
        f"depth ssim {metrics['depth_ssim']:.3f} rmse {metrics['depth_rmse']:.4f}"
        if metrics
        else "no test metrics"
    )
    memory = f", peak {perf['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in perf else ""
    skipped = f", {stats.skipped} undecodable samples skipped" if stats.skipped else ""
    if metrics.get("skipped"):
        skipped += f", {metrics['skipped']} undecodable test samples skipped"
    return (
        f"epoch {epoch} step {step} lr {lr:.2g}: train loss {stats.loss:.4f} "
        f"iou {stats.iou:.3f} | {test} | {perf['samples_per_s']:.0f} samples/s | time: steps "
        f"{timing['train_step_s']:.1f}s, data wait {timing['data_wait_s']:.1f}s "
        f"({100 * perf['data_wait_fraction']:.0f}%), eval {timing['eval_s']:.1f}s, "
        f"other {timing['other_s']:.1f}s{memory}{skipped}"
    )


def torch_profiler(out: Path, steps: int):
    """A torch.profiler over a few steps of the first epoch, traced for TensorBoard's profiler."""
    if steps < sum(PROFILE_STEPS):
        log.warning(
            "--profile torch needs %d steps in an epoch, this one has %d: the trace "
            "will be shorter or missing",
            sum(PROFILE_STEPS),
            steps,
        )
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    wait, warmup, active = PROFILE_STEPS
    return profile(
        activities=activities,
        schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(Path(out) / "profile")),
        record_shapes=True,
        profile_memory=True,
    )
