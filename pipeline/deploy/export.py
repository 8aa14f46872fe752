"""Export a trained model to ONNX, and check the export with onnxruntime against PyTorch."""

from __future__ import annotations

import logging
import os
import warnings
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

from pipeline import DISTRIBUTION
from pipeline.schema import IMAGE_SIZE
from pipeline.train.checkpoint import load_checkpoint, model_from_checkpoint

log = logging.getLogger(__name__)

INPUT_NAME = "inputs"
OUTPUT_NAMES = ("mask_logits", "depth")
OPSET = 18


EXTRA_HINT = f"pip install '{DISTRIBUTION}[export]'"


def require_export_extra(check: bool) -> None:
    """ValueError naming the extra to install when onnx (or, to check, onnxruntime) is missing."""
    missing = [m for m in ("onnx", "onnxruntime")[: 2 if check else 1] if not find_spec(m)]
    if missing:
        raise ValueError(
            f"exporting needs {' and '.join(missing)}, which come with the export extra: "
            f"{EXTRA_HINT} (or `pip install -e '.[export]'` in a checkout)"
        )


def export_onnx(checkpoint: Path, onnx_path: Path, check: bool, batch: int = 4) -> dict:
    """Write `onnx_path` from a checkpoint: input (N, 2C, 160, 160) float32 in [0, 1], N dynamic.

    The file appears only once it is whole (and, with `check`, matches PyTorch): it is written
    under a temporary name beside it, then renamed.
    """
    require_export_extra(check)
    checkpoint, onnx_path = Path(checkpoint), Path(onnx_path)
    _check_target(checkpoint, onnx_path)
    model = model_from_checkpoint(load_checkpoint(checkpoint), "cpu", checkpoint)
    channels = 2 * model.config.image_channels
    width, height = IMAGE_SIZE
    example = torch.rand(batch, channels, height, width)
    try:
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next(p for p in onnx_path.parents if p.exists())  # the file in the way
        raise ValueError(f"--onnx {onnx_path}: {blocking} is not a folder") from None
    partial = onnx_path.with_name(f".{onnx_path.name}.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter is chatty about internals
            torch.onnx.export(
                model,
                (example,),
                str(partial),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
                opset_version=OPSET,
                dynamo=False,  # the TorchScript exporter: no onnxscript, dynamic batch by name
            )
        diff = check_onnx(model, partial, channels, name=onnx_path) if check else None
        os.replace(partial, onnx_path)
    finally:
        partial.unlink(missing_ok=True)
    result = {
        "onnx": str(onnx_path),
        "bytes": onnx_path.stat().st_size,
        "input": {"name": INPUT_NAME, "shape": ["N", channels, height, width]},
        "outputs": {
            "mask_logits": ["N", 1, height, width],
            "depth": ["N", 1, height // 2, width // 2],
        },
        "depth_output": model.config.depth_output,  # in the graph: sigmoid or per-image min-max
    }
    if diff is not None:
        result["max_abs_diff"] = diff
    return result


# The largest difference from PyTorch an export may show (typically below 1e-5: float32 sums in
# another order); above it, the graph computes something else.
CHECK_TOLERANCE = 1e-3


def _check_target(checkpoint: Path, onnx_path: Path) -> None:
    """ValueError when writing the ONNX file would replace the checkpoint, or any other
    PyTorch checkpoint (a zip or a pickle: `--onnx runs/r1/best.pt`); an ONNX file is replaced."""
    if onnx_path.exists() and onnx_path.resolve() == checkpoint.resolve():
        raise ValueError(
            f"--onnx {onnx_path} is the checkpoint being exported: give the ONNX file another path"
        )
    if onnx_path.is_dir():
        raise ValueError(f"--onnx {onnx_path} is a folder: give the path of the file to write")
    if not onnx_path.is_file():  # none there, or a pipe or device: a read could block
        return
    try:
        with open(onnx_path, "rb") as found:
            start = found.read(4)
    except OSError:
        return  # unreadable: the write says what is wrong
    if start.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or a pickle
        raise ValueError(
            f"--onnx {onnx_path} holds a PyTorch checkpoint or a zip, not an ONNX model: it "
            "is not replaced; give the ONNX file another path"
        )


def check_onnx(
    model: torch.nn.Module,
    onnx_path: Path,
    channels: int,
    batch: int = 3,
    name: Path | None = None,
) -> float:
    """Run the ONNX file with onnxruntime at another batch size; the largest difference from
    PyTorch, ValueError (naming the file as `name`, if given) above CHECK_TOLERANCE."""
    name = name or onnx_path
    import onnxruntime as ort  # present: require_export_extra checked

    width, height = IMAGE_SIZE
    inputs = torch.rand(batch, channels, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = [t.numpy() for t in model(inputs)]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: inputs.numpy()})
    for output, want, have in zip(OUTPUT_NAMES, expected, got, strict=True):
        if want.shape != have.shape:
            raise ValueError(f"{name}: output {output} has shape {have.shape}, want {want.shape}")
    diff = max(float(np.abs(w - h).max()) for w, h in zip(expected, got, strict=True))
    log.debug("onnxruntime vs PyTorch on %d samples: largest difference %.2e", batch, diff)
    if not diff <= CHECK_TOLERANCE:  # also NaN
        raise ValueError(
            f"{name}: not written: onnxruntime's outputs differ from PyTorch's by {diff:.3g} "
            f"(at most {CHECK_TOLERANCE:g} expected)"
        )
    return diff
