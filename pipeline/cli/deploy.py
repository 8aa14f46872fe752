"""Commands of the third stage, a trained network -> answers: predict, export, info, and
import-weights (the published network's weights as a checkpoint)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import TORCH_EXPECTED, emit_json, json_flag, user_errors
from pipeline.cli.train import device_option
from pipeline.schema import CHANNELS


@click.command()
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
@device_option()
def predict(checkpoint, bg, fg_bg, out, device) -> None:
    """Predict the mask and depth of your own (bg, fg_bg) pair(s).

    Images of any size are resized to 160x160 (a message says so) and converted to the
    model's mode (gray or RGB). Writes the mask as a 160x160 gray PNG, the depth as an
    80x80 gray PNG (brighter = farther) and the depth in the plasma colormap.
    """
    from pipeline.deploy.predict import predict as run_predict

    with user_errors(TORCH_EXPECTED):
        paths = run_predict(checkpoint, bg, fg_bg, out, device=device)
    for path in paths:
        click.echo(str(path))


@click.command()
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
@json_flag()
def export(checkpoint, onnx_path, check, as_json) -> None:
    """Export a checkpoint to ONNX: input (N, 2C, 160, 160), outputs mask_logits and depth.

    The input is float32 in [0, 1], fg_bg channels first, then bg (as `predict` feeds it);
    N is dynamic. With --check (the default) onnxruntime runs the file and the largest
    difference from PyTorch is reported. Needs the `export` extra (onnx, onnxruntime).
    """
    from pipeline.deploy.export import export_onnx

    with user_errors(TORCH_EXPECTED):
        result = export_onnx(checkpoint, onnx_path, check=check)
    if as_json:
        emit_json(result)
        return
    click.echo(f"wrote {result['onnx']} ({result['bytes']:,} bytes)")
    if "max_abs_diff" in result:
        click.echo(f"onnxruntime vs PyTorch: largest difference {result['max_abs_diff']:.2e}")


@click.command()
@click.option(
    "--channels",
    type=click.Choice([str(c) for c in CHANNELS.values()]),
    default=str(CHANNELS["L"]),
    show_default=True,
    help="Image channels: 1 for the grayscale published data, 3 for RGB.",
)
@json_flag("Print only the JSON.")
def info(channels: str, as_json: bool) -> None:
    """Show the network's parameter count and MACs (one 160x160 sample, PyTorch's flop counter)."""
    from pipeline.deploy.info import model_info

    data = model_info(int(channels))
    if as_json:
        emit_json(data)
        return
    for key, value in data.items():
        click.echo(f"{key}: {value:,}" if isinstance(value, int) else f"{key}: {value}")


@click.command("import-weights")
@click.argument("seed", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The pipeline checkpoint to write (CKPT.pt).",
)
@click.option(
    "--mode",
    type=click.Choice(list(CHANNELS)),
    default=None,
    help="The images the weights were trained on: L (gray) or RGB. Default: read from the file.",
)
@json_flag()
def import_weights(seed, out, mode, as_json) -> None:
    """Turn the published network's weights (SEED.pth) into a checkpoint of this tool.

    SEED.pth is what the published code saved with torch.save(model.state_dict(), ...)
    (`{epoch}_final.pth`), with or without DataParallel's `module.` prefix. It is read
    without running any code (a whole pickled model is refused); every entry is mapped onto
    this network and its shape checked. The checkpoint keeps the published depth output
    (per-image min-max) and works with evaluate, predict, export and train --init.
    """
    from pipeline.deploy.weights import import_weights as run_import

    with user_errors(TORCH_EXPECTED):
        result = run_import(seed, out, mode=mode)
    if as_json:
        emit_json(result)
        return
    click.echo(
        f"wrote {result['checkpoint']}: {result['entries']} entries, {result['mode']} images, "
        f"{result['params']:,} parameters, depth output {result['depth_output']}"
    )
