"""Training augmentation as pure batched torch functions, run in the loader's workers (CPU) or on
the training device (`device_augment`): every draw comes from the generator given, on its device.

Photometric changes touch the inputs (`bg`, `fg_bg`) only; the targets (`mask`, `depth`) are never
jittered (the published code jittered its ground truth: a bug we don't copy). The optional flip
moves all four images of a sample together so that inputs and targets stay aligned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.schema import FIELDS, INPUTS

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale uses.
_LUMA = (0.2989, 0.587, 0.114)
_CHUNK = 4  # images per pass of the jitter on a CPU: 400 KB per plane, inside L2/L3
_TINY = 1e-12  # guards divisions whose numerator is 0 wherever the denominator is


@dataclass
class AugmentConfig:
    """The published recipe: ColorJitter(0.075, 0.075, 0.075, 0.075) then Gaussian noise."""

    brightness: float = 0.075  # factor uniform in [1-b, 1+b] multiplies the image
    contrast: float = 0.075  # factor in [1-c, 1+c] blends with the image's mean gray
    saturation: float = 0.075  # blends with the image's gray; does nothing to gray images
    hue: float = 0.075  # shift in [-h, h] of a turn; does nothing to gray images
    noise_std: float = 0.05  # std of the additive Gaussian noise, on the [0, 1] scale
    noise_p: float = 0.2  # probability per image of adding that noise
    hflip_p: float = 0.0  # off in the published recipe; flips all four images of a sample


def to_float(images_uint8: Tensor) -> Tensor:
    """uint8 images -> float32 in [0, 1]."""
    # It's cheaper to decode and batch uint8 and convert once per batch than per image.
    return images_uint8.to(torch.float32).div_(255.0)


def augment_batch(
    batch: dict[str, Tensor], config: AugmentConfig, generator: torch.Generator
) -> dict[str, Tensor]:
    """Jitter and noise bg/fg_bg (each image its own draw); flip all four together; a new dict."""
    # Every draw comes from `generator` (on the images' device): the same seed, the same batch.
    out = dict(batch)
    for key in INPUTS:
        out[key] = add_noise_(
            color_jitter(batch[key], config, generator), config.noise_std, config.noise_p, generator
        )
    if config.hflip_p > 0:
        draw = torch.rand(len(out["bg"]), generator=generator, device=generator.device)
        flipped = (draw < config.hflip_p).nonzero().flatten()
        for key in FIELDS:
            # bg/fg_bg are already our copies; the targets are copied before the in-place flip.
            images = out[key] if key in INPUTS else out[key].clone()
            out[key] = hflip_(images, flipped)
    return out


def augment_inputs(
    inputs: Tensor, mask: Tensor, depth: Tensor, config: AugmentConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """`augment_batch` on a batch as the model takes it: inputs (B, 2C, H, W) in [0, 1] (fg_bg
    channels, then bg: see schema.INPUTS), mask and depth; new tensors, the arguments unchanged."""
    images = dict(zip(INPUTS, inputs.chunk(len(INPUTS), dim=1), strict=True))
    out = augment_batch({**images, "mask": mask, "depth": depth}, config, generator)
    joined = torch.cat([out[field] for field in INPUTS], dim=1)
    if inputs.is_contiguous(memory_format=torch.channels_last):
        joined = joined.contiguous(memory_format=torch.channels_last)
    return joined, out["mask"], out["depth"]


def hflip_(images: Tensor, indices: Tensor) -> Tensor:
    """In place: mirror left-right the images (B, C, H, W) at `indices` (1-d)."""
    # Indexing, not torch.where: where is several times slower on CPU and touches every image.
    if indices.numel() > 0:
        images[indices] = images[indices].flip(-1)
    return images


def color_jitter(images: Tensor, config: AugmentConfig, generator: torch.Generator) -> Tensor:
    """ColorJitter semantics per image of (B, C, H, W) in [0, 1], ops in random order; a copy."""
    rgb = images.shape[1] == 3
    ops = [
        (adjust_brightness_, config.brightness, 1.0),
        (adjust_contrast_, config.contrast, 1.0),
        (adjust_saturation_, config.saturation if rgb else 0.0, 1.0),
        (adjust_hue_, config.hue if rgb else 0.0, 0.0),
    ]
    # Like ColorJitter, a fresh order per call (here per batch: cheap, and close enough).
    plan = []  # (op, per-image factors (B, 1, 1, 1)) in the order they apply
    for i in torch.randperm(len(ops), generator=generator, device=generator.device).tolist():
        op, spread, centre = ops[i]
        if spread > 0:
            plan.append((op, _uniform(len(images), centre - spread, centre + spread, generator)))
    out = torch.empty_like(images)
    step = jitter_chunk(images)
    for start in range(0, len(images), step):
        chunk = out[start : start + step].copy_(images[start : start + step])
        for op, factor in plan:
            op(chunk, factor[start : start + step])
    return out


def jitter_chunk(images: Tensor) -> int:
    """Images per pass of `color_jitter` over (B, C, H, W) `images` (at least 1)."""
    # RGB on a CPU a few images at a time: hue's dozens of passes then stay in the CPU cache
    # instead of streaming the whole batch through memory once per pass (3x faster). Gray images
    # take only a few passes, where the per-chunk call overhead would outweigh the gain. On a GPU
    # every pass is a kernel launch: chunks of 4 would make a batch of 512 some 18,000 launches
    # instead of 140, so the whole batch goes in one pass there.
    if images.shape[1] == 3 and images.device.type == "cpu":
        return _CHUNK
    return max(1, len(images))


def add_noise_(images: Tensor, std: float, p: float, generator: torch.Generator) -> Tensor:
    """In place: add N(0, std) noise to each image with probability p, clamped to [0, 1]."""
    if std <= 0 or p <= 0:
        return images
    draw = torch.rand(len(images), generator=generator, device=generator.device)
    chosen = (draw < p).nonzero().flatten()
    if chosen.numel() > 0:
        # Noise for the chosen images only: at p=0.2 a fifth of the (costly) normal draws.
        shape = (chosen.numel(), *images.shape[1:])
        noise = torch.randn(shape, generator=generator, device=generator.device)
        images[chosen] = noise.mul_(std).add_(images[chosen]).clamp_(0.0, 1.0)
    return images


def adjust_brightness_(images: Tensor, factor: Tensor) -> Tensor:
    """In place: multiply by a per-image factor (B, 1, 1, 1)."""
    return images.mul_(factor).clamp_(0.0, 1.0)


def adjust_contrast_(images: Tensor, factor: Tensor) -> Tensor:
    """In place: blend with the per-image mean of the grayscale by a factor (B, 1, 1, 1)."""
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return _blend_(images, mean, factor)


def adjust_saturation_(images: Tensor, factor: Tensor) -> Tensor:
    """In place: blend RGB images with their grayscale by a factor (B, 1, 1, 1)."""
    return _blend_(images, grayscale(images), factor)


def adjust_hue_(images: Tensor, shift: Tensor) -> Tensor:
    """In place: rotate the hue of RGB images by a per-image fraction of a turn (B, 1, 1, 1)."""
    hue, value, chroma = _hue_value_chroma(images)
    hue = hue.add_(shift.view(-1, 1, 1))
    # Hue rotation keeps value and chroma, so only the sextant ramps change (no s = c/v needed).
    for i, channel in enumerate(_hsv_channels(hue, value, chroma)):
        images[:, i] = channel
    return images


def grayscale(images: Tensor) -> Tensor:
    """Luma of (B, 3, H, W) images as (B, 1, H, W); 1-channel images are returned as they are."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(dim=1)
    return (_LUMA[0] * r).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def rgb_to_hsv(images: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV with h, s, v in [0, 1]."""
    hue, value, chroma = _hue_value_chroma(images)
    saturation = chroma / value.clamp_min(_TINY)  # black has chroma 0, so s = 0 there
    return torch.stack([hue, saturation, value], dim=1)


def hsv_to_rgb(images: Tensor) -> Tensor:
    """(B, 3, H, W) HSV in [0, 1] -> RGB in [0, 1]."""
    hue, saturation, value = images.unbind(dim=1)
    return torch.stack(_hsv_channels(hue, value, value * saturation), dim=1)


def _hue_value_chroma(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hue in [0, 1), value (max) and chroma (max - min) of RGB images, each (B, H, W)."""
    # Arithmetic masks (sign, floor) instead of ==/where/remainder: those are 5-20x slower on CPU.
    r, g, b = images.unbind(dim=1)
    value = images.amax(dim=1)
    chroma = value - images.amin(dim=1)
    inv = chroma.clamp_min(_TINY).reciprocal_()  # gray pixels: every numerator below is 0 there
    # 1.0 where the channel holds the maximum, else 0.0 (max - channel is exactly 0 there);
    # r wins ties, then g, as in colorsys and torchvision.
    is_r = (r - value).sign_().add_(1.0)
    is_g = (g - value).sign_().add_(1.0).mul_(1.0 - is_r)
    is_b = (1.0 - is_r).sub_(is_g)
    sextant = (g - b).mul_(inv).mul_(is_r)  # in [-1, 6): the hue in sixths of a turn
    sextant += (b - r).mul_(inv).add_(2.0).mul_(is_g)
    sextant += (r - g).mul_(inv).add_(4.0).mul_(is_b)
    return _fraction(sextant.div_(6.0)), value, chroma


def _hsv_channels(hue: Tensor, value: Tensor, chroma: Tensor) -> list[Tensor]:
    """R, G, B from hue (turns, any real), value and chroma, each (B, H, W)."""
    # Closed form: c_n = v - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = _fraction(hue + n / 6.0).mul_(6.0)
        ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        channels.append(ramp.mul_(chroma).neg_().add_(value).clamp_(0.0, 1.0))
    return channels


def _fraction(x: Tensor) -> Tensor:
    """In place: x mod 1, in [0, 1)."""
    return x.sub_(torch.floor(x))


def _blend_(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """In place: factor * images + (1 - factor) * other, clamped; factor (B, 1, 1, 1)."""
    # Not lerp_: with a broadcast weight it measured several times slower on CPU.
    other = other * (1.0 - factor)  # a new tensor: `other` may be `images` itself (1 channel)
    return images.mul_(factor).add_(other).clamp_(0.0, 1.0)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    draw = torch.rand(n, 1, 1, 1, generator=generator, device=generator.device)
    return draw * (high - low) + low  # (n, 1, 1, 1)
