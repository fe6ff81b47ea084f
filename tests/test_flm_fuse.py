"""flm_fuse and the differentiable epilogue: forward equal to the engine's Fully-CAM, gradients exact
against autograd through the references and an independent float64 oracle, gradcheck, opcheck, edge
cases and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _models import MiniResNet, make
from conftest import requires_triton
from test_class_activation_map import assert_close_scaled

import rethinkcam_fast
from rethinkcam_fast import CAMEngine, flm_fuse
from rethinkcam_fast.ops import flm_fuse as flm_mod
from rethinkcam_fast.ops import map_epilogue as epi

# "auto" on the CPU: the C++ kernels (FLM reduction and epilogue, forward and backward)
BACKENDS = ["reference", "auto", pytest.param("triton", marks=requires_triton)]
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def oracle(activations, gradients, size, fuse):
    """DESIGN.md §2 in float64 with plain autograd; max fusion shares ties evenly (amax)."""
    parts = []
    for a, g in zip(activations, gradients):
        m = (g.double().clamp_min(0) * a.double().clamp_min(0)).sum(1)
        up = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].flatten(1)
        lo, hi = up.amin(1, keepdim=True), up.amax(1, keepdim=True)
        parts.append(((up - lo) / (hi - lo)))
    fused = sum(parts) if fuse == "sum" else torch.stack(parts).amax(0)
    if len(parts) > 1:
        lo, hi = fused.amin(1, keepdim=True), fused.amax(1, keepdim=True)
        fused = (fused - lo) / (hi - lo)
    return fused.view(-1, *size)


def make_layers(shapes, dtype, layout="nchw", seed=0):
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    acts = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(memory_format=fmt) for s in shapes]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(memory_format=fmt) for s in shapes]
    return [t.requires_grad_(True) for t in acts], [t.requires_grad_(True) for t in grads]


def check_against_oracle(acts, grads, size, fuse, backend, tol=None):
    out = flm_fuse(acts, grads, size, fuse, backend=backend)
    leaves = [t.detach().double().requires_grad_(True) for t in acts + grads]
    want = oracle(leaves[: len(acts)], leaves[len(acts):], size, fuse)
    tol = max(TOL[acts[0].dtype], tol or 0.0)
    assert_close_scaled(out, want, tol)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grad_out = grad_out.to(out.device)  # the generator draws on the CPU; the op may run on the GPU
    got = torch.autograd.grad(out, acts + grads, grad_out.to(out.dtype))
    wanted = torch.autograd.grad(want, leaves, grad_out)
    for g, w, t in zip(got, wanted, acts + grads):
        assert g.dtype == t.dtype
        assert_close_scaled(g, w, tol)
        if backend != "reference" and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
            assert g.is_contiguous(memory_format=torch.channels_last)


SHAPES = [(2, 4, 3, 3), (2, 3, 6, 5), (2, 70, 2, 2)]


def epilogue_forward(backend):
    """The epilogue's forward as ``backend`` runs it on these (CPU) maps."""
    if backend == "triton":
        return epi.map_epilogue_triton
    if backend == "auto":
        assert rethinkcam_fast._native.cpu_kernel("map_epilogue_forward") is not None  # (not the reference)
    return lambda maps, size, fuse, normalize=True: epi.epilogue_forward_impl(maps, size, fuse, normalize, backend)


def epilogue_backward(backend):
    """The epilogue's backward as ``backend`` runs it on these (CPU) maps."""
    if backend == "triton":
        return epi.map_epilogue_backward_triton
    if backend == "auto":
        assert rethinkcam_fast._native.cpu_kernel("map_epilogue_backward") is not None
    return lambda grad, maps, size, fuse, normalize=True: epi.epilogue_backward_impl(grad, maps, size, fuse,
                                                                                     normalize, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("fuse", ["sum", "max"])
def test_forward_and_gradients_match_oracle(backend, dtype, layout, fuse):
    acts, grads = make_layers(SHAPES, dtype, layout)
    check_against_oracle(acts, grads, (8, 9), fuse, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_layer(backend):
    acts, grads = make_layers([(2, 3, 4, 4)], torch.float32, seed=1)
    check_against_oracle(acts, grads, (7, 6), "sum", backend)


@pytest.mark.parametrize(
    "backend,fuse", [("reference", "sum"), ("reference", "max"), pytest.param("triton", "max", marks=requires_triton)]
)
def test_forward_equals_the_engines_fully_cam(backend, fuse):
    model = make(MiniResNet)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    result = CAMEngine(model, "fullycam", fuse=fuse, backend=backend, boxes=False, warn_degenerate=False)(images)
    acts = []
    hooks = [c.register_forward_hook(lambda m, i, o: acts.append(o)) for c in convs]
    logits = model(images.requires_grad_(True))
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(logits.gather(1, result.labels[:, None]).sum(), acts)
    out = flm_fuse([a.detach() for a in acts], list(grads), (32, 32), fuse, backend=backend)
    torch.testing.assert_close(out, result.cams, atol=1e-6, rtol=0)


EPILOGUE_CASES = [
    ([(3, 4)], (7, 9), "sum", True),
    ([(3, 4)], (7, 9), "sum", False),
    ([(40, 37)], (9, 70), "sum", True),  # down along one axis, up along the other; several source tiles
    ([(3, 4), (5, 5), (20, 18)], (11, 10), "sum", True),
    ([(3, 4), (5, 5)], (11, 10), "max", True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes,out_size,fuse,normalize", EPILOGUE_CASES, ids=str)
def test_epilogue_backward_is_exact(backend, sizes, out_size, fuse, normalize):
    """The written-out backward (reference), the C++ kernels (auto) and the Triton kernels against autograd through the
    differentiable reference forward, in float64."""
    gen = torch.Generator().manual_seed(len(sizes))
    maps = [torch.rand((2, *s), generator=gen, dtype=torch.float64, requires_grad=True) for s in sizes]
    want_out, _ = epi.map_epilogue_reference(maps, out_size, fuse, normalize)
    grad_out = torch.randn(want_out.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad(want_out, maps, grad_out)
    got = epilogue_backward(backend)(grad_out, [m.detach() for m in maps], out_size, fuse, normalize)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
    out, _ = epilogue_forward(backend)([m.detach() for m in maps], out_size, fuse, normalize)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sizes,fuse,normalize", [([(5, 6)], "sum", False), ([(5, 6)], "sum", True),
                                                  ([(5, 6), (3, 3), (9, 8), (1, 1)], "sum", True),
                                                  ([(5, 6), (3, 3), (9, 8), (1, 1)], "max", True)], ids=str)
def test_cpu_native_epilogue_equals_the_reference_on_edge_cases(dtype, sizes, fuse, normalize):
    """The C++ epilogue against the reference's forward (values, degenerate flags) and its written-out
    backward (NaN positions too; test_epilogue_backward_is_exact holds both to autograd): constant, NaN, inf and 1x1 source maps, a float64 map constant at float32 resolution
    (a map all the same: constancy is judged in float64 for float64 maps), ties at the extremes and
    between layers, a NaN upstream gradient, a 1x1 output; results equal whatever the thread count."""
    forward, backward = epilogue_forward("auto"), epilogue_backward("auto")
    gen = torch.Generator().manual_seed(21)
    maps = [torch.rand((7, *s), generator=gen, dtype=torch.float64).to(dtype) for s in sizes]
    maps[0][1] = 0.25  # constant
    maps[0][2, 1, 1] = float("nan")
    maps[0][3, 2, 2] = float("inf")
    maps[0][4] = torch.round(maps[0][4] * 2) / 2  # ties at the minimum and the maximum
    if dtype == torch.float64:
        maps[0][5] = 0.5 + 1e-12 * torch.rand((1, *sizes[0]), generator=gen, dtype=dtype)  # constant in float32
    if len(maps) > 1:
        maps[1][6] = maps[0][6, :3, :3]
    # The plateau of image 4 ties exactly in both at a dyadic scale (10x12 from layer 0's 5x6); at 33x70
    # F.interpolate's rounding leaves some of its pixels an ulp below the maximum (the kernel's lerp
    # keeps them tied), so there image 4's gradients are not compared.
    for size in [(1, 1), (10, 12), (33, 70)] if normalize else [(1, 1), (17, 12)]:
        compared = [n for n in range(7) if size != (33, 70) or n != 4]
        # Image 5 in float64 spans 1e-12: the two interpolation formulas' last-bit differences, times
        # 1 / span, are ~1e-4 of the normalised values. Its flags are compared; its values loosely.
        exact = [n for n in range(7) if not (dtype == torch.float64 and n == 5)]
        want, want_degenerate = epi.map_epilogue_reference(maps, size, fuse, normalize)
        grad_out = torch.randn(want.shape, generator=gen, dtype=dtype)
        grad_out[0, 0, 0] = float("nan")  # NaN sums: NaN at the pixel and at image 0's extremes
        wanted = epi.map_epilogue_backward_reference(grad_out, maps, size, fuse, normalize)
        threads = torch.get_num_threads()
        try:
            results = []
            for num_threads in (1, 2):
                torch.set_num_threads(num_threads)
                out, degenerate = forward(maps, size, fuse, normalize)
                results.append((out, degenerate, backward(grad_out, maps, size, fuse, normalize)))
        finally:
            torch.set_num_threads(threads)
        (out, degenerate, got), (out2, degenerate2, got2) = results
        assert torch.equal(out.isnan(), out2.isnan()) and torch.equal(out.nan_to_num(), out2.nan_to_num())
        assert torch.equal(degenerate, degenerate2)
        assert all(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
                   for a, b in zip(got, got2))
        assert out.dtype == want.dtype and torch.equal(degenerate, want_degenerate)
        torch.testing.assert_close(out[exact], want[exact], atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=0,
                                   equal_nan=True)
        torch.testing.assert_close(out, want, atol=1e-3, rtol=0, equal_nan=True)
        if dtype == torch.float64 and normalize and size != (1, 1):
            assert not degenerate[5] and out[5].max() == 1  # (a map in float64, not constant)
        assert len(got) == (len(maps) if normalize else 1)
        for g, w in zip(got, wanted):
            g, w = g[[n for n in compared if n in exact]], w[[n for n in compared if n in exact]]
            assert torch.equal(g.isnan(), w.isnan())
            scale = float(w.nan_to_num().abs().max()) or 1.0
            torch.testing.assert_close(g, w, atol=(1e-5 if dtype == torch.float32 else 1e-12) * scale, rtol=0,
                                       equal_nan=True)
        if normalize and not want_degenerate[0]:  # (a 1x1 output is constant: degenerate, zero gradient)
            assert torch.isnan(got[0][0]).any() and not torch.isnan(got[0][1:]).any()


def test_cpu_native_epilogue_near_the_float32_limit():
    """Finite neighbours of opposite signs near float32's limit: their difference overflows, where
    the interpolation must not turn a finite map into a non-finite (hence zeroed) one."""
    forward = epilogue_forward("auto")
    cases = [([torch.tensor([[[-2e38, 2e38, 1.0, 0.0]]])], (1, 2)),
             ([torch.tensor([[[-3e38, 3e38, 0.5]]]), torch.tensor([[[0.0, 1.0, 0.3]]])], (1, 3))]
    for maps, size in cases:
        want, want_degenerate = epi.map_epilogue_reference(maps, size)
        got, degenerate = forward(maps, size, "sum")
        assert torch.equal(degenerate, want_degenerate), maps
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        engine_out, _ = rethinkcam_fast.fuse_maps(maps, size)  # the inference epilogue's C++ kernel
        assert torch.isfinite(engine_out).all()


@pytest.mark.parametrize("fuse", ["sum", "max"])
def test_cpu_native_epilogue_forward_equals_the_engines_fuse_maps_bit_for_bit(fuse):
    """On the CPU the differentiable forward (float32) and the engine's inference epilogue compute the
    same values: one upsampling (exact on plateaus), one normalisation, one fusion order."""
    gen = torch.Generator().manual_seed(23)
    maps = [torch.rand((3, *s), generator=gen) for s in [(7, 7), (14, 14), (4, 5)]]
    maps[0][1] = torch.round(maps[0][1] * 2) / 2  # plateaus at the extremes
    maps[1][2] = 0.5  # a constant layer
    for layers in (maps[:1], maps):
        want = rethinkcam_fast.fuse_maps(layers, (33, 70), fuse=fuse)
        got = epilogue_forward("auto")(layers, (33, 70), fuse)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@requires_triton
@pytest.mark.parametrize("num_splits", [2, 4])
@pytest.mark.parametrize("sizes,out_size,fuse,normalize", EPILOGUE_CASES[:4], ids=str)
def test_epilogue_split_over_output_bands_is_exact(num_splits, sizes, out_size, fuse, normalize):
    """The GPU launch splits each (image, layer) over output chunks and bands; forced on the interpreter."""
    gen = torch.Generator().manual_seed(11)
    maps = [torch.rand((2, *s), generator=gen, dtype=torch.float64, requires_grad=True) for s in sizes]
    want_out, _ = epi.map_epilogue_reference(maps, out_size, fuse, normalize)
    grad_out = torch.randn(want_out.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad(want_out, maps, grad_out)
    got = epi.map_epilogue_backward_triton(grad_out, [m.detach() for m in maps], out_size, fuse, normalize,
                                           num_splits=num_splits)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
    out, _ = epi.map_epilogue_triton([m.detach() for m in maps], out_size, fuse, normalize, num_splits=num_splits)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=0)


@requires_triton
@pytest.mark.parametrize("num_splits", [2, 4, 8])
@pytest.mark.parametrize("fuse", ["sum", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_multi_layer_forward_split_equals_one_program_per_image_bit_for_bit(num_splits, fuse, dtype):
    """Several maps: a small batch splits each image's forward over output chunks (five kernels);
    everything the backward reads — output, fused map, tie counts, per-layer and final statistics,
    degenerate flags — equals the one-program kernel's exactly (forced splits on the interpreter),
    with a constant layer, a NaN layer, ties and an output that is not a multiple of the chunks."""
    gen = torch.Generator().manual_seed(17)
    maps = [torch.rand((3, s, s + 1), generator=gen).to(dtype) for s in (9, 5, 3)]
    maps.append(torch.full((3, 2, 2), 0.5, dtype=dtype))  # a constant layer: degenerate
    maps[1][1] = float("nan")  # image 1's second layer is not finite: degenerate
    maps[2][2] = torch.round(maps[2][2] * 2) / 2  # ties at the extremes
    size = (48, 45)  # 2,160 outputs: chunks of 1,024 — two real ones (the last partial), then empty ones
    assert epi.cdiv(48 * 45, epi.cdiv(epi.cdiv(48 * 45, num_splits), 1024) * 1024) >= 2
    one = epi._forward_triton(maps, size, fuse, True, store_out=True, num_splits=1)
    split = epi._forward_triton(maps, size, fuse, True, store_out=True, num_splits=num_splits)
    names = ("out", "degenerate", "fused", "count", "stats", "final")
    for name, a, b in zip(names, one[:6], split[:6]):
        assert torch.equal(a, b), name
    assert not one[1].any() and one[4][1, 1, 2] == 0 and one[4][0, 3, 2] == 0  # degenerate layers: 1/span = 0
    grad_out = torch.randn((3, *size), generator=gen).to(dtype)  # the backward from either state: equal
    from_one = epi.map_epilogue_backward_triton(grad_out, maps, size, fuse, True, num_splits=2, state=tuple(one[2:]))
    from_split = epi.map_epilogue_backward_triton(grad_out, maps, size, fuse, True, num_splits=2,
                                                  state=tuple(split[2:]))
    for a, b in zip(from_one, from_split):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_between_layers_and_degenerate_layers(backend):
    """Max fusion: layers tied at a pixel share its gradient; a constant layer gets none."""
    gen = torch.Generator().manual_seed(5)
    base = torch.rand((2, 3, 4), generator=gen, dtype=torch.float64)
    constant = torch.full((2, 5, 5), 0.25, dtype=torch.float64)
    maps = [base.clone().requires_grad_(True), base.clone().requires_grad_(True), constant.requires_grad_(True)]
    for fuse in ("sum", "max"):
        want_out, _ = epi.map_epilogue_reference(maps, (6, 8), fuse)
        grad_out = torch.randn(want_out.shape, generator=gen, dtype=torch.float64)
        want = torch.autograd.grad(want_out, maps, grad_out)
        got = epilogue_backward(backend)(grad_out, [m.detach() for m in maps], (6, 8), fuse)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(got[0], got[1])  # identical layers: equal shares
        assert (got[2] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fuse", ["sum", "max"])
def test_gradcheck_float64(backend, fuse):
    acts, grads = make_layers([(1, 2, 2, 3), (1, 2, 3, 3)], torch.float64, seed=4)

    def fn(*tensors):
        return flm_fuse(list(tensors[:2]), list(tensors[2:]), (4, 5), fuse, backend=backend)

    # Fast mode (random projections) on the slow interpreter; test_epilogue_backward_is_exact holds
    # the Triton backward to autograd exactly.
    assert torch.autograd.gradcheck(fn, (*acts, *grads), fast_mode=backend == "triton")


@pytest.mark.parametrize(
    "backend,layout",  # the registrations do not depend on the backend: one Triton run (interpreter time)
    [("reference", "nchw"), ("reference", "nhwc"), pytest.param("triton", "nhwc", marks=requires_triton)],
)
def test_opcheck(backend, layout):
    (a, b), (ga, gb) = make_layers([(2, 3, 3, 4), (2, 2, 5, 5)], torch.float32, layout, seed=6)
    torch.library.opcheck(torch.ops.rethinkcam_fast.flm_reduce, (a, ga, backend))
    grad_maps = torch.randn(2, 3, 4)
    torch.library.opcheck(torch.ops.rethinkcam_fast.flm_reduce_backward, (grad_maps, a.detach(), ga.detach(), backend))
    maps = [torch.rand(2, 3, 4, requires_grad=True), torch.rand(2, 5, 5, requires_grad=True)]
    for fuse in ("sum", "max"):
        torch.library.opcheck(torch.ops.rethinkcam_fast.map_epilogue, (maps, [6, 7], fuse, True, backend))
    torch.library.opcheck(torch.ops.rethinkcam_fast.map_epilogue_backward,
                          (torch.randn(2, 6, 7), [m.detach() for m in maps], [6, 7], "max", True, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    acts, grads = make_layers([(0, 3, 2, 2), (0, 2, 4, 4)], torch.float32)
    out = flm_fuse(acts, grads, (5, 5), backend=backend)
    assert out.shape == (0, 5, 5)
    got = torch.autograd.grad(out.sum(), acts + grads)
    assert [g.shape for g in got] == [t.shape for t in acts + grads]


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_layers_and_nan(backend):
    """NaN policy: relu(NaN) = 0 in the reduction; a constant or non-finite layer map is zeros with zero
    gradient; other images are unaffected."""
    acts, grads = make_layers([(3, 2, 3, 3), (3, 2, 4, 4)], torch.float32, seed=7)
    with torch.no_grad():
        grads[0][0] = 0.0  # image 0, layer 0: M = 0 everywhere (constant)
        acts[1][1, 0, 2, 2] = float("inf")  # image 1, layer 1: inf * relu(g) -> a non-finite map (or 0)
        grads[1][1, 0, 2, 2] = 1.0
        grads[0][2, 1, 0, 0] = float("nan")  # relu(NaN) = 0: no effect
    out = flm_fuse(acts, grads, (6, 6), backend=backend)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    got = torch.autograd.grad(out.sum(), acts + grads)
    assert (got[0][0] == 0).all() and (got[2][0] == 0).all()  # the constant layer of image 0
    assert (got[1][1] == 0).all() and (got[3][1] == 0).all()  # the non-finite layer of image 1
    assert all(torch.isfinite(g).all() for g in got)
    single = flm_fuse([acts[1][:1]], [grads[1][:1]], (6, 6), backend=backend)
    torch.testing.assert_close(out[0], single[0])  # image 0 is layer 1's map alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
def test_cpu_native_reduction_backward_equals_the_reference(dtype, layout):
    """The C++ backward of the FLM reduction gives the reference's values (NaN where it has NaN, the
    sign of every zero for inputs without -0.0), in the inputs' layout, whatever the thread count: an
    image whose map got no gradient gives zeros even against inf, a zero gradient against inf gives
    NaN as 0 * inf does. Mismatched shapes at the (public, unchecked) custom op go to the reference."""
    kernel = rethinkcam_fast._native.cpu_kernel("flm_reduce_backward")
    if kernel is None:
        pytest.skip("the C++ extension is not built")
    gen = torch.Generator().manual_seed(1)
    shape = (3, 37, 40, 41)  # over 131,072 elements: two threads share the work when two are allowed
    if layout == "strided":  # neither NCHW nor channels_last: the kernel's strided loop
        a = torch.randn(3, 40, 41, 37, generator=gen).permute(0, 3, 2, 1).transpose(2, 3).to(dtype)
    else:
        a = torch.randn(shape, generator=gen).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    if layout == "nhwc":
        a, g = a.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    grad_maps = torch.randn(3, 40, 41, generator=gen)
    grad_maps[1] = 0  # a dead image, with an inf and a NaN in its inputs
    grad_maps[1, 0, 0] = -0.0
    a[1, 0, 0, 0], g[1, 2, 3, 3] = float("inf"), float("nan")
    grad_maps[2, 2, 2] = -0.0  # 0 * inf in a live image: NaN, as PyTorch computes it
    a[2, 5, 2, 2], g[2, 6, 2, 2] = float("inf"), float("-inf")
    a[0, 1, 2, 3], g[0, 3, 4, 5] = float("nan"), float("nan")
    want = flm_mod.flm_reduce_backward_reference(grad_maps, a, g)
    assert want[1][2, 5, 2, 2].isnan()  # (the case is there: -0 * inf)
    threads = torch.get_num_threads()
    try:
        for num_threads in (1, 2):
            torch.set_num_threads(num_threads)
            got = flm_mod.flm_reduce_backward_native(kernel, grad_maps, a, g)
            for x, y in zip(got, want):
                assert x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride()
                assert torch.equal(x.isnan(), y.isnan())
                assert torch.equal(x.nan_to_num(), y.nan_to_num())
                assert torch.equal(x.signbit() & ~x.isnan(), y.signbit() & ~y.isnan())
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError):  # [4, h*w] maps: the reference's broadcasting fails, no C++ read
        torch.ops.rethinkcam_fast.flm_reduce_backward(grad_maps.flatten(1), a, g, "auto")
    one = torch.ops.rethinkcam_fast.flm_reduce_backward(grad_maps[:1], a, g, "auto")  # broadcast, as the reference
    want = flm_mod.flm_reduce_backward_reference(grad_maps[:1], a, g)
    assert all(torch.equal(x.nan_to_num(), y.nan_to_num()) for x, y in zip(one, want))
    with pytest.raises(RuntimeError):
        torch.ops.rethinkcam_fast.flm_reduce(a, g[:1, :, :, :5], "auto")


def test_cpu_native_reduction_backward_on_an_input_expanded_along_the_pixels():
    kernel = rethinkcam_fast._native.cpu_kernel("flm_reduce_backward")
    if kernel is None:
        pytest.skip("the C++ extension is not built")
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(2, 9, 1, 1, generator=gen).expand(2, 9, 12, 13)  # stride 0 along h and w
    g = torch.randn(2, 9, 12, 13, generator=gen)
    grad_maps = torch.randn(2, 12, 13, generator=gen)
    for x, y in zip(flm_mod.flm_reduce_backward_native(kernel, grad_maps, a, g),
                    flm_mod.flm_reduce_backward_reference(grad_maps, a, g)):
        assert torch.equal(x, y) and x.is_contiguous()


def test_bad_input_raises_clear_errors():
    (a,), (g,) = make_layers([(2, 3, 4, 4)], torch.float32)
    with pytest.raises(ValueError, match=r"gradients\[0\] must have the shape of activations\[0\]"):
        flm_fuse([a], [torch.randn(2, 3, 4, 5)], (8, 8))
    with pytest.raises(ValueError, match="one tensor per layer"):
        flm_fuse([a, a], [g], (8, 8))
    with pytest.raises(ValueError, match="at least one layer"):
        flm_fuse([], [], (8, 8))
    with pytest.raises(ValueError, match=r"activations\[1\] has batch 3"):
        flm_fuse([a, torch.randn(3, 3, 4, 4)], [g, torch.randn(3, 3, 4, 4)], (8, 8))
    with pytest.raises(TypeError, match=r"activations\[0\] must have a floating dtype"):
        flm_fuse([a.detach().long()], [g], (8, 8))
    with pytest.raises(TypeError, match="activations must be a list"):
        flm_fuse(a, [g], (8, 8))
    with pytest.raises(ValueError, match=r"gradients\[0\] must be a 4-D"):
        flm_fuse([a], [g[0]], (8, 8))
    with pytest.raises(ValueError, match="fuse must be one of"):
        flm_fuse([a], [g], (8, 8), fuse="mean")
    with pytest.raises(TypeError, match="output_size must be a pair"):
        flm_fuse([a], [g], None)
    with pytest.raises(ValueError, match="output_size must be positive"):
        flm_fuse([a], [g], (8, -1))
    with pytest.raises(ValueError, match="backend must be one of"):
        flm_fuse([a], [g], (8, 8), backend="native")


def test_exports():
    assert rethinkcam_fast.flm_fuse is flm_fuse
    assert rethinkcam_fast.FLMFuseFunction is flm_mod.FLMFuseFunction


@pytest.mark.slow
def test_torch_compile_fullgraph_forward_and_backward():
    acts, grads = make_layers([(2, 3, 3, 4), (2, 2, 5, 5)], torch.float32, seed=9)

    def loss(*tensors):
        return flm_fuse(list(tensors[:2]), list(tensors[2:]), (6, 7), "max", backend="reference").square().mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*acts, *grads), acts + grads)
    want = torch.autograd.grad(loss(*acts, *grads), acts + grads)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,fuse", [(torch.float32, "sum"), (torch.bfloat16, "max")], ids=str)
def test_resnet_like_layers_on_gpu(dtype, fuse):
    shapes = [(8, 64, 112, 112), (8, 256, 56, 56), (8, 512, 28, 28), (8, 2048, 7, 7)]
    acts, grads = make_layers(shapes, dtype, "nhwc", seed=8)
    acts = [t.detach().cuda().requires_grad_(True) for t in acts]
    grads = [t.detach().cuda().requires_grad_(True) for t in grads]
    check_against_oracle(acts, grads, (224, 224), fuse, "auto", tol=1e-4)  # float32 sums over 224² pixels


@pytest.mark.cuda
@pytest.mark.parametrize("sizes,out_size,fuse,normalize", EPILOGUE_CASES, ids=str)
def test_epilogue_backward_is_exact_on_gpu(sizes, out_size, fuse, normalize):
    gen = torch.Generator().manual_seed(len(sizes))
    maps = [torch.rand((2, *s), generator=gen, dtype=torch.float64) for s in sizes]
    want_out, _ = epi.map_epilogue_reference([m.requires_grad_(True) for m in maps], out_size, fuse, normalize)
    grad_out = torch.randn(want_out.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad(want_out, maps, grad_out)
    got = epi.map_epilogue_backward_triton(grad_out.cuda(), [m.detach().cuda() for m in maps], out_size, fuse, normalize)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, atol=1e-12, rtol=1e-10)


@requires_triton
def test_the_forward_state_is_released_by_the_backward_and_a_second_backward_recomputes_it():
    """The Functions keep the epilogue's forward state for the backward only: released by it (not
    held as long as the output lives), and a second backward with retain_graph gives the same
    gradients by recomputing."""
    gen = torch.Generator().manual_seed(23)
    acts = [torch.rand((2, 3, s, s), generator=gen, requires_grad=True) for s in (6, 3)]
    grads = [torch.rand((2, 3, s, s), generator=gen) for s in (6, 3)]
    cams = flm_fuse(acts, grads, (20, 18), backend="triton")
    assert cams.grad_fn.epilogue_state is not None
    grad_out = torch.randn(cams.shape, generator=gen)
    first = torch.autograd.grad(cams, acts, grad_out, retain_graph=True)
    assert cams.grad_fn.epilogue_state is None
    second = torch.autograd.grad(cams, acts, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_fuse_must_be_a_string():
    import numpy as np

    a, g = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for fuse in (np.array("sum"), None, ["sum"]):
        with pytest.raises(TypeError, match="fuse must be a str"):
            flm_fuse([a], [g], (8, 8), fuse=fuse)
    torch.testing.assert_close(flm_fuse([a], [g], (8, 8), fuse=np.str_("max")), flm_fuse([a], [g], (8, 8), fuse="max"))


def test_the_reference_differentiates_relu_at_exact_zeros_as_the_op():
    """Exact zeros are common in ReLU networks' activations and gradients: the reference's autograd
    passes no gradient there, as every backend's [G > 0] / [A > 0] masks (torch.fmax passed it)."""
    from rethinkcam_fast.ops.flm_fuse import flm_fuse_reference

    grads = {}
    for name, fn in (("op", lambda a, g: flm_fuse([a], [g], (1, 3), backend="reference")),
                     ("reference", lambda a, g: flm_fuse_reference([a], [g], (1, 3)))):
        a = torch.tensor([[[[1.0, 2.0, 3.0]]]], dtype=torch.float64, requires_grad=True)
        g = torch.tensor([[[[1.0, 0.0, 1.0]]]], dtype=torch.float64, requires_grad=True)
        fn(a, g).backward(torch.tensor([[[1.0, 0.0, 0.0]]], dtype=torch.float64))
        grads[name] = (a.grad, g.grad)
    for want, got in zip(grads["op"], grads["reference"]):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
