"""Augmentation on the training device: the published recipe, seeded, inputs only, joint flips."""

from __future__ import annotations

import pytest
import torch
from conftest import smoke_config
from test_augment import NOTHING

from pipeline.train import augment as augmentation
from pipeline.train.augment import (
    AugmentConfig,
    augment_batch,
    augment_inputs,
    jitter_chunk,
    to_float,
)
from pipeline.train.config import TrainConfig
from pipeline.train.device_augment import DeviceAugment
from pipeline.train.feed import device_augment, loader_config
from pipeline.train.run import train
from pipeline.train.runtime import resolve_augment_on

CPU = torch.device("cpu")


def uint8_batch(n: int = 6, channels: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch as the loader ships it: inputs = fg_bg channels then bg, all uint8."""
    g = torch.Generator().manual_seed(seed)
    images = {
        field: torch.randint(0, 256, (n, channels, 160, 160), dtype=torch.uint8, generator=g)
        for field in ("fg_bg", "bg")
    }
    return {
        **images,
        "inputs": torch.cat([images["fg_bg"], images["bg"]], dim=1),
        "mask": torch.randint(0, 256, (n, 1, 160, 160), dtype=torch.uint8, generator=g),
        "depth": torch.randint(0, 256, (n, 1, 80, 80), dtype=torch.uint8, generator=g),
    }


def on_device(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, mask, depth) as the trainer has them after the copy: [0, 1] floats."""
    return to_float(batch["inputs"]), to_float(batch["mask"]), to_float(batch["depth"])


@pytest.mark.parametrize("channels", [1, 3])
def test_the_same_output_as_augment_batch_with_the_same_generator_state(channels):
    batch = uint8_batch(channels=channels)
    config = AugmentConfig(noise_p=0.5, hflip_p=0.5)
    inputs, mask, depth = on_device(batch)
    got = augment_inputs(inputs, mask, depth, config, torch.Generator().manual_seed(7))
    fields = {f: to_float(batch[f]) for f in ("bg", "fg_bg", "mask", "depth")}
    want = augment_batch(fields, config, torch.Generator().manual_seed(7))
    assert torch.equal(got[0][:, :channels], want["fg_bg"])  # fg_bg first, as the model takes
    assert torch.equal(got[0][:, channels:], want["bg"])
    assert torch.equal(got[1], want["mask"]) and torch.equal(got[2], want["depth"])


def test_only_the_inputs_are_jittered_each_image_its_own_draw():
    batch = uint8_batch(n=4)
    batch["inputs"][:] = 128  # fg_bg and bg: eight identical images
    inputs, mask, depth = on_device(batch)
    before = [t.clone() for t in (inputs, mask, depth)]
    out = augment_inputs(inputs, mask, depth, AugmentConfig(), torch.Generator().manual_seed(0))
    assert torch.equal(out[1], mask) and torch.equal(out[2], depth)  # targets untouched
    levels = torch.cat(out[0].chunk(2, dim=1)).flatten(1)[:, 0]
    assert len(set(levels.tolist())) == 8  # fg_bg and bg jittered separately, per image
    for tensor, copy in zip((inputs, mask, depth), before, strict=True):
        assert torch.equal(tensor, copy), "the batch was changed in place"


def test_the_flip_moves_all_four_images_together():
    batch = uint8_batch(n=32)
    inputs, mask, depth = on_device(batch)
    config = AugmentConfig(**NOTHING, hflip_p=0.5)
    out = augment_inputs(inputs, mask, depth, config, torch.Generator().manual_seed(1))
    flipped = [torch.equal(out[1][i], mask[i].flip(-1)) for i in range(32)]
    assert 0 < sum(flipped) < 32
    for got, original in zip(out, (inputs, mask, depth), strict=True):
        for i, was_flipped in enumerate(flipped):
            expected = original[i].flip(-1) if was_flipped else original[i]
            assert torch.equal(got[i], expected), i


def test_channels_last_inputs_stay_channels_last():
    inputs, mask, depth = on_device(uint8_batch())
    inputs = inputs.contiguous(memory_format=torch.channels_last)
    out = augment_inputs(inputs, mask, depth, AugmentConfig(), torch.Generator().manual_seed(0))
    assert out[0].is_contiguous(memory_format=torch.channels_last)


def test_draws_are_seeded_by_seed_epoch_and_rank():
    inputs, mask, depth = on_device(uint8_batch())

    def draw(seed=0, epoch=0, rank=0):
        augment = DeviceAugment(AugmentConfig(noise_p=0.5), CPU, seed=seed, rank=rank)
        augment.set_epoch(epoch)
        return augment(inputs, mask, depth)[0]

    assert torch.equal(draw(epoch=2), draw(epoch=2))  # a resumed epoch 2 draws the same
    for other in (dict(epoch=3), dict(seed=1, epoch=2), dict(rank=1, epoch=2)):
        assert not torch.equal(draw(epoch=2), draw(**other)), other


def test_auto_is_device_on_a_gpu_and_workers_on_cpu():
    assert resolve_augment_on("auto", torch.device("cuda")) == "device"
    assert resolve_augment_on("auto", CPU) == "workers"
    assert resolve_augment_on("device", CPU) == "device"
    with pytest.raises(ValueError, match="augment-on"):
        resolve_augment_on("gpu", CPU)
    with pytest.raises(ValueError, match="augment_on"):
        TrainConfig(augment_on="gpu").validate()


def test_one_side_augments_never_both():
    device = TrainConfig(augment_on="device")
    assert loader_config(device, CPU).augment is None
    assert device_augment(device, CPU, rank=0).config == AugmentConfig()
    workers = TrainConfig(augment_on="workers", hflip=0.5)
    assert loader_config(workers, CPU).augment == AugmentConfig(hflip_p=0.5)
    assert device_augment(workers, CPU, rank=0) is None
    nothing = TrainConfig(augment_on="device", augment=False)
    assert device_augment(nothing, CPU, rank=0) is None  # --no-augment, no flip: nothing
    assert loader_config(nothing, CPU).augment is None


def test_the_trainer_augments_each_training_batch_on_the_device(tiny_shards, tmp_path, monkeypatch):
    seen = []
    real = augmentation.augment_inputs

    def spy(inputs, mask, depth, config, generator):
        seen.append((inputs.shape[0], generator.initial_seed()))
        return real(inputs, mask, depth, config, generator)

    monkeypatch.setattr(augmentation, "augment_inputs", spy)
    config = smoke_config(tiny_shards, tmp_path / "run", augment_on="device", epochs=2)
    config.steps_per_epoch = 2
    train(config)
    assert [n for n, _ in seen] == [4] * 4  # 2 epochs x 2 steps; evaluation is not augmented
    assert seen[0][1] == seen[1][1] != seen[2][1]  # reseeded for the second epoch


@pytest.mark.slow
def test_a_resumed_run_trains_as_the_uninterrupted_one(tiny_shards, tmp_path):
    # The loader's side of this is test_loader's test_one_set_of_workers_gives_each_epoch_...
    from pipeline.train.checkpoint import load_checkpoint

    def run(out, epochs, resume=False):
        config = smoke_config(tiny_shards, out, augment_on="device", hflip=0.5, epochs=epochs)
        config.steps_per_epoch, config.resume, config.optimizer = 2, resume, "adamw"
        train(config)
        return load_checkpoint(out / "last.pt")["model"]

    straight = run(tmp_path / "straight", epochs=2)
    run(tmp_path / "resumed", epochs=1)
    resumed = run(tmp_path / "resumed", epochs=2, resume=True)
    for name, value in straight.items():
        assert torch.allclose(value.float(), resumed[name].float(), atol=1e-6), name


def test_the_jitter_chunks_rgb_on_a_cpu_only():
    # On a CPU a few RGB images a pass keep the hue's passes in cache; on a GPU each pass is a
    # kernel launch, so the whole batch goes in one ("meta" stands in for a GPU here).
    assert jitter_chunk(torch.empty(512, 3, 160, 160)) == augmentation._CHUNK
    assert jitter_chunk(torch.empty(512, 1, 160, 160)) == 512
    assert jitter_chunk(torch.empty(512, 3, 160, 160, device="meta")) == 512
    assert jitter_chunk(torch.empty(0, 1, 160, 160)) == 1
