"""The training loss: the published w_m * BCE-with-logits(mask) + w_d * (1 - SSIM(depth))."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim
from torch import Tensor

from pipeline.train.config import PUBLISHED_WEIGHTS, LossWeights

_SSIM_SIZE, _SSIM_SIGMA = 11, 1.5  # pytorch_msssim's defaults (those of the SSIM paper)


def compute_loss(
    mask_logits: Tensor,
    depth_pred: Tensor,
    mask_true: Tensor,
    depth_true: Tensor,
    weights: LossWeights = PUBLISHED_WEIGHTS,
) -> tuple[Tensor, Tensor, Tensor]:
    """The published loss w_m * BCE-with-logits(mask) + w_d * (1 - SSIM(depth)), and both parts."""
    loss_mask = F.binary_cross_entropy_with_logits(mask_logits.float(), mask_true.float())
    loss_depth = 1.0 - depth_ssim(depth_pred, depth_true, size_average=True)
    return weights.mask * loss_mask + weights.depth * loss_depth, loss_mask, loss_depth


def depth_ssim(depth_pred: Tensor, depth_true: Tensor, size_average: bool = True) -> Tensor:
    """SSIM (data range 1) in float32 even under autocast: the mean, or per image (B,)."""
    window = _ssim_window(depth_pred.device, depth_pred.shape[1])
    # In fp16/bf16 the variance terms (E[x^2] - E[x]^2) cancel catastrophically.
    with torch.autocast(device_type=depth_pred.device.type, enabled=False):
        x, y = depth_pred.float(), depth_true.float()
        return ssim(x, y, data_range=1.0, size_average=size_average, win=window)


@functools.cache
def _ssim_window(device: torch.device, channels: int) -> Tensor:
    """pytorch_msssim's default window (Gaussian, size 11, sigma 1.5), built once per device."""
    # Left to itself, ssim() builds the window on the CPU and copies it over on every call: on
    # CUDA a blocking copy, i.e. a host sync per training step.
    coords = torch.arange(_SSIM_SIZE, dtype=torch.float32, device=device) - _SSIM_SIZE // 2
    gauss = torch.exp(-(coords**2) / (2 * _SSIM_SIGMA**2))
    return (gauss / gauss.sum()).repeat(channels, 1, 1, 1)  # (C, 1, 1, size)
