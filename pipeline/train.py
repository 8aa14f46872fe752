"""The streaming trainer: one process per GPU under torchrun, the published recipe by default."""

from __future__ import annotations

import contextlib
import cProfile
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from model import UNet, UNetConfig
from pipeline.augment import AugmentConfig
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.data import (
    LoaderConfig,
    make_eval_loader,
    make_train_loader,
    open_manifest,
    to_device,
    train_steps_per_epoch,
)
from pipeline.dist import DistInfo, all_reduce_sum, barrier, cleanup_distributed, setup_distributed
from pipeline.evaluate import evaluate_model
from pipeline.metrics import batch_iou, compute_loss
from pipeline.precision import autocast, resolve_amp

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
PROFILES = ("off", "cprofile", "torch")


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
    mask_weight: float = 2.0  # loss = mask_weight*BCE(mask) + depth_weight*(1-SSIM(depth))
    depth_weight: float = 1.0
    workers: int = 4  # loader processes per training process
    shuffle_buffer: int = 1000  # samples held for shuffling in each loader worker
    augment: bool = True  # the published photometric jitter + noise on the inputs
    hflip: float = 0.0  # probability of flipping all four images of a sample together
    device: str = "auto"  # auto = cuda when present
    amp: str = "auto"  # auto = bf16 on GPUs that support it, off on CPU
    compile: bool = False  # torch.compile the model (minutes of warm-up, faster steps)
    channels_last: bool = True  # NHWC convolutions: faster on GPUs, and ~2x here on CPU too
    steps_per_epoch: int | None = None  # cap each epoch (smoke runs); None = the whole split
    eval_batches: int | None = None  # cap evaluation (smoke runs); None = the whole test split
    resume: bool = False  # continue from OUT/last.pt up to `epochs`
    seed: int = 0
    log_every: int = 20  # steps between progress-bar/TensorBoard updates (each costs a sync)
    grid_rows: int = 8  # samples in the per-epoch picture grid
    profile: str = "off"  # off | cprofile (whole run) | torch (a few steps, TensorBoard trace)
    progress: bool = True  # a progress bar on a terminal
    world_size: int = 1  # filled in at run time from torchrun
    model_args: dict[str, Any] = field(default_factory=dict)  # filled in from the manifest

    def validate(self) -> None:
        """Raise ValueError for settings that can't work, before any work starts."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: use {', '.join(OPTIMIZERS)}")
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}: use {', '.join(PROFILES)}")
        for name in ("epochs", "batch_size", "step_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.workers < 0:
            raise ValueError("workers must be 0 or more")


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


def train(config: TrainConfig) -> dict[str, Any]:
    """Train from shards; returns the last epoch's metrics. Works alone or under torchrun."""
    config.validate()
    dist = setup_distributed(config.device)
    try:
        if config.profile == "cprofile":
            return _train_profiled(config, dist)
        return _train(config, dist)
    finally:
        cleanup_distributed()


def _train_profiled(config: TrainConfig, dist: DistInfo) -> dict[str, Any]:
    """Run under cProfile and write `OUT/profile-rankN.prof` (open with snakeviz or pstats)."""
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        return _train(config, dist)
    finally:
        profiler.disable()
        path = Path(config.out) / f"profile-rank{dist.rank}.prof"
        path.parent.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(path)
        log.info("cProfile dump written to %s", path)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Run:
    """The objects one training run carries from epoch to epoch."""

    model: UNet  # the bare network: evaluated and saved as is
    net: torch.nn.Module  # what trains: the model, wrapped in DDP and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp: str  # the resolved precision: off, bf16 or fp16
    steps: int  # training steps per epoch, the same on every rank
    has_test: bool
    writer: Any = None  # rank 0's TensorBoard SummaryWriter
    epoch: int = 0  # epochs completed
    start_epoch: int = 0  # epochs completed when this process started (after --resume)
    step: int = 0  # optimizer steps completed
    best_iou: float = -math.inf


def _train(config: TrainConfig, dist: DistInfo) -> dict[str, Any]:
    manifest = open_manifest(config.shards)
    config.world_size = dist.world_size
    config.model_args = {"image_channels": int(manifest.get("channels", 1))}
    _seed_everything(config.seed + dist.rank)
    run = _start_run(config, dist, manifest)
    metrics: dict[str, Any] = {}
    try:
        for epoch in range(run.start_epoch, config.epochs):
            metrics = _train_epoch(run, config, dist, epoch)
            barrier()  # rank 0 saves; the others wait so a crash can't leave them an epoch ahead
    finally:
        if run.writer is not None:
            run.writer.close()  # flush what was logged, also when an epoch failed
    return {"epochs": config.epochs, "step": run.step, "best_iou": run.best_iou, **metrics}


def _start_run(config: TrainConfig, dist: DistInfo, manifest: dict) -> Run:
    """Build the model, optimizer and schedule (or resume them), wrap for DDP, open TensorBoard."""
    device = dist.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 160x160 shapes: pick the fastest kernels once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = resolve_amp(config.amp, device)
    model = UNet(UNetConfig(**config.model_args)).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    steps = train_steps_per_epoch(manifest, config.batch_size, dist.world_size)
    run = Run(
        model=model,
        net=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma),
        scaler=torch.amp.GradScaler(device.type, enabled=amp == "fp16"),
        amp=amp,
        steps=min(steps, config.steps_per_epoch or steps),
        has_test=manifest["splits"].get("test", {}).get("samples", 0) > 0,
    )
    if config.resume:
        _resume(Path(config.out), run, config, device)
    run.start_epoch = run.epoch
    if dist.distributed:
        ids = [device.index] if device.type == "cuda" else None
        run.net = DistributedDataParallel(model, device_ids=ids)
    if config.compile:
        run.net = torch.compile(run.net)
    run.writer = _open_writer(Path(config.out), config, dist)
    if dist.is_main:
        if not run.has_test:
            log.warning("the test split is empty: best.pt follows the training IoU instead")
        log.info(
            "training %s on %s (amp %s, %d process%s): %d epochs x %d steps of %d samples",
            _count(model),
            device,
            amp,
            dist.world_size,
            "" if dist.world_size == 1 else "es",
            config.epochs,
            run.steps,
            config.batch_size,
        )
    return run


def loader_config(config: TrainConfig, device: torch.device) -> LoaderConfig:
    """The training loader's settings for a run (evaluation uses the same, unaugmented)."""
    return LoaderConfig(
        batch_size=config.batch_size,
        workers=config.workers,
        shuffle_buffer=config.shuffle_buffer,
        augment=AugmentConfig(hflip_p=config.hflip) if config.augment else _flip_only(config),
        pin_memory=device.type == "cuda",
        seed=config.seed,
    )


def _train_epoch(run: Run, config: TrainConfig, dist: DistInfo, epoch: int) -> dict[str, Any]:
    """Train one epoch, evaluate, log, and save the checkpoints (rank 0)."""
    start = time.perf_counter()
    device = dist.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loaders = loader_config(config, device)
    loader = make_train_loader(
        config.shards,
        loaders,
        epoch=epoch,
        rank=dist.rank,
        world_size=dist.world_size,
        steps=run.steps,
    )
    profiler = _torch_profiler(config, dist, run.steps, first=epoch == run.start_epoch)
    with profiler or contextlib.nullcontext():
        stats = train_one_epoch(
            run.net,
            loader,
            run.optimizer,
            run.scaler,
            device,
            run.amp,
            config,
            run.writer,
            run.step,
            epoch,
            config.channels_last,
            profiler,
        )
    run.step += stats.steps
    lr = run.optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
    run.scheduler.step()
    eval_start = time.perf_counter()
    try:
        metrics, grid = _evaluate_epoch(run, config, dist, replace(loaders, augment=None))
    except ValueError as exc:  # e.g. no test sample could be decoded: keep the epoch's work
        log.warning("evaluation failed, this epoch has no test metrics: %s", exc)
        metrics, grid = {}, None
    times = (time.perf_counter() - eval_start, time.perf_counter() - start)
    metrics = _epoch_report(run, dist, config, epoch, stats, metrics, grid, times, lr)
    run.epoch = epoch + 1
    if dist.is_main:
        score = metrics.get("iou", stats.iou)  # the training IoU when there are no test metrics
        improved = score > run.best_iou
        run.best_iou = max(run.best_iou, score)
        state = _checkpoint_state(run, config, metrics)
        save_checkpoint(state, Path(config.out) / "last.pt")
        if improved:
            save_checkpoint(state, Path(config.out) / "best.pt")
    return metrics


def _evaluate_epoch(run: Run, config: TrainConfig, dist: DistInfo, loaders: LoaderConfig):
    """Test metrics reduced across ranks and rank 0's grid; nothing without a test split."""
    if not run.has_test:
        return {}, None
    loader = make_eval_loader(
        config.shards, "test", loaders, rank=dist.rank, world_size=dist.world_size
    )
    return evaluate_model(
        run.model,
        loader,
        dist.device,
        run.amp,
        (config.mask_weight, config.depth_weight),
        grid_rows=config.grid_rows if dist.is_main else 0,
        max_batches=config.eval_batches,
        channels_last=config.channels_last,
    )


def _flip_only(config: TrainConfig) -> AugmentConfig | None:
    """With --no-augment, keep only the geometric flip (if asked for)."""
    if config.hflip <= 0:
        return None
    return AugmentConfig(
        brightness=0, contrast=0, saturation=0, hue=0, noise_p=0, hflip_p=config.hflip
    )


def _count(model: torch.nn.Module) -> str:
    return f"a UNet of {sum(p.numel() for p in model.parameters()):,} parameters"


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the published recipe) or AdamW."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


RESUME_MUST_MATCH = ("optimizer", "lr", "step_size", "gamma")  # else the restored state lies


def _resume(out: Path, run: Run, config: TrainConfig, device: torch.device) -> None:
    """Load OUT/last.pt into the run: weights, optimizer, schedule, scaler, epoch and step.

    Every rank reads the file, so under multi-node torchrun OUT must be on a shared disk.
    """
    path = out / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist (nothing to resume)")
    state = load_checkpoint(path, map_location=device)
    changed = [
        f"--{name.replace('_', '-')} {state['config'].get(name)} -> {getattr(config, name)}"
        for name in RESUME_MUST_MATCH
        if state["config"].get(name) != getattr(config, name)
    ]
    if changed:
        raise ValueError(
            f"--resume: {path} was trained with other settings ({', '.join(changed)}); "
            "resume with the same ones, or train into a new folder"
        )
    try:
        run.model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(
            f"--resume: {path} holds another network than these shards need ({exc})"
        ) from None
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(state["scaler"])
    run.epoch, run.step = int(state["epoch"]), int(state["step"])
    run.best_iou = float(state.get("best_iou", -math.inf))
    log.info("resuming %s after epoch %d (step %d)", path, run.epoch, run.step)


def _checkpoint_state(run: Run, config: TrainConfig, metrics: dict) -> dict[str, Any]:
    """The one checkpoint dict (nanoGPT style): everything --resume and evaluate need."""
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "epoch": run.epoch,  # epochs completed
        "step": run.step,
        "config": dataclasses.asdict(config),
        "metrics": metrics,
        "best_iou": run.best_iou,
    }


def _open_writer(out: Path, config: TrainConfig, dist: DistInfo):
    """Rank 0 alone writes TensorBoard events and the resolved config."""
    if not dist.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    return SummaryWriter(log_dir=str(out))


PROFILE_STEPS = (1, 1, 3)  # torch.profiler: steps to skip, to warm up, to record


def _torch_profiler(config: TrainConfig, dist: DistInfo, steps: int, first: bool):
    """A torch.profiler over a few steps of the first epoch, traced for TensorBoard's profiler."""
    if config.profile != "torch" or not first or not dist.is_main:
        return None
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
    return profile(
        activities=activities,
        schedule=schedule(
            wait=PROFILE_STEPS[0], warmup=PROFILE_STEPS[1], active=PROFILE_STEPS[2], repeat=1
        ),
        on_trace_ready=tensorboard_trace_handler(str(Path(config.out) / "profile")),
        record_shapes=True,
        profile_memory=True,
    )


def train_one_epoch(
    net: torch.nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp: str,
    config: TrainConfig,
    writer,
    step: int,
    epoch: int,
    channels_last: bool = False,
    profiler=None,
) -> EpochStats:
    """One pass over the loader; losses and IoU are summed on the device (no per-step sync)."""
    net.train()
    # loss, loss_mask, loss_depth, iou (each x samples), samples, skipped samples
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    bar = _progress(loader, config, writer is not None, epoch)
    stats = EpochStats()
    start = time.perf_counter()
    it = iter(loader)
    while True:
        wait = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        inputs, mask, depth = to_device(batch, device, channels_last=channels_last)
        stats.data_s += time.perf_counter() - wait
        with autocast(device, amp):
            mask_logits, depth_pred = net(inputs)
        loss, loss_mask, loss_depth = compute_loss(
            mask_logits.float(),
            depth_pred.float(),
            mask,
            depth,
            config.mask_weight,
            config.depth_weight,
        )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        n = inputs.shape[0]
        with torch.no_grad():
            iou = batch_iou(mask_logits.detach(), mask)
            values = torch.stack([loss.detach(), loss_mask.detach(), loss_depth.detach(), iou])
            sums[:4] += values.double() * n
            sums[4] += n  # Python numbers are kernel arguments: no host-to-device copy, no sync
            sums[5] += batch.get("skipped", 0)
        stats.steps += 1
        if profiler is not None:
            profiler.step()
        if stats.steps % config.log_every == 0:
            _log_progress(bar, writer, sums, step + stats.steps, optimizer)
        bar.update(1)
    if stats.steps % config.log_every:  # the epoch's last point, so short runs log too
        _log_progress(bar, writer, sums, step + stats.steps, optimizer)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.train_s = time.perf_counter() - start
    all_reduce_sum(sums)
    loss_sum, mask_sum, depth_sum, iou_sum, samples, skipped = sums.tolist()
    stats.skipped = int(skipped)
    samples = max(samples, 1.0)
    stats.samples = int(samples)
    stats.loss, stats.loss_mask = loss_sum / samples, mask_sum / samples
    stats.loss_depth, stats.iou = depth_sum / samples, iou_sum / samples
    return stats


def _progress(loader, config: TrainConfig, main: bool, epoch: int):
    from tqdm import tqdm

    return tqdm(
        total=len(loader),
        desc=f"epoch {epoch + 1}/{config.epochs}",
        unit="step",
        disable=not (main and config.progress) or None,
        leave=False,
        dynamic_ncols=True,
    )


def _log_progress(bar, writer, sums: torch.Tensor, step: int, optimizer) -> None:
    """Every `log_every` steps: one host sync to show running means and log them."""
    loss, loss_mask, loss_depth, iou, samples, _ = sums.tolist()
    samples = max(samples, 1.0)
    values = {
        "loss": loss / samples,
        "loss_mask": loss_mask / samples,
        "loss_depth": loss_depth / samples,
        "iou": iou / samples,
    }
    bar.set_postfix(loss=f"{values['loss']:.4f}", iou=f"{values['iou']:.3f}")
    if writer is not None:
        for name, value in values.items():
            writer.add_scalar(f"train/{name}", value, step)
        writer.add_scalar("lr", optimizer.param_groups[0]["lr"], step)


def _epoch_report(
    run: Run,
    dist: DistInfo,
    config: TrainConfig,
    epoch: int,
    stats: EpochStats,
    metrics: dict[str, Any],
    grid,
    times: tuple[float, float],
    lr: float,
) -> dict[str, Any]:
    """Log an epoch's scalars, timings and grid; print its one-line summary (rank 0)."""
    eval_s, total_s = times
    perf = {
        "samples_per_s": stats.samples / max(stats.train_s, 1e-9),
        "data_wait_fraction": stats.data_s / max(stats.train_s, 1e-9),
    }
    if dist.device.type == "cuda":
        perf["peak_memory_gib"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
    timing = {
        "train_step_s": stats.step_s,
        "data_wait_s": stats.data_s,
        "eval_s": eval_s,
        "other_s": max(total_s - stats.train_s - eval_s, 0.0),
    }
    if dist.is_main:
        _log_epoch_scalars(run, stats, metrics, grid, perf, timing)
        log.info("%s", _epoch_line(config, epoch, run.step, stats, metrics, perf, timing, lr))
    return {**metrics, "train_loss": stats.loss, "train_iou": stats.iou, **perf}


def _log_epoch_scalars(run: Run, stats: EpochStats, metrics, grid, perf, timing) -> None:
    """TensorBoard at the epoch's last step: reduced training means, test metrics, timings."""
    if run.writer is None:
        return
    scalars = {
        # The whole epoch over all ranks (train/* are rank 0's running means, every log_every).
        "train_epoch/loss": stats.loss,
        "train_epoch/loss_mask": stats.loss_mask,
        "train_epoch/loss_depth": stats.loss_depth,
        "train_epoch/iou": stats.iou,
        "data/skipped_samples": stats.skipped,
        **{f"perf/{k}": v for k, v in perf.items()},
        **{f"time/{k}": v for k, v in timing.items()},
        **{f"test/{k}": v for k, v in metrics.items() if isinstance(v, float)},
    }
    for name, value in scalars.items():
        run.writer.add_scalar(name, value, run.step)
    if grid is not None:
        run.writer.add_image("test/grid", grid, run.step, dataformats="HWC")
    run.writer.flush()


def _epoch_line(config, epoch, step, stats: EpochStats, metrics, perf, timing, lr) -> str:
    """The one summary line printed after each epoch."""
    test = (
        f"test loss {metrics['loss']:.4f} iou {metrics['iou']:.3f} "
        f"depth ssim {metrics['depth_ssim']:.3f} rmse {metrics['depth_rmse']:.4f}"
        if metrics
        else "no test metrics"
    )
    memory = f", peak {perf['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in perf else ""
    skipped = f", {stats.skipped} undecodable samples skipped" if stats.skipped else ""
    return (
        f"epoch {epoch + 1}/{config.epochs} step {step} lr {lr:.2g}: train loss {stats.loss:.4f} "
        f"iou {stats.iou:.3f} | {test} | {perf['samples_per_s']:.0f} samples/s | time: steps "
        f"{timing['train_step_s']:.1f}s, data wait {timing['data_wait_s']:.1f}s "
        f"({100 * perf['data_wait_fraction']:.0f}%), eval {timing['eval_s']:.1f}s, "
        f"other {timing['other_s']:.1f}s{memory}{skipped}"
    )
