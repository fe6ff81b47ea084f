"""Largest-contour boxes per image vs the reference's OpenCV loop, for 1, 100, 256 and 1,000 thresholds.

The baseline is the per-threshold loop of the reference (``findContours`` + ``max(contourArea)`` +
``boundingRect``) on one core; ours is ``boxes_from_cams(..., mode="largest")`` with one thread
(``torch.set_num_threads(1)``) so the ratio compares the same core, and again with every thread.
Times are per image (one 224x224 smooth map; a batch of 8 for ours, divided by 8).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _common import bench_device, device_name

from rethinkcam_fast import boxes_from_cams

cv2 = pytest.importorskip("cv2")
RUN_INFO = {"device": device_name(torch.device("cpu")), "torch": torch.__version__}
BATCH = 8


def _smooth_maps(n: int) -> torch.Tensor:
    low = torch.rand((n, 1, 7, 7), generator=torch.Generator().manual_seed(0))
    up = torch.nn.functional.interpolate(low, size=(224, 224), mode="bicubic", align_corners=False)[:, 0]
    lo, hi = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
    return ((up - lo) / (hi - lo)).clamp(0, 1)


def _thresholds(count: int) -> torch.Tensor:
    # The evaluation protocol's thresholds int(t * 255) for t in arange(0, 1, 1/count).
    return (torch.arange(count, dtype=torch.float64) / count * 255).long()


@pytest.mark.parametrize("provider", ["opencv-loop", "ours-1-thread", "ours-all-threads"])
@pytest.mark.parametrize("count", [1, 100, 256, 1000])
def test_largest_box(benchmark, provider, count):
    cams = _smooth_maps(BATCH)
    table = _thresholds(count)
    if provider == "opencv-loop":
        level_map = (255 * cams[0].numpy()).astype(np.uint8)
        thresholds = table.tolist()

        def fn():
            for thr in thresholds:
                contours, _ = cv2.findContours((level_map > thr).astype(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
                if contours:
                    cv2.boundingRect(max(contours, key=cv2.contourArea))

        per_call = 1
    else:
        batch_table = table.repeat(BATCH, 1)
        threads = 1 if provider == "ours-1-thread" else torch.get_num_threads()

        def fn():
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                boxes_from_cams(cams, batch_table, "largest", validate=False)
            finally:
                torch.set_num_threads(previous)

        per_call = BATCH
    fn()
    benchmark.group = f"largest box, {count} thresholds, per image, 224x224"
    benchmark.extra_info.update(provider=provider, baseline="opencv-loop", op="boxes_largest",
                                images_per_call=per_call, **RUN_INFO)
    benchmark.pedantic(fn, rounds=5 if count < 1000 else 3, iterations=1)
