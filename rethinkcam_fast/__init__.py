"""rethinkcam_fast: fast class-activation maps and weakly supervised object localization for PyTorch.

Nothing here queries the GPU at import time, and a missing native extension only means the ops run
their pure-PyTorch reference (with a one-time warning); see :func:`has_native` and
:func:`has_cuda_kernels`.
"""

from __future__ import annotations

from ._native import has_cuda_kernels, has_native
from .engine import CAMEngine, CAMResult, GraphedCAM
from .folding import fold_batchnorm
from .modules import TAP, replace_gap_with_tap
from .ops.box_ious import best_box_ious, box_iou_matrix, cam_curve_thresholds, protocol_thresholds
from .ops.boxes import RaggedBoxes, boxes_from_cams
from .ops.class_activation_map import ClassActivationMapFunction, class_activation_map
from .ops.flm_fuse import FLMFuseFunction, flm_fuse
from .ops.fuse_maps import fuse_maps
from .ops.percentile_threshold import percentile_threshold
from .ops.weighted_map import weighted_map
from .ops.tap import TAPFunction, tap, tap_reference

__version__ = "0.1.0"

__all__ = [
    "CAMEngine",
    "CAMResult",
    "GraphedCAM",
    "ClassActivationMapFunction",
    "FLMFuseFunction",
    "RaggedBoxes",
    "TAP",
    "TAPFunction",
    "__version__",
    "best_box_ious",
    "box_iou_matrix",
    "boxes_from_cams",
    "cam_curve_thresholds",
    "class_activation_map",
    "flm_fuse",
    "fold_batchnorm",
    "has_cuda_kernels",
    "has_native",
    "fuse_maps",
    "percentile_threshold",
    "protocol_thresholds",
    "replace_gap_with_tap",
    "tap",
    "tap_reference",
    "weighted_map",
]
