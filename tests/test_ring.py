"""The workers' ring of shared batch buffers: reused slots, and batches the trainer owns."""

from __future__ import annotations

import pytest
import torch

from pipeline.train.loader import LoaderConfig, make_eval_loader, make_train_loader
from pipeline.train.ring import RING_KEY, BatchRing, own_batch

SHAPES = ((2, 2, 4, 4), (2, 1, 4, 4))


def test_a_ring_cycles_its_slots_in_shared_memory():
    ring = BatchRing(3)
    first = [ring.take(SHAPES) for _ in range(3)]
    assert all(t.is_shared() for slot in first for t in slot)
    assert [tuple(t.shape) for t in first[0]] == list(SHAPES)
    pointers = {slot[0].data_ptr() for slot in first}
    assert len(pointers) == 3  # three distinct slots ...
    assert ring.take(SHAPES)[0].data_ptr() == first[0][0].data_ptr()  # ... then the first again
    other = ring.take(((1, 2, 4, 4), (1, 1, 4, 4)))  # an evaluation's last, shorter batch
    assert other[0].data_ptr() not in pointers
    with pytest.raises(ValueError, match="2 slots"):
        BatchRing(1)


def test_own_batch_copies_ring_batches_only():
    slot = BatchRing(2).take(SHAPES)
    batch = {"inputs": slot[0], "mask": slot[1], "keys": ["a", "b"], RING_KEY: True}
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
