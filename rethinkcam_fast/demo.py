"""``rethinkcam demo``: the main job on real handwriting, CPU only, no downloads, in seconds.

Loads the model shipped inside the package (a VGG-GAP-style CNN trained with TAP on cluttered
digits), generates test canvases from digit instances it never saw in training (the same instance
split the model was trained with), runs the CAM engine with :data:`DEMO_METHOD` (NWC when it is
``"cam"``) and cuts boxes at :data:`DEMO_BOX_THRESHOLD` (``"pas"`` or ``"max"``), writes
``localizations.json`` (one object per image: ``label``, ``score``, ``box``, ...) and
``grid.png`` (heatmap, predicted box in green, ground-truth box in magenta), and prints the WSOL
metrics of the run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

import torch

from .datasets import ClutteredDigitsConfig, generate_split
from .engine import CAMEngine, CAMResult
from .imageio import overlay_tile
from .localize import (BOX_THRESHOLDS, LocalizationMetrics, fit_tile, localization_records, wsol_box_metrics,
                       write_outputs)
from .models import SHIPPED_WEIGHTS, load_checkpoint
from .ops.percentile_threshold import percentile_threshold

THRESHOLD_NAMES = {"max": "0.2 x max", "pas": "PaS (0.35 x p90)"}

# What the ablation favours on this benchmark (README, "Real data: cluttered digits").
DEMO_METHOD = "fullycam"
DEMO_BOX_THRESHOLD = "max"
DEFAULT_OUT = "rethinkcam_demo"


@dataclass
class DemoReport:
    """What the demo measured (``metrics.fixed_top1_loc``: Top-1 Loc at the fixed ``"max"`` and ``"pas"``
    thresholds, no search)."""

    metrics: LocalizationMetrics
    json_path: str
    grid_path: str
    seconds: float


def data_config_of(meta: dict, count: int) -> ClutteredDigitsConfig:
    """The training run's data config (same seed, hence the same instance split) with ``count`` test canvases."""
    data = dict(meta.get("data") or {})
    known = {k: data[k] for k in ("canvas_size", "clutter", "seed") if k in data}
    for key in ("digit_size", "fragment_size", "instance_fractions"):
        if key in data:
            known[key] = tuple(data[key])
    return replace(ClutteredDigitsConfig(**known), counts={"test": count})


def run_demo(out_dir: str = DEFAULT_OUT, count: int = 200, grid: int = 16, weights: str | None = None,
             method: str = DEMO_METHOD, box_threshold: str = DEMO_BOX_THRESHOLD, device: str = "cpu") -> DemoReport:
    """Localize ``count`` unseen test canvases with the shipped model; write JSON + PNG grid, print metrics."""
    start = time.perf_counter()
    weights = weights or SHIPPED_WEIGHTS
    model, meta = load_checkpoint(weights, device)
    config = data_config_of(meta, count)
    test = generate_split(config, "test")
    images = test.float_images().to(device)
    q, theta = BOX_THRESHOLDS[box_threshold]
    engine = CAMEngine(model, method, nwc=method == "cam", pas_q=q, pas_theta=theta, box_convention="exact",
                       warn_degenerate=False)
    with torch.no_grad():
        top1 = _in_batches(engine, images)  # the classes the model predicts: what a user gets
        # The metrics want the ground-truth class's maps: only misclassified images need another pass.
        truth_cams = top1.cams.clone()
        wrong = (top1.labels.cpu() != test.labels).nonzero()[:, 0]
        if len(wrong):
            truth_cams[wrong.to(device)] = _in_batches(engine, images[wrong.to(device)],
                                                       test.labels[wrong].to(device)).cams
    fixed = {name: percentile_threshold(truth_cams, *qt) for name, qt in BOX_THRESHOLDS.items()}
    metrics = wsol_box_metrics(truth_cams, test.boxes, test.labels, top1.labels, fixed_thresholds=fixed)
    records = localization_records(test.image_ids, top1, test.labels, test.boxes)
    scale = max(1, 192 // config.canvas_size)
    tiles = [fit_tile(overlay_tile(test.images[i, None], top1.cams[i].cpu(), top1.boxes[i].tolist(),
                                   test.boxes[i].tolist(), scale), 192)
             for i in range(min(grid, len(test)))]
    json_path, grid_path = write_outputs(out_dir, records, tiles)
    report = DemoReport(metrics, json_path, grid_path, time.perf_counter() - start)
    _print_report(report, weights, model.arch["pool"], meta, method, box_threshold, len(test))
    return report


DEMO_BATCH = 64  # canvases per engine call: the engine's memory grows with the batch, not with --count


def _in_batches(engine: CAMEngine, images: torch.Tensor, targets: torch.Tensor | None = None) -> CAMResult:
    """``engine(images, targets)``, DEMO_BATCH images a call."""
    return CAMResult.cat([engine(images[i : i + DEMO_BATCH], None if targets is None else targets[i : i + DEMO_BATCH])
                          for i in range(0, max(len(images), 1), DEMO_BATCH)])


def _print_report(report: DemoReport, weights: str, pool: str, meta: dict, method: str, box_threshold: str,
                  count: int) -> None:
    m = report.metrics
    val = meta.get("val_accuracy") or [float("nan")]
    print(f"rethinkcam demo: {os.path.basename(weights)} ({pool.upper()} model, val acc {val[-1]:.1f} %), {count} test "
          f"canvases of digits never seen in training; {method}{' + NWC' if method == 'cam' else ''}, "
          f"boxes at {THRESHOLD_NAMES[box_threshold]}")
    print(f"MaxBoxAcc {m.max_box_acc:.1f} %   MaxBoxAccV2 {m.max_box_acc_v2:.1f} %   Top-1 Loc {m.top1_loc:.1f} %   "
          f"Top-1 Cls {m.top1_cls:.1f} %   (best CAM threshold over the {m.num_images} images)")
    print("Top-1 Loc at a fixed threshold (no search): "
          + ", ".join(f"{THRESHOLD_NAMES[name]} {value:.1f} %" for name, value in m.fixed_top1_loc.items()))
    print(f"wrote {report.json_path} and {report.grid_path} in {report.seconds:.1f} s")


__all__ = ["DEFAULT_OUT", "DEMO_BOX_THRESHOLD", "DEMO_METHOD", "DemoReport", "data_config_of", "run_demo"]
