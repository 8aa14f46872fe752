"""The `pipeline` command line: parses options and calls one library function per command.

Library code raises exceptions with clear messages; only this module turns them into messages and
exit codes. Heavy imports (torch) happen inside the commands that need them, so `--help` is quick.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import click

from pipeline import __version__
from pipeline.layout import parse_batches

log = logging.getLogger("pipeline")


class UserError(click.ClickException):
    """An error the user can act on: printed as `error: …`, exit code 1."""

    def show(self, file=None) -> None:  # noqa: D102 - click's hook
        click.echo(f"error: {self.message}", err=True)


# Bad input, missing or unreadable files, a zip that is not one, an external tool that failed.
EXPECTED = (ValueError, OSError, zipfile.BadZipFile, subprocess.CalledProcessError)
TORCH_EXPECTED = (*EXPECTED, RuntimeError)  # torch's own (CUDA out of memory, a bad checkpoint)


@contextlib.contextmanager
def user_errors(kinds: tuple[type[Exception], ...] = EXPECTED):
    """Turn the library's expected exceptions into `error: …` and exit 1 (traceback with -v)."""
    try:
        yield
    except kinds as exc:
        log.debug("traceback:", exc_info=True)
        raise UserError(str(exc)) from None


def _batches(_ctx, _param, value):
    if value is None:
        return None
    try:
        return parse_batches(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _finite(value):
    """NaN (a metric with nothing to average) becomes null: strict JSON has no NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _emit_json(data: dict, indent: int | None = None) -> None:
    click.echo(json.dumps(_finite(data), indent=indent, allow_nan=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pipeline")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def cli(verbose: bool) -> None:
    """Mask and depth from a background and a composite: zips -> shards -> a trained UNet.

    \b
    Typical use:
      pipeline synth data/                      # or use the published batch*_images.zip
      pipeline convert data/*.zip --out shards
      pipeline verify shards
      pipeline train --shards shards --out runs/r1
      pipeline evaluate runs/r1/best.pt --shards shards --grid grid.png
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(message)s" if verbose else "%(message)s",
        stream=sys.stderr,
    )


@cli.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--batches",
    default="1-3",
    show_default=True,
    callback=_batches,
    help="Batch numbers to write, e.g. 1-3,10: one batchN_images.zip each.",
)
@click.option(
    "--samples",
    default=200,
    show_default=True,
    type=click.IntRange(1),
    help="Samples per zip (the published zips hold 40,000).",
)
@click.option(
    "--mode",
    type=click.Choice(["L", "RGB"]),
    default="L",
    show_default=True,
    help="Image mode: L (grayscale, as published) or RGB.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed: same seed, same bytes.")
def synth(out: Path, batches: list[int], samples: int, mode: str, seed: int) -> None:
    """Write synthetic batchN_images.zip files in the published layout.

    The scenes are learnable: textured backgrounds, shapes pasted at random places (some
    flipped), their exact masks, and depth maps where the shape is nearer than the floor.
    """
    from pipeline.synth import synth_zips

    with user_errors():
        paths = synth_zips(out, batches=batches, samples=samples, mode=mode, seed=seed)
    for path in paths:
        click.echo(str(path))


@cli.command()
@click.argument("zips", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder: DIR/{train,test}/*.tar and DIR/manifest.json.",
)
@click.option(
    "--test-batches",
    default="10",
    show_default=True,
    callback=_batches,
    help="Batches that go to the test split; the rest go to train.",
)
@click.option(
    "--shard-samples",
    default=5000,
    show_default=True,
    type=click.IntRange(1),
    help="At most this many samples per shard.",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Zips converted in parallel processes.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Seed of the order samples are written in.",
)
@click.option("--strict", is_flag=True, help="Any skipped sample is fatal.")
@click.option("--force", is_flag=True, help="Redo every zip, even those already converted.")
@click.option("--json", "as_json", is_flag=True, help="Print only the summary, as JSON.")
def convert(zips, out, test_batches, shard_samples, workers, seed, strict, force, as_json) -> None:
    """Stream batch zips into WebDataset tar shards, with a manifest of hashes.

    Nothing is extracted: each member is read once from the zip and written, byte for byte,
    into a shard. Samples with a missing or broken member are skipped and reported (on
    stderr and in the manifest); --strict makes that fatal. Re-running redoes nothing that
    is already complete and correct.
    """
    from pipeline.convert import ConvertConfig, convert_zips

    config = ConvertConfig(
        out=out,
        test_batches=tuple(test_batches),
        shard_samples=shard_samples,
        workers=workers,
        seed=seed,
        strict=strict,
        force=force,
        progress=not as_json,
    )
    with user_errors():
        summary = convert_zips(list(zips), config)
    if as_json:
        _emit_json(summary.to_dict())
    else:
        click.echo(summary.summary_line(), err=True)
    if not summary.ok:
        sys.exit(1)


@cli.command()
@click.argument("shards", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--workers",
    default=2,
    show_default=True,
    type=click.IntRange(1),
    help="Shards checked in parallel processes.",
)
@click.option("--json", "as_json", is_flag=True, help="Print only the report, as JSON.")
def verify(shards: Path, workers: int, as_json: bool) -> None:
    """Prove a shard folder is intact and complete, or name what is wrong.

    Checks every shard's size and sha256 against the manifest, reads every sample, decodes
    every image and checks its size, and checks that keys are unique and counts match.
    Exit 0 only when everything holds.
    """
    from pipeline.verify import verify_shards

    with user_errors():
        report = verify_shards(shards, workers=workers, progress=not as_json)
    if as_json:
        _emit_json(report.to_dict())
    else:
        for line in report.problem_lines():
            click.echo(line, err=True)
        click.echo(report.summary_line(), err=True)
    if not report.ok:
        sys.exit(1)


@cli.command()
@click.option(
    "--channels",
    type=click.Choice(["1", "3"]),
    default="1",
    show_default=True,
    help="Image channels: 1 for the grayscale published data, 3 for RGB.",
)
@click.option("--json", "as_json", is_flag=True, help="Print only the JSON.")
def info(channels: str, as_json: bool) -> None:
    """Show the network's parameter count and MACs (one 160x160 sample, PyTorch's flop counter)."""
    from pipeline.info import model_info

    data = model_info(int(channels))
    if as_json:
        _emit_json(data)
        return
    for key, value in data.items():
        click.echo(f"{key}: {value:,}" if isinstance(value, int) else f"{key}: {value}")


@cli.command()
@click.option("--shards", required=True, help="Shard folder (or URL prefix) holding manifest.json.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder: checkpoints, TensorBoard events, config.json.",
)
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(1))
@click.option(
    "--batch-size",
    default=100,
    show_default=True,
    type=click.IntRange(1),
    help="Samples per step, per process.",
)
@click.option(
    "--optimizer",
    type=click.Choice(["sgd", "adamw"]),
    default="sgd",
    show_default=True,
    help="sgd is the published recipe; adamw learns faster from few samples.",
)
@click.option("--lr", default=0.01, show_default=True, type=float, help="Learning rate.")
@click.option("--momentum", default=0.9, show_default=True, type=float, help="SGD momentum.")
@click.option("--weight-decay", default=1e-5, show_default=True, type=float)
@click.option(
    "--step-size",
    default=2,
    show_default=True,
    type=click.IntRange(1),
    help="StepLR: epochs between learning-rate drops.",
)
@click.option("--gamma", default=0.1, show_default=True, type=float, help="StepLR factor.")
@click.option(
    "--mask-weight",
    default=2.0,
    show_default=True,
    type=float,
    help="Weight of BCE(mask) in the loss.",
)
@click.option(
    "--depth-weight",
    default=1.0,
    show_default=True,
    type=float,
    help="Weight of 1-SSIM(depth) in the loss.",
)
@click.option(
    "--workers",
    default=4,
    show_default=True,
    type=click.IntRange(0),
    help="Loader processes (decode + augment) per training process.",
)
@click.option("--shuffle-buffer", default=1000, show_default=True, type=click.IntRange(1))
@click.option(
    "--augment/--no-augment",
    default=True,
    show_default=True,
    help="The published color jitter + Gaussian noise on the inputs.",
)
@click.option(
    "--hflip",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Probability of flipping all four images of a sample together.",
)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option(
    "--amp",
    type=click.Choice(["auto", "off", "bf16", "fp16"]),
    default="auto",
    show_default=True,
    help="Mixed precision; auto = bf16 on GPUs that support it.",
)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option(
    "--channels-last/--no-channels-last",
    default=True,
    show_default=True,
    help="NHWC memory format (faster convolutions on GPUs and here on CPU).",
)
@click.option(
    "--steps-per-epoch",
    type=click.IntRange(1),
    default=None,
    help="Cap each epoch at N steps (smoke runs).",
)
@click.option(
    "--eval-batches",
    type=click.IntRange(1),
    default=None,
    help="Cap each evaluation at N batches (smoke runs).",
)
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt up to --epochs.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--log-every",
    default=20,
    show_default=True,
    type=click.IntRange(1),
    help="Steps between progress/TensorBoard updates (each costs one device sync).",
)
@click.option(
    "--profile",
    type=click.Choice(["off", "cprofile", "torch"]),
    default="off",
    show_default=True,
    help="cprofile: OUT/profile-rank0.prof; torch: OUT/profile/ trace.",
)
def train(**options) -> None:
    """Train the UNet from shards (the published recipe by default).

    Under `torchrun --nproc_per_node=N -m pipeline train …` it runs one process per GPU
    with DistributedDataParallel. After each epoch it evaluates on the test split and saves
    OUT/last.pt, and OUT/best.pt when the test IoU improves. Watch it with
    `tensorboard --logdir OUT`.
    """
    from pipeline.train import TrainConfig
    from pipeline.train import train as run_training

    options["compile"] = options.pop("compile_")
    options["out"] = str(options["out"])
    config = TrainConfig(**options)
    with user_errors(TORCH_EXPECTED):
        result = run_training(config)
    if int(os.environ.get("RANK", "0")) == 0:
        _emit_json({k: v for k, v in result.items() if not isinstance(v, dict)})


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--shards", required=True, help="Shard folder (or URL prefix) holding manifest.json.")
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)
@click.option("--batch-size", default=100, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0))
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option(
    "--grid",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Save a picture of a few samples (bg, fg_bg, masks, depths) here.",
)
@click.option("--json", "as_json", is_flag=True, help="Print only the metrics, as JSON.")
def evaluate(checkpoint, shards, split, batch_size, workers, device, grid, as_json) -> None:
    """Measure a checkpoint on a split: mask IoU and Dice, depth RMSE, AbsRel, delta1, SSIM.

    `iou` and `dice` are means over images (an image where both masks are empty counts 1);
    `iou_pixel` and `dice_pixel` pool all pixels of the split.
    """
    from pipeline.evaluate import evaluate_checkpoint

    with user_errors(TORCH_EXPECTED):
        metrics = evaluate_checkpoint(
            checkpoint,
            shards,
            split=split,
            batch_size=batch_size,
            workers=workers,
            device=device,
            grid=grid,
        )
    if as_json:
        _emit_json(metrics)
        return
    for key, value in metrics.items():
        click.echo(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--bg",
    required=True,
    type=click.Path(path_type=Path),
    help="Background image, or a folder of them.",
)
@click.option(
    "--fg-bg",
    "fg_bg",
    required=True,
    type=click.Path(path_type=Path),
    help="The same background with a person in it, or a folder (matched by file name).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for NAME_mask.png, NAME_depth.png and NAME_depth_plasma.png.",
)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
def predict(checkpoint, bg, fg_bg, out, device) -> None:
    """Predict the mask and depth of your own (bg, fg_bg) pair(s).

    Images of any size are resized to 160x160 (a message says so) and converted to the
    model's mode (gray or RGB). Writes the mask as a 160x160 gray PNG, the depth as an
    80x80 gray PNG (brighter = farther) and the depth in the plasma colormap.
    """
    from pipeline.predict import predict as run_predict

    with user_errors(TORCH_EXPECTED):
        paths = run_predict(checkpoint, bg, fg_bg, out, device=device)
    for path in paths:
        click.echo(str(path))


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--onnx",
    "onnx_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The ONNX file to write.",
)
@click.option(
    "--check/--no-check",
    default=True,
    show_default=True,
    help="Compare onnxruntime's outputs with PyTorch's.",
)
@click.option("--json", "as_json", is_flag=True, help="Print only the result, as JSON.")
def export(checkpoint, onnx_path, check, as_json) -> None:
    """Export a checkpoint to ONNX: input (N, 2C, 160, 160), outputs mask_logits and depth.

    The input is float32 in [0, 1], fg_bg channels first, then bg (as `predict` feeds it);
    N is dynamic. With --check (the default) onnxruntime runs the file and the largest
    difference from PyTorch is reported.
    """
    from pipeline.export import export_onnx

    with user_errors(TORCH_EXPECTED):
        result = export_onnx(checkpoint, onnx_path, check=check)
    if as_json:
        _emit_json(result)
        return
    click.echo(f"wrote {result['onnx']} ({result['bytes']:,} bytes)")
    if "max_abs_diff" in result:
        click.echo(f"onnxruntime vs PyTorch: largest difference {result['max_abs_diff']:.2e}")


@cli.group()
def bench() -> None:
    """Benchmarks: convert, loader, train (record the figures in docs/BENCHMARKS.md)."""


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
@click.option("--json", "as_json", is_flag=True, help="Print only the figures, as JSON.")
def bench_convert_cmd(zips, work, synth_samples, as_json) -> None:
    """Time convert of ZIP against `unzip -q` and against reading every member with zipfile.

    With a second ZIP it also times 2 workers on 2 zips against 1 worker.
    """
    from pipeline.bench.convert import run_bench_convert

    with user_errors():
        result = run_bench_convert(list(zips), work, synth_samples)
    _emit_json(result, indent=None if as_json else 2)


@bench.command("loader")
@click.option("--shards", required=True, help="Shard folder (or URL prefix) holding manifest.json.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0))
@click.option("--batch-size", default=100, show_default=True, type=click.IntRange(1))
@click.option("--batches", default=50, show_default=True, type=click.IntRange(2))
@click.option("--augment/--no-augment", default=True, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="End with the figures as one JSON line.")
def bench_loader_cmd(shards, workers, batch_size, batches, augment, as_json) -> None:
    """Samples/s of the training loader alone, side by side with the old loose-file way."""
    from pipeline.bench.loader import bench_loader

    with user_errors(TORCH_EXPECTED):
        result = bench_loader(
            shards, workers=workers, batch_size=batch_size, batches=batches, augment=augment
        )
        _emit_json(result, indent=None if as_json else 2)


@bench.command("train")
@click.option("--shards", default=None, help="Also measure the whole path from these shards.")
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option("--batch-size", default=100, show_default=True, type=click.IntRange(1))
@click.option(
    "--amp", type=click.Choice(["auto", "off", "bf16", "fp16"]), default="auto", show_default=True
)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True)
@click.option("--workers", default=4, show_default=True, type=click.IntRange(0))
@click.option("--steps", default=50, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="Print only the figures, as JSON.")
def bench_train_cmd(
    shards, device, batch_size, amp, compile_, channels_last, workers, steps, warmup, as_json
) -> None:
    """Training samples/s: the model alone on synthetic tensors, and from shards (data wait too)."""
    from pipeline.bench.train import bench_train
    from pipeline.train import TrainConfig

    config = TrainConfig(
        shards=shards or "",
        device=device,
        batch_size=batch_size,
        amp=amp,
        compile=compile_,
        channels_last=channels_last,
        workers=workers,
    )
    with user_errors(TORCH_EXPECTED):
        result = bench_train(config, steps=steps, warmup=warmup, shards=shards)
    _emit_json(result, indent=None if as_json else 2)


def main() -> None:
    """Entry point of the `pipeline` console script."""
    cli(prog_name="pipeline")


if __name__ == "__main__":
    main()
