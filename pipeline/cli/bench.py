"""`pipeline bench …`: benchmarks of each stage (figures go to docs/BENCHMARKS.md)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import (
    NON_NEGATIVE,
    TORCH_EXPECTED,
    emit_json,
    json_flag,
    option_from,
    user_errors,
)
from pipeline.cli.train import amp_option, augment_on_option, device_option, shards_option
from pipeline.train.config import OPTIMIZERS, TrainConfig


@click.group()
def bench() -> None:
    """Benchmarks: convert, loader, train, quality (record the figures in docs/BENCHMARKS.md)."""


@bench.command("convert")
@click.argument("zips", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--work",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Scratch folder (default: a temporary folder, removed afterwards).",
)
@click.option(
    "--synth",
    "synth_samples",
    type=click.IntRange(1),
    default=None,
    help="No zips given: synthesize two zips of N samples each first.",
)
@json_flag("Print only the figures, as JSON.")
def bench_convert_cmd(zips, work, synth_samples, as_json) -> None:
    """Time convert of ZIP against `unzip -q` and against reading every member with zipfile.

    With a second ZIP it also times 2 workers on 2 zips against 1 worker.
    """
    from pipeline.bench.convert import run_bench_convert

    with user_errors():
        result = run_bench_convert(list(zips), work, synth_samples)
    emit_json(result, indent=None if as_json else 2)


@bench.command("loader")
@shards_option()
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1))
@option_from(TrainConfig, "batch_size", "--batch-size", type=click.IntRange(1))
@click.option("--batches", default=50, show_default=True, type=click.IntRange(2))
@option_from(TrainConfig, "augment", "--augment/--no-augment")
@augment_on_option(
    "Where the loader rows augment: auto = as the trainer on a GPU (device: not in the "
    "workers). Rows augmenting in the workers are measured too."
)
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(1))
@click.option("--old/--no-old", default=True, show_default=True, help="Also time the old way.")
@click.option(
    "--pin/--no-pin",
    default=True,
    show_default=True,
    help="Run the floors and the 1-worker rows on one CPU, the training process on the others "
    "(with 2 or more CPUs): a shared VM's vCPUs differ in speed, so the ratio then compares "
    "the loader with the floor, not one CPU with another.",
)
@json_flag("End with the figures as one JSON line.")
def bench_loader_cmd(
    shards, workers, batch_size, batches, augment, augment_on, rounds, old, pin, as_json
):
    """Samples/s of the training loader alone: against one thread decoding every field (the
    floor), with 1 and N workers, augmenting on the device or in the workers, and beside the old
    loose-file way."""
    from pipeline.bench.loader import bench_loader

    with user_errors(TORCH_EXPECTED):
        result = bench_loader(
            shards,
            workers=workers,
            batch_size=batch_size,
            batches=batches,
            augment=augment,
            augment_on=augment_on,
            rounds=rounds,
            old=old,
            pin=pin,
        )
        emit_json(result, indent=None if as_json else 2)


@bench.command("train")
@click.option("--shards", default=None, help="Also measure the whole path from these shards.")
@device_option()
@option_from(TrainConfig, "batch_size", "--batch-size", type=click.IntRange(1))
@amp_option()
@augment_on_option()
@option_from(TrainConfig, "augment", "--augment/--no-augment")
@option_from(TrainConfig, "compile", "--compile", is_flag=True, help="torch.compile the model.")
@option_from(TrainConfig, "channels_last", "--channels-last/--no-channels-last")
@option_from(TrainConfig, "workers", "--workers", type=click.IntRange(0))
@click.option("--steps", default=50, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(1))
@json_flag("Print only the figures, as JSON.")
def bench_train_cmd(shards, steps, warmup, as_json, **options) -> None:
    """Training samples/s: the model alone on synthetic tensors, and from shards (data wait too)."""
    from pipeline.bench.train import bench_train

    config = TrainConfig(shards=shards or "", **options)
    with user_errors(TORCH_EXPECTED):
        result = bench_train(config, steps=steps, warmup=warmup, shards=shards)
    emit_json(result, indent=None if as_json else 2)


@bench.command("quality")
@click.option(
    "--work",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the synthetic zips, shards and the run (reused by later calls).",
)
@click.option("--train-samples", default=4000, show_default=True, type=click.IntRange(1))
@click.option(
    "--every", default=1000, show_default=True, type=click.IntRange(1), help="Samples per point."
)
@click.option("--test-samples", default=200, show_default=True, type=click.IntRange(1))
@option_from(TrainConfig, "optimizer", "--optimizer", type=click.Choice(OPTIMIZERS))
@option_from(TrainConfig, "lr", "--lr", type=NON_NEGATIVE)
@option_from(TrainConfig, "batch_size", "--batch-size", type=click.IntRange(1))
@device_option()
@amp_option()
@click.option("--workers", default=1, show_default=True, type=click.IntRange(0))
@json_flag("Print only the rows, as JSON lines.")
def bench_quality_cmd(work, as_json, **options) -> None:
    """Test IoU and depth SSIM after every N samples seen, for a training recipe.

    The default is the published recipe (SGD lr 0.01, batch 100); its StepLR drop is set
    out of reach, since the curve covers far less than its 2 epochs.
    """
    from pipeline.bench.quality import curve_table, quality_curve

    with user_errors(TORCH_EXPECTED):
        rows = quality_curve(work, **options)
    for row in rows:
        emit_json(row)
    if not as_json:
        click.echo(curve_table(rows))
