"""Where the time goes: torch.profiler tables for the cases whose GPU numbers miss their targets.

Not a benchmark (the suites under ``benchmarks/`` measure ratios); a diagnosis for the next change.
For each case: the wall time of one call (median of a few, synchronised) and the profiler's tables by
self CUDA time and by self CPU time, all written to one text file.

    python benchmarks/profile_gpu.py --out profile.txt [--case fullycam_b64 ...]

Cases: small_batch (batch 1: Grad-CAM eager and through CAMEngine.graphed, Fully-CAM and its floor),
fullycam_b64 (ResNet50, all 53 convs, fp32, with its forward+full-backward floor),
gradcampp_b64_bf16 (with Grad-CAM for comparison), video_b1 (VideoLocalizer, Grad-CAM, 8 and 64 frames
a stream), cam_op (class_activation_map forward+backward, [64, 2048, 7, 7] -> 224^2, against the eager
formulation), flm_op (flm_fuse forward+backward over four ResNet50 stages, against eager), boxes (256
maps, 1 and 1,000 thresholds, host path and the opt-in CUDA level sweep).
On a machine without a GPU it runs on the CPU with small batches (to check the script itself).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _baselines import forward_with_activation  # noqa: E402
from _common import environment  # noqa: E402
from _models import build  # noqa: E402

import rethinkcam_fast  # noqa: E402
from rethinkcam_fast import CAMEngine, boxes_from_cams, class_activation_map  # noqa: E402
from rethinkcam_fast.ops.level_sweep import GPU_BOXES_ENV  # noqa: E402
from rethinkcam_fast.video import VideoLocalizer  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
BIG = 64 if GPU else 2  # the targets' batch on a GPU; a smoke size on the CPU


def _sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def _wall_ms(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _profile(out: io.TextIOBase, name: str, fn, calls: int = 3, rows: int = 22) -> None:
    """Warm up, time, then profile ``calls`` calls of ``fn`` and write the tables."""
    fn()
    fn()
    wall = _wall_ms(fn)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if GPU else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        _sync()
    averages = prof.key_averages()
    out.write(f"\n### {name}: {wall:.3f} ms a call (median of 5, synchronised); profiler over {calls} calls\n")
    if GPU:
        out.write(averages.table(sort_by="self_cuda_time_total", row_limit=rows) + "\n")
    out.write(averages.table(sort_by="self_cpu_time_total", row_limit=rows) + "\n")
    out.flush()


def _resnet(batch: int):
    torch.manual_seed(0)
    model, target = build("resnet50")
    model = model.to(DEVICE).to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, 224, 224, device=DEVICE).to(memory_format=torch.channels_last)
    return model, target, images


def case_fullycam_b64(out):
    model, _, images = _resnet(BIG)

    def floor():
        leaf = images.detach().requires_grad_(True)
        torch.autograd.grad(model(leaf).max(1).values.sum(), leaf)

    engine = CAMEngine(model, "fullycam", warn_degenerate=False, boxes=False)
    _profile(out, f"fwd+full-bwd b{BIG} fp32 (the floor)", floor)
    _profile(out, f"ours fullycam b{BIG} fp32", lambda: engine(images))


def case_small_batch(out):
    """Batch 1, where the host's dispatch dominates: Grad-CAM eager against CAMEngine.graphed, and
    Fully-CAM (53 layers), whose epilogue a small batch now splits over several programs per image."""
    model, target, images = _resnet(1)
    engine = CAMEngine(model, "gradcam", target, warn_degenerate=False, boxes=False)
    _profile(out, "ours gradcam b1 fp32, eager", lambda: engine(images))
    if GPU:
        graphed = engine.graphed(images)
        _profile(out, "ours gradcam b1 fp32, CAMEngine.graphed", lambda: graphed(images, copy=False))
    fully = CAMEngine(model, "fullycam", warn_degenerate=False, boxes=False)
    _profile(out, "ours fullycam b1 fp32", lambda: fully(images))

    def floor():
        leaf = images.detach().requires_grad_(True)
        torch.autograd.grad(model(leaf).max(1).values.sum(), leaf)

    _profile(out, "fwd+full-bwd b1 fp32 (the floor)", floor)


def case_gradcampp_b64_bf16(out):
    model, target, images = _resnet(BIG)
    for method in ("gradcam", "gradcam++"):
        engine = CAMEngine(model, method, target, warn_degenerate=False, boxes=False)

        def fn(engine=engine):
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                engine(images)

        _profile(out, f"ours {method} b{BIG} bf16", fn)

    def floor():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            logits, act = forward_with_activation(model, target, images)
            torch.autograd.grad(logits.max(1).values.sum(), act)

    _profile(out, f"fwd+partial-bwd b{BIG} bf16 (the floor)", floor)


def case_video_b1(out):
    model, target, _ = _resnet(1)
    rng = np.random.default_rng(0)
    frames = [(rng.random((224, 224, 3)) * 255).astype(np.uint8) for _ in range(64)]
    # (name, CUDA graph, channels_last, stream lengths): NCHW for cuDNN's NHWC batch norm at batch 1
    variants = [("eager", False, True, (8, 64))]
    if GPU:
        variants += [("graph", True, True, (8, 64)), ("graph nchw", True, False, (8,))]
    for name, graph, channels_last, counts in variants:
        # cuDNN runs a convolution NHWC when its input *or* its weight is channels_last: NCHW needs both
        model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        localizer = VideoLocalizer(model, "gradcam", target_layers=target, input_size=(224, 224), mean=None, std=None,
                                   batch_size=1, device=DEVICE, cuda_graph=graph, prefetch_frames=2,
                                   channels_last=channels_last)
        for count in counts:
            def fn(localizer=localizer, count=count):
                for _ in localizer.stream(frames[:count]):
                    pass

            _profile(out, f"video b1 {name}, {count} frames a stream", fn, calls=2)


def case_cam_op(out):
    torch.manual_seed(0)
    features = torch.randn(BIG, 2048, 7, 7, device=DEVICE).relu_().requires_grad_(True)
    weight = (torch.randn(1000, 2048, device=DEVICE) * 0.02).requires_grad_(True)
    labels = torch.randint(0, 1000, (BIG,), device=DEVICE)
    grad_out = torch.randn(BIG, 224, 224, device=DEVICE)

    def eager():
        m = torch.einsum("nk,nkhw->nhw", weight[labels], features)
        m = F.interpolate(m[:, None], size=(224, 224), mode="bilinear", align_corners=False)[:, 0].flatten(1)
        lo, hi = m.amin(1, keepdim=True), m.amax(1, keepdim=True)
        ((m - lo) / (hi - lo)).view(-1, 224, 224).backward(grad_out)

    def ours():
        class_activation_map(features, weight, labels, output_size=(224, 224)).backward(grad_out)

    _profile(out, f"eager cam fwd+bwd {BIG}x2048x7x7->224 fp32", eager)
    _profile(out, f"ours class_activation_map fwd+bwd {BIG}x2048x7x7->224 fp32", ours)


def case_flm_op(out):
    """flm_fuse forward+backward over four ResNet50 stage outputs against the eager formulation
    (benchmarks/bench_diffcam.py's FLM rows)."""
    from bench_diffcam import flm_case

    for provider in ("eager", "ours"):
        group, step = flm_case("fp32", "sum", provider)
        _profile(out, f"{provider} {group}", step)


def case_boxes(out):
    low = torch.rand((256 if GPU else 4, 1, 7, 7), generator=torch.Generator().manual_seed(0))
    up = F.interpolate(low, size=(224, 224), mode="bicubic", align_corners=False)[:, 0]
    maps = ((up - up.amin((1, 2), keepdim=True)) / (up.amax((1, 2), keepdim=True) - up.amin((1, 2), keepdim=True)))
    maps = maps.clamp(0, 1).to(DEVICE)
    for count in (1, 1000):
        table = (torch.arange(count, dtype=torch.float64) / count * 255).long().repeat(len(maps), 1).to(DEVICE)
        for gpu_jobs in (("0", "1") if GPU else ("0",)):
            def fn(table=table, gpu_jobs=gpu_jobs):
                with environment(GPU_BOXES_ENV, gpu_jobs):
                    boxes_from_cams(maps, table, "largest", validate=False)

            path = "CUDA level sweep" if gpu_jobs == "1" else "host component tree"
            _profile(out, f"boxes {len(maps)} maps x {count} thresholds, {path}", fn, calls=2)


CASES = {
    "small_batch": case_small_batch,
    "fullycam_b64": case_fullycam_b64,
    "gradcampp_b64_bf16": case_gradcampp_b64_bf16,
    "video_b1": case_video_b1,
    "cam_op": case_cam_op,
    "flm_op": case_flm_op,
    "boxes": case_boxes,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="default: all")
    args = parser.parse_args(argv)
    failed = []
    with args.out.open("w") as out:
        name = torch.cuda.get_device_name() if GPU else "CPU"
        out.write(f"# profile_gpu: {name}, torch {torch.__version__}, rethinkcam_fast cuda kernels "
                  f"{rethinkcam_fast.has_cuda_kernels()}\n")
        for case in args.case or list(CASES):
            start = time.perf_counter()
            try:
                CASES[case](out)
            except Exception:  # noqa: BLE001 - one broken case must not cost the others
                failed.append(case)
                out.write(f"\n### {case} FAILED\n{traceback.format_exc()}\n")
            out.write(f"\n(case {case}: {time.perf_counter() - start:.1f} s)\n")
            out.flush()
            print(f"{case}: {time.perf_counter() - start:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
