"""Reusable shared-memory batch buffers of a loader worker: the trip to the trainer, no new pages.

A DataLoader worker hands each batch to the training process through shared memory. New shared
memory for every batch costs its page faults, and on the development machine that measured about 90
us a sample in a worker, against 180 us for decoding its three images. So each worker writes its
batches into a ring of buffers it allocates once, and the training process copies each batch out as
it receives it (`RingMappings.own`, called by the loader's streams; for a GPU the pinning thread
has already made that copy). The ring is never ahead of the copies while DataLoader's requests go
round-robin to workers that all keep running, as training workers do (they are endless): a worker
gets the request for its batch j + prefetch_factor only when its batch j reaches the training
process, which copied out batch j - 1 before asking for more, so a ring of prefetch_factor + 2 slots
never overwrites a batch that was not copied out. Evaluation workers do finish, one before another,
and DataLoader then sends the finished workers' requests to those still running, which may run
further ahead than that: they use no ring.

The trip itself: torch pickles a shared tensor by passing a file descriptor over a socket of the
worker's resource-sharer thread, once per tensor and batch (a connection, an authentication and
the descriptor each time: 0.2-0.3 ms a batch in the training process, 0.4 ms in the worker, with
3 tensors a batch, measured on the 2-vCPU machine). A ring's storage crosses once instead: a
worker sends each batch as a `RingBatch`, which pickles as the ring's name and its tensors' places
in it, the storage itself only with the ring's first batch. The receiving process keeps every ring
it received (`RECEIVED`), mapped, until the stream that read it lets its workers' rings go.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

MAX_SHAPES = 3  # rings kept: the full batch's shapes, and an evaluation's last, shorter batch
RING_KEY = "ring"  # a ring batch's entry: its SharedRing in the worker, the ring's name after
# Rings a process keeps mapped at most. A training worker has one, and a stream lets its rings
# go when its workers stop: the bound only catches streams never closed (the oldest go first).
MAPPED_RINGS = 1024

_serials = itertools.count()  # a process's rings, numbered
SHARED_MEMORY = "/dev/shm"  # where torch makes shared memory on Linux (shm_open)


def check_shared_memory(
    workers: int,
    slots: int,
    shapes: tuple[tuple[int, ...], ...],
    folder: str = SHARED_MEMORY,
    processes: int = 1,
) -> None:
    """Raise ValueError when `processes` x `workers` rings of `slots` batches of uint8 `shapes`
    need more shared memory than `folder` has free: torch would then fail in a worker, at its
    first batch, with "unable to allocate shared memory(shm)" and no word of how much was needed
    (Docker gives a container 64 MB unless told --shm-size). `processes`: the training processes
    of this machine that share the folder (torchrun's ranks here), checked before any of them
    starts its workers. Nothing is checked where the folder is missing or says nothing of its
    size (gVisor's tmpfs without a size)."""
    try:
        found = os.statvfs(folder)
    except OSError:
        return
    if found.f_blocks == 0:
        return
    batch = sum(math.prod(shape) for shape in shapes)
    need, free = processes * workers * slots * batch, found.f_bavail * found.f_frsize
    if need > free:
        ranks = f"{processes} training processes x " if processes > 1 else ""
        raise ValueError(
            f"the loader's workers need {_size(need)} of shared memory ({ranks}{workers} workers"
            f" x {slots} batches of {_size(batch)}) and {folder} has {_size(free)} free: use "
            f"fewer --workers or a smaller --batch-size, or give {folder} more room (docker "
            f"run --shm-size=...; as root, mount -o remount,size=... {folder})"
        )


def _size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


class SharedRing:
    """`slots` sets of uint8 tensors of the same shapes, views of one shared-memory storage."""

    def __init__(self, shapes: tuple[tuple[int, ...], ...], slots: int) -> None:
        sizes = [math.prod(shape) for shape in shapes]
        # Shared as DataLoader's collate makes its batches; named by process and number.
        self.storage = torch.UntypedStorage._new_shared(slots * sum(sizes))
        self.name = f"{os.getpid()}-{next(_serials)}"
        self._sent = False
        flat = torch.empty(0, dtype=torch.uint8).set_(self.storage)
        self.slots: list[list[Tensor]] = []
        start = 0
        for _ in range(slots):
            views = []
            for shape, size in zip(shapes, sizes, strict=True):
                views.append(flat[start : start + size].view(shape))
                start += size
            self.slots.append(views)

    def storage_to_send(self) -> torch.UntypedStorage | None:
        """The storage with the ring's first batch sent (the receiver keeps it), None after."""
        if self._sent:
            return None
        self._sent = True
        return self.storage

    def __reduce__(self) -> Any:
        raise TypeError(
            f"ring {self.name}: a ring batch leaves its worker as a RingBatch (see train.ring)"
        )


class BatchRing:
    """A loader worker's rings of uint8 batch buffers in shared memory, one per set of shapes."""

    def __init__(self, slots: int) -> None:
        if slots < 2:
            raise ValueError(f"a batch ring needs at least 2 slots, not {slots}")
        self.slots = slots
        self._rings: OrderedDict[tuple, SharedRing] = OrderedDict()
        self._turn: dict[tuple, int] = {}

    def take(self, shapes: tuple[tuple[int, ...], ...]) -> tuple[SharedRing, list[Tensor]]:
        """The ring of these shapes and its next slot: uninitialised uint8 tensors."""
        ring = self._rings.get(shapes)
        if ring is None:
            ring = self._rings[shapes] = SharedRing(shapes, self.slots)
            self._turn[shapes] = 0
            if len(self._rings) > MAX_SHAPES:  # in flight elsewhere, a dropped ring lives on
                old, _ = self._rings.popitem(last=False)
                del self._turn[old]
        self._rings.move_to_end(shapes)
        turn = self._turn[shapes]
        self._turn[shapes] = turn + 1
        return ring, ring.slots[turn % self.slots]


class RingBatch:
    """A ring batch on its way out of the worker (made by `handover`): it pickles as its ring's
    name, the places of its tensors in the ring, its other entries and, with the ring's first
    batch only, the ring's storage. Unpickled, it is the batch again, a plain dict whose
    RING_KEY entry is the ring's name. Not a Mapping, so DataLoader's conversions pass it
    through untouched. Everything is checked here, in the worker's loop, where an error reaches
    the trainer: pickling happens later, in the queue's thread, which could only drop it."""

    __slots__ = ("name", "places", "rest", "storage")

    def __init__(self, batch: dict[str, Any]) -> None:
        rest = dict(batch)
        ring: SharedRing = rest.pop(RING_KEY)
        base = ring.storage.data_ptr()
        self.places: dict[str, tuple[int, tuple[int, ...]]] = {}
        for key, value in batch.items():
            if isinstance(value, Tensor):
                if value.untyped_storage().data_ptr() != base or not value.is_contiguous():
                    raise ValueError(f"batch entry {key!r} is not a slot of ring {ring.name}")
                self.places[key] = (value.storage_offset(), tuple(value.shape))
                del rest[key]
        self.name, self.rest = ring.name, rest
        # Last, once the batch is known good: batches are pickled in the order they are made.
        self.storage = ring.storage_to_send()

    def __reduce__(self) -> Any:
        return _received_batch, (self.name, self.storage, self.places, self.rest)


def handover(batches: Iterable[dict[str, Any]]) -> Iterator[Any]:
    """A worker's batches as they go on its queue: ring batches as RingBatch, others as they are."""
    for batch in batches:
        yield RingBatch(batch) if RING_KEY in batch else batch


class ReceivedRings:
    """The rings a process received from loader workers, by name: mapped while kept."""

    def __init__(self, limit: int = MAPPED_RINGS) -> None:
        self.limit = limit
        self._storages: OrderedDict[str, torch.UntypedStorage] = OrderedDict()
        self._lock = threading.Lock()  # the pinning thread receives, the trainer forgets

    def __len__(self) -> int:
        return len(self._storages)

    def __contains__(self, name: str) -> bool:
        return name in self._storages

    def storage(self, name: str, sent: torch.UntypedStorage | None) -> torch.UntypedStorage:
        """Ring `name`'s storage: `sent` (its first batch), kept; or the one kept before."""
        with self._lock:
            if sent is not None:
                self._storages[name] = sent
            elif name not in self._storages:
                raise RuntimeError(
                    f"a batch of loader worker ring {name}, which this process never received "
                    f"or has let go (over {self.limit} rings received and not let go?)"
                )
            self._storages.move_to_end(name)
            if len(self._storages) > self.limit:
                self._storages.popitem(last=False)
            return self._storages[name]

    def forget(self, names: Iterable[str] = (), workers: Iterable[int] = ()) -> None:
        """Let these rings go, and every ring of these worker processes (they have stopped):
        also those of batches received but never taken (read ahead, or held back by DataLoader
        for their turn) when their stream stopped."""
        prefixes = tuple(f"{pid}-" for pid in workers)
        with self._lock:
            for name in [*names, *(n for n in self._storages if n.startswith(prefixes))]:
                self._storages.pop(name, None)

    def _reset(self) -> None:
        """Empty, with a new lock: a process forked from this one (a loader worker) neither
        keeps its parent's rings mapped nor inherits the lock held by another thread."""
        self._storages = OrderedDict()
        self._lock = threading.Lock()


RECEIVED = ReceivedRings()  # this process's
os.register_at_fork(after_in_child=RECEIVED._reset)


def _received_batch(
    name: str,
    sent: torch.UntypedStorage | None,
    places: dict[str, tuple[int, tuple[int, ...]]],
    rest: dict[str, Any],
) -> dict[str, Any]:
    """A RingBatch unpickled: its tensors as views of the ring's storage."""
    flat = torch.empty(0, dtype=torch.uint8).set_(RECEIVED.storage(name, sent))
    batch = dict(rest)
    for key, (offset, shape) in places.items():
        batch[key] = flat[offset : offset + math.prod(shape)].view(shape)
    batch[RING_KEY] = name
    return batch


class RingMappings:
    """The rings a stream's batches came from, in the training process: their batches made its
    own, and the rings let go with the stream's workers (`clear`), so rings of workers that are
    gone never pin shared memory."""

    def __init__(self) -> None:
        self._names: set[str] = set()

    def __len__(self) -> int:
        return len(self._names)

    def own(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` with tensors of its own: copied out of its worker's ring, unless pinned (the
        pinning thread's copy already is its own)."""
        name = batch.pop(RING_KEY, None)
        if name is None:
            return batch
        self._names.add(name)
        for key, value in batch.items():
            if isinstance(value, Tensor) and not value.is_pinned():
                batch[key] = _copy(value)
        return batch

    def clear(self, workers: Iterable[int] = ()) -> None:
        """Let every ring of this stream go: those its batches came from and all of these
        worker processes' (the stream's, which have stopped)."""
        RECEIVED.forget(self._names, workers)
        self._names.clear()


def _copy(tensor: Tensor) -> Tensor:
    """A copy made by numpy, on this thread alone. `Tensor.clone` spreads a big copy over
    torch's intra-op threads, which, while loader workers keep the other cores busy, wait for
    each other and spin: measured on the 2-vCPU machine with one worker, 7-8 ms a 5 MB batch
    against 1 ms on one thread, and the spinning slowed the worker too."""
    return torch.from_numpy(np.array(tensor.numpy(), copy=True))


def own_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """`batch` with tensors of its own (see RingMappings.own)."""
    return RingMappings().own(batch)
