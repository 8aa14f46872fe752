"""Augmentation: inputs jittered, targets untouched, flips shared by all four images."""

from __future__ import annotations

import colorsys

import pytest
import torch

from pipeline.train.augment import AugmentConfig, augment_batch, hsv_to_rgb, rgb_to_hsv, to_float

FIELDS = ("bg", "fg_bg", "mask", "depth")
NOTHING = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, noise_std=0.0, noise_p=0.0)


def make_batch(n: int = 8, channels: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = (n, channels, 160, 160)
    return {
        "bg": torch.rand(image, generator=g),
        "fg_bg": torch.rand(image, generator=g),
        "mask": torch.randint(0, 256, (n, 1, 160, 160), dtype=torch.uint8, generator=g),
        "depth": torch.randint(0, 256, (n, 1, 80, 80), dtype=torch.uint8, generator=g),
        "__key__": [f"s{i}" for i in range(n)],
    }


def run(batch, config: AugmentConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    return augment_batch(batch, config, torch.Generator().manual_seed(seed))


def test_published_recipe_is_the_default():
    c = AugmentConfig()
    assert (c.brightness, c.contrast, c.saturation, c.hue) == (0.075,) * 4
    assert (c.noise_std, c.noise_p, c.hflip_p) == (0.05, 0.2, 0.0)


@pytest.mark.parametrize("channels", [1, 3])
def test_jitter_changes_inputs_within_range_and_never_the_targets(channels):
    batch = make_batch(channels=channels)
    copy = {k: v.clone() for k, v in batch.items() if k != "__key__"}
    out = run(batch, AugmentConfig(noise_p=0.5))
    for key in ("bg", "fg_bg"):
        assert out[key].shape == batch[key].shape and out[key].dtype == torch.float32
        assert out[key].min() >= 0 and out[key].max() <= 1
        changed = (out[key] != batch[key]).flatten(1).any(1)
        assert changed.all(), f"{key}: every image gets its own jitter"
    assert torch.equal(out["mask"], batch["mask"]) and torch.equal(out["depth"], batch["depth"])
    assert out["__key__"] == batch["__key__"]
    for key, value in copy.items():
        assert torch.equal(batch[key], value), f"the input's {key} was modified in place"


def test_each_image_gets_its_own_draw():
    batch = make_batch(n=4)
    batch["bg"][:] = 0.5  # four identical images, and fg_bg identical to bg
    batch["fg_bg"][:] = 0.5
    out = run(batch, AugmentConfig(contrast=0.0, noise_p=0.0))  # brightness only
    levels = torch.cat([out["bg"], out["fg_bg"]]).flatten(1)[:, 0]
    assert len(set(levels.tolist())) == 8


def test_same_seed_same_result_other_seed_other_result():
    batch = make_batch(channels=3)
    config = AugmentConfig(hflip_p=0.5, noise_p=0.5)
    a, b, c = run(batch, config, seed=1), run(batch, config, seed=1), run(batch, config, seed=2)
    for key in FIELDS:
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["bg"], c["bg"])


def test_noise_hits_about_noise_p_of_the_images_with_its_std():
    batch = make_batch(n=200)
    batch["bg"][:] = 0.5
    out = run(batch, AugmentConfig(**{**NOTHING, "noise_std": 0.05, "noise_p": 0.2}))
    diff = (out["bg"] - 0.5).flatten(1)
    noisy = diff.abs().amax(1) > 0
    assert 20 <= noisy.sum() <= 60  # binomial(200, 0.2): mean 40, sd 5.7
    assert diff[noisy].std().item() == pytest.approx(0.05, rel=0.05)


def test_hflip_zero_leaves_geometry_alone_and_one_flips_all_four_together():
    batch = make_batch()
    out = run(batch, AugmentConfig(**NOTHING, hflip_p=0.0))
    for key in FIELDS:
        assert torch.equal(out[key], batch[key])
    out = run(batch, AugmentConfig(**NOTHING, hflip_p=1.0))
    for key in FIELDS:
        assert torch.equal(out[key], torch.flip(batch[key], dims=[-1])), key
        assert not torch.equal(batch[key], out[key])


def test_partial_hflip_flips_the_same_samples_in_every_field():
    batch = make_batch(n=32)
    out = run(batch, AugmentConfig(**NOTHING, hflip_p=0.5))
    flipped = [torch.equal(out["mask"][i], batch["mask"][i].flip(-1)) for i in range(32)]
    assert 0 < sum(flipped) < 32
    for key in FIELDS:
        for i, was_flipped in enumerate(flipped):
            expected = batch[key][i].flip(-1) if was_flipped else batch[key][i]
            assert torch.equal(out[key][i], expected), (key, i)


def test_saturation_and_hue_do_nothing_to_gray_images():
    batch = make_batch(channels=1)
    out = run(batch, AugmentConfig(**{**NOTHING, "saturation": 0.5, "hue": 0.5}))
    for key in FIELDS:
        assert torch.equal(out[key], batch[key])


@pytest.mark.parametrize("op", ["saturation", "hue"])
def test_saturation_and_hue_change_colour_but_keep_gray_pixels_gray(op):
    batch = make_batch(channels=3)
    gray = torch.rand(8, 1, 160, 160)
    batch["bg"][:, :, :80] = gray[:, :, :80]  # top half of bg: R = G = B
    out = run(batch, AugmentConfig(**{**NOTHING, op: 0.5}))
    top, bottom = out["bg"][:, :, :80], out["bg"][:, :, 80:]
    assert torch.equal(top[:, 0], top[:, 1]) and torch.equal(top[:, 1], top[:, 2])
    if op == "hue":  # a hue shift keeps gray exactly (saturation 0)
        assert torch.allclose(top, batch["bg"][:, :, :80], atol=1e-6)
    assert (bottom - batch["bg"][:, :, 80:]).abs().amax() > 0.05
    assert (out["fg_bg"] - batch["fg_bg"]).abs().amax() > 0.05
    assert out["bg"].min() >= 0 and out["bg"].max() <= 1


def test_hue_by_a_whole_turn_is_the_identity_and_a_third_rotates_the_channels():
    batch = make_batch(channels=3)
    images = batch["bg"]
    hsv = rgb_to_hsv(images)
    back = hsv_to_rgb(hsv)
    assert torch.allclose(back, images, atol=1e-5)
    shifted = hsv.clone()
    shifted[:, 0] = (shifted[:, 0] + 1 / 3) % 1.0  # red -> green -> blue -> red
    assert torch.allclose(hsv_to_rgb(shifted), images.roll(1, dims=1), atol=1e-5)


def test_hsv_matches_colorsys():
    pixels = torch.tensor(
        [[0.2, 0.5, 0.9], [0.9, 0.9, 0.1], [0.0, 0.0, 0.0], [0.4, 0.4, 0.4], [1.0, 0.0, 0.5]]
    )
    images = pixels.T.reshape(1, 3, 1, 5)
    hsv = rgb_to_hsv(images)[0, :, 0].T
    for got, rgb in zip(hsv.tolist(), pixels.tolist(), strict=True):
        assert got == pytest.approx(colorsys.rgb_to_hsv(*rgb), abs=1e-6)


def test_to_float_scales_uint8_to_unit_range():
    images = torch.tensor([[0, 51, 255]], dtype=torch.uint8)
    assert torch.equal(to_float(images), torch.tensor([[0.0, 0.2, 1.0]]))
