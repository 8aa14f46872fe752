"""Checkpoints as hostile input and as output onto a full disk: one-line errors naming the file."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_guard import error_line

from model import UNet
from pipeline.cli import cli
from pipeline.train import checkpoint
from pipeline.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

REAL = Path(__file__).parent / "fixtures" / "real-sample"
ENFORCE = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def commands(path: Path, shards: Path, tmp: Path) -> dict[str, list]:
    """Each command that reads a checkpoint, pointed at `path`."""
    return {
        "predict": [
            "predict",
            path,
            "--bg",
            REAL / "bg_img_51.jpg",
            "--fg-bg",
            REAL / "fg_bg_9_51_1_2.jpg",
            "--out",
            tmp / "pred",
            "--device",
            "cpu",
        ],
        "evaluate": ["evaluate", path, "--shards", shards, "--device", "cpu", "--workers", "0"],
        "export": ["export", path, "--onnx", tmp / "m.onnx", "--no-check"],
    }


# ---------------------------------------------------------------- 9: a full disk


@pytest.mark.parametrize(
    "error, words",
    [
        (RuntimeError(ENFORCE), "unexpected pos 704 vs 598 ("),
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    ],
)
def test_a_full_disk_names_the_checkpoint_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch, error, words
) -> None:
    path = tmp_path / "last.pt"
    path.write_bytes(b"the previous epoch")

    def full_disk(state, file):
        Path(file).write_bytes(b"half a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as raised:
        save_checkpoint({"model": {}, "config": {}}, path)
    message = str(raised.value)
    assert message.startswith(f"{path}: could not write the checkpoint: ") and words in message
    assert "enforce fail" not in message and "\n" not in message
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no .last.pt.tmp
    assert path.read_bytes() == b"the previous epoch"


def test_train_on_a_full_disk_is_one_line(tiny_shards: Path, tmp_path: Path, monkeypatch):
    def full_disk(state, file):
        raise RuntimeError(ENFORCE)

    monkeypatch.setattr(torch, "save", full_disk)
    run = tmp_path / "run"
    result = run_cli(
        "train", "--shards", tiny_shards, "--out", run, "--device", "cpu", "--workers", "0",
        "--steps-per-epoch", "1", "--batch-size", "4", "--eval-batches", "1", "--epochs", "1",
    )  # fmt: skip
    line = error_line(result)
    assert f"{run / 'last.pt'}: could not write the checkpoint" in line
    assert not list(run.glob(".*.tmp"))


# ---------------------------------------------------------------- unreadable checkpoints


def unreadable_files(tiny_run: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """Files that are no checkpoint, and the reason each must be refused with."""
    good = (tiny_run / "best.pt").read_bytes()
    files = {
        "garbage": (b"not a checkpoint at all", "not written by torch.save"),
        "truncated": (good[: len(good) // 2], "truncated or damaged"),
        "empty": (b"", "empty or cut short"),
    }
    out = {}
    for name, (data, why) in files.items():
        (tmp / f"{name}.pt").write_bytes(data)
        out[name] = (tmp / f"{name}.pt", why)
    torch.save(UNet.from_args({}), tmp / "pickled.pt")  # a whole pickled model
    out["pickled"] = (tmp / "pickled.pt", "pickled Python objects (model.unet.UNet)")
    return out


def test_unreadable_checkpoints_say_why_without_torch_advice(tiny_run: Path, tmp_path: Path):
    for path, why in unreadable_files(tiny_run, tmp_path).values():
        with pytest.raises(ValueError) as raised:
            load_checkpoint(path)
        message = str(raised.value)
        assert message.startswith(f"{path}: not a readable PyTorch checkpoint: "), message
        assert why in message, message
        assert "weights_only" not in message and "\n" not in message and len(message) < 300


# ---------------------------------------------------------------- broken contents


def broken_states(tiny_run: Path) -> dict[str, tuple[dict, str]]:
    """A good checkpoint with one broken part each, and the words its error must hold."""
    good = torch.load(tiny_run / "best.pt", weights_only=True)
    model = dict(good["model"])
    model.pop(next(iter(model)))
    cases = {
        "config a list": ({"config": [1, 2]}, "its config is a list, not a dict"),
        "model_args a string": (
            {"config": {**good["config"], "model_args": "1"}},
            "model_args is a str, not a dict",
        ),
        "unknown key": (
            {"config": {**good["config"], "model_args": {"image_channels": 1, "width": 9}}},
            "unknown keys (width)",
        ),
        "wrong type": (
            {"config": {**good["config"], "model_args": {"image_channels": "3"}}},
            "image_channels is '3', not int",
        ),
        "absurd channels": (
            {"config": {**good["config"], "model_args": {"image_channels": 10**9}}},
            "image_channels is 1000000000, not one of 1, 3",
        ),
        "unknown depth output": (
            {"config": {**good["config"], "model_args": {"depth_output": "foo"}}},
            "depth_output is 'foo', not one of sigmoid, minmax",
        ),
        "model a list": ({"model": [1.0]}, "its model is a list, not a dict of weights"),
        "a weight missing": ({"model": model}, "weights do not fit the network it describes"),
    }
    return {name: ({**good, **change}, words) for name, (change, words) in cases.items()}


def test_broken_checkpoint_contents_are_clear_errors(tiny_run: Path, tmp_path: Path) -> None:
    for name, (state, words) in broken_states(tiny_run).items():
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        torch.save(state, path)
        with pytest.raises(ValueError, match=str(path)) as raised:
            model_from_checkpoint(load_checkpoint(path), "cpu", path)
        assert words in str(raised.value), (name, str(raised.value))


def test_every_command_refuses_bad_checkpoints_in_one_line(
    tiny_run: Path, tiny_shards: Path, tmp_path: Path
) -> None:
    bad = {name: path for name, (path, _) in unreadable_files(tiny_run, tmp_path).items()}
    for name, (state, _) in broken_states(tiny_run).items():
        bad[name] = tmp_path / f"{name.replace(' ', '_')}.pt"
        torch.save(state, bad[name])
    for name, path in bad.items():
        for command, args in commands(path, tiny_shards, tmp_path).items():
            line = error_line(run_cli(*args))
            assert line.startswith(f"error: {path}: "), (name, command, line)
            assert "weights_only" not in line


def test_evaluate_refuses_non_numeric_loss_weights(tiny_run, tiny_shards, tmp_path) -> None:
    state = torch.load(tiny_run / "best.pt", weights_only=True)
    state["config"]["mask_weight"] = "two"
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    line = error_line(run_cli(*commands(path, tiny_shards, tmp_path)["evaluate"]))
    assert f"{path}: its config's mask_weight is 'two', not a finite number" in line


def test_a_resumed_run_still_reads_its_own_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    state = load_checkpoint(run / "last.pt")  # the checks accept what train writes
    assert model_from_checkpoint(state, "cpu", run / "last.pt").config.image_channels == 1
    assert checkpoint.non_finite(state["model"]) == []
