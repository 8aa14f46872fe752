"""The UNet: shapes, size, cost, structure, and that it can learn."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from model import UNet, UNetConfig
from pipeline.deploy.info import count_macs, count_params, model_info

PUBLISHED_PARAMS = 513_206  # 1-channel images
PUBLISHED_MACS = 892_294_400  # decoder run twice, thop's rules (see pipeline/deploy/info.py)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _pair(batch: int, channels: int, size: int) -> torch.Tensor:
    return torch.rand(batch, 2 * channels, size, size)


@pytest.mark.parametrize(("channels", "size"), [(1, 160), (3, 64)])
def test_heads_have_the_right_shapes_and_depth_is_in_unit_range(channels: int, size: int) -> None:
    model = UNet(UNetConfig(image_channels=channels))
    mask_logits, depth = model(_pair(2, channels, size))
    assert mask_logits.shape == (2, 1, size, size)
    assert depth.shape == (2, 1, size // 2, size // 2)
    assert depth.min() >= 0 and depth.max() <= 1
    assert mask_logits.min() < 0 < mask_logits.max()  # logits, not probabilities


def test_parameter_count_is_the_published_one() -> None:
    assert count_params(UNet(UNetConfig())) == PUBLISHED_PARAMS
    # RGB only widens the first separable conv: 4 more input channels, each 3x3 + bias + 32 out.
    assert count_params(UNet(UNetConfig(image_channels=3))) == PUBLISHED_PARAMS + 4 * (10 + 32)


def test_macs_reproduce_the_published_figure_and_ours_are_lower() -> None:
    model = UNet(UNetConfig())
    published = count_macs(model, 1, decoder_twice=True, published_rules=True)
    assert published == PUBLISHED_MACS
    twice = count_macs(model, 1, decoder_twice=True)
    assert twice == 820_582_400  # PyTorch's counter: convolution multiply-adds only
    once = count_macs(model, 1)
    assert once < twice
    assert count_macs(model, 1, published_rules=True) < published


def test_model_info_reports_the_figures() -> None:
    info = model_info(1)
    assert info["params"] == PUBLISHED_PARAMS
    assert info["macs_decoder_twice_thop_rules"] == PUBLISHED_MACS
    assert info["macs"] < info["macs_decoder_twice"]
    assert info["input"] == [1, 2, 160, 160]
    assert info["outputs"] == {"mask_logits": [1, 1, 160, 160], "depth": [1, 1, 80, 80]}
    assert info["size_mb"] == pytest.approx(PUBLISHED_PARAMS * 4 / 1e6, abs=1e-3)


def test_every_3x3_conv_is_depthwise_and_followed_by_a_1x1() -> None:
    model = UNet(UNetConfig())
    calls: list[nn.Conv2d] = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda m, _i, _o: calls.append(m))
    model(_pair(1, 1, 32))
    assert len(calls) == 2 * 20  # 9 double-convs and 2 heads, each separable conv run once
    for depthwise, pointwise in zip(calls[::2], calls[1::2], strict=True):
        assert depthwise.kernel_size == (3, 3)
        assert depthwise.groups == depthwise.in_channels == depthwise.out_channels
        assert depthwise.bias is not None
        assert pointwise.kernel_size == (1, 1) and pointwise.groups == 1
        assert pointwise.in_channels == depthwise.out_channels
        assert pointwise.bias is not None


def test_a_few_steps_overfit_one_batch() -> None:
    bg = torch.rand(2, 1, 32, 32)
    fg_bg = bg.clone()
    fg_bg[:, :, 8:24, 10:20] = torch.rand(2, 1, 16, 10)  # a pasted "foreground"
    mask = (fg_bg != bg).float()
    depth = F.avg_pool2d(fg_bg, 2)
    x = torch.cat([fg_bg, bg], dim=1)
    model = UNet(UNetConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        mask_logits, depth_pred = model(x)
        loss = F.binary_cross_entropy_with_logits(mask_logits, mask) + F.mse_loss(depth_pred, depth)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_channels_last_matches_contiguous() -> None:
    model = UNet(UNetConfig(image_channels=3)).eval()
    x = _pair(2, 3, 32)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.to(memory_format=torch.channels_last))
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_runs_under_bf16_autocast() -> None:
    model = UNet(UNetConfig()).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mask_logits, depth = model(_pair(1, 1, 32))
    assert mask_logits.dtype == torch.bfloat16
    assert torch.isfinite(mask_logits).all() and 0 <= depth.min() <= depth.max() <= 1


@pytest.mark.parametrize("shape", [(1, 2, 40, 32), (1, 2, 32, 24), (1, 6, 32, 32), (2, 32, 32)])
def test_bad_input_is_a_clear_error(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"multiples of 16|expects input"):
        UNet(UNetConfig())(torch.zeros(shape))


def test_model_args_round_trip_through_a_dict() -> None:
    config = UNetConfig(image_channels=3)
    args = dataclasses.asdict(config)
    assert args == {"image_channels": 3, "depth_output": "sigmoid"}
    model = UNet.from_args(args)
    assert model.config == config and model.config.in_channels == 6
    model.load_state_dict(UNet(config).state_dict())


def test_checkpoints_from_before_depth_output_load_as_sigmoid() -> None:
    assert UNet.from_args({"image_channels": 1}).config.depth_output == "sigmoid"
    with pytest.raises(ValueError, match="unknown depth_output 'relu'"):
        UNetConfig(depth_output="relu")


def test_minmax_depth_is_the_published_per_image_normalisation() -> None:
    model = UNet(UNetConfig(depth_output="minmax")).eval()
    x = _pair(3, 1, 64)
    with torch.no_grad():
        _, depth = model(x)
        raw = model.depth_head(model.decode(model.encode(x)))  # no activation
    for image, got in zip(raw, depth, strict=True):  # the published code's two steps, by hand
        shifted = image - image.min()
        assert torch.equal(got, shifted / shifted.max())
        assert got.min() == 0 and got.max() == 1
    # The same weights with our sigmoid head: the same raw output, another activation.
    sigmoid = UNet(UNetConfig()).eval()
    sigmoid.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(sigmoid(x)[1], torch.sigmoid(raw))


def test_minmax_of_a_flat_image_is_zeros_not_nan() -> None:
    from model import minmax_per_image

    raw = torch.stack([torch.full((1, 4, 4), 3.0), torch.arange(16.0).view(1, 4, 4)])
    out = minmax_per_image(raw)
    assert torch.equal(out[0], torch.zeros(1, 4, 4))
    assert torch.equal(out[1], torch.arange(16.0).view(1, 4, 4) / 15)
