"""The published UNet: depthwise-separable convolutions, a mask head and a depth head.

Layout (the classic "UNet with bilinear upsampling", widths halved; shapes for a 1-channel image
pair at 160x160, B samples; 513,206 parameters):

    input    concat(fg_bg, bg)                                        # (B, 2, 160, 160)
    inc      DoubleConv(2 -> 32)                              x1      # (B, 32, 160, 160)
    down1    MaxPool 2x2, DoubleConv(32 -> 64)                x2      # (B, 64, 80, 80)
    down2    MaxPool 2x2, DoubleConv(64 -> 128)               x3      # (B, 128, 40, 40)
    down3    MaxPool 2x2, DoubleConv(128 -> 256)              x4      # (B, 256, 20, 20)
    down4    MaxPool 2x2, DoubleConv(256 -> 256)              x5      # (B, 256, 10, 10)
    up1      up(x5) ++ x4 = 512, DoubleConv(512 -> 256 -> 128)        # (B, 128, 20, 20)
    up2      up ++ x3 = 256,     DoubleConv(256 -> 128 -> 64)         # (B, 64, 40, 40)
    up3      up ++ x2 = 128,     DoubleConv(128 -> 64 -> 32)          # (B, 32, 80, 80)
    up4      up ++ x1 = 64,      DoubleConv(64 -> 32 -> 32)           # (B, 32, 160, 160)
    mask     SeparableConv(32 -> 1)                           logits  # (B, 1, 160, 160)
    depth    SeparableConv(32 -> 1, stride 2), sigmoid        [0, 1]  # (B, 1, 80, 80)
             (or, depth_output="minmax", the published per-image min-max normalisation)

SeparableConv is a 3x3 depthwise conv then a 1x1 pointwise conv, both with bias; DoubleConv is
[SeparableConv, BatchNorm, ReLU, SeparableConv, BatchNorm, ReLU]; "up" is bilinear x2 upsampling
with align_corners=True. The published model ran the decoder once per head; both runs computed the
same tensor, so this one runs it once (`encode` and `decode` stay separate so that the published
pass can still be measured).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

DIVISOR = 16  # four 2x2 poolings: H and W must halve cleanly four times
DEPTH_OUTPUTS = ("sigmoid", "minmax")


@dataclass
class UNetConfig:
    """The network's arguments; checkpoints store `dataclasses.asdict` of it as model_args."""

    image_channels: int = 1  # 1 for the published grayscale data, 3 for RGB (the manifest's mode)
    # sigmoid: ours, a bounded output whose gradient never vanishes with the image's range.
    # minmax: the published head, (d - min) / max(d - min) per image; what imported weights need.
    # Checkpoints from before this field load as sigmoid, which they were trained with.
    depth_output: str = "sigmoid"

    def __post_init__(self) -> None:
        if self.depth_output not in DEPTH_OUTPUTS:
            raise ValueError(
                f"unknown depth_output {self.depth_output!r}: use one of {', '.join(DEPTH_OUTPUTS)}"
            )

    @property
    def in_channels(self) -> int:
        """Input channels: fg_bg and bg stacked along channels."""
        return 2 * self.image_channels


class SeparableConv2d(nn.Module):
    """A 3x3 depthwise conv then a 1x1 pointwise conv: ~8x fewer weights than a full 3x3 conv."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch)
        self.pointwise = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the depthwise then the pointwise convolution."""
        return self.pointwise(self.depthwise(x))


class DoubleConv(nn.Sequential):
    """[SeparableConv, BatchNorm, ReLU] twice; `mid` is the width between the two."""

    def __init__(self, in_ch: int, out_ch: int, mid: int | None = None) -> None:
        mid = mid or out_ch
        super().__init__(
            SeparableConv2d(in_ch, mid),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            SeparableConv2d(mid, out_ch),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """Halve the resolution with 2x2 max-pooling, then a DoubleConv."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_ch, out_ch))


class Up(nn.Module):
    """Upsample x2 (bilinear), concatenate the skip, then a DoubleConv with a middle of in/2."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = DoubleConv(in_ch, out_ch, mid=in_ch // 2)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """Upsample `x` to the skip's size and fuse the two."""
        # Sizes are multiples of 16 (checked in UNet.forward), so x2 matches the skip: no padding.
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """Predict mask logits (B,1,H,W) and depth in [0,1] (B,1,H/2,W/2) from concat(fg_bg, bg)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.inc = DoubleConv(config.in_channels, 32)
        self.down1 = Down(32, 64)
        self.down2 = Down(64, 128)
        self.down3 = Down(128, 256)
        # 256, not 512: bilinear upsampling keeps the width, so up1 sees 256 + 256 = 512 channels.
        self.down4 = Down(256, 256)
        self.up1 = Up(512, 128)
        self.up2 = Up(256, 64)
        self.up3 = Up(128, 32)
        self.up4 = Up(64, 32)
        self.mask_head = SeparableConv2d(32, 1)
        self.depth_head = SeparableConv2d(32, 1, stride=2)  # depth targets are half resolution

    @classmethod
    def from_args(cls, model_args: dict) -> UNet:
        """Build from a checkpoint's `model_args` (the config as a dict)."""
        return cls(UNetConfig(**model_args))

    def encode(self, x: Tensor) -> list[Tensor]:
        """Return the encoder's five feature maps, finest first."""
        x1 = self.inc(x)  # (B, 32, H, W)
        x2 = self.down1(x1)  # (B, 64, H/2, W/2)
        x3 = self.down2(x2)  # (B, 128, H/4, W/4)
        x4 = self.down3(x3)  # (B, 256, H/8, W/8)
        x5 = self.down4(x4)  # (B, 256, H/16, W/16)
        return [x1, x2, x3, x4, x5]

    def decode(self, features: list[Tensor]) -> Tensor:
        """Fuse the encoder's features back up to full resolution, 32 channels."""
        x1, x2, x3, x4, x5 = features
        x = self.up1(x5, x4)  # (B, 128, H/8, W/8)
        x = self.up2(x, x3)  # (B, 64, H/4, W/4)
        x = self.up3(x, x2)  # (B, 32, H/2, W/2)
        return self.up4(x, x1)  # (B, 32, H, W)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (mask_logits (B,1,H,W), depth (B,1,H/2,W/2) in [0, 1])."""
        check_input(x, self.config.in_channels)
        y = self.decode(self.encode(x))  # (B, 32, H, W)
        return self.mask_head(y), self.depth_activation(self.depth_head(y))

    def depth_activation(self, raw: Tensor) -> Tensor:
        """The depth head's raw output (B, 1, h, w) -> depth in [0, 1], as `depth_output` says."""
        if self.config.depth_output == "minmax":
            return minmax_per_image(raw)
        return torch.sigmoid(raw)


def minmax_per_image(raw: Tensor) -> Tensor:
    """The published depth: subtract each image's minimum, then divide by the maximum after that.

    An image whose values are all equal (maximum 0 after the subtraction) stays all zeros; the
    published training dropped such images from its loss, here they simply score as zeros.
    """
    shifted = raw - raw.amin(dim=(-2, -1), keepdim=True)
    top = shifted.amax(dim=(-2, -1), keepdim=True)
    return shifted / torch.where(top > 0, top, torch.ones_like(top))


def check_input(x: Tensor, in_channels: int) -> None:
    """Raise ValueError unless x is (B, in_channels, H, W) with H and W multiples of 16."""
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(
            f"UNet expects input (B, {in_channels}, H, W) = concat(fg_bg, bg), got {tuple(x.shape)}"
        )
    h, w = x.shape[-2:]
    if h % DIVISOR or w % DIVISOR:
        raise ValueError(f"UNet input height and width must be multiples of {DIVISOR}, got {h}x{w}")
