"""The streaming trainer: one process per GPU under torchrun, the published recipe by default.

`train(config)` sets up the run (or resumes it), then for each epoch: trains (`loop`), evaluates,
reports (`report`) and saves the checkpoints (`checkpoint`), rank 0 alone writing.
"""

from __future__ import annotations

import contextlib
import cProfile
import dataclasses
import logging
import math
import random
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from model import UNet
from pipeline.schema import split_samples
from pipeline.train.checkpoint import init_weights, save_checkpoint
from pipeline.train.config import TrainConfig
from pipeline.train.feed import Feed, check_feed_memory, open_feed
from pipeline.train.guard import LossWatch, check_weights, claim_run_folder
from pipeline.train.loop import EVAL_FAILURES, EpochStats, Stepper, evaluate, train_one_epoch
from pipeline.train.report import (
    StepLogger,
    epoch_line,
    epoch_perf,
    log_epoch_scalars,
    open_writer,
    torch_profiler,
)
from pipeline.train.resume import network_args, resume, saved_checkpoint
from pipeline.train.runtime import (
    DistInfo,
    all_reduce_min,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    failing_together,
    resolve_amp,
    setup_distributed,
)
from pipeline.train.sources import (
    open_manifest,
    train_steps_per_epoch,
    trainable_samples,
    warn_if_incomplete,
)

log = logging.getLogger(__name__)


def train(config: TrainConfig) -> dict[str, Any]:
    """Train from shards; returns the last epoch's metrics. Works alone or under torchrun."""
    config.validate()
    dist = setup_distributed(config.device)
    lock = None
    try:
        lock = claim_run_folder(Path(config.out), config.resume, config.overwrite, dist)
        if config.profile == "cprofile":
            return _train_profiled(config, dist)
        return _train(config, dist)
    finally:
        if lock is not None:
            lock.close()
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
    stepper: Stepper  # what trains (the model, maybe wrapped), its optimizer, scaler, precision
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps: int  # training steps per epoch, the same on every rank
    has_test: bool
    writer: Any = None  # rank 0's TensorBoard SummaryWriter
    epoch: int = 0  # epochs completed
    start_epoch: int = 0  # epochs completed when this process started (after --resume)
    step: int = 0  # optimizer steps completed
    best_iou: float = -math.inf
    # Whether an epoch of the run had test metrics (restored on resume): the same on every rank,
    # as the metrics are reduced across ranks (best_iou is rank 0's alone).
    evaluated: bool = False
    feed: Feed | None = None  # the loaders, started once for all epochs


def _train(config: TrainConfig, dist: DistInfo) -> dict[str, Any]:
    # Each rank reads its own manifest and checkpoint and checks its machine's /dev/shm: one
    # failing must stop all, not leave them waiting in the first collective.
    with failing_together(dist.device, (ValueError, OSError)):
        manifest = open_manifest(config.shards)
        if dist.is_main:
            warn_if_incomplete(config.shards, manifest)
        config.world_size = dist.world_size
        saved = saved_checkpoint(config)
        config.model_args = network_args(manifest, saved)
        _seed_everything(config.seed + dist.rank)
        check_feed_memory(config, dist, manifest)  # all local ranks' rings, before any starts
    run = _start_run(config, dist, manifest, saved)
    del saved  # its weights and optimizer state are in the run now: don't hold a second copy
    metrics: dict[str, Any] = {}
    try:
        with failing_together(dist.device, (ValueError, OSError)):  # e.g. this rank's shm
            run.feed = open_feed(
                config, dist, first_epoch=run.start_epoch, steps=run.steps, has_test=run.has_test
            )
        for epoch in range(run.start_epoch, config.epochs):
            metrics = _train_epoch(run, config, dist, epoch)
            run.evaluated = run.evaluated or "iou" in metrics
            barrier()  # rank 0 saves; the others wait so a crash can't leave them an epoch ahead
    finally:
        if run.feed is not None:
            run.feed.close()
        if run.writer is not None:
            run.writer.close()  # flush what was logged, also when an epoch failed
    if run.has_test and not run.evaluated:  # a failed run never looks finished
        raise ValueError(
            f"no epoch could be evaluated on the test split of {config.shards} (the warnings "
            f"say why): no best.pt was written; {Path(config.out) / 'last.pt'} holds the "
            "training: evaluate it once the test shards are readable"
        )
    return {"epochs": config.epochs, "step": run.step, "best_iou": run.best_iou, **metrics}


def _start_run(
    config: TrainConfig, dist: DistInfo, manifest: dict, saved: dict[str, Any] | None
) -> Run:
    """Build the model, optimizer and schedule (or resume them from `saved`, the checkpoint of
    --resume, or take --init's weights from it), wrap for DDP, open TensorBoard."""
    device = dist.device
    model, stepper = build_stepper(config, device, config.model_args)
    steps = _train_steps(config, dist, manifest)
    optimizer = stepper.optimizer
    run = Run(
        model=model,
        stepper=stepper,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma),
        steps=min(steps, config.steps_per_epoch or steps),
        has_test=split_samples(manifest, "test") > 0,
    )
    with failing_together(dist.device, (ValueError, OSError)):  # each rank reads its own copy
        if config.resume and saved is not None:
            resume(Path(config.out) / "last.pt", saved, run, config, dist.is_main)
        elif config.init and saved is not None:
            init_weights(model, saved, Path(config.init))
            if dist.is_main:
                log.info("starting from the weights of %s", config.init)
    run.start_epoch = run.epoch
    if dist.distributed:
        ids = [device.index] if device.type == "cuda" else None
        stepper.net = DistributedDataParallel(stepper.net, device_ids=ids)
    if config.compile:
        stepper.net = torch.compile(stepper.net)
    with failing_together(dist.device, (OSError, ValueError)):  # the run's first write
        resumed = run.step if config.resume else None  # TensorBoard drops what came after
        run.writer = open_writer(Path(config.out), config, resumed) if dist.is_main else None
    amp = stepper.amp
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


def _train_steps(config: TrainConfig, dist: DistInfo, manifest: dict) -> int:
    """Steps per epoch from what the train shards can hold, the fewest any rank found: every
    rank must run as many (DDP), and a rank whose copy of a shard is short counts fewer."""
    odd: list = []  # this rank's shard files of another size than the manifest says
    with failing_together(dist.device, (ValueError,)):  # e.g. this rank's files hold nothing
        try:
            samples = trainable_samples(config.shards, manifest, warn=dist.is_main, found=odd)
            steps = train_steps_per_epoch(manifest, config.batch_size, dist.world_size, samples)
        except ValueError:
            if not dist.is_main:
                trainable_samples(config.shards, manifest)  # the warnings naming its files
            raise
    if samples < dist.world_size * config.batch_size and dist.is_main:
        log.warning(
            "the train split's %d samples do not fill one step of %d x %d: each epoch is 1 step "
            "that repeats samples (give a --batch-size of at most %d)",
            samples,
            dist.world_size,
            config.batch_size,
            max(1, samples // dist.world_size),
        )
    if not dist.distributed:
        return steps
    # Each rank's odd files as a checksum (exact in float64): a rank whose files differ from
    # rank 0's (which named its own) names them too, also where its count did not drop.
    odds = torch.zeros(dist.world_size, dtype=torch.float64, device=dist.device)
    odds[dist.rank] = zlib.crc32(repr(odd).encode())
    odds = all_reduce_sum(odds).tolist()
    if odds[dist.rank] != odds[0]:  # its own named below, or none: rank 0's are the odd ones
        mine = ":" if odd else ": each is the size the manifest says (rank 0 named its own)"
        log.warning("rank %d: its train shard files differ from rank 0's%s", dist.rank, mine)
        trainable_samples(config.shards, manifest)  # the warnings naming them
    least, minus_most = all_reduce_min(torch.tensor([steps, -steps], device=dist.device)).tolist()
    if least != -minus_most and steps > least and dist.is_main:
        log.warning(
            "another rank's train shards hold fewer samples: %d steps per epoch, not %d",
            least,
            steps,
        )
    return int(least)


def build_stepper(
    config: TrainConfig, device: torch.device, model_args: dict
) -> tuple[UNet, Stepper]:
    """The network on its device and what trains it (also the set-up `bench train` measures)."""
    amp = resolve_amp(config.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 160x160 shapes: pick the fastest kernels once
        # TF32 for the fp32 work, unless --amp off asks for plain fp32 (to compare precisions).
        torch.backends.cuda.matmul.allow_tf32 = amp != "off"
        torch.backends.cudnn.allow_tf32 = amp != "off"
    model = UNet.from_args(model_args).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    stepper = Stepper(
        net=model,
        optimizer=make_optimizer(model, config),
        scaler=torch.amp.GradScaler(device.type, enabled=amp == "fp16"),
        device=device,
        amp=amp,
        channels_last=config.channels_last,
        weights=config.loss_weights,
    )
    return model, stepper


def _train_epoch(run: Run, config: TrainConfig, dist: DistInfo, epoch: int) -> dict[str, Any]:
    """Train one epoch, evaluate, log, and save the checkpoints (rank 0)."""
    start = time.perf_counter()
    device = dist.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loader = run.feed.batches.epoch(epoch)
    if run.feed.augment is not None:
        run.feed.augment.set_epoch(epoch)
    first = epoch == run.start_epoch
    profiler = None
    if config.profile == "torch" and first and dist.is_main:
        profiler = torch_profiler(Path(config.out), run.steps)
    logger = _step_logger(run, config, dist, epoch) if dist.is_main else None
    watch = LossWatch(device, config.log_every, run.step, epoch + 1)
    with profiler or contextlib.nullcontext():
        stats = train_one_epoch(run.stepper, loader, logger, profiler, run.feed.augment, watch)
    run.step += stats.steps
    check_weights(run.model, run.step, epoch + 1, dist)  # a NaN update never reaches a save
    lr = run.stepper.optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
    run.scheduler.step()
    eval_start = time.perf_counter()
    try:
        metrics, grid = _evaluate_epoch(run, config, dist)
    except EVAL_FAILURES as exc:  # e.g. no test sample could be decoded: keep the epoch's work
        log.warning("evaluation failed, this epoch has no test metrics: %s", exc)
        metrics, grid = {}, None
    times = (time.perf_counter() - eval_start, time.perf_counter() - start)
    label = f"{epoch + 1}/{config.epochs}"
    run.epoch = epoch + 1
    # A full disk (TensorBoard's writer, a checkpoint) on rank 0: all ranks stop.
    with failing_together(dist.device, (OSError, ValueError)):
        metrics = _epoch_report(run, dist, label, stats, metrics, grid, times, lr)
        if dist.is_main:
            improved = _improves_best(run, metrics, stats, label)
            state = _checkpoint_state(run, config, metrics)
            if improved:  # first: if it fails, last.pt still says it is to be done (best_iou)
                save_checkpoint(state, Path(config.out) / "best.pt")
            save_checkpoint(state, Path(config.out) / "last.pt")
    return metrics


def _improves_best(run: Run, metrics: dict, stats: EpochStats, label: str) -> bool:
    """Whether this epoch becomes best.pt, always on one metric: the test IoU when the run has a
    test split (an epoch without test metrics never does), else the training IoU."""
    score = metrics.get("iou") if run.has_test else stats.iou
    if score is None:
        log.warning("epoch %s has no test metrics: best.pt stays as it was", label)
        return False
    if score <= run.best_iou:
        return False
    run.best_iou = score
    return True


def _evaluate_epoch(run: Run, config: TrainConfig, dist: DistInfo):
    """Test metrics reduced across ranks and rank 0's grid; nothing without a test split."""
    if run.feed.evaluation is None:
        return {}, None
    return evaluate(
        run.model,
        run.feed.evaluation,
        dist.device,
        run.stepper.amp,
        config.loss_weights,
        grid_rows=config.grid_rows if dist.is_main else 0,
        max_batches=config.eval_batches,
        channels_last=config.channels_last,
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


def _checkpoint_state(run: Run, config: TrainConfig, metrics: dict) -> dict[str, Any]:
    """The one checkpoint dict (nanoGPT style): everything --resume and evaluate need."""
    return {
        "model": run.model.state_dict(),
        "optimizer": run.stepper.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.stepper.scaler.state_dict() if run.stepper.scaler.is_enabled() else None,
        "epoch": run.epoch,  # epochs completed
        "step": run.step,
        "config": dataclasses.asdict(config),
        "metrics": metrics,
        "best_iou": run.best_iou,
    }


def _step_logger(run: Run, config: TrainConfig, dist: DistInfo, epoch: int) -> StepLogger:
    return StepLogger(
        every=config.log_every,
        total=run.steps,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        writer=run.writer,
        start_step=run.step,
        optimizer=run.stepper.optimizer,
        show_bar=config.progress,
    )


def _epoch_report(
    run: Run, dist: DistInfo, epoch: str, stats: EpochStats, metrics, grid, times, lr: float
) -> dict[str, Any]:
    """Log an epoch's scalars, timings and grid; print its one-line summary (rank 0)."""
    perf, timing = epoch_perf(stats, dist.device, *times)
    if dist.is_main:
        log_epoch_scalars(run.writer, run.step, stats, metrics, grid, perf, timing)
        log.info("%s", epoch_line(epoch, run.step, lr, stats, metrics, perf, timing))
    return {**metrics, "train_loss": stats.loss, "train_iou": stats.iou, **perf}
