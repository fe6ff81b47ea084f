"""CAM engine throughput and peak memory vs the floors, an eager on-device baseline and the peers.

Groups ``<model> b<batch> <dtype>``; per group, every provider runs in the same process on the same
input. Floors: ``fwd`` (the bare forward), ``fwd+partial-bwd`` (forward + gradient down to the target
layer, what any gradient CAM must pay) and, for Fully-CAM, ``fwd+full-bwd``. Peers
(pytorch-grad-cam, torchcam) are measured when importable. Maps are at input resolution (224²).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _common import bench_device, device_name, environment, quick, synchronize
from _baselines import eager_gradcam, forward_with_activation
from _models import build

import rethinkcam_fast
from rethinkcam_fast import CAMEngine
from rethinkcam_fast.ops.weighted_map import CUDA_KERNEL_ENV, _native_grad_modes

DEVICE = bench_device()
RUN_INFO = {"device": device_name(DEVICE), "torch": torch.__version__}
if DEVICE.type == "cuda":
    BATCHES, DTYPES, SIZE = [64, 1, 256], ["fp32", "bf16"], 224  # the targets' batch first
else:  # the 2-core CPU: small batches, fp32 only
    BATCHES, DTYPES, SIZE = ([1, 4] if quick() else [1, 8]), ["fp32"], 224
MODELS = ["resnet50", "vgg16"]
METHODS = ["cam", "gradcam", "gradcam++", "layercam"]

_cache: dict = {}


def _setup(model_name: str, batch: int):
    key = (model_name, batch)
    if key not in _cache:
        _cache.clear()
        torch.manual_seed(0)
        model, target = build(model_name)
        model = model.to(DEVICE).to(memory_format=torch.channels_last)
        images = torch.randn(batch, 3, SIZE, SIZE, device=DEVICE).to(memory_format=torch.channels_last)
        _cache[key] = (model, target, images)
    return _cache[key]


def _autocast(dtype: str):
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def _run(benchmark, group: str, provider: str, baseline: str, op: str, fn, batch: int, heavy: bool = False) -> None:
    """Time ``fn``; ``heavy`` providers (seconds per call) get one warm-up and two rounds."""

    def step():
        fn()
        synchronize(DEVICE)

    for _ in range(1 if heavy else 2):
        step()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base_mem = torch.cuda.memory_allocated(DEVICE)
        step()
        benchmark.extra_info["peak_mem_mb"] = (torch.cuda.max_memory_allocated(DEVICE) - base_mem) / 2**20
    benchmark.group = group
    benchmark.extra_info.update(provider=provider, baseline=baseline, op=op, batch=batch, **RUN_INFO)
    rounds = 2 if heavy else (5 if DEVICE.type == "cuda" else 3)
    benchmark.pedantic(step, rounds=rounds, iterations=1)


def _run_graphed(benchmark, group: str, baseline: str, op: str, model, target, method: str, images, batch: int,
                 dtype: str) -> None:
    """``ours-<method>-graph``: the engine call captured in a CUDA graph (CAMEngine.graphed), replayed."""
    if DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    engine = CAMEngine(model, method, target, warn_degenerate=False, boxes=False)
    with _autocast(dtype):
        graphed = engine.graphed(images)

    def fn():
        graphed(images, copy=False)

    _run(benchmark, group, f"ours-{method}-graph", baseline, op, fn, batch)
    # A replay allocates nothing (its memory is the graph's private pool, held from the capture on):
    # the peak-memory table would read 0, so the row is left out of it.
    benchmark.extra_info.pop("peak_mem_mb", None)


def _fwd_partial_bwd(model, target, images):
    logits, act = forward_with_activation(model, target, images)
    torch.autograd.grad(logits.max(1).values.sum(), act)


def _peer(provider: str, model, target):
    """``(run(images), release())`` for a peer library's method, or ``None`` when it is not installed.

    Both peers keep hooks on the model while they live, so ``release`` must run before the next provider.
    """
    peer = "torchcam" if provider.startswith("torchcam-") else "pytorch-grad-cam"
    method = provider[len(peer) + 1:]
    try:
        if peer == "torchcam":
            from torchcam import methods as tcm

            cls = {"gradcam": tcm.GradCAM, "gradcam++": tcm.GradCAMpp, "layercam": tcm.LayerCAM}[method]
            extractor = cls(model, target_layer=target, input_shape=(3, SIZE, SIZE))

            def run(images):  # torchcam returns maps at feature resolution: no upsampling, no boxes
                scores = model(images)
                return extractor(scores.argmax(1).tolist(), scores)

            return run, extractor.remove_hooks
        import pytorch_grad_cam as pgc

        cls = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "layercam": pgc.LayerCAM}[method]
        cam = cls(model=model, target_layers=[target])
        return (lambda images: cam(input_tensor=images, targets=None)), cam.activations_and_grads.release  # top-1, as ours
    except ImportError:
        return None


@pytest.mark.parametrize("provider", ["fwd+full-bwd", "eager-flm", "ours-fullycam", "ours-fullycam-cuda-ext",
                                      "ours-fullycam-graph", "pytorch-grad-cam-layercam-all"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [b for b in BATCHES if b <= 64])
def test_fully_cam_all_convs(benchmark, provider, batch, dtype):
    model, _, images = _setup("resnet50", batch)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    group = f"resnet50 all {len(convs)} convs b{batch} {dtype}"
    if provider == "fwd+full-bwd":
        def fn():  # the gradient at every layer down to the input, as ours and eager-flm (no weight grads)
            leaf = images.detach().requires_grad_(True)
            with _autocast(dtype):
                logits = model(leaf)
            torch.autograd.grad(logits.float().max(1).values.sum(), leaf)
    elif provider == "eager-flm":
        def fn():  # every activation and every gradient alive at once
            acts = []
            hooks = [c.register_forward_hook(lambda m, i, o: acts.append(o)) for c in convs]
            try:
                with _autocast(dtype):
                    logits = model(images.detach().requires_grad_(True))
            finally:
                for h in hooks:
                    h.remove()
            grads = torch.autograd.grad(logits.max(1).values.sum(), acts)
            fused = 0
            for a, g in zip(acts, grads):
                m = (g.float().relu() * a.float().relu()).sum(1, keepdim=True)
                m = F.interpolate(m, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
                flat = m.flatten(1)
                fused = fused + ((flat - flat.amin(1, keepdim=True)) / (flat.amax(1, keepdim=True) - flat.amin(1, keepdim=True)).clamp_min(1e-12))
            return fused
    elif provider == "ours-fullycam":
        engine = CAMEngine(model, "fullycam", warn_degenerate=False, boxes=False)

        def fn():
            with _autocast(dtype):
                engine(images)
    elif provider == "ours-fullycam-cuda-ext":
        # The per-layer reductions through the CUDA extension's kernel, launched from C++ (opt-in).
        probe = torch.zeros((1, 1, 1, 1), device=DEVICE)
        with environment(CUDA_KERNEL_ENV, "1"):
            if DEVICE.type != "cuda" or _native_grad_modes(probe, probe, "flm", "auto") is None:
                pytest.skip("needs a GPU and a CUDA extension with weighted_map_grad")
        engine = CAMEngine(model, "fullycam", warn_degenerate=False, boxes=False)

        def fn():
            with environment(CUDA_KERNEL_ENV, "1"), _autocast(dtype):
                engine(images)
    elif provider == "ours-fullycam-graph":
        # CAMEngine.graphed: the 53 per-layer reductions, launched from autograd's tensor hooks in
        # Python (the host time the eager row spends), captured once and replayed.
        _run_graphed(benchmark, group, "fwd+full-bwd", "fullycam_all_convs", model, None, "fullycam", images, batch,
                     dtype)
        return
    else:
        try:
            import pytorch_grad_cam as pgc
        except Exception:
            pytest.skip("pytorch-grad-cam is not installed")
        if dtype == "bf16":
            pytest.skip("pytorch-grad-cam runs in the model's dtype only")
        cam = pgc.LayerCAM(model=model, target_layers=convs)

        def fn():
            cam(input_tensor=images, targets=None)  # grad-cam 1.5.x: targets has no default

        try:
            _run(benchmark, group, provider, "fwd+full-bwd", "fullycam_all_convs", fn, batch, heavy=True)
        finally:
            cam.activations_and_grads.release()
            model.zero_grad(set_to_none=True)
        return
    _run(benchmark, group, provider, "fwd+full-bwd", "fullycam_all_convs", fn, batch)


# pytest varies the top decorator fastest: providers first, so that each (model, batch, dtype) group
# completes before the next begins (one model build per group, and a time box that cuts the suite
# still leaves whole groups); models vary slowest.
@pytest.mark.parametrize(
    "provider",
    ["fwd", "fwd+partial-bwd", "eager-gradcam"]
    + [f"ours-{m}" for m in METHODS] + ["ours-gradcam-graph"]
    + [f"{peer}-{m}" for peer in ("pytorch-grad-cam", "torchcam") for m in METHODS[1:]],
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("model_name", MODELS)
def test_single_layer_cams(benchmark, provider, model_name, batch, dtype):
    is_peer = provider.startswith(("pytorch-grad-cam", "torchcam"))
    if is_peer and (dtype == "bf16" or batch > 64):
        pytest.skip("peers are measured in fp32 at batch <= 64 (their per-image CPU loops dominate)")
    if provider == "ours-cam" and model_name == "vgg16":
        pytest.skip("VGG16's head is not GAP + linear: no plain CAM")
    model, target, images = _setup(model_name, batch)
    group = f"{model_name} b{batch} {dtype}"
    if provider == "fwd":
        def fn():
            with torch.no_grad(), _autocast(dtype):
                model(images)
    elif provider == "fwd+partial-bwd":
        def fn():
            with _autocast(dtype):
                _fwd_partial_bwd(model, target, images)
    elif provider == "eager-gradcam":
        def fn():
            with _autocast(dtype):
                eager_gradcam(model, target, images)
    elif provider == "ours-gradcam-graph":
        # CAMEngine.graphed: the same work captured once and replayed (no per-layer launches from Python).
        _run_graphed(benchmark, group, "fwd+partial-bwd", "cam_single_layer", model, target, "gradcam", images, batch,
                     dtype)
        return
    elif provider.startswith("ours-"):
        method = provider[len("ours-"):]
        # Maps only, as the floors, the eager baseline and the peers give (boxes: the boxes suite).
        engine = CAMEngine(model, method, target, warn_degenerate=False, boxes=False)

        def fn():
            with _autocast(dtype):
                engine(images)
    else:
        peer = _peer(provider, model, target)
        if peer is None:
            pytest.skip(f"{provider.rsplit('-', 1)[0]} is not installed")
        run, release = peer

        def fn():
            run(images)

        try:
            _run(benchmark, group, provider, "fwd+partial-bwd", "cam_single_layer", fn, batch)
        finally:
            release()
            model.zero_grad(set_to_none=True)
        return
    _run(benchmark, group, provider, "fwd+partial-bwd", "cam_single_layer", fn, batch)


def test_backend_is_live():
    """Not a timing: record which kernels the numbers above used."""
    print(f"rethinkcam_fast native={rethinkcam_fast.has_native()} cuda_kernels={rethinkcam_fast.has_cuda_kernels()}")
