"""Reusable shared-memory batch buffers of a loader worker: the trip to the trainer, no new pages.

A DataLoader worker hands each batch to the training process through shared memory. New shared
memory for every batch costs its page faults, and on the development machine that measured about 90
us a sample in a worker, against 180 us for decoding its three images. So each worker writes its
batches into a ring of buffers it allocates once, and the training process copies each batch out as
it receives it (`own_batch`, called by the loader's streams; for a GPU the pinning thread has
already made that copy: see RingRef). The ring is never ahead of the copies while DataLoader's
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


RING_KEY = "ring"  # a ring batch's entry: a RingRef to the ring its tensors lie in
MAPPED_RINGS = 64  # rings a stream keeps mapped (a few per worker)


class RingRef:
    """A ring batch's entry under RING_KEY: one of the batch's own tensors, which lie in its
    worker's ring. Pickled with the batch, it names a tensor already in it, so pickle sends that
    tensor once and nothing more is shared.

    Without pinning, the training process copies the batch out and holds the ring mapped
    (`RingMappings.own`). With pinning (a GPU), DataLoader's pinning thread copies the batch's
    tensors into pinned memory and passes this entry on as it is (`pin_memory` returns it;
    torch versions differ in the order they check a mapping and a `pin_memory` method, so the
    batch itself stays a plain dict): the training process still receives the ring, holds it
    mapped, and the pinning thread finds it mapped for the next batch instead of mapping it and
    faulting its pages in afresh (measured in the training process without pinning: 44 against
    38 us a sample, 2 vCPUs, gray batches of 100).
    """

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor

    def pin_memory(self, device: str | None = None) -> RingRef:
        return self


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
        """`batch` with tensors of its own: copied out of its worker's ring, unless pinned (the
        pinning thread's copy already is its own); the ring is held mapped."""
        ring = batch.pop(RING_KEY, None)
        if ring is None:
            return batch
        self._keep(ring.tensor.untyped_storage())
        for key, value in batch.items():
            if isinstance(value, Tensor) and not value.is_pinned():
                batch[key] = _copy(value)
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
