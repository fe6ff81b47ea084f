"""Differentiable CAM epilogue: upsample, min-max normalise and fuse per-layer maps, with a fused backward.

The forward is :mod:`rethinkcam_fast.ops.fuse_maps`' (same formulas, same float arithmetic, same
degenerate-map convention), for maps ``M_l[N, h_l, w_l]`` and an output size ``(H, W)``::

    U_l = bilinear(M_l)                  align_corners=False
    P_l = (U_l - min U_l) / (max U_l - min U_l)        per image; 0 where M_l is constant / non-finite
    F   = sum_l P_l  or  max_l P_l
    out = minmax(F)  (several maps)      out = P_0 (one map)      out = U_0 (one map, normalize=False)

**The min-max normalisation is differentiable** (not detached): the gradient flows through the
minimum and the maximum too, split evenly between tied pixels, exactly as autograd differentiates
``amin``/``amax``. Reasons: it is the gradient of the function the forward computes (``gradcheck``
holds; a detached normalisation would not be a gradient of anything); the output is invariant to a
shift and a scale of the map, and only the true gradient knows that — with a detached ``min``/``max``
a loss on the map's mean, e.g. a CAM-area term, is cut by uniformly lowering the raw map, which
changes nothing in the forward, or by blowing up its contrast; and the exact gradient costs one extra
per-image reduction. Max fusion likewise splits the gradient evenly between the layers tied at a
pixel (``amax`` over the stacked layers). A degenerate map (constant or non-finite) is zeros with a
zero gradient.

Triton forward: each image splits over output chunks when the batch cannot fill the GPU (partial
min/max, then a normalising pass; for several maps per-layer ranges and statistics, then the fused
chunks and the fused map's own min-max), else one program per image. Triton backward, per image,
layer and band of output rows (grid ``(N, L, splits)``,
``splits`` chosen to fill the GPU): partial sums for the min-max gradient, then the adjoint of the
bilinear upsampling as two small dense products per tile (``R_h^T dU R_w``, separable), with ``dU``
recomputed on the fly from the upstream gradient; partial results are combined in a fixed order, so
it is deterministic (no atomics), and nothing per layer is stored at output resolution. The forward
statistics (minimum, maximum, tie counts, the fused map) come from the forward's own state in the
autograd Functions (see :func:`epilogue_function_forward`), and are recomputed by the forward kernels
where there is none (the custom ops under ``torch.compile``, a second backward with ``retain_graph``).

C++ (CPU, ``backend="auto"``, ``csrc/cpu/map_epilogue.cpp``): the forward and the backward, one image
per thread work item, all of its layers in cache-resident per-image buffers, nothing stored between
the passes (the backward recomputes the upsampled maps). Same formulas as the reference, the
upsampling included: both interpolate as ``a + (b - a) * l`` (:func:`~rethinkcam_fast.ops.fuse_maps.bilinear_upsample`),
exact where the neighbours are equal, where ``F.interpolate`` computes ``a * (1 - l) + b * l``; so a
plateau at a map's extreme ties there whole and shares its gradient, and a map that resizes to a
constant stays constant (flagged) instead of last-bit noise stretched to ``[0, 1]``. The float32
forward equals ``fuse_maps``' bit for bit. The Triton kernels interpolate with ``F.interpolate``'s
formula: on the GPU those two cases can differ from the CPU paths in the last bits, scaled by
min-max normalisation.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _native
from .._triton import cdiv, ieee_div, ieee_reciprocal, launch, next_power_of_2, tl, triton
from . import _launch
from ._launch import device_guard, use_triton
from .fuse_maps import (EXACT_FP, _bilinear, _layer_at, _layer_table, _no_span, _range, _upsampled_range,
                        bilinear_upsample, degenerate_maps, no_span)

_STATS = 5  # per (image, layer): min, max, 1/span (0 when degenerate), #pixels at min, #pixels at max
# The backward recomputes upsampled values in other kernels and finds the pixels at the min, at the max
# and at the fused maximum by equality, so every kernel here must round identically: no FMA contraction.


def acc_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32: the maps' and outputs' dtype."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------------------
# Reference (pure PyTorch, differentiable): the CPU path and the oracle.
# --------------------------------------------------------------------------------------------------


def _minmax_differentiable(maps: Tensor, forced: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``fuse_maps.minmax_normalize`` with a gradient: same values, zeros (and zero gradient) where
    degenerate; non-finite rows are zeroed *before* the min/max so no NaN leaks into the gradient."""
    flat = maps.flatten(1)
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)  # NaN propagates and inf lands at an extreme
    bad = ~(torch.isfinite(lo) & torch.isfinite(hi))
    if forced is not None:
        bad = bad | forced
    if bool(bad.any()):  # rare: recompute the min/max of the rows with the bad ones zeroed
        flat = torch.where(bad[:, None], 0, flat)
        lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    span = hi - lo
    degenerate = bad | no_span(span)
    out = (flat - lo[:, None]) / torch.where(degenerate, 1, span)[:, None]
    return torch.where(degenerate[:, None], 0, out).view(maps.shape), degenerate


def map_epilogue_reference(
    maps: list[Tensor], output_size: tuple[int, int], fuse: str = "sum", normalize: bool = True
) -> tuple[Tensor, Tensor]:
    """``(out [N, H, W], degenerate bool [N])`` in float32 (float64 for float64 maps), differentiable."""
    acc = acc_dtype(*maps)
    size = tuple(int(v) for v in output_size)
    parts = []
    for m in maps:
        m = m.to(acc)
        up = bilinear_upsample(m, size)
        if not normalize:
            return up, torch.zeros(m.shape[0], dtype=torch.bool, device=m.device)
        parts.append(_minmax_differentiable(up, degenerate_maps(m, acc)))
    if len(parts) == 1:
        return parts[0]
    if fuse == "sum":
        fused = parts[0][0]
        for part, _ in parts[1:]:  # in order, as fuse_maps: bitwise the same sums
            fused = fused + part
    else:  # amax: ties between layers share the gradient evenly
        fused = torch.stack([part for part, _ in parts]).amax(dim=0)
    return _minmax_differentiable(fused)


# --------------------------------------------------------------------------------------------------
# Triton kernels. Maps are packed flat ([N, h_l, w_l] blocks, one per layer) in the accumulation dtype.
# --------------------------------------------------------------------------------------------------


@triton.jit
def _normalizer(lo, hi, degenerate, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """(1 / span, 0 when degenerate; zeroed per-lane counters of the pixels at the min and the max)."""
    inv = tl.where(degenerate, 0.0, ieee_reciprocal(tl.where(degenerate, 1.0, hi - lo).to(ACC)))
    return inv, tl.zeros([BLOCK], ACC), tl.zeros([BLOCK], ACC)


@triton.jit
def _normalized(v, lo, hi, degenerate):
    """``(v - lo) / (hi - lo)``, 0 where degenerate: divided, rounded to nearest, as PyTorch and the C++
    kernels (``(v - lo) * (1 / span)`` rounds twice: a map's maximum came out 0.99999994, uint8 level
    254, for about one span in six). The backward's ``1 / span`` (the statistics' ``inv``) is its own."""
    return tl.where(degenerate, 0.0, ieee_div(v - lo, tl.where(degenerate, 1.0, hi - lo)))


@triton.jit
def _count_extremes(c_lo, c_hi, v, lo, hi, mask, ACC: tl.constexpr):
    """Running per-lane counts of the pixels tied at the minimum and at the maximum."""
    return c_lo + (mask & (v == lo)).to(ACC), c_hi + (mask & (v == hi)).to(ACC)


@triton.jit
def _store_stats(stats_base, lo, hi, inv, c_lo, c_hi):
    tl.store(stats_base + 0, lo)
    tl.store(stats_base + 1, hi)
    tl.store(stats_base + 2, inv)
    tl.store(stats_base + 3, c_lo)
    tl.store(stats_base + 4, c_hi)


@triton.jit
def _source_degenerate(map_base, h, w, lo, hi, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """A map normalises to zeros when its source is constant or non-finite (decided on the source:
    bilinear rounding can break a constant's ties) or its upsampling has no span."""
    src_lo, src_hi, src_bad = _range(map_base, h * w, BLOCK, ACC)
    return (src_bad > 0) | ~(src_hi > src_lo) | _no_span(lo, hi)


@triton.jit
def _layer_range_kernel(
    Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, Partial_ptr, L, H, W, CHUNK,
    SPLITS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """Partial (min, max) of layer l's upsampling over one chunk of outputs (image, layer, chunk)."""
    n = tl.program_id(0)
    l = tl.program_id(1)
    part = tl.program_id(2)
    h, w, block, scale_h, scale_w = _layer_at(Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, n, l, H, W, ACC)
    stop = tl.minimum(part * CHUNK + CHUNK, H * W)
    lo, hi = _upsampled_range(Maps_ptr + block, h, w, W, scale_h, scale_w, part * CHUNK, stop, BLOCK, ACC)
    out = Partial_ptr + ((n * L + l) * SPLITS + part) * 2
    tl.store(out, lo)
    tl.store(out + 1, hi)


# Several maps, each image split over SPLITS output chunks (a batch that cannot fill the GPU with one
# program per image): the same arithmetic as _fused_fwd_kernel, per pixel in the same layer order, so
# the results are equal bit for bit (min, max and the integer tie counts do not depend on the order).
#   _layer_range_kernel (n, L, S): each layer's partial upsampled range
#   _layer_stats_kernel (n, L):    each layer's lo, hi, 1/span and degenerate flag
#   _layers_fuse_kernel (n, S):    normalise and fuse the layers into one chunk of the fused map,
#                                  with the chunk's tie counts per layer and its fused range
#   _fused_final_kernel (n, S):    the fused map's min-max: its tie counts, the output, chunk 0 the stats
@triton.jit
def _layer_stats_kernel(
    Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, Partial_ptr, Stats_ptr, LayerBad_ptr, L, H, W,
    SPLITS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    n = tl.program_id(0)
    l = tl.program_id(1)
    parts = Partial_ptr + ((n * L + l) * SPLITS + tl.arange(0, SPLITS)) * 2
    lo = tl.min(tl.load(parts), axis=0)
    hi = tl.max(tl.load(parts + 1), axis=0)
    h, w, block, _, _ = _layer_at(Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, n, l, H, W, ACC)
    degenerate = _source_degenerate(Maps_ptr + block, h, w, lo, hi, BLOCK, ACC)
    inv, _, _ = _normalizer(lo, hi, degenerate, BLOCK, ACC)
    _store_stats(Stats_ptr + (n * L + l) * 5, lo, hi, inv, 0.0, 0.0)  # tie counts: summed by the launcher
    tl.store(LayerBad_ptr + n * L + l, degenerate.to(tl.int8))


@triton.jit
def _layers_fuse_kernel(
    Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, Stats_ptr, LayerBad_ptr, Fused_ptr, Count_ptr, Counts_ptr,
    FusedPartial_ptr, L, H, W, CHUNK,
    FUSE_MAX: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    n = tl.program_id(0)
    part = tl.program_id(1)
    HW = H * W
    row = n.to(tl.int64) * HW
    first_o = part * CHUNK
    stop = tl.minimum(first_o + CHUNK, HW)
    for l in range(L):
        stats = Stats_ptr + (n * L + l) * 5
        lo = tl.load(stats)
        hi = tl.load(stats + 1)
        inv = tl.load(stats + 2)
        degenerate = tl.load(LayerBad_ptr + n * L + l) != 0
        c_lo, c_hi = _fuse_layer_chunk(Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, Fused_ptr, Count_ptr, n, l,
                                       H, W, row, first_o, stop, lo, hi, inv, degenerate, FUSE_MAX, BLOCK, ACC)
        counts = Counts_ptr + ((n * L + l) * SPLITS + part) * 2
        tl.store(counts, tl.sum(c_lo, axis=0))
        tl.store(counts + 1, tl.sum(c_hi, axis=0))
    lo_f, hi_f, _ = _range(Fused_ptr + row + first_o, stop - first_o, BLOCK, ACC)
    tl.store(FusedPartial_ptr + (n * SPLITS + part) * 2, lo_f)
    tl.store(FusedPartial_ptr + (n * SPLITS + part) * 2 + 1, hi_f)


@triton.jit
def _fused_final_kernel(
    Fused_ptr, Out_ptr, FusedPartial_ptr, Final_ptr, FinalCounts_ptr, Degenerate_ptr, H, W, CHUNK,
    SPLITS: tl.constexpr, STORE_OUT: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    n = tl.program_id(0)
    part = tl.program_id(1)
    HW = H * W
    row = n.to(tl.int64) * HW
    parts = FusedPartial_ptr + (n * SPLITS + tl.arange(0, SPLITS)) * 2
    lo = tl.min(tl.load(parts), axis=0)
    hi = tl.max(tl.load(parts + 1), axis=0)
    degenerate = _no_span(lo, hi)
    inv, _, _ = _normalizer(lo, hi, degenerate, BLOCK, ACC)
    first_o = part * CHUNK
    stop = tl.minimum(first_o + CHUNK, HW)
    c_lo, c_hi = _normalize_fused_chunk(Fused_ptr, Out_ptr, row, first_o, stop, lo, hi, inv, degenerate, STORE_OUT,
                                        BLOCK, ACC)
    tl.store(FinalCounts_ptr + (n * SPLITS + part) * 2, tl.sum(c_lo, axis=0))
    tl.store(FinalCounts_ptr + (n * SPLITS + part) * 2 + 1, tl.sum(c_hi, axis=0))
    if part == 0:
        _store_stats(Final_ptr + n * 5, lo, hi, inv, 0.0, 0.0)  # tie counts: summed by the launcher
        tl.store(Degenerate_ptr + n, degenerate.to(tl.int8))


@triton.jit
def _single_normalize_kernel(
    Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, Partial_ptr, Out_ptr, Stats_ptr, Counts_ptr, Degenerate_ptr,
    H, W, CHUNK,
    SPLITS: tl.constexpr, NORMALIZE: tl.constexpr, STORE_OUT: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """One map, one chunk of outputs: min-max normalise with the combined partial range (the values are
    fuse_maps'); partial counts of the pixels at the min and the max; chunk 0 stores the statistics."""
    n = tl.program_id(0)
    part = tl.program_id(1)
    row = n.to(tl.int64) * (H * W)
    h, w, block, scale_h, scale_w = _layer_at(Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, n, 0, H, W, ACC)
    map_base = Maps_ptr + block
    first = part * CHUNK
    stop = tl.minimum(first + CHUNK, H * W)
    idx = tl.arange(0, BLOCK)
    if NORMALIZE:
        parts = Partial_ptr + (n * SPLITS + tl.arange(0, SPLITS)) * 2
        lo = tl.min(tl.load(parts), axis=0)
        hi = tl.max(tl.load(parts + 1), axis=0)
        degenerate = _source_degenerate(map_base, h, w, lo, hi, BLOCK, ACC)
        inv, c_lo, c_hi = _normalizer(lo, hi, degenerate, BLOCK, ACC)
        for start in range(first, stop, BLOCK):
            o = start + idx
            mask = o < stop
            v = _bilinear(map_base, o, h, w, W, scale_h, scale_w, mask)
            c_lo, c_hi = _count_extremes(c_lo, c_hi, v, lo, hi, mask, ACC)
            if STORE_OUT:
                tl.store(Out_ptr + row + o, _normalized(v, lo, hi, degenerate), mask=mask)
        counts = Counts_ptr + (n * SPLITS + part) * 2
        tl.store(counts, tl.sum(c_lo, axis=0))
        tl.store(counts + 1, tl.sum(c_hi, axis=0))
        if part == 0:
            _store_stats(Stats_ptr + n * 5, lo, hi, inv, 0.0, 0.0)  # counts: summed by the launcher
            tl.store(Degenerate_ptr + n, degenerate.to(tl.int8))
    else:  # plain upsampling
        for start in range(first, stop, BLOCK):
            o = start + idx
            mask = o < stop
            tl.store(Out_ptr + row + o, _bilinear(map_base, o, h, w, W, scale_h, scale_w, mask), mask=mask)


@triton.jit
def _fuse_layer_chunk(Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, Fused_ptr, Count_ptr, n, l, H, W, row,
                      first_o, stop, lo, hi, inv, degenerate,
                      FUSE_MAX: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Layer l's normalised upsampling fused into outputs first_o..stop of the fused map (the first
    layer initialises it; sum, or max with the number of layers tied at each pixel); returns the
    per-lane counts of the layer's pixels at its min and max."""
    h, w, block, scale_h, scale_w = _layer_at(Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, n, l, H, W, ACC)
    map_base = Maps_ptr + block
    c_lo = tl.zeros([BLOCK], ACC)
    c_hi = tl.zeros([BLOCK], ACC)
    idx = tl.arange(0, BLOCK)
    first = l == 0
    for start in range(first_o, stop, BLOCK):
        o = start + idx
        mask = o < stop
        v = _bilinear(map_base, o, h, w, W, scale_h, scale_w, mask)
        c_lo, c_hi = _count_extremes(c_lo, c_hi, v, lo, hi, mask, ACC)
        p = _normalized(v, lo, hi, degenerate)
        if FUSE_MAX:
            prev = tl.load(Fused_ptr + row + o, mask=mask & ~first, other=float("-inf"))
            count = tl.load(Count_ptr + row + o, mask=mask & ~first, other=0.0)
            count = tl.where(p > prev, 1.0, tl.where(p == prev, count + 1.0, count))
            tl.store(Count_ptr + row + o, count, mask=mask)
            p = tl.maximum(prev, p)
        else:
            p = tl.load(Fused_ptr + row + o, mask=mask & ~first, other=0.0) + p
        tl.store(Fused_ptr + row + o, p, mask=mask)
    return c_lo, c_hi


@triton.jit
def _normalize_fused_chunk(Fused_ptr, Out_ptr, row, first_o, stop, lo, hi, inv, degenerate,
                           STORE_OUT: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """The fused map's min-max over outputs first_o..stop (stored when STORE_OUT); returns the
    per-lane counts of its pixels at its min and max."""
    c_lo = tl.zeros([BLOCK], ACC)
    c_hi = tl.zeros([BLOCK], ACC)
    idx = tl.arange(0, BLOCK)
    for start in range(first_o, stop, BLOCK):
        o = start + idx
        mask = o < stop
        f = tl.load(Fused_ptr + row + o, mask=mask, other=0.0)
        c_lo, c_hi = _count_extremes(c_lo, c_hi, f, lo, hi, mask, ACC)
        if STORE_OUT:
            tl.store(Out_ptr + row + o, _normalized(f, lo, hi, degenerate), mask=mask)
    return c_lo, c_hi


@triton.jit
def _fused_fwd_kernel(
    Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, Out_ptr, Fused_ptr, Count_ptr, Stats_ptr, Final_ptr,
    Degenerate_ptr, L, H, W,
    FUSE_MAX: tl.constexpr, STORE_OUT: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """Several maps, one program per image: the values are fuse_maps'; the statistics, the fused map
    (and for max fusion the number of layers tied at each pixel) are what the backward needs."""
    n = tl.program_id(0)
    HW = H * W
    row = n.to(tl.int64) * HW
    for l in range(L):
        h, w, block, scale_h, scale_w = _layer_at(Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, n, l, H, W, ACC)
        map_base = Maps_ptr + block
        lo, hi = _upsampled_range(map_base, h, w, W, scale_h, scale_w, 0, HW, BLOCK, ACC)
        degenerate = _source_degenerate(map_base, h, w, lo, hi, BLOCK, ACC)
        inv, _, _ = _normalizer(lo, hi, degenerate, BLOCK, ACC)
        c_lo, c_hi = _fuse_layer_chunk(Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, Fused_ptr, Count_ptr, n, l,
                                       H, W, row, 0, HW, lo, hi, inv, degenerate, FUSE_MAX, BLOCK, ACC)
        _store_stats(Stats_ptr + (n * L + l) * 5, lo, hi, inv, tl.sum(c_lo, axis=0), tl.sum(c_hi, axis=0))
    lo, hi, _ = _range(Fused_ptr + row, HW, BLOCK, ACC)
    degenerate = _no_span(lo, hi)
    inv, _, _ = _normalizer(lo, hi, degenerate, BLOCK, ACC)
    c_lo, c_hi = _normalize_fused_chunk(Fused_ptr, Out_ptr, row, 0, HW, lo, hi, inv, degenerate, STORE_OUT, BLOCK, ACC)
    _store_stats(Final_ptr + n * 5, lo, hi, inv, tl.sum(c_lo, axis=0), tl.sum(c_hi, axis=0))
    tl.store(Degenerate_ptr + n, degenerate.to(tl.int8))


@triton.jit
def _minmax_grad_coefficients(s1, s2, inv, c_lo, c_hi):
    """For out = (x - lo) * inv with g = dL/dout, S1 = sum g, S2 = sum g * out:
    dL/dlo = inv (S2 - S1) and dL/dhi = -inv S2, each shared by the pixels tied at lo / hi."""
    return ieee_div(inv * (s2 - s1), tl.maximum(c_lo, 1.0)), ieee_div(-inv * s2, tl.maximum(c_hi, 1.0))


@triton.jit
def _minmax_grad(g, x, lo, hi, inv, a_lo, a_hi):
    return g * inv + tl.where(x == lo, a_lo, 0.0) + tl.where(x == hi, a_hi, 0.0)


@triton.jit
def _final_norm_bwd_kernel(GradOut_ptr, Fused_ptr, Final_ptr, DFused_ptr, HW, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """dL/dF of the final min-max (several maps), one program per image."""
    n = tl.program_id(0)
    row = n.to(tl.int64) * HW
    idx = tl.arange(0, BLOCK)
    lo = tl.load(Final_ptr + n * 5 + 0)
    hi = tl.load(Final_ptr + n * 5 + 1)
    inv = tl.load(Final_ptr + n * 5 + 2)
    s1 = tl.zeros([BLOCK], ACC)
    s2 = tl.zeros([BLOCK], ACC)
    for start in range(0, HW, BLOCK):
        o = start + idx
        mask = o < HW
        g = tl.load(GradOut_ptr + row + o, mask=mask, other=0.0)
        f = tl.load(Fused_ptr + row + o, mask=mask, other=0.0)
        s1 += g
        s2 += g * ((f - lo) * inv)
    a_lo, a_hi = _minmax_grad_coefficients(
        tl.sum(s1, axis=0), tl.sum(s2, axis=0), inv, tl.load(Final_ptr + n * 5 + 3), tl.load(Final_ptr + n * 5 + 4)
    )
    for start in range(0, HW, BLOCK):
        o = start + idx
        mask = o < HW
        g = tl.load(GradOut_ptr + row + o, mask=mask, other=0.0)
        f = tl.load(Fused_ptr + row + o, mask=mask, other=0.0)
        tl.store(DFused_ptr + row + o, tl.where(inv != 0.0, _minmax_grad(g, f, lo, hi, inv, a_lo, a_hi), 0.0), mask=mask)


@triton.jit
def _source_coords(o, size, scale):
    """1-D bilinear source indices and weights of outputs o, the arithmetic of fuse_maps._bilinear."""
    s = tl.maximum((o.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = s.to(tl.int32)
    i1 = tl.minimum(i0 + 1, size - 1)
    w1 = s - i0.to(tl.float32)
    return i0, i1, 1.0 - w1, w1


@triton.jit
def _interp_matrix(o, src, size, out_size, scale):
    """R[o, src] = bilinear weight of source index src in output o (0 for o outside [0, out_size))."""
    i0, i1, w0, w1 = _source_coords(o, size, scale)
    valid = (o < out_size)[:, None]
    r = tl.where(valid & (i0[:, None] == src[None, :]), w0[:, None], 0.0)
    return r + tl.where(valid & (i1[:, None] == src[None, :]), w1[:, None], 0.0)


@triton.jit
def _output_support(start, B: tl.constexpr, size, out_size):
    """Outputs whose samples touch source indices [start, start + B), with a margin for rounding."""
    # tl.cast: an output size of 1 arrives as a plain int (Triton specialises ints equal to 1), which
    # has no .to(). An approximate division is fine: the support has a margin of 2.
    ratio = tl.cast(out_size, tl.float32) / tl.cast(size, tl.float32)
    lo = tl.maximum(((start - 0.5) * ratio - 0.5).to(tl.int32) - 2, 0)
    hi = tl.minimum(((start + B + 0.5) * ratio - 0.5).to(tl.int32) + 2, out_size)
    whole = size <= B
    return tl.where(whole, 0, lo), tl.where(whole, out_size, hi)


@triton.jit
def _layer_grad(d_ptr, Fused_ptr, Count_ptr, row, o, mask, map_base, h, w, W, scale_h, scale_w, lo, hi, inv,
                a_lo, a_hi, NORMALIZE: tl.constexpr, FUSE_MAX: tl.constexpr):
    """(dL/dU_l, P_l) at flat outputs o: the fused map's gradient routed to this layer, through its min-max."""
    d = tl.load(d_ptr + row + o, mask=mask, other=0.0)
    if NORMALIZE:
        v = _bilinear(map_base, o, h, w, W, scale_h, scale_w, mask)
        p = _normalized(v, lo, hi, inv == 0.0)  # (bit for bit the forward's: compared with the fused max)
        if FUSE_MAX:  # the layers tied at the maximum share its gradient
            f = tl.load(Fused_ptr + row + o, mask=mask, other=0.0)
            count = tl.load(Count_ptr + row + o, mask=mask, other=1.0)
            # An approximate float32 division (div.full, <= 2 ulp; float64 is exact): the share of each
            # of `count` tied layers, within the op's float32 tolerance, while div.rn here made the
            # 16-warp _layer_bwd_kernel spill (tests/test_triton_compile.py allows it in the two callers).
            d = tl.where(p == f, d / count, 0.0)
        du = tl.where(inv != 0.0, _minmax_grad(d, v, lo, hi, inv, a_lo, a_hi), 0.0)
        return tl.where(mask, du, 0.0), tl.where(inv != 0.0, tl.where(mask, d, 0.0), 0.0), tl.where(mask, p, 0.0)
    return d, d, d


@triton.jit
def _layer_bwd_sums_kernel(
    Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, Stats_ptr, DFused_ptr, Fused_ptr, Count_ptr, Partial_ptr,
    L, H, W, CHUNK,
    SPLITS: tl.constexpr, FUSE_MAX: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """Partial sums S1 = sum dP and S2 = sum dP * P over one chunk of outputs (image, layer, chunk)."""
    n = tl.program_id(0)
    l = tl.program_id(1)
    part = tl.program_id(2)
    HW = H * W
    row = n.to(tl.int64) * HW
    h, w, block, scale_h, scale_w = _layer_at(Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, n, l, H, W, ACC)
    stats = Stats_ptr + (n * L + l) * 5
    lo = tl.load(stats + 0)
    hi = tl.load(stats + 1)
    inv = tl.load(stats + 2)
    s1 = tl.zeros([BLOCK], ACC)
    s2 = tl.zeros([BLOCK], ACC)
    stop = tl.minimum(part * CHUNK + CHUNK, HW)
    for start in range(part * CHUNK, stop, BLOCK):
        o = start + tl.arange(0, BLOCK)
        mask = o < stop
        _, d, p = _layer_grad(DFused_ptr, Fused_ptr, Count_ptr, row, o, mask, Maps_ptr + block, h, w, W, scale_h,
                              scale_w, lo, hi, inv, 0.0, 0.0, True, FUSE_MAX)
        s1 += d
        s2 += d * p
    out = Partial_ptr + ((n * L + l) * SPLITS + part) * 2
    tl.store(out, tl.sum(s1, axis=0))
    tl.store(out + 1, tl.sum(s2, axis=0))


@triton.jit
def _layer_bwd_kernel(
    Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, Stats_ptr, Partial_ptr, DFused_ptr, Fused_ptr, Count_ptr,
    DMaps_ptr, L, H, W, BAND_ROWS, TOTAL,
    NORMALIZE: tl.constexpr, FUSE_MAX: tl.constexpr, SPLITS: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr,
    BOY: tl.constexpr, BOX: tl.constexpr, ACC: tl.constexpr,
):
    """Image n's part of dL/dM_l from output rows [band * BAND_ROWS, +BAND_ROWS): min-max backward, then
    R_h^T dU R_w; each band writes its own partial map (summed in a fixed order by the launcher)."""
    n = tl.program_id(0)
    l = tl.program_id(1)
    band = tl.program_id(2)
    row = n.to(tl.int64) * (H * W)
    h, w, block, scale_h, scale_w = _layer_at(Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, n, l, H, W, ACC)
    map_base = Maps_ptr + block
    lo = 0.0
    hi = 0.0
    inv = 1.0
    a_lo = 0.0
    a_hi = 0.0
    if NORMALIZE:
        stats = Stats_ptr + (n * L + l) * 5
        lo = tl.load(stats + 0)
        hi = tl.load(stats + 1)
        inv = tl.load(stats + 2)
        parts = Partial_ptr + ((n * L + l) * SPLITS + tl.arange(0, SPLITS)) * 2
        a_lo, a_hi = _minmax_grad_coefficients(
            tl.sum(tl.load(parts), axis=0), tl.sum(tl.load(parts + 1), axis=0), inv, tl.load(stats + 3),
            tl.load(stats + 4),
        )
    band_lo = band * BAND_ROWS
    band_hi = tl.minimum(band_lo + BAND_ROWS, H)
    for y_start in range(0, h, BY):
        ys = y_start + tl.arange(0, BY)
        oy_lo, oy_hi = _output_support(y_start, BY, h, H)
        oy_lo = tl.maximum(oy_lo, band_lo)
        oy_hi = tl.minimum(oy_hi, band_hi)
        for x_start in range(0, w, BX):
            xs = x_start + tl.arange(0, BX)
            ox_lo, ox_hi = _output_support(x_start, BX, w, W)
            acc = tl.zeros([BY, BX], ACC)
            for oy_start in range(oy_lo, oy_hi, BOY):
                oy = oy_start + tl.arange(0, BOY)
                t = tl.zeros([BOY, BX], ACC)
                for ox_start in range(ox_lo, ox_hi, BOX):
                    ox = ox_start + tl.arange(0, BOX)
                    o = oy[:, None] * W + ox[None, :]
                    mask = (oy < oy_hi)[:, None] & (ox < ox_hi)[None, :]
                    du, _, _ = _layer_grad(DFused_ptr, Fused_ptr, Count_ptr, row, o, mask, map_base, h, w, W,
                                           scale_h, scale_w, lo, hi, inv, a_lo, a_hi, NORMALIZE, FUSE_MAX)
                    rx = _interp_matrix(ox, xs, w, ox_hi, scale_w).to(ACC)
                    t += tl.dot(du.to(ACC), rx, input_precision="ieee", out_dtype=ACC)
                ry = _interp_matrix(oy, ys, h, oy_hi, scale_h).to(ACC)
                acc += tl.dot(tl.trans(ry), t, input_precision="ieee", out_dtype=ACC)
            src = ys[:, None] * w + xs[None, :]
            tl.store(DMaps_ptr + band * TOTAL + block + src, acc, mask=(ys < h)[:, None] & (xs < w)[None, :])


# --------------------------------------------------------------------------------------------------
# Launchers.
# --------------------------------------------------------------------------------------------------


def _pack(maps: list[Tensor], acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(packed maps, int64 offsets, int32 heights, int32 widths)`` on the maps' device."""
    flat = [m.to(acc).reshape(-1) for m in maps]
    packed = torch.cat(flat) if len(flat) > 1 else flat[0].contiguous()
    return (packed, *_layer_table(tuple(tuple(m.shape) for m in maps), maps[0].device))


def _forward_splits(forced: int | None, n: int, pixels: int, block: int, device: torch.device) -> int:
    """Programs sharing one image in the forward, a power of two: ``forced``, else enough to fill the
    GPU (about 4 per SM) when ``n`` images alone cannot, at most one per ``block`` of outputs (the
    forward splits by chunks of pixels); 1 on the CPU interpreter."""
    return _launch.split_count(forced, n, next_power_of_2(cdiv(pixels, block)), device)


def _splits(forced: int | None, programs: int, rows: int, device: torch.device) -> int:
    """Programs sharing one (image, layer), a power of two: ``forced``, else enough to fill the GPU
    (about 4 per SM) when images x layers alone cannot, at most one per 32 output rows; 1 on the CPU
    interpreter."""
    return _launch.split_count(forced, programs, next_power_of_2(cdiv(rows, 32)), device)


def _forward_triton(maps: list[Tensor], output_size: tuple[int, int], fuse: str, normalize: bool, store_out: bool,
                    num_splits: int | None = None):
    """``(out, degenerate, fused, count, stats, final, packing)``; see :func:`map_epilogue_triton`."""
    acc = acc_dtype(*maps)
    n, (height, width), layers = maps[0].shape[0], output_size, len(maps)
    device = maps[0].device
    multi = layers > 1
    fuse_max = multi and fuse == "max"
    out = torch.empty((n, height, width) if store_out else (0,), dtype=acc, device=device)
    fused = torch.empty((n, height, width) if multi else (0,), dtype=acc, device=device)
    count = torch.empty((n, height, width) if fuse_max else (0,), dtype=acc, device=device)
    stats = torch.zeros((n, layers, _STATS), dtype=acc, device=device)
    final = torch.empty((n, _STATS), dtype=acc, device=device)
    degenerate = torch.zeros(n, dtype=torch.int8, device=device)
    packing = _pack(maps, acc)
    block = min(next_power_of_2(height * width), 1024)
    if n == 0 or height * width == 0 or not (normalize or store_out):  # plain upsampling has no statistics
        return out, degenerate.bool(), fused, count, stats, final, packing
    splits = _forward_splits(num_splits, n, height * width, block, device)
    chunk = cdiv(cdiv(height * width, splits), block) * block
    kw = dict(BLOCK=block, ACC=_tl_dtype(acc), **EXACT_FP)
    if multi and splits == 1:  # several maps, a batch that fills the GPU: one program per image
        launch(_fused_fwd_kernel, (n,),
            *packing, out, fused, count, stats, final, degenerate, layers, height, width,
            FUSE_MAX=fuse_max, STORE_OUT=store_out, **kw,
        )
    elif multi:  # several maps, each image split over output chunks
        partial = torch.empty((n, layers, splits, 2), dtype=acc, device=device)
        layer_bad = torch.empty((n, layers), dtype=torch.int8, device=device)
        counts = torch.empty((n, layers, splits, 2), dtype=acc, device=device)
        fused_partial = torch.empty((n, splits, 2), dtype=acc, device=device)
        final_counts = torch.empty((n, splits, 2), dtype=acc, device=device)
        launch(_layer_range_kernel, (n, layers, splits), *packing, partial, layers, height, width, chunk, SPLITS=splits, **kw)
        launch(_layer_stats_kernel, (n, layers), *packing, partial, stats, layer_bad, layers, height, width, SPLITS=splits, **kw)
        launch(_layers_fuse_kernel, (n, splits),
            *packing, stats, layer_bad, fused, count, counts, fused_partial, layers, height, width, chunk,
            FUSE_MAX=fuse_max, SPLITS=splits, **kw,
        )
        launch(_fused_final_kernel, (n, splits),
            fused, out, fused_partial, final, final_counts, degenerate, height, width, chunk,
            SPLITS=splits, STORE_OUT=store_out, **kw,
        )
        stats[:, :, 3:] = counts.sum(dim=2)  # tie counts: exact integers in a fixed order
        final[:, 3:] = final_counts.sum(dim=1)
    else:  # one map: each image split over output chunks, so that a batch fills the GPU
        partial = torch.empty((n, splits, 2), dtype=acc, device=device)
        counts = torch.empty((n, splits, 2), dtype=acc, device=device)
        if normalize:
            launch(_layer_range_kernel, (n, 1, splits), *packing, partial, 1, height, width, chunk, SPLITS=splits, **kw)
        launch(_single_normalize_kernel, (n, splits),
            *packing, partial, out, stats, counts, degenerate, height, width, chunk,
            SPLITS=splits, NORMALIZE=normalize, STORE_OUT=store_out, **kw,
        )
        if normalize:
            stats[:, 0, 3:] = counts.sum(dim=1)  # tie counts: exact integers in a fixed order
    return out, degenerate.bool(), fused, count, stats, final, packing


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def map_epilogue_triton(
    maps: list[Tensor], output_size: tuple[int, int], fuse: str = "sum", normalize: bool = True,
    num_splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton forward: ``(out [N, H, W], degenerate bool [N])``, as :func:`map_epilogue_reference`.

    ``num_splits`` (a power of two) forces how many programs share one image of a single map; default:
    from the device's SM count, 1 on the CPU interpreter.
    """
    out, degenerate, *_ = _forward_triton(maps, output_size, fuse, normalize, store_out=True, num_splits=num_splits)
    return out, degenerate


def _tile(size: int) -> int:
    return 16 if size <= 16 else 32




def map_epilogue_triton_state(
    maps: list[Tensor], output_size: tuple[int, int], fuse: str = "sum", normalize: bool = True,
) -> tuple[Tensor, Tensor, tuple]:
    """:func:`map_epilogue_triton` plus what its backward needs (per-image statistics, packed maps),
    so that :func:`map_epilogue_backward_triton` can skip recomputing the forward's statistics."""
    out, degenerate, *state = _forward_triton(maps, output_size, fuse, normalize, store_out=True)
    return out, degenerate, tuple(state)


def map_epilogue_backward_triton(
    grad_out: Tensor, maps: list[Tensor], output_size: tuple[int, int], fuse: str = "sum", normalize: bool = True,
    num_splits: int | None = None, state: tuple | None = None,
) -> list[Tensor]:
    """Triton backward: ``dL/dM_l`` (each map's shape and dtype) from ``grad_out [N, H, W]``.

    ``num_splits`` (a power of two) forces how many output bands share one (image, layer); default:
    from the device's SM count, 1 on the CPU interpreter. ``state``: the forward's, from
    :func:`map_epilogue_triton_state` on the same maps (else the statistics are computed again).
    """
    height, width = output_size
    if state is None:
        _, _, *state = _forward_triton(maps, output_size, fuse, normalize, store_out=False, num_splits=num_splits)
    fused, count, stats, final, packing = state
    acc = packing[0].dtype
    n, layers = maps[0].shape[0], len(maps)
    splits = _splits(num_splits, n * layers, height, packing[0].device)
    total = packing[0].numel()
    d_maps = torch.zeros((splits, total), dtype=acc, device=packing[0].device)
    grad = grad_out.to(acc).contiguous()
    if n and height * width:
        block = min(next_power_of_2(height * width), 1024)
        if layers > 1:
            d_fused = torch.empty_like(fused)
            launch(_final_norm_bwd_kernel, (n,), grad, fused, final, d_fused, height * width, BLOCK=block, ACC=_tl_dtype(acc),
                                         **EXACT_FP)
            grad = d_fused
        fuse_max = layers > 1 and fuse == "max"
        partial = torch.empty((n, layers, splits, 2), dtype=acc, device=d_maps.device)
        if normalize:
            chunk = cdiv(cdiv(height * width, splits), block) * block
            launch(_layer_bwd_sums_kernel, (n, layers, splits),
                *packing, stats, grad, fused, count, partial, layers, height, width, chunk,
                SPLITS=splits, FUSE_MAX=fuse_max, BLOCK=block, ACC=_tl_dtype(acc), **EXACT_FP,
            )
        band_rows = cdiv(cdiv(height, splits), 32) * 32
        by, bx = _tile(max(m.shape[1] for m in maps)), _tile(max(m.shape[2] for m in maps))
        launch(_layer_bwd_kernel, (n, layers, splits),
            *packing, stats, partial, grad, fused, count, d_maps, layers, height, width, band_rows, total,
            NORMALIZE=normalize, FUSE_MAX=fuse_max, SPLITS=splits,
            # float64 (gradcheck's dtype) takes 32-wide output tiles: its tl.dot operands at 64 asked for
            # 184-248 KB of shared memory (Triton 3.6/3.9, sm_90), past an A100's 163 KB and an H100's 227 KB.
            BY=by, BX=bx, BOY=32, BOX=32 if acc == torch.float64 else 64, ACC=_tl_dtype(acc),
            # Registers (tests/triton_compile_check.py, sm_90): on 4 warps 255 a thread and 16-328 B of
            # spills; 8 warps spill-free for 16x16 source tiles, but 32x32 ones spill 60-76 B under
            # Triton 3.6 (the GPU image's); 16 warps: about 100-128 registers, no spills on 3.9; on 3.6 the
            # fuse="max" float32 specialisation spills 40 B since its scales became IEEE divisions (its
            # forward+backward measured no slower on an H100: 3.55 ms against 3.80 before). fuse="max"
            # recomputes each layer's normalised value with the forward's IEEE division (compared with the
            # fused maximum for equality): on 8 warps its 16x16 tiles spilled 4 B under 3.9, on 16 none.
            num_warps=16 if by * bx >= 1024 or fuse_max else 8, **EXACT_FP,
        )
    d_maps = d_maps.sum(dim=0) if splits > 1 else d_maps[0]  # a fixed-order sum: deterministic
    grads, start = [], 0
    for m in maps:  # separate tensors: outputs of a custom op may not alias each other
        grads.append(d_maps[start:start + m.numel()].view(m.shape).to(m.dtype, copy=layers > 1))
        start += m.numel()
    return grads


def _minmax_backward(grad: Tensor, maps: Tensor, forced: Tensor | None = None) -> Tensor:
    """Backward of :func:`_minmax_differentiable` written out: ``out = (x - lo) / span`` with the
    gradients of ``lo = amin x`` and ``hi = amax x`` shared evenly by their tied pixels."""
    flat, g = maps.flatten(1), grad.flatten(1)
    lo, hi = torch.aminmax(flat, dim=1, keepdim=True)
    bad = ~(torch.isfinite(lo) & torch.isfinite(hi))
    if forced is not None:
        bad = bad | forced[:, None]
    if bool(bad.any()):
        flat = torch.where(bad, 0, flat)
        lo, hi = torch.aminmax(flat, dim=1, keepdim=True)
    degenerate = bad | no_span(hi - lo)
    inv = torch.where(degenerate, 0, 1 / torch.where(degenerate, 1, hi - lo))
    at_lo, at_hi = flat == lo, flat == hi
    s1 = g.sum(dim=1, keepdim=True)
    s2 = (g * (flat - lo)).sum(dim=1, keepdim=True) * inv
    a_lo = inv * (s2 - s1) / at_lo.sum(dim=1, keepdim=True)
    a_hi = -inv * s2 / at_hi.sum(dim=1, keepdim=True)
    d = g * inv + torch.where(at_lo, a_lo, 0) + torch.where(at_hi, a_hi, 0)
    return d.masked_fill_(degenerate, 0).view(maps.shape)


def _upsample_adjoint(grad: Tensor, source: Tensor) -> Tensor:
    """Adjoint of ``F.interpolate(source[:, None], grad.shape[1:], "bilinear", align_corners=False)``."""
    n, h, w = source.shape
    out = torch.ops.aten.upsample_bilinear2d_backward(grad[:, None], list(grad.shape[1:]), [n, 1, h, w], False)
    return out[:, 0]


def map_epilogue_backward_reference(
    grad_out: Tensor, maps: list[Tensor], output_size: tuple[int, int], fuse: str = "sum", normalize: bool = True
) -> list[Tensor]:
    """``[dL/dM_l]`` (each map's dtype) from ``grad_out [N, H, W]``, the backward formulas written out in
    PyTorch (the CPU path; the tests hold them and the Triton kernels to autograd through
    :func:`map_epilogue_reference`)."""
    acc = acc_dtype(*maps)
    size = tuple(int(v) for v in output_size)
    grad = grad_out.to(acc)
    sources = [m.to(acc) for m in maps]
    ups = [bilinear_upsample(m, size) for m in sources]
    if not normalize:
        return [_upsample_adjoint(grad, sources[0]).to(maps[0].dtype)]
    forced = [degenerate_maps(m, acc) for m in sources]
    shares = [grad] * len(maps)
    if len(maps) > 1:
        parts = torch.stack([_minmax_differentiable(u, f)[0] for u, f in zip(ups, forced)])
        if fuse == "sum":
            fused = parts[0]
            for part in parts[1:]:
                fused = fused + part
        else:
            fused = parts.amax(dim=0)
        grad = _minmax_backward(grad, fused)
        if fuse == "sum":
            shares = [grad] * len(maps)
        else:
            tied = (parts == fused).to(acc)
            shares = list(grad * tied / tied.sum(dim=0))
    return [_upsample_adjoint(_minmax_backward(share, up, f), src).to(m.dtype)
            for share, up, f, src, m in zip(shares, ups, forced, sources, maps)]


# --------------------------------------------------------------------------------------------------
# C++ kernels (CPU): csrc/cpu/map_epilogue.cpp, the reference's arithmetic in one pass per image.
# --------------------------------------------------------------------------------------------------


def _native_kernel(name: str, backend: str, maps: list[Tensor], *others: Tensor):
    """The C++ kernel ``name`` when it runs this call: ``backend="auto"``, CPU tensors, floating
    ``[N, h, w]`` maps of one batch with a spatial extent, and the extension built; else ``None``."""
    if backend != "auto" or any(t.device.type != "cpu" or not t.is_floating_point() for t in (*maps, *others)):
        return None
    if any(m.dim() != 3 or m.shape[0] != maps[0].shape[0] or m.shape[1] * m.shape[2] == 0 for m in maps):
        return None
    return _native.cpu_kernel(name)


def _native_maps(maps: list[Tensor], normalize: bool) -> tuple[list[Tensor], torch.dtype]:
    """The maps the kernels read (contiguous, in the accumulation dtype; one without normalisation,
    as the reference) and that dtype."""
    acc = acc_dtype(*maps)
    return [m.to(acc).contiguous() for m in (maps if normalize else maps[:1])], acc


def map_epilogue_native(kernel, maps: list[Tensor], output_size: tuple[int, int], fuse: str = "sum",
                        normalize: bool = True) -> tuple[Tensor, Tensor]:
    """:func:`map_epilogue_reference`'s forward from the C++ kernel (equal to it to rounding)."""
    flat, acc = _native_maps(maps, normalize)
    n = flat[0].shape[0]
    out = torch.empty((n, *output_size), dtype=acc)
    degenerate = torch.zeros(n, dtype=torch.uint8)
    kernel([m.data_ptr() for m in flat], [m.shape[1] for m in flat], [m.shape[2] for m in flat], n, *output_size,
           fuse == "max", normalize, out.data_ptr(), degenerate.data_ptr(), _native.NATIVE_DTYPE_CODES[acc],
           torch.get_num_threads())
    return out, degenerate.bool()


def map_epilogue_backward_native(kernel, grad_out: Tensor, maps: list[Tensor], output_size: tuple[int, int],
                                 fuse: str = "sum", normalize: bool = True) -> list[Tensor]:
    """:func:`map_epilogue_backward_reference`'s results from the C++ kernel (equal to them to rounding)."""
    flat, acc = _native_maps(maps, normalize)
    grad = grad_out.to(acc).contiguous()
    grads = [torch.empty_like(m) for m in flat]
    kernel(grad.data_ptr(), [m.data_ptr() for m in flat], [m.shape[1] for m in flat], [m.shape[2] for m in flat],
           [g.data_ptr() for g in grads], flat[0].shape[0], *output_size, fuse == "max", normalize,
           _native.NATIVE_DTYPE_CODES[acc], torch.get_num_threads())
    return [g.to(m.dtype) for g, m in zip(grads, maps)]


# --------------------------------------------------------------------------------------------------
# Dispatch, autograd and custom ops (internal: the public ops are class_activation_map and flm_fuse).
# --------------------------------------------------------------------------------------------------


def _check_unnormalized(maps, normalize) -> None:
    if not normalize and len(maps) != 1:  # (a fusion is always normalised: its maps are each min-maxed)
        raise ValueError(f"normalize=False takes one map (plain upsampling), got {len(maps)}")


def epilogue_forward_impl(maps, output_size, fuse, normalize, backend) -> tuple[Tensor, Tensor]:
    _check_unnormalized(maps, normalize)
    output_size = tuple(output_size)
    if use_triton("map_epilogue", backend, maps[0].device):
        with device_guard(maps[0]):
            return map_epilogue_triton(maps, output_size, fuse, normalize)
    kernel = _native_kernel("map_epilogue_forward", backend, maps)
    if kernel is not None:
        return map_epilogue_native(kernel, maps, output_size, fuse, normalize)
    with torch.no_grad():
        return map_epilogue_reference(maps, output_size, fuse, normalize)


def epilogue_function_forward(ctx, maps, output_size, fuse, normalize, backend, saved, options):
    """Forward of the ops' ``autograd.Function``s: run the epilogue, save ``saved`` and the maps.

    Through Triton it also keeps what the backward needs in ``ctx.epilogue_state``, instead of the
    backward running the forward again: per image five statistics per layer and of the fused map,
    the packed maps (for one map a view of the saved map), and for several maps the fused map
    ``[N, H, W]`` (and for ``fuse="max"`` its tie counts). That saves the backward the forward's
    kernels (for several maps one program per image over every layer) and a dozen small allocations,
    host time that dominated these ops on an H100, for one more ``[N, H, W]`` buffer between the
    passes. The backward releases it (a second backward with ``retain_graph`` recomputes instead);
    ``save_on_cpu`` does not move it.
    """
    ctx.epilogue_state = None
    if use_triton("map_epilogue", backend, maps[0].device):
        with device_guard(maps[0]):
            out, degenerate, ctx.epilogue_state = map_epilogue_triton_state(maps, tuple(output_size), fuse, normalize)
    else:
        out, degenerate = epilogue_forward_impl(maps, output_size, fuse, normalize, backend)
    ctx.save_for_backward(*saved, *maps)
    ctx.options = options
    ctx.mark_non_differentiable(degenerate)
    return out, degenerate


def epilogue_backward_impl(grad_out, maps, output_size, fuse, normalize, backend, state=None) -> list[Tensor]:
    """``[dL/dM_l]``; ``state``: ``ctx.epilogue_state`` of :func:`epilogue_function_forward`, if any."""
    output_size = tuple(output_size)
    if use_triton("map_epilogue", backend, maps[0].device):
        with device_guard(maps[0]):
            return map_epilogue_backward_triton(grad_out, maps, output_size, fuse, normalize, state=state)
    kernel = _native_kernel("map_epilogue_backward", backend, maps, grad_out)
    if kernel is not None and tuple(grad_out.shape) == (maps[0].shape[0], *output_size):  # (else the reference raises)
        return map_epilogue_backward_native(kernel, grad_out, maps, output_size, fuse, normalize)
    return map_epilogue_backward_reference(grad_out, maps, output_size, fuse, normalize)


@torch.library.custom_op("rethinkcam_fast::map_epilogue", mutates_args=())
def map_epilogue_op(
    maps: list[Tensor], output_size: list[int], fuse: str, normalize: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """``(out [N, H, W], degenerate bool [N])``; see the module docstring."""
    return epilogue_forward_impl(maps, output_size, fuse, normalize, backend)


@map_epilogue_op.register_fake
def _map_epilogue_fake(maps, output_size, fuse, normalize, backend):
    _check_unnormalized(maps, normalize)
    n = maps[0].shape[0]
    acc = acc_dtype(*maps)
    return maps[0].new_empty((n, *output_size), dtype=acc), maps[0].new_empty((n,), dtype=torch.bool)


@torch.library.custom_op("rethinkcam_fast::map_epilogue_backward", mutates_args=())
def map_epilogue_backward_op(
    grad_out: Tensor, maps: list[Tensor], output_size: list[int], fuse: str, normalize: bool, backend: str
) -> list[Tensor]:
    """``[dL/dM_l]`` from ``dL/dout``."""
    return epilogue_backward_impl(grad_out, maps, output_size, fuse, normalize, backend)


@map_epilogue_backward_op.register_fake
def _map_epilogue_backward_fake(grad_out, maps, output_size, fuse, normalize, backend):
    return [m.new_empty(m.shape) for m in maps]  # contiguous, as every backend returns them


def _epilogue_setup_context(ctx, inputs, output) -> None:
    maps, ctx.output_size, ctx.fuse, ctx.normalize, ctx.backend = inputs
    ctx.save_for_backward(*maps)
    ctx.mark_non_differentiable(output[1])


def _epilogue_backward(ctx, grad_out: Tensor, _grad_degenerate):
    grads = map_epilogue_backward_op(grad_out, list(ctx.saved_tensors), ctx.output_size, ctx.fuse, ctx.normalize,
                                     ctx.backend)
    return grads, None, None, None, None


torch.library.register_autograd(
    "rethinkcam_fast::map_epilogue", _epilogue_backward, setup_context=_epilogue_setup_context
)


__all__ = [
    "acc_dtype",
    "epilogue_backward_impl",
    "epilogue_forward_impl",
    "epilogue_function_forward",
    "map_epilogue_backward_native",
    "map_epilogue_backward_reference",
    "map_epilogue_backward_triton",
    "map_epilogue_native",
    "map_epilogue_op",
    "map_epilogue_reference",
    "map_epilogue_triton",
    "map_epilogue_triton_state",
]
