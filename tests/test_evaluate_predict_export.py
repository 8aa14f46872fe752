"""evaluate (JSON, grid), predict (PNGs on the real sample), export (ONNX), and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import cli

REAL = Path(__file__).parent / "fixtures" / "real-sample"
METRIC_KEYS = {
    "iou",
    "dice",
    "depth_rmse",
    "depth_abs_rel",
    "depth_delta1",
    "depth_ssim",
    "samples",
}


def run_cli(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_evaluate_json_is_the_only_stdout(tiny_run: Path, tiny_shards: Path, tmp_path) -> None:
    grid = tmp_path / "grid.png"
    result = CliRunner().invoke(
        cli,
        [
            "evaluate",
            str(tiny_run / "best.pt"),
            "--shards",
            str(tiny_shards),
            "--json",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--batch-size",
            "16",
            "--grid",
            str(grid),
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert METRIC_KEYS <= set(metrics)
    assert metrics["samples"] == 48  # the whole test split, each sample once
    for key in ("iou", "dice", "depth_delta1", "depth_ssim"):
        assert 0.0 <= metrics[key] <= 1.0
    picture = np.asarray(Image.open(grid))
    assert picture.ndim == 3 and picture.shape[2] == 3 and picture.shape[0] >= 160


def test_evaluate_amp_says_the_precision_it_used(tiny_run: Path, tiny_shards: Path) -> None:
    from pipeline.train.runtime import resolve_amp

    common = ["evaluate", tiny_run / "best.pt", "--shards", tiny_shards, "--json"]
    common += ["--device", "cpu", "--workers", "0"]
    plain = json.loads(run_cli(*common, "--amp", "off").stdout)
    assert plain["amp"] == "off"
    default = json.loads(run_cli(*common).stdout)
    assert default["amp"] == resolve_amp("auto", torch.device("cpu"))  # bf16 where native
    if default["amp"] == "off":
        assert default["iou"] == plain["iou"]  # the same fp32 passes


def test_evaluate_errors(tiny_run: Path, tiny_shards: Path, tmp_path: Path) -> None:
    missing = run_cli("evaluate", tmp_path / "nope.pt", "--shards", tiny_shards)
    assert missing.exit_code == 1 and "nope.pt" in missing.output
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    bad = run_cli("evaluate", garbage, "--shards", tiny_shards)
    assert bad.exit_code == 1 and "garbage.pt" in bad.output
    no_manifest = run_cli("evaluate", tiny_run / "best.pt", "--shards", tmp_path)
    assert no_manifest.exit_code == 1 and "manifest" in no_manifest.output


def test_predict_on_the_real_sample(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    result = run_cli(
        "predict",
        tiny_run / "best.pt",
        "--bg",
        REAL / "bg_img_51.jpg",
        "--fg-bg",
        REAL / "fg_bg_9_51_1_2.jpg",
        "--out",
        out,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    mask = Image.open(out / "fg_bg_9_51_1_2_mask.png")
    depth = Image.open(out / "fg_bg_9_51_1_2_depth.png")
    colour = Image.open(out / "fg_bg_9_51_1_2_depth_plasma.png")
    assert (mask.mode, mask.size) == ("L", (160, 160))
    assert (depth.mode, depth.size) == ("L", (80, 80))
    assert colour.mode == "RGB" and colour.size[0] == 80


def test_predict_resizes_and_reads_folders(tiny_run: Path, tmp_path: Path, caplog) -> None:
    bgs, fgs = tmp_path / "bg", tmp_path / "fg"
    bgs.mkdir()
    fgs.mkdir()
    for name in ("a.png", "b.jpg"):
        Image.open(REAL / "bg_img_51.jpg").resize((320, 240)).convert("RGB").save(bgs / name)
        Image.open(REAL / "fg_bg_9_51_1_2.jpg").resize((320, 240)).save(fgs / name)
    from pipeline.deploy.predict import predict

    with caplog.at_level("INFO"):
        written = predict(tiny_run / "best.pt", bgs, fgs, tmp_path / "out", device="cpu")
    assert {p.name for p in written} >= {"a_mask.png", "b_depth.png", "b_depth_plasma.png"}
    assert "resized to 160x160" in caplog.text
    assert Image.open(tmp_path / "out" / "a_mask.png").size == (160, 160)


def test_predict_errors_name_the_file(tiny_run: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 definitely not a jpeg")
    result = run_cli(
        "predict",
        tiny_run / "best.pt",
        "--bg",
        broken,
        "--fg-bg",
        REAL / "fg_bg_9_51_1_2.jpg",
        "--out",
        tmp_path / "o",
    )
    assert result.exit_code == 1 and "broken.jpg" in result.output
    result = run_cli(
        "predict",
        tiny_run / "best.pt",
        "--bg",
        tmp_path / "missing.jpg",
        "--fg-bg",
        REAL / "fg_bg_9_51_1_2.jpg",
        "--out",
        tmp_path / "o",
    )
    assert result.exit_code == 1 and "missing.jpg" in result.output


def test_export_onnx_matches_pytorch(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    result = run_cli("export", tiny_run / "best.pt", "--onnx", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["max_abs_diff"] < 1e-4
    graph = onnx.load(str(out)).graph
    assert [o.name for o in graph.output] == ["mask_logits", "depth"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [2, 160, 160]


def test_info_counts_the_published_parameters() -> None:
    result = run_cli("info", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["params"] == 513_206
    # The published figure (decoder run twice, thop's counting rules) is reproduced exactly.
    assert data["macs_decoder_twice_thop_rules"] == 892_294_400
    assert data["macs"] < data["macs_decoder_twice"]


def test_predict_refuses_folders_whose_outputs_would_collide(tiny_run: Path, tmp_path) -> None:
    bgs, fgs = tmp_path / "bg", tmp_path / "fg"
    bgs.mkdir()
    fgs.mkdir()
    for name in ("a.png", "a.jpg"):
        Image.open(REAL / "bg_img_51.jpg").save(bgs / name)
        Image.open(REAL / "fg_bg_9_51_1_2.jpg").save(fgs / name)
    result = run_cli(
        "predict", tiny_run / "best.pt", "--bg", bgs, "--fg-bg", fgs, "--out", tmp_path / "out"
    )
    assert result.exit_code == 1 and "share the name a" in result.output
    for folder in (bgs, fgs):  # names equal but for case: one file where names ignore case
        (folder / "a.jpg").rename(folder / "A.jpg")
    result = run_cli(
        "predict", tiny_run / "best.pt", "--bg", bgs, "--fg-bg", fgs, "--out", tmp_path / "out"
    )
    assert result.exit_code == 1 and "share the name A, a" in result.output
    assert not (tmp_path / "out").exists()


def test_export_without_the_extra_names_it(tiny_run: Path, tmp_path: Path, monkeypatch) -> None:
    from pipeline.deploy import export

    real = export.find_spec
    monkeypatch.setattr(export, "find_spec", lambda m: None if m == "onnx" else real(m))
    result = run_cli("export", tiny_run / "best.pt", "--onnx", tmp_path / "m.onnx")
    assert result.exit_code == 1
    assert "maskdepth-pipeline[export]" in result.output and "onnx" in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_a_loader_failure_is_one_line_and_keeps_its_traceback_with_v(
    tiny_run: Path, tiny_shards: Path, tmp_path: Path
) -> None:
    import shutil
    import subprocess
    import sys

    broken = tmp_path / "shards"
    shutil.copytree(tiny_shards, broken)
    for shard in (broken / "test").glob("*.tar"):
        shard.write_bytes(shard.read_bytes()[:700])  # a header, then the data ends
    args = ["evaluate", str(tiny_run / "best.pt"), "--shards", str(broken), "--workers", "1"]
    args += ["--device", "cpu"]

    def run(*extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "pipeline", *extra, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    quiet, verbose = run(), run("-v")
    assert quiet.returncode == verbose.returncode == 1
    lines = quiet.stderr.strip().splitlines()
    assert lines[-1].startswith("error: the loader failed: ") and "truncated tar" in lines[-1]
    assert "Traceback" not in quiet.stderr
    # With -v the worker's own traceback (where in the tar reader it failed) is kept.
    assert "Original Traceback" in verbose.stderr and "_read_exact" in verbose.stderr


def test_export_writes_only_a_checked_file_and_never_over_its_checkpoint(
    tiny_run: Path, tmp_path: Path, monkeypatch
) -> None:
    from pipeline.deploy import export

    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes((tiny_run / "best.pt").read_bytes())
    result = run_cli("export", checkpoint, "--onnx", checkpoint, "--no-check")
    assert result.exit_code == 1 and "is the checkpoint being exported" in result.output
    assert checkpoint.read_bytes() == (tiny_run / "best.pt").read_bytes()
    monkeypatch.setattr(export, "CHECK_TOLERANCE", -1.0)  # every export now "differs"
    out = tmp_path / "model.onnx"
    result = run_cli("export", checkpoint, "--onnx", out)
    assert result.exit_code == 1 and f"{out}: not written: onnxruntime's outputs" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # nor a temporary file


def test_export_reports_its_check_once(tiny_run: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level("INFO"):  # what a user sees: stdout and the log on stderr
        result = run_cli("export", tiny_run / "best.pt", "--onnx", tmp_path / "model.onnx")
    assert result.exit_code == 0, result.output
    shown = result.output + caplog.text
    assert shown.count("largest difference") == 1, shown


def test_a_run_folder_or_a_file_given_for_a_folder_is_named_as_such(
    tiny_run: Path, tiny_shards: Path
) -> None:
    from test_guard import error_line

    folder = run_cli("evaluate", tiny_run, "--shards", tiny_shards)
    assert error_line(folder) == (
        f"error: {tiny_run}: a folder, not a checkpoint file (give the checkpoint in it: "
        f"{tiny_run / 'best.pt'}, {tiny_run / 'last.pt'})"
    )
    manifest = tiny_shards / "manifest.json"
    a_file = run_cli("evaluate", tiny_run / "best.pt", "--shards", manifest)
    assert (
        error_line(a_file)
        == f"error: {manifest}: not a folder (give the one holding manifest.json)"
    )


def test_an_empty_split_and_a_batch_0_say_what_to_give(tiny_run: Path, tmp_path: Path) -> None:
    from conftest import build_zip

    z = build_zip(tmp_path / "batch1_images.zip", 4).path
    zero = run_cli("convert", z, "--out", tmp_path / "s", "--test-batches", "0")
    assert zero.exit_code == 2
    assert "bad batch '0' in '0': batches are numbered from 1" in zero.output
    backwards = run_cli("convert", z, "--out", tmp_path / "s", "--test-batches", "5-3")
    assert backwards.exit_code == 2 and "its end is before its start" in backwards.output
    assert run_cli("convert", z, "--out", tmp_path / "s", "--test-batches", "9").exit_code == 0
    empty = run_cli("evaluate", tiny_run / "best.pt", "--shards", tmp_path / "s")
    assert empty.exit_code == 1
    assert "the test split holds no samples (--split train holds some)" in empty.output


def test_export_never_replaces_another_checkpoint_and_names_a_bad_folder(
    tiny_run: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other" / "best.pt"  # another run's checkpoint
    other.parent.mkdir()
    other.write_bytes((tiny_run / "last.pt").read_bytes())
    result = run_cli("export", tiny_run / "best.pt", "--onnx", other, "--no-check")
    assert result.exit_code == 1 and "holds a PyTorch checkpoint or a zip" in result.output
    assert other.read_bytes() == (tiny_run / "last.pt").read_bytes()
    (tmp_path / "x").write_text("a file")
    result = run_cli("export", tiny_run / "best.pt", "--onnx", tmp_path / "x" / "m.onnx")
    assert result.exit_code == 1 and f"{tmp_path / 'x'} is not a folder" in result.output
    result = run_cli("export", tiny_run / "best.pt", "--onnx", tmp_path / "x" / "y" / "m.onnx")
    assert result.exit_code == 1 and f": {tmp_path / 'x'} is not a folder" in result.output
    onnx_file = tmp_path / "m.onnx"
    assert run_cli("export", tiny_run / "best.pt", "--onnx", onnx_file).exit_code == 0
    assert run_cli("export", tiny_run / "best.pt", "--onnx", onnx_file).exit_code == 0  # again


def test_export_never_reads_an_onnx_path_that_is_a_pipe(tmp_path: Path, monkeypatch) -> None:
    """Opening a FIFO (or /dev/tty) to look at its first bytes blocks until a writer comes:
    only a regular file is looked into. (Here the open is refused, so no test can hang.)"""
    import os

    from pipeline.deploy import export

    fifo = tmp_path / "m.onnx"
    os.mkfifo(fifo)

    def no_open(path, *args, **kwargs):
        raise AssertionError(f"opened {path}, which would block")

    monkeypatch.setattr(export, "open", no_open, raising=False)
    export._check_target(tmp_path / "best.pt", fifo)  # returns: the export then replaces it
