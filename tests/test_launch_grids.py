"""Launch grids within CUDA's limits for large inputs.

CUDA refuses a grid with more than 65,535 blocks on axis 1 or 2 ("invalid argument" at launch), and
neither Triton's interpreter nor an offline compile checks it, so the CPU tests of the kernels cannot
see it. Here each launcher whose grid grows with the map runs on ``meta`` tensors of large maps (no
memory, no compute) with its launch recorded instead of run.
"""

from __future__ import annotations

import pytest
import torch

from rethinkcam_fast import _triton
from rethinkcam_fast._triton import GRID_YZ_LIMIT, HAS_TRITON
from rethinkcam_fast.ops import class_activation_map, flm_fuse, tap, weighted_map

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")


@pytest.fixture
def grids(monkeypatch):
    recorded = []

    def record(kernel, grid, *args, **kwargs):
        recorded.append((kernel.fn.__name__, tuple(grid)))

    for module in (class_activation_map, flm_fuse, tap, weighted_map):
        monkeypatch.setattr(module, "launch", record)
    return recorded


def _features(n, k, side, channels_last):
    t = torch.empty((n, k, side, side), device="meta")
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_grids_of_large_maps_fit_cuda(grids, channels_last):
    """A VGG16 conv1 output of a 3000² image (9 M positions): 281,250 blocks of 32 positions."""
    side, k = 3000, 64
    a = _features(2, k, side, channels_last)
    for mode in ("layercam", "flm"):
        weighted_map.weighted_map_triton(a, None, a, mode, True)
    weighted_map.weighted_map_triton(a, torch.empty((2, k), device="meta"), None, "channel", True)
    class_activation_map.channel_reduce_triton(a, class_activation_map.MODE_FLM, gradients=a)
    class_activation_map.channel_reduce_triton(a, class_activation_map.MODE_CAM, weight=torch.empty((5, k), device="meta"),
                                               labels=torch.zeros(2, dtype=torch.long, device="meta"))
    flm_fuse.flm_reduce_backward_triton(torch.empty((2, side, side), device="meta"), a, a)
    stats = torch.empty((2, k), device="meta")
    tap.tap_backward_triton(stats, a, stats, stats)
    names = {name for name, _ in grids}
    assert {"_weighted_map_kernel", "_channel_reduce_kernel", "_flm_reduce_bwd_kernel", "_tap_bwd_kernel"} <= names
    for name, grid in grids:
        assert all(size <= GRID_YZ_LIMIT for size in grid[1:]), (name, grid)
        assert grid[0] < 2**31, (name, grid)


def test_launch_refuses_a_grid_cuda_would_refuse():
    kernel = weighted_map._weighted_map_kernel
    for grid in ((1, GRID_YZ_LIMIT + 1), (1, 1, GRID_YZ_LIMIT + 1)):
        with pytest.raises(ValueError, match="exceeds CUDA's 65535 blocks"):
            _triton.launch(kernel, grid)
