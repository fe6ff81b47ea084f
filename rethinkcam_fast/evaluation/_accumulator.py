"""What the evaluators share: integer counters as tensors, mergeable, serialisable, all-reducible.

An evaluator's whole state is a few int64 tensors (counts per IoU threshold x CAM threshold, or
histogram bins) plus its configuration. Sums of integer counts are exact in any order, so merging
shards — by :meth:`merge`, from saved :meth:`state_dict` files or by :meth:`all_reduce` over
``torch.distributed`` ranks — gives exactly the numbers of one pass over the whole dataset.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._validation import check_cams_shape, check_float_dtype, first_bad_unit_map
from ..ops.box_ious import cam_curve_thresholds, check_cam_curve_interval


class CountingEvaluator:
    """Base class: subclasses define :meth:`_config` and :meth:`_zero_state` and add to ``self._state``."""

    def __init__(self, cam_curve_interval: float, device: torch.device | str | None) -> None:
        self.cam_curve_interval = check_cam_curve_interval(cam_curve_interval)  # (a float: numpy scalars too)
        self.cam_thresholds: np.ndarray = cam_curve_thresholds(self.cam_curve_interval)
        self._state: dict[str, Tensor] = self._zero_state(torch.device(device or "cpu"))

    # -- to be defined by subclasses --------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        raise NotImplementedError

    def _zero_state(self, device: torch.device) -> dict[str, Tensor]:
        raise NotImplementedError

    # -- shared machinery --------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._state["num_images"].device

    @property
    def num_images(self) -> int:
        """Images accumulated so far (one host sync)."""
        return int(self._state["num_images"])

    def to(self, device: torch.device | str) -> CountingEvaluator:
        """Move the counters to ``device`` (in place); returns ``self``."""
        self._state = {name: value.to(device) for name, value in self._state.items()}
        return self

    def reset(self) -> None:
        """Forget everything accumulated (the configuration stays)."""
        self._state = self._zero_state(self.device)

    def clone(self) -> CountingEvaluator:
        """An independent copy (counters copied)."""
        twin = copy.copy(self)
        twin._state = {name: value.clone() for name, value in self._state.items()}
        return twin

    def _check_compatible(self, config: dict[str, Any], source: str) -> None:
        mine = self._config()
        if config != mine:
            raise ValueError(f"{source} was accumulated with a different configuration: {config} != {mine}")

    def merge(self, other: CountingEvaluator) -> CountingEvaluator:
        """Add ``other``'s counts to this evaluator (same class and configuration); returns ``self``."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        self._check_compatible(other._config(), "the merged evaluator")
        for name, value in other._state.items():
            self._state[name] += value.to(self.device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """``{"kind", "config", "state": {name: LongTensor}}`` — loadable with ``torch.load(weights_only=True)``."""
        return {"kind": type(self).__name__, "config": self._config(),
                "state": {name: value.clone() for name, value in self._state.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replace the counters with saved ones (same class and configuration), on this evaluator's device."""
        if not isinstance(state_dict, dict) or state_dict.get("kind") != type(self).__name__:
            kind = state_dict.get("kind") if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"not a {type(self).__name__} state (kind {kind!r})")
        self._check_compatible(state_dict.get("config"), "the saved state")
        saved = state_dict.get("state", {})
        expected = self._zero_state(self.device)
        if set(saved) != set(expected):
            raise ValueError(f"saved state has counters {sorted(saved)}, expected {sorted(expected)}")
        for name, zero in expected.items():
            value = saved[name]
            if not isinstance(value, Tensor) or value.shape != zero.shape or value.dtype != zero.dtype:
                raise ValueError(f"saved counter {name!r} does not match: expected {zero.dtype} {tuple(zero.shape)}")
        self._state = {name: saved[name].to(self.device).clone() for name in expected}

    def all_reduce(self, group: Any = None) -> CountingEvaluator:
        """Sum the counters over every rank of ``group`` (in place): afterwards each rank holds the
        global counts, so :meth:`compute` gives the one-process result. Every rank must call it.

        The counters must live where the backend expects them (CPU for gloo, the rank's GPU for
        NCCL). Configurations are compared first (a hash, reduced with MIN and MAX), so ranks
        configured differently raise instead of summing unrelated counters.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("all_reduce needs an initialised torch.distributed process group")
        digest = hashlib.sha1(json.dumps(self._config(), sort_keys=True).encode()).digest()
        fingerprint = int.from_bytes(digest[:7], "little")
        bounds = torch.tensor([fingerprint, -fingerprint], dtype=torch.int64, device=self.device)
        dist.all_reduce(bounds, op=dist.ReduceOp.MIN, group=group)
        if int(bounds[0]) != -int(bounds[1]):
            raise ValueError("all_reduce: the ranks' evaluators are configured differently")
        names = sorted(self._state)
        flat = torch.cat([self._state[name].flatten() for name in names])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for name, piece in zip(names, flat.split([self._state[name].numel() for name in names])):
            self._state[name] = piece.view_as(self._state[name]).clone()
        return self

    def _require_images(self) -> int:
        count = self.num_images
        if count == 0:
            raise ValueError(f"{type(self).__name__}.compute(): no images were accumulated (empty dataset?)")
        return count


def describe_image(image_ids: Sequence[str] | None, index: int) -> str:
    """How an error names the ``index``-th map of a batch: its image id when known."""
    if image_ids is not None:
        return f"image {image_ids[index]!r}"
    return f"maps[{index}]"


def check_score_maps(maps: Tensor, image_ids: Sequence[str] | None) -> None:
    """Score maps ``Tensor[N, H, W]``, finite and in ``[0, 1]``; ``ValueError`` naming the first bad image."""
    check_cams_shape("maps", maps)
    check_float_dtype("maps", maps)
    if image_ids is not None and len(image_ids) != maps.shape[0]:
        raise ValueError(f"got {len(image_ids)} image ids for {maps.shape[0]} maps")
    found = first_bad_unit_map(maps)  # one pass, one host sync per batch
    if found is not None:
        index, problem = found
        raise ValueError(f"score map of {describe_image(image_ids, index)} has {problem}")


__all__ = ["CountingEvaluator", "check_score_maps", "describe_image"]
