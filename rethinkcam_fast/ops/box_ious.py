"""Best box IoU per CAM threshold: the per-image core of the WSOL box metrics (DESIGN.md §3).

wsolevaluation's ``BoxEvaluator.accumulate`` does, for one score map and every CAM threshold ``t``::

    u8        = uint8(255 * cam)
    level     = int(t * u8.max())                       # protocol_thresholds()
    contours  = cv2.findContours(u8 > level, RETR_TREE, CHAIN_APPROX_SIMPLE)   # holes included
    boxes     = [boundingRect(c) as x, y, min(x+w, W-1), min(y+h, H-1)]         # "wsol" convention
                (only max(contours, key=contourArea) unless multi_contour; [[0, 0, 0, 0]] if none)
    best[t]   = max IoU over boxes x GT boxes           # box_iou_matrix(): inclusive "+1" areas

:func:`best_box_ious` returns ``best`` for a batch of maps. It never hands boxes to Python: the
native kernel (``csrc/cpu/component_tree.cpp``) builds each image's component trees once — the
foreground's 8-connected components as the threshold falls and the background's 4-connected holes
as it rises — and reads every requested level's contour boxes and contour areas off them. Without
the native extension the op falls back to :func:`best_box_ious_reference` (``boxes_from_cams`` per
threshold), which is also the test oracle.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .. import _native
from .._validation import (
    check_cams_shape,
    check_flag,
    check_float_dtype,
    check_integer_dtype,
    check_tensor,
    check_unit_maps,
    real_number,
)
from .boxes import _thresholds_2d, boxes_from_cams
from .level_sweep import gpu_boxes_enabled, level_sweep
from .percentile_threshold import host_levels, scaled_levels


def box_iou_matrix(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """wsolevaluation's ``calculate_multiple_iou``: ``DoubleTensor[A, B]``.

    Boxes are ``(x0, y0, x1, y1)`` with inclusive ends, so a box's area is
    ``(x1 - x0 + 1) * (y1 - y0 + 1)``; a pair whose union is not positive gets IoU 0. Integer areas,
    one float64 division: the same doubles as the reference's numpy arithmetic. Boxes are pixel
    indices: ``TypeError`` for floating boxes (rounding them here would hide a convention mismatch).
    """
    for name, boxes in (("boxes_a", boxes_a), ("boxes_b", boxes_b)):
        check_tensor(name, boxes, ndim=2)
        if boxes.shape[1] != 4:
            raise ValueError(f"{name} must have shape (K, 4), got {tuple(boxes.shape)}")
        check_integer_dtype(name, boxes, "integer pixel coordinates")
    a = boxes_a.to(torch.int64)[:, None, :]
    b = boxes_b.to(torch.int64)[None, :, :]
    inter_w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0]) + 1).clamp_min(0)
    inter_h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1]) + 1).clamp_min(0)
    inter = inter_w * inter_h
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - inter
    degenerate = union <= 0
    iou = inter.double() / torch.where(degenerate, torch.ones_like(union), union).double()
    return iou.masked_fill(degenerate, 0.0)


def check_cam_curve_interval(interval: object, name: str = "cam_curve_interval") -> float:
    """``interval`` as a float: a real number (numpy's too) in ``(0, 1)``, else ``TypeError`` /
    ``ValueError`` naming the argument (``name``)."""
    value = real_number(name, interval)
    if not (0.0 < value < 1.0):
        raise ValueError(f"{name} must lie in (0, 1), got {interval!r}")
    return value


def cam_curve_thresholds(interval: float) -> np.ndarray:
    """The protocol's CAM thresholds, ``np.arange(0, 1, interval)`` (float64, as the reference builds them)."""
    check_cam_curve_interval(interval, "interval")
    return np.arange(0, 1, interval)


def protocol_thresholds(cams: Tensor, cam_thresholds: Sequence[float] | np.ndarray | Tensor, *,
                        validate: bool = True) -> Tensor:
    """``LongTensor[N, T]``: the uint8 level ``int(t * max(u8))`` the reference thresholds at, per image.

    ``t`` times the image's maximum level is computed in float64 and truncated, exactly like
    ``int(threshold * np.max(scoremap_image))``.

    Args:
        cams: ``Tensor[N, H, W]`` in ``[0, 1]``.
        cam_thresholds: the ``T`` thresholds ``t`` in ``[0, 1)`` (e.g. :func:`cam_curve_thresholds`).
        validate: check that the maps are finite and in ``[0, 1]`` (``ValueError`` naming the image).
    """
    check_cams_shape("cams", cams)
    check_float_dtype("cams", cams)
    if check_flag("validate", validate):
        check_unit_maps("cams", cams)
    if not isinstance(cam_thresholds, Tensor):
        given = np.asarray(cam_thresholds)
        if given.size and given.dtype.kind not in "iuf":  # (float64 would parse strings such as "0.5")
            raise TypeError(f"cam_thresholds must be numbers, got an array of {given.dtype}")
    t = torch.as_tensor(np.asarray(cam_thresholds, dtype=np.float64) if not isinstance(cam_thresholds, Tensor)
                        else cam_thresholds.double(), device=cams.device)
    if t.dim() != 1:
        raise ValueError(f"cam_thresholds must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() and not bool(((t >= 0) & (t < 1)).all()):
        raise ValueError("cam_thresholds must lie in [0, 1)")
    if cams.shape[0] == 0 or cams[0].numel() == 0:
        return torch.zeros((cams.shape[0], t.numel()), dtype=torch.int64, device=cams.device)
    # trunc(255·x) never decreases as x grows, so the largest level is the level of the largest value.
    top = scaled_levels(cams.flatten(1).amax(dim=1), torch.int64).double()
    return (t[None, :] * top[:, None]).to(torch.int64)  # values >= 0: the cast truncates like int()


def _check_gt(gt_boxes: Tensor, gt_offsets: Tensor, n: int) -> tuple[Tensor, Tensor]:
    check_tensor("gt_boxes", gt_boxes, ndim=2)
    check_tensor("gt_offsets", gt_offsets, ndim=1)
    if gt_boxes.shape[1] != 4:
        raise ValueError(f"gt_boxes must have shape (G, 4), got {tuple(gt_boxes.shape)}")
    check_integer_dtype("gt_boxes", gt_boxes, "integer pixel coordinates")
    check_integer_dtype("gt_offsets", gt_offsets, "integer offsets")
    if gt_offsets.numel() != n + 1:
        raise ValueError(f"gt_offsets must have N + 1 = {n + 1} entries, got {gt_offsets.numel()}")
    boxes = gt_boxes.to(device="cpu", dtype=torch.int64).contiguous()
    offsets = gt_offsets.to(device="cpu", dtype=torch.int64).contiguous()
    counts = offsets[1:] - offsets[:-1]
    if int(offsets[0]) != 0 or int(offsets[-1]) != boxes.shape[0] or bool((counts < 0).any()):
        raise ValueError("gt_offsets must rise from 0 to len(gt_boxes)")
    if n and bool((counts == 0).any()):
        raise ValueError(f"image {int((counts == 0).nonzero()[0, 0])} has no ground-truth box")
    x0, y0, x1, y1 = boxes.unbind(1)
    problems = [(x1 < x0) | (y1 < y0), (x0 < 0) | (y0 < 0)]
    what = ["is inverted (x1 < x0 or y1 < y0)", "has negative coordinates"]
    for bad, text in zip(problems, what):
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            image = int(torch.searchsorted(offsets, torch.tensor(row), right=True)) - 1
            raise ValueError(f"ground-truth box {boxes[row].tolist()} of image {image} {text}")
    return boxes, offsets


def best_box_ious_reference(levels: Tensor, table: Tensor, gt_boxes: Tensor, gt_offsets: Tensor,
                            multi_contour: bool) -> Tensor:
    """Oracle and fallback: ``DoubleTensor[N, T]`` from :func:`boxes_from_cams` boxes, one image at a time.

    ``levels``: uint8 ``[N, H, W]`` on the CPU; ``table``: int64 ``[N, T]``.
    """
    n, t = table.shape
    out = torch.zeros((n, t), dtype=torch.float64)
    maps = levels.float() / 255  # exact inverse of trunc(255·x) on integer levels
    empty_box = torch.zeros((1, 4), dtype=torch.int64)
    for i in range(n):
        gt = gt_boxes[int(gt_offsets[i]) : int(gt_offsets[i + 1])]
        if multi_contour:
            ragged = boxes_from_cams(maps[i : i + 1], table[i : i + 1], mode="all", validate=False)
            for j in range(t):
                boxes = ragged.boxes_of(0, j)
                out[i, j] = box_iou_matrix(boxes if boxes.numel() else empty_box, gt).max()
        else:
            boxes = boxes_from_cams(maps[i : i + 1], table[i : i + 1], mode="largest", validate=False)[0]
            out[i] = box_iou_matrix(boxes, gt).amax(dim=1)  # an empty mask already gives [0, 0, 0, 0]
    return out


def best_box_ious(
    cams: Tensor,
    thresholds: int | Tensor,
    gt_boxes: Tensor,
    gt_offsets: Tensor,
    multi_contour: bool = True,
    *,
    validate: bool = True,
) -> Tensor:
    """Per image and threshold, the best IoU of the predicted contour boxes against the GT boxes.

    Args:
        cams: ``Tensor[N, H, W]`` in ``[0, 1]`` (levels are ``uint8(255·x)``), any float dtype/device.
        thresholds: uint8 levels (foreground is ``level > threshold``): an int, ``LongTensor[N]`` or
            ``LongTensor[N, T]`` (e.g. :func:`protocol_thresholds`).
        gt_boxes: ``LongTensor[G, 4]`` ``(x0, y0, x1, y1)`` inclusive, in the maps' pixel grid.
        gt_offsets: ``LongTensor[N + 1]``: image ``n``'s GT boxes are ``gt_boxes[offsets[n]:offsets[n+1]]``
            (at least one each).
        multi_contour: every contour box (holes included; MaxBoxAccV2) or only the largest contour's
            (MaxBoxAcc v1).
        validate: check that the maps are finite and inside ``[0, 1]`` (one device sync).
    Returns:
        ``DoubleTensor[N, T]`` (``[N]`` for 0-/1-D thresholds) on ``cams``' device; an empty mask
        scores its ``[0, 0, 0, 0]`` box, as in the reference.
    """
    check_cams_shape("cams", cams)
    check_float_dtype("cams", cams)
    check_flag("multi_contour", multi_contour)
    validate = check_flag("validate", validate)
    n = cams.shape[0]
    table, single = _thresholds_2d(thresholds, n)
    # Boxes reaching past the map grid are scored as they are, as the reference does: annotation
    # boxes a few pixels outside their image exist, and scaled they land outside the grid.
    gt, offsets = _check_gt(gt_boxes, gt_offsets, n)
    if gpu_boxes_enabled(cams):
        if validate:
            check_unit_maps("cams", cams)
        levels = scaled_levels(cams, torch.uint8)
        out = level_sweep(levels, table.to(cams.device), gt.to(cams.device), offsets.to(cams.device),
                         multi_contour)[0]
        return out[:, 0] if single else out
    levels = host_levels(cams, check="cams" if validate else None)  # CPU maps: validated in the same pass
    kernel = _native.cpu_kernel("threshold_box_ious")
    if kernel is not None:
        out = torch.zeros(table.shape, dtype=torch.float64)
        if out.numel():
            kernel(levels.data_ptr(), table.data_ptr(), n, cams.shape[1], cams.shape[2], table.shape[1],
                   gt.data_ptr(), offsets.data_ptr(), bool(multi_contour), out.data_ptr(), torch.get_num_threads())
    else:
        _native.warn_fallback("best_box_ious", f"the C++ extension is not available ({_native.load_error('_C')})",
                              fallback="boxes_from_cams per threshold")
        out = best_box_ious_reference(levels, table, gt, offsets, multi_contour)
    return (out[:, 0] if single else out).to(cams.device)


__all__ = ["best_box_ious", "best_box_ious_reference", "box_iou_matrix", "cam_curve_thresholds",
           "protocol_thresholds"]
