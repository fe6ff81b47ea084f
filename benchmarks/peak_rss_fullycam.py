"""Peak memory of one Fully-CAM call on the CPU: ours vs the eager formulation vs the floor.

    python benchmarks/peak_rss_fullycam.py            # ResNet50, all 53 convs, 224², fp32, batches 4 8 16
    python benchmarks/peak_rss_fullycam.py --batches 8

CUDA has allocator statistics (``bench_cam.py`` reports ``peak_mem_mb`` there); the CPU has none, so
each (provider, batch) runs in a fresh process and reports its peak resident set size above what the
process held after loading the model and running one forward under ``no_grad`` (the warm allocator).

Providers: ``floor`` (forward + the gradient down to the input), ``eager`` (the usual formulation: every
conv's activation and gradient alive at once, then per-layer maps fused) and ``ours``
(``CAMEngine(model, "fullycam")``: per-layer maps reduced in tensor hooks as autograd produces them).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
PROVIDERS = ("floor", "eager", "ours")


def measure(provider: str, batch: int) -> float:
    """MB of peak RSS above the warm model, for one call (run in a fresh process)."""
    sys.path.insert(0, HERE)
    from _models import build

    from rethinkcam_fast import CAMEngine

    model, _ = build("resnet50")
    model.eval()
    images = torch.randn(batch, 3, 224, 224)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(images)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if provider == "floor":
        leaf = images.detach().requires_grad_(True)
        torch.autograd.grad(model(leaf).max(1).values.sum(), leaf)
    elif provider == "eager":
        acts: list[torch.Tensor] = []
        hooks = [c.register_forward_hook(lambda m, i, o: acts.append(o)) for c in convs]
        logits = model(images.detach().requires_grad_(True))
        for h in hooks:
            h.remove()
        grads = torch.autograd.grad(logits.max(1).values.sum(), acts)
        fused = 0
        for a, g in zip(acts, grads):
            m = (g.relu() * a.relu()).sum(1, keepdim=True)
            m = F.interpolate(m, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0].flatten(1)
            span = (m.amax(1, keepdim=True) - m.amin(1, keepdim=True)).clamp_min(1e-12)
            fused = fused + (m - m.amin(1, keepdim=True)) / span
    else:
        CAMEngine(model, "fullycam", boxes=False, warn_degenerate=False)(images)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # ru_maxrss is in KB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--one", nargs=2, metavar=("PROVIDER", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(f"{measure(args.one[0], int(args.one[1])):.1f}")
        return 0
    print("| batch | floor (fwd + bwd to input) | eager FLM | ours | ours / eager |")
    print("|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        mb = {}
        for provider in PROVIDERS:
            out = subprocess.run([sys.executable, __file__, "--one", provider, str(batch)], capture_output=True,
                                 text=True, check=True)
            mb[provider] = float(out.stdout.strip().splitlines()[-1])
        print(f"| {batch} | {mb['floor']:.0f} MB | {mb['eager']:.0f} MB | {mb['ours']:.0f} MB | "
              f"{mb['ours'] / mb['eager']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
