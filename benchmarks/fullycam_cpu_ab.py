"""Fully-CAM on the CPU: the C++ epilogue kernels against the PyTorch reference, interleaved in one process.

    python benchmarks/fullycam_cpu_ab.py --batch 1
    python benchmarks/fullycam_cpu_ab.py --batch 4 --rounds 6 --threads 2

ResNet50, all 53 convs, 224², fp32. Each round times, in turn, the floor (forward plus the gradient
down to the input), ``CAMEngine(model, "fullycam", backend="auto")`` (the C++ kernels of
``csrc/cpu/weighted_map.cpp`` and ``csrc/cpu/fuse_maps.cpp``) and the same engine on
``backend="reference"`` (PyTorch ops); the best of the rounds is reported as a ratio to the floor.
Interleaving keeps this VM's slow drifts out of the comparison, which ``report.py --suite cam`` (one
provider after the other) does not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _models import build  # noqa: E402

from rethinkcam_fast import CAMEngine  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = build("resnet50")
    model.eval()
    images = torch.randn(args.batch, 3, 224, 224)
    engines = {b: CAMEngine(model, "fullycam", boxes=False, warn_degenerate=False, backend=b)
               for b in ("auto", "reference")}

    def floor() -> None:
        leaf = images.detach().requires_grad_(True)
        torch.autograd.grad(model(leaf).max(1).values.sum(), [leaf])

    providers = {"floor": floor, "auto": lambda: engines["auto"](images),
                 "reference": lambda: engines["reference"](images)}
    for fn in providers.values():  # warm-up
        fn()
    best = {name: float("inf") for name in providers}
    for _ in range(args.rounds):
        for name, fn in providers.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    for name, seconds in best.items():
        print(f"{name:>9}: {seconds * 1e3:7.1f} ms  {seconds / best['floor']:.3f}x the floor")
    diff = (engines["auto"](images).cams - engines["reference"](images).cams).abs().max().item()
    print(f"max |auto - reference| over the maps: {diff:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
