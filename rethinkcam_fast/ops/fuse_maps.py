"""Upsample, normalise and fuse per-layer maps into one CAM per image (the CAM epilogue and FLM).

For maps ``M_l[N, h_l, w_l]`` (one per layer, any sizes) and an output size ``(H, W)``::

    U_l   = bilinear upsample of M_l to (H, W)        (align_corners=False, as F.interpolate)
    P_l   = minmax(U_l)                               per image; constant / non-finite -> zeros
    F     = sum_l P_l   (fuse="sum", the Fully-CAM formula)   or   max_l P_l  (fuse="max", LayerCAM)
    out   = minmax(F)                                 per image, in [0, 1]

With one layer this is the usual epilogue: ``out = minmax(upsample(M))``. ``degenerate[N]`` flags the
images whose final map was constant or non-finite (returned as zeros, the wsolevaluation convention).
The Triton kernel does all layers in one launch, one program per image, without materialising any
per-layer upsampled map: pass 1 finds a layer's min/max on the fly, pass 2 accumulates. On the CPU a
C++ kernel (``csrc/cpu/fuse_maps.cpp``) does all layers of an image in one cache-resident buffer,
step by step as the pure-PyTorch reference (the test oracle and the fallback), equal to it to float32
rounding.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _native
from .._triton import cdiv, ieee_div, launch, next_power_of_2, tl, triton
from .._validation import check_float_dtype, check_same_device, check_tensor, output_size_arg
from . import _launch
from ._launch import check_backend, device_guard, run_inference_op, run_trusted, use_triton

FUSE_MODES = ("sum", "max")
# Launch option of every kernel here and in map_epilogue: no FMA contraction. Triton contracts
# ``a * b + c`` on the GPU by default (its interpreter never does), which would round the upsampled
# values differently from the C++ kernels and between this inference epilogue and the differentiable
# one (map_epilogue), whose thresholds and boxes must agree with it; map_epilogue's backward also
# finds pixels at the min and max by equality with values recomputed in other kernels.
EXACT_FP = {"enable_fp_fusion": False}


def degenerate_maps(maps: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``bool [N]``: maps that are constant or hold a non-finite value in ``dtype`` (they normalise to
    zeros): float32 for fuse_maps' float32 maps, the accumulation dtype for the differentiable
    epilogue's (float64 maps judged as float64, where their float32 rounding could overflow or tie)."""
    flat = maps.to(dtype).flatten(1)
    finite = torch.isfinite(flat).all(dim=1)
    return ~finite | ~(flat.amax(dim=1) > flat.amin(dim=1))


def no_span(span: Tensor) -> Tensor:
    """Where a min-max span cannot normalise: not positive, or past the dtype's range (finite values
    near +-3e38 in float32, whose ``(x - lo) / span`` would be NaN). The Triton kernels' ``_no_span``."""
    return ~(span > 0) | ~torch.isfinite(span)


def minmax_normalize(maps: Tensor, degenerate: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-image min-max of ``maps[N, H, W]`` into ``[0, 1]``; constant or non-finite maps become zeros.

    ``degenerate`` (``bool [N]``) forces images to zeros, e.g. maps that were constant *before* an
    upsampling whose rounding made them not quite constant. Returns ``(float32 [N, H, W], bool [N])``.
    """
    flat = maps.float().flatten(1)
    if flat.shape[1] == 0:
        return maps.float(), torch.zeros(maps.shape[0], dtype=torch.bool, device=maps.device)
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    span = hi - lo
    flagged = ~torch.isfinite(flat).all(dim=1) | no_span(span)
    degenerate = flagged if degenerate is None else flagged | degenerate
    safe_span = torch.where(degenerate, torch.ones_like(span), span)
    out = (flat - lo[:, None]) / safe_span[:, None]
    out = torch.where(degenerate[:, None], torch.zeros_like(out), out)
    return out.view(maps.shape), degenerate


UPSAMPLE_MODES = ("bilinear", "bicubic")


def _bilinear_axis(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device):
    """``(i0, i1, l1)`` of one axis: PyTorch's ``align_corners=False`` source positions, computed in
    ``dtype`` as the C++ kernels compute them (csrc/cpu/bilinear.h, ``bilinear_axis``). Built on the
    device (no host-to-device copy: a copy syncs, which a CUDA-graph capture refuses); the scale is
    ``dtype(n_in) / dtype(n_out)``, rounded as the kernels round it."""
    scale = float(np.float32(n_in) / np.float32(n_out)) if dtype == torch.float32 else n_in / n_out
    src = torch.arange(n_out, dtype=dtype, device=device).add_(0.5).mul_(scale).sub_(0.5).clamp_min_(0)
    i0 = src.floor().to(torch.int64).clamp_max_(n_in - 1)
    l1 = (src - i0.to(dtype)).clamp_(0, 1)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, l1


def _lerp(a: Tensor, b: Tensor, l: Tensor) -> Tensor:
    """``a + (b - a) * l``, exact where ``a == b``; ATen's ``a * (1 - l) + b * l`` where ``b - a`` overflows
    (finite neighbours of opposite signs near the dtype's limit: it stays finite there)."""
    d = b - a
    out = a + d * l
    finite = d.abs() <= torch.finfo(d.dtype).max
    if d.device.type == "cpu" and bool(finite.all()):  # (the usual case, without the second formula; on a
        return out                                     # GPU that test would sync, so both are computed)
    return torch.where(finite, out, a * (1 - l) + b * l)


def bilinear_upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``maps [N, h, w]`` -> ``[N, H, W]``, bilinear with ``align_corners=False`` (``F.interpolate``'s
    sampling) interpolated as ``lerp(lerp(...), lerp(...))``, the C++ kernels' arithmetic, in the maps'
    dtype; differentiable. ``F.interpolate`` computes ``a * (1 - l) + b * l``, which rounds a plateau
    to last-bit noise: a map that resizes to a constant (a 1 x W map to H x 1) then min-max
    normalises to noise stretched over ``[0, 1]``, and a plateau at a map's extreme stops tying there."""
    height, width = int(size[0]), int(size[1])
    y0, y1, ly = _bilinear_axis(maps.shape[1], height, maps.dtype, maps.device)
    x0, x1, lx = _bilinear_axis(maps.shape[2], width, maps.dtype, maps.device)
    # Along x on the source rows first (h rows, not H: the same values as interpolating the two rows of
    # each output row, which is the kernels' order), then along y.
    rows = _lerp(maps.index_select(2, x0), maps.index_select(2, x1), lx)
    return _lerp(rows.index_select(1, y0), rows.index_select(1, y1), ly[:, None])


def fuse_maps_reference(maps: list[Tensor], output_size: tuple[int, int], fuse: str = "sum",
                        upsample: str = "bilinear") -> tuple[Tensor, Tensor]:
    """Pure-PyTorch fusion: ``(cams float32 [N, H, W] in [0, 1], degenerate bool [N])``.

    ``upsample="bicubic"`` resizes as wsolevaluation's ``cv2.resize(cam, size, INTER_CUBIC)`` does
    (PyTorch's bicubic, ``align_corners=False``: the same cubic, ``a = -0.75``, with the same half-pixel
    centres and clamped borders; equal to OpenCV's float32 result to rounding), before the min-max."""
    fused = None
    for m in maps:
        if upsample == "bilinear":
            up = bilinear_upsample(m.float(), output_size)
        else:
            up = F.interpolate(m.float()[:, None], size=tuple(output_size), mode=upsample, align_corners=False)[:, 0]
        # Constancy is decided on the source map: interpolation weights can round a constant to values
        # that differ in the last bit, which min-max would blow up into noise.
        norm, degenerate = minmax_normalize(up, degenerate_maps(m))
        if fused is None:
            fused = norm
        else:
            fused = fused + norm if fuse == "sum" else torch.maximum(fused, norm)
    if len(maps) == 1:
        # Already normalised: a kept map spans exactly [0, 1] ((hi - lo) / (hi - lo) is 1 in floating
        # point), a flagged one is zeros, so normalising again would change nothing and flag the same.
        return fused, degenerate
    return minmax_normalize(fused)


# --------------------------------------------------------------------------------------------------
# Triton kernel: one program per image, all layers in one launch.
# --------------------------------------------------------------------------------------------------


@triton.jit
def _bilinear(Map_ptr, o, h, w, W, scale_h, scale_w, mask):
    """Bilinear sample (PyTorch's align_corners=False convention) of an [h, w] map at flat outputs o."""
    oy = o // W
    ox = o - oy * W
    sy = tl.maximum((oy.to(tl.float32) + 0.5) * scale_h - 0.5, 0.0)
    sx = tl.maximum((ox.to(tl.float32) + 0.5) * scale_w - 0.5, 0.0)
    y0 = sy.to(tl.int32)  # sy >= 0, so truncation is floor
    x0 = sx.to(tl.int32)
    y1 = tl.minimum(y0 + 1, h - 1)
    x1 = tl.minimum(x0 + 1, w - 1)
    ly1 = sy - y0.to(tl.float32)
    lx1 = sx - x0.to(tl.float32)
    ly0 = 1.0 - ly1
    lx0 = 1.0 - lx1
    v00 = tl.load(Map_ptr + y0 * w + x0, mask=mask, other=0.0)
    v01 = tl.load(Map_ptr + y0 * w + x1, mask=mask, other=0.0)
    v10 = tl.load(Map_ptr + y1 * w + x0, mask=mask, other=0.0)
    v11 = tl.load(Map_ptr + y1 * w + x1, mask=mask, other=0.0)
    return ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11)


@triton.jit
def _range(base, count, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """(min, max, #non-finite) of ``count`` stored values, non-finite values left out of min/max."""
    idx = tl.arange(0, BLOCK)
    lo = tl.full([BLOCK], float("inf"), ACC)
    hi = tl.full([BLOCK], float("-inf"), ACC)
    bad = tl.zeros([BLOCK], tl.int32)
    for start in range(0, count, BLOCK):
        i = start + idx
        mask = i < count
        v = tl.load(base + i, mask=mask, other=0.0)
        keep = mask & (v == v) & (tl.abs(v) < float("inf"))
        bad += (mask & ~keep).to(tl.int32)
        lo = tl.minimum(lo, tl.where(keep, v, float("inf")))
        hi = tl.maximum(hi, tl.where(keep, v, float("-inf")))
    return tl.min(lo, axis=0), tl.max(hi, axis=0), tl.sum(bad, axis=0)


@triton.jit
def _layer_at(Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, n, l, H, W, ACC: tl.constexpr):
    """(h, w, offset of image n's block of layer l in the packed maps, 1-D scales) of one layer."""
    h = tl.load(Heights_ptr + l)
    w = tl.load(Widths_ptr + l)
    block = tl.load(Offsets_ptr + l) + n.to(tl.int64) * (h * w)
    # Scales as PyTorch: (float)input_size / output_size, rounded to nearest.
    return h, w, block, ieee_div(h.to(ACC), tl.cast(H, ACC)), ieee_div(w.to(ACC), tl.cast(W, ACC))


@triton.jit
def _no_span(lo, hi):
    """Whether ``[lo, hi]`` cannot be normalised: no positive span, or one past the dtype's range
    (finite values near +-3e38 in float32, whose (x - lo) / span would be NaN); :func:`no_span` in PyTorch."""
    span = hi - lo
    return ~(span > 0.0) | ~(span < float("inf"))


@triton.jit
def _span_divisor(span, degenerate):
    """What min-max normalisation divides by: ``span``, 1 for a degenerate map (whose values are then
    replaced by 0). A division rounded to nearest, as PyTorch's and the C++ kernels' ``(x - lo) / span``:
    ``x * (1 / span)`` rounds twice, so a map's maximum came out as 0.99999994 for about one span in
    six (uint8 level 254, not 255: another threshold than the CPU's), and a fused map the CPU finds
    constant was not."""
    return tl.where(degenerate, 1.0, span)


@triton.jit
def _source_is_degenerate(map_base, h, w, BLOCK: tl.constexpr):
    """Whether an [h, w] source map holds a non-finite value or is constant (it normalises to zeros)."""
    lo, hi, bad = _range(map_base, h * w, BLOCK, tl.float32)
    return (bad > 0) | ~(hi > lo)


@triton.jit
def _upsampled_range(map_base, h, w, W, scale_h, scale_w, first, stop, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """(min, max) of the bilinear upsampling of one map over flat outputs [first, stop), on the fly
    (never stored)."""
    idx = tl.arange(0, BLOCK)
    lo = tl.full([BLOCK], float("inf"), ACC)
    hi = tl.full([BLOCK], float("-inf"), ACC)
    for start in range(first, stop, BLOCK):
        o = start + idx
        mask = o < stop
        v = _bilinear(map_base, o, h, w, W, scale_h, scale_w, mask)
        lo = tl.minimum(lo, tl.where(mask, v, float("inf")))
        hi = tl.maximum(hi, tl.where(mask, v, float("-inf")))
    return tl.min(lo, axis=0), tl.max(hi, axis=0)


@triton.jit
def _fuse_maps_kernel(
    Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, Out_ptr, Degenerate_ptr,
    L, H, W,
    FUSE_MAX: tl.constexpr, SINGLE: tl.constexpr, BLOCK: tl.constexpr,
):
    n = tl.program_id(0)
    HW = H * W
    out_base = Out_ptr + n.to(tl.int64) * HW
    idx = tl.arange(0, BLOCK)
    for l in range(L):
        h, w, block, scale_h, scale_w = _layer_at(Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, n, l, H, W, tl.float32)
        map_base = Maps_ptr + block
        # Pass 0: is the source map constant or non-finite? (Decided before upsampling, whose
        # rounding can make a constant map differ in the last bit.)
        source_degenerate = _source_is_degenerate(map_base, h, w, BLOCK)
        # Pass 1: min and max of the upsampled map, computed on the fly and never stored.
        lo_s, hi_s = _upsampled_range(map_base, h, w, W, scale_h, scale_w, 0, HW, BLOCK, tl.float32)
        span = hi_s - lo_s
        degenerate = source_degenerate | _no_span(lo_s, hi_s)
        divisor = _span_divisor(span, degenerate)
        # Pass 2: normalise and accumulate into the output (the first layer initialises it).
        for start in range(0, HW, BLOCK):
            o = start + idx
            mask = o < HW
            v = _bilinear(map_base, o, h, w, W, scale_h, scale_w, mask)
            p = tl.where(degenerate, 0.0, ieee_div(v - lo_s, divisor))
            if l > 0:
                prev = tl.load(out_base + o, mask=mask, other=0.0)
                if FUSE_MAX:
                    p = tl.maximum(prev, p)
                else:
                    p = prev + p
            tl.store(out_base + o, p, mask=mask)
        if SINGLE:
            tl.store(Degenerate_ptr + n, degenerate.to(tl.int8))
    if not SINGLE:
        # Final min-max over the fused map (in place; each program owns its image's row).
        lo = tl.full([BLOCK], float("inf"), tl.float32)
        hi = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, HW, BLOCK):
            o = start + idx
            mask = o < HW
            v = tl.load(out_base + o, mask=mask, other=0.0)
            lo = tl.minimum(lo, tl.where(mask, v, float("inf")))
            hi = tl.maximum(hi, tl.where(mask, v, float("-inf")))
        lo_s = tl.min(lo, axis=0)
        span = tl.max(hi, axis=0) - lo_s
        degenerate = ~(span > 0.0)
        divisor = _span_divisor(span, degenerate)
        for start in range(0, HW, BLOCK):
            o = start + idx
            mask = o < HW
            v = tl.load(out_base + o, mask=mask, other=0.0)
            tl.store(out_base + o, tl.where(degenerate, 0.0, ieee_div(v - lo_s, divisor)), mask=mask)
        tl.store(Degenerate_ptr + n, degenerate.to(tl.int8))


# --------------------------------------------------------------------------------------------------
# Triton kernels, split path: when one program per image cannot fill the GPU (a small batch, or the
# 53 layers of a Fully-CAM), every image's output is cut into SPLITS chunks. Same arithmetic as
# _fuse_maps_kernel in the same order (min / max are order-free), so the two give equal results.
#   _split_range_kernel   (n, L, S): each layer's upsampled min / max over one chunk (+ the source check)
#   _split_stats_kernel   (n, L):    each layer's lo and span (1 when degenerate)
#   _split_fuse_kernel    (n, S):    normalise and fuse every layer into one chunk, stored once
#   _split_final_kernel   (n, S):    the fused map's own min-max, in place (several layers only)
# --------------------------------------------------------------------------------------------------


@triton.jit
def _split_range_kernel(
    Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, Partial_ptr, SourceBad_ptr, L, H, W, CHUNK,
    SPLITS: tl.constexpr, BLOCK: tl.constexpr,
):
    n = tl.program_id(0)
    l = tl.program_id(1)
    split = tl.program_id(2)
    HW = H * W
    h, w, block, scale_h, scale_w = _layer_at(Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, n, l, H, W, tl.float32)
    map_base = Maps_ptr + block
    if split == 0:  # the source map's constancy / finiteness, as _fuse_maps_kernel's pass 0
        tl.store(SourceBad_ptr + n * L + l, _source_is_degenerate(map_base, h, w, BLOCK).to(tl.int8))
    first = split * CHUNK
    stop = tl.minimum(first + CHUNK, HW)
    lo, hi = _upsampled_range(map_base, h, w, W, scale_h, scale_w, first, stop, BLOCK, tl.float32)
    row = ((n * L + l) * SPLITS + split) * 2
    tl.store(Partial_ptr + row, lo)
    tl.store(Partial_ptr + row + 1, hi)


@triton.jit
def _split_stats_kernel(Partial_ptr, SourceBad_ptr, Stats_ptr, L, SPLITS: tl.constexpr):
    n = tl.program_id(0)
    l = tl.program_id(1)
    k = tl.arange(0, SPLITS)
    rows = ((n * L + l) * SPLITS + k) * 2
    lo_s = tl.min(tl.load(Partial_ptr + rows), axis=0)
    span = tl.max(tl.load(Partial_ptr + rows + 1), axis=0) - lo_s
    source_bad = tl.load(SourceBad_ptr + n * L + l) != 0
    degenerate = source_bad | ~(span > 0.0) | ~(span < float("inf"))
    divisor = _span_divisor(span, degenerate)
    tl.store(Stats_ptr + (n * L + l) * 3, lo_s)
    tl.store(Stats_ptr + (n * L + l) * 3 + 1, divisor)
    tl.store(Stats_ptr + (n * L + l) * 3 + 2, degenerate.to(tl.float32))


@triton.jit
def _split_layer_value(Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, Stats_ptr, n, l, L, H, W, o, mask):
    """Layer l's normalised upsampled value at flat outputs o (0 where the layer is degenerate)."""
    h, w, block, scale_h, scale_w = _layer_at(Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, n, l, H, W, tl.float32)
    map_base = Maps_ptr + block
    stats = Stats_ptr + (n * L + l) * 3
    lo_s = tl.load(stats)
    divisor = tl.load(stats + 1)
    degenerate = tl.load(stats + 2) != 0.0
    v = _bilinear(map_base, o, h, w, W, scale_h, scale_w, mask)
    return tl.where(degenerate, 0.0, ieee_div(v - lo_s, divisor))


@triton.jit
def _split_fuse_kernel(
    Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, Stats_ptr, Out_ptr, Partial_ptr, L, H, W, CHUNK,
    FUSE_MAX: tl.constexpr, SINGLE: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr,
):
    n = tl.program_id(0)
    split = tl.program_id(1)
    HW = H * W
    out_base = Out_ptr + n.to(tl.int64) * HW
    idx = tl.arange(0, BLOCK)
    first = split * CHUNK
    stop = tl.minimum(first + CHUNK, HW)
    lo = tl.full([BLOCK], float("inf"), tl.float32)
    hi = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(first, stop, BLOCK):
        o = start + idx
        mask = o < stop
        fused = _split_layer_value(Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, Stats_ptr, n, 0, L, H, W, o, mask)
        for l in range(1, L):  # layer order as _fuse_maps_kernel: the first initialises, the others add
            p = _split_layer_value(Maps_ptr, Offsets_ptr, Heights_ptr, Widths_ptr, Stats_ptr, n, l, L, H, W, o, mask)
            if FUSE_MAX:
                fused = tl.maximum(fused, p)
            else:
                fused = fused + p
        tl.store(out_base + o, fused, mask=mask)
        lo = tl.minimum(lo, tl.where(mask, fused, float("inf")))
        hi = tl.maximum(hi, tl.where(mask, fused, float("-inf")))
    if not SINGLE:
        tl.store(Partial_ptr + (n * SPLITS + split) * 2, tl.min(lo, axis=0))
        tl.store(Partial_ptr + (n * SPLITS + split) * 2 + 1, tl.max(hi, axis=0))


@triton.jit
def _split_final_kernel(Out_ptr, Partial_ptr, Degenerate_ptr, H, W, CHUNK, SPLITS: tl.constexpr,
                        BLOCK: tl.constexpr):
    n = tl.program_id(0)
    split = tl.program_id(1)
    HW = H * W
    out_base = Out_ptr + n.to(tl.int64) * HW
    k = tl.arange(0, SPLITS)
    lo_s = tl.min(tl.load(Partial_ptr + (n * SPLITS + k) * 2), axis=0)
    span = tl.max(tl.load(Partial_ptr + (n * SPLITS + k) * 2 + 1), axis=0) - lo_s
    degenerate = ~(span > 0.0)
    divisor = _span_divisor(span, degenerate)
    idx = tl.arange(0, BLOCK)
    first = split * CHUNK
    stop = tl.minimum(first + CHUNK, HW)
    for start in range(first, stop, BLOCK):
        o = start + idx
        mask = o < stop
        v = tl.load(out_base + o, mask=mask, other=0.0)
        tl.store(out_base + o, tl.where(degenerate, 0.0, ieee_div(v - lo_s, divisor)), mask=mask)
    if split == 0:
        tl.store(Degenerate_ptr + n, degenerate.to(tl.int8))


# Layer tables read by a kernel captured in a CUDA graph: the graph holds their addresses, so they must
# outlive any eviction from the cache below (a few bytes each; each table once, by identity).
_CAPTURED_TABLES: dict[int, tuple[Tensor, Tensor, Tensor]] = {}


def _layer_table(shapes: tuple[tuple[int, int, int], ...], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``(int64 offsets, int32 heights, int32 widths)`` of packed ``[N, h_l, w_l]`` maps on ``device``
    (see :func:`_cached_layer_table`); one used inside a CUDA-graph capture is kept for good."""
    table, home = _cached_layer_table(shapes, device)
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            _CAPTURED_TABLES[id(table[0])] = table  # (never freed, so no stream needs recording)
        else:
            stream = torch.cuda.current_stream(device)
            if stream != home:  # read on another stream than the one it was made on: when the cache
                for t in table:  # evicts it, its memory must wait for this stream's kernels
                    t.record_stream(stream)
    return table


@functools.lru_cache(maxsize=64)
def _cached_layer_table(shapes: tuple[tuple[int, int, int], ...], device: torch.device):
    """``((int64 offsets, int32 heights, int32 widths), stream made on)`` of packed ``[N, h_l, w_l]``
    maps on ``device``, cached: no host-to-device copy per call once a layer layout has been seen, which
    also keeps the launchers capturable in a CUDA graph (the video path warms up before it captures)."""
    sizes = torch.tensor([n * h * w for n, h, w in shapes], dtype=torch.int64)
    offsets = (torch.cumsum(sizes, 0) - sizes).to(device)
    heights = torch.tensor([h for _, h, _ in shapes], dtype=torch.int32, device=device)
    widths = torch.tensor([w for _, _, w in shapes], dtype=torch.int32, device=device)
    return (offsets, heights, widths), torch.cuda.current_stream(device) if device.type == "cuda" else None


def fuse_splits(n: int, pixels: int, block: int, device: torch.device, forced: int | None = None) -> int:
    """Programs per image for the split path, a power of two: ``forced``, else enough for about 4 per
    SM (``n`` images alone give fewer), at most one per ``block`` of output pixels and 64; 1 (the
    one-program-per-image kernel) when ``n`` fills the GPU, and on the CPU interpreter."""
    return _launch.split_count(forced, n, next_power_of_2(cdiv(pixels, block)), device)


def fuse_maps_triton(maps: list[Tensor], output_size: tuple[int, int], fuse: str = "sum",
                     num_splits: int | None = None) -> tuple[Tensor, Tensor]:
    """Triton fusion: ``(cams float32 [N, H, W], degenerate bool [N])``, as :func:`fuse_maps_reference`.

    One program per image when the batch fills the GPU; otherwise (a small batch, which also suffers
    most from one program looping over 53 Fully-CAM layers) each image is split over ``num_splits``
    programs (a power of two; default from the SM count, 1 on the CPU interpreter).
    """
    device = maps[0].device
    n = maps[0].shape[0]
    height, width = output_size
    out = torch.empty((n, height, width), dtype=torch.float32, device=device)
    degenerate = torch.zeros(n, dtype=torch.int8, device=device)
    if n == 0 or height * width == 0:
        return out, degenerate.bool()
    flat = [m.float().reshape(-1) for m in maps]
    packed = torch.cat(flat) if len(flat) > 1 else flat[0].contiguous()
    offsets, heights, widths = _layer_table(tuple(tuple(m.shape) for m in maps), device)
    layers, pixels = len(maps), height * width
    block = min(next_power_of_2(pixels), 1024)
    splits = fuse_splits(n, pixels, block, device, num_splits)
    with device_guard(packed):
        if splits == 1:
            launch(_fuse_maps_kernel, (n,),
                packed, offsets, heights, widths, out, degenerate, layers, height, width,
                FUSE_MAX=fuse == "max", SINGLE=layers == 1, BLOCK=block, **EXACT_FP,
            )
            return out, degenerate.bool()
        chunk = cdiv(cdiv(pixels, splits), block) * block
        partial = torch.empty((n, layers, splits, 2), dtype=torch.float32, device=device)
        source_bad = torch.empty((n, layers), dtype=torch.int8, device=device)
        stats = torch.empty((n, layers, 3), dtype=torch.float32, device=device)
        launch(_split_range_kernel, (n, layers, splits),
            packed, offsets, heights, widths, partial, source_bad, layers, height, width, chunk,
            SPLITS=splits, BLOCK=block, **EXACT_FP,
        )
        launch(_split_stats_kernel, (n, layers), partial, source_bad, stats, layers, SPLITS=splits, **EXACT_FP)
        fused_range = torch.empty((n, splits, 2), dtype=torch.float32, device=device)  # per-chunk min, max
        launch(_split_fuse_kernel, (n, splits),
            packed, offsets, heights, widths, stats, out, fused_range, layers, height, width, chunk,
            FUSE_MAX=fuse == "max", SINGLE=layers == 1, SPLITS=splits, BLOCK=block, **EXACT_FP,
        )
        if layers > 1:
            launch(_split_final_kernel, (n, splits), out, fused_range, degenerate, height, width, chunk, SPLITS=splits,
                                             BLOCK=block, **EXACT_FP)
        else:
            degenerate = stats[:, 0, 2].to(torch.int8)
    return out, degenerate.bool()


# --------------------------------------------------------------------------------------------------
# C++ kernel (CPU).
# --------------------------------------------------------------------------------------------------


def fuse_maps_native(kernel, maps: list[Tensor], output_size: tuple[int, int], fuse: str = "sum") -> tuple[Tensor, Tensor]:
    n = maps[0].shape[0]
    height, width = output_size
    out = torch.empty((n, height, width), dtype=torch.float32)
    degenerate = torch.zeros(n, dtype=torch.uint8)
    if n and height * width:
        flat = [m.float().contiguous() for m in maps]  # (kept alive until the call returns)
        kernel([m.data_ptr() for m in flat], [m.shape[1] for m in flat], [m.shape[2] for m in flat],
                         n, height, width, fuse == "max", out.data_ptr(), degenerate.data_ptr(),
                         torch.get_num_threads())
    return out, degenerate.bool()


# --------------------------------------------------------------------------------------------------
# Custom op + public entry point.
# --------------------------------------------------------------------------------------------------


def _fuse_maps_impl(maps: list[Tensor], output_size: list[int], fuse: str, backend: str) -> tuple[Tensor, Tensor]:
    device = maps[0].device
    if use_triton("fuse_maps", backend, device):
        return fuse_maps_triton(maps, tuple(output_size), fuse)
    kernel = _native.cpu_kernel("fuse_maps") if backend == "auto" and device.type == "cpu" else None
    if kernel is not None:
        return fuse_maps_native(kernel, maps, tuple(output_size), fuse)
    return fuse_maps_reference(maps, tuple(output_size), fuse)


@torch.library.custom_op("rethinkcam_fast::fuse_maps", mutates_args=())
def _fuse_maps_op(maps: list[Tensor], output_size: list[int], fuse: str, backend: str) -> tuple[Tensor, Tensor]:
    return _fuse_maps_impl(maps, output_size, fuse, backend)


@_fuse_maps_op.register_fake
def _fuse_maps_fake(maps, output_size, fuse, backend):
    n = maps[0].shape[0]
    return (maps[0].new_empty((n, *output_size), dtype=torch.float32),
            maps[0].new_empty((n,), dtype=torch.bool))


def fuse_maps(
    maps: list[Tensor] | Tensor, output_size: tuple[int, int], fuse: str = "sum", *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Upsample, min-max normalise and fuse per-layer maps (see the module docstring).

    Args:
        maps: one ``Tensor[N, h, w]`` or a list of them (one per layer; sizes may differ, N may not).
        output_size: ``(H, W)`` of the result.
        fuse: ``"sum"`` (Fully-CAM) or ``"max"`` (LayerCAM-style); irrelevant for one map.
        backend: ``"auto"`` (Triton on CUDA, C++ on the CPU), ``"triton"`` or ``"reference"`` (pure
            PyTorch).
    Returns:
        ``(cams float32 [N, H, W] in [0, 1], degenerate bool [N])``.
    """
    if isinstance(maps, Tensor):
        maps = [maps]
    if not maps:
        raise ValueError("maps must hold at least one map")
    for i, m in enumerate(maps):
        check_tensor(f"maps[{i}]", m, ndim=3)
        check_float_dtype(f"maps[{i}]", m)
        if m.shape[0] != maps[0].shape[0]:
            raise ValueError(f"maps[{i}] has batch {m.shape[0]}, maps[0] has {maps[0].shape[0]}")
        if m.shape[1] * m.shape[2] == 0:
            raise ValueError(f"maps[{i}] has an empty spatial extent {tuple(m.shape)}")
    check_same_device(**{f"maps[{i}]": m for i, m in enumerate(maps)})
    if fuse not in FUSE_MODES:
        raise ValueError(f"fuse must be one of {FUSE_MODES}, got {fuse!r}")
    check_backend(backend)
    size = output_size_arg(output_size, (0, 0)) if output_size is not None else None
    if size is None:
        raise TypeError("output_size must be a pair (H, W) of ints, got None")
    return run_inference_op(_fuse_maps_op, _fuse_maps_impl, list(maps), size, fuse, backend)


def fuse_maps_trusted(maps: list[Tensor], output_size: list[int], fuse: str, backend: str) -> tuple[Tensor, Tensor]:
    """:func:`fuse_maps` without its argument checks (one per map: 53 for a ResNet50 Fully-CAM), for the
    CAM engine, whose maps come from its own reduction (float32 ``[N, h, w]``; it checks that they are
    non-empty and on one device itself) and whose ``output_size`` and ``fuse`` it validated when it was
    built; see :func:`~rethinkcam_fast.ops._launch.run_trusted`."""
    return run_trusted(_fuse_maps_op, _fuse_maps_impl, maps, output_size, fuse, backend)


__all__ = [
    "FUSE_MODES", "UPSAMPLE_MODES", "degenerate_maps", "fuse_maps", "fuse_maps_native", "fuse_maps_reference",
    "fuse_maps_trusted", "fuse_maps_triton", "minmax_normalize",
]
