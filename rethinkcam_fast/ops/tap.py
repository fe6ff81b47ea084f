"""TAP — thresholded average pooling (Bae et al., "Rethinking Class Activation Mapping").

Per image ``n`` and channel ``k`` of a feature map ``A[N, K, H, W]`` (reference: won-bae/rethinkingCAM,
``ThresholdedAvgPool2d``)::

    m_k   = max_ij A_kij                       (NaN-propagating, like ``torch.max``)
    thr_k = m_k * tau                          (rounded to A's dtype, as PyTorch computes it)
    kept  = A_kij > thr_k                      (strict)
    N_k   = #(kept and A_kij > 0), 1 when 0
    TAP_k = sum(kept A_kij) / N_k

The mask is a constant for autograd: ``dTAP_k/dA_kij = kept / N_k`` (no gradient through the max).
Consequences of the reference's formula, reproduced on purpose:

* ``tau = 0`` is not GAP: it averages the positive elements only.
* A channel holding a NaN has a NaN max, so nothing is kept: it pools to 0 with zero gradient.
  ``+inf`` likewise pools to 0 (``inf > inf`` is false; ``inf * 0`` is NaN).

This file holds, in the DESIGN.md §5 order: the pure-PyTorch reference (CPU fallback and test oracle),
the Triton kernels and launchers, the native (C++/CUDA extension) launchers, and the custom ops with
their fake implementations and autograd registration. Modules live in ``rethinkcam_fast.modules``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .. import _native
from .._triton import can_launch_triton, cdiv, grid_pair, ieee_reciprocal, launch, next_power_of_2, tl, triton
from .._validation import check_float_dtype, check_same_device, check_tensor, check_unit_interval
from . import _launch
from ._launch import device_guard, flat_spatial, graph_capture

BACKENDS = ("auto", "triton", "cuda", "native", "reference")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# Reference (pure PyTorch): oracle for the tests, eager baseline for the benchmarks, CPU fallback.
# --------------------------------------------------------------------------------------------------


def tap_reference(x: Tensor, tau: float = 0.1) -> Tensor:
    """Eager TAP written like the reference module; differentiable through plain autograd.

    Args:
        x: ``Tensor[N, C, H, W]``, floating.
        tau: threshold ratio in ``[0, 1)``.
    Returns:
        ``Tensor[N, C]`` in ``x.dtype``.
    Raises:
        ValueError: ``x`` is not 4-D (as :func:`tap` says it).
    """
    check_tensor("x", x, ndim=4)
    n, c = x.shape[:2]
    max_vals = x.amax(dim=(2, 3))  # amax propagates NaN like torch.max
    thr = (max_vals * tau).view(n, c, 1, 1)
    kept = torch.where(x > thr, x, torch.zeros_like(x))
    count = (kept > 0).sum(dim=(2, 3)).clamp_min(1)
    return kept.sum(dim=(2, 3)) / count.to(x.dtype)


def _tap_forward_reference(x: Tensor, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(out[N, C] in x.dtype, thr[N, C], inv_count[N, C])``, the last two in the accumulation dtype."""
    acc = _acc_dtype(x.dtype)
    n, c = x.shape[:2]
    thr_in_dtype = x.amax(dim=(2, 3)) * tau  # rounded to x.dtype, like the reference
    kept = x > thr_in_dtype.view(n, c, 1, 1)
    x_acc = x.to(acc)
    total = torch.where(kept, x_acc, 0).sum(dim=(2, 3))
    inv = 1.0 / (kept & (x > 0)).sum(dim=(2, 3)).clamp_min(1).to(acc)
    return (total * inv).to(x.dtype), thr_in_dtype.to(acc), inv


def _tap_backward_reference(grad_out: Tensor, x: Tensor, thr: Tensor, inv: Tensor) -> Tensor:
    scale = (grad_out.to(inv.dtype) * inv)[:, :, None, None]
    grad = torch.where(x.to(thr.dtype) > thr[:, :, None, None], scale, 0)
    return grad.to(x.dtype).contiguous(memory_format=_memory_format(x))


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# --------------------------------------------------------------------------------------------------
# Triton kernels. x is addressed as [N, C, S] (S = H*W) through strides, so NCHW-contiguous and
# channels_last inputs are both read in place. Sums and counts accumulate in fp32 (fp64 for fp64).
# --------------------------------------------------------------------------------------------------


@triton.jit
def _tap_program_rows(pid, C, stride_n, stride_c, BLOCK_C: tl.constexpr):
    """Row block ``pid``'s (image n, channels c[BLOCK_C], their mask, int64 row offsets into x)."""
    num_c_blocks = tl.cdiv(C, BLOCK_C)
    n = pid // num_c_blocks
    c = (pid % num_c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    return n, c, c < C, n.to(tl.int64) * stride_n + c.to(tl.int64) * stride_c


@triton.jit
def _tap_tile_max(
    X_ptr, row_off, c_mask, s_start, s_stop, stride_s, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr
):
    """Per-row (channel) max and NaN flag over s in [s_start, s_stop) for a [BLOCK_C, BLOCK_S] tile loop."""
    s_idx = tl.arange(0, BLOCK_S)
    row_max = tl.full([BLOCK_C], float("-inf"), ACC)
    row_nan = tl.zeros([BLOCK_C], tl.int32)
    for s0 in range(s_start, s_stop, BLOCK_S):
        s = s0 + s_idx
        mask = c_mask[:, None] & (s[None, :] < s_stop)
        x = tl.load(X_ptr + row_off[:, None] + s[None, :] * stride_s, mask=mask, other=float("-inf")).to(ACC)
        row_max = tl.maximum(row_max, tl.max(x, axis=1))
        row_nan += tl.sum((x != x).to(tl.int32), axis=1)
    return row_max, row_nan


@triton.jit
def _tap_threshold(row_max, row_nan, tau, tau_mid, tau_lo, IN_DTYPE: tl.constexpr, IN_BF16: tl.constexpr,
                   ACC: tl.constexpr):
    """thr = max * tau rounded through the input dtype (as PyTorch computes it); NaN if the row had one.

    Triton passes Python floats as float32: float64 input gets tau as three float32 parts whose sum
    in float64 is tau exactly (see _tau_parts), the others use tau's float32 value, as PyTorch does."""
    if ACC == tl.float64:
        # (row_max is float64 here: each part is promoted exactly, and the three sum to tau exactly)
        thr = row_max * (((tl.zeros_like(row_max) + tau) + tau_mid) + tau_lo)
    else:
        thr = row_max * tau
    if IN_BF16:
        # Round-to-nearest-even to bf16 by hand: Triton's interpreter truncates in `.to(tl.bfloat16)`,
        # so doing it on the bits gives the same threshold on the CPU interpreter and on the GPU.
        bits = thr.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        thr = bits.to(tl.float32, bitcast=True)
    else:
        thr = thr.to(IN_DTYPE).to(ACC)
    return tl.where(row_nan > 0, float("nan"), thr)


@triton.jit
def _tap_tile_sum(
    X_ptr, row_off, c_mask, thr, s_start, s_stop, stride_s, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr
):
    """Per-row sum of kept values and count of kept positive values over s in [s_start, s_stop)."""
    s_idx = tl.arange(0, BLOCK_S)
    total = tl.zeros([BLOCK_C], ACC)
    count = tl.zeros([BLOCK_C], tl.int32)
    for s0 in range(s_start, s_stop, BLOCK_S):
        s = s0 + s_idx
        mask = c_mask[:, None] & (s[None, :] < s_stop)
        x = tl.load(X_ptr + row_off[:, None] + s[None, :] * stride_s, mask=mask, other=0.0).to(ACC)
        kept = mask & (x > thr[:, None])
        total += tl.sum(tl.where(kept, x, 0.0), axis=1)
        count += tl.sum((kept & (x > 0.0)).to(tl.int32), axis=1)
    return total, count


@triton.jit
def _inverse_count(count, ACC: tl.constexpr):
    """``1 / max(count, 1)`` in ACC, bit-equal to the reference's IEEE division (see ``ieee_div``)."""
    return ieee_reciprocal(tl.maximum(count, 1).to(ACC))


@triton.jit
def _tap_fwd_kernel(
    X_ptr, Out_ptr, Thr_ptr, Inv_ptr,
    C, S, stride_n, stride_c, stride_s, tau, tau_mid, tau_lo,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SINGLE_TILE: tl.constexpr, IN_BF16: tl.constexpr,
    ACC: tl.constexpr,
):
    """One program per (image, block of BLOCK_C channels): max pass, then threshold/sum/count pass."""
    n, c, c_mask, row_off = _tap_program_rows(tl.program_id(0), C, stride_n, stride_c, BLOCK_C)
    if SINGLE_TILE:
        # Whole rows fit one tile: load once and keep them in registers for both passes.
        s = tl.arange(0, BLOCK_S)
        mask = c_mask[:, None] & (s[None, :] < S)
        x = tl.load(X_ptr + row_off[:, None] + s[None, :] * stride_s, mask=mask, other=float("-inf")).to(ACC)
        row_nan = tl.sum((x != x).to(tl.int32), axis=1)
        thr = _tap_threshold(tl.max(x, axis=1), row_nan, tau, tau_mid, tau_lo, X_ptr.dtype.element_ty, IN_BF16, ACC)
        kept = x > thr[:, None]  # padding holds -inf, which is never kept
        total = tl.sum(tl.where(kept, x, 0.0), axis=1)
        count = tl.sum((kept & (x > 0.0)).to(tl.int32), axis=1)
    else:
        row_max, row_nan = _tap_tile_max(X_ptr, row_off, c_mask, 0, S, stride_s, BLOCK_C, BLOCK_S, ACC)
        thr = _tap_threshold(row_max, row_nan, tau, tau_mid, tau_lo, X_ptr.dtype.element_ty, IN_BF16, ACC)
        total, count = _tap_tile_sum(X_ptr, row_off, c_mask, thr, 0, S, stride_s, BLOCK_C, BLOCK_S, ACC)
    inv = _inverse_count(count, ACC)
    out_off = n * C + c
    tl.store(Out_ptr + out_off, (total * inv).to(Out_ptr.dtype.element_ty), mask=c_mask)
    tl.store(Thr_ptr + out_off, thr, mask=c_mask)
    tl.store(Inv_ptr + out_off, inv, mask=c_mask)


@triton.jit
def _tap_split_max_kernel(
    X_ptr, PartMax_ptr, C, S, stride_n, stride_c, stride_s, SPLIT_LEN,
    NUM_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    """Split path, stage 1: max over one of NUM_SPLITS slices of S (NaN where the slice held one)."""
    split = tl.program_id(1)
    n, c, c_mask, row_off = _tap_program_rows(tl.program_id(0), C, stride_n, stride_c, BLOCK_C)
    s_start = split * SPLIT_LEN
    s_stop = tl.minimum(s_start + SPLIT_LEN, S)
    row_max, row_nan = _tap_tile_max(X_ptr, row_off, c_mask, s_start, s_stop, stride_s, BLOCK_C, BLOCK_S, ACC)
    row_max = tl.where(row_nan > 0, float("nan"), row_max)
    tl.store(PartMax_ptr + (n * C + c) * NUM_SPLITS + split, row_max, mask=c_mask)


@triton.jit
def _tap_split_sum_kernel(
    X_ptr, PartMax_ptr, PartSum_ptr, PartCount_ptr, Thr_ptr,
    C, S, stride_n, stride_c, stride_s, SPLIT_LEN, tau, tau_mid, tau_lo,
    NUM_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, IN_BF16: tl.constexpr,
    ACC: tl.constexpr,
):
    """Split path, stage 2: every slice re-reduces the partial maxima (cheap, deterministic), then sums."""
    split = tl.program_id(1)
    n, c, c_mask, row_off = _tap_program_rows(tl.program_id(0), C, stride_n, stride_c, BLOCK_C)
    row = n * C + c
    k = tl.arange(0, NUM_SPLITS)
    part = tl.load(PartMax_ptr + row[:, None] * NUM_SPLITS + k[None, :], mask=c_mask[:, None], other=float("-inf"))
    row_nan = tl.sum((part != part).to(tl.int32), axis=1)
    thr = _tap_threshold(tl.max(part, axis=1), row_nan, tau, tau_mid, tau_lo, X_ptr.dtype.element_ty, IN_BF16, ACC)
    s_start = split * SPLIT_LEN
    s_stop = tl.minimum(s_start + SPLIT_LEN, S)
    total, count = _tap_tile_sum(X_ptr, row_off, c_mask, thr, s_start, s_stop, stride_s, BLOCK_C, BLOCK_S, ACC)
    tl.store(PartSum_ptr + row * NUM_SPLITS + split, total, mask=c_mask)
    tl.store(PartCount_ptr + row * NUM_SPLITS + split, count, mask=c_mask)
    if split == 0:
        tl.store(Thr_ptr + row, thr, mask=c_mask)


@triton.jit
def _tap_split_combine_kernel(
    PartSum_ptr, PartCount_ptr, Out_ptr, Inv_ptr, NC,
    NUM_SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
):
    """Split path, stage 3: fixed-order sum of the slices' partial sums and counts (no atomics)."""
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = row < NC
    k = tl.arange(0, NUM_SPLITS)
    offs = row[:, None] * NUM_SPLITS + k[None, :]
    total = tl.sum(tl.load(PartSum_ptr + offs, mask=r_mask[:, None], other=0.0), axis=1)
    count = tl.sum(tl.load(PartCount_ptr + offs, mask=r_mask[:, None], other=0), axis=1)
    inv = _inverse_count(count, ACC)
    tl.store(Out_ptr + row, (total * inv).to(Out_ptr.dtype.element_ty), mask=r_mask)
    tl.store(Inv_ptr + row, inv, mask=r_mask)


@triton.jit
def _tap_bwd_kernel(
    X_ptr, Grad_ptr, GradOut_ptr, Thr_ptr, Inv_ptr,
    ROWS, C, S, stride_n, stride_c, stride_s, g_stride_n, g_stride_c, g_stride_s,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    """grad[n, c, s] = (x > thr) * grad_out[n, c] * inv[n, c]; every element written exactly once."""
    rows, s_block = grid_pair(ROWS)
    n, c, c_mask, row_off = _tap_program_rows(rows, C, stride_n, stride_c, BLOCK_C)
    s = s_block * BLOCK_S + tl.arange(0, BLOCK_S)
    row = n * C + c
    thr = tl.load(Thr_ptr + row, mask=c_mask, other=0.0)
    scale = tl.load(GradOut_ptr + row, mask=c_mask, other=0.0).to(ACC) * tl.load(Inv_ptr + row, mask=c_mask, other=0.0)
    mask = c_mask[:, None] & (s[None, :] < S)
    x = tl.load(X_ptr + row_off[:, None] + s[None, :] * stride_s, mask=mask, other=0.0).to(ACC)
    grad = tl.where(x > thr[:, None], scale[:, None], 0.0)
    g_off = n.to(tl.int64) * g_stride_n + c.to(tl.int64)[:, None] * g_stride_c + s[None, :] * g_stride_s
    tl.store(Grad_ptr + g_off, grad.to(Grad_ptr.dtype.element_ty), mask=mask)


def _grad_buffer(x: Tensor) -> tuple[Tensor, Tensor, tuple[int, int, int], tuple[int, int, int]]:
    """Allocate grad_x in x's memory format; return ``(grad, x', x strides, grad strides)`` as [N, C, H*W]."""
    grad = torch.empty_like(x, memory_format=_memory_format(x))
    x, *x_strides = flat_spatial(x)
    _, *g_strides = flat_spatial(grad)
    return grad, x, tuple(x_strides), tuple(g_strides)


def _tile_config(c: int, s: int, stride_s: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S): wide along the unit-stride axis, ~2-4K elements per tile."""
    if stride_s == 1 or c == 1:  # NCHW: rows are contiguous along s
        block_s = min(next_power_of_2(s), 1024)
        block_c = max(1, min(next_power_of_2(c), 4096 // block_s))
    else:  # channels_last: consecutive channels are contiguous
        block_c = min(next_power_of_2(c), 64)
        block_s = max(1, min(next_power_of_2(s), 4096 // block_c))
    return block_c, block_s


def _num_splits(programs: int, s: int, block_s: int, device: torch.device) -> int:
    """Split S across programs when (image, channel-block) programs alone cannot fill the GPU."""
    sms = _launch.multiprocessor_count(device)
    if not sms or s <= 4 * block_s or programs >= 2 * sms:
        return 1
    return _launch.split_count(None, programs, next_power_of_2(cdiv(s, block_s)), device)


def _tau_parts(tau: float) -> tuple[float, float, float]:
    """Three float32 values whose float64 sum is ``tau`` exactly (24 + 24 + 24 bits cover float64's
    53 for any tau above ~1e-25): Triton passes Python floats to kernels as float32."""
    hi = float(np.float32(tau))
    mid = float(np.float32(tau - hi))
    return hi, mid, float(np.float32(tau - hi - mid))


def tap_forward_triton(x: Tensor, tau: float, num_splits: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Triton forward: ``(out[N, C] in x.dtype, thr[N, C], inv_count[N, C])`` (last two in acc dtype).

    ``num_splits`` forces the multi-program reduction over H*W (a power of two; default: chosen from
    the device's SM count, 1 on the CPU interpreter).
    """
    n, c = x.shape[:2]
    x, stride_n, stride_c, stride_s = flat_spatial(x)
    s = x.shape[2] * x.shape[3]
    acc = _acc_dtype(x.dtype)
    acc_tl = tl.float64 if acc == torch.float64 else tl.float32
    in_bf16 = x.dtype == torch.bfloat16
    out = torch.empty((n, c), dtype=x.dtype, device=x.device)
    thr = torch.empty((n, c), dtype=acc, device=x.device)
    inv = torch.empty((n, c), dtype=acc, device=x.device)
    if n * c == 0:
        return out, thr, inv
    block_c, block_s = _tile_config(c, s, stride_s)
    programs = n * cdiv(c, block_c)
    splits = num_splits if num_splits is not None else _num_splits(programs, s, block_s, x.device)
    if splits <= 1:
        launch(_tap_fwd_kernel, (programs,),
            x, out, thr, inv, c, s, stride_n, stride_c, stride_s, *_tau_parts(tau),
            BLOCK_C=block_c, BLOCK_S=block_s, SINGLE_TILE=s <= block_s, IN_BF16=in_bf16, ACC=acc_tl,
        )
        return out, thr, inv
    if splits & (splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {splits}")
    split_len = cdiv(s, splits)
    part_max = torch.empty((n * c, splits), dtype=acc, device=x.device)
    part_sum = torch.empty((n * c, splits), dtype=acc, device=x.device)
    part_count = torch.empty((n * c, splits), dtype=torch.int32, device=x.device)
    grid = (programs, splits)
    launch(_tap_split_max_kernel, grid,
        x, part_max, c, s, stride_n, stride_c, stride_s, split_len,
        NUM_SPLITS=splits, BLOCK_C=block_c, BLOCK_S=block_s, ACC=acc_tl,
    )
    launch(_tap_split_sum_kernel, grid,
        x, part_max, part_sum, part_count, thr, c, s, stride_n, stride_c, stride_s, split_len, *_tau_parts(tau),
        NUM_SPLITS=splits, BLOCK_C=block_c, BLOCK_S=block_s, IN_BF16=in_bf16, ACC=acc_tl,
    )
    block_r = 128
    launch(_tap_split_combine_kernel, (cdiv(n * c, block_r),),
        part_sum, part_count, out, inv, n * c, NUM_SPLITS=splits, BLOCK_R=block_r, ACC=acc_tl,
    )
    return out, thr, inv


def tap_backward_triton(grad_out: Tensor, x: Tensor, thr: Tensor, inv: Tensor) -> Tensor:
    """Triton backward: ``Tensor[N, C, H, W]`` in ``x``'s dtype and memory format."""
    grad, x, (stride_n, stride_c, stride_s), (g_stride_n, g_stride_c, g_stride_s) = _grad_buffer(x)
    if x.numel() == 0:
        return grad
    n, c = x.shape[:2]
    s = x.shape[2] * x.shape[3]
    block_c, block_s = _tile_config(c, s, stride_s)
    rows = n * cdiv(c, block_c)
    grid = (rows * cdiv(s, block_s),)  # (row block, position block), row blocks fastest (grid_pair)
    acc_tl = tl.float64 if thr.dtype == torch.float64 else tl.float32
    launch(_tap_bwd_kernel, grid,
        x, grad, grad_out.contiguous(), thr, inv, rows, c, s, stride_n, stride_c, stride_s,
        g_stride_n, g_stride_c, g_stride_s, BLOCK_C=block_c, BLOCK_S=block_s, ACC=acc_tl,
    )
    return grad


# --------------------------------------------------------------------------------------------------
# Native launchers: torch-free C++ (CPU) and CUDA kernels in csrc/, given pointers, sizes, strides.
# --------------------------------------------------------------------------------------------------


def _native_forward(module, x: Tensor, tau: float, last_arg: int) -> tuple[Tensor, Tensor, Tensor]:
    n, c = x.shape[:2]
    x, stride_n, stride_c, stride_s = flat_spatial(x)
    s = x.shape[2] * x.shape[3]
    acc = _acc_dtype(x.dtype)
    out = torch.empty((n, c), dtype=acc, device=x.device)
    thr = torch.empty_like(out)
    inv = torch.empty_like(out)
    if n * c:
        module.tap_forward(
            x.data_ptr(), out.data_ptr(), thr.data_ptr(), inv.data_ptr(),
            n, c, s, stride_n, stride_c, stride_s, tau, _native.NATIVE_DTYPE_CODES[x.dtype], last_arg,
        )
    return out.to(x.dtype), thr, inv


def _native_backward(module, grad_out: Tensor, x: Tensor, thr: Tensor, inv: Tensor, last_arg: int) -> Tensor:
    grad, x, (stride_n, stride_c, stride_s), (g_stride_n, g_stride_c, g_stride_s) = _grad_buffer(x)
    if x.numel() == 0:
        return grad
    n, c = x.shape[:2]
    g = grad_out.to(thr.dtype).contiguous()
    module.tap_backward(
        g.data_ptr(), x.data_ptr(), thr.data_ptr(), inv.data_ptr(), grad.data_ptr(),
        n, c, x.shape[2] * x.shape[3], stride_n, stride_c, stride_s, g_stride_n, g_stride_c, g_stride_s,
        _native.NATIVE_DTYPE_CODES[x.dtype], last_arg,
    )
    return grad


def _native_module(backend: str):
    return _native.cuda_module() if backend == "cuda" else _native.cpu_module()


# --------------------------------------------------------------------------------------------------
# Dispatch and custom ops.
# --------------------------------------------------------------------------------------------------


def _resolve_backend(backend: str, device: torch.device) -> str:
    """Pick the implementation; explicit requests that cannot run raise, ``auto`` falls back with a warning."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if not can_launch_triton(device):
            raise RuntimeError(
                "backend='triton' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)"
            )
        return backend
    if backend == "cuda":
        if device.type != "cuda" or _native.cuda_module() is None:
            why = _native.load_error("_C_cuda")
            raise RuntimeError(
                "backend='cuda' needs a CUDA tensor and the CUDA extension"
                + (f" ({why})" if why else f" (got a {device.type} tensor)" if device.type != "cuda" else "")
            )
        return backend
    if backend == "native":
        if device.type != "cpu" or _native.cpu_module() is None:
            raise RuntimeError(f"backend='native' needs a CPU tensor and the C++ extension ({_native.load_error('_C')})")
        return backend
    if backend == "reference":
        return backend
    # auto
    if device.type == "cuda":
        # The CUDA extension first: on an H100 its forward+backward beat the Triton kernels in all 12
        # measured cases ([64, C, h, w] at 7^2-28^2, fp32/bf16, NCHW/channels_last; 0.73-2.70x GAP's time
        # against 0.79-4.22x, benchmarks/results/h100_tap.md): fewer launches from Python per call.
        if _native.cuda_module() is not None:
            return "cuda"
        if can_launch_triton(device):
            return "triton"
        _native.warn_fallback("tap", "neither Triton nor the CUDA extension is available")
        return "reference"
    if device.type == "cpu":
        if _native.cpu_module() is not None:
            return "native"
        _native.warn_fallback("tap", f"the C++ extension is not available ({_native.load_error('_C')})")
    return "reference"


def _forward_impl(x: Tensor, tau: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    chosen = _resolve_backend(backend, x.device)
    with device_guard(x):
        if chosen == "triton":
            return tap_forward_triton(x, tau)
        if chosen in ("cuda", "native"):
            return _native_forward(_native_module(chosen), x, tau, _native.kernel_last_arg(x))
        return _tap_forward_reference(x, tau)


def _backward_impl(grad_out: Tensor, x: Tensor, thr: Tensor, inv: Tensor, backend: str) -> Tensor:
    check_same_device(grad_out=grad_out, x=x, thr=thr, inv=inv)
    chosen = _resolve_backend(backend, x.device)
    with device_guard(x):
        if chosen == "triton":
            return tap_backward_triton(grad_out, x, thr, inv)
        if chosen in ("cuda", "native"):
            return _native_backward(_native_module(chosen), grad_out, x, thr, inv, _native.kernel_last_arg(x))
        return _tap_backward_reference(grad_out, x, thr, inv)


class TAPFunction(torch.autograd.Function):
    """TAP as a plain autograd Function: the eager path (least per-call overhead).

    ``TAPFunction.apply(x, tau, backend) -> Tensor[N, C]``; arguments are not validated here (use
    :func:`tap`). The backward is itself differentiable (``create_graph=True``, e.g. a Grad-CAM
    whose map enters a loss): linear in the incoming gradient, with the kept-pixel mask a constant,
    so its own derivative in ``x`` is zero almost everywhere.
    """

    @staticmethod
    def forward(ctx, x: Tensor, tau: float, backend: str) -> Tensor:
        out, thr, inv = _forward_impl(x, tau, backend)
        ctx.save_for_backward(x, thr, inv)
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, thr, inv = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the same values, as recorded torch ops
            return _tap_backward_reference(grad_out, x, thr, inv), None, None
        return _backward_impl(grad_out, x, thr, inv, ctx.backend), None, None


# Custom ops: what torch.compile sees (opaque to Dynamo, shapes from the fake implementations).


@torch.library.custom_op("rethinkcam_fast::tap_forward", mutates_args=())
def tap_forward(x: Tensor, tau: float, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """TAP forward: ``(out[N, C] in x.dtype, thr[N, C], inv_count[N, C])`` (acc dtype for the last two)."""
    return _forward_impl(x, tau, backend)


@tap_forward.register_fake
def _tap_forward_fake(x: Tensor, tau: float, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    n, c = x.shape[:2]
    acc = _acc_dtype(x.dtype)
    return x.new_empty((n, c)), x.new_empty((n, c), dtype=acc), x.new_empty((n, c), dtype=acc)


@torch.library.custom_op("rethinkcam_fast::tap_backward", mutates_args=())
def tap_backward(grad_out: Tensor, x: Tensor, thr: Tensor, inv: Tensor, backend: str = "auto") -> Tensor:
    """TAP backward: ``grad_x[N, C, H, W]`` (x's dtype and memory format) from ``grad_out[N, C]``."""
    return _backward_impl(grad_out, x, thr, inv, backend)


@tap_backward.register_fake
def _tap_backward_fake(grad_out: Tensor, x: Tensor, thr: Tensor, inv: Tensor, backend: str = "auto") -> Tensor:
    return torch.empty_like(x, memory_format=_memory_format(x))


def _tap_setup_context(ctx, inputs, output) -> None:
    x, _tau, backend = inputs
    _out, thr, inv = output
    ctx.save_for_backward(x, thr, inv)
    ctx.backend = backend
    ctx.mark_non_differentiable(thr, inv)


def _tap_backward_autograd(ctx, grad_out: Tensor, _grad_thr, _grad_inv):
    x, thr, inv = ctx.saved_tensors
    grad_x = tap_backward(grad_out, x, thr, inv, ctx.backend) if ctx.needs_input_grad[0] else None
    return grad_x, None, None


torch.library.register_autograd(
    "rethinkcam_fast::tap_forward", _tap_backward_autograd, setup_context=_tap_setup_context
)


def _tap_backward_setup_context(ctx, inputs, output) -> None:
    _grad_out, x, thr, inv, _backend = inputs
    ctx.save_for_backward(x, thr, inv)


def _tap_double_backward(ctx, grad_grad_x: Tensor):
    """The backward is linear in grad_out: its adjoint averages grad_grad_x over the kept pixels."""
    x, thr, inv = ctx.saved_tensors
    kept = x.to(thr.dtype) > thr[:, :, None, None]
    grad_grad_out = torch.where(kept, grad_grad_x.to(inv.dtype), 0).sum(dim=(2, 3)) * inv
    return grad_grad_out.to(x.dtype), None, None, None, None


torch.library.register_autograd(
    "rethinkcam_fast::tap_backward", _tap_double_backward, setup_context=_tap_backward_setup_context
)


def tap(x: Tensor, tau: float = 0.1, *, backend: str = "auto") -> Tensor:
    """Thresholded average pooling (TAP) over the spatial dims, with autograd.

    Args:
        x: ``Tensor[N, C, H, W]``; float16, bfloat16, float32 or float64; NCHW or channels_last.
        tau: threshold ratio in ``[0, 1)``; an element is kept when ``x > tau * max`` of its channel.
        backend: ``"auto"`` (the CUDA extension on CUDA, else Triton; C++ on CPU; else the reference with
            a warning), or one of
            ``"triton"``, ``"cuda"``, ``"native"``, ``"reference"`` to force an implementation.
    Returns:
        ``Tensor[N, C]`` in ``x.dtype`` (accumulated in float32, float64 for float64 input).
    Raises:
        TypeError: ``x`` is not a tensor or not floating; ``tau`` not a real number.
        ValueError: ``x`` is not 4-D or has an empty spatial extent; ``tau`` outside ``[0, 1)``.
    """
    check_tensor("x", x, ndim=4)
    check_float_dtype("x", x)
    tau = check_unit_interval("tau", tau)
    if not torch.jit.is_tracing() and x.shape[2] * x.shape[3] == 0:  # (traced sizes are tensors: no bool)
        raise ValueError(f"x must have a non-empty spatial extent, got shape {tuple(x.shape)}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if graph_capture():  # (torch.compile, torch.jit.trace)
        return tap_forward(x, tau, backend)[0]
    return TAPFunction.apply(x, tau, backend)


__all__ = [
    "BACKENDS",
    "TAPFunction",
    "tap",
    "tap_backward",
    "tap_backward_triton",
    "tap_forward",
    "tap_forward_triton",
    "tap_reference",
]
