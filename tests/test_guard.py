"""What keeps a run from harm: the run-folder check, non-finite settings and losses, NaN weights
never saved, best.pt on one metric, and an evaluation failure on one of two ranks."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import smoke_config

from pipeline.cli import cli
from pipeline.train import loop
from pipeline.train.checkpoint import load_checkpoint, non_finite, save_checkpoint
from pipeline.train.config import TrainConfig
from pipeline.train.guard import NonFiniteError, RunLock
from pipeline.train.run import train


def train_cli(*args):
    return CliRunner().invoke(cli, ["train", *map(str, args)])


def error_line(result, code: int = 1) -> str:
    """The one `error: ` line a failed command printed on stderr (and no traceback)."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------- 7: an earlier run in --out


def test_train_refuses_a_folder_that_holds_a_run(tiny_run: Path, tiny_shards: Path, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = snapshot(run)
    result = train_cli("--shards", tiny_shards, "--out", run, "--device", "cpu", "--workers", "0")
    line = error_line(result)
    assert str(run) in line and "already holds a run" in line
    assert "--resume" in line and "--overwrite" in line and "new folder" in line
    assert snapshot(run) == before  # nothing replaced, nothing added
    # A run that died before its first checkpoint (config.json and events only) counts too.
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="config.json"):
        train(smoke_config(tiny_shards, started))
    assert [p.name for p in started.iterdir()] == ["config.json"]


def test_overwrite_replaces_the_earlier_run(tiny_run: Path, tiny_shards: Path, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "notes.txt").write_text("mine")
    train(smoke_config(tiny_shards, run, overwrite=True))
    assert load_checkpoint(run / "last.pt")["step"] == 1  # the earlier run had 2 steps
    assert load_checkpoint(run / "best.pt")["step"] == 1
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # the earlier curves are gone
    assert (run / "notes.txt").read_text() == "mine"  # only a run's own files are removed


def test_a_folder_another_run_is_writing_is_refused(tiny_run: Path, tiny_shards: Path, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / ".last.pt.tmp").write_bytes(b"a save a killed run never finished")
    holder = RunLock(run)  # the run still writing it (another open file: flock conflicts)
    try:
        before = snapshot(run)
        for flag in ("--overwrite", "--resume"):
            args = ["--shards", tiny_shards, "--out", run, "--device", "cpu", "--workers", "0"]
            line = error_line(train_cli(*args, flag, "--epochs", "3"))
            assert str(run) in line and "being written by another training run" in line
            assert f"(process {os.getpid()})" in line
            assert snapshot(run) == before  # --overwrite removed nothing of the running run
    finally:
        holder.close()
    train(smoke_config(tiny_shards, run, overwrite=True))  # let go: the folder is free again
    assert not (run / ".last.pt.tmp").exists()  # the leftover went with the earlier run
    assert load_checkpoint(run / "last.pt")["step"] == 1


def _started_then_sleep(started) -> None:
    started.set()
    time.sleep(60)


def test_the_run_lock_ends_with_the_run_not_with_its_forked_workers(tmp_path: Path) -> None:
    lock = RunLock(tmp_path / "run")
    fork = multiprocessing.get_context("fork")
    started = fork.Event()
    worker = fork.Process(target=_started_then_sleep, args=(started,))
    worker.start()  # as a loader worker is: forked while the lock is held
    try:
        assert started.wait(30)  # past the fork's own set-up in the child
        lock.close()
        RunLock(tmp_path / "run").close()  # free at once, the worker still alive
        assert worker.is_alive()
    finally:
        worker.kill()
        worker.join()


def test_resume_and_overwrite_together_are_a_usage_error(tiny_shards: Path, tmp_path) -> None:
    result = train_cli("--shards", tiny_shards, "--out", tmp_path / "r", "--resume", "--overwrite")
    assert result.exit_code == 2 and "exclude each other" in result.stderr
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- 8: NaN and inf


@pytest.mark.parametrize(
    "option, value",
    [("--lr", "nan"), ("--mask-weight", "inf"), ("--depth-weight", "-inf"), ("--hflip", "nan")],
)
def test_non_finite_settings_are_usage_errors(tiny_shards, tmp_path, option, value) -> None:
    result = train_cli("--shards", tiny_shards, "--out", tmp_path / "r", option, value)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_the_library_refuses_non_finite_settings(tiny_shards: Path, tmp_path: Path) -> None:
    for name in ("lr", "momentum", "mask_weight", "depth_weight", "gamma", "hflip"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            train(smoke_config(tiny_shards, tmp_path / "r", **{name: float("nan")}))
    with pytest.raises(ValueError, match="weight_decay"):
        TrainConfig(weight_decay=float("inf")).validate()
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "option, value",
    [
        ("--lr", "-0.01"),
        ("--gamma", "0"),
        ("--gamma", "-0.1"),
        ("--momentum", "-0.9"),
        ("--weight-decay", "-1e-5"),
        ("--mask-weight", "-2"),
        ("--depth-weight", "-1"),
    ],
)
def test_settings_of_the_wrong_sign_are_usage_errors(tiny_shards, tmp_path, option, value):
    result = train_cli("--shards", tiny_shards, "--out", tmp_path / "r", option, value)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_bench_quality_refuses_a_negative_learning_rate(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "quality", "--work", tmp_path / "w", "--lr", "-1"])
    assert result.exit_code == 2 and "Invalid value for '--lr'" in result.stderr


def test_the_library_refuses_settings_of_the_wrong_sign() -> None:
    for value in (0.0, -0.5):
        with pytest.raises(ValueError, match=f"gamma must be above 0, not {value}"):
            TrainConfig(gamma=value).validate()
    for name in ("lr", "momentum", "weight_decay", "mask_weight", "depth_weight"):
        with pytest.raises(ValueError, match=f"{name} must be 0 or more, not -0.5"):
            TrainConfig(**{name: -0.5}).validate()
        TrainConfig(**{name: 0.0}).validate()  # zero is allowed: frozen weights, no momentum, ...


def poison_loss(monkeypatch, part: int, at: int) -> list[int]:
    """Make the training loss's `part` (1 mask, 2 depth) NaN from training step `at` (1-based)."""
    calls: list[int] = []
    real = loop.compute_loss

    def compute_loss(*args, **kwargs):
        losses = list(real(*args, **kwargs))
        if torch.is_grad_enabled():  # training, not evaluation
            calls.append(1)
            if len(calls) >= at:
                losses[part] = losses[part] * float("nan")
                losses[0] = losses[0] + losses[part]
        return tuple(losses)

    monkeypatch.setattr(loop, "compute_loss", compute_loss)
    return calls


def test_a_non_finite_loss_stops_the_run_and_keeps_the_checkpoints(
    tiny_shards: Path, tmp_path: Path, monkeypatch
) -> None:
    run = tmp_path / "run"
    calls = poison_loss(monkeypatch, part=1, at=3)  # epoch 2, its first step
    config = smoke_config(tiny_shards, run, epochs=3, steps_per_epoch=2, log_every=50)
    with pytest.raises(NonFiniteError, match=r"the mask loss .* at step 3 \(step 1 of epoch 2\)"):
        train(config)
    assert len(calls) == 4  # checked at the epoch's end (log_every 50), before any save
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(run / name)
        assert state["epoch"] == 1 and state["step"] == 2
        assert not non_finite(state["model"])


def test_the_loss_check_at_a_log_point_stops_early_and_names_depth(
    tiny_shards: Path, tmp_path: Path, monkeypatch
) -> None:
    calls = poison_loss(monkeypatch, part=2, at=2)
    config = smoke_config(tiny_shards, tmp_path / "run", steps_per_epoch=5, log_every=2)
    with pytest.raises(NonFiniteError, match=r"the depth loss .* at step 2 "):
        train(config)
    assert len(calls) == 2  # stopped at the check after step 2, not at the epoch's end
    assert not (tmp_path / "run" / "last.pt").exists()


def test_nan_weights_after_finite_losses_are_never_saved(
    tiny_shards: Path, tmp_path: Path, monkeypatch
) -> None:
    real = loop.train_step

    def train_step(stepper, *args):
        values = real(stepper, *args)
        with torch.no_grad():  # an update that spoilt a weight, though its loss was finite
            next(stepper.net.parameters()).fill_(float("nan"))
        return values

    monkeypatch.setattr(loop, "train_step", train_step)
    with pytest.raises(NonFiniteError, match="weights hold NaN or inf"):
        train(smoke_config(tiny_shards, tmp_path / "run"))
    assert not list((tmp_path / "run").glob("*.pt"))


def test_save_checkpoint_refuses_nan_weights(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    with pytest.raises(ValueError, match=r"best.pt: not written.*NaN.*\(w\)"):
        save_checkpoint({"model": {"w": torch.tensor([1.0, float("nan")])}, "config": {}}, path)
    assert not path.exists()


# ---------------------------------------------------------------- 10: best.pt on one metric


def test_an_epoch_without_test_metrics_never_replaces_best(
    tiny_run: Path, tiny_shards: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    best = (run / "best.pt").read_bytes()
    before = load_checkpoint(run / "last.pt")
    before["best_iou"] = -1.0  # a best test IoU below any training IoU
    torch.save(before, run / "last.pt")
    real = loop.evaluate

    def evaluate(*args, **kwargs):
        raise loop.EVAL_FAILURES[0]("no test sample could be decoded")

    monkeypatch.setattr("pipeline.train.run.evaluate", evaluate)
    config = TrainConfig(**{**before["config"], "out": str(run), "epochs": 2, "resume": True})
    config.shards = str(tiny_shards)
    with caplog.at_level("WARNING"):
        train(config)
    assert load_checkpoint(run / "last.pt")["epoch"] == 2  # the epoch's work is kept
    assert (run / "best.pt").read_bytes() == best  # its training IoU is no test IoU
    assert "epoch 2/2 has no test metrics: best.pt stays" in caplog.text
    assert real is loop.evaluate


def test_a_run_whose_every_evaluation_failed_does_not_look_finished(
    tiny_shards: Path, tmp_path: Path, monkeypatch
) -> None:
    def evaluate(*args, **kwargs):
        raise loop.EVAL_FAILURES[0]("no test sample could be decoded")

    monkeypatch.setattr("pipeline.train.run.evaluate", evaluate)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="no epoch could be evaluated on the test split"):
        train(smoke_config(tiny_shards, run, epochs=2))
    assert load_checkpoint(run / "last.pt")["epoch"] == 2  # the training is kept
    assert not (run / "best.pt").exists()


# ---------------------------------------------------------------- 10: two Gloo ranks


FAULTS = ("none", "expected", "bug")  # what rank 1's evaluation does, in turn, in one group
# A bound on a hang, not a speed: two spawned processes import torch before they pair up, which
# took over 120 s on a loaded machine. A rank still running near the end dumps its stack.
RANK_TIMEOUT = 300


def _evaluate_on_rank(rank: int, store: str, folder: str, started: float) -> None:
    """One of two Gloo ranks: evaluate once per fault (rank 1 failing as it says), each
    followed by one more collective; results to rankN.json, progress and output to rankN.log."""
    import faulthandler
    import os
    import time

    log = open(Path(folder) / f"rank{rank}.log", "w", buffering=1)  # noqa: SIM115 - the process's
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)  # Gloo's and Python's own messages too
    # Where a hang hangs: the stack, 20 s before the parent gives up on this process.
    faulthandler.dump_traceback_later(max(1.0, started + RANK_TIMEOUT - 20 - time.time()), file=log)

    def say(what: str) -> None:
        print(f"{time.time() - started:6.1f} s  {what}", file=log)

    import torch.distributed as dist

    say("started (torch imported)")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    say("joined the group")
    results = {}
    for fault in FAULTS:
        results[fault] = _evaluate_once(rank, fault)
        say(f"{fault}: {results[fault]}")
    dist.destroy_process_group()
    Path(folder, f"rank{rank}.json").write_text(json.dumps(results))
    say("done")


def _evaluate_once(rank: int, fault: str) -> dict:
    import torch.distributed as dist

    from model import UNet
    from pipeline.train.batches import LoaderError

    batch = {
        "inputs": torch.randint(0, 255, (2, 2, 160, 160), dtype=torch.uint8),
        "mask": torch.randint(0, 255, (2, 1, 160, 160), dtype=torch.uint8),
        "depth": torch.randint(0, 255, (2, 1, 80, 80), dtype=torch.uint8),
    }

    def batches():
        if rank == 1 and fault == "expected":
            raise LoaderError("the loader failed: test/000001.tar is unreadable")
        if rank == 1 and fault == "bug":
            raise KeyError("inputs")
        yield batch

    result: dict = {}
    try:
        metrics, _ = loop.evaluate(UNet.from_args({}), batches(), torch.device("cpu"))
        result["samples"] = metrics["samples"]
    except Exception as exc:
        result["error"] = [type(exc).__name__, str(exc)]
    after = torch.ones(1)
    dist.all_reduce(after)  # the ranks still pair up: nobody was left inside evaluate's
    result["after"] = after.item()
    return result


@pytest.fixture(scope="module")
def two_rank_evaluations(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """Both ranks' results for each fault: one pair of processes for all (start-up is slow)."""
    import time

    folder = tmp_path_factory.mktemp("ranks")
    spawn = multiprocessing.get_context("spawn")
    started = time.time()
    args = (str(folder / "store"), str(folder), started)
    procs = [spawn.Process(target=_evaluate_on_rank, args=(r, *args)) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:  # one deadline for both
        proc.join(timeout=max(0.0, started + RANK_TIMEOUT - time.time()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    codes = [proc.exitcode for proc in procs]
    if codes != [0, 0]:  # say whether they were slow (late lines) or hung (a stack at the end)
        logs = [folder / f"rank{r}.log" for r in range(2)]
        shown = "".join(f"--- rank {r}:\n{p.read_text() if p.exists() else '(no log)'}\n"
                        for r, p in enumerate(logs))  # fmt: skip
        pytest.fail(f"ranks exited {codes} after {time.time() - started:.0f} s:\n{shown}")
    found = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]
    return {fault: (found[0][fault], found[1][fault]) for fault in FAULTS}


@pytest.mark.parametrize("fault", FAULTS)
def test_an_evaluation_failure_on_one_rank_reaches_every_rank(two_rank_evaluations, fault) -> None:
    rank0, rank1 = two_rank_evaluations[fault]
    assert rank0["after"] == rank1["after"] == 2.0
    if fault == "none":
        assert rank0["samples"] == rank1["samples"] == 4  # both ranks' batches, summed
    elif fault == "expected":  # both skip: a ValueError the trainer catches on each rank
        assert rank1["error"] == ["LoaderError", "the loader failed: test/000001.tar is unreadable"]
        assert rank0["error"] == ["ValueError", "1 other rank(s) failed (their log says why)"]
    else:  # a bug: every rank fails
        assert rank1["error"][0] == "KeyError"
        assert rank0["error"][0] == "RuntimeError"


def test_train_and_evaluate_warn_when_a_zip_was_not_converted(tiny_shards, tmp_path, caplog):
    """A folder whose manifest lists a failed zip is usable, but the run says it is partial."""
    from pipeline.train.config import EvaluateConfig
    from pipeline.train.evaluate import evaluate_checkpoint

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["failed"] = [{"zip": "batch3_images.zip", "error": "No space left on device"}]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    warning = f"{shards} is not a complete conversion: 1 zip not converted (batch3_images.zip)"
    with caplog.at_level(logging.WARNING):
        train(smoke_config(shards, tmp_path / "r"))
    assert warning in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        evaluate_checkpoint(EvaluateConfig(tmp_path / "r" / "last.pt", str(shards), workers=0))
    assert warning in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(smoke_config(tiny_shards, tmp_path / "complete"))
    assert "not a complete conversion" not in caplog.text


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(n) for n in (task / "children").read_text().split()]
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_stops_train_as_ctrl_c_does(tiny_shards: Path, tmp_path: Path) -> None:
    """`docker stop`, `timeout` and schedulers send SIGTERM: one line and 143, not silence;
    its loader worker (forked with the handler) goes too, and last.pt stays good."""
    run = tmp_path / "run"
    args = ["--shards", tiny_shards, "--out", run, "--device", "cpu", "--workers", "1"]
    args += ["--epochs", "1000", "--steps-per-epoch", "1", "--batch-size", "4"]
    args += ["--eval-batches", "1"]
    code = "from pipeline.cli import main; main()"
    cmd = [sys.executable, "-c", code, "train", *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 120  # a bound on a hang, not a speed
        while not (run / "last.pt").exists() or not _children(proc.pid):
            assert proc.poll() is None and time.monotonic() < end, proc.communicate()
            time.sleep(0.1)
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "train stopped (SIGTERM)" in stderr and "Traceback" not in stderr
    assert not [p for p in workers if Path(f"/proc/{p}").exists()]
    assert load_checkpoint(run / "last.pt")["epoch"] >= 1


def test_a_refused_run_never_takes_the_folder_of_the_run_holding_it(tmp_path: Path, monkeypatch):
    """Two runs started at once into a new folder: both see no folder, the first makes it and
    locks. The second, refused, must not remove it as a folder of its own making."""
    run = tmp_path / "run"
    holder = RunLock(run)
    try:
        seen = Path.exists
        monkeypatch.setattr(Path, "exists", lambda p: p != run and seen(p))  # looked first
        with pytest.raises(ValueError, match="being written by another training run"):
            RunLock(run)
        monkeypatch.undo()
        assert (run / ".run.lock").is_file()  # still the holder's
        with pytest.raises(ValueError, match="being written by another training run"):
            RunLock(run)  # and still refused
    finally:
        holder.close()


def test_a_lock_file_removed_as_it_is_taken_is_taken_again(tmp_path: Path, monkeypatch):
    """A run that made the folder and fails removes it with .run.lock; one that opened that
    file just before and locks it just after holds a lock no other run sees: it locks anew."""
    from pipeline.train import guard

    run = tmp_path / "run"
    ending = RunLock(run)  # made the folder, writes nothing: close() removes the folder
    real = guard.fcntl.flock
    calls = []

    def flock(fd, how):
        if not calls:
            ending.close()  # between the second run's open and its flock
        calls.append(fd)
        return real(fd, how)

    monkeypatch.setattr(guard.fcntl, "flock", flock)
    second = RunLock(run)
    monkeypatch.undo()
    try:
        assert len(calls) == 2 and (run / ".run.lock").is_file()
        with pytest.raises(ValueError, match="being written by another training run"):
            RunLock(run)  # a third run sees the second's lock
    finally:
        second.close()


def test_a_file_system_without_locks_trains_unguarded(tmp_path: Path, monkeypatch, caplog):
    import errno

    from pipeline.train import guard

    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(guard.fcntl, "flock", refuse)
    with caplog.at_level("WARNING"):
        lock = RunLock(tmp_path / "run")
    assert "its file system takes no locks (No locks available)" in caplog.text
    lock.close()
    assert (tmp_path / "run").is_dir()  # kept: the run goes on into it


def test_sigterm_is_left_alone_where_it_should_be(monkeypatch) -> None:
    """Under torchrun (its agent's SIGTERM must stop a rank at once) and where the command
    was started with SIGTERM ignored, the handler is not installed."""
    from pipeline.cli import _sigterm_stops

    before = signal.getsignal(signal.SIGTERM)
    with _sigterm_stops():
        assert signal.getsignal(signal.SIGTERM) is not before  # installed
    assert signal.getsignal(signal.SIGTERM) is before  # and taken back
    monkeypatch.setenv("WORLD_SIZE", "2")
    with _sigterm_stops():
        assert signal.getsignal(signal.SIGTERM) is before
    monkeypatch.delenv("WORLD_SIZE")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with _sigterm_stops():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigterm_ends_a_worker_forked_under_the_handler_as_before(tmp_path: Path) -> None:
    """A worker forked while the handler is set dies of SIGTERM, as its parent means it to;
    it does not raise Terminated into whatever it was running."""
    from pipeline.cli import _sigterm_stops

    fork = multiprocessing.get_context("fork")
    started = fork.Event()
    with _sigterm_stops():
        worker = fork.Process(target=_started_then_sleep, args=(started,))
        worker.start()
    try:
        assert started.wait(30)
        worker.terminate()  # SIGTERM
        worker.join(30)
    finally:
        worker.kill()
    assert worker.exitcode == -signal.SIGTERM  # killed by the signal, not an exception's 1
