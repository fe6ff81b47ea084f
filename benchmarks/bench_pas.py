"""PaS thresholds (percentile_threshold) vs the reference's per-image numpy expression, same run.

The baseline is the reference formula applied image by image on the host,
``int(theta * np.percentile(np.uint8(255 * cam), q))``, on maps already in host memory (its best
case). Ours runs batched on the bench device, maps already there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _common import bench_device, device_name, synchronize

from rethinkcam_fast import percentile_threshold

DEVICE = bench_device()
RUN_INFO = {"device": device_name(DEVICE), "torch": torch.__version__}
BATCH = 1024 if DEVICE.type == "cuda" else 64


@pytest.mark.parametrize("provider", ["numpy-loop", "ours"])
def test_pas_threshold(benchmark, provider):
    cams = torch.rand(BATCH, 224, 224, generator=torch.Generator().manual_seed(0))
    if provider == "numpy-loop":
        host = cams.numpy()

        def fn():
            return [int(0.35 * np.percentile((255 * c).astype(np.uint8), 90)) for c in host]
    else:
        on_device = cams.to(DEVICE)

        def fn():
            out = percentile_threshold(on_device, 90.0, 0.35, validate=False)
            synchronize(DEVICE)
            return out

    fn()
    benchmark.group = f"PaS threshold, {BATCH} maps of 224x224"
    benchmark.extra_info.update(provider=provider, baseline="numpy-loop", op="pas_threshold", batch=BATCH, **RUN_INFO)
    benchmark.pedantic(fn, rounds=5, iterations=1)
