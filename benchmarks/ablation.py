"""The Rethinking-CAM ablation on cluttered digits: CAM (GAP) -> + TAP -> + NWC -> + PaS, and the gradient CAMs.

For every seed: generate the benchmark (instance split and canvases from the seed), train two
identical DigitsCAMNets, one pooling with GAP and one with TAP, and evaluate on the test split:

* ``CAM (GAP)``: plain CAM of the GAP model, protocol thresholds ``int(t * max)``;
* ``+ TAP``: the same on the TAP model; ``+ NWC``: with negative weight clamping;
* ``+ PaS``: with the percentile (q = 90) as the threshold standard, ``floor(t * p90)``;
* Grad-CAM, Grad-CAM++, LayerCAM (last conv block) and Fully-CAM (every conv, sum fusion) on both models.

Metrics (``rethinkcam_fast.localize.wsol_box_metrics``, ground-truth-class maps at canvas resolution):
MaxBoxAccV2, MaxBoxAcc, Top-1 Loc at one dataset-wide threshold, and Top-1 Loc at the two fixed
thresholds (no search): plain CAM's 0.2 x max and PaS's 0.35 x p90. Prints mean ± std over seeds (sample std) as a
Markdown table and saves the raw per-seed numbers as JSON.

    python benchmarks/ablation.py                       # 3 seeds, the README's table
    python benchmarks/ablation.py --seeds 0 --epochs 1 --train-size 500 --test-size 200   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

from rethinkcam_fast import CAMEngine, __version__, percentile_threshold
from rethinkcam_fast.datasets import CanvasSet, ClutteredDigitsConfig, generate_cluttered_digits
from rethinkcam_fast.localize import BOX_THRESHOLDS, wsol_box_metrics
from rethinkcam_fast.training import TrainOptions, classify, train_digits_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_name, git_commit  # noqa: E402

PAS_Q = BOX_THRESHOLDS["pas"][0]

# (row name, model, method, nwc, PaS standard)
ROWS = [
    ("CAM (GAP)", "gap", "cam", False, False),
    ("+ TAP", "tap", "cam", False, False),
    ("+ NWC", "tap", "cam", True, False),
    ("+ PaS", "tap", "cam", True, True),
] + [(f"{label} ({pool.upper()})", pool, method, False, False)
     for method, label in (("gradcam", "Grad-CAM"), ("gradcam++", "Grad-CAM++"), ("layercam", "LayerCAM"),
                           ("fullycam", "Fully-CAM"))
     for pool in ("gap", "tap")]
COLUMNS = [("max_box_acc_v2", "MaxBoxAccV2"), ("max_box_acc", "MaxBoxAcc"), ("top1_loc", "Top-1 Loc"),
           ("fixed_top1_loc_max", "Top-1 Loc @ 0.2·max"), ("fixed_top1_loc_pas", "Top-1 Loc @ PaS")]


def evaluate_row(model: torch.nn.Module, test: CanvasSet, method: str, nwc: bool, pas: bool,
                 interval: float) -> dict:
    """The row's metrics on ``test`` (maps of the ground-truth class)."""
    images = test.float_images()
    engine = CAMEngine(model, method, nwc=nwc, boxes=False, warn_degenerate=False)
    cams = torch.cat([engine(images[i : i + 250], targets=test.labels[i : i + 250]).cams
                      for i in range(0, len(images), 250)])
    fixed = {name: percentile_threshold(cams, q, theta) for name, (q, theta) in BOX_THRESHOLDS.items()}
    metrics = wsol_box_metrics(cams, test.boxes, test.labels, classify(model, images),
                               percentile=PAS_Q if pas else None, cam_curve_interval=interval,
                               fixed_thresholds=fixed)
    row = asdict(metrics)
    row.update({f"fixed_top1_loc_{name}": value for name, value in row.pop("fixed_top1_loc").items()})
    return row


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    data = ClutteredDigitsConfig(seed=seed, counts={"train": args.train_size, "val": 0, "test": args.test_size})
    splits = generate_cluttered_digits(data)
    options = TrainOptions(epochs=args.epochs, seed=seed, device=args.device)
    models, training = {}, {}
    for pool in ("gap", "tap"):
        report = train_digits_model(pool, options=options, data=data, splits=splits, progress=args.progress)
        models[pool] = report.model
        training[pool] = {"seconds": report.seconds, "final_train_loss": report.train_loss[-1]}
        print(f"seed {seed}: trained {pool} in {report.seconds:.0f} s", flush=True)
    rows = {}
    for name, pool, method, nwc, pas in ROWS:
        rows[name] = evaluate_row(models[pool], splits["test"], method, nwc, pas, args.interval)
        print(f"seed {seed}: {name:<20} " + "  ".join(f"{label} {rows[name][key]:.1f}" for key, label in COLUMNS),
              flush=True)
    return {"seed": seed, "training": training, "rows": rows}


def markdown_table(per_seed: list[dict]) -> str:
    """Mean ± sample std over seeds of every row and column."""
    header = "| method | " + " | ".join(label for _, label in COLUMNS) + " | Top-1 Cls |"
    lines = [header, "|---|" + "---:|" * (len(COLUMNS) + 1)]
    for name, *_ in ROWS:
        cells = []
        for key in [k for k, _ in COLUMNS] + ["top1_cls"]:
            values = np.array([seed["rows"][name][key] for seed in per_seed], dtype=np.float64)
            std = values.std(ddof=1) if len(values) > 1 else 0.0
            cells.append(f"{values.mean():.1f} ± {std:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(record: dict) -> str:
    """The saved run as Markdown: conditions, then the table."""
    config = record["config"]
    return (f"device: {record['device']} | torch {record['torch']} | commit {record['commit']} | "
            f"{record['seconds'] / 60:.1f} min\n"
            f"seeds {config['seeds']}, {config['train_size']} training canvases, {config['epochs']} epochs, "
            f"{config['test_size']} test canvases, CAM threshold interval {config['interval']}\n"
            "mean ± sample std over seeds\n\n" + record["table"] + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=0.01, help="CAM threshold spacing (0.01: 100 thresholds)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core VM)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--progress", action="store_true", help="training progress bars")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                       "ablation_cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    per_seed = [run_seed(seed, args) for seed in args.seeds]
    seconds = time.perf_counter() - start
    table = markdown_table(per_seed)
    print(table)
    print(f"{len(args.seeds)} seeds in {seconds / 60:.1f} min on {device_name(torch.device('cpu'))}")
    record = {"config": vars(args), "seconds": seconds, "device": device_name(torch.device("cpu")),
              "commit": git_commit(), "torch": torch.__version__, "rethinkcam_fast": __version__,
              "python": platform.python_version(), "table": table, "per_seed": per_seed}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(record, fh, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
        fh.write(markdown_report(record))
    print(f"wrote {args.out} and its .md table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
