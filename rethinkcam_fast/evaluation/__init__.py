"""WSOL evaluation with the field's standard protocol (wsolevaluation; DESIGN.md §3).

* :class:`BoxEvaluator` — MaxBoxAcc per IoU threshold, MaxBoxAccV2, GT-known and Top-1 Loc.
* :class:`MaskEvaluator` — PxAP with ignore regions.
* :func:`load_metadata` / :func:`read_metadata` — the standard metadata layout.
* :func:`evaluate_scoremaps` — saved ``.npy`` score maps (``rethinkcam evaluate``), resumable, ``torchrun``-aware.
* :func:`evaluate_model` — straight from a model through :class:`~rethinkcam_fast.CAMEngine`, no files.

Evaluator state is a few int64 tensors on the maps' device: ``merge()``, ``state_dict()`` /
``load_state_dict()`` and ``all_reduce()`` combine shards into exactly the one-pass numbers.
"""

from __future__ import annotations

from .box_evaluator import BoxEvaluator, BoxMetrics
from .mask_evaluator import MaskEvaluator, MaskMetrics
from .metadata import DATASETS, MetadataError, WSOLMetadata, load_metadata, read_metadata
from .model import WSOLImageDataset, collate_wsol, evaluate_model
from .scoremaps import evaluate_scoremaps, load_scoremap, make_evaluator

__all__ = [
    "DATASETS",
    "BoxEvaluator",
    "BoxMetrics",
    "MaskEvaluator",
    "MaskMetrics",
    "MetadataError",
    "WSOLImageDataset",
    "WSOLMetadata",
    "collate_wsol",
    "evaluate_model",
    "evaluate_scoremaps",
    "load_metadata",
    "load_scoremap",
    "make_evaluator",
    "read_metadata",
]
