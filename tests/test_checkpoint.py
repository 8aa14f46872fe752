"""Checkpoints as hostile input and as output onto a full disk: one-line errors naming the file."""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_guard import error_line

from model import UNet
from pipeline.cli import cli
from pipeline.deploy.weights import read_state_dict
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
    # best.pt goes first: last.pt, unwritten, still says the epoch is to be done
    assert f"{run / 'best.pt'}: could not write the checkpoint" in line
    assert not list(run.glob(".*.tmp")) and not (run / "last.pt").exists()


# ---------------------------------------------------------------- unreadable checkpoints


def unreadable_files(tiny_run: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """Files that are no checkpoint, and the reason each must be refused with."""
    good = (tiny_run / "best.pt").read_bytes()
    files = {
        "garbage": (b"not a checkpoint at all", "not written by torch.save"),
        "text": (b"hello\n", "not written by torch.save"),  # torch: KeyError(101)
        "truncated": (good[: len(good) // 2], "truncated or damaged"),
        "empty": (b"", "empty or cut short"),
    }
    out = {}
    for name, (data, why) in files.items():
        (tmp / f"{name}.pt").write_bytes(data)
        out[name] = (tmp / f"{name}.pt", why)
    torch.save(UNet.from_args({}), tmp / "pickled.pt")  # a whole pickled model
    out["pickled"] = (tmp / "pickled.pt", "pickled Python objects (model.unet.UNet)")
    out["deflated"] = (deflated(tiny_run / "best.pt", tmp / "deflated.pt"), "compressed entries")
    for name, zipped in (("claims", True), ("claims-legacy", False)):
        out[name] = (claims_more(tmp / f"{name}.pt", zipped), "claims more bytes than the file")
    torch.save({"model": RunsAShell(tmp / "ran"), "config": {}}, tmp / "shell.pt")
    out["shell"] = (tmp / "shell.pt", f"pickled Python objects ({os.system.__module__}.system)")
    return out


def claims_more(path: Path, zipped: bool) -> Path:
    """A torch.save file whose one storage claims 4 GB, the file holding 4 kB of it."""
    torch.save({"model": torch.zeros(1000)}, path, _use_new_zipfile_serialization=zipped)
    # the storage's persistent id: ("storage", FloatStorage, key, "cpu", 1000), 1000 as BININT2
    old = re.compile(rb"(X\x03\x00\x00\x00cpuq.)M\xe8\x03", re.DOTALL)

    def claim(found: re.Match) -> bytes:
        return found[1] + b"J" + (2**30).to_bytes(4, "little")  # BININT: 2**30 elements

    if not zipped:
        path.write_bytes(old.subn(claim, path.read_bytes())[0])
        return path
    with zipfile.ZipFile(path) as source:
        entries = {name: source.read(name) for name in source.namelist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, old.sub(claim, data) if name.endswith("data.pkl") else data)
    return path


class RunsAShell:
    """Pickled as a call of os.system (a module torch blocks): loading must never run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def deflated(good: Path, out: Path, extra: dict | None = None) -> Path:
    """`good` with `extra` config entries, its archive's entries deflated (torch loads that)."""
    state = torch.load(good, weights_only=True)
    state["config"].update(extra or {})
    torch.save(state, out.with_suffix(".stored"))
    with (
        zipfile.ZipFile(out.with_suffix(".stored")) as source,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive,
    ):
        for entry in source.infolist():
            archive.writestr(entry.filename, source.read(entry.filename))
    return out


def test_a_checkpoint_is_never_inflated_beyond_its_file(tiny_run: Path, tmp_path: Path):
    bomb = deflated(tiny_run / "best.pt", tmp_path / "bomb.pt", {"pad": torch.zeros(50_000_000)})
    with zipfile.ZipFile(bomb) as archive:  # 200 MB of zeros inside a few MB
        assert sum(e.file_size for e in archive.infolist()) > 40 * bomb.stat().st_size
    with pytest.raises(ValueError, match="compressed entries") as raised:
        load_checkpoint(bomb)
    assert str(raised.value).startswith(f"{bomb}: not a readable PyTorch checkpoint: ")
    with pytest.raises(ValueError, match="compressed entries"):
        read_state_dict(bomb)  # import-weights reads the same way


def test_unreadable_checkpoints_say_why_without_torch_advice(tiny_run: Path, tmp_path: Path):
    for path, why in unreadable_files(tiny_run, tmp_path).values():
        with pytest.raises(ValueError) as raised:
            load_checkpoint(path)
        message = str(raised.value)
        assert message.startswith(f"{path}: not a readable PyTorch checkpoint: "), message
        assert why in message, message
        assert "weights_only" not in message and "\n" not in message and len(message) < 300
    assert not (tmp_path / "ran").exists()


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
        "integer weights": (
            {"model": {k: v.long() for k, v in good["model"].items()}},
            "of another kind of number (inc.",
        ),
        "complex weights": (
            {"model": {k: v.to(torch.complex64) for k, v in good["model"].items()}},
            "of another kind of number (inc.",
        ),
        **odd_weights(good),
        "a NaN weight": (
            {"model": {**good["model"], "mask_head.pointwise.bias": torch.tensor([math.nan])}},
            "1 holding NaN or inf (mask_head.pointwise.bias)",
        ),
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


# ---------------------------------------------------------------- what --resume continues


def resume_cli(run: Path, shards: Path, *more):
    """`train --resume` of a copy of tiny_run with its settings, one epoch more."""
    return run_cli(
        "train", "--shards", shards, "--out", run, "--resume", "--epochs", "2", "--device",
        "cpu", "--workers", "0", "--batch-size", "8", "--steps-per-epoch", "2",
        "--eval-batches", "2", *more,
    )  # fmt: skip


def optimizer_with(state: dict, buffer=None, **group) -> dict:
    """`state`'s optimizer state with `group`'s settings, and its first momentum buffer
    replaced by `buffer` (a tensor, or a number to fill it with)."""
    saved = state["optimizer"]
    buffers = {k: dict(v) for k, v in saved["state"].items()}
    if buffer is not None:
        first = buffers[min(buffers)]
        was = first["momentum_buffer"]
        first["momentum_buffer"] = (
            buffer if torch.is_tensor(buffer) else torch.full_like(was, buffer)
        )
    groups = [{**g, **group} for g in saved["param_groups"]]
    return {"state": buffers, "param_groups": groups}


def test_a_damaged_last_pt_is_one_line_naming_it(tiny_run: Path, tiny_shards: Path, tmp_path):
    good = torch.load(tiny_run / "last.pt", weights_only=True)
    nan_model = {**good["model"], "mask_head.pointwise.bias": torch.tensor([math.nan])}
    cases = {
        "no optimizer": ({"optimizer": None}, "has no optimizer: not a run's checkpoint"),
        "no epoch": ({"epoch": None}, "has no epoch"),
        "a text epoch": ({"epoch": "one"}, "its epoch is a str, not int"),
        "a negative step": ({"step": -3}, "its step is -3, not 0 to 2**53"),
        # TensorBoard's steps are int64: the run would fail at its first logged step
        "a step beyond int64": ({"step": 2**63 + 5}, "its step is 9223372036854775813, not 0"),
        "a number scheduler": ({"scheduler": 5}, "its scheduler is an int, not dict"),
        "a text best": ({"best_iou": "x"}, "its best_iou is 'x', not a number"),
        "a huge best": ({"best_iou": 10**400}, "its best_iou is 1000"),
        "another optimizer's state": (
            {"optimizer": {"state": {}, "param_groups": []}},
            "its optimizer, schedule or scaler state does not fit this run (",
        ),
        **odd_weights(good),
        "a NaN weight": ({"model": nan_model}, "(1 holding NaN or inf (mask_head.pointwise.bias))"),
        # StepLR's load_state_dict sets each key as an attribute: this one replaced its step()
        "a scheduler key over its method": (
            {"scheduler": {**good["scheduler"], "step": 0}},
            "(its scheduler holds unknown keys (step))",
        ),
        "a schedule of another step size": (
            {"scheduler": {**good["scheduler"], "step_size": 1000}},
            "(its scheduler's step_size is 1000, not 2)",
        ),
        "a schedule of another epoch": (
            {"scheduler": {**good["scheduler"], "last_epoch": 7}},
            "(its scheduler's last_epoch is 7, its epoch 1)",
        ),
        "a NaN learning rate": (
            {"optimizer": optimizer_with(good, lr=math.nan)},
            "(its optimizer's lr is nan)",
        ),
        "an optimizer that maximizes": (
            {"optimizer": optimizer_with(good, maximize=True)},
            "(its optimizer's maximize is True, not False)",
        ),
        "a momentum buffer of another shape": (
            {"optimizer": optimizer_with(good, buffer=torch.zeros(3))},
            "(its optimizer's momentum_buffer is (3,), not (",
        ),
        "a NaN momentum buffer": (
            {"optimizer": optimizer_with(good, buffer=math.nan)},
            "(its optimizer's momentum_buffer holds NaN or inf)",
        ),
        "all its epochs done": ({"epoch": 10**12}, "nothing is left to train"),
    }
    for name, (change, words) in cases.items():
        run = tmp_path / name.replace(" ", "_")
        shutil.copytree(tiny_run, run)
        state = {k: v for k, v in {**good, **change}.items() if v is not None}
        torch.save(state, run / "last.pt")
        before = (run / "config.json").read_bytes()
        line = error_line(resume_cli(run, tiny_shards))
        assert line.startswith(f"error: --resume: {run / 'last.pt'}"), (name, line)
        assert words in line, (name, line)
        assert (run / "config.json").read_bytes() == before, name  # nothing written


def test_resume_refuses_settings_its_optimizer_state_would_override(
    tiny_run: Path, tiny_shards: Path, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for option, value, words in (
        ("--weight-decay", "0.5", "--weight-decay 1e-05 -> 0.5"),
        ("--momentum", "0.5", "--momentum 0.9 -> 0.5"),
    ):
        line = error_line(resume_cli(run, tiny_shards, option, value))
        assert "was trained with other settings" in line and words in line, line


def test_resume_warns_of_settings_that_change_its_course(
    tiny_run: Path, tiny_shards: Path, tmp_path, caplog
):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    result = resume_cli(run, tiny_shards, "--seed", "7")
    assert result.exit_code == 0, result.output
    assert "--seed 0 -> 7" in caplog.text and "not as it would have gone" in caplog.text
    assert load_checkpoint(run / "last.pt")["epoch"] == 2


def test_resume_warns_when_the_number_of_processes_changed(
    tiny_run: Path, tiny_shards: Path, tmp_path, caplog
):
    # A step is world_size batches: resuming 8 torchrun processes as 1 (or 1 as 8) changes
    # the samples a step and an epoch's steps, as --batch-size does.
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    state = load_checkpoint(run / "last.pt")
    state["config"]["world_size"] = 2
    torch.save(state, run / "last.pt")
    result = resume_cli(run, tiny_shards)
    assert result.exit_code == 0, result.output
    assert "processes 2 -> 1" in caplog.text and "not as it would have gone" in caplog.text


def test_a_failed_best_pt_is_written_again_on_resume(
    tiny_run: Path, tiny_shards: Path, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    state = torch.load(run / "last.pt", weights_only=True)
    torch.save({**state, "best_iou": -1.0}, run / "last.pt")  # epoch 2 will improve on it
    saving = checkpoint.save_checkpoint

    def full_for_best(state, path):
        if Path(path).name == "best.pt":
            raise OSError(f"{path}: could not write the checkpoint: No space left on device")
        return saving(state, path)

    monkeypatch.setattr("pipeline.train.run.save_checkpoint", full_for_best)
    assert "No space left" in error_line(resume_cli(run, tiny_shards))
    assert load_checkpoint(run / "last.pt")["epoch"] == 1  # epoch 2 is still to be done
    monkeypatch.setattr("pipeline.train.run.save_checkpoint", saving)
    assert resume_cli(run, tiny_shards).exit_code == 0
    assert load_checkpoint(run / "best.pt")["epoch"] == 2


def test_ctrl_c_exits_130_not_as_a_failure(tiny_shards: Path, tmp_path, monkeypatch) -> None:
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.train.run.train", interrupted)
    result = run_cli("train", "--shards", tiny_shards, "--out", tmp_path / "r", "--workers", "0")
    assert result.exit_code == 130 and "train interrupted" in result.output
    assert "Aborted" not in result.output


def test_a_legacy_checkpoint_ending_like_a_zip_still_loads(tiny_run: Path, tmp_path: Path):
    state = torch.load(tiny_run / "best.pt", weights_only=True)
    path = tmp_path / "legacy.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)  # torch before 1.6 wrote this
    path.write_bytes(path.read_bytes() + b"PK\x05\x06" + b"\xff" * 10)  # a stray zip trailer
    assert load_checkpoint(path)["epoch"] == state["epoch"]


def test_a_best_pt_written_after_last_pt_is_kept_unless_beaten(
    tiny_run: Path, tiny_shards: Path, tmp_path, caplog
):
    """The run stopped after best.pt of epoch 2 was written and before last.pt was: the resumed
    epoch 2 (not bit for bit the same on a GPU) must beat that best.pt, not last.pt's older
    best_iou, to replace it."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    state = torch.load(run / "last.pt", weights_only=True)
    torch.save({**state, "best_iou": -1.0}, run / "last.pt")  # epoch 2 improves on this one
    torch.save({**state, "epoch": 2, "best_iou": 0.9999}, run / "best.pt")  # and not on this
    os.utime(run / "best.pt", ns=(1, 1))  # older than last.pt, as a copy without mtimes leaves it
    before = (run / "best.pt").read_bytes()
    caplog.set_level("INFO")
    assert resume_cli(run, tiny_shards).exit_code == 0
    assert (run / "best.pt").read_bytes() == before
    assert "holds epoch 2, after last.pt's" in caplog.text
    assert load_checkpoint(run / "last.pt")["best_iou"] == 0.9999  # and it goes on from it


@pytest.mark.parametrize(
    "text, shown",
    [
        ("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
         "asynchronously reported\n", "CUDA error: an illegal memory access was encountered"),
        # torch.compile's BackendCompilerFailed: the compiler's own error is on the next line
        ("backend='inductor' raised:\nRuntimeError: shapes do not match\n\nSet TORCH_LOGS",
         "backend='inductor' raised: RuntimeError: shapes do not match"),
        ("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent "
         "call last):\n  File \"x.py\", line 1, in f\nRuntimeError: a bug\n",
         "Caught RuntimeError in DataLoader worker process 0. RuntimeError: a bug"),
    ],
)  # fmt: skip
def test_a_torch_error_is_the_line_that_says_what_went_wrong(text, shown):
    from pipeline.cli.common import torch_summary

    assert torch_summary(text) == shown


@pytest.mark.parametrize(
    "error, hinted",
    [(RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors "
                   "might be asynchronously reported\nFor debugging consider\n"), True),
     (ValueError("shards/manifest.json: no such file"), False)],
)  # fmt: skip
def test_a_torch_error_says_how_to_see_its_traceback(
    error, hinted, tiny_shards: Path, tmp_path, monkeypatch, caplog
):
    """torch's own errors (CUDA, compile, a bug) are not the user's input: the one line says
    that -v shows where it came from; bad input's line needs no such hint."""

    def failing(config):
        raise error

    monkeypatch.setattr("pipeline.train.run.train", failing)
    args = ["train", "--shards", tiny_shards, "--out", tmp_path / "r", "--workers", "0"]
    result = run_cli(*args)
    line = error_line(result)
    assert result.stderr.splitlines() == [line]  # torch's many lines: the first one only
    assert line.startswith(f"error: {str(error).splitlines()[0]}")
    assert ("`pipeline -v COMMAND …` shows its traceback" in line) is hinted
    caplog.set_level(logging.DEBUG, logger="pipeline")  # as -v sets it (once a process)
    assert "shows its traceback" not in error_line(run_cli(*args))
    assert "Traceback" in caplog.text and "in failing" in caplog.text


def test_resume_purges_what_the_interrupted_epoch_logged(
    tiny_run: Path, tiny_shards: Path, tmp_path
):
    """A run killed in epoch 2 logged train/* points past last.pt's step: the resumed run logs
    those steps again, and TensorBoard shows each step once, the resumed run's."""
    from test_train import read_scalars
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    killed = tmp_path / "killed"
    with SummaryWriter(log_dir=str(killed)) as writer:  # what the interrupted epoch 2 logged
        for step in (3, 4):
            writer.add_scalar("train/loss", 99.0, step)
    (event,) = killed.glob("events.out.tfevents.*")
    event.rename(run / "events.out.tfevents.1000000000.killed.1.0")  # older than the resumed
    assert resume_cli(run, tiny_shards).exit_code == 0
    steps = [(step, value) for step, value in read_scalars(run)["train/loss"]]
    assert [step for step, _ in steps] == [2, 4], steps  # each epoch's end, once
    assert 99.0 not in [value for _, value in steps]


@pytest.mark.parametrize("damage", ["empty", "missing"])
def test_a_lost_best_pt_is_written_again_on_resume(
    damage, tiny_run: Path, tiny_shards: Path, tmp_path, caplog
):
    """best.pt emptied (a disk's fault) or removed, older than last.pt whose best_iou no epoch
    can beat: the resumed run must not finish on a best.pt that cannot be read, or none."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    state = torch.load(run / "last.pt", weights_only=True)
    torch.save({**state, "best_iou": 1.0}, run / "last.pt")
    if damage == "empty":
        (run / "best.pt").write_bytes(b"")
        os.utime(run / "best.pt", ns=(0, 0))  # written before last.pt, as an improved epoch's
    else:
        (run / "best.pt").unlink()
    assert resume_cli(run, tiny_shards).exit_code == 0
    assert load_checkpoint(run / "best.pt")["epoch"] == 2
    assert f"--resume: {run / 'best.pt'} is " in caplog.text


def test_a_checkpoint_is_on_the_disk_before_and_after_its_rename(tmp_path, monkeypatch):
    """Without fsync a power cut after os.replace may leave last.pt empty: both the old
    checkpoint and the new one lost. The file is synced before the rename, its folder after."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))  # the path it syncs
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace",))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint({"model": {"w": torch.zeros(2)}, "config": {}}, tmp_path / "last.pt")
    assert events == [
        ("fsync", str(tmp_path / ".last.pt.tmp")),
        ("replace",),
        ("fsync", str(tmp_path)),
    ]


def test_resume_from_another_shard_folder_warns(
    tiny_run: Path, tiny_shards: Path, tmp_path, caplog
):
    """Other data (here a copy) changes the run's course: the resumed run says so."""
    run, other = tmp_path / "run", tmp_path / "other-shards"
    shutil.copytree(tiny_run, run)
    shutil.copytree(tiny_shards, other)
    assert resume_cli(run, other).exit_code == 0
    assert f"--shards {tiny_shards} -> {other}" in caplog.text


def test_resume_takes_a_schedule_saved_by_another_torch(
    tiny_run: Path, tiny_shards: Path, tmp_path
):
    """torch 2.2-2.6 (the Docker image's 2.6.0) saved StepLR's `verbose`, which 2.7 removed,
    and had no `_is_initial`: a key that replaces none of the scheduler's is no sign of damage."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    state = torch.load(run / "last.pt", weights_only=True)
    schedule = {k: v for k, v in state["scheduler"].items() if k != "_is_initial"}
    torch.save({**state, "scheduler": {**schedule, "verbose": False}}, run / "last.pt")
    result = resume_cli(run, tiny_shards)
    assert result.exit_code == 0, result.output
    assert load_checkpoint(run / "last.pt")["epoch"] == 2


def odd_weights(good: dict) -> dict:
    """Cases of a checkpoint's weights torch.load rebuilds without their numbers."""
    said = "1 not plain tensors holding their numbers (sparse, quantized or meta) (mask_head."
    bias = "mask_head.pointwise.bias"
    return {
        "a meta weight": ({"model": {**good["model"], bias: torch.empty(1, device="meta")}}, said),
        "a sparse weight": ({"model": {**good["model"], bias: torch.ones(1).to_sparse()}}, said),
    }
