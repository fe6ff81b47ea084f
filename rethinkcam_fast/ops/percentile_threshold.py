"""PaS — percentile as a standard: the box threshold of each CAM, exactly as the reference computes it.

Reference (won-bae/rethinkingCAM ``extract_bbox``; DESIGN.md §2)::

    u8        = uint8(255 * cam)                      # truncation
    threshold = int(theta * np.percentile(u8, q))     # numpy's default "linear" method

PaS uses ``q = 90, theta = 0.35``; plain CAM thresholding is ``q = 100, theta = 0.2``.

Instead of sorting, each image's 256-level histogram gives the order statistics numpy interpolates
between (its cumulative counts locate the k-th smallest level), so the result is exact and costs one
pass over the map. numpy's arithmetic is replayed in float64: the virtual index ``(n - 1) * q / 100``,
its floor and fractional part ``gamma``, and ``_lerp``'s two-sided formula
(``a + (b - a) * gamma`` below 0.5, ``b - (b - a) * (1 - gamma)`` from 0.5 on).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _native
from .._triton import cdiv, launch, next_power_of_2, tl, triton
from .._validation import (check_cams_shape, check_flag, check_flagged_maps, check_float_dtype, check_unit_maps,
                           real_number)
from ._launch import device_guard, split_count, use_triton


def scaled_levels(cams: Tensor, dtype: torch.dtype) -> Tensor:
    """``trunc(255 * x)`` as ``dtype``, computed in float32 (float64 for float64 maps), as the
    reference's ``uint8(255 * cam)`` on its float32 maps."""
    work = cams.double() if cams.dtype == torch.float64 else cams.float()
    return (work * 255).to(dtype)


def host_levels(cams: Tensor, check: str | None = None) -> Tensor:
    """``uint8 [N, H, W]`` levels ``trunc(255 * x)`` on the CPU, contiguous, for the C++ kernels.

    CPU maps go through the native conversion (one pass, parallel); others through
    :func:`scaled_levels` on their device, then to the host. Same values either way.
    ``check`` (the argument's name for the message) also validates the maps as
    :func:`~rethinkcam_fast._validation.check_unit_maps` does, within the native pass for CPU maps.
    """
    kernel = _native.cpu_kernel("uint8_levels")
    if cams.device.type == "cpu" and kernel is not None:
        source = cams.contiguous()
        out = torch.empty(cams.shape, dtype=torch.uint8)
        per_image = source[0].numel() if source.shape[0] else 0
        bad = torch.zeros(source.shape[0] if check is not None and per_image else 0, dtype=torch.uint8)
        kernel(source.data_ptr(), _native.NATIVE_DTYPE_CODES[cams.dtype], source.numel(), out.data_ptr(),
               torch.get_num_threads(), per_image, bad.data_ptr() if bad.numel() else 0)
        check_flagged_maps(check, cams, bad)
        return out
    if check is not None:
        check_unit_maps(check, cams)
    return scaled_levels(cams, torch.uint8).cpu().contiguous()


def to_uint8_levels(cams: Tensor) -> Tensor:
    """``int64 [N, H*W]`` levels ``trunc(255 * x)`` (int64: usable as scatter indices)."""
    return scaled_levels(cams, torch.int64).flatten(1)


def level_histogram_native(cams: Tensor, check: str | None = None) -> Tensor | None:
    """``int64 [N, 256]`` level counts of CPU maps from the C++ kernel: one pass, the levels never
    written out, maps handed to threads one by one; ``check`` (the argument's name) validates the
    maps in the same pass. None without the extension."""
    kernel = _native.cpu_kernel("level_histograms")
    if kernel is None:
        return None
    source = cams.contiguous()
    n = source.shape[0]
    hist = torch.empty((n, 256), dtype=torch.int64)
    bad = torch.zeros(n if check is not None else 0, dtype=torch.uint8)
    kernel(source.data_ptr(), _native.NATIVE_DTYPE_CODES[cams.dtype], n, source[0].numel() if n else 0,
           hist.data_ptr(), torch.get_num_threads(), bad.data_ptr() if bad.numel() else 0)
    check_flagged_maps(check, cams, bad)
    return hist


def level_histogram_reference(cams: Tensor) -> Tensor:
    """``int64 [N, 256]`` counts of the uint8 levels of each map (integer adds: exact)."""
    levels = to_uint8_levels(cams)
    hist = torch.zeros((cams.shape[0], 256), dtype=torch.int64, device=cams.device)
    return hist.scatter_add_(1, levels, torch.ones_like(levels))


@triton.jit
def _level_histogram_kernel(X_ptr, Hist_ptr, S, stride_n, chunk, BLOCK: tl.constexpr, F64: tl.constexpr,
                            SPLIT: tl.constexpr):
    """Program (n, j): the 256-bin histogram of trunc(255 * x) over pixels [j * chunk, (j + 1) * chunk)
    of map n, accumulated in registers, then stored (SPLIT False: one program per map) or added to the
    zeroed histogram with integer atomics (exact, and the same in any order)."""
    n = tl.program_id(0)
    lo = tl.program_id(1) * chunk
    hi = tl.minimum(lo + chunk, S)
    base = X_ptr + n.to(tl.int64) * stride_n
    hist = tl.zeros([256], tl.int32)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < hi, other=0.0)
        x = x.to(tl.float64) if F64 else x.to(tl.float32)
        hist += tl.histogram((x * 255).to(tl.int32), 256)  # padding lanes land in bin 0
    count = tl.maximum(hi - lo, 0)
    padding = tl.cdiv(count, BLOCK) * BLOCK - count
    bins = tl.arange(0, 256)
    hist -= tl.where(bins == 0, padding, 0)
    if SPLIT:
        tl.atomic_add(Hist_ptr + n * 256 + bins, hist.to(tl.int64), sem="relaxed")
    else:
        tl.store(Hist_ptr + n * 256 + bins, hist.to(tl.int64))


def level_histogram_triton(cams: Tensor, num_splits: int | None = None) -> Tensor:
    """Triton version of :func:`level_histogram_reference` (deterministic: integer counts).

    A batch too small to fill the GPU (video at batch 1: one 224² map) splits each map over several
    programs whose counts are added with integer atomics; ``num_splits`` (a power of two) forces how
    many, default :func:`~rethinkcam_fast.ops._launch.split_count` (1 off a GPU).
    """
    flat = cams.flatten(1).contiguous()
    n, pixels = flat.shape
    if n == 0 or pixels == 0:
        return torch.zeros((n, 256), dtype=torch.int64, device=cams.device)
    block = min(next_power_of_2(pixels), 2048)
    blocks = cdiv(pixels, block)
    splits = split_count(num_splits, n, 1 << (blocks.bit_length() - 1), flat.device)
    chunk = cdiv(blocks, splits) * block  # a whole number of blocks: only the last chunk pads
    hist = (torch.zeros if splits > 1 else torch.empty)((n, 256), dtype=torch.int64, device=cams.device)
    with device_guard(flat):
        launch(_level_histogram_kernel, (n, splits),
            flat, hist, pixels, flat.stride(0), chunk, BLOCK=block, F64=cams.dtype == torch.float64,
            SPLIT=splits > 1,
        )
    return hist


def percentile_plan(n: int, q: float) -> tuple[int, int, float]:
    """numpy's linear-percentile bookkeeping for ``n`` values: ``(rank_lo, rank_hi, gamma)``."""
    virtual_index = (n - 1) * (q / 100)
    if virtual_index >= n - 1:
        return n - 1, n - 1, 0.0
    previous = math.floor(virtual_index)
    return previous, previous + 1, virtual_index - previous


def lerp_like_numpy(a: Tensor, b: Tensor, gamma: float) -> Tensor:
    """numpy's ``_lerp`` on float64 tensors with a scalar weight (same rounding as numpy)."""
    diff = b - a
    return b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma


def _pas_parameter(name: str, value: object, upper: float) -> float:
    number = real_number(name, value)
    if not 0.0 <= number <= upper:
        raise ValueError(f"{name} must lie in [0, {upper:g}], got {value!r}")
    return number


def check_pas_parameters(q: object, theta: object) -> tuple[float, float]:
    """``(q, theta)`` as floats, checked as :func:`percentile_threshold` checks them (callers that keep
    them, as the engine and the video path, check and convert once)."""
    return _pas_parameter("q", q, 100.0), _pas_parameter("theta", theta, 1.0)


def percentile_threshold(
    cams: Tensor, q: float = 90.0, theta: float = 0.35, *, validate: bool = True, backend: str = "auto"
) -> Tensor:
    """PaS box thresholds: ``int(theta * np.percentile(uint8(255 * cam), q))`` per image, exactly.

    Args:
        cams: ``Tensor[N, H, W]`` in ``[0, 1]`` (e.g. ``CAMResult.cams``), any float dtype and device.
        q: the percentile, in ``[0, 100]`` (90 for PaS, 100 for plain CAM thresholding).
        theta: the fraction of that percentile, in ``[0, 1]`` (0.35 for PaS, 0.2 for plain CAM).
        validate: check that every map is finite and inside ``[0, 1]`` (one device sync).
        backend: the histogram: ``"auto"`` (Triton on CUDA, C++ on the CPU, else PyTorch), ``"triton"``,
            ``"reference"`` (PyTorch).
    Returns:
        ``LongTensor[N]`` on ``cams``' device: uint8 levels; the foreground is ``uint8(255·x) > threshold``.
    Raises:
        TypeError: ``cams`` not a tensor or not floating; ``q``/``theta`` not real numbers.
        ValueError: ``cams`` not 3-D or empty in H·W; ``q``/``theta`` out of range; with ``validate``,
            an image with non-finite values or values outside ``[0, 1]`` (its index is named).
    """
    check_cams_shape("cams", cams)
    check_float_dtype("cams", cams)
    q, theta = check_pas_parameters(q, theta)
    validate = check_flag("validate", validate)
    if cams.shape[0] == 0:  # (an empty batch, of any extent)
        return torch.zeros(0, dtype=torch.int64, device=cams.device)
    n_pixels = cams.shape[1] * cams.shape[2]
    triton_path = use_triton("percentile_threshold", backend, cams.device)
    hist = None
    if not triton_path and backend == "auto" and cams.device.type == "cpu":
        hist = level_histogram_native(cams, check="cams" if validate else None)
    if hist is None:
        if validate:
            check_unit_maps("cams", cams)
        hist = level_histogram_triton(cams) if triton_path else level_histogram_reference(cams)
    cumulative = hist.cumsum(dim=1)
    rank_lo, rank_hi, gamma = percentile_plan(n_pixels, q)
    # The k-th smallest level (0-based k) is the first level whose running count exceeds k, i.e. the
    # number of levels whose running count is <= k (counts never decrease). Python ints as operands:
    # no host-to-device copy, so this stays capturable in a CUDA graph (the video path).
    level_lo = (cumulative <= rank_lo).sum(dim=1).double()
    level_hi = (cumulative <= rank_hi).sum(dim=1).double()
    value = lerp_like_numpy(level_lo, level_hi, gamma)
    return (theta * value).to(torch.int64)  # values >= 0: truncation is int()


__all__ = ["check_pas_parameters", "level_histogram_native", "level_histogram_reference", "level_histogram_triton", "lerp_like_numpy", "percentile_plan", "percentile_threshold", "scaled_levels", "to_uint8_levels"]
