"""Mixed precision: which autocast dtype a device gets, and the context that applies it."""

from __future__ import annotations

import contextlib

import torch

AMP_CHOICES = ("auto", "off", "bf16", "fp16")


def resolve_amp(amp: str, device: torch.device) -> str:
    """`auto` means bf16 on a GPU that supports it and off elsewhere (slower on CPU)."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"unknown --amp {amp!r}: use one of {', '.join(AMP_CHOICES)}")
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "off"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (use bf16 or off on CPU)")
    return amp


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """The autocast context for a resolved `amp` (a null context when off)."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
