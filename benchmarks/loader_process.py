"""Where one loader worker loses against the decode floor: the stages, or the worker process?

On the same shards and samples, `--rounds` times interleaved, each row's best round (samples/s):
- floor: one thread decoding all four fields of each sample, bytes in memory (`bench loader`'s);
- floor, other core busy: the same while another process copies 8 MB arrays in a loop on the
  other core, as the training process does while a worker feeds it (it copies each batch out);
- decode into batches / decode then collate: the worker's decode stage alone (background cache,
  a ring, bytes in memory), decoding each image straight into its place in the batch as the
  workers do, or into an array of its own and then copying it in (the way before);
- in process: the training stages (read, shuffle, decode with the background cache, batch) run in
  this process (`--workers 0`), nothing handed over;
- 1 worker: the loader as `bench loader` runs it (one worker process, its ring, the copy out);
- 1 worker, no copy: the same DataLoader iterated raw, its batches never copied out of the ring
  (not safe for a trainer that keeps batches: only to size the copy's cost);
With 2 or more CPUs, every row runs on one CPU (as `bench loader --pin`): the floors' and the
stages' thread, the worker process; the training process's threads and the copying process on
the others.
Each row also gives the CPU time a sample (us, best round) of the training process and of the
loader's worker processes (theirs counted when they stop, so with their start, the warm-up batch
and the batches they made ahead: compare rows, not absolute figures).

    .venv/bin/python benchmarks/loader_process.py --shards /tmp/i7b/shards --batches 30 --rounds 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time

from pipeline.bench.loader import bench_cpus, decode_floor, move_threads, on_cpus, time_batches
from pipeline.schema import field_sizes
from pipeline.train.bgcache import DecodedCache
from pipeline.train.loader import LoaderConfig, make_train_loader
from pipeline.train.ring import BatchRing
from pipeline.train.shards import read_shards
from pipeline.train.sources import open_manifest, shard_urls
from pipeline.train.stages import (
    LogOnce,
    SampleDecoder,
    SkipCounter,
    collate,
    decode_batches,
    decode_samples,
)

# Another process copying 8 MB arrays (a batch's size) for ever.
COPYING = (
    "import numpy as np\na = np.ones(1 << 23, np.uint8)\nb = np.empty_like(a)\n"
    "while True: np.copyto(b, a)"
)


CPUS = bench_cpus()  # (the floors' and the worker's CPU, the others), as `bench loader` pins


def loader_rate(shards: str, workers: int, batch_size: int, batches: int, copy: bool) -> float:
    """Samples/s of the training loader (no augmentation in the workers, as on a GPU); its
    worker on the floors' CPU, the training process's threads moved to the others."""
    config = LoaderConfig(batch_size=batch_size, workers=workers)
    stream = make_train_loader(shards, config, epoch=0, steps=batches + 1)
    started = (lambda: move_threads(CPUS[1])) if CPUS and workers else None
    if copy:
        return time_batches(stream, batches, started)
    raw = iter(stream.loader)
    try:
        return time_batches(raw, batches, started)
    finally:
        raw._shutdown_workers()  # type: ignore[attr-defined]


def busy_floor(raw: list[dict], manifest: dict) -> float:
    """The floor while another process keeps the other core copying memory."""
    elsewhere = (lambda: os.sched_setaffinity(0, CPUS[1])) if CPUS else None
    other = subprocess.Popen([sys.executable, "-c", COPYING], preexec_fn=elsewhere)
    try:
        time.sleep(0.3)  # its start-up
        return decode_floor(raw, manifest)
    finally:
        other.kill()
        other.wait()


def stage_rate(raw: list[dict], manifest: dict, batch_size: int, into: bool) -> float:
    """Samples/s of the decode stage alone into a ring: straight into the batch, or not."""
    decoder = SampleDecoder(manifest["channels"], field_sizes(manifest), None, DecodedCache())
    ring, counter, start = BatchRing(6), SkipCounter(), time.perf_counter()
    if into:
        batches = decode_batches(raw, decoder, batch_size, counter, LogOnce(), False, ring)
        count = sum(len(batch["keys"]) for batch in batches)
    else:
        count, pending = 0, []
        for sample in decode_samples(raw, decoder, counter, LogOnce()):
            pending.append(sample)
            if len(pending) == batch_size:
                count += len(collate(pending, 0, ring)["keys"])
                pending = []
    return count / (time.perf_counter() - start)


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    """CPU seconds of this process (its threads) or of its children that have ended."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    manifest = open_manifest(args.shards)
    wanted = (args.batches + 1) * args.batch_size
    raw = list(itertools.islice(read_shards(shard_urls(args.shards, manifest, "train")), wanted))
    rows = {
        "floor": lambda: decode_floor(raw, manifest),
        "floor_other_core_busy": lambda: busy_floor(raw, manifest),
        "decode_into_batches": lambda: stage_rate(raw, manifest, args.batch_size, True),
        "decode_then_collate": lambda: stage_rate(raw, manifest, args.batch_size, False),
        "in_process": lambda: loader_rate(args.shards, 0, args.batch_size, args.batches, True),
        "1_worker": lambda: loader_rate(args.shards, 1, args.batch_size, args.batches, True),
        "1_worker_no_copy": lambda: loader_rate(
            args.shards, 1, args.batch_size, args.batches, False
        ),
    }
    rates: dict[str, list[float]] = {name: [] for name in rows}
    cpu: dict[str, list[float]] = {name: [] for name in rows}
    workers_cpu: dict[str, list[float]] = {name: [] for name in rows}
    samples = args.batches * args.batch_size  # timed in each row (the floor: len(raw))
    for _ in range(args.rounds):
        for name, measure in rows.items():
            before, children = cpu_seconds(), cpu_seconds(resource.RUSAGE_CHILDREN)
            with on_cpus(CPUS and CPUS[0]):
                rates[name].append(measure())
            # Set-up and the warm-up batch included: compare rows, not absolute figures.
            cpu[name].append((cpu_seconds() - before) / samples * 1e6)
            workers = cpu_seconds(resource.RUSAGE_CHILDREN) - children
            workers_cpu[name].append(workers / samples * 1e6)
            time.sleep(0.2)
    best = {name: round(max(values)) for name, values in rates.items()}
    ratios = {
        f"{name}_vs_floor": round(best[name] / best["floor"], 2) for name in rows if name != "floor"
    }
    training_cpu = {name: round(min(values), 1) for name, values in cpu.items() if "worker" in name}
    worker_cpu = {
        name: round(min(values), 1) for name, values in workers_cpu.items() if "worker" in name
    }
    print(
        json.dumps(
            {
                "samples": len(raw),
                "rates": best,
                "ratios": ratios,
                "training_process_cpu_us_per_sample": training_cpu,
                "worker_processes_cpu_us_per_sample": worker_cpu,
            }
        )
    )


if __name__ == "__main__":
    main()
