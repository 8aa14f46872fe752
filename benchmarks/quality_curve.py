"""How test IoU and depth SSIM grow with samples seen, for a training recipe, on synthetic data.

    python benchmarks/quality_curve.py --work /tmp/curve --train-samples 4000 --every 1000
    python benchmarks/quality_curve.py --work /tmp/curve --optimizer adamw --lr 3e-3 --batch-size 16

The default is the published recipe (SGD lr 0.01, momentum 0.9, batch 100). Its StepLR divides
the rate by 10 after 2 epochs of 360,000 samples; a curve over the first few thousand samples is
before that, so the script sets the step size out of reach instead of shrinking epochs with it.
Each "epoch" here is `--every` samples, followed by an evaluation on the test zip.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from pipeline.convert import ConvertConfig, convert_zips
from pipeline.synth import synth_zips
from pipeline.train import TrainConfig, train


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


def main() -> None:
    """Train with evaluations every `--every` samples and print the curve as a table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--train-samples", type=int, default=4000, help="samples seen in all")
    parser.add_argument("--every", type=int, default=1000, help="samples between evaluations")
    parser.add_argument("--test-samples", type=int, default=200)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    shards = make_shards(args.work, args.train_samples, args.test_samples)
    steps = max(1, args.every // args.batch_size)
    run = args.work / f"run-{args.optimizer}-lr{args.lr}-b{args.batch_size}"
    config = TrainConfig(
        shards=str(shards),
        out=str(run),
        optimizer=args.optimizer,
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=max(1, args.train_samples // (steps * args.batch_size)),
        steps_per_epoch=steps,
        step_size=10**6,
        device=args.device,
        amp=args.amp,
        workers=args.workers,
        progress=False,
    )
    start = time.time()
    train(config)
    rows = read_curve(run, args.batch_size, start)
    for row in rows:
        print(json.dumps(row), flush=True)
    print("| samples seen | test IoU | depth SSIM | depth RMSE | minutes |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['samples_seen']:,} | {r['test_iou']} | {r['depth_ssim']} | "
            f"{r['depth_rmse']} | {r['minutes']} |"
        )


if __name__ == "__main__":
    main()
