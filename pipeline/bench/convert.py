"""`pipeline bench convert`: convert against `unzip -q` and against merely reading the zip.

`run_bench_convert` is the command: it checks its arguments, makes a scratch folder and, when no
zip is given, synthesizes two. Each figure is the best of `repeat` runs on a warm page cache (the
zip is read once first), so the numbers compare the work done, not the disk. The goals (issue 2):
convert at most 0.5x the unzip time and at most 2.5x the read-only time in one process; 2 workers
on 2 zips at least 1.7x faster.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from pipeline.store.names import batch_number
from pipeline.store.runner import ConvertConfig, convert_zips
from pipeline.store.synth import synth_zips

log = logging.getLogger(__name__)


def best_time(run: Callable[[], object], repeat: int) -> float:
    """The fastest of `repeat` runs of `run`, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def read_all_members(zip_path: Path) -> int:
    """Read every file member's bytes with zipfile (the floor: no checks, no writes)."""
    total = 0
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            if not info.is_dir():
                total += len(zf.read(info))
    return total


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def time_unzip(zip_path: Path, work: Path, repeat: int) -> float:
    """Best time of `unzip -q` into an empty folder (the old workflow's step)."""
    if shutil.which("unzip") is None:
        raise ValueError("the unzip command is not installed: cannot measure the old workflow")
    target = work / "unzipped"
    # Each run unzips into an empty folder; clearing the last run's files is not timed.
    times = []
    for _ in range(repeat):
        _fresh(target)
        start = time.perf_counter()
        subprocess.run(["unzip", "-q", str(zip_path), "-d", str(target)], check=True)
        times.append(time.perf_counter() - start)
    shutil.rmtree(target, ignore_errors=True)
    return min(times)


def time_convert(zips: list[Path], work: Path, workers: int, repeat: int) -> tuple[float, int]:
    """Best time of converting `zips` into an empty folder; also the samples written."""
    out = work / f"shards-w{workers}"
    times, samples = [], 0
    for _ in range(repeat):
        _fresh(out)
        # All zips in the test split: the split does not matter here, and no empty-test warning.
        tests = tuple(batch_number(z) for z in zips)
        config = ConvertConfig(out=out, test_batches=tests, workers=workers, progress=False)
        start = time.perf_counter()
        summary = convert_zips(zips, config)
        times.append(time.perf_counter() - start)
        if not summary.ok:
            raise ValueError(f"convert failed during the benchmark: {summary.failed}")
        samples = summary.written
    shutil.rmtree(out, ignore_errors=True)
    return min(times), samples


def bench_convert(
    zip_path: Path, work: Path, workers_zips: list[Path] | None = None, repeat: int = 3
) -> dict:
    """Time unzip, read-only and convert of one zip (and 1 vs 2 workers on two zips)."""
    zip_path, work = Path(zip_path), Path(work)
    batch_number(zip_path)  # a clear error now rather than after the unzip
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work, prefix="bench-convert-") as tmp:
        tmp = Path(tmp)
        read_all_members(zip_path)  # warm the page cache: every step then reads from memory
        unzip_s = time_unzip(zip_path, tmp, repeat)
        read_s = best_time(lambda: read_all_members(zip_path), repeat)
        convert_s, samples = time_convert([zip_path], tmp, 1, repeat)
        result = {
            "zip": str(zip_path),
            "zip_bytes": zip_path.stat().st_size,
            "samples": samples,
            "repeat": repeat,
            "unzip_s": round(unzip_s, 4),
            "read_s": round(read_s, 4),
            "convert_s": round(convert_s, 4),
            "convert_samples_per_s": round(samples / convert_s, 1),
            "convert_vs_unzip": round(convert_s / unzip_s, 3),
            "convert_vs_read": round(convert_s / read_s, 3),
        }
        if workers_zips:
            result.update(_bench_workers(list(map(Path, workers_zips)), tmp, repeat))
    return result


def _bench_workers(zips: list[Path], work: Path, repeat: int) -> dict:
    if len(zips) != 2:
        raise ValueError(f"the workers benchmark takes 2 zips, got {len(zips)}")
    one_s, samples = time_convert(zips, work, 1, repeat)
    two_s, _ = time_convert(zips, work, 2, repeat)
    return {
        "workers_zips": [str(z) for z in zips],
        "workers_samples": samples,
        "workers1_s": round(one_s, 4),
        "workers2_s": round(two_s, 4),
        "workers_speedup": round(one_s / two_s, 3),
    }


def run_bench_convert(
    zips: list[Path], work: Path | None = None, synth_samples: int | None = None, repeat: int = 3
) -> dict:
    """`pipeline bench convert`: time one zip (and 2 workers on two); ValueError for bad use."""
    zips = [Path(z) for z in zips]
    if not zips and synth_samples is None:
        raise ValueError("give a ZIP, or --synth N to make two zips of N samples")
    if zips and synth_samples is not None:
        raise ValueError("give ZIPs or --synth N, not both")
    if len(zips) > 2:
        raise ValueError(f"give one or two zips, not {len(zips)}")
    batches = [batch_number(z) for z in zips]  # clear errors now rather than after the unzip
    if len(set(batches)) < len(batches):
        raise ValueError(f"{zips[0]} and {zips[1]} are both batch {batches[0]}")
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        work = Path(work) if work is not None else Path(tmp)
        if not zips:
            zips = synth_zips(work / "zips", batches=[1, 2], samples=synth_samples)
        return bench_convert(zips[0], work, zips if len(zips) == 2 else None, repeat=repeat)
