"""Largest-contour boxes per image vs the reference's OpenCV loop, for 1, 100, 256 and 1,000 thresholds,
and the evaluation core (best IoU per threshold against the GT boxes, all contours or the largest)
vs the reference's per-threshold loop, for the protocol's 100 and 1,000 thresholds.

The baseline is the per-threshold loop of the reference (``findContours`` + ``max(contourArea)`` +
``boundingRect``) on one core; ours is ``boxes_from_cams(..., mode="largest")`` with one thread
(``torch.set_num_threads(1)``) so the ratio compares the same core, and again with every thread.
Times are per image (one 224x224 smooth map; a batch of 8 for ours, divided by 8).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _common import device_name, environment, synchronize, torch_threads

from rethinkcam_fast import _native, best_box_ious, boxes_from_cams, cam_curve_thresholds, protocol_thresholds
from rethinkcam_fast.ops.level_sweep import GPU_BOXES_ENV, VARIANT_ENV

cv2 = pytest.importorskip("cv2")
# The CPU providers run on the host's cores, ours-gpu on the GPU: the header names both.
RUN_INFO = {"device": device_name(torch.device("cpu")) + (
    f" + {device_name(torch.device('cuda'))} (ours-gpu)" if torch.cuda.is_available() else ""), "torch": torch.__version__}
BATCH = 8
GPU_BATCH = 256  # the CUDA level sweep takes an image per block: fill every SM twice
PROVIDERS = ["opencv-loop", "ours-1-thread", "ours-all-threads", "ours-gpu", "ours-gpu-1-block",
             "ours-gpu-shared-parents"]


def _gpu_fn(call, cams: torch.Tensor, provider: str = "ours-gpu"):
    """The CUDA level sweep (opt-in through its environment switch) on GPU_BATCH maps on the device,
    in the kernel build the provider names (``ours-gpu``: the default, two blocks per SM; ``-1-block``;
    ``-shared-parents``); skips without a GPU."""
    if not torch.cuda.is_available() or _native.cuda_module() is None:
        pytest.skip("needs a CUDA device and the CUDA extension")
    device = torch.device("cuda")
    maps = cams.repeat((GPU_BATCH + len(cams) - 1) // len(cams), 1, 1)[:GPU_BATCH].to(device)

    variant = {"ours-gpu": "2-blocks", "ours-gpu-1-block": "1-block", "ours-gpu-shared-parents": "shared-parents"}[provider]

    def fn():
        with environment(GPU_BOXES_ENV, "1"), environment(VARIANT_ENV, variant):
            call(maps)
            synchronize(device)

    return fn


def _smooth_maps(n: int) -> torch.Tensor:
    low = torch.rand((n, 1, 7, 7), generator=torch.Generator().manual_seed(0))
    up = torch.nn.functional.interpolate(low, size=(224, 224), mode="bicubic", align_corners=False)[:, 0]
    lo, hi = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
    return ((up - lo) / (hi - lo)).clamp(0, 1)


def _thresholds(count: int) -> torch.Tensor:
    # The evaluation protocol's thresholds int(t * 255) for t in arange(0, 1, 1/count).
    return (torch.arange(count, dtype=torch.float64) / count * 255).long()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("count", [1, 100, 256, 1000])
def test_largest_box(benchmark, provider, count):
    cams = _smooth_maps(BATCH)
    table = _thresholds(count)
    if provider == "opencv-loop":
        cam = cams[0].numpy()
        thresholds = table.tolist()

        def fn():  # the reference's per-image work: the uint8 cast of the map, then each threshold
            level_map = (255 * cam).astype(np.uint8)
            for thr in thresholds:
                contours, _ = cv2.findContours((level_map > thr).astype(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
                if contours:
                    cv2.boundingRect(max(contours, key=cv2.contourArea))

        per_call = 1
    elif provider.startswith("ours-gpu"):
        gpu_table = table.repeat(GPU_BATCH, 1)  # built once, outside the timing

        fn = _gpu_fn(lambda maps: boxes_from_cams(maps, gpu_table, "largest", validate=False), cams, provider)
        per_call = GPU_BATCH
    else:
        batch_table = table.repeat(BATCH, 1)
        threads = _threads(provider)

        def fn():
            with torch_threads(threads):
                boxes_from_cams(cams, batch_table, "largest", validate=False)

        per_call = BATCH
    fn()
    benchmark.group = f"largest box, {count} thresholds, per image, 224x224"
    benchmark.extra_info.update(provider=provider, baseline="opencv-loop", op="boxes_largest",
                                images_per_call=per_call, **RUN_INFO)
    benchmark.pedantic(fn, rounds=5 if count < 1000 else 3, iterations=1)


def _threads(provider: str) -> int:
    return 1 if provider.endswith("1-thread") else torch.get_num_threads()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("multi_contour", [True, False], ids=["all-contours", "largest-contour"])
@pytest.mark.parametrize("interval", [0.01, 0.001])
def test_best_box_ious(benchmark, provider, multi_contour, interval):
    cams = _smooth_maps(BATCH)
    gt = torch.tensor([[40, 30, 150, 170], [100, 120, 200, 210]])
    if provider == "opencv-loop":
        # wsolevaluation's accumulate() for one map: boxes per threshold, then the best IoU.
        scoremap = cams[0].numpy()
        thresholds = cam_curve_thresholds(interval)
        gt_np = gt.numpy()

        def fn():
            u8 = (scoremap * 255).astype(np.uint8)
            best = []
            for t in thresholds:
                contours, _ = cv2.findContours((u8 > int(t * np.max(u8))).astype(np.uint8), cv2.RETR_TREE,
                                               cv2.CHAIN_APPROX_SIMPLE)
                if not contours:
                    boxes = np.zeros((1, 4), np.int64)
                else:
                    if not multi_contour:
                        contours = [max(contours, key=cv2.contourArea)]
                    rects = np.asarray([cv2.boundingRect(c) for c in contours])
                    boxes = np.stack([rects[:, 0], rects[:, 1], np.minimum(rects[:, 0] + rects[:, 2], 223),
                                      np.minimum(rects[:, 1] + rects[:, 3], 223)], axis=1)
                iw = np.maximum(0, np.minimum(boxes[:, None, 2], gt_np[None, :, 2])
                                - np.maximum(boxes[:, None, 0], gt_np[None, :, 0]) + 1)
                ih = np.maximum(0, np.minimum(boxes[:, None, 3], gt_np[None, :, 3])
                                - np.maximum(boxes[:, None, 1], gt_np[None, :, 1]) + 1)
                inter = iw * ih
                area_a = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
                area_b = (gt_np[:, 2] - gt_np[:, 0] + 1) * (gt_np[:, 3] - gt_np[:, 1] + 1)
                best.append((inter / (area_a[:, None] + area_b[None, :] - inter)).max())

        per_call = 1
    elif provider.startswith("ours-gpu"):
        thresholds = cam_curve_thresholds(interval)
        gpu_gt, gpu_offsets = gt.repeat(GPU_BATCH, 1), torch.arange(0, 2 * GPU_BATCH + 1, 2)  # once, untimed

        def call(maps):
            table = protocol_thresholds(maps, thresholds, validate=False)
            best_box_ious(maps, table, gpu_gt, gpu_offsets, multi_contour, validate=False)

        fn = _gpu_fn(call, cams, provider)
        per_call = GPU_BATCH
    else:
        batch_gt = gt.repeat(BATCH, 1)
        offsets = torch.arange(0, 2 * BATCH + 1, 2)
        thresholds = cam_curve_thresholds(interval)
        threads = _threads(provider)

        def fn():
            with torch_threads(threads):
                table = protocol_thresholds(cams, thresholds, validate=False)
                best_box_ious(cams, table, batch_gt, offsets, multi_contour)

        per_call = BATCH
    fn()
    which = "all contours" if multi_contour else "largest contour"
    benchmark.group = f"best IoU per threshold ({which}), interval {interval}, per image, 224x224"
    benchmark.extra_info.update(provider=provider, baseline="opencv-loop", op="box_ious",
                                images_per_call=per_call, **RUN_INFO)
    benchmark.pedantic(fn, rounds=5 if interval > 0.005 else 3, iterations=1)
