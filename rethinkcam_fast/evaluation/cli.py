"""``rethinkcam evaluate`` (saved score maps) and ``rethinkcam evaluate-model`` (a model, no files).

Both print a table; with ``--json`` the last stdout line is one JSON object (``MaxBoxAcc`` per δ,
``MaxBoxAccV2``, ... for boxes; ``PxAP`` for masks). Under ``torchrun`` every rank evaluates its shard,
the counters are all-reduced and rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..cli import CAM_METHODS, _positive_int, _remove_if_empty, check_output_file
from .metadata import DATASETS


def _percentage(text: str) -> float | int:
    value = float(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"IoU thresholds are percentages in [0, 100], got {text}")
    if 0 < value < 1:  # a fraction where a percentage was meant (0.5 would mean IoU >= 0.005)
        raise argparse.ArgumentTypeError(f"IoU thresholds are percentages: {text} looks like a fraction "
                                         f"(write {value * 100:g} for IoU >= {text})")
    return int(value) if value.is_integer() else value


def _interval(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


# (argparse names a refused value by its type function: "invalid IoU percentage value: 'x'")
_percentage.__name__, _interval.__name__, _non_negative_int.__name__ = "IoU percentage", "interval", "count"


def _add_protocol_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metadata-root", required=True, help="holds <dataset>/<split>/{image_ids,...}.txt")
    parser.add_argument("--mask-root", help="PNG masks (OpenImages): paths relative to it or to <it>/OpenImages")
    parser.add_argument("--dataset-name", required=True,
                        help=f"{', '.join(DATASETS)}, or any other folder of --metadata-root in their layout "
                             "(e.g. ClutteredDigits from rethinkcam_fast.datasets)")
    parser.add_argument("--split", required=True, help="e.g. val or test")
    parser.add_argument("--cam-curve-interval", type=_interval, default=0.001,
                        help="CAM thresholds np.arange(0, 1, interval) (default 0.001: 1,000 thresholds)")
    parser.add_argument("--iou-thresholds", type=_percentage, nargs="+", default=[30, 50, 70],
                        help="IoU thresholds δ in percent (default 30 50 70)")
    parser.add_argument("--multi-contour", action=argparse.BooleanOptionalAction, default=True,
                        help="boxes of every contour (MaxBoxAccV2, default) or of the largest only (MaxBoxAcc v1)")
    parser.add_argument("--json", action="store_true",
                        help="one line of JSON on stdout, nothing else there (the table goes to stderr)")
    parser.add_argument("--threads", type=_positive_int,
                        help="CPU threads for PyTorch (default: PyTorch's; on a machine busy with other jobs, 1 "
                             "can be several times faster: the per-batch counting is many small ops)")


def add_evaluate_commands(sub: Any) -> None:
    """Register ``evaluate`` and ``evaluate-model`` on the ``rethinkcam`` subparsers."""
    evaluate = sub.add_parser("evaluate", help="WSOL metrics (MaxBoxAcc, MaxBoxAccV2, PxAP) of saved score maps")
    evaluate.add_argument("--scoremap-root", required=True, help="holds <image_id>.npy score maps in [0, 1]")
    _add_protocol_flags(evaluate)
    evaluate.add_argument("--resume", metavar="FILE", help="keep the state here after every batch; continue from it")
    evaluate.set_defaults(func=_cmd_evaluate)

    model = sub.add_parser("evaluate-model", help="WSOL metrics of a model's CAMs, computed on the fly")
    model.add_argument("--model", required=True, help="MODULE:CALLABLE or FILE.py:CALLABLE returning the nn.Module")
    model.add_argument("--checkpoint", "--weights", dest="checkpoint",
                       help="state dict or `rethinkcam train` checkpoint to load (weights_only=True)")
    model.add_argument("--data-root", required=True, help="holds the images <image_id>")
    _add_protocol_flags(model)
    model.add_argument("--method", default="cam", choices=CAM_METHODS, help="CAM method (default: cam)")
    model.add_argument("--nwc", action="store_true",
                       help="negative weight clamping for --method cam (the Rethinking-CAM paper's NWC; off by "
                            "default: the standard protocol evaluates plain CAM)")
    model.add_argument("--target-layer", help="module name of the layer to explain (default: the last conv-like)")
    model.add_argument("--upsample", choices=["bilinear", "bicubic"], default="bilinear",
                       help="how maps are resized to the image (bicubic: as wsolevaluation's reference pipeline, "
                            "cv2.INTER_CUBIC; default bilinear, the fused kernels)")
    model.add_argument("--image-size", type=_positive_int,
                       help="images are resized to this square (default: the canvas size a `rethinkcam train` "
                            "checkpoint records, e.g. 64 for the digits model; else 224)")
    model.add_argument("--normalize", choices=["auto", "imagenet", "none"], default="auto",
                       help="ImageNet mean/std (auto: for RGB models; grey models, whose first conv takes 1 "
                            "channel, get the grey image in [0, 1])")
    model.add_argument("--batch-size", type=_positive_int, default=32)
    model.add_argument("--num-workers", type=_non_negative_int, default=0, help="DataLoader workers (default 0)")
    model.set_defaults(func=_cmd_evaluate_model)


def format_metrics(metrics: Any, title: str) -> str:
    """The readable table of a :class:`BoxMetrics` or :class:`MaskMetrics`."""
    result = metrics.to_dict()
    lines = [title]
    if "PxAP" in result:
        lines.append(f"PxAP %: {result['PxAP']:.4f}")
        return "\n".join(lines)
    columns = ["IoU δ %", "MaxBoxAcc %", "best CAM threshold"]
    top1 = "Top-1 Loc" in result
    if top1:
        columns += ["GT-known Loc %", "Top-1 Loc %"]
    lines.append("  ".join(f"{c:>18}" for c in columns))
    for key, value in result["MaxBoxAcc"].items():
        cells = [key, f"{value:.4f}", f"{result['best_cam_threshold'][key]:.4f}"]
        if top1:
            cells += [f"{result['GT-known Loc'][key]:.4f}", f"{result['Top-1 Loc'][key]:.4f}"]
        lines.append("  ".join(f"{c:>18}" for c in cells))
    deltas = [float(key) for key in result["MaxBoxAcc"]]
    if "MaxBoxAccV2" in result:
        lines.append(f"MaxBoxAccV2 (mean over δ) %: {result['MaxBoxAccV2']:.4f}")
    elif result.get("multi_contour", True):  # V2 is the mean over δ = 30, 50, 70
        lines.append(f"mean MaxBoxAcc over δ = {', '.join(f'{d:g}' for d in deltas)}, every contour (MaxBoxAccV2 "
                     f"takes δ = 30, 50, 70) %: {result['mean_MaxBoxAcc']:.4f}")
    else:  # MaxBoxAccV2 is defined with every contour; this is the same mean for the largest contour only
        lines.append(f"mean MaxBoxAcc over δ, largest contour (not V2, which uses every contour) %: "
                     f"{result['mean_MaxBoxAcc']:.4f}")
    if top1:
        lines.append(f"Top-1 Cls %: {result['Top-1 Cls']:.4f}")
    return "\n".join(lines)


def _report(args: argparse.Namespace, metrics: Any, seconds: float, world: int, device: Any) -> None:
    result = metrics.to_dict()
    contours = "" if "PxAP" in result else (", all contours" if args.multi_contour else ", largest contour")
    resumed = metrics.resumed_images  # (counted, not evaluated, by this run: not in its rate)
    title = (f"rethinkcam {args.command}: {args.dataset_name}/{args.split}, {metrics.num_images} images"
             + (f" ({resumed} resumed from {args.resume})" if resumed else "")
             + f", interval {args.cam_curve_interval:g}{contours}, {world} process{'es' if world > 1 else ''} on "
             f"{device.type}, {seconds:.2f} s ({(metrics.num_images - resumed) / max(seconds, 1e-9):.0f} img/s)")
    # With --json, standard output holds the JSON object alone (`| jq`); the table goes to standard error.
    print(format_metrics(metrics, title), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        extra = {"dataset": args.dataset_name, "split": args.split, "world_size": world, "seconds": round(seconds, 4),
                 "resumed_images": resumed}
        print(json.dumps({**result, **extra}), flush=True)


def _run(args: argparse.Namespace, evaluate: Any) -> int:
    from .distributed import init_from_env, rank_and_world, shutdown
    from .metadata import MetadataError

    try:
        device, created = init_from_env()
    except (RuntimeError, ValueError) as exc:
        print(f"rethinkcam {args.command}: error: cannot join the distributed job: {exc}", file=sys.stderr)
        return 2  # exit code 2 for usage and input errors, as the other rethinkcam commands
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        start = time.perf_counter()
        metrics = evaluate(device)
        rank, world = rank_and_world()
        if rank == 0:
            _report(args, metrics, time.perf_counter() - start, world, device)
        return 0
    except (MetadataError, ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        text = str(exc).strip()
        if "Original Traceback" in text:  # a DataLoader worker's error, with its traceback: its last line
            text = text.splitlines()[-1]
        print(f"rethinkcam {args.command}: error: {text}", file=sys.stderr)
        return 2
    finally:
        shutdown(created)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .scoremaps import evaluate_scoremaps

    def evaluate(device: Any) -> Any:
        # (--resume checked before any map is read, not after the first batch naming a temporary file;
        # a folder made for it is removed again if the run fails before writing there)
        made = check_output_file(args.resume, "--resume") if args.resume else []
        try:
            return evaluate_scoremaps(
                args.scoremap_root, args.metadata_root, args.dataset_name, args.split, mask_root=args.mask_root,
                cam_curve_interval=args.cam_curve_interval, iou_thresholds=args.iou_thresholds,
                multi_contour=args.multi_contour, device=device, resume=args.resume, progress=True)
        except BaseException:
            _remove_if_empty(made)
            raise

    return _run(args, evaluate)


def _checkpoint_image_size(payload: dict) -> int | None:
    """The square input size a ``rethinkcam train`` checkpoint was trained at (its data config's
    canvas size), or None for any other file (``payload``: the file as read_weights gives it)."""
    from ..models import CHECKPOINT_FORMAT

    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        return None
    size = payload.get("meta", {}).get("data", {}).get("canvas_size")
    return int(size) if isinstance(size, int) and size > 0 else None


def _cmd_evaluate_model(args: argparse.Namespace) -> int:
    def evaluate(device: Any) -> Any:
        if args.nwc and args.method != "cam":  # before any data or model is read
            raise ValueError(f"--nwc (negative weight clamping) applies to --method cam only, got {args.method}")
        import torch

        from ..engine import CAMEngine
        from ..localize import input_channels
        from .distributed import rank_and_world
        from .metadata import load_metadata
        from .model import WSOLImageDataset, evaluate_model, load_model
        from .scoremaps import make_evaluator

        metadata = load_metadata(args.metadata_root, args.dataset_name, args.split)
        evaluator = make_evaluator(metadata, cam_curve_interval=args.cam_curve_interval,
                                   iou_thresholds=args.iou_thresholds, multi_contour=args.multi_contour,
                                   mask_root=args.mask_root, device=device)
        trained_size = []  # a train checkpoint's input size, from the read that loads the weights
        model = load_model(args.model, args.checkpoint,
                           on_payload=lambda payload: trained_size.append(_checkpoint_image_size(payload)))
        model = model.to(device).eval()
        if args.checkpoint is None and rank_and_world()[0] == 0:
            print(f"rethinkcam {args.command}: warning: no --checkpoint: {args.model} runs with the weights its "
                  "factory gives it" + (" (random for a torchvision name)" if ":" not in args.model else ""),
                  file=sys.stderr)
        engine = CAMEngine(model, args.method, args.target_layer, boxes=False, warn_degenerate=False, nwc=args.nwc,
                           upsample=args.upsample)
        channels = input_channels(model)
        normalize = channels == 3 if args.normalize == "auto" else args.normalize == "imagenet"
        image_size = args.image_size or (trained_size[0] if trained_size else None) or 224
        dataset = WSOLImageDataset(args.data_root, metadata, image_size, channels=channels, normalize=normalize)
        rank, world = rank_and_world()
        shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))  # no padding duplicates
        loader = torch.utils.data.DataLoader(shard, batch_size=args.batch_size, num_workers=args.num_workers)
        return evaluate_model(engine, loader, evaluator, device=device, progress=rank == 0)

    return _run(args, evaluate)


__all__ = ["add_evaluate_commands", "format_metrics"]
