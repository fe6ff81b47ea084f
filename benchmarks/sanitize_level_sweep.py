"""The CUDA level sweep under compute-sanitizer (benchmarks/gpu_check.sh, stage "sanitize").

More maps than the grid has blocks (so that blocks work through several images in a row) and other
thresholds per map, small enough for the sanitizer's slowdown; every result is checked against the CPU
kernels. Prints one line per mode and exits 1 on a mismatch.

    compute-sanitizer --tool racecheck python -P benchmarks/sanitize_level_sweep.py
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

from rethinkcam_fast.ops.box_ious import best_box_ious
from rethinkcam_fast.ops.level_sweep import VARIANT_ENV, VARIANTS, level_sweep


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    rng = np.random.default_rng(0)
    blocks = 2 * torch.cuda.get_device_properties(0).multi_processor_count  # the larger grid of the two
    n, size = blocks + 36, 24
    values = rng.integers(0, 6, size=(n, size, size)) * 51  # few levels: holes, nesting, ties
    cams = torch.from_numpy(values.astype(np.float32) / 255)
    table = torch.from_numpy(rng.integers(0, 256, size=(n, 6)))
    table[::2, 0] = 0  # half the maps want threshold 0, the others not: consecutive images differ
    corners = np.sort(rng.integers(0, size, size=(n, 2, 2)), axis=2)  # [n, (x, y), (low, high)]
    gt = torch.from_numpy(np.ascontiguousarray(corners.transpose(0, 2, 1).reshape(n, 4)))  # x0, y0, x1, y1
    offsets = torch.arange(n + 1)
    levels = (cams * 255).to(torch.uint8)
    failed = 0
    for variant in VARIANTS:  # every build of the kernel
        os.environ[VARIANT_ENV] = variant
        for multi in (True, False):
            got, _ = level_sweep(levels.cuda(), table.cuda(), gt.cuda(), offsets.cuda(), multi)
            want = best_box_ious(cams, table, gt, offsets, multi)
            same = torch.equal(got.cpu(), want)
            failed += not same
            print(f"level sweep, {variant}, {'all contours' if multi else 'largest contour'}: {n} maps "
                  f"of {size}x{size}, {'equal to the CPU kernels' if same else 'MISMATCH against the CPU kernels'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
