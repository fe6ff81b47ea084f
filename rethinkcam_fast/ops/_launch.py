"""Helpers shared by the kernel launchers of every op."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def device_guard(t: Tensor):
    """Triton and the CUDA extension launch on the calling thread's current device: make it t's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def flat_spatial(t: Tensor) -> tuple[Tensor, int, int, int]:
    """``(t', stride_n, stride_c, stride_s)`` addressing ``t[N, C, H, W]`` as ``[N, C, H*W]``.

    NCHW-contiguous and channels_last both flatten (H, W) to one stride, so they are read in place;
    any other layout where that fails is made contiguous first (one copy).
    """
    _, _, h, w = t.shape
    if w == 1:
        return t, t.stride(0), t.stride(1), t.stride(2)
    if h == 1 or t.stride(2) == w * t.stride(3):
        return t, t.stride(0), t.stride(1), t.stride(3)
    t = t.contiguous()
    return t, t.stride(0), t.stride(1), t.stride(3)
