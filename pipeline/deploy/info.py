"""`pipeline info`: the network's size and cost (parameters, MACs, output shapes).

MACs are counted with PyTorch's own flop counter (FlopCounterMode counts each multiply-add of a
convolution as 2 flops; bias, BatchNorm, ReLU, pooling and upsampling cost nothing), so
MACs = flops / 2.

The published figure, 892,294,400 MACs for one grayscale sample at 160x160 with the decoder run
twice, was not counted that way: PyTorch's counter gives 820,582,400 for that forward pass. It is
reproduced exactly by the counting rules of thop (pytorch-OpCounter 0.0.x, the usual tool in 2020):
convolution MACs plus one add per output element for the bias, 2 per element for BatchNorm and
11 per output element for bilinear upsampling (ReLU and pooling free). `published_rules=True`
applies those rules inside the same counter, which checks that our layout is the published one.
"""

from __future__ import annotations

from functools import partial
from math import prod

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from model import UNet, UNetConfig

SIZE = 160  # the published images are 160x160
aten = torch.ops.aten


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# thop's rules, as flops (2 per counted op) so that flops / 2 is thop's count like for MACs.
def _thop_conv(x_shape, w_shape, bias, *args, out_shape, **kwargs) -> int:
    bias_adds = prod(out_shape) if bias is not None else 0
    return 2 * (prod(out_shape) * prod(w_shape[1:]) + bias_adds)


def _thop_batch_norm(x_shape, *args, out_shape, **kwargs) -> int:
    return 2 * 2 * prod(x_shape)  # thop: a multiply and an add per element (inference)


def _thop_bilinear(x_shape, *args, out_shape, **kwargs) -> int:
    return 2 * 11 * prod(out_shape)  # thop: 11 ops per bilinear output element


THOP_RULES = {
    aten.convolution: _thop_conv,
    # Which batch-norm op runs depends on the device and the mode: count them all alike.
    aten.native_batch_norm: _thop_batch_norm,
    aten._native_batch_norm_legit: _thop_batch_norm,
    aten._native_batch_norm_legit_no_training: _thop_batch_norm,
    aten.cudnn_batch_norm: _thop_batch_norm,
    aten.upsample_bilinear2d: _thop_bilinear,
}


def forward_decoder_twice(model: UNet, x: Tensor) -> tuple[Tensor, Tensor]:
    """The published forward pass: one encoder pass, then the decoder once for each head."""
    features = model.encode(x)
    mask_logits = model.mask_head(model.decode(features))
    depth = torch.sigmoid(model.depth_head(model.decode(features)))
    return mask_logits, depth


def count_macs(
    model: UNet,
    channels: int,
    size: int = SIZE,
    *,
    decoder_twice: bool = False,
    published_rules: bool = False,
) -> int:
    """MACs of one forward pass on one (1, 2*channels, size, size) sample (flops / 2)."""
    forward = partial(forward_decoder_twice, model) if decoder_twice else model
    device = next(model.parameters()).device
    x = torch.zeros(1, 2 * channels, size, size, device=device)
    rules = THOP_RULES if published_rules else None
    was_training = model.training
    model.eval()  # counting must not move BatchNorm's running statistics
    try:
        with (
            torch.no_grad(),
            FlopCounterMode(display=False, custom_mapping=rules) as counter,
        ):
            forward(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def model_info(channels: int = 1) -> dict:
    """Parameters, MACs (ours and the published pass), shapes and fp32 size of the UNet."""
    model = UNet(UNetConfig(image_channels=channels)).eval()
    with torch.no_grad():
        mask_logits, depth = model(torch.zeros(1, 2 * channels, SIZE, SIZE))
    params = count_params(model)
    return {
        "params": params,
        "macs": count_macs(model, channels),
        "macs_decoder_twice": count_macs(model, channels, decoder_twice=True),
        "macs_thop_rules": count_macs(model, channels, published_rules=True),
        "macs_decoder_twice_thop_rules": count_macs(
            model, channels, decoder_twice=True, published_rules=True
        ),
        "channels": channels,
        "input": [1, 2 * channels, SIZE, SIZE],
        "outputs": {"mask_logits": list(mask_logits.shape), "depth": list(depth.shape)},
        "size_mb": round(params * 4 / 1e6, 3),  # fp32 weights, decimal megabytes
    }
