"""``rethinkcam video``: localize every frame of a video file, a camera or the built-in demo clip."""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time


def add_video_command(sub, cam_methods: tuple[str, ...], positive_int) -> None:
    video = sub.add_parser("video", help="CAM + box for every frame of a video (file, camera or --demo clip)")
    video.add_argument("input", nargs="?",
                       help="video file, stream URL (rtsp://...), or camera index (0, 1, ...; a file of that name wins)")
    video.add_argument("--demo", action="store_true",
                       help="a generated clip (a digit moving over clutter) with the shipped model; no INPUT/--model")
    video.add_argument("--model", help="a torchvision model name or a python path pkg.module:factory / FILE.py:factory")
    video.add_argument("--weights", help="state dict or checkpoint file (loaded with weights_only=True)")
    video.add_argument("--out", help=f"annotated video to write ({', '.join(VIDEO_EXTENSIONS)})")
    video.add_argument("--jsonl", help="one JSON line per frame: frame, label, score, box ('-': standard output)")
    video.add_argument("--method", choices=cam_methods, help="CAM method (default: gradcam; the demo's own choice with --demo)")
    video.add_argument("--no-nwc", action="store_true",
                       help="--method cam without negative weight clamping (the command clamps by default, as "
                            "`rethinkcam localize` does; VideoLocalizer does not unless given nwc=True)")
    video.add_argument("--box-threshold", choices=["max", "pas"],
                       help="box threshold 0.2 x max or PaS 0.35 x p90 (default: pas; the demo's choice with --demo)")
    video.add_argument("--batch", type=positive_int, default=8, help="frames per batch: the latency bound (default: 8)")
    video.add_argument("--image-size", type=positive_int,
                       help="resize frames to this square for the model (default: 224 for torchvision names, else none)")
    video.add_argument("--normalize", choices=["auto", "imagenet", "none"], default="auto",
                       help="input normalisation (auto: ImageNet for torchvision names, none otherwise)")
    video.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    video.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    video.add_argument("--cuda-graph", action="store_true", help="capture and replay the per-batch work (CUDA)")
    video.add_argument("--no-overlap", action="store_true",
                       help="collect each batch before the next one starts (lowest latency; by default, on CUDA, "
                            "a batch goes to the device while the previous one's boxes are cut)")
    video.add_argument("--nchw", action="store_true",
                       help="feed the model NCHW batches instead of channels_last (may be faster at --batch 1; "
                            "the model is loaded NCHW)")
    video.add_argument("--fold-bn", action="store_true",
                       help="run a copy of the model with its batch norms folded into the convolutions before "
                            "them (same maps up to rounding, fewer kernels; the model must be torch.fx-traceable)")
    video.add_argument("--frames", type=positive_int,
                       help="stop after this many frames (a camera runs until Ctrl-C otherwise); the length of "
                            "the --demo clip (default 300)")
    video.add_argument("--threads", type=positive_int,
                       help="CPU threads for PyTorch (default: PyTorch's; on a machine busy with other jobs, 1 "
                            "can be several times faster than the default)")
    video.add_argument("--scale", type=positive_int, help="enlarge the annotated frames (default: 4 for --demo, else 1)")
    video.add_argument("--fps", type=float, help="frame rate of the output video (default: the input's, or 25)")
    video.add_argument("--quiet", action="store_true", help="no progress bar")
    video.set_defaults(func=run_video_command)


VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv")  # containers OpenCV writes with the mp4v codec
DEMO_FRAMES = 300


def _demo_source(args):
    """(model, frames, gt boxes, label, method, box threshold) of the built-in clip."""
    from .datasets import moving_digit_clip
    from .demo import DEMO_BOX_THRESHOLD, DEMO_METHOD
    from .models import load_shipped_model

    model, _meta = load_shipped_model()
    grey, label, boxes = moving_digit_clip(args.frames or DEMO_FRAMES)
    frames = [g[:, :, None].repeat(3, axis=2) for g in grey]  # RGB frames, as a decoder delivers them
    return model.eval(), frames, boxes, label, args.method or DEMO_METHOD, args.box_threshold or DEMO_BOX_THRESHOLD


def run_video_command(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ._files import is_stream
    from .cli import _fail, _warn_non_finite, check_output_file
    from .localize import BOX_THRESHOLDS, IMAGENET_MEAN, IMAGENET_STD, input_policy, load_user_model
    from .models import CheckpointError
    from .ops.box_ious import box_iou_matrix
    from .training import resolve_device
    from .video import DecodeReport, FrameBatchError, VideoLocalizer, VideoReadError, localize_video

    if args.demo and args.input is not None:
        return _fail("give a video INPUT (file or camera index) or --demo, not both")
    if not args.demo and args.input is None:
        return _fail("give a video INPUT (file or camera index), or --demo for the built-in clip")
    if not args.demo and not args.model:
        return _fail("--model is required with a video INPUT")
    if args.demo and (args.model or args.weights):
        return _fail("--demo runs the shipped model: leave out --model/--weights (or give a video INPUT)")
    if args.demo and (args.image_size is not None or args.normalize != "auto"):
        return _fail("--demo feeds the shipped model its own input: leave out --image-size/--normalize")
    if not (args.out or args.jsonl):
        return _fail("nothing to write: give --out and/or --jsonl")
    if args.fps is not None and not (args.fps > 0 and math.isfinite(args.fps)):
        return _fail(f"--fps must be a positive frame rate, got {args.fps}")
    if args.out and os.path.splitext(args.out)[1].lower() not in VIDEO_EXTENSIONS:
        return _fail(f"--out {args.out!r}: give a video file name ending in one of {', '.join(VIDEO_EXTENSIONS)}")
    if args.out and args.jsonl and args.jsonl != "-" and os.path.realpath(args.out) == os.path.realpath(args.jsonl):
        return _fail(f"--out and --jsonl name the same file: {args.out!r}")
    for option, path in (("--out", args.out), ("--jsonl", args.jsonl)):
        if path and path != "-" and args.input and os.path.isfile(args.input) and os.path.exists(path) and (
                os.path.samefile(path, args.input)):
            return _fail(f"{option} {path!r} is the input video: writing it would destroy what is being read")
    if args.no_nwc and args.method != "cam":
        return _fail("--no-nwc applies to --method cam only")
    if args.threads:
        torch.set_num_threads(args.threads)
    # With --jsonl -, standard output carries the JSON lines: the summary goes to standard error.
    say = functools.partial(print, file=sys.stderr if args.jsonl == "-" else sys.stdout)
    gt_boxes = label = None
    made: list[str] = []  # output folders made here: removed again if the run fails before writing
    try:
        device = resolve_device(args.device)
        for option, path in (("--out", args.out), ("--jsonl", args.jsonl)):
            if path and path != "-" and not (option == "--jsonl" and is_stream(path)):  # (a pipe: written into)
                made += check_output_file(path, option)
        if args.demo:
            model, source, gt_boxes, label, method, box_threshold = _demo_source(args)
            image_size, normalize = None, False
        else:
            model = load_user_model(args.model, args.weights)
            image_size, normalize = input_policy(args.model, args.image_size, args.normalize)
            method, box_threshold = args.method or "gradcam", args.box_threshold or "pas"
            source = args.input
            if source.isascii() and source.isdigit() and not os.path.exists(source):  # a camera index
                source = int(source)
                if source > 2**31 - 1:
                    raise ValueError(f"{args.input}: no such file, and too large for a camera index")
        q, theta = BOX_THRESHOLDS[box_threshold]
        localizer = VideoLocalizer(
            model.to(device), method, input_size=None if image_size is None else (image_size, image_size),
            mean=IMAGENET_MEAN if normalize else None, std=IMAGENET_STD if normalize else None,
            batch_size=args.batch, device=device, bf16=args.bf16, keep_cams=args.out is not None,
            cuda_graph=args.cuda_graph, overlap_batches=False if args.no_overlap else None,
            channels_last=not args.nchw, fold_batchnorm=args.fold_bn, nwc=method == "cam" and not args.no_nwc,
            pas_q=q, pas_theta=theta)
        hits, ious, non_finite = [], [], []
        total = len(source) if isinstance(source, list) else None
        # (a bar only on a terminal: in a log its redraws are noise; the summary line says the rate)
        bar = tqdm(total=total if args.frames is None or total is None else min(total, args.frames), unit="frame",
                   disable=args.quiet or not sys.stderr.isatty(), desc="rethinkcam video")
        report = DecodeReport()

        def on_frame(result) -> None:
            if bar.total is None and report.frames_announced:  # a file: its announced length, for an ETA
                bar.total = min(report.frames_announced, args.frames or report.frames_announced)
            bar.update(1)
            if not math.isfinite(result.score):
                non_finite.append(result.index)
            if gt_boxes is not None:
                iou = float(box_iou_matrix(torch.tensor([result.box]), torch.from_numpy(gt_boxes[result.index][None]))[0, 0])
                ious.append(iou)
                hits.append(iou >= 0.5 and result.label == label)

        start = time.perf_counter()
        try:
            localize_video(localizer, source, out_video=args.out, out_jsonl=args.jsonl, fps=args.fps,
                           display_scale=args.scale or (4 if args.demo else 1), on_frame=on_frame,
                           max_frames=None if args.demo else args.frames, report=report)
        except KeyboardInterrupt:
            bar.close()
            kept = [path for path in report.written if os.path.exists(path)]  # (what localize_video left)
            say(f"rethinkcam video: interrupted after {report.frames_processed} frames"
                + (f"; kept {', '.join(kept)}" if kept else ""), flush=True)
            raise
        finally:
            bar.close()
        seconds = time.perf_counter() - start
    except (VideoReadError, FrameBatchError, CheckpointError, ValueError, FileNotFoundError, ImportError) as exc:
        return _fail(exc, made)
    done = report.frames_processed
    note = ""
    if report.truncated:
        note = (f" (the file announced {report.frames_announced} frames and {report.frames_read} were decoded: it "
                "is truncated, or frames failed to decode and were skipped)")
    say(f"rethinkcam video: {done} frames in {seconds:.2f} s ({done / max(seconds, 1e-9):.1f} frames/s) on "
        f"{device}, {method}, batch {args.batch}{note}")
    if ious:
        say(f"demo clip (digit {label}): mean IoU {100 * sum(ious) / len(ious):.1f} %, correct box and class "
            f"(IoU >= 0.5) in {100 * sum(hits) / len(hits):.1f} % of the frames")
    _warn_non_finite(len(non_finite), done, "frame")
    for path in (args.out, args.jsonl):
        if path and path != "-":
            say(f"wrote {path}")
    return 0


__all__ = ["add_video_command", "run_video_command"]
