"""Does each CPU of this machine decode at the same speed? The floor of `bench loader` (one
thread decoding all four fields of each sample, bytes in memory) pinned to each available CPU in
turn, `--rounds` interleaved rounds: the samples/s of each CPU by round, and each round's
ratio of the fastest CPU to the slowest. On the shared development VM the two vCPUs differed by
up to 1.5x within seconds, which is why `bench loader` pins its floors and 1-worker rows to one
CPU (`--pin`).

    .venv/bin/python benchmarks/cpu_speeds.py --shards /tmp/i7b/shards --samples 1500 --rounds 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

from pipeline.bench.loader import decode_floor, on_cpus
from pipeline.train.shards import read_shards
from pipeline.train.sources import open_manifest, shard_urls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True)
    parser.add_argument("--samples", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    manifest = open_manifest(args.shards)
    urls = shard_urls(args.shards, manifest, "train")
    raw = list(itertools.islice(read_shards(urls), args.samples))
    cpus = sorted(os.sched_getaffinity(0))
    rates: dict[int, list[int]] = {cpu: [] for cpu in cpus}
    for _ in range(args.rounds):
        for cpu in cpus:
            with on_cpus({cpu}):
                rates[cpu].append(round(decode_floor(raw, manifest)))
    spread = [round(max(r) / min(r), 2) for r in zip(*rates.values(), strict=True)]
    print(json.dumps({"samples_per_s_by_cpu": rates, "fastest_vs_slowest_by_round": spread}))


if __name__ == "__main__":
    main()
