"""Boxes from CAMs, exactly as OpenCV's contours give them (the WSOL reference protocol).

For each map and uint8 threshold (DESIGN.md §2)::

    mask     = uint8(255 * cam) > threshold
    contours = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)   # holes included
    box      = cv2.boundingRect(c)  ->  (x, y, w, h)

``mode="largest"`` keeps ``max(contours, key=cv2.contourArea)`` (the polygon area of the traced
border: a one-pixel or one-pixel-wide blob has area 0; ties go to the first in OpenCV's order);
``mode="all"`` keeps every contour. Conventions: ``"wsol"`` is wsolevaluation's
``[x, y, min(x + w, W - 1), min(y + h, H - 1)]`` (one pixel too large, reproduced on purpose);
``"exact"`` is the inclusive pixel extent ``[x, y, x + w - 1, y + h - 1]``. An empty mask gives
``[0, 0, 0, 0]`` in both.

The native C++ kernel (``csrc/cpu/contours.cpp``, Suzuki-Abe border following written for this
project, contour order replicated from OpenCV) runs on the CPU, parallel over (image, threshold);
CUDA maps are copied to the host for it as uint8 levels (the CUDA level sweep, ``ops/level_sweep.py``,
is opt-in through ``RETHINKCAM_GPU_BOXES=1`` until it has been timed on a GPU). Without the native
extension the op falls back to OpenCV itself, if installed, with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch
from torch import Tensor

from .. import _native
from .._validation import (
    check_cams_shape,
    check_flag,
    check_flagged_maps,
    check_float_dtype,
    check_integer_dtype,
    check_unit_maps,
)
from .level_sweep import gpu_boxes_enabled, level_sweep
from .percentile_threshold import host_levels, scaled_levels

MODES = ("largest", "all")
CONVENTIONS = ("wsol", "exact")


@dataclass
class RaggedBoxes:
    """Every contour box of every (image, threshold), as ``mode="all"`` returns them.

    Attributes:
        boxes: ``LongTensor[total, 4]`` (x0, y0, x1, y1) in the requested convention, OpenCV's order.
        offsets: ``LongTensor[N, T + 1]``: the boxes of image ``n`` at threshold ``t`` are
            ``boxes[offsets[n, t]:offsets[n, t + 1]]`` (the rows of ``offsets`` chain: row ``n + 1``
            starts where row ``n`` ends).
        is_hole: ``BoolTensor[total]``, True for the inner border of a hole.
        areas: ``DoubleTensor[total]``, ``cv2.contourArea`` of each contour.
    """

    boxes: Tensor
    offsets: Tensor
    is_hole: Tensor
    areas: Tensor

    def __repr__(self) -> str:
        """Counts, not every box (index :meth:`boxes_of` for those), as ``CAMResult``'s repr."""
        images, thresholds = self.offsets.shape[0], self.offsets.shape[1] - 1
        return (f"RaggedBoxes({self.boxes.shape[0]} boxes, {int(self.is_hole.sum())} of them holes, for {images} "
                f"images x {thresholds} thresholds, device={self.boxes.device})")

    def boxes_of(self, n: int, t: int = 0) -> Tensor:
        """``LongTensor[k, 4]``: the boxes of image ``n`` at threshold index ``t``."""
        images, thresholds = self.offsets.shape[0], self.offsets.shape[1] - 1
        if not (-images <= n < images and -thresholds <= t < thresholds):
            raise IndexError(f"boxes_of({n}, {t}): there are {images} images and {thresholds} thresholds")
        t %= thresholds
        return self.boxes[int(self.offsets[n, t]) : int(self.offsets[n, t + 1])]


def _to_convention(xywh: Tensor, height: int, width: int, convention: str) -> Tensor:
    """(x, y, w, h) -> (x0, y0, x1, y1); rows with w == 0 (no contour) become zeros."""
    if xywh.device.type == "cpu":  # a few hundred boxes at most per call: numpy's per-op cost is lower
        box = xywh.numpy().copy()
        box[..., 2:] += box[..., :2]
        if convention == "wsol":
            np.minimum(box[..., 2], width - 1, out=box[..., 2])
            np.minimum(box[..., 3], height - 1, out=box[..., 3])
        else:
            box[..., 2:] -= 1
        box[xywh.numpy()[..., 2] == 0] = 0
        return torch.from_numpy(box)
    x, y, w, h = xywh.unbind(-1)
    if convention == "wsol":
        x1 = torch.clamp(x + w, max=width - 1)
        y1 = torch.clamp(y + h, max=height - 1)
    else:
        x1, y1 = x + w - 1, y + h - 1
    out = torch.stack([x, y, x1, y1], dim=-1)
    return torch.where((w > 0)[..., None], out, torch.zeros_like(out))


def _thresholds_2d(thresholds: int | Tensor, n: int) -> tuple[Tensor, bool]:
    """``(int64 [N, T] on the CPU, whether the caller gave one threshold per image)``. An int (numpy's
    too), an integer tensor, or an integer numpy array or (nested) list of ints, as a tensor would be."""
    if isinstance(thresholds, (np.ndarray, list, tuple)):
        try:
            array = np.asarray(thresholds)
        except ValueError:  # (numpy's own words name no argument)
            raise ValueError("thresholds must be one level per image, or a rectangular [N, T] table of them; "
                             "got a ragged list") from None
        if array.dtype.kind not in "iu" and array.size:  # (an empty list is no level at all: shape checked below)
            raise TypeError(f"thresholds must be integer uint8 levels, got an array of {array.dtype}")
        thresholds = torch.from_numpy(array.astype(np.int64))
    if isinstance(thresholds, (bool, np.bool_)) or not isinstance(thresholds, (Integral, Tensor)):
        raise TypeError(f"thresholds must be an int or an integer tensor, got {type(thresholds).__name__}")
    if isinstance(thresholds, Tensor):
        check_integer_dtype("thresholds", thresholds, "integer uint8 levels")
        if thresholds.dtype in (torch.uint32, torch.uint64) and thresholds.numel():  # (before int64 wraps them)
            largest = int(thresholds.cpu().numpy().max())
            if largest > 255:
                raise ValueError(f"thresholds must be uint8 levels in [0, 255], got {largest}")
        if thresholds.dim() == 0:  # one level for every image, like an int
            thresholds = int(thresholds)
    if isinstance(thresholds, Integral):  # numpy integers too
        if not 0 <= int(thresholds) <= 255:  # (before a tensor is made: 2**70 does not fit one)
            raise ValueError(f"thresholds must be uint8 levels in [0, 255], got {int(thresholds)}")
        thresholds = torch.full((n,), int(thresholds), dtype=torch.int64)
    single = thresholds.dim() == 1
    if thresholds.dim() not in (1, 2) or thresholds.shape[0] != n:
        raise ValueError(f"thresholds must have shape ({n},) or ({n}, T), got {tuple(thresholds.shape)}")
    table = (thresholds[:, None] if single else thresholds).to(device="cpu", dtype=torch.int64).contiguous()
    if table.numel():
        values = table.numpy()
        if values.min() < 0 or values.max() > 255:
            raise ValueError(f"thresholds must be uint8 levels in [0, 255], got values from {values.min()} to "
                             f"{values.max()}")
    return table, single


def _contours_opencv(levels: np.ndarray, table: np.ndarray):
    """OpenCV fallback with the native kernel's outputs: (counts, xywh, areas, is_hole)."""
    try:
        import cv2
    except ImportError:  # (OpenCV is an extra: a core install has the C++ kernels, or neither path)
        raise RuntimeError(
            f"boxes need the C++ extension, which is not available ({_native.load_error('_C')}), or OpenCV for "
            "the slower fallback: reinstall rethinkcam_fast with a C++ compiler present, or `pip install "
            "opencv-python-headless`") from None

    counts, boxes, areas, holes = [], [], [], []
    for n in range(levels.shape[0]):
        for thr in table[n]:
            mask = (levels[n] > thr).astype(np.uint8)
            contours, hierarchy = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
            counts.append(len(contours))
            for i, c in enumerate(contours):
                boxes.append(cv2.boundingRect(c))
                areas.append(cv2.contourArea(c))
                depth, parent = 0, hierarchy[0][i][3]
                while parent >= 0:
                    depth, parent = depth + 1, hierarchy[0][parent][3]
                holes.append(depth % 2 == 1)
    return (np.asarray(counts, np.int64), np.asarray(boxes, np.int64).reshape(-1, 4),
            np.asarray(areas, np.float64), np.asarray(holes, np.uint8))


def _all_contours(levels: Tensor, table: Tensor):
    kernel = _native.cpu_kernel("contour_boxes")
    n, height, width = levels.shape
    if kernel is not None:
        return kernel(levels.data_ptr(), table.data_ptr(), n, height, width, table.shape[1], torch.get_num_threads())
    _native.warn_fallback("boxes_from_cams", f"the C++ extension is not available ({_native.load_error('_C')})",
                          fallback="an OpenCV loop")
    return _contours_opencv(levels.numpy(), table.numpy())


# From this many distinct thresholds on, one component-tree pass per image (about 1.2 ms at 224²,
# almost independent of the count) beats border following per threshold (about 10 µs each); measured
# on the 2-core CI machine, see benchmarks/results/cpu_boxes.md.
TREE_MIN_LEVELS = 128


def _all_contours_once_per_level(levels: Tensor, table: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``_all_contours`` as tensors ``(counts [N*T], xywh [total, 4], areas [total], is_hole [total])``,
    tracing each distinct threshold once when the table repeats levels (as the protocol's does) and
    gathering every (image, threshold)'s run of contours back in place."""
    distinct, inverse = torch.unique(table, return_inverse=True)
    n, t = table.shape
    repeat = distinct.numel() < t
    traced = distinct.expand(n, -1).contiguous() if repeat else table
    counts, xywh, areas, holes = (torch.from_numpy(np.asarray(a)) for a in _all_contours(levels, traced))
    xywh = xywh.reshape(-1, 4).to(torch.int64)
    if not repeat:
        return counts.to(torch.int64), xywh, areas.double(), holes
    counts = counts.to(torch.int64)
    starts = torch.cumsum(counts, 0) - counts  # first contour of each traced (image, level)
    source = (torch.arange(n)[:, None] * distinct.numel() + inverse).flatten()  # traced job per (n, t)
    out_counts, out_starts = counts[source], starts[source]
    out_first = torch.cumsum(out_counts, 0) - out_counts
    index = torch.repeat_interleave(out_starts - out_first, out_counts) + torch.arange(int(out_counts.sum()))
    return out_counts, xywh[index], areas.double()[index], holes[index]


def _largest_xywh(levels: Tensor, table: Tensor) -> Tensor:
    """``int64 [N, T, 4]`` (x, y, w, h) of the largest contour per (image, threshold).

    Thresholds repeat in practice (the protocol's ``int(t·255)`` for 1,000 values of ``t`` has at most
    256 distinct levels), and equal thresholds give equal masks: each distinct level is traced once
    and the boxes are gathered back, which changes nothing in the result. With many distinct levels
    the native component trees (``csrc/cpu/component_tree.cpp``) read them all off one pass instead.
    """
    if table.shape[1] == 1:  # one threshold per image (PaS): nothing repeats
        return _largest_xywh_traced(levels, table)
    distinct, inverse = torch.unique(table, return_inverse=True)
    tree = _native.cpu_kernel("tree_largest_boxes")
    if distinct.numel() >= TREE_MIN_LEVELS and tree is not None:
        n, height, width = levels.shape
        out = torch.zeros((n, table.shape[1], 4), dtype=torch.int64)
        tree(levels.data_ptr(), table.data_ptr(), out.data_ptr(), n, height, width, table.shape[1],
             torch.get_num_threads())
        return out
    if distinct.numel() < table.shape[1]:
        per_level = _largest_xywh_traced(levels, distinct.expand(table.shape[0], -1).contiguous())
        return per_level.gather(1, inverse[:, :, None].expand(-1, -1, 4))
    return _largest_xywh_traced(levels, table)


def _largest_xywh_from_maps(cams: Tensor, table: Tensor, validate: bool) -> Tensor | None:
    """``int64 [N, 1, 4]`` for one threshold per CPU map, converting and tracing each map while it is
    in cache (and validating it in the same pass); None without the native kernel."""
    kernel = _native.cpu_kernel("map_largest_boxes")
    if kernel is None:
        return None
    n, height, width = cams.shape
    source = cams.contiguous()
    out = torch.zeros((n, 1, 4), dtype=torch.int64)
    bad = torch.zeros(n if validate else 0, dtype=torch.uint8)
    kernel(source.data_ptr(), _native.NATIVE_DTYPE_CODES[cams.dtype], table.data_ptr(), out.data_ptr(), n,
           height, width, 1, torch.get_num_threads(), bad.data_ptr() if bad.numel() else 0)
    check_flagged_maps("cams", cams, bad)
    return out


def _largest_xywh_traced(levels: Tensor, table: Tensor) -> Tensor:
    kernel = _native.cpu_kernel("contour_largest_boxes")
    n, height, width = levels.shape
    out = torch.zeros((n, table.shape[1], 4), dtype=torch.int64)
    if kernel is not None:
        if out.numel():
            kernel(levels.data_ptr(), table.data_ptr(), out.data_ptr(), n, height, width, table.shape[1],
                   torch.get_num_threads())
        return out
    counts, xywh, areas, _ = _all_contours(levels, table)
    start = 0
    for job, count in enumerate(counts.tolist()):
        if count:
            best = start + int(np.argmax(areas[start : start + count]))  # first maximum, like max()
            out.view(-1, 4)[job] = torch.from_numpy(xywh[best])
        start += count
    return out


def boxes_from_cams(
    cams: Tensor,
    thresholds: int | Tensor,
    mode: str = "largest",
    convention: str = "wsol",
    *,
    validate: bool = True,
) -> Tensor | RaggedBoxes:
    """Boxes of the thresholded CAMs, exact to OpenCV's ``findContours`` + ``boundingRect``.

    Args:
        cams: ``Tensor[N, H, W]`` in ``[0, 1]``, any float dtype and device (levels are ``uint8(255·x)``).
        thresholds: uint8 levels (foreground is ``level > threshold``): an int for every image,
            ``LongTensor[N]`` (one per image, e.g. :func:`percentile_threshold`) or ``LongTensor[N, T]``.
        mode: ``"largest"`` -> ``LongTensor[N, 4]`` (``[N, T, 4]`` for 2-D thresholds);
            ``"all"`` -> :class:`RaggedBoxes`.
        convention: ``"wsol"`` (the reference's ``[x, y, x+w, y+h]`` clipped to ``W-1, H-1``) or
            ``"exact"`` (inclusive pixel extents).
        validate: check that the maps are finite and inside ``[0, 1]`` (one device sync).
    Returns:
        Boxes ``(x0, y0, x1, y1)`` on ``cams``' device; ``[0, 0, 0, 0]`` where the mask is empty.
    Raises:
        TypeError / ValueError: bad ranks, dtypes, modes, conventions, thresholds outside 0..255, and
        (with ``validate``) maps with non-finite values or values outside ``[0, 1]``, naming the image.
    """
    check_cams_shape("cams", cams)
    check_float_dtype("cams", cams)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    validate = check_flag("validate", validate)
    n, height, width = cams.shape
    table, single = _thresholds_2d(thresholds, n)
    if mode == "largest" and gpu_boxes_enabled(cams):
        if validate:
            check_unit_maps("cams", cams)
        no_gt = torch.zeros((n, 4), dtype=torch.int64, device=cams.device)  # IoUs are not wanted here
        xywh = level_sweep(scaled_levels(cams, torch.uint8), table.to(cams.device), no_gt,
                          torch.arange(n + 1, device=cams.device), multi_contour=False)[1]
        boxes = _to_convention(xywh, height, width, convention)
        return boxes[:, 0] if single else boxes
    if mode == "largest" and table.shape[1] == 1 and cams.device.type == "cpu":
        xywh = _largest_xywh_from_maps(cams, table, validate)
        if xywh is not None:
            boxes = _to_convention(xywh, height, width, convention)
            return boxes[:, 0] if single else boxes
    # trunc(255·x) straight to uint8 (values are in [0, 1]), then to the host for the C++ kernel.
    levels = host_levels(cams, check="cams" if validate else None)  # CPU maps: validated in the same pass
    if mode == "largest":
        xywh = _largest_xywh(levels, table)
        boxes = _to_convention(xywh, height, width, convention)
        return (boxes[:, 0] if single else boxes).to(cams.device)
    counts, xywh, areas, holes = _all_contours_once_per_level(levels, table)
    flat_offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=flat_offsets[1:])
    t = table.shape[1]
    rows = torch.arange(n)[:, None] * t + torch.arange(t + 1)[None, :]
    return RaggedBoxes(
        boxes=_to_convention(xywh, height, width, convention).to(cams.device),
        offsets=flat_offsets[rows].to(cams.device),
        is_hole=holes.bool().to(cams.device),
        areas=areas.to(cams.device),
    )


def largest_boxes_from_levels(levels: Tensor, thresholds: Tensor, convention: str = "wsol") -> Tensor:
    """The largest-contour box per map from uint8 levels already on the host (``LongTensor[N, 4]``,
    CPU): :func:`boxes_from_cams` with one threshold per map, for callers that fetched the levels
    themselves (the video stream copies a batch's levels, labels and thresholds in one transfer).

    Args:
        levels: ``uint8 [N, H, W]`` CPU, ``trunc(255·x)`` of the maps; thresholds: ``LongTensor[N]`` CPU, 0..255.
    """
    if levels.dtype != torch.uint8 or levels.dim() != 3 or levels.device.type != "cpu":
        raise TypeError(f"levels must be a CPU uint8 tensor [N, H, W], got {levels.dtype} {tuple(levels.shape)} "
                        f"on {levels.device}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    table, _ = _thresholds_2d(thresholds, levels.shape[0])
    xywh = _largest_xywh(levels.contiguous(), table)
    return _to_convention(xywh, levels.shape[1], levels.shape[2], convention)[:, 0]


def pack_results(labels: Tensor, scores: Tensor, thresholds: Tensor, cams: Tensor) -> Tensor:
    """One ``uint8`` buffer on the maps' device: labels and PaS thresholds (int64 ``[B]`` each), scores
    (float32 ``[B]``), then the maps' uint8 levels ``trunc(255 x)`` (``[B, H, W]``): the 8-byte fields
    first, so that every field starts aligned to its size. What the host needs to cut the boxes of a
    batch, in one device-to-host copy (the video stream, :meth:`CAMEngine.graphed`); no host sync, so
    that it can be captured in a CUDA graph."""
    fields = (labels.to(torch.int64), thresholds.to(torch.int64), scores.float())
    raw = [field.contiguous().view(torch.uint8).reshape(-1) for field in fields]
    return torch.cat(raw + [scaled_levels(cams, torch.uint8).reshape(-1)])


def unpack_results(packed: Tensor, batch: int, height: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`pack_results` undone (views, no copies): ``(labels, scores, thresholds, levels)``."""
    if packed.numel() != 20 * batch + batch * height * width:
        raise ValueError(f"a packed batch of {batch} maps of {height}x{width} has {20 * batch + batch * height * width} "
                         f"bytes, got {packed.numel()}")
    labels = packed[: 8 * batch].view(torch.int64)
    thresholds = packed[8 * batch : 16 * batch].view(torch.int64)
    scores = packed[16 * batch : 20 * batch].view(torch.float32)
    levels = packed[20 * batch :].view(batch, height, width)
    return labels, scores, thresholds, levels


def packed_to_host(packed: Tensor, host: Tensor | None = None, done=None) -> tuple[Tensor, object | None]:
    """Start the copy of a :func:`pack_results` buffer to pinned host memory (``host``, else a new
    buffer), in the current stream's order: ``(host, done)``, ``done`` a CUDA event recorded after the
    copy (the given one, else a new one). Off CUDA: ``(the buffer on the CPU, None)``."""
    if packed.device.type != "cuda":
        return packed.cpu(), None
    if host is None:
        host = torch.empty(packed.numel(), dtype=torch.uint8, pin_memory=True)
    host.copy_(packed, non_blocking=True)
    done = torch.cuda.Event() if done is None else done
    done.record(torch.cuda.current_stream(packed.device))
    return host, done


def boxes_from_packed(host: Tensor, done, shape: tuple[int, int, int], convention: str
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Wait for :func:`packed_to_host`'s copy, then ``(labels, scores, thresholds, boxes [B, 4])`` on the
    host, the boxes cut from the packed levels of maps ``shape = (B, H, W)``."""
    if done is not None:
        done.synchronize()
    labels, scores, thresholds, levels = unpack_results(host, *shape)
    return labels, scores, thresholds, largest_boxes_from_levels(levels, thresholds, convention)


__all__ = ["CONVENTIONS", "MODES", "RaggedBoxes", "boxes_from_cams", "boxes_from_packed", "largest_boxes_from_levels",
           "pack_results", "packed_to_host", "unpack_results"]
