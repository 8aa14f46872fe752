"""The headline figures of a `benchmarks/gpu.sh` results folder, as a short text table.

    python benchmarks/gpu_summary.py RESULTS_DIR

Reads the JSON files gpu.sh wrote (train-b*-compile-*.json, train-b*-augment-on-workers.json,
loader-b*.json, train-epochs.json, convert.json, machine.txt) and prints, against issue 7's goal
(>= 20,000 samples/s from shards with data wait under 5% on one H100/H200): each training bench
(model alone, from shards, data wait, the device augmentation's time), the loader's rates per
worker, and the loader cores that 20,000 samples/s needs at the measured rate of one worker.
A step that failed or was skipped is listed with the last line of its log.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

GOAL = 20_000  # samples/s from shards on one H100/H200 (issue 7)
WAIT_GOAL = 0.05


def _load(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _why(results: Path, name: str) -> str:
    """The step's own last line (its error), then gpu.sh's verdict on it (a failure, a timeout)."""
    log = results / f"{name}.log"
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    verdicts = [line for line in lines if line.startswith(("FAILED", "SKIPPED"))]
    own = [line for line in lines if line not in verdicts]
    parts = [own[-1][:160]] if own else []
    parts += [verdicts[-1][:80]] if verdicts else []
    return " | ".join(parts) if parts else "no output"


def _rate(x: object) -> str:
    return f"{x:,.0f}" if isinstance(x, int | float) else "-"


def _pct(x: object) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, int | float) else "-"


def summary(results: Path) -> list[str]:
    out: list[str] = []
    machine = results / "machine.txt"
    if machine.exists():
        # nvidia-smi's CSV line ("NVIDIA H200, 143771 MiB, 580.159.03"), not its header
        # ("name, memory.total [MiB], driver_version"), which has the same marks.
        lines = machine.read_text().splitlines()
        gpu = [ln for ln in lines if "," in ln and " MiB" in ln and "[MiB]" not in ln]
        out.append(f"machine: {gpu[0] if gpu else 'no GPU listed'}")
    convert = _load(results / "convert.json")
    if convert:
        speed = _rate(convert.get("samples_per_s"))
        out.append(f"convert: {convert.get('written')} samples, {speed}/s")
    out.append("")
    out.append(
        f"{'bench train':<34} {'model alone':>12} {'from shards':>12} {'data wait':>10} "
        f"{'aug ms/batch':>12}  goal"
    )
    rows: list[tuple[bool, float, str, object, object]] = []  # (met, rate, name, wait, workers)
    for path in sorted(results.glob("train-b*.json"), key=_order):
        name = path.stem
        data = _load(path)
        if data is None:
            out.append(f"{name:<34} FAILED or skipped: {_why(results, name)}")
            continue
        shards = data.get("from_shards") or {}
        rate, wait = shards.get("samples_per_s"), shards.get("data_wait_fraction")
        met = isinstance(rate, int | float) and rate >= GOAL and (wait or 0) < WAIT_GOAL
        if isinstance(rate, int | float):
            rows.append((met, rate, name, wait, shards.get("workers")))
        out.append(
            f"{name:<34} {_rate((data.get('model_only') or {}).get('samples_per_s')):>12} "
            f"{_rate(rate):>12} {_pct(wait):>10} "
            f"{data.get('device_augment_ms_per_batch', '-')!s:>12}  {'met' if met else 'not met'}"
        )
    out.append("")
    for path in sorted(results.glob("loader-b*.json")):
        data = _load(path)
        if data is None:
            out.append(f"{path.stem}: FAILED or skipped: {_why(results, path.stem)}")
            continue
        rates = data.get("rates") or {}
        one = rates.get("1_workers")
        workers = data.get("workers")
        out.append(
            f"{path.stem}: floor {_rate(rates.get('floor'))}/s, 1 worker {_rate(one)}/s, "
            f"{workers} workers {_rate(rates.get(f'{workers}_workers'))}/s "
            f"(augmenting in the workers: 1 {_rate(rates.get('1_workers_augmenting'))}/s, "
            f"{workers} {_rate(rates.get(f'{workers}_workers_augmenting'))}/s)"
        )
        if isinstance(one, int | float) and one > 0:
            out.append(
                f"  loader cores for {GOAL:,} samples/s at one worker's rate: "
                f"{math.ceil(GOAL / one)} (augmenting in the workers: "
                f"{_cores(rates.get('1_workers_augmenting'))})"
            )
    epochs = results / "train-epochs.log"
    if epochs.exists():
        lines = [ln for ln in epochs.read_text(errors="replace").splitlines() if "samples/s" in ln]
        out.extend(["", "train, whole epochs:", *(f"  {ln.strip()[:200]}" for ln in lines)])
        if not lines:
            out.append(f"  FAILED or skipped: {_why(results, 'train-epochs')}")
    if rows:  # the fastest that meets the goal, else the fastest
        met, rate, name, wait, workers = max(rows)
        out.extend(
            [
                "",
                f"best from shards: {_rate(rate)} samples/s, data wait {_pct(wait)}, "
                f"{workers} workers ({name}); goal {GOAL:,} with under {WAIT_GOAL:.0%}: "
                f"{'met' if met else 'not met'}",
            ]
        )
    return out


def _cores(rate: object) -> str:
    return str(math.ceil(GOAL / rate)) if isinstance(rate, int | float) and rate > 0 else "-"


def _order(path: Path) -> tuple:
    """Compile off before on, then by batch size, augment-on-workers after its batch."""
    match = re.match(r"train-b(\d+)-(.*)", path.stem)
    batch, rest = (int(match[1]), match[2]) if match else (0, path.stem)
    return ("compile-on" in rest, batch, rest)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(summary(Path(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
