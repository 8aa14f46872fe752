"""What handing a ring batch from a loader worker to the training process costs, both sides.

A worker process fills `--batches` batches in its BatchRing and puts them on a torch
multiprocessing queue (as DataLoader's worker does), either
- as torch pickles a batch of shared tensors: a file descriptor per tensor and batch, fetched by
  the receiver from the worker's resource-sharer thread (the ring kept mapped in the receiver, as
  the training process did before), or
- as `train.ring.handover` sends it: a RingBatch, the ring's storage with its first batch only.
The receiving process takes them off the queue (nothing copied out). Printed: CPU time per batch
of the receiver's thread and of the whole worker process (its queue-feeding and sharing threads
included), each mode's best of `--rounds` interleaved rounds, and their ratios.

    .venv/bin/python benchmarks/handover.py --batches 300 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch.multiprocessing as mp

from pipeline.train.ring import RECEIVED, RING_KEY, BatchRing, handover


def worker(queue, mode: str, batches: int, batch_size: int) -> None:
    ring = BatchRing(6)
    shapes = ((batch_size, 2, 160, 160), (batch_size, 1, 160, 160), (batch_size, 1, 160, 160))
    keys = [f"sample{i:06d}" for i in range(batch_size)]
    start = cpu_seconds()
    for _ in range(batches):
        shared, (inputs, mask, depth) = ring.take(shapes)
        batch = {"inputs": inputs, "mask": mask, "depth": depth, "keys": keys, "skipped": 0}
        if mode == "ring":
            batch[RING_KEY] = shared
            (batch,) = handover([batch])
        queue.put(batch)
    queue.put(None)
    time.sleep(0.5)  # the feeding thread's last pickles and the receiver's last fetches
    queue.put(("cpu", cpu_seconds() - start))
    time.sleep(0.5)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # the process: all its threads
    return usage.ru_utime + usage.ru_stime


def measure(mode: str, batches: int, batch_size: int) -> tuple[float, float]:
    """(receiver's thread, worker process) CPU seconds per batch."""
    context = mp.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=worker, args=(queue, mode, batches, batch_size))
    process.start()
    kept = None  # the first batch: its storage stays mapped here, as the trainer keeps rings
    start = time.thread_time()
    while (batch := queue.get()) is not None:
        kept = kept or batch
    receiver = time.thread_time() - start
    _, worker_cpu = queue.get()
    process.join()
    if mode == "ring":
        RECEIVED.forget([kept[RING_KEY]])
    return receiver / batches, worker_cpu / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"per_tensor": [], "ring": []}
    for _ in range(args.rounds):
        for mode in results:
            results[mode].append(measure(mode, args.batches, args.batch_size))
    best = {
        mode: {
            "receiver_us_per_batch": round(min(r for r, _ in runs) * 1e6, 1),
            "worker_us_per_batch": round(min(w for _, w in runs) * 1e6, 1),
        }
        for mode, runs in results.items()
    }
    ratios = {
        side: round(best["per_tensor"][side] / best["ring"][side], 1)
        for side in ("receiver_us_per_batch", "worker_us_per_batch")
    }
    print(json.dumps({"batch_size": args.batch_size, "best": best, "per_tensor_vs_ring": ratios}))


if __name__ == "__main__":
    main()
