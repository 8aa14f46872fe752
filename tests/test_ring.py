"""The workers' ring of shared batch buffers: reused slots, and batches the trainer owns."""

from __future__ import annotations

import collections.abc
import copy
import pickle

import pytest
import torch
from torch.utils.data._utils.pin_memory import pin_memory  # what the pinning thread calls

from pipeline.train.augment import AugmentConfig
from pipeline.train.loader import LoaderConfig, make_eval_loader, make_train_loader
from pipeline.train.ring import (
    RECEIVED,
    RING_KEY,
    BatchRing,
    RingBatch,
    RingMappings,
    handover,
    own_batch,
)

SHAPES = ((2, 2, 4, 4), (2, 1, 4, 4))


def _slot(ring: BatchRing, shapes=SHAPES) -> list[torch.Tensor]:
    return ring.take(shapes)[1]


def test_a_ring_cycles_its_slots_in_shared_memory():
    ring = BatchRing(3)
    first = [_slot(ring) for _ in range(3)]
    assert all(t.is_shared() for slot in first for t in slot)
    assert [tuple(t.shape) for t in first[0]] == list(SHAPES)
    pointers = {slot[0].data_ptr() for slot in first}
    assert len(pointers) == 3  # three distinct slots ...
    assert _slot(ring)[0].data_ptr() == first[0][0].data_ptr()  # ... then the first again
    other = _slot(ring, ((1, 2, 4, 4), (1, 1, 4, 4)))  # an evaluation's last, shorter batch
    assert other[0].data_ptr() not in pointers
    with pytest.raises(ValueError, match="2 slots"):
        BatchRing(1)


def test_own_batch_copies_ring_batches_only():
    slot = _slot(BatchRing(2))
    batch = {"inputs": slot[0], "mask": slot[1], "keys": ["a", "b"], RING_KEY: "123-0"}
    owned = own_batch(dict(batch))
    assert RING_KEY not in owned and owned["keys"] == ["a", "b"]
    for key in ("inputs", "mask"):
        assert torch.equal(owned[key], batch[key])
        assert owned[key].data_ptr() != batch[key].data_ptr()  # a copy the ring can't touch
    plain = {"inputs": torch.zeros(2, 2)}
    assert own_batch(plain)["inputs"] is plain["inputs"]  # not from a ring: as it is


def _rows(batches) -> dict[str, torch.Tensor]:
    return {
        key: torch.cat([b["inputs"][i].flatten(), b["mask"][i].flatten(), b["depth"][i].flatten()])
        for b in batches
        for i, key in enumerate(b["keys"])
    }


def test_batches_held_by_the_trainer_survive_the_ring_turning(tiny_shards):
    # The smallest ring (prefetch 1: 3 slots a worker) and all 12 batches held at once: a slot
    # reused too early would change held batches.
    rings = LoaderConfig(batch_size=4, workers=2, prefetch_factor=1)
    held = list(make_eval_loader(tiny_shards, "test", rings))
    plain = list(make_eval_loader(tiny_shards, "test", LoaderConfig(batch_size=4, workers=0)))
    assert len(held) == 12
    want, got = _rows(plain), _rows(held)
    assert set(got) == set(want)
    for key, row in got.items():
        assert torch.equal(row, want[key]), key
    train = list(make_train_loader(tiny_shards, rings, epoch=0, steps=10))
    assert len({tuple(b["keys"]) for b in train}) == 10  # ten different batches, none overwritten
    assert all(RING_KEY not in b for b in train + held)


def test_a_persistent_evaluation_left_early_gives_whole_passes_after(tiny_shards):
    config = LoaderConfig(batch_size=4, workers=2, prefetch_factor=1)
    plain = _rows(make_eval_loader(tiny_shards, "test", LoaderConfig(batch_size=4, workers=0)))
    stream = make_eval_loader(tiny_shards, "test", config, keep_workers=True)
    try:
        first = iter(stream)
        next(first)  # the trainer's --eval-batches stops a pass early
        first.close()
        pids = [w.pid for w in stream.loader._iterator._workers]
        for _ in range(2):
            rows = _rows(list(stream))
            assert set(rows) == set(plain)
            assert all(torch.equal(row, plain[key]) for key, row in rows.items())
        assert [w.pid for w in stream.loader._iterator._workers] == pids  # the same workers
    finally:
        stream.close()
    assert not any(w.is_alive() for w in stream.loader._iterator._workers)


def test_an_evaluation_whose_workers_finish_unevenly_gives_every_sample_once(tmp_path):
    """When some evaluation workers finish early, DataLoader sends their requests to the one
    still running, which can then be more batches ahead than a ring has slots: evaluation must
    not reuse buffers (it gives each batch its own)."""
    import time

    from pipeline.store.runner import ConvertConfig, convert_zips
    from pipeline.store.synth import synth_zips

    zips = synth_zips(tmp_path / "zips", batches=[1, 2], samples=40, seed=3)
    zips += synth_zips(tmp_path / "zips", batches=[3, 4, 5], samples=2, seed=4)
    config = ConvertConfig(
        out=tmp_path / "shards", test_batches=(2, 3, 4, 5), shard_samples=40, progress=False
    )
    assert convert_zips(zips, config).ok  # test shards of 40, 2, 2 and 2 samples: 4 workers
    plain = _rows(make_eval_loader(tmp_path / "shards", "test", LoaderConfig(2, workers=0)))
    got: dict[str, torch.Tensor] = {}
    for batch in make_eval_loader(
        tmp_path / "shards", "test", LoaderConfig(2, workers=4, prefetch_factor=2)
    ):
        time.sleep(0.03)  # a slow consumer: the last worker runs as far ahead as it may
        got.update(_rows([batch]))
    assert set(got) == set(plain) and len(got) == 46
    for key, row in got.items():
        assert torch.equal(row, plain[key]), key


def test_a_stream_lets_its_workers_rings_go_when_they_stop(tiny_shards):
    from pipeline.train.loader import make_train_batches

    config = LoaderConfig(batch_size=4, workers=2, prefetch_factor=1)
    stream = make_train_loader(tiny_shards, config, epoch=0, steps=6)
    held = []
    for _ in stream:
        held.append(len(stream._rings))
    assert 1 <= max(held) <= 2  # one ring per worker while they run ...
    assert len(stream._rings) == 0  # ... none once they stopped
    with make_train_batches(tiny_shards, config, first_epoch=0, steps=3) as run:
        for epoch in range(2):
            assert len(list(run.epoch(epoch))) == 3
        assert 1 <= len(run._rings) <= 2  # persistent workers: the same rings all run long
    assert len(run._rings) == 0
    evaluation = list(make_eval_loader(tiny_shards, "test", config))
    assert evaluation and all(RING_KEY not in b for b in evaluation)


def test_evaluation_workers_use_no_ring(tiny_shards):
    stream = make_eval_loader(tiny_shards, "test", LoaderConfig(batch_size=4, workers=2))
    raw = list(stream.loader)  # the DataLoader's own batches, before the stream copies any
    assert raw and not any(RING_KEY in b for b in raw)
    train = make_train_loader(tiny_shards, LoaderConfig(batch_size=4, workers=2), epoch=0, steps=2)
    first = next(iter(train.loader))
    assert isinstance(first[RING_KEY], str)  # training workers do: the ring's name


def test_the_copy_out_of_a_ring_runs_on_one_thread(monkeypatch):
    """Tensor.clone and copy_ spread a big copy over torch's intra-op threads, which spin while
    loader workers hold the other cores (7x slower on 2 cores, and the workers slowed too): the
    copy out of a ring is numpy's, on the calling thread."""

    def parallel_copy(*_args, **_kwargs):
        raise AssertionError("a torch (intra-op parallel) copy")

    slot = _slot(BatchRing(2))
    slot[0].fill_(7)
    batch = {"inputs": slot[0], "mask": slot[1], RING_KEY: "123-0"}
    monkeypatch.setattr(torch.Tensor, "clone", parallel_copy)
    monkeypatch.setattr(torch.Tensor, "copy_", parallel_copy)
    owned = own_batch(batch)
    assert owned["inputs"].data_ptr() != slot[0].data_ptr() and int(owned["inputs"].max()) == 7


def _fake_pin(tensor: torch.Tensor) -> torch.Tensor:
    """Tensor.pin_memory needs CUDA: a copy of its own stands in for the pinned one."""
    return torch.from_numpy(tensor.numpy().copy())


def _pin_mapping_first(data):
    """torch 2.6's order (pytorch#82185): a Mapping is pinned value by value before any
    `pin_memory` method of its own is looked at."""
    if isinstance(data, torch.Tensor):
        return data.pin_memory()
    if isinstance(data, (str, bytes)):
        return data
    if isinstance(data, collections.abc.Mapping):
        clone = copy.copy(data)
        clone.update({key: _pin_mapping_first(value) for key, value in data.items()})
        return clone
    if isinstance(data, list):
        return [_pin_mapping_first(value) for value in data]
    if hasattr(data, "pin_memory"):
        return data.pin_memory()
    return data


@pytest.mark.parametrize("pin", [pin_memory, _pin_mapping_first], ids=["installed", "torch-2.6"])
def test_the_pinning_thread_passes_the_ring_name_on(monkeypatch, pin):
    slot = _slot(BatchRing(2))
    slot[0].fill_(3)
    ring_ptr = slot[0].data_ptr()
    monkeypatch.setattr(torch.Tensor, "pin_memory", _fake_pin)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda tensor: tensor.data_ptr() != ring_ptr)
    batch = {"inputs": slot[0], "mask": slot[1], "keys": ["a", "b"], "skipped": 0}
    pinned = pin({**batch, RING_KEY: "123-0"})
    assert pinned["keys"] == ["a", "b"] and pinned["skipped"] == 0
    assert pinned["inputs"].data_ptr() != ring_ptr and int(pinned["inputs"].max()) == 3
    assert pinned[RING_KEY] == "123-0"  # the ring's name, passed on
    rings = RingMappings()
    inputs = pinned["inputs"]
    owned = rings.own(pinned)
    assert RING_KEY not in owned and owned["inputs"] is inputs  # pinned: not copied again
    assert len(rings) == 1  # the stream lets the ring go with its workers


def _ring_batch(ring: BatchRing, fill: int) -> dict:
    shared, (inputs, mask) = ring.take(SHAPES)
    inputs.fill_(fill)
    mask.fill_(fill + 1)
    return {"inputs": inputs, "mask": mask, "keys": ["a", "b"], "epoch": 2, RING_KEY: shared}


def _trip(batch: dict) -> dict:
    """Through pickle as a worker's queue sends it (torch's reductions: descriptors shared)."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's reductions)

    (sent,) = handover([batch])
    return pickle.loads(ForkingPickler.dumps(sent))


def test_a_ring_crosses_once_then_its_batches_by_name(monkeypatch):
    ring = BatchRing(3)
    sent: list = []
    original = RingBatch.__reduce__

    def watched(self):
        reduced = original(self)
        sent.append(reduced[1][1])  # the storage, or None
        return reduced

    monkeypatch.setattr(RingBatch, "__reduce__", watched)
    got = [_trip(_ring_batch(ring, fill)) for fill in (1, 5, 9, 13)]  # the ring turns over
    try:
        assert [s is not None for s in sent] == [True, False, False, False]
        name = got[0][RING_KEY]
        assert all(b[RING_KEY] == name for b in got) and name in RECEIVED
        for batch in got:
            assert batch["keys"] == ["a", "b"] and batch["epoch"] == 2
            assert batch["inputs"].shape == SHAPES[0] and batch["mask"].shape == SHAPES[1]
        # A view of the one storage received: the last batch reused the first's slot.
        assert got[3]["inputs"].data_ptr() == got[0]["inputs"].data_ptr()
        assert int(got[3]["inputs"].max()) == 13 and int(got[3]["mask"].min()) == 14
        assert int(got[2]["inputs"].min()) == 9  # slots of their own until the ring turns
        rings = RingMappings()
        owned = rings.own(got[3])
        assert owned["inputs"].data_ptr() != got[0]["inputs"].data_ptr()  # copied out
        rings.clear()
        assert name not in RECEIVED  # let go with the stream's workers
        with pytest.raises(RuntimeError, match=f"ring {name}, which this process never received"):
            _trip(_ring_batch(ring, 0))  # its storage went with the first batch
    finally:
        RECEIVED.forget([name])


def test_a_ring_batch_leaves_its_worker_only_as_a_ring_batch():
    batch = _ring_batch(BatchRing(2), 0)
    with pytest.raises(TypeError, match="as a RingBatch"):
        pickle.dumps(batch)  # never its ring, tensors and all, by accident
    shared, slot = batch[RING_KEY], batch["inputs"]
    batch["inputs"] = torch.zeros(SHAPES[0], dtype=torch.uint8)  # not a slot of the ring
    # Raised in the worker's loop, as the batch is handed over (DataLoader sends the error on
    # to the trainer); pickling, later, in the queue's thread, could only drop the batch.
    with pytest.raises(ValueError, match=f"'inputs' is not a slot of ring {shared.name}"):
        list(handover([batch]))
    batch["inputs"] = slot.flip(-1)  # a copy: not the slot either
    with pytest.raises(ValueError, match="not a slot"):
        list(handover([batch]))
    batch["inputs"] = slot
    (good,) = handover([batch])
    assert good.storage is shared.storage  # the failed ones did not use up the first send
    plain = {"inputs": torch.zeros(2)}
    assert list(handover([plain])) == [plain]  # no ring: as it is


def test_a_training_stream_receives_each_ring_once(tiny_shards, monkeypatch):
    # Through the worker's augmentation (in place), its default_convert and the queue: what the
    # pinning thread receives on a GPU. One worker, one ring: one storage received, 6 batches.
    from multiprocessing import resource_sharer

    received = []
    original = resource_sharer.DupFd.detach

    def counted(self):  # in this process: a descriptor fetched from a worker
        received.append(self)
        return original(self)

    monkeypatch.setattr(resource_sharer.DupFd, "detach", counted)
    config = LoaderConfig(batch_size=4, workers=1, augment=AugmentConfig())
    stream = make_train_loader(tiny_shards, config, epoch=0, steps=6)
    raw = iter(stream.loader)
    try:
        batches = [next(raw) for _ in range(6)]
    finally:
        raw._shutdown_workers()
    assert all(b["epoch"] == 0 and len(b["keys"]) == 4 for b in batches)
    assert len({b[RING_KEY] for b in batches}) == 1
    pointers = {b["inputs"].untyped_storage().data_ptr() for b in batches}
    assert len(received) == 1 and len(pointers) == 1  # before: 3 descriptors a batch
    RECEIVED.forget([batches[0][RING_KEY]])


def test_received_rings_are_bounded_and_the_oldest_unused_go_first():
    from pipeline.train.ring import ReceivedRings

    rings = ReceivedRings(limit=2)
    storages = [torch.UntypedStorage(4) for _ in range(3)]
    rings.storage("w-0", storages[0])
    rings.storage("w-1", storages[1])
    assert rings.storage("w-0", None) is storages[0]  # w-0 in use again: w-1 is the oldest now
    rings.storage("w-2", storages[2])
    assert "w-0" in rings and "w-2" in rings and "w-1" not in rings and len(rings) == 2
    with pytest.raises(RuntimeError, match="ring w-1"):
        rings.storage("w-1", None)
    rings.forget(["w-0", "w-2", "never"])
    assert len(rings) == 0


def test_a_stream_lets_go_of_its_workers_rings_even_those_it_never_took(tiny_shards):
    # One step of two workers: the second worker's batches arrive (and bring its ring) but the
    # stream takes none of them. Stopping, it lets go of every ring its workers sent.
    before = set(RECEIVED._storages)
    config = LoaderConfig(batch_size=4, workers=2, prefetch_factor=2)
    for _ in range(2):
        assert len(list(make_train_loader(tiny_shards, config, epoch=0, steps=1))) == 1
        assert set(RECEIVED._storages) == before


def test_forgetting_a_workers_rings_by_its_process_id():
    from pipeline.train.ring import ReceivedRings

    rings = ReceivedRings()
    for name in ("41-0", "41-1", "411-0", "42-0"):
        rings.storage(name, torch.UntypedStorage(4))
    rings.forget(["42-0"], workers=[41])
    assert sorted(rings._storages) == ["411-0"]  # 41's two, and 42-0 by name; not 411's


def test_a_forked_worker_keeps_none_of_its_parents_rings():
    import os

    RECEIVED.storage("parent-0", torch.UntypedStorage(4))
    try:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what it holds, and leave at once
            os.write(write, str(len(RECEIVED)).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(read, 16) == b"0" and "parent-0" in RECEIVED
    finally:
        RECEIVED.forget(["parent-0"])
