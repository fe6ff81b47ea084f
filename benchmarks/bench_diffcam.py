"""Differentiable CAMs: forward+backward of ``class_activation_map`` and ``flm_fuse`` against the eager
PyTorch formulation (time and peak memory), and the cost of a CAM loss in a training step
(``CAMEngine(differentiable=True)``).

Run: ``python benchmarks/report.py --suite diffcam`` (``RETHINKCAM_BENCH_QUICK=1``: small batches for the
2-core CPU), or ``python benchmarks/bench_diffcam.py`` for the same cases run alternately (minimum and
median of 15 rounds each: robust where other jobs share the CPU). Every provider of a group runs in the same process on the same input; each timed call
synchronises the device. Peak memory (``peak_mem_mb``, above what was allocated before the call) comes
from ``torch.cuda.max_memory_allocated`` on CUDA and from the profiler's allocation timeline on the CPU,
measured in one extra untimed call.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _baselines import eager_cam, eager_flm
from _common import bench_device, device_name, quick, synchronize, through_triton_launch_path
from _models import build
from torch import nn

import rethinkcam_fast
from rethinkcam_fast import CAMEngine, class_activation_map, flm_fuse

DEVICE = bench_device()
RUN_INFO = {"device": device_name(DEVICE), "torch": torch.__version__}
CUDA = DEVICE.type == "cuda"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CAM_BATCH = 64 if CUDA or not quick() else 16  # ResNet50 layer4: [N, 2048, 7, 7] -> 224²
FLM_BATCH = 64 if CUDA else (2 if quick() else 8)  # ResNet50 stage outputs -> 224²
FLM_LAYERS = [(256, 56), (512, 28), (1024, 14), (2048, 7)]
SIZE = (224, 224)


def _peak_mb(fn) -> float:
    """Peak memory of one call of ``fn`` above what was allocated before it, in MiB."""
    if CUDA:
        synchronize(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        fn()
        synchronize(DEVICE)
        return (torch.cuda.max_memory_allocated(DEVICE) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocations are charged to the op that made them, frees are "[memory]" events: replay them in order.
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    current = peak = 0
    for _, change in changes:
        current += change
        peak = max(peak, current)
    return peak / 2**20


def _measure(benchmark, group: str, provider: str, baseline: str, op: str, fn, rounds: int | None = None,
             memory: bool = True) -> None:
    def step():
        fn()
        synchronize(DEVICE)

    for _ in range(2):  # warm-up: Triton compilation, allocator
        step()
    if memory:  # (a graph replay allocates nothing: its memory was taken at capture)
        benchmark.extra_info["peak_mem_mb"] = _peak_mb(step)
    benchmark.group = group
    benchmark.extra_info.update(provider=provider, baseline=baseline, op=op, **RUN_INFO)
    benchmark.pedantic(step, rounds=rounds or (20 if CUDA else 5), iterations=1)


# -- the ops -----------------------------------------------------------------------------------------


def _fwd_bwd(fn, inputs, grad_out):
    def step():
        for t in inputs:
            t.grad = None
        fn().backward(grad_out)

    return step


def _backend(provider: str) -> str:
    """``ours-reference``: the op on its pure-PyTorch path (on the CPU: without the C++ kernels)."""
    return "reference" if provider == "ours-reference" else "auto"


def cam_case(dtype: str, layout: str, provider: str):
    """``(group, step)``: forward+backward of one CAM provider on ResNet50 layer4 shapes."""
    torch.manual_seed(0)
    features = torch.randn(CAM_BATCH, 2048, 7, 7, device=DEVICE, dtype=DTYPES[dtype]).relu_()
    if layout == "nhwc":
        features = features.to(memory_format=torch.channels_last)
    weight = (torch.randn(1000, 2048, device=DEVICE, dtype=DTYPES[dtype]) * 0.02).requires_grad_(True)
    features.requires_grad_(True)
    labels = torch.randint(0, 1000, (CAM_BATCH,), device=DEVICE)
    grad_out = torch.randn(CAM_BATCH, *SIZE, device=DEVICE)
    if provider == "eager":
        fn = lambda: eager_cam(features, weight, labels, SIZE)  # noqa: E731
    else:
        backend = _backend(provider)
        fn = lambda: class_activation_map(features, weight, labels, output_size=SIZE, backend=backend)  # noqa: E731
    return f"cam {CAM_BATCH}x2048x7x7->224 {dtype} {layout}", _fwd_bwd(fn, [features, weight], grad_out)


def flm_case(dtype: str, fuse: str, provider: str):
    """``(group, step)``: forward+backward of one FLM provider on four ResNet50 stage outputs."""
    torch.manual_seed(0)
    fmt = torch.channels_last
    acts = [torch.randn(FLM_BATCH, k, s, s, device=DEVICE, dtype=DTYPES[dtype]).to(memory_format=fmt).requires_grad_(True)
            for k, s in FLM_LAYERS]
    grads = [torch.randn_like(a).requires_grad_(True) for a in acts]
    grad_out = torch.randn(FLM_BATCH, *SIZE, device=DEVICE)
    if provider == "eager":
        fn = lambda: eager_flm(acts, grads, SIZE, fuse)  # noqa: E731
    else:
        backend = _backend(provider)
        fn = lambda: flm_fuse(acts, grads, SIZE, fuse, backend=backend)  # noqa: E731
    group = f"flm {FLM_BATCH}x[{','.join(f'{k}x{s}²' for k, s in FLM_LAYERS)}]->224 {dtype} {fuse}"
    return group, _fwd_bwd(fn, acts + grads, grad_out)


OP_CASES = [("class_activation_map", cam_case, dtype, layout) for dtype in DTYPES for layout in ("nchw", "nhwc")]
OP_CASES += [("flm_fuse", flm_case, dtype, fuse) for dtype in DTYPES for fuse in ("sum", "max")]


def _graphed(step):
    """``step`` (forward + backward, fresh gradients) captured once in a CUDA graph; returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # Triton compilation, allocator
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


@pytest.mark.parametrize("provider", ["eager", "ours", "ours-reference", "ours-triton-launch", "eager-graph",
                                      "ours-graph"])
@pytest.mark.parametrize("op,build,dtype,variant", OP_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_op_fwd_bwd(benchmark, op, build, dtype, variant, provider):
    """``class_activation_map`` (variant: layout) and ``flm_fuse`` (variant: fusion) against eager;
    ``ours-reference`` (CPU): ours on the pure-PyTorch path, without the C++ kernels;
    ``ours-triton-launch``: ours with every kernel launched through Triton's Python launch path;
    ``*-graph``: both captured in a CUDA graph, as a training step under CUDA graphs runs them (the
    host's per-op work gone: what is left is GPU time)."""
    graphed = provider.endswith("-graph")
    if (graphed or provider == "ours-triton-launch") and not CUDA:
        pytest.skip("CUDA graphs need a GPU; the CPU path launches no Triton kernel")
    if provider == "ours-reference" and CUDA:
        pytest.skip("the C++ kernels are the CPU path's: on a GPU ours is the Triton path")
    group, step = build(dtype, variant, provider.removesuffix("-graph").removesuffix("-triton-launch"))
    if provider == "ours-triton-launch":
        step = through_triton_launch_path(step)
    # (the graphed rows are their own table, against the graphed eager formulation)
    _measure(benchmark, group, provider, "eager-graph" if graphed else "eager",
             f"{op} fwd+bwd" + (", CUDA graph" if graphed else ""), _graphed(step) if graphed else step,
             memory=not graphed)


# -- a training step with a CAM loss -------------------------------------------------------------------


class SmallResNet(nn.Module):
    """A small CPU-sized classifier with the ResNet head (conv stages, GAP, linear)."""

    def __init__(self, classes: int = 10, width: int = 32) -> None:
        super().__init__()

        def stage(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(stage(3, width, 2), stage(width, 2 * width, 2), stage(2 * width, 4 * width, 2))
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def _train_setup():
    torch.manual_seed(0)
    if CUDA:
        model, target, batch, size, classes = *build("resnet50"), 64, 224, 1000
    else:
        model = SmallResNet()
        target, batch, size, classes = model.features, 16, 64, 10
    model = model.to(DEVICE).to(memory_format=torch.channels_last).train()
    images = torch.randn(batch, 3, size, size, device=DEVICE).to(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch,), device=DEVICE)
    return model, target, images, labels


TRAIN_PROVIDERS = ["train-step", "+cam-loss", "+gradcam-loss", "+fullycam-loss"]


def train_case(provider: str):
    """``(group, step)``: one SGD step (bf16 autocast on CUDA, fp32 on the CPU), with or without a
    CAM-area loss through ``CAMEngine(differentiable=True)``."""
    model, target, images, labels = _train_setup()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    dtype = torch.bfloat16 if CUDA else torch.float32
    method = provider[1:-len("-loss")] if provider.startswith("+") else None
    engine = None
    if method is not None:
        layers = None if method == "fullycam" else target
        engine = CAMEngine(model, method, layers, differentiable=True, boxes=False, warn_degenerate=False)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=CUDA):
            if engine is None:
                loss = F.cross_entropy(model(images).float(), labels)
            else:
                result = engine(images, targets=labels)
                loss = F.cross_entropy(result.logits.float(), labels) + 0.1 * result.cams.mean()
        loss.backward()
        opt.step()

    group = f"train step {'resnet50' if CUDA else 'small resnet'} b{images.shape[0]} {'bf16' if CUDA else 'fp32'}"
    return group, step


@pytest.mark.parametrize("provider", TRAIN_PROVIDERS)
def test_train_step_with_cam_loss(benchmark, provider):
    group, step = train_case(provider)
    _measure(benchmark, group, provider, "train-step", "train step with a CAM loss", step, rounds=10 if CUDA else 5)


def test_backend_is_live():
    """Not a timing: record which kernels the numbers above used."""
    print(f"rethinkcam_fast native={rethinkcam_fast.has_native()} cuda_kernels={rethinkcam_fast.has_cuda_kernels()} "
          f"device={DEVICE}")


def interleaved(rounds: int = 15) -> None:
    """Providers of a group run alternately, ``rounds`` times each; prints the minimum and the median
    per provider and the ratio of the minima — robust where other jobs share the CPU (medians are not)."""
    import time

    providers = ("eager", "ours") if CUDA else ("eager", "ours", "ours-reference")
    cases = [[build(dtype, variant, p) for p in providers] for _, build, dtype, variant in OP_CASES]
    cases += [[train_case(p) for p in TRAIN_PROVIDERS]]
    print(f"device: {RUN_INFO['device']} | torch {torch.__version__} | min / median of {rounds} interleaved rounds")
    for case in cases:
        times: list[list[float]] = [[] for _ in case]
        for step in [s for _, s in case] * 2:  # warm-up
            step()
        for _ in range(rounds):
            for i, (_, step) in enumerate(case):
                synchronize(DEVICE)
                start = time.perf_counter()
                step()
                synchronize(DEVICE)
                times[i].append(time.perf_counter() - start)
        cells = []
        for t in times:
            t.sort()
            cells.append(f"{t[0] * 1e3:.1f} / {t[len(t) // 2] * 1e3:.1f} ms ({t[0] / times[0][0]:.2f}x)")
        print(f"| {case[0][0]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    interleaved()
