"""Two CPU processes under torchrun (Gloo): equal steps, no duplicate evaluation, rank-0 outputs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.train.checkpoint import load_checkpoint


def torchrun(*args: str, timeout: float = 240, code: int = 0) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "pipeline",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == code, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_gloo_processes_train_and_resume(tiny_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    common = [
        "train",
        "--shards",
        str(tiny_shards),
        "--out",
        str(run),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--batch-size",
        "8",
    ]
    # 48 training samples in 3 shards over 2 ranks: the shards don't divide evenly, and
    # every rank must still run floor(48 / (2 * 8)) = 3 steps, or DDP would hang.
    torchrun(*common, "--epochs", "1")
    state = load_checkpoint(run / "last.pt")
    assert state["config"]["world_size"] == 2
    assert state["step"] == 3
    assert state["metrics"]["samples"] == 48  # the test split once, split across the ranks
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # rank 0 alone writes TensorBoard

    torchrun(*common, "--epochs", "2", "--resume")
    resumed = load_checkpoint(run / "last.pt")
    assert resumed["epoch"] == 2 and resumed["step"] == 6


@pytest.mark.slow
def test_one_rank_failing_to_evaluate_and_a_taken_folder(tiny_shards: Path, tmp_path: Path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    # 3 test shards over 2 ranks: rank 1 alone reads the second one.
    sorted((shards / "test").glob("*.tar"))[1].write_bytes(b"no tar" * 100)
    run = tmp_path / "ddp"
    common = ["train", "--shards", str(shards), "--out", str(run), "--device", "cpu"]
    common += ["--workers", "0", "--batch-size", "8", "--epochs", "1"]
    result = torchrun(*common, timeout=180, code=1)  # both ranks skip the evaluation: no hang
    assert "evaluation failed" in result.stderr and "best.pt stays as it was" in result.stderr
    assert "no epoch could be evaluated on the test split" in result.stderr  # not finished
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert not (run / "best.pt").exists()  # no test IoU yet: nothing to call best
    before = (run / "last.pt").read_bytes()
    refused = torchrun(*common, timeout=120, code=1)  # every rank refuses, none waits
    assert "already holds a run" in refused.stderr
    assert (run / "last.pt").read_bytes() == before


# ------------------------------------------------ a failure on one rank stops every rank

# What fails on one rank alone before a collective the others then wait in: its own copy of the
# manifest unreadable (rank 1), of the shards holding nothing (rank 1), its machine's /dev/shm
# too small (rank 1), rank 0's first write (config.json, TensorBoard), its epoch's TensorBoard
# scalars (a full disk surfaces there), its checkpoint save.
ONE_RANK_FAULTS = ("manifest", "no_samples", "short_shm", "writer", "epoch_report", "save")
PATCHED = ("open_manifest", "trainable_samples", "check_feed_memory", "open_writer",
           "_epoch_report", "save_checkpoint")  # fmt: skip
GROUP_TIMEOUT_S = 60  # a collective left waiting fails the run's ranks after this, not 30 min


def _train_with_a_fault(rank: int, store: str, shards: str, folder: str) -> None:
    """One of two Gloo ranks: `run._train` once per fault (one rank failing as it says), each
    followed by one more collective; results to rankN.json, output to rankN.log."""
    import datetime
    import json

    log = open(Path(folder) / f"rank{rank}.log", "w", buffering=1)  # noqa: SIM115 - the process's
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    import torch
    import torch.distributed as dist
    from conftest import smoke_config

    from pipeline.train import run
    from pipeline.train.runtime import DistInfo

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timeout)  # fmt: skip
    info = DistInfo(rank=rank, world_size=2, local_world_size=2)
    results = {}

    def fail(kind: type[Exception], why: str):
        def failing(*args, **kwargs):
            raise kind(why)

        return failing

    for fault in ONE_RANK_FAULTS:
        saved = {name: getattr(run, name) for name in PATCHED}
        if fault == "manifest" and rank == 1:
            run.open_manifest = fail(ValueError, "shards/manifest.json: no such file")
        if fault == "writer" and rank == 0:
            run.open_writer = fail(OSError, "run/config.json: Read-only file system")
        if fault == "epoch_report" and rank == 0:
            run._epoch_report = fail(OSError, "events.out.tfevents: No space left on device")
        if fault == "no_samples" and rank == 1:
            run.trainable_samples = lambda *args, **kwargs: 0
        if fault == "short_shm" and rank == 1:

            def short(*args):
                raise ValueError("the loader's workers need 30.5 MiB … /dev/shm has 8.0 MiB free")

            run.check_feed_memory = short
        if fault == "save" and rank == 0:

            def full(state, path):
                raise OSError(f"{path}: could not write the checkpoint: No space left on device")

            run.save_checkpoint = full
        config = smoke_config(Path(shards), Path(folder) / fault, workers=0)
        config.world_size = 2
        try:
            run._train(config, info)
            results[fault] = {"error": None}
        except Exception as exc:
            results[fault] = {"error": [type(exc).__name__, str(exc)]}
        for name, value in saved.items():
            setattr(run, name, value)
        after = torch.ones(1)
        dist.all_reduce(after)  # the ranks still pair up: nobody was left inside a collective
        results[fault]["after"] = after.item()
    dist.destroy_process_group()
    Path(folder, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.mark.slow
def test_a_failure_on_one_rank_before_a_collective_stops_every_rank(tiny_shards, tmp_path):
    import json
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    args = (str(tmp_path / "store"), str(tiny_shards), str(tmp_path))
    procs = [spawn.Process(target=_train_with_a_fault, args=(r, *args)) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)  # a bound on a hang, not a speed
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    logs = "".join(f"--- rank {r}:\n{(tmp_path / f'rank{r}.log').read_text()}" for r in range(2))
    assert [proc.exitcode for proc in procs] == [0, 0], logs
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    others = ["ValueError", "1 other rank(s) failed (their log says why)"]
    assert rank1["manifest"]["error"] == ["ValueError", "shards/manifest.json: no such file"]
    assert rank0["manifest"]["error"] == others
    assert rank0["writer"]["error"] == ["OSError", "run/config.json: Read-only file system"]
    assert rank1["writer"]["error"] == others
    assert rank0["epoch_report"]["error"][1].endswith("No space left on device")
    assert rank1["epoch_report"]["error"] == others
    assert rank1["no_samples"]["error"][1].startswith("the train split's shard files can hold none")
    assert rank0["no_samples"]["error"] == others
    assert rank1["short_shm"]["error"][1].startswith("the loader's workers need 30.5 MiB")
    assert rank0["short_shm"]["error"] == others
    assert rank0["save"]["error"][1].endswith("No space left on device")
    assert rank1["save"]["error"] == others
    for fault in ONE_RANK_FAULTS:
        assert rank0[fault]["after"] == rank1[fault]["after"] == 2.0, logs
