"""Commands of the second stage, shards -> a trained network: train, evaluate.

Every option's default is TrainConfig's (or EvaluateConfig's); the choices are the ones
`pipeline.train.config` defines. torch is imported only when a command runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from pipeline.cli.common import (
    NON_NEGATIVE,
    POSITIVE,
    TORCH_EXPECTED,
    FiniteFloatRange,
    emit_json,
    json_flag,
    option_from,
    user_errors,
)
from pipeline.schema import SPLITS
from pipeline.train.config import (
    AMP_CHOICES,
    AUGMENT_ON,
    DEVICES,
    OPTIMIZERS,
    PROFILES,
    EvaluateConfig,
    TrainConfig,
)


def device_option(source=TrainConfig) -> click.Option:
    """`--device auto|cpu|cuda`."""
    return option_from(source, "device", "--device", type=click.Choice(DEVICES))


def amp_option(
    help_text: str = "Mixed precision; auto = bf16 on GPUs that support it and on CPUs with "
    "native bf16 (AVX512-BF16 or AMX), off elsewhere.",
    source=TrainConfig,
):
    """`--amp auto|off|bf16|fp16`."""
    return option_from(source, "amp", "--amp", type=click.Choice(AMP_CHOICES), help=help_text)


def augment_on_option(
    help_text: str = "Where the training augmentation runs: device = on the training device "
    "after the copy, workers = in the loader workers; auto = device on a GPU, workers on CPU.",
):
    """`--augment-on auto|device|workers`."""
    return option_from(
        TrainConfig, "augment_on", "--augment-on", type=click.Choice(AUGMENT_ON), help=help_text
    )


def shards_option(help_text: str = "Shard folder (or URL prefix) holding manifest.json."):
    """`--shards DIR`, required."""
    return click.option("--shards", required=True, help=help_text)


def _train_options(command):
    """TrainConfig's options, each with TrainConfig's default (applied bottom-up)."""
    T = TrainConfig
    options = [
        shards_option(),
        click.option(
            "--out",
            required=True,
            type=click.Path(file_okay=False, path_type=Path),
            help="Run folder: checkpoints, TensorBoard events, config.json.",
        ),
        option_from(T, "epochs", "--epochs", type=click.IntRange(1)),
        option_from(
            T,
            "batch_size",
            "--batch-size",
            type=click.IntRange(1),
            help="Samples per step, per process.",
        ),
        option_from(
            T,
            "optimizer",
            "--optimizer",
            type=click.Choice(OPTIMIZERS),
            help="sgd is the published recipe; adamw learns faster from few samples.",
        ),
        option_from(T, "lr", "--lr", type=NON_NEGATIVE, help="Learning rate."),
        option_from(T, "momentum", "--momentum", type=NON_NEGATIVE, help="SGD momentum."),
        option_from(T, "weight_decay", "--weight-decay", type=NON_NEGATIVE),
        option_from(
            T,
            "step_size",
            "--step-size",
            type=click.IntRange(1),
            help="StepLR: epochs between learning-rate drops.",
        ),
        option_from(T, "gamma", "--gamma", type=POSITIVE, help="StepLR factor."),
        option_from(
            T,
            "mask_weight",
            "--mask-weight",
            type=NON_NEGATIVE,
            help="Weight of BCE(mask) in the loss.",
        ),
        option_from(
            T,
            "depth_weight",
            "--depth-weight",
            type=NON_NEGATIVE,
            help="Weight of 1-SSIM(depth) in the loss.",
        ),
        option_from(
            T,
            "workers",
            "--workers",
            type=click.IntRange(0),
            help="Loader processes (decode + augment) per training process.",
        ),
        option_from(T, "shuffle_buffer", "--shuffle-buffer", type=click.IntRange(1)),
        option_from(
            T,
            "augment",
            "--augment/--no-augment",
            help="The published color jitter + Gaussian noise on the inputs.",
        ),
        option_from(
            T,
            "hflip",
            "--hflip",
            type=FiniteFloatRange(0, 1),
            help="Probability of flipping all four images of a sample together.",
        ),
        augment_on_option(),
        device_option(),
        amp_option(),
        option_from(T, "compile", "--compile", is_flag=True, help="torch.compile the model."),
        option_from(
            T,
            "channels_last",
            "--channels-last/--no-channels-last",
            help="NHWC memory format (faster convolutions on GPUs and here on CPU).",
        ),
        option_from(
            T,
            "steps_per_epoch",
            "--steps-per-epoch",
            type=click.IntRange(1),
            help="Cap each epoch at N steps (smoke runs).",
        ),
        option_from(
            T,
            "eval_batches",
            "--eval-batches",
            type=click.IntRange(1),
            help="Cap each evaluation at N batches (smoke runs).",
        ),
        option_from(
            T, "resume", "--resume", is_flag=True, help="Continue from OUT/last.pt up to --epochs."
        ),
        option_from(
            T,
            "overwrite",
            "--overwrite",
            is_flag=True,
            help="Train into a folder that holds an earlier run, removing that run's files.",
        ),
        option_from(
            T,
            "init",
            "--init",
            type=click.Path(dir_okay=False),
            show_default=False,
            help="Start a new run from this checkpoint's weights (e.g. from import-weights).",
        ),
        option_from(T, "seed", "--seed", type=int),
        option_from(
            T,
            "log_every",
            "--log-every",
            type=click.IntRange(1),
            help="Steps between progress/TensorBoard updates (each costs one device sync).",
        ),
        option_from(
            T,
            "profile",
            "--profile",
            type=click.Choice(PROFILES),
            help="cprofile: OUT/profile-rank0.prof; torch: OUT/profile/ trace.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command()
@_train_options
def train(**options) -> None:
    """Train the UNet from shards (the published recipe by default).

    Under `torchrun --nproc_per_node=N -m pipeline train …` it runs one process per GPU
    with DistributedDataParallel. After each epoch it evaluates on the test split and saves
    OUT/last.pt, and OUT/best.pt when the test IoU improves. Watch it with
    `tensorboard --logdir OUT`.
    """
    from pipeline.train.run import train as run_training

    options["out"] = str(options["out"])
    config = TrainConfig(**options)
    try:
        config.validate()
    except ValueError as exc:  # settings that can't work together: a usage error, exit 2
        raise click.UsageError(str(exc)) from None
    with user_errors(TORCH_EXPECTED):
        result = run_training(config)
    if int(os.environ.get("RANK", "0")) == 0:
        emit_json({k: v for k, v in result.items() if not isinstance(v, dict)})


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@shards_option()
@option_from(EvaluateConfig, "split", "--split", type=click.Choice(SPLITS))
@option_from(EvaluateConfig, "batch_size", "--batch-size", type=click.IntRange(1))
@option_from(EvaluateConfig, "workers", "--workers", type=click.IntRange(0))
@device_option(EvaluateConfig)
@amp_option(
    "Precision of the forward passes; auto as in train (bf16 where native), off = fp32.",
    source=EvaluateConfig,
)
@option_from(
    EvaluateConfig,
    "grid",
    "--grid",
    type=click.Path(dir_okay=False, path_type=Path),
    show_default=False,
    help="Save a picture of a few samples (bg, fg_bg, masks, depths) here.",
)
@json_flag("Print only the metrics, as JSON.")
def evaluate(as_json: bool, **options) -> None:
    """Measure a checkpoint on a split: mask IoU and Dice, depth RMSE, AbsRel, delta1, SSIM.

    `iou` and `dice` are means over images (an image where both masks are empty counts 1);
    `iou_pixel` and `dice_pixel` pool all pixels of the split. `iou_published` is the
    article's IoU: target > 0.75 against raw logits > 0.75, all pixels of the split pooled.
    """
    from pipeline.train.evaluate import evaluate_checkpoint

    with user_errors(TORCH_EXPECTED):
        metrics = evaluate_checkpoint(EvaluateConfig(**options))
    if as_json:
        emit_json(metrics)
        return
    for key, value in metrics.items():
        click.echo(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
