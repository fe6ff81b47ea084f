"""CAM ops and engine on a CUDA device (Triton kernels) against the CPU reference (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from _models import MiniResNet, make
from test_cam_ops import oracle_fuse, oracle_weighted

import rethinkcam_fast
from rethinkcam_fast import CAMEngine, fuse_maps, weighted_map
from rethinkcam_fast.ops.weighted_map import CUDA_KERNEL_ENV, _native_grad_modes, weighted_map_reference

pytestmark = pytest.mark.cuda
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)


@pytest.mark.parametrize("kernel", ["triton", "cuda-extension"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(64, 2048, 7, 7), (4, 256, 10, 10), (8, 512, 28, 28), (2, 64, 112, 112)], ids=str)
def test_weighted_map_on_gpu(monkeypatch, kernel, dtype, layout, shape):
    """Every mode; Grad-CAM/Grad-CAM++ take the one-pass kernel up to 128 positions (7x7, 10x10) and
    the weights kernel + channel sum beyond (28x28, 112x112)."""
    if kernel == "cuda-extension":  # the gradient modes through csrc/cuda/weighted_map.cu (opt-in)
        monkeypatch.setenv(CUDA_KERNEL_ENV, "1")
        probe = torch.zeros((1, 1, 1, 1), device="cuda")
        if _native_grad_modes(probe, probe, "flm", "auto") is None:
            pytest.skip("the CUDA extension has no weighted_map_grad")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(shape, generator=gen).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    w = torch.randn(shape[:2], generator=gen).to(dtype)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    ac, gc, wc = a.cuda().to(memory_format=fmt), g.cuda().to(memory_format=fmt), w.cuda()
    for mode in ("channel", "layercam", "flm", "gradcam", "gradcam++"):
        # Grad-CAM++ on post-ReLU activations, as its targets give (its float32 formula cancels on signed ones)
        acts, acts_gpu = (a.relu(), ac.relu()) if mode == "gradcam++" else (a, ac)
        weights, grads = (wc, None) if mode == "channel" else (None, gc)  # (the other is refused)
        got = weighted_map(acts_gpu, weights, grads, mode=mode, relu=True).cpu()
        want = oracle_weighted(acts, w, g, mode, True)
        scale = max(1.0, float(want.abs().max())) if mode == "gradcam++" else 1.0
        torch.testing.assert_close(got.double(), want, atol=1e-4 * shape[1] ** 0.5 * scale, rtol=1e-3)


@pytest.mark.skipif(rethinkcam_fast._native.cuda_module() is None, reason="CUDA extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_extension_weighted_map_is_used_and_keeps_the_nan_policy(monkeypatch, dtype):
    """Opted in, the gradient modes run the extension's kernel (not float64: Triton's); NaN inside
    the sums counts as 0, a NaN sum stays NaN through the ReLU; odd strides and sizes."""
    monkeypatch.setenv(CUDA_KERNEL_ENV, "1")
    gen = torch.Generator().manual_seed(5)
    a = torch.randn((3, 37, 5, 9), generator=gen).to(dtype)
    g = torch.randn((3, 37, 5, 9), generator=gen).to(dtype)
    a[0, 3, 1, 1], g[1, 4, 2, 2] = float("nan"), float("nan")
    ac, gc = a.cuda(), g.cuda().to(memory_format=torch.channels_last)  # mixed layouts: the strided path
    assert _native_grad_modes(ac, gc, "flm", "auto") is not None
    assert _native_grad_modes(ac.double(), gc.double(), "flm", "auto") is None
    for mode in ("layercam", "flm"):
        for relu in (True, False):
            got = weighted_map(ac, grads=gc, mode=mode, relu=relu).cpu()
            want = weighted_map_reference(a, None, g, mode, relu)  # the NaN policy's reference
            torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3, equal_nan=True)
    monkeypatch.setenv(CUDA_KERNEL_ENV, "0")
    assert _native_grad_modes(ac, gc, "flm", "auto") is None


@pytest.mark.skipif(rethinkcam_fast._native.cuda_module() is None, reason="CUDA extension not built")
def test_fullycam_with_the_cuda_extension_kernel_matches_triton(monkeypatch):
    model = make(MiniResNet).cuda()
    images = torch.randn(4, 3, 64, 64, device="cuda")
    triton_cams = CAMEngine(model, "fullycam", warn_degenerate=False)(images).cams
    monkeypatch.setenv(CUDA_KERNEL_ENV, "1")
    cuda_cams = CAMEngine(model, "fullycam", warn_degenerate=False)(images).cams
    torch.testing.assert_close(cuda_cams, triton_cams, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(rethinkcam_fast._native.cuda_module() is None, reason="CUDA extension not built")
def test_graphed_fullycam_with_the_cuda_extension_kernel(monkeypatch):
    """The case the extension's kernel is for: launched from C++ inside autograd hooks while a CUDA
    graph captures; the replay equals the eager Triton maps."""
    model = make(MiniResNet).cuda().eval()
    images = torch.randn(4, 3, 64, 64, device="cuda")
    want = CAMEngine(model, "fullycam", warn_degenerate=False, boxes=False)(images).cams
    monkeypatch.setenv(CUDA_KERNEL_ENV, "1")
    graphed = CAMEngine(model, "fullycam", warn_degenerate=False, boxes=False).graphed(images)
    for _ in range(2):
        torch.testing.assert_close(graphed(images).cams, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fuse", ["sum", "max"])
def test_fuse_maps_on_gpu(fuse):
    gen = torch.Generator().manual_seed(1)
    sizes = [(112, 112), (56, 56), (28, 28), (14, 14), (7, 7)]
    maps = [torch.rand((16, *s), generator=gen) for s in sizes]
    maps[2][3] = 1.0
    got, degenerate = fuse_maps([m.cuda() for m in maps], (224, 224), fuse=fuse)
    torch.testing.assert_close(got.cpu().double(), oracle_fuse(maps, (224, 224), fuse), atol=1e-5, rtol=1e-5)
    assert not degenerate.any()


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++", "layercam", "fullycam"])
def test_engine_gpu_matches_cpu_reference(method):
    model = make(MiniResNet)
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    cpu = CAMEngine(model, method, backend="reference", warn_degenerate=False)(images)
    gpu = CAMEngine(model.cuda(), method, warn_degenerate=False)(images.cuda())
    model.cpu()
    assert gpu.cams.is_cuda and torch.equal(gpu.labels.cpu(), cpu.labels)
    torch.testing.assert_close(gpu.cams.cpu(), cpu.cams, atol=2e-3, rtol=1e-3)


def test_engine_bf16_autocast_channels_last_on_gpu():
    model = make(MiniResNet).cuda().to(memory_format=torch.channels_last)
    images = torch.randn(4, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        result = CAMEngine(model, "gradcam", warn_degenerate=False)(images)
    assert result.cams.shape == (4, 64, 64) and result.cams.min() >= 0 and result.cams.max() <= 1


@pytest.mark.parametrize("method,backend", [("cam", "auto"), ("gradcam", "auto"), ("gradcam++", "auto"),
                                            ("layercam", "auto"), ("fullycam", "auto"), ("fullycam", "reference")])
def test_graphed_engine_replays_what_the_engine_gives(method, backend):
    """CAMEngine.graphed: one capture, replayed on new images of the same shape, gives the eager
    engine's labels, maps, thresholds and boxes; the copies survive the next replay. The PyTorch
    reference path too (its upsampling builds its tables on the device: a host copy would sync,
    which a capture refuses)."""
    model = make(MiniResNet).cuda()
    engine = CAMEngine(model, method, warn_degenerate=False, backend=backend)
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(4, 3, 64, 64, generator=gen).cuda() for _ in range(3)]
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # Fully-CAM's backward crosses every conv: one algorithm each
    try:
        graphed = engine.graphed(batches[0])
        replayed = [graphed(b) for b in batches]
        for images, got in zip(batches, replayed):
            want = engine(images)
            assert torch.equal(got.labels, want.labels) and torch.equal(got.boxes, want.boxes)
            assert torch.equal(got.thresholds, want.thresholds)
            torch.testing.assert_close(got.cams, want.cams, atol=1e-6, rtol=0)
    finally:
        torch.backends.cudnn.deterministic = deterministic
    assert engine.boxes and engine.warn_degenerate is False  # the caller's engine is left as it was
    with pytest.raises(ValueError, match="capture another"):
        graphed(torch.randn(2, 3, 64, 64, device="cuda"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_graphed_engines_on_two_devices_in_one_process():
    """A capture on cuda:1 after one on cuda:0: each replays its own work (torch.cuda.graph's default
    capture stream is made once, on the device current at the process's first capture)."""
    engines, batches = {}, {}
    for index in (0, 1):
        device = torch.device("cuda", index)
        model = make(MiniResNet).to(device)
        gen = torch.Generator().manual_seed(index)
        batches[index] = [torch.randn(2, 3, 32, 32, generator=gen).to(device) for _ in range(2)]
        engine = CAMEngine(model, "gradcam", warn_degenerate=False)
        engines[index] = (engine, engine.graphed(batches[index][0]))
    for index, (engine, graphed) in engines.items():
        for images in batches[index]:
            got, want = graphed(images), engine(images)
            assert got.cams.device == images.device
            assert torch.equal(got.labels, want.labels) and torch.equal(got.boxes, want.boxes)
            torch.testing.assert_close(got.cams, want.cams, atol=1e-6, rtol=0)


@pytest.mark.parametrize("convention", ["wsol", "exact"])
def test_graphed_engine_cuts_boxes_from_one_packed_copy(convention):
    """The replay's thresholds and levels come to the host in one copy; the boxes go back to the
    device, equal to the eager engine's, with copy=False too."""
    model = make(MiniResNet).cuda()
    engine = CAMEngine(model, "gradcam", warn_degenerate=False, box_convention=convention)
    images = torch.randn(3, 3, 64, 64, device="cuda")
    graphed = engine.graphed(images)
    assert graphed._host is not None and graphed._host.is_pinned()
    want = engine(images)
    for copy in (True, False):
        got = graphed(images, copy=copy)
        assert got.boxes.device == images.device and got.boxes.dtype == torch.int64
        assert torch.equal(got.boxes, want.boxes) and torch.equal(got.thresholds, want.thresholds)


def test_graphed_engine_with_a_fixed_target_and_autocast():
    model = make(MiniResNet).cuda().to(memory_format=torch.channels_last)
    engine = CAMEngine(model, "gradcam", warn_degenerate=False)
    images = torch.randn(2, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        graphed = engine.graphed(images, targets=3)
        want = engine(images, 3)
    # Leaving autocast frees its cached bf16 weights; give that memory to something else before the
    # replay (a graph that had read the cache would now read this).
    torch.cuda.empty_cache()
    clobber = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(8)]
    got = graphed(images)
    del clobber
    assert got.labels.tolist() == [3, 3]
    torch.testing.assert_close(got.cams, want.cams, atol=1e-6, rtol=0)


def test_differentiable_ops_are_capturable_in_a_cuda_graph():
    """class_activation_map and flm_fuse forward+backward captured in a CUDA graph (no host sync:
    the labels check is skipped during a capture) replay what eager gives."""
    torch.manual_seed(0)
    feats = torch.randn(4, 64, 7, 7, device="cuda").relu_().requires_grad_(True)
    weight = torch.randn(10, 64, device="cuda").requires_grad_(True)
    labels = torch.tensor([1, 3, 3, 9], device="cuda")
    acts = [torch.randn(4, 8, s, s, device="cuda").requires_grad_(True) for s in (14, 7)]
    grads = [torch.randn_like(a).requires_grad_(True) for a in acts]
    grad_out = torch.randn(4, 56, 56, device="cuda")
    leaves = [feats, weight, *acts, *grads]

    def step():
        for t in leaves:
            t.grad = None
        cams = rethinkcam_fast.class_activation_map(feats, weight, labels, output_size=(56, 56))
        fused = rethinkcam_fast.flm_fuse(acts, grads, (56, 56))
        (cams * grad_out).sum().add((fused * grad_out).sum()).backward()
        return cams, fused

    want_cams, want_fused = (t.clone() for t in step())
    want_grads = [t.grad.clone() for t in leaves]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cams, fused = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(cams, want_cams, atol=1e-6, rtol=0)
    torch.testing.assert_close(fused, want_fused, atol=1e-6, rtol=0)
    for got, want in zip((t.grad for t in leaves), want_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_current_stream_handle_is_torchs_current_stream():
    """The raw handle the CUDA kernels launch on follows torch's current stream (default and inside
    a torch.cuda.stream context), for a device with and without an index."""
    from rethinkcam_fast._native import current_stream_handle

    for device in (torch.device("cuda"), torch.device("cuda", torch.cuda.current_device())):
        assert current_stream_handle(device) == torch.cuda.current_stream(device).cuda_stream
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            assert current_stream_handle(device) == side.cuda_stream
