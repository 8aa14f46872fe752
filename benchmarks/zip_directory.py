"""Listing a zip with `zipread.read_central_directory`: another copy of zipread.py against this one.

Each round times both readers (best of `--calls` calls each, file in the page cache), in
alternating order; printed: each one's median ms and the median of the rounds' ratios, this
checkout's over the other's. The other copy is a file, e.g. from an earlier commit:

    git show 7639f8f:pipeline/store/zipread.py > /tmp/zipread_old.py
    taskset -c 1 .venv/bin/python benchmarks/zip_directory.py /tmp/zipread_old.py \
        /tmp/zc/z10k/batch1_images.zip --rounds 40
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

from pipeline.store import zipread


def load_copy(path: Path):
    """The module in `path`, imported under another name than pipeline.store.zipread."""
    spec = importlib.util.spec_from_file_location("zipread_other", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def best_ms(read, f, calls: int) -> float:
    """The fastest of `calls` listings of the open zip `f`, in ms."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        read(f)
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="another copy of pipeline/store/zipread.py")
    parser.add_argument("zip", type=Path)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=7)
    args = parser.parse_args()
    readers = {"other": load_copy(args.other).read_central_directory}
    readers["this"] = zipread.read_central_directory
    times: dict[str, list[float]] = {name: [] for name in readers}
    with open(args.zip, "rb") as f:
        listed = {name: read(f) for name, read in readers.items()}
        for i in range(args.rounds):
            for name in sorted(readers, reverse=i % 2 == 1):
                times[name].append(best_ms(readers[name], f, args.calls))
    ratios = [a / b for a, b in zip(times["this"], times["other"], strict=True)]
    result = {
        "entries": {name: None if e is None else len(e) for name, e in listed.items()},
        "same_listing": listed["this"] == listed["other"],
        "median_ms": {name: round(statistics.median(t), 2) for name, t in times.items()},
        "this_over_other": round(statistics.median(ratios), 3),
        "rounds": args.rounds,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
