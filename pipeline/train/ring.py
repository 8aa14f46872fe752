"""Reusable shared-memory batch buffers of a loader worker: the trip to the trainer, no new pages.

A DataLoader worker hands each batch to the training process through shared memory. New shared
memory for every batch costs its page faults, and on the development machine that measured about 90
us a sample in a worker, against 180 us for decoding its three images. So each worker writes its
batches into a ring of buffers it allocates once, and the training process copies each batch out as
it receives it (`own_batch`, called by the loader's streams; for a GPU the pinning thread has
already made that copy: see RingBatch). The ring is never ahead of the copies while DataLoader's
requests go round-robin to workers that all keep running, as training workers do (they are endless):
a worker gets the request for its batch j + prefetch_factor only when its batch j reaches the
training process, which copied out batch j - 1 before asking for more, so a ring of prefetch_factor
+ 2 slots never overwrites a batch that was not copied out. Evaluation workers do finish, one before
another, and DataLoader then sends the finished workers' requests to those still running, which may
run further ahead than that: they use no ring.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import Tensor

MAX_SHAPES = 3  # rings kept: the full batch's shapes, and an evaluation's last, shorter batch


class BatchRing:
    """A loader worker's rings of uint8 batch buffers in shared memory, one per set of shapes."""

    def __init__(self, slots: int) -> None:
        if slots < 2:
            raise ValueError(f"a batch ring needs at least 2 slots, not {slots}")
        self.slots = slots
        self._rings: OrderedDict[tuple, list[list[Tensor]]] = OrderedDict()
        self._turn: dict[tuple, int] = {}

    def take(self, shapes: tuple[tuple[int, ...], ...]) -> list[Tensor]:
        """Uninitialised uint8 tensors of these shapes: the next slot of their ring."""
        ring = self._rings.get(shapes)
        if ring is None:
            ring = self._rings[shapes] = _allocate(shapes, self.slots)
            self._turn[shapes] = 0
            if len(self._rings) > MAX_SHAPES:  # in flight elsewhere, a dropped ring lives on
                old, _ = self._rings.popitem(last=False)
                del self._turn[old]
        self._rings.move_to_end(shapes)
        turn = self._turn[shapes]
        self._turn[shapes] = turn + 1
        return ring[turn % self.slots]


def _allocate(shapes: tuple[tuple[int, ...], ...], slots: int) -> list[list[Tensor]]:
    """`slots` sets of tensors of `shapes`, views of one shared-memory storage."""
    sizes = [math.prod(shape) for shape in shapes]
    storage = torch.UntypedStorage._new_shared(slots * sum(sizes))  # as DataLoader's collate does
    flat = torch.empty(0, dtype=torch.uint8).set_(storage)
    ring, start = [], 0
    for _ in range(slots):
        views = []
        for shape, size in zip(shapes, sizes, strict=True):
            views.append(flat[start : start + size].view(shape))
            start += size
        ring.append(views)
    return ring


RING_KEY = "ring"  # a pinned ring batch's entry: the storage of the ring it was copied from
MAPPED_RINGS = 64  # rings a stream keeps mapped (a few per worker)


class RingBatch(dict):
    """A batch whose tensors lie in a loader worker's ring (a dict, of a type the training
    process can tell apart).

    Without pinning, the training process copies it out (`RingMappings.own`). With pinning (a
    GPU), DataLoader's pinning thread calls `pin_memory`, which copies the tensors into pinned
    memory, their own from then on, and passes the ring's storage along under RING_KEY: the
    training process then holds the ring mapped, and the pinning thread finds it mapped for
    the next batch (torch maps a received storage once while any reference to it lives) instead
    of mapping it and faulting its pages in afresh (measured in the training process without
    pinning: 37 against 30 us a sample, 2 vCPUs, gray batches of 100).
    """

    def pin_memory(self, device: str | None = None) -> dict[str, Any]:
        pinned: dict[str, Any] = {}
        for key, value in self.items():
            if isinstance(value, Tensor):
                pinned[RING_KEY] = value.untyped_storage()
                value = value.pin_memory()
            pinned[key] = value
        return pinned


class RingMappings:
    """The rings a stream's batches came from, held in the training process while it reads them.

    torch.multiprocessing maps a received storage once while any reference to it lives; without
    one, every batch would map its ring afresh and fault its pages in again. A stream holds its
    own (at most MAPPED_RINGS) and lets them go with its workers (`clear`), so the rings of
    workers that are gone never pin shared memory.
    """

    def __init__(self) -> None:
        self._storages: OrderedDict[int, torch.UntypedStorage] = OrderedDict()

    def __len__(self) -> int:
        return len(self._storages)

    def own(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` with tensors of its own: a ring batch copied out of its worker's ring; a
        pinned one as it is (the pinning thread's copy is its own), its ring kept mapped."""
        if isinstance(batch, RingBatch):
            owned = {}
            for key, value in batch.items():
                if isinstance(value, Tensor):
                    self._keep(value.untyped_storage())
                    value = _copy(value)
                owned[key] = value
            return owned
        ring = batch.pop(RING_KEY, None)
        if ring is not None:
            self._keep(ring)
        return batch

    def clear(self) -> None:
        """Let every held ring go (the stream's workers have stopped)."""
        self._storages.clear()

    def _keep(self, storage: torch.UntypedStorage) -> None:
        key = storage.data_ptr()
        self._storages[key] = storage
        self._storages.move_to_end(key)
        if len(self._storages) > MAPPED_RINGS:
            self._storages.popitem(last=False)


def _copy(tensor: Tensor) -> Tensor:
    """A copy made by numpy, on this thread alone. `Tensor.clone` spreads a big copy over
    torch's intra-op threads, which, while loader workers keep the other cores busy, wait for
    each other and spin: measured on the 2-vCPU machine with one worker, 7-8 ms a 5 MB batch
    against 1 ms on one thread, and the spinning slowed the worker too."""
    return torch.from_numpy(np.array(tensor.numpy(), copy=True))


def own_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """`batch` with tensors of its own (see RingMappings.own), holding no ring afterwards."""
    return RingMappings().own(batch)
