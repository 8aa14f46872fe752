"""The network, and nothing else: this package imports torch only."""

from model.unet import DIVISOR, DoubleConv, SeparableConv2d, UNet, UNetConfig, check_input

__all__ = ["DIVISOR", "DoubleConv", "SeparableConv2d", "UNet", "UNetConfig", "check_input"]
