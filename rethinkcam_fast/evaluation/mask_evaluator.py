"""PxAP (pixel average precision, DESIGN.md §3): score histograms over GT foreground and background pixels.

Bins are ``[t_0, t_1), ..., [t_{T-1}, 1), [1, 2), [2, 3]`` with ``t = np.arange(0, 1, interval)``
(``np.histogram``'s rule, comparisons in float64), ignore pixels excluded. Precision and recall at
every cut ``score >= edge`` come from the reversed cumulative sums; PxAP is
``100 * Σ_i P[i] * (R[i] - R[i-1])`` over the cuts with at least one positive prediction. The
histogram is one native pass per batch for CPU maps (``csrc/cpu/pixel_histogram.cpp``), one
``scatter_add`` on the maps' device otherwise; both count exactly the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import _native
from ._accumulator import CountingEvaluator, check_score_maps
from .masks import load_masks, resolve_mask_root
from .metadata import WSOLMetadata


@dataclass(frozen=True)
class MaskMetrics:
    """What :meth:`MaskEvaluator.compute` returns.

    Attributes:
        pxap: pixel average precision, in percent.
        num_images: images evaluated.
        cam_curve_interval: spacing of the score thresholds.
        precision, recall: ``float64 [T + 2]`` at the cuts ``score >= edge``, highest edge first
            (precision is NaN where no pixel is predicted positive).
        resumed_images: of ``num_images``, those a resumed run took from its state file.
    """

    pxap: float
    num_images: int
    cam_curve_interval: float
    precision: np.ndarray = field(compare=False, repr=False)
    recall: np.ndarray = field(compare=False, repr=False)
    resumed_images: int = field(default=0, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"PxAP": ..., "num_images": ..., "cam_curve_interval": ...}``."""
        return {"PxAP": float(self.pxap), "num_images": self.num_images, "cam_curve_interval": self.cam_curve_interval}


class MaskEvaluator(CountingEvaluator):
    """PxAP accumulated over batches of score maps and GT masks.

    Args:
        cam_curve_interval: histogram bin width (the reference's default: 0.001).
        metadata, mask_root: let :meth:`update` take ``image_ids`` instead of masks (mask metadata;
            the PNG paths are relative to ``mask_root`` or ``<mask_root>/OpenImages``).
        device: where the counters start; they follow the maps given to :meth:`update`.
    """

    def __init__(self, cam_curve_interval: float = 0.001, *, metadata: WSOLMetadata | None = None,
                 mask_root: str | None = None, device: torch.device | str | None = None) -> None:
        if metadata is not None and metadata.mask_paths is None:
            raise ValueError("MaskEvaluator needs mask metadata (localization 'masks'); boxes go to BoxEvaluator")
        if metadata is not None and mask_root is None:
            raise ValueError("MaskEvaluator with metadata= needs mask_root=")
        self.metadata = metadata
        self.mask_root = resolve_mask_root(mask_root) if mask_root is not None else None
        super().__init__(cam_curve_interval, device)
        edges = np.concatenate([self.cam_thresholds, [1.0, 2.0, 3.0]])
        self._edges = torch.from_numpy(edges)  # float64, as np.histogram compares
        # np.arange fills t_i = i * interval: then x / interval is within one bin of the answer.
        count = len(self.cam_thresholds)
        self._arithmetic_bins = np.array_equal(self.cam_thresholds, np.arange(count, dtype=np.float64) * self.cam_curve_interval)

    @property
    def num_bins(self) -> int:
        return len(self.cam_thresholds) + 2

    def _config(self) -> dict[str, Any]:
        return {"cam_curve_interval": self.cam_curve_interval}

    def _zero_state(self, device: torch.device) -> dict[str, Tensor]:
        return {
            "num_images": torch.zeros((), dtype=torch.int64, device=device),
            # row 0: background pixels, row 1: foreground pixels, per score bin
            "histogram": torch.zeros((2, len(self.cam_thresholds) + 2), dtype=torch.int64, device=device),
        }

    def load_targets(self, image_ids: Sequence[str], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Foreground and ignore masks ``BoolTensor[N, H, W]`` of ``image_ids`` from the metadata."""
        if self.metadata is None:
            raise ValueError("this MaskEvaluator has no metadata to look masks up in")
        return load_masks(self.metadata, image_ids, self.mask_root, size)

    def update(self, maps: Tensor, foreground: Tensor | None = None, ignore: Tensor | None = None, *,
               image_ids: Sequence[str] | None = None) -> None:
        """Accumulate a batch.

        Args:
            maps: ``Tensor[N, H, W]`` in ``[0, 1]``, any float dtype and device.
            foreground: ``BoolTensor[N, H, W]`` GT foreground; omitted, the masks of ``image_ids`` are
                read through the metadata at ``H x W``.
            ignore: ``BoolTensor[N, H, W]`` pixels left out (foreground pixels are never ignored).
            image_ids: the maps' image ids (also used to name an image in errors).
        """
        check_score_maps(maps, image_ids)
        if foreground is None:
            if image_ids is None:
                raise ValueError("update() needs foreground masks, or image_ids and an evaluator built with metadata=")
            foreground, ignore = self.load_targets(image_ids, tuple(maps.shape[1:]))
        for name, mask in (("foreground", foreground), ("ignore", ignore)):
            if mask is not None and (not isinstance(mask, Tensor) or mask.shape != maps.shape or mask.dtype != torch.bool):
                got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(f"{name} must be a BoolTensor of the maps' shape {tuple(maps.shape)}, got {got}")
        if maps.shape[0] == 0:
            return
        device = maps.device
        self.to(device)
        if device.type == "cpu" and self._native_update(maps, foreground, ignore):
            return
        bins = self._bins(maps.double())
        row = foreground.to(device).long()
        if ignore is not None:
            row = torch.where(ignore.to(device) & ~foreground.to(device), 2, row)  # row 2: discarded
        slots = (row * self.num_bins + bins).flatten()
        counts = torch.zeros(3 * self.num_bins, dtype=torch.int64, device=device)
        counts.scatter_add_(0, slots, torch.ones(1, dtype=torch.int64, device=device).expand_as(slots))
        self._state["histogram"] += counts[: 2 * self.num_bins].view(2, self.num_bins)
        self._state["num_images"] += maps.shape[0]

    def _native_update(self, maps: Tensor, foreground: Tensor, ignore: Tensor | None) -> bool:
        """The same counts from the C++ kernel (one pass, parallel; no float64 copy of the maps, no
        bin-index tensor); False when the extension is missing."""
        kernel = _native.cpu_kernel("pixel_histogram")
        if kernel is None:
            return False
        maps, foreground = maps.contiguous(), foreground.contiguous()
        ignore = ignore.contiguous() if ignore is not None else None
        counts = torch.zeros((2, self.num_bins), dtype=torch.int64)
        interval = self.cam_curve_interval if self._arithmetic_bins else 0.0
        kernel(maps.data_ptr(), _native.NATIVE_DTYPE_CODES[maps.dtype], maps.numel(), foreground.data_ptr(),
               ignore.data_ptr() if ignore is not None else 0, self._edges.data_ptr(), self.num_bins,
               float(interval), counts.data_ptr(), torch.get_num_threads())
        self._state["histogram"] += counts
        self._state["num_images"] += maps.shape[0]
        return True

    def _bins(self, values: Tensor) -> Tensor:
        """``i`` with ``edge[i] <= x < edge[i + 1]`` for float64 ``x`` in ``[0, 1]``, compared exactly.

        With ``t_i = fl(i * interval)`` the guess ``floor(fl(x / interval))`` is ``k - 1``, ``k`` or
        ``k + 1`` for the true bin ``k`` (both roundings are relative errors of at most 2^-53), so one
        exact comparison on each side settles it — cheaper than a binary search over ``T`` edges.
        """
        edges = self._edges.to(values.device)
        if not self._arithmetic_bins:
            return torch.bucketize(values, edges, right=True) - 1
        guess = (values / self.cam_curve_interval).floor_().long().clamp_(0, len(self.cam_thresholds))
        guess -= (edges.take(guess) > values).long()
        guess += (edges.take(guess + 1) <= values).long()
        return guess

    def compute(self) -> MaskMetrics:
        """PxAP over everything accumulated (host sync). ``ValueError`` if nothing was, if there is no
        foreground pixel, or no pixel at all outside the ignore regions."""
        total = self._require_images()
        background, foreground = self._state["histogram"].cpu().numpy().astype(np.float64)
        # Cuts from the highest edge down: true/false positives are the reversed running sums.
        true_pos = np.cumsum(foreground[::-1])
        false_pos = np.cumsum(background[::-1])
        positives = foreground.sum()
        if positives <= 0:
            raise ValueError("PxAP: no ground-truth foreground pixel in the evaluated set")
        predicted = true_pos + false_pos
        if not (predicted > 0).any():
            raise ValueError("PxAP: every pixel lies in an ignore region")
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = true_pos / predicted
        recall = true_pos / positives  # tp / (tp + fn): exact integers in float64
        defined = predicted[1:] != 0
        steps = precision[1:] * np.diff(recall)
        pxap = float(steps[defined].sum()) * 100  # numpy's pairwise sum, as the reference's
        return MaskMetrics(pxap, total, self.cam_curve_interval, precision, recall)


__all__ = ["MaskEvaluator", "MaskMetrics"]
