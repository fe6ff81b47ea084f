"""Differentiable FLM fusion (Fully-CAM): ``flm_fuse(activations, gradients, output_size)``.

For layers ``l`` with activations ``A_l[N, K_l, h_l, w_l]`` and gradients ``G_l`` of the same shape::

    M_l = sum_k relu(G_l) * relu(A_l)                 (relu(x) = where(x > 0, x, 0): NaN -> 0)
    out = fuse_l minmax(bilinear(M_l)), normalised again when L > 1

The forward values are the CAM engine's ``"fullycam"`` maps (``fuse="sum"``, the seed's formula, or
``"max"``, LayerCAM-style). Gradients reach the activations *and* the gradients — so when ``G_l``
comes from ``torch.autograd.grad(..., create_graph=True)`` a loss on the map trains the network
through its own gradients (the network's double backward; this op itself is first-order). The min-max
normalisation and max fusion are differentiable (:mod:`rethinkcam_fast.ops.map_epilogue`).

Triton kernels: the per-layer reduction is the channel-reduction kernel of
:mod:`rethinkcam_fast.ops.class_activation_map` (``MODE_FLM``: reads ``A`` and ``G`` once, in place);
its backward is one elementwise pass per layer (``dA = dM relu(G) [A > 0]``, ``dG = dM relu(A) [G > 0]``)
written straight into the gradients, so no ``[N, K, h, w]`` product is stored besides them.

C++ kernels (the CPU's ``"auto"``): the reduction's forward (``weighted_map``'s ``"flm"`` mode) and its
backward (``csrc/cpu/flm_reduce_backward.cpp``, one pass), and the epilogue's forward and backward
(``csrc/cpu/map_epilogue.cpp``, see :mod:`rethinkcam_fast.ops.map_epilogue`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _native
from .._triton import cdiv, grid_pair, launch, tl, triton
from .._validation import check_float_dtype, check_same_device, check_tensor, output_size_arg
from ._launch import check_backend, device_guard, flat_spatial, graph_capture, use_triton
from .class_activation_map import MODE_FLM, channel_reduce_triton, tl_acc
from .fuse_maps import FUSE_MODES
from .map_epilogue import (
    acc_dtype,
    epilogue_backward_impl,
    epilogue_function_forward,
    map_epilogue_op,
    map_epilogue_reference,
)
from .tap import _grad_buffer, _memory_format, _tile_config
from .weighted_map import relu_nan_to_zero, weighted_map_native


def flm_reduce_reference(activation: Tensor, gradient: Tensor) -> Tensor:
    """``M[N, h, w] = sum_k relu(G) relu(A)`` in float32 (float64 for float64 inputs), differentiable."""
    acc = acc_dtype(activation, gradient)
    return (relu_nan_to_zero(gradient.to(acc)) * relu_nan_to_zero(activation.to(acc))).sum(dim=1)


def flm_fuse_reference(
    activations: list[Tensor], gradients: list[Tensor], output_size: tuple[int, int], fuse: str = "sum"
) -> Tensor:
    """Pure-PyTorch :func:`flm_fuse` (the CPU path's formulas), differentiable through plain autograd."""
    maps = [flm_reduce_reference(a, g) for a, g in zip(activations, gradients)]
    return map_epilogue_reference(maps, output_size, fuse)[0]


@triton.jit
def _flm_reduce_bwd_kernel(
    DM_ptr, A_ptr, G_ptr, DA_ptr, DG_ptr, N, K, S,
    a_stride_n, a_stride_k, a_stride_s, g_stride_n, g_stride_k, g_stride_s,
    da_stride_n, da_stride_k, da_stride_s, dg_stride_n, dg_stride_k, dg_stride_s,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    """dA = dM relu(G) [A > 0], dG = dM relu(A) [G > 0] for one (image, channel block, position block)."""
    n, s_block = grid_pair(N)
    n = n.to(tl.int64)
    k = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    s = s_block * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (k < K)[:, None] & (s < S)[None, :]
    dm = tl.load(DM_ptr + n * S + s, mask=s < S, other=0.0).to(ACC)[None, :]
    a = tl.load(A_ptr + n * a_stride_n + k[:, None] * a_stride_k + s[None, :] * a_stride_s, mask=mask, other=0.0)
    g = tl.load(G_ptr + n * g_stride_n + k[:, None] * g_stride_k + s[None, :] * g_stride_s, mask=mask, other=0.0)
    a = a.to(ACC)
    g = g.to(ACC)
    live = dm != 0.0  # a zero upstream gradient contributes exactly 0, even against inf (NaN policy)
    da = tl.where(live & (a > 0.0), dm * tl.where(g > 0.0, g, 0.0), 0.0)
    dg = tl.where(live & (g > 0.0), dm * tl.where(a > 0.0, a, 0.0), 0.0)
    tl.store(DA_ptr + n * da_stride_n + k[:, None] * da_stride_k + s[None, :] * da_stride_s,
             da.to(DA_ptr.dtype.element_ty), mask=mask)
    tl.store(DG_ptr + n * dg_stride_n + k[:, None] * dg_stride_k + s[None, :] * dg_stride_s,
             dg.to(DG_ptr.dtype.element_ty), mask=mask)


def flm_reduce_backward_triton(grad_maps: Tensor, activation: Tensor, gradient: Tensor) -> tuple[Tensor, Tensor]:
    """``(dL/dA, dL/dG)``, each in its input's dtype and memory format."""
    d_act, a, (a_sn, a_sk, a_ss), (da_sn, da_sk, da_ss) = _grad_buffer(activation)
    d_grad, g, (g_sn, g_sk, g_ss), (dg_sn, dg_sk, dg_ss) = _grad_buffer(gradient)
    if activation.numel() == 0:
        return d_act, d_grad
    n, k, h, w = activation.shape
    block_k, block_s = _tile_config(k, h * w, a_ss)
    acc = acc_dtype(activation, gradient)
    # (image, position block) on axis 0 (grid_pair): position blocks outgrow axis 2's 65,535 at 2048²;
    # the channel blocks, on axis 1, now run after the position blocks (the order only, not the results)
    launch(_flm_reduce_bwd_kernel, (n * cdiv(h * w, block_s), cdiv(k, block_k)),
        grad_maps.to(acc).contiguous(), a, g, d_act, d_grad, n, k, h * w,
        a_sn, a_sk, a_ss, g_sn, g_sk, g_ss, da_sn, da_sk, da_ss, dg_sn, dg_sk, dg_ss,
        BLOCK_K=block_k, BLOCK_S=block_s, ACC=tl_acc(acc),
    )
    return d_act, d_grad


def flm_reduce_backward_reference(grad_maps: Tensor, activation: Tensor, gradient: Tensor) -> tuple[Tensor, Tensor]:
    """The backward of :func:`flm_reduce_reference` written out (the CPU path)."""
    acc = acc_dtype(activation, gradient)
    grad = grad_maps.to(acc)
    a, g = activation.to(acc), gradient.to(acc)
    dead = (grad == 0).flatten(1).all(dim=1)  # images whose map got no gradient contribute exactly 0,
    if bool(dead.any()):  # even against inf inputs (the NaN policy)
        a = torch.where(dead[:, None, None, None], 0, a)
        g = torch.where(dead[:, None, None, None], 0, g)
    grad = grad[:, None]
    d_act = (grad * relu_nan_to_zero(g) * (a > 0)).to(activation.dtype)
    d_grad = (grad * relu_nan_to_zero(a) * (g > 0)).to(gradient.dtype)
    return (d_act.contiguous(memory_format=_memory_format(activation)),
            d_grad.contiguous(memory_format=_memory_format(gradient)))


def _native_cpu(name: str, activation: Tensor, gradient: Tensor, backend: str, float64: bool,
                grad_maps: Tensor | None = None):
    """The C++ CPU kernel ``name`` when it runs this call: ``backend="auto"``, CPU tensors of one dtype
    the kernel takes (``float64``: whether float64 is one) and of matching shapes (the low-level custom
    ops are public and unchecked: other shapes go to the reference, which broadcasts or raises as
    PyTorch does), and the extension built."""
    if (backend != "auto" or activation.device.type != "cpu" or gradient.device.type != "cpu"
            or gradient.dtype != activation.dtype or activation.dtype not in _native.NATIVE_DTYPE_CODES
            or (activation.dtype == torch.float64 and not float64) or activation.dim() != 4
            or gradient.shape != activation.shape):
        return None
    if grad_maps is not None and (grad_maps.device.type != "cpu" or not grad_maps.is_floating_point()
                                  or grad_maps.shape != (activation.shape[0], *activation.shape[2:])):
        return None
    return _native.cpu_kernel(name)


def _flm_reduce_impl(activation: Tensor, gradient: Tensor, backend: str) -> Tensor:
    if use_triton("flm_fuse", backend, activation.device):
        with device_guard(activation):
            return channel_reduce_triton(activation, MODE_FLM, gradients=gradient)
    # (the C++ kernel sums in float32 whatever the dtype; the reference sums float64 in float64)
    kernel = _native_cpu("weighted_map_grad", activation, gradient, backend, float64=False)
    if kernel is not None:
        return weighted_map_native(kernel, activation, gradient, "flm", False)
    return flm_reduce_reference(activation, gradient)


def flm_reduce_backward_native(kernel, grad_maps: Tensor, activation: Tensor, gradient: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`flm_reduce_backward_reference`'s results from the C++ kernel: one pass over the inputs
    and the outputs (the reference makes eight full-size passes and four temporaries), the same values
    and NaN positions (a -0.0 in A or G gives +0.0 where the reference's ``fmax`` keeps -0.0, as the
    Triton kernel does; NaN payload bits may differ)."""
    n, k, h, w = activation.shape
    grad = grad_maps.to(acc_dtype(activation, gradient)).contiguous()
    d_act = torch.empty_like(activation, memory_format=_memory_format(activation))
    d_grad = torch.empty_like(gradient, memory_format=_memory_format(gradient))
    a, *a_strides = flat_spatial(activation)
    g, *g_strides = flat_spatial(gradient)
    _, *da_strides = flat_spatial(d_act)
    _, *dg_strides = flat_spatial(d_grad)
    kernel(grad.data_ptr(), a.data_ptr(), g.data_ptr(), d_act.data_ptr(), d_grad.data_ptr(), n, k, h * w, a_strides,
           g_strides, da_strides, dg_strides, _native.NATIVE_DTYPE_CODES[a.dtype], _native.kernel_last_arg(a))
    return d_act, d_grad


def _flm_reduce_backward_impl(grad_maps, activation, gradient, backend) -> tuple[Tensor, Tensor]:
    if use_triton("flm_fuse", backend, activation.device):
        with device_guard(activation):
            return flm_reduce_backward_triton(grad_maps, activation, gradient)
    kernel = _native_cpu("flm_reduce_backward", activation, gradient, backend, float64=True, grad_maps=grad_maps)
    if kernel is not None:
        return flm_reduce_backward_native(kernel, grad_maps, activation, gradient)
    return flm_reduce_backward_reference(grad_maps, activation, gradient)


@torch.library.custom_op("rethinkcam_fast::flm_reduce", mutates_args=())
def flm_reduce(activation: Tensor, gradient: Tensor, backend: str) -> Tensor:
    """One layer's ``M[N, h, w] = sum_k relu(G) relu(A)``."""
    return _flm_reduce_impl(activation, gradient, backend)


@flm_reduce.register_fake
def _flm_reduce_fake(activation, gradient, backend):
    n, _, h, w = activation.shape
    return activation.new_empty((n, h, w), dtype=acc_dtype(activation, gradient))


@torch.library.custom_op("rethinkcam_fast::flm_reduce_backward", mutates_args=())
def flm_reduce_backward(grad_maps: Tensor, activation: Tensor, gradient: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """``(dL/dA, dL/dG)`` from ``dL/dM``."""
    return _flm_reduce_backward_impl(grad_maps, activation, gradient, backend)


@flm_reduce_backward.register_fake
def _flm_reduce_backward_fake(grad_maps, activation, gradient, backend):
    return (torch.empty_like(activation, memory_format=_memory_format(activation)),
            torch.empty_like(gradient, memory_format=_memory_format(gradient)))


def _flm_setup_context(ctx, inputs, output) -> None:
    activation, gradient, ctx.backend = inputs
    ctx.save_for_backward(activation, gradient)


def _flm_reduce_autograd(ctx, grad_maps: Tensor):
    activation, gradient = ctx.saved_tensors
    d_act, d_grad = flm_reduce_backward(grad_maps, activation, gradient, ctx.backend)
    return d_act, d_grad, None


torch.library.register_autograd("rethinkcam_fast::flm_reduce", _flm_reduce_autograd, setup_context=_flm_setup_context)


class FLMFuseFunction(torch.autograd.Function):
    """The op as one ``torch.autograd.Function`` (eager path; first-order).

    ``FLMFuseFunction.apply(output_size, fuse, backend, *activations, *gradients)
    -> (cams [N, H, W], degenerate bool [N])``; arguments are not validated here (use :func:`flm_fuse`).
    """

    @staticmethod
    def forward(ctx, output_size, fuse, backend, *tensors):
        layers = len(tensors) // 2
        activations, gradients = tensors[:layers], tensors[layers:]
        maps = [_flm_reduce_impl(a, g, backend) for a, g in zip(activations, gradients)]
        return epilogue_function_forward(ctx, maps, output_size, fuse, True, backend, saved=tensors,
                                         options=(layers, output_size, fuse, backend))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_degenerate):
        layers, output_size, fuse, backend = ctx.options
        saved = ctx.saved_tensors
        activations, gradients, maps = saved[:layers], saved[layers:2 * layers], list(saved[2 * layers:])
        # The forward's state, released here (a second backward with retain_graph recomputes it).
        state, ctx.epilogue_state = ctx.epilogue_state, None
        grad_maps = epilogue_backward_impl(grad_out, maps, output_size, fuse, True, backend, state=state)
        d_acts, d_grads = [], []
        for grad_map, a, g in zip(grad_maps, activations, gradients):
            d_a, d_g = _flm_reduce_backward_impl(grad_map, a, g, backend)
            d_acts.append(d_a)
            d_grads.append(d_g)
        needs = ctx.needs_input_grad[3:]
        return (None, None, None, *[d if need else None for d, need in zip(d_acts + d_grads, needs)])


def _check_flm_args(activations, gradients) -> None:
    for name, value in (("activations", activations), ("gradients", gradients)):
        if isinstance(value, Tensor) or not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list of Tensor[N, K, h, w], got {type(value).__name__}")
    if not activations:
        raise ValueError("activations must hold at least one layer")
    if len(gradients) != len(activations):
        raise ValueError(f"gradients must hold one tensor per layer: {len(activations)} activations, {len(gradients)} gradients")
    tensors = {}
    for i, (a, g) in enumerate(zip(activations, gradients)):
        check_tensor(f"activations[{i}]", a, ndim=4)
        check_float_dtype(f"activations[{i}]", a)
        check_tensor(f"gradients[{i}]", g, ndim=4)
        check_float_dtype(f"gradients[{i}]", g)
        if g.shape != a.shape:
            raise ValueError(f"gradients[{i}] must have the shape of activations[{i}] {tuple(a.shape)}, got {tuple(g.shape)}")
        if a.shape[0] != activations[0].shape[0]:
            raise ValueError(f"activations[{i}] has batch {a.shape[0]}, activations[0] has {activations[0].shape[0]}")
        if a.shape[2] * a.shape[3] == 0:
            raise ValueError(f"activations[{i}] has an empty spatial extent {tuple(a.shape)}")
        tensors[f"activations[{i}]"], tensors[f"gradients[{i}]"] = a, g
    check_same_device(**tensors)


def flm_fuse(
    activations: list[Tensor], gradients: list[Tensor], output_size: tuple[int, int], fuse: str = "sum",
    *, backend: str = "auto",
) -> Tensor:
    """Fully-CAM's FLM over layers, differentiable w.r.t. the activations and the gradients.

    Args:
        activations: per layer ``Tensor[N, K_l, h_l, w_l]`` (sizes may differ, ``N`` may not), floating,
            NCHW or channels_last.
        gradients: ``dy_c/dA_l`` per layer, each the shape of its activation.
        output_size: ``(H, W)`` of the maps.
        fuse: ``"sum"`` (Fully-CAM) or ``"max"`` (LayerCAM-style; tied layers share the gradient).
        backend: ``"auto"`` (Triton on CUDA; on the CPU the C++ kernels: the epilogue's forward and
            backward, and the per-layer reduction's for one dtype of activations and gradients, whose
            float64 forward stays in PyTorch; without the extension PyTorch), ``"triton"`` or
            ``"reference"`` (PyTorch).
    Returns:
        ``Tensor[N, H, W]`` in ``[0, 1]``, float32 (float64 when an input is float64). A constant or
        non-finite layer map contributes zeros (and gets zero gradient); a constant fused map is zeros.
    Raises:
        TypeError: non-list arguments, non-tensor or non-floating layers, bad ``output_size`` types, a
            non-string ``fuse``.
        ValueError: empty or unequal lists, mismatched shapes or batches, bad ``fuse`` / ``output_size``.
    """
    _check_flm_args(activations, gradients)
    if output_size is None:
        raise TypeError("output_size must be a pair (H, W) of ints, got None")
    size = output_size_arg(output_size, (0, 0))
    if not isinstance(fuse, str):  # (a tensor or array would make `in` compare elementwise)
        raise TypeError(f"fuse must be a str, one of {FUSE_MODES}, got {type(fuse).__name__}")
    if fuse not in FUSE_MODES:
        raise ValueError(f"fuse must be one of {FUSE_MODES}, got {fuse!r}")
    check_backend(backend)
    return flm_fuse_with_flags(list(activations), list(gradients), size, fuse, backend)[0]


def flm_fuse_with_flags(
    activations: list[Tensor], gradients: list[Tensor], output_size: list[int], fuse: str, backend: str
) -> tuple[Tensor, Tensor]:
    """:func:`flm_fuse` without argument checks, plus the ``degenerate`` flags ``bool [N]``."""
    if graph_capture():  # (torch.compile, torch.jit.trace)
        maps = [flm_reduce(a, g, backend) for a, g in zip(activations, gradients)]
        return map_epilogue_op(maps, output_size, fuse, True, backend)
    return FLMFuseFunction.apply(output_size, fuse, backend, *activations, *gradients)


__all__ = [
    "FLMFuseFunction",
    "flm_fuse",
    "flm_fuse_with_flags",
    "flm_fuse_reference",
    "flm_reduce",
    "flm_reduce_backward",
    "flm_reduce_backward_native",
    "flm_reduce_backward_reference",
    "flm_reduce_backward_triton",
    "flm_reduce_reference",
]
