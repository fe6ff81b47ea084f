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
AMP (bf16) and channels_last on CUDA. ``--compile`` passes the loss function through ``torch.compile``
(the model's forward is traced inside it): with ``--loss area`` as one graph; with ``--loss shift`` the
random shift is drawn on the host (``torch.randint`` with a generator, then ``int()``), a graph break that splits the loss into two
graphs (and can recompile as the shifts change).
All options are checked before any work (``argparse`` errors, exit code 2).

    python examples/train_with_cam_loss.py                          # 3 seeds, shift loss, the README's numbers
    python examples/train_with_cam_loss.py --loss area --weight 0.5 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch import Tensor, nn

from rethinkcam_fast import class_activation_map
from rethinkcam_fast.datasets import ClutteredDigitsConfig, generate_cluttered_digits
from rethinkcam_fast.models import DigitsCAMNet
from rethinkcam_fast.training import TrainOptions, cross_entropy_loss, resolve_device, train_model

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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:  # (numpy's generators take non-negative seeds only)
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _weight(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):  # (NaN fails both)
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, all checked here, before any data is generated or any model trained."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", choices=["shift", "area"], default="shift")
    parser.add_argument("--weight", type=_weight, default=1.0, help="weight of the CAM term, finite, >= 0 (default: 1)")
    parser.add_argument("--seeds", type=_seed, nargs="+", default=[0, 1, 2], help="non-negative (default: 0 1 2)")
    parser.add_argument("--epochs", type=_positive_int, default=4, help="(default: 4)")
    parser.add_argument("--train-size", type=_positive_int, default=2000, help="training canvases (default: 2000)")
    parser.add_argument("--test-size", type=_positive_int, default=500, help="test canvases (default: 500)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--compile", action="store_true", help="torch.compile the loss function (see above)")
    parser.add_argument("--json", help="also write the per-seed numbers here")
    args = parser.parse_args(argv)
    try:
        resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json):
            parser.error(f"--json {args.json}: is a directory; give a file name")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            parser.error(f"--json {args.json}: the folder {folder} does not exist or is not writable")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

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
