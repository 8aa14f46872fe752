"""The streaming loader: batches, epoch orders, equal steps per rank, eval coverage, bad samples."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import logging
import random
import shutil
import tarfile
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.images import decode_simplejpeg
from pipeline.schema import SAMPLE_MIN_BYTES
from pipeline.store import tarread as shardreader
from pipeline.store.names import sample_key
from pipeline.train import augment as augmentation
from pipeline.train.augment import AugmentConfig
from pipeline.train.batches import LoaderError
from pipeline.train.loader import (
    LoaderConfig,
    make_eval_loader,
    make_train_batches,
    make_train_loader,
    to_device,
)
from pipeline.train.shards import read_shards
from pipeline.train.sources import (
    assign_shards,
    open_manifest,
    shard_order,
    slot_sample_counts,
    train_steps_per_epoch,
    trainable_samples,
)
from pipeline.train.stages import (
    collate,
    shuffle_samples,
)

BG, FG_BG = 40, 200  # flat gray levels: bg and fg_bg are told apart by their value
TEST_BATCH = 10


def _jpeg(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 75])
    assert ok
    return buf.tobytes()


@functools.cache
def _images(mode: str) -> dict[str, bytes]:
    """One sample's four JPEGs (the same for every sample: the tests follow keys, not pixels)."""
    shape = (160, 160, 3) if mode == "RGB" else (160, 160)
    mask = np.zeros((160, 160), np.uint8)
    mask[40:120, 40:120] = 255
    return {
        "bg": _jpeg(np.full(shape, BG, np.uint8)),
        "fg_bg": _jpeg(np.full(shape, FG_BG, np.uint8)),
        "mask": _jpeg(mask),
        "depth": _jpeg(np.full((80, 80), 128, np.uint8)),
    }


def _write_shard(
    path: Path, keys: list[str], mode: str, bad_keys, twice_keys=(), extra=None
) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key in keys:
            files = {f"{field}.jpg": data for field, data in _images(mode).items()}
            if key in bad_keys:
                files["fg_bg.jpg"] = b"this is not a JPEG"
            files["json"] = json.dumps({"batch": int(key[1:3])}).encode()
            members = list(files.items())
            if key in twice_keys:  # a second mask file, as a damaged or hand-made shard may hold
                members.append(("mask.jpg", files["mask.jpg"]))
            members += (extra or {}).get(key, [])  # (suffix, payload) pairs after its files
            for suffix, payload in members:
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mode = len(payload), 0o444
                tar.addfile(info, io.BytesIO(payload))
    raw = path.read_bytes()
    return {
        "path": f"{path.parent.name}/{path.name}",
        "batch": int(path.name[5:7]),
        "samples": len(keys),
        "bytes": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }


def write_test_shards(
    root: Path,
    n_train: int,
    n_test: int,
    shard_samples: int,
    mode: str = "L",
    bad_keys=(),
    twice_keys=(),
    extra=None,
) -> dict:
    """Shards per docs/FORMAT.md (train: batch 1, test: batch 10) plus manifest.json; returns it."""
    splits = {}
    for split, batch, count in (("train", 1, n_train), ("test", TEST_BATCH, n_test)):
        keys = [f"b{batch:02d}_{i}_{i % 100 + 1}_0_0" for i in range(count)]
        shards = [
            _write_shard(
                root / split / f"batch{batch:02d}-{n:06d}.tar",
                keys[start : start + shard_samples],
                mode,
                set(bad_keys),
                set(twice_keys),
                extra,
            )
            for n, start in enumerate(range(0, count, shard_samples))
        ]
        splits[split] = {"samples": count, "shards": shards}
    manifest = {
        "format": "pipeline-shards",
        "version": 1,
        "mode": mode,
        "channels": 3 if mode == "RGB" else 1,
        "sizes": {"bg": [160, 160], "fg_bg": [160, 160], "mask": [160, 160], "depth": [80, 80]},
        "test_batches": [TEST_BATCH],
        "splits": splits,
        "skipped": [],
        "sources": [],
        "tool": "tests",
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _keys(stream) -> list[str]:
    return [key for batch in stream for key in batch["keys"]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """30 train samples in 3 shards (uneven against 2 ranks x 2 workers); 22 test in 10, 10, 2."""
    root = tmp_path_factory.mktemp("shards")
    write_test_shards(root, n_train=30, n_test=22, shard_samples=10)
    return root


def test_eval_batch_shapes_dtypes_and_channel_order(shards):
    stream = make_eval_loader(shards, "test", LoaderConfig(batch_size=8, workers=0))
    batches = list(stream)
    assert [len(b["keys"]) for b in batches] == [8, 8, 6]  # batches span shards
    assert len(stream) == len(batches)
    batch = batches[0]
    # uint8 through the workers (a quarter of float32's bytes); to_device makes them [0, 1].
    assert batch["inputs"].shape == (8, 2, 160, 160) and batch["inputs"].dtype == torch.uint8
    fg_bg, bg = batch["inputs"][:, 0].float(), batch["inputs"][:, 1].float()  # fg_bg first
    assert torch.allclose(fg_bg, torch.tensor(float(FG_BG)), atol=3)
    assert torch.allclose(bg, torch.tensor(float(BG)), atol=3)
    assert batch["mask"].shape == (8, 1, 160, 160) and batch["mask"].dtype == torch.uint8
    assert batch["depth"].shape == (8, 1, 80, 80) and batch["depth"].dtype == torch.uint8
    assert batch["mask"][0, 0, 80, 80] > 200 and batch["mask"][0, 0, 5, 5] < 50
    assert batch["skipped"] == 0 and stream.skipped == 0


def test_rgb_shards_give_six_input_channels(tmp_path):
    write_test_shards(tmp_path, n_train=12, n_test=0, shard_samples=6, mode="RGB")
    config = LoaderConfig(batch_size=4, workers=0, shuffle_buffer=5)
    batch = next(iter(make_train_loader(tmp_path, config, epoch=0)))
    assert batch["inputs"].shape == (4, 6, 160, 160)
    assert torch.allclose(batch["inputs"][:, :3].float(), torch.tensor(float(FG_BG)), atol=3)
    assert batch["mask"].shape == (4, 1, 160, 160) and batch["depth"].shape == (4, 1, 80, 80)


def test_shard_order_differs_by_epoch_and_repeats_for_the_same_epoch():
    urls = [f"s{i}.tar" for i in range(20)]
    assert shard_order(urls, seed=0, epoch=3) == shard_order(urls, seed=0, epoch=3)
    assert shard_order(urls, seed=0, epoch=3) != shard_order(urls, seed=0, epoch=4)
    assert sorted(shard_order(urls, seed=0, epoch=3)) == sorted(urls)


def test_train_sample_order_depends_on_epoch_only(shards):
    config = LoaderConfig(batch_size=5, workers=0, shuffle_buffer=8)

    def order(epoch):
        return _keys(make_train_loader(shards, config, epoch=epoch, steps=6))

    first = order(0)
    assert first == order(0)
    assert first != order(1)
    assert set(first) <= {f"b01_{i}_{i % 100 + 1}_0_0" for i in range(30)}


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_gets_exactly_steps_full_batches(shards, workers):
    # 3 shards for 2 ranks x 2 workers: some readers have no shard of their own, and the
    # requested steps need more samples than a pass holds, so the workers must cycle.
    config = LoaderConfig(batch_size=4, workers=workers, shuffle_buffer=6, prefetch_factor=2)
    for rank in range(2):
        stream = make_train_loader(shards, config, epoch=0, rank=rank, world_size=2, steps=9)
        sizes = [len(batch["keys"]) for batch in stream]
        assert sizes == [4] * 9 and len(stream) == 9


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("shard_samples", [10, 40])  # a shard per slot, or one for all
def test_an_epoch_of_one_pass_gives_every_sample_once(tmp_path, workers, shard_samples):
    # 40 samples, 2 ranks, batch 5: 4 steps a rank, one pass over each slot's share. A shuffle
    # buffer mixing across passes gave repeats here (and missed samples); each pass is its own.
    write_test_shards(tmp_path, n_train=40, n_test=0, shard_samples=shard_samples)
    config = LoaderConfig(batch_size=5, workers=workers, prefetch_factor=2)
    every = {f"b01_{i}_{i % 100 + 1}_0_0" for i in range(40)}
    orders = []
    for epoch in range(2):
        keys = []
        for rank in range(2):
            stream = make_train_loader(tmp_path, config, epoch=epoch, rank=rank, world_size=2)
            assert len(stream) == 4
            keys += _keys(stream)
        assert len(keys) == 40 and set(keys) == every
        orders.append(keys)
    assert orders[0] != orders[1]


def _worker_pids(stream) -> list[int]:
    """The worker processes behind a TrainBatches (private DataLoader state; none in-process)."""
    return [worker.pid for worker in getattr(stream._batches, "_workers", [])]


@pytest.mark.parametrize(("workers", "first"), [(2, 0), (2, 1), (0, 0)])
def test_one_set_of_workers_gives_each_epoch_as_a_fresh_loader_would(shards, workers, first):
    # 3 steps over 2 workers: epochs end mid-round, so the workers swap roles between epochs;
    # starting at epoch 1 is a resumed run, which must see the same batches there.
    config = LoaderConfig(batch_size=4, workers=workers, shuffle_buffer=6, prefetch_factor=2)
    seen, pids = [], None
    with make_train_batches(shards, config, first_epoch=first, rank=1, world_size=2, steps=3) as s:
        for epoch in range(first, first + 3):
            stream = s.epoch(epoch)
            batches = list(stream)
            assert len(stream) == 3 and [b["epoch"] for b in batches] == [epoch] * 3
            fresh = make_train_loader(shards, config, epoch=epoch, rank=1, world_size=2, steps=3)
            assert [b["keys"] for b in batches] == [b["keys"] for b in fresh]
            assert pids is None or _worker_pids(s) == pids  # the same processes all along
            pids = _worker_pids(s)
            seen.append(_keys(batches))
    assert len(pids) == workers
    assert seen[0] != seen[1] != seen[2]  # a new shard order and shuffle every epoch


def test_an_epoch_left_early_leaves_no_stale_batch_in_the_next(shards):
    config = LoaderConfig(batch_size=4, workers=2, shuffle_buffer=6, prefetch_factor=2)
    with make_train_batches(shards, config, first_epoch=0, steps=5) as stream:
        first = iter(stream.epoch(0))
        next(first)  # one batch of five; the workers have prefetched more of epoch 0
        first.close()
        second = list(stream.epoch(1))
        with pytest.raises(ValueError, match="epoch 3 asked for"):
            stream.epoch(3)  # epochs come in order
    assert [b["epoch"] for b in second] == [1] * 5
    fresh = make_train_loader(shards, config, epoch=1, steps=5)
    assert [b["keys"] for b in second] == [b["keys"] for b in fresh]


def test_default_steps_per_epoch(shards):
    config = LoaderConfig(batch_size=4, workers=2, prefetch_factor=2)
    stream = make_train_loader(shards, config, epoch=0, rank=1, world_size=2)
    assert len(stream) == train_steps_per_epoch(open_manifest(shards), 4, 2) == 3
    assert len(list(stream)) == 3
    with pytest.raises(ValueError, match="no samples"):
        train_steps_per_epoch({"splits": {"train": {"samples": 0}}}, 4, 1)


def test_a_local_shard_of_another_size_counts_what_its_file_can_hold(tmp_path, caplog):
    manifest = write_test_shards(tmp_path, n_train=8, n_test=4, shard_samples=4)
    first, second = manifest["splits"]["train"]["shards"]
    size = (tmp_path / first["path"]).stat().st_size
    assert trainable_samples(tmp_path, manifest) == 8 and not caplog.text  # sizes as said
    # Within the bytes bound (2**53 bytes hold 2**40 samples): only the file disagrees. The
    # epoch was 2**40 / 4 steps over the shard's 4 samples, and the same over a URL.
    first.update(samples=2**40, bytes=2**53)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="pipeline.train.sources"):
        held = trainable_samples(tmp_path, manifest)
    assert held == size // SAMPLE_MIN_BYTES + 4 and held < 100
    assert (
        f"{tmp_path / first['path']}: {size} bytes, the manifest says {2**53} bytes (cut short or "
        f"changed since convert: `pipeline verify {tmp_path}` says what is wrong); the steps per "
        f"epoch count at most {held - 4} samples in it, not the manifest's {2**40}"
    ) in caplog.text
    assert train_steps_per_epoch(manifest, 4, 1, held) == held // 4
    config = LoaderConfig(batch_size=4, workers=0)
    assert len(make_train_loader(tmp_path, config, epoch=0)) == held // 4
    assert trainable_samples(f"file://{tmp_path}", manifest, warn=False) == held  # a local file
    (tmp_path / second["path"]).unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.train.sources"):
        assert trainable_samples(tmp_path, manifest) == held - 4  # a missing file holds none
    assert f"{second['path']}: cannot stat it (No such file or directory)" in caplog.text
    caplog.clear()
    # A shard served from elsewhere is not looked at before it is read: the manifest's counts.
    assert trainable_samples("http://127.0.0.1:9/shards", manifest) == 2**40 + 4
    assert not caplog.text


@pytest.mark.parametrize("shard_samples", [3, 40])  # 8 shards, or one shard: fewer than slots
def test_eval_covers_every_key_once_across_ranks_and_workers(tmp_path, shard_samples):
    write_test_shards(tmp_path, n_train=4, n_test=23, shard_samples=shard_samples)
    config = LoaderConfig(batch_size=4, workers=2, prefetch_factor=2)
    seen = []
    for rank in range(2):
        stream = make_eval_loader(tmp_path, "test", config, rank=rank, world_size=2)
        keys = _keys(stream)
        assert len(stream) == len(list(stream))
        seen += keys
    assert len(seen) == len(set(seen)) == 23
    assert set(seen) == {f"b10_{i}_{i % 100 + 1}_0_0" for i in range(23)}


def test_undecodable_sample_is_skipped_warned_and_counted(tmp_path, caplog):
    bad = ["b10_3_4_0_0", "b10_11_12_0_0", "b01_5_6_0_0"]
    write_test_shards(tmp_path, n_train=20, n_test=20, shard_samples=10, bad_keys=bad)
    with caplog.at_level(logging.WARNING, logger="pipeline.train.stages"):
        stream = make_eval_loader(tmp_path, "test", LoaderConfig(batch_size=6, workers=0))
        keys = _keys(stream)
    assert stream.skipped == 2
    assert sorted(keys) == sorted({f"b10_{i}_{i % 100 + 1}_0_0" for i in range(20)} - set(bad))
    warned = [r.getMessage() for r in caplog.records if "b10_3_4_0_0" in r.getMessage()]
    assert len(warned) == 1 and "batch10-000000.tar" in warned[0] and "fg_bg.jpg" in warned[0]
    # A pass per epoch by the same loader (the trainer's): still once, not once a pass.
    again = make_eval_loader(tmp_path, "test", LoaderConfig(batch_size=6, workers=0))
    with caplog.at_level(logging.WARNING, logger="pipeline.train.stages"):
        caplog.clear()
        assert len(_keys(again)) == len(_keys(again)) == 18 and again.skipped == 2
    assert sum("b10_3_4_0_0" in r.getMessage() for r in caplog.records) == 1
    # Across worker processes too, and in an endless training stream.
    workers = LoaderConfig(batch_size=6, workers=2, prefetch_factor=2)
    assert make_eval_loader(tmp_path, "test", workers).skipped == 0  # counted while iterating
    stream = make_eval_loader(tmp_path, "test", workers)
    assert len(_keys(stream)) == 18 and stream.skipped == 2
    # Without shuffling, 4 batches of 5 hold the first pass's 19 good samples: the skip is in.
    config = LoaderConfig(batch_size=5, workers=0, shuffle_buffer=1)
    train = make_train_loader(tmp_path, config, epoch=0, steps=4)
    assert "b01_5_6_0_0" not in _keys(train) and train.skipped == 1
    # Read again in each cycle of an epoch (12 batches of 5: three passes), counted once,
    # also when a later cycle deals its shard to another worker.
    train = make_train_loader(tmp_path, config, epoch=0, steps=12)
    assert "b01_5_6_0_0" not in _keys(train) and train.skipped == 1
    dealt = LoaderConfig(batch_size=4, workers=2, shuffle_buffer=1, prefetch_factor=2)
    train = make_train_loader(tmp_path, dealt, epoch=0, steps=40)  # 160 samples: 8 passes
    assert "b01_5_6_0_0" not in _keys(train) and train.skipped == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_a_training_split_of_only_bad_samples_fails_after_one_pass(tmp_path, workers):
    bad = [f"b01_{i}_{i % 100 + 1}_0_0" for i in range(12)]
    write_test_shards(tmp_path, n_train=12, n_test=0, shard_samples=6, bad_keys=bad)
    config = LoaderConfig(batch_size=4, workers=workers, prefetch_factor=2)
    with pytest.raises((LoaderError, ValueError), match="no sample could be decoded"):
        _keys(make_train_loader(tmp_path, config, epoch=0))  # not an endless search


def test_a_file_twice_refuses_its_sample_alone_not_the_rest_of_its_shard(tmp_path, caplog):
    from pipeline.store.verify import verify_shard

    twice = "b10_3_4_0_0"
    manifest = write_test_shards(tmp_path, 10, 20, shard_samples=10, twice_keys=[twice])
    with caplog.at_level(logging.WARNING, logger="pipeline.train.stages"):
        stream = make_eval_loader(tmp_path, "test", LoaderConfig(batch_size=6, workers=0))
        keys = _keys(stream)
    assert stream.skipped == 1
    assert sorted(keys) == sorted({f"b10_{i}_{i % 100 + 1}_0_0" for i in range(20)} - {twice})
    assert f"a second mask.jpg file for sample {twice}" in caplog.text
    check = verify_shard(tmp_path, "test", manifest["splits"]["test"]["shards"][0], manifest)
    assert check.samples == 10  # every sample read: the count matches the manifest's
    assert [(p["sample"], p["problem"]) for p in check.problems] == [
        (twice, f"{twice}.mask.jpg: a second mask.jpg file for sample {twice}")
    ]


def test_a_member_named_as_a_readers_own_entry_refuses_its_sample(tmp_path, caplog):
    # `KEY.__cycle__` is the loader's own mark of a training sample's cycle: stored as a field,
    # it made an evaluation skip go uncounted (its cycle is not 0), and verify passed any
    # `KEY.__NAME__` member as if it were not there.
    from pipeline.store.verify import verify_shard

    bad, odd = "b10_3_4_0_0", "b10_5_6_0_0"
    extra = {bad: [("__cycle__", b"1")], odd: [("__evil__", b"x" * 1000)]}
    manifest = write_test_shards(tmp_path, 10, 20, 10, bad_keys=[bad], extra=extra)
    with caplog.at_level(logging.WARNING, logger="pipeline.train.stages"):
        stream = make_eval_loader(tmp_path, "test", LoaderConfig(batch_size=6, workers=0))
        keys = _keys(stream)
    assert stream.skipped == 2 and len(keys) == 18  # every sample counted: kept or skipped
    assert f"{odd}.__evil__: a file named as a reader's own entry" in caplog.text
    check = verify_shard(tmp_path, "test", manifest["splits"]["test"]["shards"][0], manifest)
    assert check.samples == 10
    assert sorted((p["sample"], p["problem"].split(":")[0]) for p in check.problems) == [
        (bad, f"{bad}.__cycle__"),
        (bad, "fg_bg.jpg"),
        (odd, f"{odd}.__evil__"),
    ]


def test_a_member_name_that_is_not_utf8_refuses_its_sample_alone(tmp_path, caplog):
    # Before, the name's decoding error stopped the shard: the samples after it were lost
    # (training warned `cannot read the shard`, verify counted the samples before it).
    from pipeline.store.verify import verify_shard

    bad = "b10_3_4_0_0"
    extra = {bad: [("mask\udcff.jpg", b"x")]}  # tarfile writes the lone surrogate as byte 0xff
    manifest = write_test_shards(tmp_path, 10, 20, shard_samples=20, extra=extra)
    assert b"mask\xff.jpg" in (tmp_path / "test" / "batch10-000000.tar").read_bytes()
    with caplog.at_level(logging.WARNING, logger="pipeline.train.stages"):
        stream = make_eval_loader(tmp_path, "test", LoaderConfig(batch_size=6, workers=0))
        keys = _keys(stream)
    assert stream.skipped == 1 and len(keys) == 19 and bad not in keys
    why = f"{bad}.mask\\xff.jpg: a member name that is not UTF-8, in sample {bad}"
    assert why in caplog.text
    check = verify_shard(tmp_path, "test", manifest["splits"]["test"]["shards"][0], manifest)
    assert check.samples == 20  # every sample read: the count matches the manifest's
    assert [(p["sample"], p["problem"]) for p in check.problems] == [(bad, why)]


def test_a_shard_with_fewer_samples_than_its_manifest_says_is_named(tmp_path, caplog):
    write_test_shards(tmp_path, n_train=20, n_test=20, shard_samples=10)
    for split, batch in (("test", TEST_BATCH), ("train", 1)):  # rewritten with 6 of its 10
        keys = [f"b{batch:02d}_{i}_{i % 100 + 1}_0_0" for i in range(6)]
        _write_shard(tmp_path / split / f"batch{batch:02d}-000000.tar", keys, "L", set())
    with pytest.raises(LoaderError, match="batch10-000000.tar: holds 6 samples, the manifest"):
        _keys(make_eval_loader(tmp_path, "test", LoaderConfig(batch_size=4, workers=0)))
    with caplog.at_level(logging.WARNING, logger="pipeline.train.stages"):
        config = LoaderConfig(batch_size=4, workers=0, shuffle_buffer=1)
        assert len(_keys(make_train_loader(tmp_path, config, epoch=0, steps=4))) == 16
    assert "batch01-000000.tar: holds 6 samples, the manifest says 10" in caplog.text
    assert "skipped:" not in caplog.text and "training on the samples it holds" in caplog.text


def test_skips_of_a_worker_that_made_no_batch_are_counted(tmp_path):
    # One shard, dealt to 2 workers by sample: worker 1 gets the odd samples, all undecodable.
    bad = [f"b10_{i}_{i % 100 + 1}_0_0" for i in range(1, 20, 2)]
    write_test_shards(tmp_path, n_train=4, n_test=20, shard_samples=20, bad_keys=bad)
    for workers in (0, 2):
        stream = make_eval_loader(tmp_path, "test", LoaderConfig(batch_size=4, workers=workers))
        batches = list(stream)
        assert all(batch["keys"] for batch in batches)  # the skips' carrier is not yielded
        assert sum(len(b["keys"]) for b in batches) == 10 and stream.skipped == 10, workers
    from model import UNet
    from pipeline.train.loop import evaluate

    metrics, _ = evaluate(UNet.from_args({}), stream, torch.device("cpu"))
    assert metrics["samples"] == 10 and metrics["skipped"] == 10


def test_png_fields_decode_like_jpegs_one_channel_for_masks(tmp_path):
    from conftest import build_zip

    from pipeline.store.runner import ConvertConfig, convert_zips

    z = build_zip(tmp_path / "batch10_images.zip", 6, png_masks=True)  # 3 PNG masks (flip 0)
    out = tmp_path / "shards"
    assert convert_zips([z.path], ConvertConfig(out=out, progress=False)).ok
    batch = next(iter(make_eval_loader(out, "test", LoaderConfig(batch_size=6, workers=0))))
    assert batch["mask"].shape == (6, 1, 160, 160) and batch["mask"].dtype == torch.uint8
    by_key = {sample_key(10, sid): names for sid, names in z.samples.items()}
    pngs = 0
    for key, mask in zip(batch["keys"], batch["mask"], strict=True):
        data = z.members[by_key[key]["mask"]]
        if data.startswith(b"\x89PNG"):  # an RGB PNG -> its one gray channel
            pngs += 1
            want = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        else:
            want = decode_simplejpeg(data, 1)[:, :, 0]
        assert torch.equal(mask[0], torch.from_numpy(want)), key
    assert pngs == 3 and batch["skipped"] == 0


def test_a_field_whose_bytes_are_not_its_names_format_is_named(tmp_path, caplog):
    from pipeline.store.synth import encode_png

    write_test_shards(tmp_path, n_train=4, n_test=4, shard_samples=4)
    path = tmp_path / "test" / f"batch{TEST_BATCH:02d}-000000.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first = members[0][0].name.split(".")[0]
    png = encode_png(np.zeros((160, 160), np.uint8))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name == f"{first}.mask.jpg":  # PNG bytes under the JPEG's name
                data, info.size = png, len(png)
            tar.addfile(info, io.BytesIO(data))
    with caplog.at_level(logging.WARNING, logger="pipeline.train.stages"):
        stream = make_eval_loader(tmp_path, "test", LoaderConfig(batch_size=4, workers=0))
        assert len(_keys(stream)) == 3 and stream.skipped == 1
    assert f"{first} in " in caplog.text
    assert "mask.jpg: holds PNG bytes, not the JPEG its name says" in caplog.text


def test_augmentation_runs_in_training_only(shards, monkeypatch):
    calls = []

    def spy(batch, config, generator):
        calls.append(batch["bg"].shape[0])
        return {**batch, "bg": torch.zeros_like(batch["bg"])}

    monkeypatch.setattr(augmentation, "augment_batch", spy)
    config = LoaderConfig(batch_size=5, workers=0, augment=AugmentConfig())
    train = next(iter(make_train_loader(shards, config, epoch=0, steps=1)))
    assert calls == [5] and torch.all(train["inputs"][:, 1] == 0)  # the bg channel
    evaluation = next(iter(make_eval_loader(shards, "test", config)))
    assert calls == [5] and torch.all(evaluation["inputs"][:, 1] > 0)


def test_real_augmentation_changes_inputs_not_targets(shards):
    noisy = AugmentConfig(noise_p=1.0, noise_std=0.1)
    config = LoaderConfig(batch_size=30, workers=0, augment=noisy)
    train = next(iter(make_train_loader(shards, config, epoch=0, steps=1)))
    plain = next(iter(make_train_loader(shards, LoaderConfig(batch_size=30, workers=0), epoch=0)))
    assert train["keys"] == plain["keys"]  # the same seeds: same order, only the pixels differ
    assert not torch.allclose(train["inputs"].float(), plain["inputs"].float(), atol=5)
    assert torch.equal(train["mask"], plain["mask"]) and torch.equal(train["depth"], plain["depth"])


def test_to_device_makes_floats_in_unit_range(shards):
    batch = next(iter(make_eval_loader(shards, "test", LoaderConfig(batch_size=4, workers=0))))
    inputs, mask, depth = to_device(batch, "cpu", channels_last=True)
    assert inputs.is_contiguous(memory_format=torch.channels_last)
    assert inputs.dtype == mask.dtype == depth.dtype == torch.float32
    assert torch.allclose(inputs[:, 0], torch.tensor(FG_BG / 255), atol=3 / 255)
    assert 0.0 <= mask.min() and mask.max() <= 1.0 and mask.max() > 0.9
    assert torch.allclose(depth, torch.tensor(128 / 255), atol=3 / 255)


def test_assign_shards_and_counts():
    urls = [f"s{i}" for i in range(5)]
    assert assign_shards(urls, 1, 2) == (["s1", "s3"], False)
    assert assign_shards(urls, 3, 8) == (urls, True)  # fewer shards than slots: split samples
    assert slot_sample_counts([10, 10, 2], 2) == [12, 10]
    assert slot_sample_counts([10, 10, 2], 4) == [6, 6, 5, 5]


def test_shuffle_buffer_is_a_permutation():
    items = [{"i": i} for i in range(50)]
    out = [s["i"] for s in shuffle_samples(iter(items), 10, random.Random(0))]
    assert sorted(out) == list(range(50)) and out != list(range(50))


def test_the_shuffle_buffer_is_bounded_in_bytes_not_only_in_samples():
    # A sample may hold 20 MiB (the tar reader's bound); 1000 of them were all held at once.
    from pipeline.train.stages import SHUFFLE_SAMPLE_BYTES

    def held_at_most(samples: list[dict], size: int) -> int:
        taken, most, out = 0, 0, []

        def counted():
            nonlocal taken
            for sample in samples:
                taken += 1
                yield sample

        for sample in shuffle_samples(counted(), size, random.Random(0)):
            most = max(most, taken - len(out) - 1)  # taken, not given out, not this one
            out.append(sample["i"])
        assert sorted(out) == list(range(len(samples)))  # still every sample, once
        return most

    big = [{"i": i, "mask.jpg": bytes(1 << 20)} for i in range(60)]  # 1 MiB each
    assert held_at_most(big, 50) == 50 * SHUFFLE_SAMPLE_BYTES // (1 << 20)  # 12 MiB, not 50
    small = [{"i": i, "mask.jpg": bytes(10_000)} for i in range(60)]
    assert held_at_most(small, 50) == 50  # within the budget: the buffer as before

    # ... and in the same order as before: the budget changes nothing for samples within it.
    def unbounded(items, size, rng):
        buffer = []
        for item in items:
            if len(buffer) < size:
                buffer.append(item)
                continue
            index = rng.randrange(size)
            yield buffer[index]
            buffer[index] = item
        rng.shuffle(buffer)
        yield from buffer

    same = [s["i"] for s in shuffle_samples(iter(small), 20, random.Random(7))]
    assert same == [s["i"] for s in unbounded(iter(small), 20, random.Random(7))]


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="manifest.json"):
        make_eval_loader(tmp_path, "test", LoaderConfig(workers=0))


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset opens http:// with curl")
def test_shards_stream_from_a_url(shards):
    handler = functools.partial(_QuietHandler, directory=str(shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        stream = make_eval_loader(url, "test", LoaderConfig(batch_size=8, workers=0))
        assert len(_keys(stream)) == 22
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


# ustar splits a 130-byte path into prefix and name; GNU (`L`) and pax (`x`) carry a 300-byte one.
@pytest.mark.parametrize(
    ("tar_format", "dir_len"),
    [(tarfile.USTAR_FORMAT, 120), (tarfile.GNU_FORMAT, 300), (tarfile.PAX_FORMAT, 300)],
)
def test_tar_reader_matches_tarfile(tmp_path, tar_format, dir_len):
    long_dir = "d" * dir_len
    members = {"a.bg.jpg": b"x" * 700, f"{long_dir}/b.fg_bg.jpg": b"", "c.json": b"{}" * 256}
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tar_format) as tar:
        tar.addfile(_dir_info("folder"))  # a directory entry: skipped
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with path.open("rb") as stream:
        got = dict(shardreader.tar_files(stream))
    assert got == members


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_damaged_tar_is_reported_with_its_url(tmp_path):
    write_test_shards(tmp_path, n_train=4, n_test=4, shard_samples=4)
    shard = tmp_path / "test" / "batch10-000000.tar"
    raw = bytearray(shard.read_bytes())
    raw[600:700] = b"\xff" * 100  # inside the first member's data: still readable
    raw[3 * 1024 + 100] ^= 0xFF  # a later header's name: its checksum fails
    shard.write_bytes(bytes(raw[:-3000]))
    with pytest.raises(ValueError, match="batch10-000000.tar: cannot read the shard"):
        list(read_shards([str(shard)]))
    shard.write_bytes(bytes(raw[:2000]))  # cut inside a member
    with pytest.raises(ValueError, match="truncated"):
        list(read_shards([str(shard)]))


def test_bench_loader_reports_the_floor_the_loaders_and_the_old_way(shards):
    from pipeline.bench.loader import bench_loader

    result = bench_loader(shards, workers=2, batch_size=5, batches=2, rounds=1)
    rates, ratios = result["rates"], result["ratios"]
    assert set(rates) == {
        "floor",
        "read_floor",
        "1_workers",
        "1_workers_augmenting",
        "2_workers",
        "2_workers_augmenting",
        "old",
    }
    assert all(rate > 0 for rate in rates.values())
    # Ratios are rounded to 2 decimals, the rates to 1.
    assert ratios["one_worker_vs_floor"] == pytest.approx(
        rates["1_workers"] / rates["floor"], abs=0.006
    )
    assert ratios["one_worker_vs_read_floor"] == pytest.approx(
        rates["1_workers"] / rates["read_floor"], abs=0.006
    )
    assert ratios["n_workers_vs_one"] == pytest.approx(
        rates["2_workers"] / rates["1_workers"], abs=0.006
    )
    assert result["samples_per_s"] == rates["2_workers"]
    by_round = result["ratios_by_round"]
    assert len(by_round["one_worker_vs_floor"]) == len(by_round["n_workers_vs_one"]) == 1
    assert by_round["one_worker_vs_floor"][0] == ratios["one_worker_vs_floor"]  # one round: same
    assert result["median_ratios_by_round"] == {k: v[0] for k, v in by_round.items()}
    assert result["speedup"] == pytest.approx(
        rates["2_workers_augmenting"] / result["old_samples_per_s"], abs=0.006
    )
    assert result["decoder"] == "simplejpeg"
    assert set(result["decoders_images_per_s"]) == {"simplejpeg", "cv2", "pil"}


def test_bench_loader_writes_no_file_outside_its_folder_and_skips_bad_samples(
    tmp_path, monkeypatch, caplog
):
    # The old way's loose files were named by key, and a key is a shard's member name: `/abs`
    # or `../` wrote them outside the bench's folder. A sample without a mask was a bare
    # `KeyError: None`, and a fg_bg declaring 30000x30000 was decoded (900 MB) by the decoder
    # measurement, then failed naming nothing.
    import struct

    from pipeline.bench.loader import bench_loader

    root, victim = tmp_path / "shards", tmp_path / "victim"
    write_test_shards(root, n_train=12, n_test=0, shard_samples=12)
    shard = root / "train" / "batch01-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({name.split(".")[0] for name, _ in members})
    renamed = {keys[0]: f"{victim}/abs", keys[1]: "../../../victim/dotdot"}
    huge, no_mask = keys[2], keys[3]
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            key, ext = name.split(".", 1)
            if key == no_mask and ext == "mask.jpg":
                continue
            if key == huge and ext == "fg_bg.jpg":
                sof = data.index(b"\xff\xc0")
                data = data[: sof + 5] + struct.pack(">HH", 30000, 30000) + data[sof + 9 :]
            info = tarfile.TarInfo(f"{renamed.get(key, key)}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp" / "deep"))
    (tmp_path / "tmp" / "deep").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="pipeline.train.stages"):
        result = bench_loader(root, workers=1, batch_size=4, batches=2, rounds=1, pin=False)
    assert not victim.exists() and list((tmp_path / "tmp" / "deep").iterdir()) == []
    assert result["samples"] == 10  # all but the two bad ones, which are named
    assert f"sample {huge} in {shard}: fg_bg.jpg: image is 30000x30000" in caplog.text
    assert f"sample {no_mask} in {shard}: missing mask.jpg|png" in caplog.text


def test_bench_loader_times_after_one_warm_up_batch_from_each_worker():
    from pipeline.bench.loader import time_batches

    taken = []

    def stream():
        for i in range(10):
            taken.append(i)
            yield {"keys": ["k"] * 4}

    started = []
    rate = time_batches(stream(), 5, lambda: started.append(len(taken)), warmup=3)
    assert started == [3]  # the timing starts once the 3 warm-up batches are in
    assert taken == list(range(8)) and rate > 0  # 3 untimed + 5 timed, no more


def test_bench_train_from_shards_skips_the_backlog_made_during_the_warm_up(shards, monkeypatch):
    from pipeline.bench import train as bench
    from pipeline.train.config import TrainConfig

    asked = {}
    real = bench.make_train_loader

    def spy(location, config, **kw):
        asked.update(kw, prefetch=config.prefetch_factor)
        return real(location, config, **kw)

    monkeypatch.setattr(bench, "make_train_loader", spy)
    config = TrainConfig(device="cpu", batch_size=2, workers=2, amp="off", channels_last=False)
    result = bench.bench_train(config, steps=2, warmup=1, shards=str(shards))
    backlog = 2 * asked["prefetch"]  # workers x prefetch_factor batches made ahead
    assert result["from_shards"]["backlog_skipped"] == backlog
    assert asked["steps"] == 1 + backlog + 2  # warm-up, the backlog untimed, then the timed
    assert result["from_shards"]["steps"] == result["model_only"]["steps"] == 2
    assert result["from_shards"]["samples_per_s"] > 0 and result["augment_on"] == "workers"


def test_bench_loader_ratios_by_round_and_their_medians():
    from pipeline.bench.loader import ratios_by_round

    rates = {"floor": [100.0, 200.0, 100.0], "1_workers": [90.0, 100.0, 130.0]}
    by_round, medians = ratios_by_round(rates, {"one": ("1_workers", "floor")})
    assert by_round == {"one": [0.9, 0.5, 1.3]}
    assert medians == {"one": 0.9}  # not the best-of ratio (130 / 200 = 0.65), nor the mean


def test_bench_loader_rows_augment_where_they_say(shards, monkeypatch):
    from pipeline.bench import loader as bench

    seen = {}
    real = bench.make_train_loader

    def spy(location, config, **kw):
        seen[config.workers, config.augment is not None] = True
        return real(location, config, **kw)

    monkeypatch.setattr(bench, "make_train_loader", spy)
    bench.bench_loader(shards, workers=1, batch_size=5, batches=2, rounds=1, old=False)
    assert set(seen) == {(1, False), (1, True)}  # as on a GPU (device), and in the workers


def test_bench_loader_runs_the_floors_and_one_worker_on_one_cpu(shards, monkeypatch):
    """The floors' thread and the 1-worker rows' worker on CPU A, the training process's
    threads on the others once the worker runs; the N-worker rows are left as they are."""
    from pipeline.bench import loader as bench

    moves: list[tuple[str, set]] = []
    real_loader = bench.make_train_loader
    monkeypatch.setattr(bench, "bench_cpus", lambda: ({7}, {8, 9}))
    monkeypatch.setattr(bench, "move_threads", lambda cpus: moves.append(("move", set(cpus))))
    monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: {7, 8, 9})
    monkeypatch.setattr(bench, "decode_floor", lambda *a: moves.append(("floor", None)) or 1.0)

    def loader(location, config, **kw):
        moves.append((f"{config.workers} workers", None))
        return real_loader(location, config, **kw)

    monkeypatch.setattr(bench, "make_train_loader", loader)
    result = bench.bench_loader(shards, workers=2, batch_size=5, batches=2, rounds=1, old=False)
    assert result["pinned"] == {"cpu": 7, "others": [8, 9]}
    one = [("move", {7}), ("1 workers", None), ("move", {8, 9}), ("move", {7, 8, 9})]
    assert moves == [
        ("move", {7}), ("floor", None), ("move", {7, 8, 9}),  # the floors (read floor: real)
        *one, *one,  # 1 worker, as on a GPU and augmenting
        ("2 workers", None), ("2 workers", None),  # N workers: unpinned
    ]  # fmt: skip
    unpinned = bench.bench_loader(shards, workers=1, batch_size=5, batches=2, rounds=1, old=False,
                                  pin=False)  # fmt: skip
    assert unpinned["pinned"] is None


def test_pinning_this_process_and_what_it_forks():
    import multiprocessing
    import os

    from pipeline.bench.loader import bench_cpus, on_cpus

    before = os.sched_getaffinity(0)
    first = {min(before)}
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    with on_cpus(first):
        assert os.sched_getaffinity(0) == first
        child = context.Process(target=lambda: queue.put(os.sched_getaffinity(0)))
        child.start()
        assert queue.get(timeout=30) == first  # a loader worker started here runs there too
        child.join()
    assert os.sched_getaffinity(0) == before
    cpus = bench_cpus()
    assert cpus is None if len(before) < 2 else cpus == (first, before - first)


def test_a_shard_command_that_fails_on_close_is_skipped_not_fatal(caplog):
    # pipe: shards report a failed command only when closed; training must skip, not crash.
    from pipeline.train.shards import read_shards
    from pipeline.train.stages import LogOnce

    with caplog.at_level("WARNING"):
        assert list(read_shards(["pipe:exit 3"], LogOnce())) == []
    assert "pipe:exit 3" in caplog.text


def test_local_shards_are_read_in_big_blocks_and_urls_through_gopen(tmp_path):
    from pipeline.train.shards import SHARD_BUFFER, open_shard

    path = tmp_path / "big.tar"
    path.write_bytes(bytes(range(256)) * (SHARD_BUFFER // 64))  # 4 buffers' worth
    with open_shard(str(path)) as stream:
        assert stream.read(1) == b"\0"
        assert stream.raw.tell() == SHARD_BUFFER  # one read of 256 KB, not of 8 KB
    with open_shard(f"pipe:cat {path}") as stream:  # a URL: gopen's, as before
        assert stream.read(3) == b"\0\1\2"


def test_a_shard_that_is_not_a_regular_file_is_refused_not_waited_on(tmp_path, caplog):
    # A FIFO with no writer blocks open() and read() forever: training must skip it instead.
    import os

    from pipeline.train.stages import LogOnce

    write_test_shards(tmp_path, n_train=4, n_test=4, shard_samples=4)
    good = tmp_path / "train" / "batch01-000000.tar"
    fifo, folder = tmp_path / "train" / "fifo.tar", tmp_path / "train" / "folder.tar"
    os.mkfifo(fifo)
    folder.mkdir()
    got: list = []
    reader = threading.Thread(
        target=lambda: got.extend(read_shards([str(fifo), str(folder), str(good)], LogOnce())),
        daemon=True,  # if it hangs, the test fails rather than waits
    )
    with caplog.at_level("WARNING"):
        reader.start()
        reader.join(30)
    assert not reader.is_alive(), "blocked on the FIFO"
    assert len(got) == 4  # the good shard's samples, after a warning for each of the others
    for path in (fifo, folder):
        assert f"{path}: cannot open the shard (not a regular file)" in caplog.text
    with pytest.raises(ValueError, match="fifo.tar: cannot open the shard .not a regular file"):
        list(read_shards([str(fifo)]))  # evaluation's handler: an error
    with pytest.raises(ValueError, match="cannot open the shard .not a regular file"):
        list(read_shards([f"file://{fifo}"]))  # a file:// URL is a local file too
    spaced = tmp_path / "my set.tar"  # read as gopen reads a file:// URL: decoded, this host
    spaced.write_bytes(good.read_bytes())
    quoted = str(spaced).replace(" ", "%20")
    for url in (f"file://{good}", f"file://{quoted}", f"file://localhost{quoted}"):
        assert len(list(read_shards([url]))) == 4, url


def _rgb_sample(key: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    sample = {"key": key, "mask": rng.integers(0, 256, (160, 160, 1), dtype=np.uint8)}
    sample["depth"] = rng.integers(0, 256, (80, 80, 1), dtype=np.uint8)
    for field in ("bg", "fg_bg"):
        sample[field] = rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)
    return sample


def test_collate_writes_the_model_input_in_place():
    samples = [_rgb_sample(f"k{i}", i) for i in range(3)]
    batch = collate(samples, skipped=2)
    assert batch["keys"] == ["k0", "k1", "k2"] and batch["skipped"] == 2
    want = np.concatenate(
        [np.stack([s[f] for s in samples]).transpose(0, 3, 1, 2) for f in ("fg_bg", "bg")], axis=1
    )
    assert batch["inputs"].shape == (3, 6, 160, 160) and batch["inputs"].dtype == torch.uint8
    assert np.array_equal(batch["inputs"].numpy(), want)  # fg_bg channels first, then bg
    for field in ("mask", "depth"):
        assert np.array_equal(
            batch[field].numpy(), np.stack([s[field] for s in samples])[..., 0][:, None]
        )
    assert not batch["inputs"].is_shared()  # in the training process: plain memory


class _CollateInWorker(torch.utils.data.IterableDataset):
    def __iter__(self):
        batch = collate([_rgb_sample("a", 0), _rgb_sample("b", 1)], 0)
        yield {field: batch[field].is_shared() for field in ("inputs", "mask", "depth")}


def test_a_worker_batches_straight_into_shared_memory():
    # What the queue to the trainer would otherwise copy the batch into.
    loader = torch.utils.data.DataLoader(_CollateInWorker(), batch_size=None, num_workers=1)
    assert list(loader) == [{"inputs": True, "mask": True, "depth": True}]


@pytest.mark.parametrize("fill", ["random", "max"])
def test_tar_checksum_is_the_byte_sum(fill):
    rng = np.random.default_rng(0)
    for _ in range(50):
        header = bytearray(rng.integers(0, 256, 512, dtype=np.uint8).tobytes())
        if fill == "max":  # the largest sums a header can have
            header[:] = b"\xff" * 512
        total = sum(header[:148]) + sum(header[156:]) + 8 * 32
        header[148:156] = f"{total:06o}\0 ".encode()
        shardreader._check_header(bytes(header))
        header[148:156] = f"{total + 1:06o}\0 ".encode()
        with pytest.raises(ValueError, match="checksum"):
            shardreader._check_header(bytes(header))


class _Trickle(io.RawIOBase):
    """A stream that gives at most 100 bytes a read, as a pipe may."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = 100 if size < 0 else min(size, 100)
        chunk = self.data[self.pos : self.pos + size]
        self.pos += len(chunk)
        return chunk


def test_short_reads_give_the_same_samples_and_a_cut_is_still_an_error(shards):
    path = next((Path(shards) / "train").glob("*.tar"))
    data = path.read_bytes()
    with path.open("rb") as stream:
        want = list(shardreader.read_samples(stream, "x.tar"))
    assert len(want) > 1
    assert list(shardreader.read_samples(_Trickle(data), "x.tar")) == want
    for cut in (300, 1024 + 300):  # inside the first header, inside its member's data
        with pytest.raises(ValueError, match="truncated tar"):
            list(shardreader.read_samples(_Trickle(data[:cut]), "x.tar"))
