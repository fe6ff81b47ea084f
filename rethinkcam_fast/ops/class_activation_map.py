"""Differentiable CAM: ``class_activation_map(features, weight, labels)`` for training loops.

For features ``A[N, K, h, w]``, classifier weight ``W[C, K]`` and labels ``y[N]``::

    W'  = max(W, 0) with nwc=True (negative weight clamping), else W
    M_n = sum_k W'[y_n, k] * A[n, k]                  (no ReLU, as the references)
    out = minmax(bilinear(M))                         (normalize=False: bilinear(M))

Forward values are the CAM engine's (``CAMEngine(model, "cam", nwc=...)``): the same reduction and
the epilogue of :mod:`rethinkcam_fast.ops.map_epilogue` (see there for the differentiable min-max).
Gradients reach the features and the weight; NWC's clamp passes gradient only where ``W > 0``.

Triton kernels: the forward reduction reads each feature once (NCHW or channels_last, in place) and
gathers ``W'[y_n]`` itself; the backward writes ``dA = W'[y_n, k] * dM`` and reduces
``dw[n, k] = sum_s dM * A`` in the same pass, so no ``[N, K, h, w]`` product is ever stored besides
the gradient itself; ``dW`` is ``onehot(y)^T @ dw`` (a matmul: deterministic, no atomics). They
accumulate in float32 (float64 for float64 inputs). The channel-reduction kernel here also serves
:mod:`rethinkcam_fast.ops.flm_fuse` (``MODE_FLM``).

On the CPU (``"auto"``) the reduction and its backward are PyTorch's (an einsum, and a broadcast
product plus an einsum: one pass each already) and the epilogue runs in C++ (``csrc/cpu/map_epilogue.cpp``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._triton import cdiv, grid_pair, launch, next_power_of_2, tl, triton
from .._validation import check_flag, check_float_dtype, check_same_device, check_tensor, output_size_arg
from . import _launch
from ._launch import autocast_off, check_backend, device_guard, flat_spatial, graph_capture, use_triton
from .map_epilogue import acc_dtype, epilogue_backward_impl, epilogue_function_forward, map_epilogue_op
from .tap import _grad_buffer, _memory_format, _tile_config

# --------------------------------------------------------------------------------------------------
# Reference (pure PyTorch, differentiable): the CPU path and the oracle.
# --------------------------------------------------------------------------------------------------


def cam_reduce_reference(features: Tensor, weight: Tensor, labels: Tensor, nwc: bool = False) -> Tensor:
    """``M[N, h, w] = sum_k W'[labels, k] * features[:, k]`` in float32 (float64 for float64 inputs)."""
    acc = acc_dtype(features, weight)
    with autocast_off(features):  # float32 sums under autocast too, as the kernels'
        w = weight[labels].to(acc)  # (the N rows used, not all C converted)
        if nwc:
            w = w.relu()  # gradient only where W > 0
        return torch.einsum("nk,nkhw->nhw", w, features.to(acc))


# --------------------------------------------------------------------------------------------------
# Triton kernels. Features are addressed as [N, K, S] (S = h*w) through strides.
# --------------------------------------------------------------------------------------------------

MODE_CAM = 0
MODE_FLM = 1


@triton.jit
def _channel_reduce_kernel(
    A_ptr, W_ptr, Labels_ptr, G_ptr, Out_ptr,
    N, K, S, K_CHUNK, a_stride_n, a_stride_k, a_stride_s, w_stride_c, w_stride_k, g_stride_n, g_stride_k, g_stride_s,
    MODE: tl.constexpr, NWC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    """M[n, s] = sum_k W'[y_n, k] A[n, k, s] (CAM) or sum_k relu(G) relu(A) (FLM); one program per
    (image, block of BLOCK_S positions, chunk of K_CHUNK channels), looping over its channels; chunk
    c writes its partial sums to Out[c] (the launcher sums them in a fixed order)."""
    n, s_block = grid_pair(N)
    s = s_block * BLOCK_S + tl.arange(0, BLOCK_S)
    chunk = tl.program_id(1)
    k_stop = tl.minimum(chunk * K_CHUNK + K_CHUNK, K)
    s_mask = s < S
    k_idx = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_S], ACC)
    a_base = A_ptr + n.to(tl.int64) * a_stride_n
    g_base = G_ptr + n.to(tl.int64) * g_stride_n
    if MODE == 0:
        w_base = W_ptr + tl.load(Labels_ptr + n).to(tl.int64) * w_stride_c
    for k0 in range(chunk * K_CHUNK, k_stop, BLOCK_K):
        k = k0 + k_idx
        mask = (k[:, None] < k_stop) & s_mask[None, :]
        a = tl.load(a_base + k[:, None].to(tl.int64) * a_stride_k + s[None, :] * a_stride_s, mask=mask, other=0.0)
        a = a.to(ACC)
        if MODE == 0:
            wk = tl.load(w_base + k * w_stride_k, mask=k < k_stop, other=0.0).to(ACC)
            if NWC:
                wk = tl.where(wk > 0.0, wk, 0.0)
            acc += tl.sum(wk[:, None] * a, axis=0)
        else:
            g = tl.load(g_base + k[:, None].to(tl.int64) * g_stride_k + s[None, :] * g_stride_s, mask=mask, other=0.0)
            g = g.to(ACC)
            # relu as where(x > 0, x, 0): NaN maps to 0 the same way on the GPU and in the interpreter.
            acc += tl.sum(tl.where(g > 0.0, g, 0.0) * tl.where(a > 0.0, a, 0.0), axis=0)
    tl.store(Out_ptr + chunk.to(tl.int64) * N * S + n * S + s, acc, mask=s_mask)


@triton.jit
def _cam_reduce_bwd_kernel(
    DM_ptr, A_ptr, W_ptr, Labels_ptr, DA_ptr, DWRows_ptr,
    K, S, a_stride_n, a_stride_k, a_stride_s, da_stride_n, da_stride_k, da_stride_s, w_stride_c, w_stride_k,
    NWC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    """dA[n, k, s] = W'[y_n, k] dM[n, s] and dw[n, k] = sum_s dM[n, s] A[n, k, s], one pass over A."""
    n = tl.program_id(0)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < K
    wk = tl.load(W_ptr + tl.load(Labels_ptr + n).to(tl.int64) * w_stride_c + k * w_stride_k, mask=k_mask, other=0.0)
    wk = wk.to(ACC)
    if NWC:
        wk = tl.where(wk > 0.0, wk, 0.0)
    a_rows = A_ptr + n.to(tl.int64) * a_stride_n + k[:, None].to(tl.int64) * a_stride_k
    da_rows = DA_ptr + n.to(tl.int64) * da_stride_n + k[:, None].to(tl.int64) * da_stride_k
    dw = tl.zeros([BLOCK_K], ACC)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = k_mask[:, None] & (s < S)[None, :]
        dm = tl.load(DM_ptr + n * S + s, mask=s < S, other=0.0).to(ACC)
        a = tl.load(a_rows + s[None, :] * a_stride_s, mask=mask, other=0.0).to(ACC)
        dw += tl.sum(tl.where(dm[None, :] != 0.0, a * dm[None, :], 0.0), axis=1)  # 0 * NaN counts as 0
        tl.store(da_rows + s[None, :] * da_stride_s, (wk[:, None] * dm[None, :]).to(DA_ptr.dtype.element_ty), mask=mask)
    tl.store(DWRows_ptr + n * K + k, dw, mask=k_mask)


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _channel_splits(programs: int, k: int, block_k: int, device: torch.device) -> int:
    """Channel chunks per (image, position block), a power of two: enough programs to fill the GPU
    (about 4 per SM) when images x position blocks alone cannot; 1 on the CPU interpreter."""
    return _launch.split_count(None, programs, min(32, next_power_of_2(cdiv(k, block_k))), device)


def channel_reduce_triton(
    features: Tensor, mode: int, weight: Tensor | None = None, labels: Tensor | None = None,
    gradients: Tensor | None = None, nwc: bool = False, num_splits: int | None = None,
) -> Tensor:
    """Triton forward reduction: ``M[N, h, w]`` (acc dtype) for ``MODE_CAM`` or ``MODE_FLM``.

    ``num_splits`` forces the number of channel chunks reduced by separate programs (default: from
    the device's SM count, 1 on the CPU interpreter); their partial sums are added in a fixed order.
    """
    n, k, h, w = features.shape
    s = h * w
    acc = acc_dtype(features, *(t for t in (weight, gradients) if t is not None))
    if n * s == 0:
        return torch.zeros((n, h, w), dtype=acc, device=features.device)
    a, a_sn, a_sk, a_ss = flat_spatial(features)
    if mode == MODE_CAM:
        g, g_sn, g_sk, g_ss = a, 0, 0, 0  # unused
        wt, w_sc, w_sk, lab = weight, weight.stride(0), weight.stride(1), labels
    else:
        g, g_sn, g_sk, g_ss = flat_spatial(gradients)
        wt, w_sc, w_sk, lab = a, 0, 0, a  # unused
    channels_last = a_sk == 1 and k > 1
    block_s = min(next_power_of_2(s), 32 if channels_last else 128)
    block_k = max(1, min(next_power_of_2(k), 4096 // block_s, 64))
    s_blocks = cdiv(s, block_s)
    splits = num_splits or _channel_splits(n * s_blocks, k, block_k, features.device)
    k_chunk = cdiv(cdiv(k, splits), block_k) * block_k
    out = torch.empty((splits, n, h, w), dtype=acc, device=features.device)
    launch(_channel_reduce_kernel, (n * s_blocks, splits),  # (image, position block) on axis 0 (grid_pair)
        a, wt, lab, g, out, n, k, s, k_chunk, a_sn, a_sk, a_ss, w_sc, w_sk, g_sn, g_sk, g_ss,
        MODE=mode, NWC=nwc, BLOCK_K=block_k, BLOCK_S=block_s, ACC=tl_acc(acc),
    )
    return out.sum(dim=0) if splits > 1 else out[0]


def cam_reduce_backward_triton(
    grad_maps: Tensor, features: Tensor, weight: Tensor, labels: Tensor, nwc: bool
) -> tuple[Tensor, Tensor]:
    """``(dL/dfeatures in features' dtype and layout, dL/dweight [C, K] in weight's dtype)``."""
    d_features, a, (a_sn, a_sk, a_ss), (d_sn, d_sk, d_ss) = _grad_buffer(features)
    n, k, h, w = features.shape
    acc = acc_dtype(features, weight)
    dw_rows = torch.zeros((n, k), dtype=acc, device=features.device)
    if features.numel():
        block_k, block_s = _tile_config(k, h * w, a_ss)
        launch(_cam_reduce_bwd_kernel, (n, cdiv(k, block_k)),
            grad_maps.to(acc).contiguous(), a, weight, labels, d_features, dw_rows,
            k, h * w, a_sn, a_sk, a_ss, d_sn, d_sk, d_ss, weight.stride(0), weight.stride(1),
            NWC=nwc, BLOCK_K=block_k, BLOCK_S=block_s, ACC=tl_acc(acc),
            num_warps=8 if block_k * block_s >= 4096 else 4,  # 4K-element tiles: 255 registers on 4 warps (sm_90)
        )
    return d_features, _weight_grad(dw_rows, weight, labels, nwc, by_matmul=True)


def _weight_grad(dw_rows: Tensor, weight: Tensor, labels: Tensor, nwc: bool, by_matmul: bool) -> Tensor:
    """``dW[C, K] = onehot(labels)^T @ dw_rows``, masked to ``W > 0`` under NWC; deterministic: on a
    GPU (``by_matmul``, the Triton path's) the matmul, as ``index_add_`` would use atomics there; on
    the CPU ``index_add_`` (sequential; the matmul's ``C * N * K`` multiply-adds were 8 ms of a
    [16, 2048] -> 1,000-class call)."""
    if not by_matmul:
        d_weight = torch.zeros((weight.shape[0], dw_rows.shape[1]), dtype=dw_rows.dtype).index_add_(0, labels, dw_rows)
    else:
        d_weight = torch.nn.functional.one_hot(labels, weight.shape[0]).to(dw_rows.dtype).T @ dw_rows
    if nwc:
        d_weight = torch.where(weight > 0, d_weight, torch.zeros_like(d_weight))
    return d_weight.to(weight.dtype).contiguous()  # (where() can take a transposed weight's strides)


def cam_reduce_backward_reference(
    grad_maps: Tensor, features: Tensor, weight: Tensor, labels: Tensor, nwc: bool
) -> tuple[Tensor, Tensor]:
    """The backward of :func:`cam_reduce_reference` written out (the CPU path)."""
    acc = acc_dtype(features, weight)
    grad = grad_maps.to(acc)
    w = weight[labels].to(acc)
    if nwc:
        w = w.relu()
    d_features = (w[:, :, None, None] * grad[:, None]).to(features.dtype)
    d_features = d_features.contiguous(memory_format=_memory_format(features))
    a = features.to(acc)
    dead = (grad == 0).flatten(1).all(dim=1)  # images with a zero upstream gradient contribute exactly 0,
    if bool(dead.any()):  # even against NaN features (the NaN policy)
        a = torch.where(dead[:, None, None, None], 0, a)
    dw_rows = torch.einsum("nhw,nkhw->nk", grad, a)
    return d_features, _weight_grad(dw_rows, weight, labels, nwc, by_matmul=dw_rows.device.type != "cpu")


# --------------------------------------------------------------------------------------------------
# Dispatch, custom ops, autograd.
# --------------------------------------------------------------------------------------------------


def _cam_reduce_impl(features, weight, labels, nwc, backend) -> Tensor:
    if use_triton("class_activation_map", backend, features.device):
        with device_guard(features):
            return channel_reduce_triton(features, MODE_CAM, weight=weight, labels=labels, nwc=nwc)
    return cam_reduce_reference(features, weight, labels, nwc)


def _cam_reduce_backward_impl(grad_maps, features, weight, labels, nwc, backend) -> tuple[Tensor, Tensor]:
    if use_triton("class_activation_map", backend, features.device):
        with device_guard(features):
            return cam_reduce_backward_triton(grad_maps, features, weight, labels, nwc)
    return cam_reduce_backward_reference(grad_maps, features, weight, labels, nwc)


@torch.library.custom_op("rethinkcam_fast::cam_reduce", mutates_args=())
def cam_reduce(features: Tensor, weight: Tensor, labels: Tensor, nwc: bool, backend: str) -> Tensor:
    """``M[N, h, w]`` at feature resolution (see the module docstring)."""
    return _cam_reduce_impl(features, weight, labels, nwc, backend)


@cam_reduce.register_fake
def _cam_reduce_fake(features, weight, labels, nwc, backend):
    n, _, h, w = features.shape
    return features.new_empty((n, h, w), dtype=acc_dtype(features, weight))


@torch.library.custom_op("rethinkcam_fast::cam_reduce_backward", mutates_args=())
def cam_reduce_backward(
    grad_maps: Tensor, features: Tensor, weight: Tensor, labels: Tensor, nwc: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """``(dL/dfeatures, dL/dweight)`` from ``dL/dM``."""
    return _cam_reduce_backward_impl(grad_maps, features, weight, labels, nwc, backend)


@cam_reduce_backward.register_fake
def _cam_reduce_backward_fake(grad_maps, features, weight, labels, nwc, backend):
    # (d_weight contiguous, as _weight_grad returns it, whatever the weight's strides: a transposed head)
    return torch.empty_like(features, memory_format=_memory_format(features)), weight.new_empty(weight.shape)


def _cam_reduce_setup_context(ctx, inputs, output) -> None:
    features, weight, labels, ctx.nwc, ctx.backend = inputs
    ctx.save_for_backward(features, weight, labels)


def _cam_reduce_autograd(ctx, grad_maps: Tensor):
    features, weight, labels = ctx.saved_tensors
    d_features, d_weight = cam_reduce_backward(grad_maps, features, weight, labels, ctx.nwc, ctx.backend)
    return d_features, d_weight, None, None, None


torch.library.register_autograd("rethinkcam_fast::cam_reduce", _cam_reduce_autograd, setup_context=_cam_reduce_setup_context)


class ClassActivationMapFunction(torch.autograd.Function):
    """The op as one ``torch.autograd.Function`` (the eager path: reduction + epilogue, fused backward).

    ``ClassActivationMapFunction.apply(features, weight, labels, nwc, output_size, normalize, backend)
    -> (cams [N, H, W], degenerate bool [N])``; arguments are not validated here (use
    :func:`class_activation_map`). First-order gradients.
    """

    @staticmethod
    def forward(ctx, features, weight, labels, nwc, output_size, normalize, backend):
        maps = _cam_reduce_impl(features, weight, labels, nwc, backend)
        return epilogue_function_forward(ctx, [maps], output_size, "sum", normalize, backend,
                                         saved=(features, weight, labels), options=(nwc, output_size, normalize, backend))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_degenerate):
        features, weight, labels, maps = ctx.saved_tensors
        nwc, output_size, normalize, backend = ctx.options
        # The forward's state, released here (a second backward with retain_graph recomputes it).
        state, ctx.epilogue_state = ctx.epilogue_state, None
        (grad_maps,) = epilogue_backward_impl(grad_out, [maps], output_size, "sum", normalize, backend, state=state)
        d_features, d_weight = _cam_reduce_backward_impl(grad_maps, features, weight, labels, nwc, backend)
        return (d_features if ctx.needs_input_grad[0] else None, d_weight if ctx.needs_input_grad[1] else None,
                None, None, None, None, None)


def _check_cam_args(features, weight, labels) -> None:
    check_tensor("features", features, ndim=4)
    check_float_dtype("features", features)
    check_tensor("weight", weight, ndim=2)
    check_float_dtype("weight", weight)
    check_tensor("labels", labels)
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    n, k, h, w = features.shape
    if h * w == 0:
        raise ValueError(f"features must have a non-empty spatial extent, got shape {tuple(features.shape)}")
    if weight.shape[1] != k:
        raise ValueError(f"weight must have shape [C, {k}] to match the features' {k} channels, got {tuple(weight.shape)}")
    if tuple(labels.shape) != (n,):
        raise ValueError(f"labels must have shape ({n},) to match the features' batch, got {tuple(labels.shape)}")
    check_same_device(features=features, weight=weight, labels=labels)
    # One device sync (one reduction, one copy); skipped while torch.compile traces (a data-dependent
    # branch would break the graph). A CUDA graph capture cannot sync: there the check is a device-side
    # assert, captured with the step (a bad label stops the replay with a CUDA error, not garbage).
    if n and labels.is_cuda and torch.cuda.is_current_stream_capturing():
        torch._assert_async(((labels >= 0) & (labels < weight.shape[0])).all(),
                            f"labels out of range for {weight.shape[0]} classes")
    elif n and not graph_capture():
        low, high = torch.stack(torch.aminmax(labels)).tolist()
        if low < 0 or high >= weight.shape[0]:
            classes = weight.shape[0]
            bad = ((labels < 0) | (labels >= classes)).nonzero().flatten()
            first = bad[:3]
            shown = ", ".join(f"labels[{i}] = {v}" for i, v in zip(first.tolist(), labels[first].tolist()))
            more = f" ({len(bad)} in all)" if len(bad) > 3 else ""
            raise ValueError(f"labels out of range for {classes} classes (weight has {classes} rows; valid labels "
                             f"0..{classes - 1}): {shown}{more}")


def class_activation_map(
    features: Tensor, weight: Tensor, labels: Tensor, nwc: bool = False,
    output_size: tuple[int, int] | None = None, normalize: bool = True, *, backend: str = "auto",
) -> Tensor:
    """CAMs of the given classes, differentiable w.r.t. ``features`` and ``weight``.

    Args:
        features: ``Tensor[N, K, h, w]`` (the layer before the global pool), floating, NCHW or channels_last.
        weight: ``Tensor[C, K]``, the classifier after the global pool (no bias is used).
        labels: ``LongTensor[N]`` (any integer dtype), the class explained per image, in ``[0, C)``: the
            batch's label tensor, as a training loop holds it (``CAMEngine``'s ``targets`` also take an
            int for every image, or a list; this op takes the tensor only).
        nwc: negative weight clamping, ``max(W, 0)`` (gradient only where ``W > 0``).
        output_size: ``(H, W)`` of the maps; ``None`` keeps the feature resolution ``(h, w)``.
        normalize: per-image min-max into ``[0, 1]`` — differentiable, through the min and the max
            (see :mod:`rethinkcam_fast.ops.map_epilogue` for why); a constant or non-finite map is
            zeros with zero gradient. ``False`` returns the upsampled raw map.
        backend: ``"auto"`` (Triton on CUDA; on the CPU the PyTorch reduction and the C++ epilogue
            kernels, or PyTorch without the extension), ``"triton"`` or ``"reference"`` (PyTorch).
    Returns:
        ``Tensor[N, H, W]``, float32 (float64 when an input is float64).
    Raises:
        TypeError: a non-tensor, non-floating ``features``/``weight``, non-integer ``labels``; ``nwc`` or
            ``normalize`` not a bool (Python or numpy).
        ValueError: wrong ranks or mismatched shapes, ``labels`` out of range (checked with one device
            sync; not under ``torch.compile``; during a CUDA graph capture a device-side assert instead),
            bad ``output_size``.
    """
    _check_cam_args(features, weight, labels)
    nwc, normalize = check_flag("nwc", nwc), check_flag("normalize", normalize)
    size = output_size_arg(output_size, features.shape[2:])
    check_backend(backend)
    return class_activation_map_with_flags(features, weight, labels.long(), nwc, size, normalize, backend)[0]


def class_activation_map_with_flags(
    features: Tensor, weight: Tensor, labels: Tensor, nwc: bool, output_size: list[int], normalize: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """:func:`class_activation_map` without argument checks, plus the ``degenerate`` flags ``bool [N]``."""
    if graph_capture():  # (torch.compile, torch.jit.trace)
        maps = cam_reduce(features, weight, labels, nwc, backend)
        return map_epilogue_op([maps], output_size, "sum", normalize, backend)
    return ClassActivationMapFunction.apply(features, weight, labels, nwc, output_size, normalize, backend)


__all__ = [
    "ClassActivationMapFunction",
    "cam_reduce",
    "cam_reduce_backward",
    "cam_reduce_backward_reference",
    "cam_reduce_backward_triton",
    "cam_reduce_reference",
    "channel_reduce_triton",
    "class_activation_map",
    "class_activation_map_with_flags",
]
