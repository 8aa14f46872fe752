"""Listing a zip with `read_central_directory`: another copy of the lister against this checkout's.

Each round times both readers (best of `--calls` calls each, file in the page cache), in
alternating order; printed: each one's median ms and the median of the rounds' ratios, this
checkout's over the other's. `--open` times `MemberReader(zip).close()` instead: the listing by
whichever reader each copy lists that zip with (zipfile for one it leaves to zipfile). The
listings are compared on the fields both copies' entries have. The other copy is one file from
an earlier commit: pipeline/store/zipread.py up to dd8f3d1, which listed zips itself, or
pipeline/store/zipdir.py after it (listing only: a later zipread.py copy would list through this
checkout's zipdir, so --open needs the older file):

    git show dd8f3d1:pipeline/store/zipread.py > /tmp/zipread_old.py
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


def same_listing(a: list | None, b: list | None) -> bool:
    """True if both list the same entries, on the fields both copies' entries have."""
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(x[: len(y)] == y[: len(x)] for x, y in zip(a, b, strict=True))


def open_reader(module):
    """A reader whose call lists an open zip with `module.MemberReader`, as convert opens it."""

    def read(f):
        reader = module.MemberReader(Path(f.name))
        reader.close()
        return reader.infos

    return read


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
    parser.add_argument("other", type=Path, help="an older zipread.py, or a zipdir.py")
    parser.add_argument("zip", type=Path)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=7)
    parser.add_argument("--open", action="store_true", help="time MemberReader(zip).close()")
    args = parser.parse_args()
    modules = {"other": load_copy(args.other), "this": zipread}  # zipread has both names
    if args.open:
        readers = {name: open_reader(module) for name, module in modules.items()}
    else:
        readers = {name: module.read_central_directory for name, module in modules.items()}
    times: dict[str, list[float]] = {name: [] for name in readers}
    with open(args.zip, "rb") as f:
        listed = {name: read(f) for name, read in readers.items()}
        for i in range(args.rounds):
            for name in sorted(readers, reverse=i % 2 == 1):
                times[name].append(best_ms(readers[name], f, args.calls))
    ratios = [a / b for a, b in zip(times["this"], times["other"], strict=True)]
    result = {
        "entries": {name: None if e is None else len(e) for name, e in listed.items()},
        "same_listing": same_listing(listed["this"], listed["other"]),
        "median_ms": {name: round(statistics.median(t), 2) for name, t in times.items()},
        "this_over_other": round(statistics.median(ratios), 3),
        "rounds": args.rounds,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
