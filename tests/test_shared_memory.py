"""The loader's shared-memory rings are checked against /dev/shm before any worker starts."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest

from pipeline.schema import field_sizes
from pipeline.train import ring
from pipeline.train.loader import LoaderConfig, make_train_batches, make_train_loader

BATCH = ((1024, 2, 160, 160), (1024, 1, 160, 160), (1024, 1, 80, 80))  # 81.25 MiB, gray


def _shm(monkeypatch, free: int, blocks: int = 1 << 20) -> None:
    found = SimpleNamespace(f_blocks=blocks, f_bavail=free // 4096, f_frsize=4096)
    monkeypatch.setattr(ring.os, "statvfs", lambda folder: found)


def test_rings_larger_than_the_free_shared_memory_are_refused(monkeypatch):
    _shm(monkeypatch, free=64 << 20)  # Docker's default --shm-size
    want = r"7\.62 GiB .*16 workers x 6 batches of 81\.2 MiB.* /dev/shm has 64\.0 MiB free"
    with pytest.raises(ValueError, match=want):
        ring.check_shared_memory(16, 6, BATCH)
    _shm(monkeypatch, free=8 << 30)
    ring.check_shared_memory(16, 6, BATCH)  # 7.62 GiB fit in 8


def test_no_check_where_the_folder_says_nothing_of_its_size(monkeypatch):
    ring.check_shared_memory(16, 6, BATCH, folder=os.path.join(os.sep, "no", "such", "folder"))
    _shm(monkeypatch, free=0, blocks=0)  # gVisor's tmpfs without a size: 0 blocks, 0 free
    ring.check_shared_memory(16, 6, BATCH)


def test_the_training_loaders_check_before_starting_workers(tmp_path, monkeypatch):
    from test_loader import write_test_shards

    write_test_shards(tmp_path, n_train=8, n_test=2, shard_samples=4)
    _shm(monkeypatch, free=1 << 20)  # 1 MiB: 2 workers x 6 slots of 4 samples need 3.8 MiB
    config = LoaderConfig(batch_size=4, workers=2)
    with pytest.raises(ValueError, match="shared memory"):
        make_train_loader(tmp_path, config, epoch=0)
    with pytest.raises(ValueError, match="shared memory"):
        make_train_batches(tmp_path, config, first_epoch=0)
    in_process = LoaderConfig(batch_size=4, workers=0)  # no worker, no ring: nothing to check
    assert len(next(iter(make_train_loader(tmp_path, in_process, epoch=0, steps=1)))["keys"]) == 4


def test_the_rings_of_all_ranks_on_a_machine_are_checked_before_any_starts(
    tiny_shards, tmp_path, monkeypatch
):
    """Each rank alone fits, all of them do not: the run stops before training, naming the
    ranks, where before each rank checked only its own need against what was free when it
    started (a later rank's workers then failed at their first batch)."""
    from conftest import smoke_config

    from pipeline.train.run import train
    from pipeline.train.stages import batch_shapes

    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    shapes = batch_shapes(4, manifest["channels"], field_sizes(manifest))
    one_rank = 2 * 6 * sum(math.prod(shape) for shape in shapes)  # 2 workers x 6 slots
    _shm(monkeypatch, free=3 * one_rank)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # as torchrun sets it: 4 ranks on this machine
    config = smoke_config(tiny_shards, tmp_path / "run", workers=2)
    with pytest.raises(ValueError, match=r"\(4 training processes x 2 workers x 6 batches of"):
        train(config)
    assert not (tmp_path / "run" / "last.pt").exists()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # 3 fit
    train(smoke_config(tiny_shards, tmp_path / "run3", workers=2))
    assert (tmp_path / "run3" / "last.pt").is_file()
