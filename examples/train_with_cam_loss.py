"""Train the cluttered-digits model with TAP plus a CAM-based auxiliary loss, and measure what it does.

The CAM of the ground-truth class comes from :func:`rethinkcam_fast.class_activation_map` — the
differentiable op (custom op + autograd; fused Triton forward and backward on CUDA) — so the loss
reaches the features and the classifier weights in the same backward as the cross-entropy:

* ``--loss shift``: translation equivariance. The CAM of a canvas rolled by ``(dy, dx)`` should be
  the rolled CAM: ``L = mean |CAM(roll(x)) - roll(CAM(x))|`` (no boxes needed: weakly supervised).
* ``--loss area``: an area prior, ``L = mean(CAM)``, which favours compact maps.

For every seed it trains the same TAP model with and without the term (same data, same
initialisation) and evaluates both like the ablation: plain CAM with NWC at the protocol's
thresholds on the test split (MaxBoxAccV2, MaxBoxAcc, Top-1 Loc), plus classification accuracy.
AMP (bf16) and channels_last on CUDA; ``--compile`` compiles the whole loss.

    python examples/train_with_cam_loss.py                          # 3 seeds, shift loss, the README's numbers
    python examples/train_with_cam_loss.py --loss area --weight 0.5 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import Tensor, nn

from rethinkcam_fast import class_activation_map
from rethinkcam_fast.datasets import ClutteredDigitsConfig, generate_cluttered_digits
from rethinkcam_fast.models import DigitsCAMNet
from rethinkcam_fast.training import TrainOptions, cross_entropy_loss, train_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from ablation import evaluate_row  # noqa: E402  (the ablation's metrics, same protocol)

MAX_SHIFT = 8  # pixels of the 64x64 canvas


def cam_loss_fn(kind: str, weight: float, generator: torch.Generator):
    """``loss_fn(model, images, labels)`` for :func:`rethinkcam_fast.training.train_model`: CE + weight x term."""

    def loss_fn(model: DigitsCAMNet, images: Tensor, labels: Tensor) -> Tensor:
        features = model.features(images)
        logits = model.classifier(model.pool(features).flatten(1))
        cam = class_activation_map(features, model.classifier.weight, labels, output_size=tuple(images.shape[2:]))
        if kind == "area":
            term = cam.mean()
        else:
            dy, dx = (int(v) for v in torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (2,), generator=generator))
            shifted = model.features(torch.roll(images, (dy, dx), dims=(2, 3)))
            cam_shifted = class_activation_map(shifted, model.classifier.weight, labels,
                                               output_size=tuple(images.shape[2:]))
            term = (cam_shifted - torch.roll(cam, (dy, dx), dims=(1, 2))).abs().mean()
        return nn.functional.cross_entropy(logits, labels) + weight * term

    return loss_fn


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", choices=["shift", "area"], default="shift")
    parser.add_argument("--weight", type=float, default=1.0, help="weight of the CAM term")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", help="also write the per-seed numbers here")
    args = parser.parse_args()

    runs = []
    start = time.perf_counter()
    for seed in args.seeds:
        data = ClutteredDigitsConfig(seed=seed, counts={"train": args.train_size, "val": 0, "test": args.test_size})
        splits = generate_cluttered_digits(data)
        options = TrainOptions(epochs=args.epochs, seed=seed, device=args.device, compile=args.compile)
        row = {"seed": seed}
        for name, loss_fn in (("baseline", cross_entropy_loss),
                              (f"+ {args.loss} loss", cam_loss_fn(args.loss, args.weight,
                                                                  torch.Generator().manual_seed(seed)))):
            torch.manual_seed(seed)  # same initialisation for both
            model = DigitsCAMNet(pool="tap")
            report = train_model(model, splits["train"], options, progress=False, loss_fn=loss_fn)
            metrics = evaluate_row(report.model, splits["test"], "cam", nwc=True, pas=False, interval=0.01)
            row[name] = {"seconds": report.seconds, **{k: metrics[k] for k in
                                                        ("max_box_acc_v2", "max_box_acc", "top1_loc", "top1_cls")}}
            print(f"seed {seed} {name:<16} train {report.seconds:5.1f} s  MaxBoxAccV2 {metrics['max_box_acc_v2']:.1f}"
                  f"  MaxBoxAcc {metrics['max_box_acc']:.1f}  Top-1 Loc {metrics['top1_loc']:.1f}"
                  f"  Top-1 Cls {metrics['top1_cls']:.1f}", flush=True)
        runs.append(row)
    names = [k for k in runs[0] if k != "seed"]
    print(f"\nTAP model, CAM + NWC at the protocol's thresholds, {len(runs)} seed{'s' if len(runs) > 1 else ''}, "
          f"{args.train_size} training canvases x {args.epochs} epochs ({(time.perf_counter() - start) / 60:.1f} min)\n")
    print("| training | MaxBoxAccV2 | MaxBoxAcc | Top-1 Loc | Top-1 Cls | train time |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        cells = []
        for key in ("max_box_acc_v2", "max_box_acc", "top1_loc", "top1_cls", "seconds"):
            values = np.array([run[name][key] for run in runs])
            spread = f" ± {values.std(ddof=1):.1f}" if len(values) > 1 else ""  # (one seed: no spread to show)
            cells.append(f"{values.mean():.1f}{spread}" + (" s" if key == "seconds" else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "runs": runs}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
