"""`pipeline bench quality`: how test IoU and depth SSIM grow with samples seen, on synthetic data.

    pipeline bench quality --work /tmp/curve --train-samples 4000 --every 1000
    pipeline bench quality --work /tmp/curve --optimizer adamw --lr 3e-3 --batch-size 16

The default is the published recipe (SGD lr 0.01, momentum 0.9, batch 100). Its StepLR divides
the rate by 10 after 2 epochs of 360,000 samples; a curve over the first few thousand samples is
before that, so the script sets the step size out of reach instead of shrinking epochs with it.
Each "epoch" here is `--every` samples, followed by an evaluation on the test zip.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline.store.runner import ConvertConfig, convert_zips
from pipeline.store.synth import synth_zips
from pipeline.train.config import TrainConfig
from pipeline.train.run import train


def make_shards(work: Path, train_samples: int, test_samples: int) -> Path:
    """Two train zips and one test zip of synthetic samples, converted once."""
    shards = work / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    half = max(1, train_samples // 2)
    zips = synth_zips(work / "zips", batches=[1, 2], samples=half, seed=0)
    zips += synth_zips(work / "zips", batches=[10], samples=test_samples, seed=1)
    summary = convert_zips(zips, ConvertConfig(out=shards, shard_samples=500, progress=False))
    if not summary.ok:
        raise SystemExit(f"convert failed: {summary.to_dict()}")
    return shards


def read_curve(run: Path, batch_size: int, t0: float) -> list[dict]:
    """The test metrics logged after each epoch, read back from TensorBoard's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Its directory watcher logs "No path found after ..." at INFO once it has read every file.
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    series = {tag: acc.Scalars(tag) for tag in ("test/iou", "test/depth_ssim", "test/depth_rmse")}
    return [
        {
            "samples_seen": iou.step * batch_size,
            "minutes": round((iou.wall_time - t0) / 60, 1),
            "test_iou": round(iou.value, 3),
            "depth_ssim": round(ssim.value, 3),
            "depth_rmse": round(rmse.value, 4),
        }
        for iou, ssim, rmse in zip(*series.values(), strict=True)
    ]


def quality_curve(
    work: Path,
    *,
    train_samples: int,
    every: int,
    test_samples: int,
    optimizer: str,
    lr: float,
    batch_size: int,
    device: str,
    amp: str,
    workers: int,
) -> list[dict]:
    """Train with an evaluation every `every` samples; the curve, one row per evaluation."""
    shards = make_shards(work, train_samples, test_samples)
    steps = max(1, every // batch_size)
    run = work / f"run-{optimizer}-lr{lr}-b{batch_size}-amp{amp}"
    config = TrainConfig(
        shards=str(shards),
        out=str(run),
        optimizer=optimizer,
        lr=lr,
        batch_size=batch_size,
        epochs=max(1, train_samples // (steps * batch_size)),
        steps_per_epoch=steps,
        step_size=10**6,
        device=device,
        amp=amp,
        workers=workers,
        progress=False,
        overwrite=True,  # a re-run replaces its run: the curve is read from its events alone
    )
    start = time.time()
    train(config)
    return read_curve(run, batch_size, start)


def curve_table(rows: list[dict]) -> str:
    """The curve as a Markdown table, for docs/BENCHMARKS.md."""
    lines = [
        "| samples seen | test IoU | depth SSIM | depth RMSE | minutes |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['samples_seen']:,} | {r['test_iou']} | {r['depth_ssim']} | "
        f"{r['depth_rmse']} | {r['minutes']} |"
        for r in rows
    ]
    return "\n".join(lines)
