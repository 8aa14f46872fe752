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
from dataclasses import dataclass, field
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
    channels_last: bool = True  # NHWC convolutions on GPUs (ignored on CPU)
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


def _train(config: TrainConfig, dist: DistInfo) -> dict[str, Any]:
    manifest = open_manifest(config.shards)
    out = Path(config.out)
    device = dist.device
    amp = resolve_amp(config.amp, device)
    config.world_size = dist.world_size
    config.model_args = {"image_channels": int(manifest.get("channels", 1))}
    _seed_everything(config.seed + dist.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 160x160 shapes: pick the fastest kernels once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    model = UNet(UNetConfig(**config.model_args)).to(device)
    channels_last = config.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    start_epoch, step, best_iou = 0, 0, -math.inf
    if config.resume:
        start_epoch, step, best_iou = _resume(out, model, optimizer, scheduler, scaler, device)

    net: torch.nn.Module = model
    if dist.distributed:
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    if config.compile:
        net = torch.compile(net)

    writer = _open_writer(out, config, dist)
    steps = config.steps_per_epoch or train_steps_per_epoch(
        manifest, config.batch_size, dist.world_size
    )
    loader_config = LoaderConfig(
        batch_size=config.batch_size,
        workers=config.workers,
        shuffle_buffer=config.shuffle_buffer,
        augment=AugmentConfig(hflip_p=config.hflip) if config.augment else _flip_only(config),
        pin_memory=device.type == "cuda",
        seed=config.seed,
    )
    has_test = manifest["splits"].get("test", {}).get("samples", 0) > 0
    if not has_test and dist.is_main:
        log.warning("the test split is empty: best.pt follows the training IoU instead")
    if dist.is_main:
        log.info(
            "training %s on %s (amp %s, %d process%s): %d epochs x %d steps of %d samples",
            _count(model),
            device,
            amp,
            dist.world_size,
            "" if dist.world_size == 1 else "es",
            config.epochs,
            steps,
            config.batch_size,
        )

    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, config.epochs):
        epoch_start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        loader = make_train_loader(
            config.shards,
            loader_config,
            epoch=epoch,
            rank=dist.rank,
            world_size=dist.world_size,
            steps=steps,
        )
        profiler = _torch_profiler(config, out, dist, first=epoch == start_epoch)
        with profiler or contextlib.nullcontext():
            stats = train_one_epoch(
                net,
                loader,
                optimizer,
                scaler,
                device,
                amp,
                config,
                writer,
                step,
                epoch,
                channels_last,
                profiler,
            )
        step += stats.steps
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
        scheduler.step()
        eval_start = time.perf_counter()
        if has_test:
            eval_loader = make_eval_loader(
                config.shards,
                "test",
                dataclasses.replace(loader_config, augment=None),
                rank=dist.rank,
                world_size=dist.world_size,
            )
            metrics, grid = evaluate_model(
                model,
                eval_loader,
                device,
                amp,
                (config.mask_weight, config.depth_weight),
                grid_rows=config.grid_rows if dist.is_main else 0,
                max_batches=config.eval_batches,
                channels_last=channels_last,
            )
        else:
            metrics, grid = {"iou": stats.iou}, None
        eval_s = time.perf_counter() - eval_start
        total_s = time.perf_counter() - epoch_start
        metrics = _epoch_report(
            writer,
            dist,
            device,
            config,
            epoch,
            step,
            stats,
            metrics,
            grid,
            eval_s,
            total_s,
            lr=lr,
        )
        if dist.is_main:
            improved = metrics["iou"] > best_iou
            best_iou = max(best_iou, metrics["iou"])
            state = _checkpoint_state(
                model, optimizer, scheduler, scaler, config, epoch, step, metrics, best_iou
            )
            save_checkpoint(state, out / "last.pt")
            if improved:
                save_checkpoint(state, out / "best.pt")
        barrier()
    if writer is not None:
        writer.close()
    return {"epochs": config.epochs, "step": step, "best_iou": best_iou, **metrics}


def _flip_only(config: TrainConfig) -> AugmentConfig | None:
    """With --no-augment, keep only the geometric flip (if asked for)."""
    if config.hflip <= 0:
        return None
    return AugmentConfig(
        brightness=0, contrast=0, saturation=0, hue=0, noise_p=0, hflip_p=config.hflip
    )


def _count(model: torch.nn.Module) -> str:
    return f"a UNet of {sum(p.numel() for p in model.parameters()):,} parameters"


def _make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


def _resume(out: Path, model, optimizer, scheduler, scaler, device) -> tuple[int, int, float]:
    """Load OUT/last.pt into the run's objects; returns (epochs done, step, best IoU)."""
    path = out / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist (nothing to resume)")
    state = load_checkpoint(path, map_location=device)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    log.info("resuming %s after epoch %d (step %d)", path, state["epoch"], state["step"])
    return int(state["epoch"]), int(state["step"]), float(state.get("best_iou", -math.inf))


def _checkpoint_state(model, optimizer, scheduler, scaler, config, epoch, step, metrics, best_iou):
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "epoch": epoch + 1,  # epochs completed
        "step": step,
        "config": dataclasses.asdict(config),
        "metrics": metrics,
        "best_iou": best_iou,
    }


def _open_writer(out: Path, config: TrainConfig, dist: DistInfo):
    """Rank 0 alone writes TensorBoard events and the resolved config."""
    if not dist.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    return SummaryWriter(log_dir=str(out))


def _torch_profiler(config: TrainConfig, out: Path, dist: DistInfo, first: bool):
    """A torch.profiler over a few steps of the first epoch, traced for TensorBoard's profiler."""
    if config.profile != "torch" or not first or not dist.is_main:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    return profile(
        activities=activities,
        schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(out / "profile")),
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
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, mask, depth, iou, samples
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
            sums += torch.stack(
                [
                    loss.detach() * n,
                    loss_mask.detach() * n,
                    loss_depth.detach() * n,
                    iou * n,
                    torch.tensor(n, device=device, dtype=torch.float64),
                ]
            ).double()
        stats.steps += 1
        if profiler is not None:
            profiler.step()
        if stats.steps % config.log_every == 0:
            _log_progress(bar, writer, sums, step + stats.steps, optimizer)
        bar.update(1)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.train_s = time.perf_counter() - start
    stats.skipped = int(getattr(loader, "skipped", 0))
    all_reduce_sum(sums)
    loss_sum, mask_sum, depth_sum, iou_sum, samples = sums.tolist()
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
    loss, loss_mask, loss_depth, iou, samples = sums.tolist()
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
    writer,
    dist,
    device,
    config,
    epoch,
    step,
    stats: EpochStats,
    metrics,
    grid,
    eval_s: float,
    total_s: float,
    lr: float,
) -> dict[str, Any]:
    """Log an epoch's scalars, timings and grid; print its one-line summary (rank 0)."""
    samples_per_s = stats.samples / max(stats.train_s, 1e-9)
    data_wait = stats.data_s / max(stats.train_s, 1e-9)
    other_s = max(total_s - stats.train_s - eval_s, 0.0)
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if not dist.is_main:
        return metrics
    if writer is not None:
        scalars = {
            "train/loss": stats.loss,
            "train/loss_mask": stats.loss_mask,
            "train/loss_depth": stats.loss_depth,
            "train/iou": stats.iou,
            "lr": lr,
            "perf/samples_per_s": samples_per_s,
            "perf/data_wait_fraction": data_wait,
            "time/train_step_s": stats.step_s,
            "time/data_wait_s": stats.data_s,
            "time/eval_s": eval_s,
            "time/other_s": other_s,
            "data/skipped_samples": stats.skipped,
        }
        scalars.update({f"test/{k}": v for k, v in metrics.items() if isinstance(v, float)})
        if peak_gib is not None:
            scalars["perf/peak_memory_gib"] = peak_gib
        for name, value in scalars.items():
            writer.add_scalar(name, value, step)
        if grid is not None:
            writer.add_image("test/grid", grid, step, dataformats="HWC")
        writer.flush()
    test = (
        f"test loss {metrics['loss']:.4f} iou {metrics['iou']:.3f} "
        f"depth ssim {metrics['depth_ssim']:.3f} rmse {metrics['depth_rmse']:.4f}"
        if "loss" in metrics
        else "no test split"
    )
    memory = f", peak {peak_gib:.2f} GiB" if peak_gib is not None else ""
    log.info(
        "epoch %d/%d step %d: train loss %.4f iou %.3f | %s | %.0f samples/s | "
        "time: steps %.1fs, data wait %.1fs (%.0f%%), eval %.1fs, other %.1fs%s%s",
        epoch + 1,
        config.epochs,
        step,
        stats.loss,
        stats.iou,
        test,
        samples_per_s,
        stats.step_s,
        stats.data_s,
        100 * data_wait,
        eval_s,
        other_s,
        memory,
        f", {stats.skipped} undecodable samples skipped" if stats.skipped else "",
    )
    return {
        **metrics,
        "train_loss": stats.loss,
        "train_iou": stats.iou,
        "samples_per_s": samples_per_s,
        "data_wait_fraction": data_wait,
    }
