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
