"""Level jobs: each (image, threshold) of a batch as one parallel job — the CUDA kernel for box work on
CUDA maps, and its sequential CPU emulation that tests its code.

``csrc/common/level_jobs.h`` holds the job's code (connected-component labelling by atomic union-find,
per-component boxes and contour areas, holes, the largest contour, the best IoU against the GT
boxes); ``csrc/cuda/level_jobs.cu`` runs it as a thread block per job, ``csrc/cpu/level_jobs_emulated.cpp``
runs every phase thread by thread. A level whose largest contour area is shared goes to the host's
border follower for OpenCV's order.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .. import _native
from ._launch import multiprocessor_count

SCRATCH_BYTES = 512 << 20  # the CUDA level jobs' labels and statistics, all blocks together

# The CUDA level-job kernel (csrc/cuda/level_jobs.cu) is compiled everywhere nvcc is, its code is tested
# on the CPU through the sequential emulation, and its CUDA tests pass on an H100. There it is slower
# than the host's component trees (256 maps of 224^2: 2.1 s vs 84 ms at 1,000 thresholds, 13.1 vs
# 4.5 ms at one; benchmarks/results/h100_boxes_gpu.md): a job per level redoes the labelling that a
# component tree does once for all levels. So it stays opt-in: RETHINKCAM_GPU_BOXES=1.
GPU_BOXES_ENV = "RETHINKCAM_GPU_BOXES"
LEVEL_JOB_THREADS = 512


def gpu_level_jobs_enabled(cams: Tensor) -> bool:
    """True when CUDA maps should go through the CUDA level-job kernel (opt-in, see GPU_BOXES_ENV)."""
    module = _native.cuda_module()
    return (cams.is_cuda and os.environ.get(GPU_BOXES_ENV, "0") == "1" and module is not None
            and hasattr(module, "level_jobs"))


def level_jobs(levels: Tensor, table: Tensor, gt_boxes: Tensor, gt_offsets: Tensor, multi_contour: bool,
               *, emulate: bool = False, block_threads: int = LEVEL_JOB_THREADS) -> tuple[Tensor, Tensor]:
    """Best IoU ``[N, T]`` and largest-contour ``(x, y, w, h)`` ``[N, T, 4]`` through level jobs.

    One job per distinct (image, level) of ``table``, run by the CUDA kernel (``levels`` on a CUDA
    device) or by its sequential CPU emulation (``emulate=True``, CPU tensors; the tests' way to check
    the kernel's code). Levels whose largest area is shared are traced on the host for OpenCV's order.
    ``xywh`` is meaningful only when ``multi_contour`` is False.

    Args:
        levels: uint8 ``[N, H, W]``; table: int64 ``[N, T]``; gt_boxes: int64 ``[G, 4]``;
            gt_offsets: int64 ``[N + 1]``, all on the same device.
    """
    n, height, width = levels.shape
    if height * width >= 2**29 or height < 1 or width < 1:
        raise ValueError(f"level jobs need maps with 1 to 2^29 pixels, got {height}x{width}")
    device = levels.device
    wanted = torch.zeros((n, 256), dtype=torch.bool, device=device)
    wanted.scatter_(1, table, True)
    jobs = wanted.nonzero().to(torch.int32).contiguous()
    count = jobs.shape[0]
    iou = torch.zeros(count, dtype=torch.float64, device=device)
    xywh = torch.zeros((count, 4), dtype=torch.int64, device=device)
    needs_trace = torch.zeros(count, dtype=torch.int32, device=device)
    levels, gt_boxes, gt_offsets = levels.contiguous(), gt_boxes.contiguous(), gt_offsets.contiguous()
    if emulate:
        _native.cpu_module().emulate_level_jobs(
            levels.data_ptr(), n, height, width, jobs.data_ptr(), count, gt_boxes.data_ptr(), gt_offsets.data_ptr(),
            bool(multi_contour), block_threads, iou.data_ptr(), xywh.data_ptr(), needs_trace.data_ptr())
    elif count:
        # Two resident blocks per SM, each with its own scratch slice; large maps get fewer blocks so
        # that the scratch stays within SCRATCH_BYTES (a 2048^2 map at 264 blocks would need 26 GB).
        per_block = 4 * (6 * height * width + 1)
        grid = max(1, min(count, 2 * multiprocessor_count(device), SCRATCH_BYTES // per_block))
        scratch = torch.empty(grid * (6 * height * width + 1), dtype=torch.int32, device=device)
        with torch.cuda.device(device):
            _native.cuda_module().level_jobs(
                levels.data_ptr(), n, height, width, jobs.data_ptr(), count, gt_boxes.data_ptr(),
                gt_offsets.data_ptr(), bool(multi_contour), scratch.data_ptr(), grid, block_threads, iou.data_ptr(),
                xywh.data_ptr(), needs_trace.data_ptr(), torch.cuda.current_stream(device).cuda_stream)
    traced = needs_trace.nonzero()[:, 0]
    if traced.numel():  # shared maximum areas: OpenCV's order decides, so trace those levels on the host
        pairs = jobs[traced].long().cpu()
        host = levels[pairs[:, 0]].cpu().contiguous()
        single = pairs[:, 1:].contiguous()
        k = pairs.shape[0]
        module = _native.cpu_module()
        boxes = torch.zeros((k, 1, 4), dtype=torch.int64)
        module.contour_largest_boxes(host.data_ptr(), single.data_ptr(), boxes.data_ptr(), k, height, width, 1, 1)
        gt_cpu, off_cpu = gt_boxes.cpu(), gt_offsets.cpu()
        starts, stops = off_cpu[pairs[:, 0]], off_cpu[pairs[:, 0] + 1]
        gt_k = torch.cat([gt_cpu[a:b] for a, b in zip(starts.tolist(), stops.tolist())]).contiguous()
        off_k = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(stops - starts, 0)])
        fixed = torch.zeros((k, 1), dtype=torch.float64)
        module.threshold_box_ious(host.data_ptr(), single.data_ptr(), k, height, width, 1, gt_k.data_ptr(),
                                  off_k.data_ptr(), False, fixed.data_ptr(), 1)
        iou[traced] = fixed[:, 0].to(device)
        xywh[traced] = boxes[:, 0].to(device)
    iou_at = torch.zeros((n, 256), dtype=torch.float64, device=device)
    xywh_at = torch.zeros((n, 256, 4), dtype=torch.int64, device=device)
    iou_at[jobs[:, 0].long(), jobs[:, 1].long()] = iou
    xywh_at[jobs[:, 0].long(), jobs[:, 1].long()] = xywh
    return iou_at.gather(1, table), xywh_at.gather(1, table[:, :, None].expand(-1, -1, 4))


__all__ = ["GPU_BOXES_ENV", "LEVEL_JOB_THREADS", "gpu_level_jobs_enabled", "level_jobs"]
