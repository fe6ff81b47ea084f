"""Channel-weighted activation maps at feature resolution: the reduction at the heart of every CAM.

For a feature map ``A[N, K, h, w]`` this op returns ``M[N, h, w]`` (float32), one of::

    mode "channel":    M = sum_k W[n, k] * A[n, k]                  (CAM: the classifier's weights)
    mode "layercam":   M = sum_k relu(G[n, k]) * A[n, k]            (LayerCAM)
    mode "flm":        M = sum_k relu(G[n, k]) * relu(A[n, k])      (Fully-CAM's FLM, per layer)
    mode "gradcam":    M = sum_k mean_s(G[n, k]) * A[n, k]          (Grad-CAM)
    mode "gradcam++":  M = sum_k w[n, k] * A[n, k],  w = sum_s alpha * relu(G),
                       alpha = G² / (2 G² + sum_s(A) G³ + 1e-6) where G != 0, else 0   (Grad-CAM++)

optionally followed by a ReLU. The formulas of the last two are those of the common PyTorch
implementations (DESIGN.md §2).

NaN policy, the same on every backend: the ReLUs inside the LayerCAM and FLM sums map NaN to 0 (as
:func:`rethinkcam_fast.flm_fuse` does); Grad-CAM's and Grad-CAM++'s weights keep a NaN gradient's NaN
(the map is then NaN); the ReLU of the summed map keeps NaN, so that a NaN map is flagged degenerate
by the epilogue.

Kernels, all accumulating in float32 and reading NCHW or channels_last in place, never storing a
``[N, K, h, w]`` product:

* Triton (CUDA), every mode: one pass over ``A`` (and ``G``). For ``"gradcam"`` / ``"gradcam++"`` the
  channel weights come from the gradients in the kernel, where the engine ran PyTorch ops over
  ``[N, K, h, w]`` for them (one for Grad-CAM, about a dozen for Grad-CAM++): a map of at most
  ``FUSED_GRADIENT_WEIGHTS_MAX_S`` positions (a ResNet's last stage) takes one program per image
  that computes the weights and the sum from one load of each tile; larger maps get their weights
  from a kernel over (image, channel chunk) (Grad-CAM++ reads ``A`` twice there, for ``sum_s A``),
  then the ``"channel"`` kernel's sum.
* C++ (CPU, ``csrc/cpu/weighted_map.cpp``) and the opt-in CUDA extension kernel: ``"layercam"`` and
  ``"flm"``.
* The pure-PyTorch reference: the test oracle, the CPU path of the other modes (``"channel"`` is an
  einsum, already one pass; the Grad-CAM weights are PyTorch ops there) and the fallback without
  the extension.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from .. import _native
from .._triton import cdiv, grid_pair, ieee_div, launch, next_power_of_2, tl, triton
from .._validation import check_flag, check_float_dtype, check_same_device, check_tensor
from ._launch import (autocast_off, check_backend, device_guard, flat_spatial, flat_strides, run_inference_op,
                      run_trusted, use_triton)

MODES = ("channel", "layercam", "flm", "gradcam", "gradcam++")
GRADIENT_WEIGHT_MODES = ("gradcam", "gradcam++")  # channel weights computed from G inside the op
GRADCAM_PP_EPS = 1e-6  # pytorch-grad-cam's epsilon in the Grad-CAM++ denominator
# Maps of at most this many positions (7x7, 8x8, 10x10) take the one-pass kernel: one program per
# image computes the weights and the sum from one load of each tile.
FUSED_GRADIENT_WEIGHTS_MAX_S = 128
_MODE_CODES = {mode: code for code, mode in enumerate(MODES)}
# The CUDA extension's kernel for "layercam" and "flm" (csrc/cuda/weighted_map.cu): launched from C++,
# for Fully-CAM's 53 per-layer reductions inside autograd hooks, where a Triton launch from Python is
# host time on top of the backward. Opt-in until an H100 run has checked and timed it.
CUDA_KERNEL_ENV = "RETHINKCAM_CUDA_WEIGHTED_MAP"
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def relu_nan_to_zero(x: Tensor) -> Tensor:
    """``relu`` of the gradients and activations inside the sums, with ``relu(NaN) = 0``, as the kernels
    compute it: the NaN policy shared with Fully-CAM's FLM (:mod:`rethinkcam_fast.ops.flm_fuse` uses this
    function). Its gradient is ``[x > 0]``, the kernels' mask and ``torch.relu``'s (``fmax`` would pass
    gradient at ``x == 0``, common in ReLU networks). The ReLU of the summed map keeps NaN
    (``torch.relu``), so a NaN map is flagged."""
    return torch.where(x > 0, x, x.new_zeros(()))


def gradient_channel_weights_reference(a: Tensor, g: Tensor, mode: str) -> Tensor:
    """``w[N, K]`` from float activations and gradients: Grad-CAM's spatial mean of ``g``, or
    Grad-CAM++'s ``sum_s alpha * relu(g)`` (differentiable: ``CAMEngine(differentiable=True)`` runs it)."""
    if mode == "gradcam":
        return g.mean(dim=(2, 3))
    g2 = g * g
    denom = 2 * g2 + a.sum(dim=(2, 3))[:, :, None, None] * g2 * g + GRADCAM_PP_EPS
    alpha = torch.where(g != 0, g2 / denom, torch.zeros_like(g))
    return (alpha * g.relu()).sum(dim=(2, 3))


def weighted_map_reference(
    activations: Tensor, weights: Tensor | None = None, grads: Tensor | None = None,
    mode: str = "channel", relu: bool = True, acc: torch.dtype = torch.float32,
) -> Tensor:
    """Pure-PyTorch ``M[N, h, w]`` in ``acc`` (float32; float64 for the differentiable engine's float64
    models; see the module docstring for the modes), summed in ``acc`` under autocast too."""
    with autocast_off(activations):
        a = activations.to(acc)
        if mode in GRADIENT_WEIGHT_MODES:
            weights = gradient_channel_weights_reference(a, grads.to(acc), mode)
        if mode in ("channel", *GRADIENT_WEIGHT_MODES):
            m = torch.einsum("nk,nkhw->nhw", weights.to(acc), a)
        elif mode == "layercam":
            m = (relu_nan_to_zero(grads.to(acc)) * a).sum(dim=1)
        else:
            m = (relu_nan_to_zero(grads.to(acc)) * relu_nan_to_zero(a)).sum(dim=1)
        return m.relu() if relu else m


# --------------------------------------------------------------------------------------------------
# Triton kernel: one program per (image, block of BLOCK_S spatial positions), looping over channels.
# --------------------------------------------------------------------------------------------------


@triton.jit
def _weighted_map_kernel(
    A_ptr, W_ptr, G_ptr, Out_ptr,
    N, K, S, a_stride_n, a_stride_k, a_stride_s, w_stride_n, w_stride_k, g_stride_n, g_stride_k, g_stride_s,
    MODE: tl.constexpr, RELU: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    n, s_block = grid_pair(N)
    s = s_block * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = s < S
    k_idx = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_S], tl.float32)
    a_base = A_ptr + n.to(tl.int64) * a_stride_n
    g_base = G_ptr + n.to(tl.int64) * g_stride_n
    for k0 in range(0, K, BLOCK_K):
        k = k0 + k_idx
        mask = (k[:, None] < K) & s_mask[None, :]
        a = tl.load(a_base + k[:, None].to(tl.int64) * a_stride_k + s[None, :] * a_stride_s, mask=mask, other=0.0)
        a = a.to(tl.float32)
        if MODE == 0:
            w = tl.load(W_ptr + n * w_stride_n + k * w_stride_k, mask=k < K, other=0.0).to(tl.float32)
            acc += tl.sum(w[:, None] * a, axis=0)
        else:
            g = tl.load(g_base + k[:, None].to(tl.int64) * g_stride_k + s[None, :] * g_stride_s, mask=mask, other=0.0)
            # relu(x) = where(x > 0, x, 0) inside the sum: NaN -> 0 (the FLM NaN policy); the final
            # ReLU is where(x < 0, 0, x), which keeps NaN. Both the same on the GPU and the interpreter
            # (tl.maximum's NaN handling differs between them).
            g = g.to(tl.float32)
            g = tl.where(g > 0.0, g, 0.0)
            if MODE == 2:
                a = tl.where(a > 0.0, a, 0.0)
            acc += tl.sum(g * a, axis=0)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)
    tl.store(Out_ptr + n * S + s, acc, mask=s_mask)


@triton.jit
def _tile_weight_sums(g, sum_a, PLUS: tl.constexpr, EPS: tl.constexpr):
    """Per channel of a [BLOCK_K, BLOCK_S] tile (float32, zero-padded): Grad-CAM's sum of g, or
    Grad-CAM++'s sum of alpha * relu(g) given sum_s A per channel."""
    if PLUS:
        g2 = g * g
        denom = 2 * g2 + sum_a[:, None] * g2 * g + EPS
        alpha = tl.where(g != 0.0, ieee_div(g2, denom), 0.0)  # padding lanes (g = 0): 0, as where(g != 0)
        return tl.sum(alpha * tl.where(g > 0.0, g, 0.0), axis=1)  # a NaN gradient keeps its NaN via alpha
    else:
        return tl.sum(g, axis=1)


@triton.jit
def _gradient_weighted_map_kernel(
    A_ptr, G_ptr, Out_ptr,
    K, S, a_stride_n, a_stride_k, a_stride_s, g_stride_n, g_stride_k, g_stride_s,
    PLUS: tl.constexpr, RELU: tl.constexpr, EPS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per image whose whole map fits one tile (S <= BLOCK_S: a ResNet's last stage): for
    each chunk of BLOCK_K channels, one load of A and G gives the channel weights (Grad-CAM: mean of
    g; Grad-CAM++: sum_s alpha * relu(g)) and their weighted sum M[s] += w_k * A[k, s]."""
    n = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    s_mask = s < S
    k_idx = tl.arange(0, BLOCK_K)
    a_base = A_ptr + n.to(tl.int64) * a_stride_n
    g_base = G_ptr + n.to(tl.int64) * g_stride_n
    acc = tl.zeros([BLOCK_S], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + k_idx
        mask = (k < K)[:, None] & s_mask[None, :]
        a = tl.load(a_base + k[:, None].to(tl.int64) * a_stride_k + s[None, :] * a_stride_s, mask=mask, other=0.0)
        g = tl.load(g_base + k[:, None].to(tl.int64) * g_stride_k + s[None, :] * g_stride_s, mask=mask, other=0.0)
        a = a.to(tl.float32)
        w = _tile_weight_sums(g.to(tl.float32), tl.sum(a, axis=1), PLUS, EPS)
        if not PLUS:
            w = ieee_div(w, tl.full([BLOCK_K], S, tl.float32))
        acc += tl.sum(w[:, None] * a, axis=0)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)
    tl.store(Out_ptr + n * S + s, acc, mask=s_mask)


@triton.jit
def _gradient_weights_kernel(
    A_ptr, G_ptr, W_ptr,
    K, S, a_stride_n, a_stride_k, a_stride_s, g_stride_n, g_stride_k, g_stride_s,
    PLUS: tl.constexpr, EPS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (n, chunk of BLOCK_K channels): the channel weights w[n, k] (float32) of a map larger
    than one tile, over all of it (Grad-CAM++: a pass for sum_s A first); the map is then the
    "channel" kernel's sum with these weights."""
    n = tl.program_id(0)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < K
    s_idx = tl.arange(0, BLOCK_S)
    a_rows = A_ptr + n.to(tl.int64) * a_stride_n + k[:, None].to(tl.int64) * a_stride_k
    g_rows = G_ptr + n.to(tl.int64) * g_stride_n + k[:, None].to(tl.int64) * g_stride_k
    sum_a = tl.zeros([BLOCK_K], tl.float32)
    if PLUS:
        for s0 in range(0, S, BLOCK_S):
            s = s0 + s_idx
            a = tl.load(a_rows + s[None, :] * a_stride_s, mask=k_mask[:, None] & (s < S)[None, :], other=0.0)
            sum_a += tl.sum(a.to(tl.float32), axis=1)
    w = tl.zeros([BLOCK_K], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + s_idx
        g = tl.load(g_rows + s[None, :] * g_stride_s, mask=k_mask[:, None] & (s < S)[None, :], other=0.0)
        w += _tile_weight_sums(g.to(tl.float32), sum_a, PLUS, EPS)
    if not PLUS:
        w = ieee_div(w, tl.full([BLOCK_K], S, tl.float32))
    tl.store(W_ptr + n * K + k, w, mask=k_mask)


def weighted_map_triton(
    activations: Tensor, weights: Tensor | None, grads: Tensor | None, mode: str, relu: bool
) -> Tensor:
    n, k, h, w = activations.shape
    s = h * w
    out = torch.empty((n, h, w), dtype=torch.float32, device=activations.device)
    if out.numel() == 0:
        return out.zero_()
    a, a_sn, a_sk, a_ss = flat_spatial(activations)
    if mode in GRADIENT_WEIGHT_MODES:
        g, g_sn, g_sk, g_ss = flat_spatial(grads)
        plus = mode == "gradcam++"
        if s <= FUSED_GRADIENT_WEIGHTS_MAX_S:  # the whole map in one tile: weights and sum in one pass
            block_s = next_power_of_2(s)
            block_k = max(1, min(next_power_of_2(k), 4096 // block_s, 64))
            launch(_gradient_weighted_map_kernel, (n,),
                a, g, out, k, s, a_sn, a_sk, a_ss, g_sn, g_sk, g_ss,
                PLUS=plus, RELU=relu, EPS=GRADCAM_PP_EPS, BLOCK_K=block_k, BLOCK_S=block_s,
                num_warps=8 if block_k * block_s >= 4096 else 4,
            )
            return out
        # Larger maps: the weights once per (image, channel chunk), then the "channel" kernel's sum
        # (one program per position block recomputing them would read G once per block).
        weights = torch.empty((n, k), dtype=torch.float32, device=activations.device)
        block_s = 64 if a_sk == 1 and k > 1 else 128
        block_k = 32
        launch(_gradient_weights_kernel, (n, cdiv(k, block_k)),
            a, g, weights, k, s, a_sn, a_sk, a_ss, g_sn, g_sk, g_ss,
            PLUS=plus, EPS=GRADCAM_PP_EPS, BLOCK_K=block_k, BLOCK_S=block_s, num_warps=8,
        )
        mode = "channel"
    if mode == "channel":
        g, g_strides = a, (0, 0, 0)  # unused
        wt, w_strides = weights, (weights.stride(0), weights.stride(1))
    else:
        g, *g_strides = flat_spatial(grads)
        wt, w_strides = a, (0, 0)  # unused
    grid, ints, constexprs = _map_kernel_plan(n, k, s, (a_sn, a_sk, a_ss), w_strides, g_strides, mode, relu)
    launch(_weighted_map_kernel, grid, a, wt, g, out, *ints, **constexprs)
    return out


def _map_kernel_plan(n: int, k: int, s: int, a_strides, w_strides, g_strides, mode: str, relu: bool):
    """``(grid, int arguments, constexprs and launch options)`` of ``_weighted_map_kernel`` for maps
    ``[n, k, s]`` with these flat strides (see :func:`flat_spatial`)."""
    channels_last = a_strides[1] == 1 and k > 1
    block_s = min(next_power_of_2(s), 32 if channels_last else 128)
    block_k = max(1, min(next_power_of_2(k), 4096 // block_s, 64))
    grid = (n * cdiv(s, block_s),)  # (image, position block), images fastest (grid_pair)
    # (4K-element tiles on 4 warps: up to 128 registers a thread and spills in bf16 on sm_90)
    constexprs = dict(MODE=_MODE_CODES[mode], RELU=relu, BLOCK_K=block_k, BLOCK_S=block_s,
                      num_warps=8 if block_k * block_s >= 4096 else 4)
    return grid, (n, k, s, *a_strides, *w_strides, *g_strides), constexprs


def flm_layer_reducer(backend: str = "auto") -> Callable[[Tensor, Tensor], Tensor]:
    """A function ``(A[N, K, h, w], G[N, K, h, w]) -> M[N, h, w]``, ``M = sum_k relu(G) relu(A)``
    (float32), equal to ``weighted_map(A, grads=G, mode="flm", relu=False, backend=backend)`` without its
    checks, for Fully-CAM's per-layer reductions: the CAM engine runs one per target layer inside an
    autograd hook (53 a ResNet50 call) while the backward waits on the host, and on the H100 that host
    time showed as the call's excess over its floor (README, GPU). So the backend is chosen once per
    device and dtype pair, not per layer, and on the Triton path the kernel's grid and arguments once
    per shape and layout within the call (a reducer lives for one call: the plans are a dict lookup
    away from the arguments); what remains per layer is the output's allocation and the launch. Arguments
    must be what the engine passes: floating, same shape and device, no graph to record (a hook's
    gradient, a detached or recorded activation: the Triton and native kernels record nothing, the
    reference path detaches both)."""
    routes: dict = {}

    def reduce(activations: Tensor, grads: Tensor) -> Tensor:
        key = (activations.device, activations.dtype, grads.dtype)
        route = routes.get(key)
        if route is None:
            route = routes[key] = _flm_route(activations, grads, backend)
        return route(activations, grads)

    return reduce


def _flm_route(activations: Tensor, grads: Tensor, backend: str) -> Callable[[Tensor, Tensor], Tensor]:
    """:func:`flm_layer_reducer`'s function for tensors of this device and these dtypes, picked as
    :func:`_weighted_map_impl` picks its path."""
    if torch.compiler.is_compiling():
        return lambda a, g: weighted_map_trusted(a, grads=g, mode="flm", relu=False, backend=backend)
    kernel = _native_grad_modes(activations, grads, "flm", backend)
    if kernel is not None:
        def native(a: Tensor, g: Tensor) -> Tensor:
            with device_guard(a):
                return weighted_map_native(kernel, a, g, "flm", False)
        return native
    if not use_triton("weighted_map", backend, activations.device):
        return lambda a, g: weighted_map_reference(a.detach(), None, g.detach(), "flm", False)
    plans: dict = {}
    device = activations.device
    index = device.index if device.type == "cuda" else None

    def triton_flm(a: Tensor, g: Tensor) -> Tensor:
        # (a launch goes to the current device: in a CUDA backward's hooks, autograd's thread for the
        # tensors' device, so the guard is only entered from other threads)
        if index is not None and torch.cuda.current_device() != index:
            with torch.cuda.device(index):
                return triton_flm(a, g)
        key = (a.shape, a.stride(), g.stride())
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = _flm_plan(a, g)
        if plan is None:  # an empty map, or a layout flat_spatial copies: the general path
            return weighted_map_triton(a, None, g, "flm", False)
        n, h, w, grid, ints, constexprs = plan
        out = torch.empty((n, h, w), dtype=torch.float32, device=device)
        launch(_weighted_map_kernel, grid, a, a, g, out, *ints, **constexprs)
        return out

    return triton_flm


def _flm_plan(a: Tensor, g: Tensor):
    """``(n, h, w, grid, ints, constexprs)`` of the FLM kernel for tensors shaped and strided as ``a``
    and ``g``, or ``None`` where the general launcher must run (an empty map; a layout that
    :func:`flat_spatial` would copy)."""
    n, k, h, w = a.shape
    a_strides, g_strides = flat_strides(a), flat_strides(g)
    if n * k * h * w == 0 or a_strides is None or g_strides is None:
        return None
    return (n, h, w, *_map_kernel_plan(n, k, h * w, a_strides, (0, 0), g_strides, "flm", False))


# --------------------------------------------------------------------------------------------------
# C++ kernel (CPU, "layercam" and "flm").
# --------------------------------------------------------------------------------------------------


def _native_grad_modes(activations: Tensor, grads: Tensor | None, mode: str, backend: str):
    """The C++ kernel (CPU: ``auto``, mode ``"layercam"`` or ``"flm"``, one dtype) or the CUDA
    extension's (CUDA: the same, opted in through CUDA_KERNEL_ENV, not float64, at most 65,535
    images) when it runs this call."""
    if backend != "auto" or mode not in ("layercam", "flm") or grads.dtype != activations.dtype:
        return None
    if activations.device.type == "cpu":
        return _native.cpu_kernel("weighted_map_grad") if activations.dtype in _native.NATIVE_DTYPE_CODES else None
    if (activations.is_cuda and activations.dtype in _CUDA_DTYPES and activations.shape[0] <= 65535
            and os.environ.get(CUDA_KERNEL_ENV, "0") == "1"):
        module = _native.cuda_module()
        return getattr(module, "weighted_map_grad", None) if module is not None else None
    return None


def weighted_map_native(kernel, activations: Tensor, grads: Tensor, mode: str, relu: bool) -> Tensor:
    """``M[N, h, w]`` float32 from the native kernel of ``activations``' device (C++ on the CPU,
    the CUDA extension's on the GPU, launched on the current stream)."""
    n, k, h, w = activations.shape
    out = torch.empty((n, h, w), dtype=torch.float32, device=activations.device)
    if out.numel() == 0:
        return out
    a, a_sn, a_sk, a_ss = flat_spatial(activations)
    g, g_sn, g_sk, g_ss = flat_spatial(grads)
    kernel(a.data_ptr(), g.data_ptr(), out.data_ptr(), n, k, h * w, a_sn, a_sk, a_ss, g_sn, g_sk, g_ss,
           _native.NATIVE_DTYPE_CODES[a.dtype], _MODE_CODES[mode], bool(relu), _native.kernel_last_arg(a))
    return out


# --------------------------------------------------------------------------------------------------
# Custom op + public entry point.
# --------------------------------------------------------------------------------------------------


def _weighted_map_impl(activations, weights, grads, mode, relu, backend):
    kernel = _native_grad_modes(activations, grads, mode, backend)
    if kernel is not None:
        with device_guard(activations):
            return weighted_map_native(kernel, activations, grads, mode, relu)
    if use_triton("weighted_map", backend, activations.device):
        with device_guard(activations):
            return weighted_map_triton(activations, weights, grads, mode, relu)
    return weighted_map_reference(activations, weights, grads, mode, relu)


@torch.library.custom_op("rethinkcam_fast::weighted_map", mutates_args=())
def _weighted_map_op(
    activations: Tensor, weights: Tensor | None, grads: Tensor | None, mode: str, relu: bool, backend: str
) -> Tensor:
    return _weighted_map_impl(activations, weights, grads, mode, relu, backend)


@_weighted_map_op.register_fake
def _weighted_map_fake(activations, weights, grads, mode, relu, backend):
    n, _, h, w = activations.shape
    return activations.new_empty((n, h, w), dtype=torch.float32)


def weighted_map(
    activations: Tensor, weights: Tensor | None = None, grads: Tensor | None = None, *,
    mode: str = "channel", relu: bool = True, backend: str = "auto",
) -> Tensor:
    """Channel-weighted map at feature resolution (no autograd: an inference op).

    Args:
        activations: ``Tensor[N, K, h, w]``, floating, NCHW or channels_last.
        weights: ``Tensor[N, K]`` for ``mode="channel"``.
        grads: ``Tensor[N, K, h, w]`` (same shape as ``activations``) for the other modes.
        mode: ``"channel"``, ``"layercam"``, ``"flm"``, ``"gradcam"`` or ``"gradcam++"``.
        relu: apply a ReLU to the summed map.
        backend: ``"auto"`` (Triton on CUDA, or the CUDA extension's kernel for ``"layercam"`` /
            ``"flm"`` with ``RETHINKCAM_CUDA_WEIGHTED_MAP=1``; on the CPU the C++ kernel for those two,
            PyTorch for the others), ``"triton"`` or ``"reference"`` (pure PyTorch).
    Returns:
        ``Tensor[N, h, w]`` float32 on the activations' device.
    """
    check_tensor("activations", activations, ndim=4)
    check_float_dtype("activations", activations)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    n, k = activations.shape[:2]
    unused = "grads" if mode == "channel" and grads is not None else (
        "weights" if mode != "channel" and weights is not None else None)
    # An argument the mode does not use is refused, never dropped (the caller meant something by it): a
    # TypeError, as for a keyword a call does not take (VideoLocalizer's boxes= is refused alike).
    if unused is not None:
        raise TypeError(f"mode={mode!r} does not use {unused}= (mode='channel' takes weights=, the other modes "
                        "grads=); leave it out")
    if mode == "channel":
        check_tensor("weights", weights, ndim=2)
        check_float_dtype("weights", weights)
        if tuple(weights.shape) != (n, k):
            raise ValueError(f"weights must have shape {(n, k)} to match activations, got {tuple(weights.shape)}")
        check_same_device(activations=activations, weights=weights)
    else:
        check_tensor("grads", grads, ndim=4)
        check_float_dtype("grads", grads)
        if grads.shape != activations.shape:
            raise ValueError(f"grads must have the activations' shape {tuple(activations.shape)}, got {tuple(grads.shape)}")
        check_same_device(activations=activations, grads=grads)
    check_backend(backend)
    relu = check_flag("relu", relu)
    return run_inference_op(_weighted_map_op, _weighted_map_impl, activations, weights, grads, mode, relu, backend)


def weighted_map_trusted(
    activations: Tensor, weights: Tensor | None = None, grads: Tensor | None = None, *,
    mode: str = "channel", relu: bool = True, backend: str = "auto",
) -> Tensor:
    """:func:`weighted_map` without its argument checks, for the CAM engine, whose arguments pass
    them by construction (a target layer's detached floating output and its gradient, same shape and
    device, or weights ``[N, K]`` it computed); see :func:`~rethinkcam_fast.ops._launch.run_trusted`."""
    return run_trusted(_weighted_map_op, _weighted_map_impl, activations, weights, grads, mode, relu, backend)


__all__ = ["CUDA_KERNEL_ENV", "GRADCAM_PP_EPS", "GRADIENT_WEIGHT_MODES", "MODES", "flm_layer_reducer",
           "gradient_channel_weights_reference", "weighted_map", "weighted_map_native", "weighted_map_reference",
           "weighted_map_triton", "weighted_map_trusted"]
