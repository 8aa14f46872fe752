"""The network, and nothing else: this package imports torch only."""

from model.unet import (
    DEPTH_OUTPUTS,
    DIVISOR,
    DoubleConv,
    SeparableConv2d,
    UNet,
    UNetConfig,
    check_input,
    minmax_per_image,
)

__all__ = [
    "DEPTH_OUTPUTS",
    "DIVISOR",
    "DoubleConv",
    "SeparableConv2d",
    "UNet",
    "UNetConfig",
    "check_input",
    "minmax_per_image",
]
