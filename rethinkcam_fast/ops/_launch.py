"""Helpers shared by the kernel launchers of every op."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .._native import warn_fallback
from .._triton import can_launch_triton, cdiv, next_power_of_2

TRITON_OR_REFERENCE = ("auto", "triton", "reference")


def device_guard(t: Tensor):
    """Triton and the CUDA extension launch on the calling thread's current device: make it t's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (the launchers size their grids to fill them); 0
    elsewhere, where launchers use one program per work item (the Triton interpreter)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(forced: int | None, programs: int, most: int, device: torch.device) -> int:
    """Programs that share one work item (a power of two): ``forced`` (checked), else enough for about 4
    per SM when ``programs`` work items alone give fewer, at most ``most`` and 64; 1 off a CUDA device
    (the Triton interpreter)."""
    if forced is not None:
        if forced < 1 or forced & (forced - 1):
            raise ValueError(f"num_splits must be a power of two, got {forced}")
        return forced
    sms = multiprocessor_count(device)
    if not sms:
        return 1
    wanted = next_power_of_2(cdiv(4 * sms, max(programs, 1)))
    return max(1, min(wanted, 64, most))


def flat_spatial(t: Tensor) -> tuple[Tensor, int, int, int]:
    """``(t', stride_n, stride_c, stride_s)`` addressing ``t[N, C, H, W]`` as ``[N, C, H*W]``.

    NCHW-contiguous and channels_last both flatten (H, W) to one stride, so they are read in place;
    any other layout where that fails is made contiguous first (one copy).
    """
    strides = flat_strides(t)
    if strides is not None:
        return (t, *strides)
    t = t.contiguous()
    return t, t.stride(0), t.stride(1), t.stride(3)


def flat_strides(t: Tensor) -> tuple[int, int, int] | None:
    """``(stride_n, stride_c, stride_s)`` of ``t[N, C, H, W]`` read as ``[N, C, H*W]`` in place, or
    ``None`` when its layout flattens (H, W) to no single stride (:func:`flat_spatial` copies those)."""
    _, _, h, w = t.shape
    if w == 1:
        return t.stride(0), t.stride(1), t.stride(2)
    if h == 1 or t.stride(2) == w * t.stride(3):
        return t.stride(0), t.stride(1), t.stride(3)
    return None


def check_backend(backend: str) -> None:
    """For ops with a Triton kernel and a PyTorch reference only."""
    if backend not in TRITON_OR_REFERENCE:
        raise ValueError(f"backend must be one of {TRITON_OR_REFERENCE}, got {backend!r}")


def use_triton(op: str, backend: str, device: torch.device) -> bool:
    """Whether ``op`` runs its Triton kernel on ``device``: ``auto`` means on CUDA (falling back to the
    reference with a one-time warning when Triton is missing); ``triton`` must run or raise."""
    check_backend(backend)
    wanted = backend == "triton" or (backend == "auto" and device.type == "cuda")
    if wanted and not can_launch_triton(device):
        if backend == "triton":
            raise RuntimeError("backend='triton' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1)")
        warn_fallback(op, "Triton is not available")
        return False
    return wanted


def autocast_off(t: Tensor):
    """A context without autocast on ``t``'s device (a no-op when autocast is off): the references sum
    in float32, and autocast would run their einsums in bfloat16/float16."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


def graph_capture() -> bool:
    """Whether the call is being recorded as a graph (``torch.compile`` or ``torch.jit.trace``): the
    ops then go through their registered custom ops, which the graph can hold, rather than Python
    ``autograd.Function``s, which ``torch.jit.save`` cannot export."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _detached(arg):
    if isinstance(arg, Tensor):
        return arg.detach()
    if isinstance(arg, (list, tuple)):
        return [a.detach() if isinstance(a, Tensor) else a for a in arg]
    return arg


def run_inference_op(op, impl, *args):
    """Call an inference-only custom op: traced as ``op`` under ``torch.compile``, on detached inputs
    (it has no autograd formula: its outputs carry no gradient, in a loss beside differentiable terms
    too); eagerly its implementation runs directly under ``no_grad`` (the same), which skips the
    dispatcher's autograd wrapper — about 0.1 ms a call, visible per video frame. Under
    ``torch.jit.trace`` too the registered op is called, so that the trace records it (the kernels would
    run outside the tracer, leaving the trace an empty allocation)."""
    if graph_capture():
        return op(*[_detached(a) for a in args])
    with torch.no_grad():
        return impl(*args)


def run_trusted(op, impl, *args):
    """:func:`run_inference_op` for callers whose arguments are valid by construction and carry no
    autograd graph (the CAM engine: its own kernels' maps, detached activations and their gradients):
    no argument checks upstream and no ``no_grad`` context here. The engine calls the epilogue once and
    the per-layer reduction once a target layer (53 times a ResNet50 Fully-CAM call, on the autograd
    thread while the backward waits): the public entry points' checks cost 13-16 µs a call on the CI
    CPU (``benchmarks/host_overhead.py``), more for Fully-CAM's 53 maps. (The engine cannot be traced by
    ``torch.jit.trace`` — its hooks — so only ``torch.compile`` is asked about here.)"""
    if torch.compiler.is_compiling():
        return op(*[_detached(a) for a in args])
    return impl(*args)
