"""Box metrics of the WSOL protocol (DESIGN.md §3): MaxBoxAcc per IoU threshold, MaxBoxAccV2,
GT-known Loc and Top-1 Loc — one best CAM threshold for the whole dataset.

Per image, for every CAM threshold ``t`` of ``np.arange(0, 1, interval)``, the map is cut at the uint8
level ``int(t * max(uint8(255 * map)))`` and the best IoU over (predicted contour boxes) x (GT boxes)
is compared with every ``δ / 100``: ``correct[δ, t] += best_iou[t] >= δ / 100``. MaxBoxAcc(δ) is
``max_t correct[δ, t] / N * 100``; MaxBoxAccV2 is its mean over δ (with every contour's box,
``multi_contour=True``). The per-image work is :func:`rethinkcam_fast.best_box_ious`; counting is a
tensor reduction on the maps' device.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._validation import check_flag
from ..ops.box_ious import best_box_ious, protocol_thresholds
from ._accumulator import CountingEvaluator, check_score_maps, describe_image
from .metadata import WSOLMetadata



@dataclass(frozen=True)
class BoxMetrics:
    """What :meth:`BoxEvaluator.compute` returns. Accuracies are percentages.

    Attributes:
        max_box_acc: ``{δ: MaxBoxAcc(δ)}``.
        max_box_acc_v2: the mean of ``max_box_acc`` over δ (MaxBoxAccV2 with ``multi_contour=True``
            and δ = 30, 50, 70).
        best_cam_threshold: ``{δ: t}``, the CAM threshold reaching ``max_box_acc[δ]`` (first if tied).
        num_images: images evaluated.
        multi_contour: every contour's box (True) or the largest contour's only (MaxBoxAcc v1).
        cam_curve_interval: spacing of the CAM thresholds.
        gt_known_loc, top1_loc: ``{δ: %}`` when labels and predictions were given: GT-known Loc
            (the maps being the ground-truth class's) is ``max_box_acc``; Top-1 Loc counts an image
            only if its top-1 prediction is also correct, maximised over one dataset-wide threshold.
        top1_cls: top-1 classification accuracy when labels and predictions were given.
        accuracy_curves: ``float64 [D, T]``, accuracy at every (δ, CAM threshold).
        resumed_images: of ``num_images``, those a resumed run took from its state file
            (:func:`~rethinkcam_fast.evaluation.evaluate_scoremaps` with ``resume=``), not evaluated again.
    """

    max_box_acc: dict[float, float]
    max_box_acc_v2: float
    best_cam_threshold: dict[float, float]
    num_images: int
    multi_contour: bool
    cam_curve_interval: float
    gt_known_loc: dict[float, float] | None = None
    top1_loc: dict[float, float] | None = None
    top1_cls: float | None = None
    accuracy_curves: np.ndarray | None = field(default=None, compare=False, repr=False)
    resumed_images: int = field(default=0, compare=False, repr=False)

    @property
    def is_v2(self) -> bool:
        """Whether ``max_box_acc_v2`` is MaxBoxAccV2: every contour, and δ = 30, 50, 70."""
        return self.multi_contour and sorted(self.max_box_acc) == [30.0, 50.0, 70.0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"MaxBoxAcc": {"30": ...}, "MaxBoxAccV2": ..., ...}`` (δ keys as strings); the mean
        over δ goes under ``"MaxBoxAccV2"`` only when it is that (:attr:`is_v2`), else under
        ``"mean_MaxBoxAcc"`` (MaxBoxAcc v1's largest contour, or other δ), so no script reads another
        metric under V2's name."""

        def keyed(values: dict[float, float]) -> dict[str, float]:
            return {f"{delta:g}": float(value) for delta, value in values.items()}

        out: dict[str, Any] = {
            "MaxBoxAcc": keyed(self.max_box_acc),
            ("MaxBoxAccV2" if self.is_v2 else "mean_MaxBoxAcc"): float(self.max_box_acc_v2),
            "best_cam_threshold": keyed(self.best_cam_threshold),
            "num_images": self.num_images,
            "multi_contour": self.multi_contour,
            "cam_curve_interval": self.cam_curve_interval,
        }
        if self.top1_loc is not None:
            out["GT-known Loc"] = keyed(self.gt_known_loc)
            out["Top-1 Loc"] = keyed(self.top1_loc)
            out["Top-1 Cls"] = float(self.top1_cls)
        return out


def _check_iou_thresholds(values: Sequence[float]) -> tuple[float, ...]:
    values = tuple(values)
    if not values:
        raise ValueError("iou_thresholds is empty")
    for value in values:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real) or not 0 <= value <= 100:
            raise ValueError(f"IoU thresholds are percentages in [0, 100], got {value!r}")
        if 0 < value < 1:  # a fraction where a percentage was meant (as the CLI refuses it)
            raise ValueError(f"IoU thresholds are percentages: {value!r} looks like a fraction (IoU >= "
                             f"{value / 100:g}); give {value * 100:g} for IoU >= {value:g}")
    if len(set(values)) != len(values):
        raise ValueError(f"IoU thresholds repeat: {values}")
    return values


def _image_boxes(boxes, index: int) -> Tensor:
    """One image's GT boxes as ``[k, 4]``: given as ``[k, 4]`` (rows ``x0, y0, x1, y1``), or one box as
    ``[4]``. Anything else is refused rather than reshaped (``[4, k]`` columns would be read as boxes)."""
    boxes = torch.as_tensor(boxes)
    if boxes.dim() == 1 and boxes.shape[0] == 4:
        return boxes[None]
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"gt_boxes[{index}]: an image's GT boxes are [k, 4] (rows x0, y0, x1, y1) or one box [4], got "
                         f"shape {tuple(boxes.shape)}")
    return boxes


def _ragged_boxes(gt_boxes: Tensor | Sequence[Tensor], gt_offsets: Tensor | None, n: int) -> tuple[Tensor, Tensor]:
    """``(LongTensor[G, 4], LongTensor[N + 1])`` on the CPU from either form of ragged GT boxes."""
    if isinstance(gt_boxes, Tensor):
        if gt_offsets is None:
            raise ValueError("gt_boxes as one LongTensor[G, 4] needs gt_offsets (LongTensor[N + 1])")
        return gt_boxes, gt_offsets
    if gt_offsets is not None:
        raise ValueError("gt_offsets goes with gt_boxes as one tensor, not with a list of per-image boxes")
    boxes = [_image_boxes(b, k) for k, b in enumerate(gt_boxes)]
    if len(boxes) != n:
        raise ValueError(f"got GT boxes for {len(boxes)} images and {n} maps")
    counts = torch.tensor([len(b) for b in boxes], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    flat = torch.cat([b.cpu() for b in boxes]) if boxes else torch.zeros((0, 4), dtype=torch.int64)
    return flat, offsets


class BoxEvaluator(CountingEvaluator):
    """MaxBoxAcc / MaxBoxAccV2 (and GT-known / Top-1 Loc) accumulated over batches of score maps.

    Args:
        cam_curve_interval: CAM thresholds are ``np.arange(0, 1, cam_curve_interval)`` (the reference's
            default is 0.001, 1,000 thresholds).
        iou_thresholds: the δ, in percent (default 30, 50, 70).
        multi_contour: every contour's box counts (MaxBoxAccV2's setting, default) or only the largest
            contour's (MaxBoxAcc v1).
        metadata: lets :meth:`update` take ``image_ids`` instead of boxes (boxes scaled to the maps' size).
        device: where the counters start; they follow the maps given to :meth:`update`.

    Usage::

        evaluator = BoxEvaluator(cam_curve_interval=0.001)
        for maps, boxes in loader:                # maps: Tensor[N, H, W] in [0, 1]
            evaluator.update(maps, boxes)        # boxes: N tensors [k_i, 4] in the maps' pixel grid
        metrics = evaluator.compute()             # metrics.max_box_acc[50], metrics.max_box_acc_v2
    """

    def __init__(self, cam_curve_interval: float = 0.001, iou_thresholds: Sequence[float] = (30, 50, 70),
                 multi_contour: bool = True, *, metadata: WSOLMetadata | None = None,
                 device: torch.device | str | None = None) -> None:
        self.iou_thresholds = _check_iou_thresholds(iou_thresholds)
        self.multi_contour = check_flag("multi_contour", multi_contour)
        if metadata is not None and metadata.boxes is None:
            raise ValueError("BoxEvaluator needs box metadata (localization 'boxes'); masks go to MaskEvaluator")
        self.metadata = metadata
        super().__init__(cam_curve_interval, device)

    def _config(self) -> dict[str, Any]:
        return {"cam_curve_interval": self.cam_curve_interval, "iou_thresholds": list(self.iou_thresholds),
                "multi_contour": self.multi_contour}

    def _zero_state(self, device: torch.device) -> dict[str, Tensor]:
        counts = (len(self.iou_thresholds), len(self.cam_thresholds))
        return {
            "num_images": torch.zeros((), dtype=torch.int64, device=device),
            "correct": torch.zeros(counts, dtype=torch.int64, device=device),
            # Images that came with labels and predictions, and their Top-1 counters.
            "num_classified": torch.zeros((), dtype=torch.int64, device=device),
            "num_top1_correct": torch.zeros((), dtype=torch.int64, device=device),
            "correct_top1": torch.zeros(counts, dtype=torch.int64, device=device),
        }

    def load_targets(self, image_ids: Sequence[str], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """GT boxes of ``image_ids`` from the metadata scaled to ``size = (H, W)``: ``(LongTensor[G, 4], LongTensor[N + 1])``."""
        if self.metadata is None:
            raise ValueError("this BoxEvaluator has no metadata to look boxes up in")
        return self.metadata.resized_boxes(image_ids, size)

    def update(self, maps: Tensor, gt_boxes: Tensor | Sequence[Tensor] | None = None,
               gt_offsets: Tensor | None = None, *, image_ids: Sequence[str] | None = None,
               labels: Tensor | None = None, predictions: Tensor | None = None) -> None:
        """Accumulate a batch.

        Args:
            maps: ``Tensor[N, H, W]`` score maps in ``[0, 1]`` (any float dtype, any device).
            gt_boxes: GT boxes ``(x0, y0, x1, y1)`` inclusive, in the maps' ``H x W`` grid: a
                ``LongTensor[G, 4]`` with ``gt_offsets`` ``LongTensor[N + 1]`` (image ``n`` owns rows
                ``offsets[n]:offsets[n + 1]``), or a list of ``N`` tensors ``[k_n, 4]``. Omit it to take
                the boxes of ``image_ids`` from the evaluator's metadata, scaled to ``H x W``.
            image_ids: the maps' image ids (also used to name an image in errors).
            labels, predictions: ``LongTensor[N]`` ground-truth classes and top-1 predictions, together,
                for Top-1 Loc.

        Nothing is counted unless the whole batch is valid (maps finite and in ``[0, 1]``, boxes
        non-negative with ``x0 <= x1``, ``y0 <= y1``, at least one per image).
        """
        check_score_maps(maps, image_ids)
        n, height, width = maps.shape
        if gt_boxes is None:
            if image_ids is None:
                raise ValueError("update() needs gt_boxes, or image_ids and an evaluator built with metadata=")
            gt_boxes, gt_offsets = self.load_targets(image_ids, (height, width))
        boxes, offsets = _ragged_boxes(gt_boxes, gt_offsets, n)
        known = self.metadata.boxes_past_image if self.metadata is not None else frozenset()
        self._check_boxes(boxes, offsets, n, image_ids, (height, width), known)
        top1 = self._top1(labels, predictions, n)
        if n == 0:
            return
        device = maps.device
        self.to(device)
        # The reference takes uint8(255 * x) of float64 maps. The levels computed from float32 maps are
        # the same: the float32 product 255 * x never rounds across an integer (half types: exact).
        table = protocol_thresholds(maps, self.cam_thresholds, validate=False)  # [N, T] uint8 levels (checked above)
        # (best_box_ious scores each distinct level of an image once, however many thresholds map to it)
        ious = best_box_ious(maps, table, boxes, offsets, self.multi_contour, validate=False)
        # delta / 100 in Python float64, as the reference's `_THRESHOLD / 100`.
        cuts = torch.tensor([delta / 100 for delta in self.iou_thresholds], dtype=torch.float64, device=device)
        hits = ious[None, :, :] >= cuts[:, None, None]  # [D, N, T]
        state = self._state
        state["correct"] += hits.sum(dim=1)
        state["num_images"] += n
        if top1 is not None:
            top1 = top1.to(device)
            state["correct_top1"] += (hits & top1[None, :, None]).sum(dim=1)
            state["num_classified"] += n
            state["num_top1_correct"] += top1.sum()

    @staticmethod
    def _check_boxes(boxes: Tensor, offsets: Tensor, n: int, image_ids: Sequence[str] | None,
                     grid: tuple[int, int], known_past: frozenset[str] = frozenset()) -> None:
        if boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.is_floating_point():
            raise ValueError(f"GT boxes must be an integer tensor [G, 4], got {boxes.dtype} {tuple(boxes.shape)}")
        offsets = offsets.cpu().to(torch.int64)
        if offsets.shape != (n + 1,) or int(offsets[0]) != 0 or int(offsets[-1]) != boxes.shape[0]:
            raise ValueError(f"gt_offsets must have {n + 1} entries rising from 0 to {boxes.shape[0]}")
        counts = offsets[1:] - offsets[:-1]
        if bool((counts < 0).any()):
            raise ValueError("gt_offsets must not decrease")
        boxes = boxes.cpu()
        bad_box = (boxes < 0).any(dim=1) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        owner = torch.repeat_interleave(torch.arange(n), counts)
        if bool(bad_box.any()):
            row = int(bad_box.nonzero()[0, 0])
            raise ValueError(f"GT box {boxes[row].tolist()} of {describe_image(image_ids, int(owner[row]))} is not "
                             "(x0, y0, x1, y1) with 0 <= x0 <= x1 and 0 <= y0 <= y1")
        if bool((counts == 0).any()):
            raise ValueError(f"{describe_image(image_ids, int((counts == 0).nonzero()[0, 0]))} has no GT box")
        height, width = grid
        # Boxes in another coordinate system (the original image's pixels) would score 0 % silently.
        outside = (boxes[:, 0] >= width) | (boxes[:, 1] >= height)
        if bool(outside.any()):
            row = int(outside.nonzero()[0, 0])
            raise ValueError(f"GT box {boxes[row].tolist()} of {describe_image(image_ids, int(owner[row]))} lies "
                             f"outside the maps' {height}x{width} grid: boxes are in the maps' pixels (scale them "
                             "from the image's)")
        past = (boxes[:, 2] > width) | (boxes[:, 3] > height)  # (x1 == W: a scaled box at the edge)
        if bool(past.any()) and known_past and image_ids is not None:  # (the metadata named their lines)
            past &= torch.tensor([image_ids[i] not in known_past for i in owner.tolist()], device=past.device)
        if bool(past.any()):
            row = int(past.nonzero()[0, 0])
            warnings.warn(f"GT box {boxes[row].tolist()} of {describe_image(image_ids, int(owner[row]))} reaches past "
                          f"the maps' {height}x{width} grid: are the boxes in the maps' pixels?", RuntimeWarning,
                          stacklevel=3)

    @staticmethod
    def _top1(labels: Tensor | None, predictions: Tensor | None, n: int) -> Tensor | None:
        if labels is None and predictions is None:
            return None
        if labels is None or predictions is None:
            raise ValueError("Top-1 Loc needs both labels and predictions")
        for name, value in (("labels", labels), ("predictions", predictions)):
            if not isinstance(value, Tensor) or value.shape != (n,) or value.is_floating_point():
                raise ValueError(f"{name} must be an integer tensor of shape ({n},)")
        return labels.to(predictions.device) == predictions

    def compute(self) -> BoxMetrics:
        """The metrics over everything accumulated (host sync). ``ValueError`` if nothing was.

        Top-1 figures are included when every image came with labels and predictions.
        """
        total = self._require_images()
        state = {name: value.cpu().numpy() for name, value in self._state.items()}
        # float64 count * 100. / N, as the reference (exact-integer counts in float64).
        curves = state["correct"].astype(np.float64) * 100.0 / float(total)
        best = curves.argmax(axis=1)
        max_box_acc = {delta: float(curves[d, best[d]]) for d, delta in enumerate(self.iou_thresholds)}
        thresholds = {delta: float(self.cam_thresholds[best[d]]) for d, delta in enumerate(self.iou_thresholds)}
        v2 = float(np.mean(np.array(list(max_box_acc.values()), dtype=np.float64)))  # np.average in the reference
        classified = int(state["num_classified"])
        gt_known = top1_loc = top1_cls = None
        if classified and classified != total:  # the box metrics stand; Top-1 over part of the data would not
            warnings.warn(f"labels and predictions were given for {classified} of {total} images: Top-1 Loc "
                          "and GT-known Loc need them for every image and are left out", RuntimeWarning, stacklevel=2)
        elif classified:
            top1_curves = state["correct_top1"].astype(np.float64) * 100.0 / float(total)
            gt_known = dict(max_box_acc)
            top1_loc = {delta: float(top1_curves[d].max()) for d, delta in enumerate(self.iou_thresholds)}
            top1_cls = float(state["num_top1_correct"]) * 100.0 / float(total)
        return BoxMetrics(max_box_acc, v2, thresholds, total, self.multi_contour, self.cam_curve_interval,
                          gt_known, top1_loc, top1_cls, curves)


__all__ = ["BoxEvaluator", "BoxMetrics"]
