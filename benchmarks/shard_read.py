"""Reading shards with the loader's tar reader, by the buffer local files are opened with.

Every shard of a split read whole with `store.tarread.read_samples` (files in the page cache), each
buffer size once a round, `--rounds` interleaved rounds; printed: each size's median µs a sample
and its median time paired with Python's default buffer in the same round (the loader opens
local shards with `train.shards.SHARD_BUFFER`).

    .venv/bin/python benchmarks/shard_read.py --shards /tmp/i7b/shards --rounds 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from pipeline.store.tarread import read_samples
from pipeline.train.sources import open_manifest, shard_urls

SIZES = {"default": -1, "64K": 1 << 16, "256K": 1 << 18, "1M": 1 << 20}


def read_all(paths: list[str], buffering: int) -> float:
    """µs a sample to read every shard in `paths`."""
    start, samples = time.perf_counter(), 0
    for path in paths:
        with open(path, "rb", buffering=buffering) as stream:
            samples += sum(1 for _ in read_samples(stream, path))
    return (time.perf_counter() - start) / samples * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, help="a local shard folder")
    parser.add_argument("--split", default="train")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    paths = shard_urls(args.shards, open_manifest(args.shards), args.split)
    times: dict[str, list[float]] = {name: [] for name in SIZES}
    for _ in range(args.rounds):
        for name, buffering in SIZES.items():
            times[name].append(read_all(paths, buffering))
    result = {
        name: {
            "us_per_sample": round(statistics.median(values), 1),
            "vs_default": round(
                statistics.median(a / b for a, b in zip(values, times["default"], strict=True)), 3
            ),
        }
        for name, values in times.items()
    }
    print(json.dumps({"shards": len(paths), "rounds": args.rounds, "median": result}))


if __name__ == "__main__":
    main()
