"""benchmarks/gpu.sh and its summary: the script parses, and the summary reads its results right.

The script itself runs on a GPU machine (and, with tiny sizes, on a CPU: its header shows how);
here only what can be checked without running it for minutes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = ROOT / "benchmarks" / "gpu_summary.py"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_gpu_scripts_parse():
    for script in ("gpu.sh", "gpu-wheels.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], check=True)


def _train(rate: float, wait: float, batch: int) -> dict:
    return {
        "batch_size": batch,
        "model_only": {"samples_per_s": 2 * rate, "data_wait_fraction": 0.0},
        "device_augment_ms_per_batch": 0.4,
        "from_shards": {"samples_per_s": rate, "data_wait_fraction": wait, "workers": 16},
    }


def test_the_summary_judges_the_goal_and_counts_the_loader_cores(tmp_path):
    (tmp_path / "machine.txt").write_text("name, memory.total\nNVIDIA H200, 143771 MiB, 580\n")
    (tmp_path / "train-b512-compile-off.json").write_text(json.dumps(_train(25_000, 0.02, 512)))
    (tmp_path / "train-b1024-compile-off.json").write_text(json.dumps(_train(30_000, 0.08, 1024)))
    (tmp_path / "train-b256-compile-on.json").write_text("")  # killed by its time limit
    (tmp_path / "train-b256-compile-on.log").write_text("compiling\nFAILED or timed out after 9s\n")
    rates = {"floor": 4000, "1_workers": 3000, "16_workers": 40_000, "1_workers_augmenting": 1000}
    (tmp_path / "loader-b512.json").write_text(json.dumps({"workers": 16, "rates": rates}))
    out = subprocess.run(
        [sys.executable, str(SUMMARY), str(tmp_path)], check=True, capture_output=True, text=True
    ).stdout
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "NVIDIA H200" in lines["machine:"]
    assert lines["train-b512-compile-off"].endswith(" met")  # 25,000/s, 2% wait
    assert lines["train-b1024-compile-off"].endswith("not met")  # faster, but waits 8%
    assert "FAILED or timed out after 9s" in lines["train-b256-compile-on"]
    assert "20,000 samples/s at one worker's rate: 7 (augmenting in the workers: 20)" in out
    # The fastest row that meets the goal, not the fastest one.
    assert "best from shards: 25,000 samples/s, data wait 2.0%, 16 workers" in out
    assert out.endswith(": met\n")
