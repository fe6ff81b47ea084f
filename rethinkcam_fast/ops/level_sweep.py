"""The level sweep: box work on CUDA maps, every wanted threshold of an image in one pass of a thread
block (``csrc/common/level_sweep.h``; ``csrc/cuda/level_sweep.cu`` runs it, and
``csrc/cpu/level_sweep_emulated.cpp`` runs every phase thread by thread for the tests).

All-contour IoUs (MaxBoxAccV2) and largest-contour boxes (MaxBoxAcc, PaS boxes) come out of the sweep
exact; only a level whose maximum contour area is shared by two contours goes to the host's border
follower, for OpenCV's order.

Opt-in (``RETHINKCAM_GPU_BOXES=1``) until an H100 run has checked and timed it against the host's
component trees, which CUDA maps use by default.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .. import _native
from ._launch import multiprocessor_count

GPU_BOXES_ENV = "RETHINKCAM_GPU_BOXES"
LEVEL_SWEEP_THREADS = 512  # the kernel's launch bounds: 512 threads, two blocks per SM
SCRATCH_BYTES = 512 << 20  # the blocks' union-find and statistics, all blocks together
# The kernel's builds (csrc/cuda/level_sweep.cu): two blocks per SM (64 registers, a few spills), one
# (88, none), or one with the union-find parents in shared memory (maps up to ~57,000 pixels; else
# the second). All are built, the benchmarks time each, and the default stays the first until an H100
# run says otherwise.
VARIANT_ENV = "RETHINKCAM_SWEEP_VARIANT"
VARIANTS = {"2-blocks": 2, "1-block": 1, "shared-parents": 3}  # name -> the launcher's code

# Status codes of csrc/common/level_sweep.h
TIE, INCONSISTENT = 2, 3


def gpu_boxes_enabled(cams: Tensor) -> bool:
    """True when CUDA maps should go through the CUDA level sweep (opt-in, see GPU_BOXES_ENV)."""
    module = _native.cuda_module()
    return (cams.is_cuda and os.environ.get(GPU_BOXES_ENV, "0") == "1" and module is not None
            and hasattr(module, "level_sweep"))


def sweep_variant() -> tuple[int, int]:
    """``(the launcher's variant code, resident blocks per SM)`` from ``RETHINKCAM_SWEEP_VARIANT``
    (one of :data:`VARIANTS`, default ``"2-blocks"``)."""
    name = os.environ.get(VARIANT_ENV, "2-blocks")
    if name not in VARIANTS:
        raise ValueError(f"{VARIANT_ENV} must be one of {sorted(VARIANTS)}, got {name!r}")
    code = VARIANTS[name]
    return code, 2 if code == 2 else 1


def level_sweep(levels: Tensor, table: Tensor, gt_boxes: Tensor, gt_offsets: Tensor, multi_contour: bool,
                *, emulate: bool = False, block_threads: int = LEVEL_SWEEP_THREADS) -> tuple[Tensor, Tensor]:
    """Best IoU ``[N, T]`` and largest-contour ``(x, y, w, h)`` ``[N, T, 4]`` for the thresholds ``table``.

    Run by the CUDA kernel (``levels`` on a CUDA device) or by its sequential CPU emulation
    (``emulate=True``, CPU tensors). ``xywh`` is meaningful only when ``multi_contour`` is False.

    Args:
        levels: uint8 ``[N, H, W]``; table: int64 ``[N, T]`` (0..255); gt_boxes: int64 ``[G, 4]``;
            gt_offsets: int64 ``[N + 1]``, all on the same device.
    Raises:
        RuntimeError: a hole count of the kernel disagreed with the Euler number (an internal error).
    """
    n, height, width = levels.shape
    if height * width >= 2**29 or height < 1 or width < 1:  # int32 pixel indices in the kernel
        raise ValueError(f"the GPU level sweep needs maps with 1 to 2^29 pixels, got {height}x{width}")
    if levels.dtype != torch.uint8 or levels.is_cuda == emulate:
        raise ValueError(f"levels must be uint8 on {'the CPU (emulate=True)' if emulate else 'a CUDA device'}, "
                         f"got {levels.dtype} on {levels.device}")
    for name, t in (("table", table), ("gt_boxes", gt_boxes), ("gt_offsets", gt_offsets)):
        if t.dtype != torch.int64 or t.device != levels.device:
            raise ValueError(f"{name} must be int64 on {levels.device}, got {t.dtype} on {t.device}")
    device = levels.device
    wanted = torch.zeros((n, 256), dtype=torch.uint8, device=device)
    wanted.scatter_(1, table, 1)
    iou = torch.zeros((n, 256), dtype=torch.float64, device=device)
    xywh = torch.zeros((n, 256, 4), dtype=torch.int64, device=device)
    status = torch.zeros((n, 256), dtype=torch.int32, device=device)
    levels, gt_boxes, gt_offsets = levels.contiguous(), gt_boxes.contiguous(), gt_offsets.contiguous()
    if emulate:
        _native.cpu_module().emulate_level_sweep(
            levels.data_ptr(), n, height, width, wanted.data_ptr(), gt_boxes.data_ptr(), gt_offsets.data_ptr(),
            bool(multi_contour), block_threads, iou.data_ptr(), xywh.data_ptr(), status.data_ptr())
    elif n:
        # One or two resident blocks per SM, each with its own scratch slice, fewer for large maps so
        # that the scratch stays within SCRATCH_BYTES.
        variant, per_sm = sweep_variant()
        per_block = 9 * (height * width + 1) + (height * width + 3) // 4  # int32s (level_sweep.h, Scratch)
        grid = max(1, min(n, per_sm * multiprocessor_count(device), SCRATCH_BYTES // (4 * per_block)))
        scratch = torch.empty(grid * per_block, dtype=torch.int32, device=device)
        with torch.cuda.device(device):
            _native.cuda_module().level_sweep(
                levels.data_ptr(), n, height, width, wanted.data_ptr(), gt_boxes.data_ptr(), gt_offsets.data_ptr(),
                bool(multi_contour), scratch.data_ptr(), grid, block_threads, variant, iou.data_ptr(), xywh.data_ptr(),
                status.data_ptr(), _native.current_stream_handle(device))
    pending = status.nonzero()  # the one host sync: levels the sweep left to the host
    if pending.numel():
        kind = status[pending[:, 0], pending[:, 1]]
        if bool((kind == INCONSISTENT).any()):
            bad = pending[kind == INCONSISTENT][0].tolist()
            raise RuntimeError(f"rethinkcam_fast.level_sweep: internal error: a hole count of image {bad[0]} "
                               f"at threshold {bad[1]} disagrees with its Euler number; please report it")
        ties = pending[kind == TIE]  # a shared maximum area: OpenCV's order, from the border follower
        if ties.numel():
            iou[ties[:, 0], ties[:, 1]], xywh[ties[:, 0], ties[:, 1]] = trace_on_host(levels, ties, gt_boxes,
                                                                                      gt_offsets)
    return iou.gather(1, table), xywh.gather(1, table[:, :, None].expand(-1, -1, 4))


def trace_on_host(levels: Tensor, jobs: Tensor, gt_boxes: Tensor, gt_offsets: Tensor) -> tuple[Tensor, Tensor]:
    """The largest contour of each job ``[K, 2]`` (image, threshold) by the host's border follower, in
    OpenCV's order, and its IoU against the image's GT boxes: ``([K], [K, 4])`` on ``levels``' device."""
    from .boxes import _largest_xywh_traced  # (boxes imports this module)

    height, width = levels.shape[1:]
    pairs = jobs.long().cpu()
    host = levels[pairs[:, 0].to(levels.device)].cpu().contiguous()
    single = pairs[:, 1:].contiguous()
    k = pairs.shape[0]
    module = _native.cpu_module()
    boxes = _largest_xywh_traced(host, single)  # the border follower, OpenCV's order
    gt_cpu, off_cpu = gt_boxes.cpu(), gt_offsets.cpu()
    starts, stops = off_cpu[pairs[:, 0]], off_cpu[pairs[:, 0] + 1]
    gt_k = torch.cat([gt_cpu[a:b] for a, b in zip(starts.tolist(), stops.tolist())]).contiguous()
    off_k = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(stops - starts, 0)])
    fixed = torch.zeros((k, 1), dtype=torch.float64)
    module.threshold_box_ious(host.data_ptr(), single.data_ptr(), k, height, width, 1, gt_k.data_ptr(),
                              off_k.data_ptr(), False, fixed.data_ptr(), 1)
    return fixed[:, 0].to(levels.device), boxes[:, 0].to(levels.device)


__all__ = ["GPU_BOXES_ENV", "LEVEL_SWEEP_THREADS", "VARIANTS", "VARIANT_ENV", "sweep_variant", "gpu_boxes_enabled", "level_sweep"]
