"""The CAM epilogue ops: weighted_map and fuse_maps, every backend against float64 oracles.

``"auto"`` on the CPU is the C++ kernels (csrc/cpu/weighted_map.cpp, fuse_maps.cpp) for the gradient
modes of weighted_map and for fuse_maps; ``"reference"`` is pure PyTorch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_triton

from rethinkcam_fast import _native, fuse_maps, weighted_map
from rethinkcam_fast.ops.fuse_maps import fuse_maps_reference, minmax_normalize

BACKENDS = ["auto", "reference", pytest.param("triton", marks=requires_triton)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
requires_native = pytest.mark.skipif(not _native.has_native(), reason="the C++ extension is not built")
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3, torch.float64: 1e-6}


def oracle_weighted(a, w, g, mode, relu):
    a, g = a.double(), None if g is None else g.double()
    if mode == "gradcam":
        w = g.mean((2, 3))
    elif mode == "gradcam++":  # DESIGN.md §2, as pytorch-grad-cam writes it
        g2 = g * g
        alpha = torch.where(g != 0, g2 / (2 * g2 + a.sum((2, 3))[:, :, None, None] * g2 * g + 1e-6), 0.0)
        w = (alpha * g.relu()).sum((2, 3))
    if mode in ("channel", "gradcam", "gradcam++"):
        m = (w.double()[:, :, None, None] * a).sum(1)
    elif mode == "layercam":
        m = (g.clamp_min(0) * a).sum(1)
    else:
        m = (g.clamp_min(0) * a.clamp_min(0)).sum(1)
    return m.clamp_min(0) if relu else m


def oracle_fuse(maps, size, fuse):
    def norm(x):
        out = torch.zeros_like(x)
        for i, m in enumerate(x):
            if torch.isfinite(m).all() and m.max() > m.min():
                out[i] = (m - m.min()) / (m.max() - m.min())
        return out

    fused = None
    for m in maps:
        src_const = [not (torch.isfinite(x).all() and x.max() > x.min()) for x in m]
        up = F.interpolate(m.double()[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        p = norm(up)
        p[torch.tensor(src_const, dtype=torch.bool)] = 0
        fused = p if fused is None else (fused + p if fuse == "sum" else torch.maximum(fused, p))
    return norm(fused)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 37, 5, 6), (1, 3, 1, 1), (3, 130, 7, 7), (2, 70, 12, 13)], ids=str)
def test_weighted_map_matches_oracle(backend, dtype, layout, shape):
    """(12 x 13 = 156 positions: Grad-CAM's and Grad-CAM++'s weights from their own kernel, then the
    channel sum; smaller maps compute both in one pass.)"""
    gen = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(shape, generator=gen).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    w = torch.randn(shape[:2], generator=gen).to(dtype)
    if layout == "nhwc":
        a, g = a.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    for mode in ("channel", "layercam", "flm", "gradcam", "gradcam++"):
        # Grad-CAM++ on post-ReLU activations, as its target layers give: on signed ones its
        # denominator 2 g² + sum(A) g³ cancels and any float32 evaluation (the reference's too) is
        # off by up to 1 % of the map's scale.
        acts = a.relu() if mode == "gradcam++" else a
        weights, grads = (w, None) if mode == "channel" else (None, g)  # (the other is refused)
        for relu in (True, False):
            got = weighted_map(acts, weights, grads, mode=mode, relu=relu, backend=backend)
            want = oracle_weighted(acts, w, g, mode, relu)
            assert got.dtype == torch.float32 and got.shape == (shape[0], shape[2], shape[3])
            scale = 1.0 if mode != "gradcam++" else max(1.0, float(want.abs().max()))  # its maps reach 1e4
            torch.testing.assert_close(got.double(), want, atol=TOL[dtype] * shape[1] ** 0.5 * scale, rtol=TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_map_empty_batch(backend):
    out = weighted_map(torch.randn(0, 4, 3, 3), torch.randn(0, 4), backend=backend)
    assert out.shape == (0, 3, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fuse", ["sum", "max"])
@pytest.mark.parametrize("sizes", [[(5, 6)], [(3, 3), (10, 12)], [(1, 1), (4, 4), (7, 5)]], ids=str)
@pytest.mark.parametrize("out_size", [(20, 24), (5, 6), (3, 2)], ids=str)
def test_fuse_maps_matches_oracle(backend, fuse, sizes, out_size):
    gen = torch.Generator().manual_seed(len(sizes) + out_size[0])
    maps = [torch.rand((3, *s), generator=gen) for s in sizes]
    maps[-1][1] = 0.5  # a constant map contributes zeros
    got, degenerate = fuse_maps(maps, out_size, fuse=fuse, backend=backend)
    want = oracle_fuse(maps, out_size, fuse)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    want_degenerate = torch.tensor([bool((w == 0).all()) for w in want])
    assert torch.equal(degenerate.cpu(), want_degenerate)
    assert got.min() >= 0 and got.max() <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuse_maps_nonfinite_and_constant_maps_become_zeros(backend):
    m = torch.rand(4, 5, 5)
    m[0, 1, 1] = float("nan")
    m[1, 0, 0] = float("inf")
    m[2] = 3.0
    got, degenerate = fuse_maps(m, (10, 10), backend=backend)
    assert degenerate.tolist() == [True, True, True, False]
    assert (got[:3] == 0).all() and torch.isfinite(got).all()
    torch.testing.assert_close(got[3:].double(), oracle_fuse([m[3:]], (10, 10), "sum"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuse_maps_empty_batch(backend):
    got, degenerate = fuse_maps(torch.rand(0, 3, 3), (6, 6), backend=backend)
    assert got.shape == (0, 6, 6) and degenerate.shape == (0,)


def test_minmax_normalize_reference_conventions():
    maps = torch.tensor([[[1.0, 3.0]], [[2.0, 2.0]], [[float("nan"), 1.0]]])
    out, degenerate = minmax_normalize(maps)
    assert out.tolist() == [[[0.0, 1.0]], [[0.0, 0.0]], [[0.0, 0.0]]]
    assert degenerate.tolist() == [False, True, True]


def test_opcheck_on_the_custom_ops():
    a, g, w = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4), torch.randn(2, 5)
    torch.library.opcheck(torch.ops.rethinkcam_fast.weighted_map, (a, w, None, "channel", True, "reference"))
    torch.library.opcheck(torch.ops.rethinkcam_fast.weighted_map, (a, None, g, "flm", False, "reference"))
    maps = [torch.rand(2, 3, 4), torch.rand(2, 5, 5)]
    torch.library.opcheck(torch.ops.rethinkcam_fast.fuse_maps, (maps, [8, 8], "sum", "reference"))


def test_bad_input_raises_clear_errors():
    a = torch.randn(2, 5, 3, 4)
    with pytest.raises(ValueError, match="weights must have shape"):
        weighted_map(a, torch.randn(2, 4))
    with pytest.raises(ValueError, match="grads must have the activations' shape"):
        weighted_map(a, grads=torch.randn(2, 5, 3, 3), mode="layercam")
    with pytest.raises(ValueError, match="mode must be one of"):
        weighted_map(a, torch.randn(2, 5), mode="sum")
    with pytest.raises(TypeError, match="activations must have a floating dtype"):
        weighted_map(a.long(), torch.randn(2, 5))
    with pytest.raises(ValueError, match="activations must be a 4-D"):
        weighted_map(a[0], torch.randn(2, 5))
    with pytest.raises(ValueError, match="maps must hold at least one"):
        fuse_maps([], (4, 4))
    with pytest.raises(ValueError, match=r"maps\[1\] has batch 3"):
        fuse_maps([torch.rand(2, 3, 3), torch.rand(3, 3, 3)], (4, 4))
    with pytest.raises(ValueError, match="fuse must be one of"):
        fuse_maps(torch.rand(2, 3, 3), (4, 4), fuse="mean")
    with pytest.raises(ValueError, match="output_size must be positive"):
        fuse_maps(torch.rand(2, 3, 3), (0, 4))
    with pytest.raises(ValueError, match="backend must be one of"):
        weighted_map(a, torch.randn(2, 5), backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        fuse_maps(torch.rand(2, 3, 3), (4, 4), backend="native")
    # an argument the mode does not use is refused, not dropped
    with pytest.raises(TypeError, match="mode='channel' does not use grads="):
        weighted_map(a, torch.randn(2, 5), grads=torch.randn_like(a), mode="channel")
    for mode in ("layercam", "gradcam"):
        with pytest.raises(TypeError, match=f"mode='{mode}' does not use weights="):
            weighted_map(a, torch.randn(2, 5), grads=torch.randn_like(a), mode=mode)
    with pytest.raises(ValueError, match="normalize=False takes one map"):  # (the registered epilogue op)
        torch.ops.rethinkcam_fast.map_epilogue([torch.rand(2, 3, 3)] * 2, [4, 4], "sum", False, "auto")
    with pytest.raises(TypeError, match="relu must be a bool"):  # (bool("no") would be True)
        weighted_map(a, grads=torch.randn_like(a), mode="layercam", relu="no")
    maps = torch.rand(2, 3, 3)  # fuse positional, as flm_fuse's
    assert torch.equal(fuse_maps(maps, (4, 4), "max")[0], fuse_maps(maps, (4, 4), fuse="max")[0])


def test_fuse_maps_output_size_is_checked_like_the_other_ops():
    maps = torch.rand(2, 4, 4)
    for bad, error in (((2.5, 3), TypeError), ((5,), TypeError), (None, TypeError), ((0, 4), ValueError)):
        with pytest.raises(error, match="output_size"):
            fuse_maps(maps, bad)
    assert fuse_maps(maps, torch.Size([6, 8]))[0].shape == (2, 6, 8)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, by design
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_span_past_float32_is_flagged_not_nan(backend):
    """Finite values near +-3e38 have a span that overflows float32: flagged (zeros), never NaN."""
    maps = torch.tensor([[[3e38, -3e38], [0.0, 1.0]], [[0.0, 0.5], [0.25, 1.0]]])
    cams, degenerate = fuse_maps(maps, (4, 4), backend=backend)
    assert degenerate.tolist() == [True, False] and torch.isfinite(cams).all() and not cams[0].any()


# -- the C++ CPU kernels specifically ------------------------------------------------------------


@requires_native
def test_auto_on_the_cpu_runs_the_native_kernels_and_reference_does_not(monkeypatch):
    module = _native.cpu_module()
    calls = []
    for name in ("weighted_map_grad", "fuse_maps"):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    a, g = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    weighted_map(a, grads=g, mode="flm", relu=False, backend="reference")
    fuse_maps(torch.rand(2, 3, 3), (6, 6), backend="reference")
    assert calls == []
    weighted_map(a, grads=g, mode="flm", relu=False)
    weighted_map(a, torch.randn(2, 5), mode="channel")  # an einsum: stays in PyTorch
    fuse_maps(torch.rand(2, 3, 3), (6, 6))
    assert calls == ["weighted_map_grad", "fuse_maps"]


@requires_native
@pytest.mark.parametrize("layouts", [("nchw", "nhwc"), ("nhwc", "nchw"), ("transposed", "nchw"), ("nchw", "sliced")])
def test_native_weighted_map_reads_mixed_and_strided_layouts(layouts):
    gen = torch.Generator().manual_seed(3)

    def make(layout):
        if layout == "nhwc":
            return torch.randn(2, 9, 5, 6, generator=gen).to(memory_format=torch.channels_last)
        if layout == "transposed":  # H and W swapped: neither NCHW nor channels_last
            return torch.randn(2, 9, 6, 5, generator=gen).transpose(2, 3)
        if layout == "sliced":  # every other channel of a bigger tensor
            return torch.randn(2, 18, 5, 6, generator=gen)[:, ::2]
        return torch.randn(2, 9, 5, 6, generator=gen)

    a, g = make(layouts[0]), make(layouts[1])
    for mode in ("layercam", "flm"):
        got = weighted_map(a, grads=g, mode=mode, relu=False)
        torch.testing.assert_close(got.double(), oracle_weighted(a, None, g, mode, False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_weighted_map_nan_policy_is_the_same_on_every_backend(backend, layout):
    """relu(NaN) = 0 inside the sums (Fully-CAM's FLM policy), NaN kept by the ReLU of the summed map."""
    a, g = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    a[0, 2, 1, 1] = float("nan")
    g[1, 0, 2, 2] = float("nan")
    a[2, 1, 3, 3] = float("inf")
    w = torch.randn(3, 4)
    w[2, 0] = float("nan")
    if layout == "nhwc":
        a, g = a.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    relu0 = lambda x: torch.fmax(x.double(), torch.zeros((), dtype=torch.float64))  # noqa: E731
    sums = {"channel": (w.double()[:, :, None, None] * a.double()).sum(1),
            "layercam": (relu0(g) * a.double()).sum(1),
            "flm": (relu0(g) * relu0(a)).sum(1)}
    for mode, want_sum in sums.items():
        for relu in (False, True):
            weights, grads = (w, None) if mode == "channel" else (None, g)
            got = weighted_map(a, weights, grads, mode=mode, relu=relu, backend=backend).double()
            want = torch.where(want_sum < 0, 0.0, want_sum) if relu else want_sum
            assert torch.equal(torch.isnan(got), torch.isnan(want)), (mode, relu)
            assert torch.equal(torch.isinf(got), torch.isinf(want)), (mode, relu)
            finite = torch.isfinite(want)
            torch.testing.assert_close(got[finite], want[finite], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["gradcam", "gradcam++"])
def test_gradient_weight_modes_keep_the_nan_of_a_gradient(backend, mode):
    """Grad-CAM / Grad-CAM++ weights from a NaN gradient are NaN, so the whole map is NaN (the epilogue
    flags it degenerate), as the engine's PyTorch formulas made it; an infinite activation shows where
    the formula puts it. NaN/inf patterns and finite values equal the float64 oracle's."""
    for side in (5, 12):  # one-pass kernel; weights kernel + channel sum
        _check_gradient_weight_nan_policy(backend, mode, side)


def _check_gradient_weight_nan_policy(backend, mode, side):
    a, g = torch.randn(3, 4, side, side).relu(), torch.randn(3, 4, side, side)
    g[1, 0, 2, 2] = float("nan")
    a[2, 1, 3, 3] = float("inf")
    for relu in (False, True):
        got = weighted_map(a, grads=g, mode=mode, relu=relu, backend=backend).double()
        want = oracle_weighted(a, None, g, mode, False)
        want = torch.where(want < 0, 0.0, want) if relu else want
        assert bool(torch.isnan(got[1]).all())
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_reductions_sum_in_float32_under_autocast(backend):
    """Autocast would run the references' einsums in bfloat16 (errors ~1e-3, shifting uint8 levels)."""
    from rethinkcam_fast import class_activation_map

    gen = torch.Generator().manual_seed(2)
    a = torch.randn(2, 256, 7, 7, generator=gen).relu().bfloat16()
    w = torch.randn(10, 256, generator=gen) * 0.05
    labels = torch.tensor([1, 2])
    exact = torch.einsum("nk,nkhw->nhw", w[labels].double(), a.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mapped = weighted_map(a, w[labels], relu=False, backend=backend)
        raw = class_activation_map(a, w, labels, normalize=False, backend=backend)
    for got in (mapped, raw):
        assert got.dtype == torch.float32
        assert float((got.double() - exact).abs().max() / exact.abs().max()) < 1e-5


@requires_native
def test_native_kernels_do_not_depend_on_the_thread_count():
    gen = torch.Generator().manual_seed(5)
    a, g = torch.randn(4, 64, 40, 40, generator=gen), torch.randn(4, 64, 40, 40, generator=gen)
    maps = [torch.rand(4, *s, generator=gen) for s in ((7, 7), (14, 14), (28, 28))]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append((weighted_map(a, grads=g, mode="flm", relu=False),
                            weighted_map(a.to(memory_format=torch.channels_last), grads=g.to(memory_format=torch.channels_last),
                                         mode="layercam", relu=True),
                            *fuse_maps(maps, (224, 224))))
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(*results):
        assert torch.equal(one, three)


@requires_native
@pytest.mark.parametrize("fuse", ["sum", "max"])
def test_native_fuse_maps_equals_the_reference_bit_for_bit_at_cam_sizes(fuse):
    """The engine's shapes: 7..112-pixel layers to 224², constant and non-finite layers mixed in. The
    C++ kernel and the reference compute the same float32 arithmetic (the upsampling's lerp
    included), so they agree exactly; the differentiable epilogue's forward too."""
    from rethinkcam_fast.ops.map_epilogue import epilogue_forward_impl

    gen = torch.Generator().manual_seed(11)
    maps = [torch.rand(3, s, s, generator=gen) for s in (112, 56, 28, 14, 7)]
    maps[1][0] = 0.25
    maps[2][1, 3, 3] = float("nan")
    maps[4][2] = maps[4][2].clamp(max=0.0)  # all zeros: constant
    got, degenerate = fuse_maps(maps, (224, 224), fuse=fuse)
    want, want_degenerate = fuse_maps_reference(maps, (224, 224), fuse)
    assert torch.equal(degenerate, want_degenerate)
    assert torch.equal(got, want)
    for backend in ("auto", "reference"):
        assert torch.equal(epilogue_forward_impl(maps, [224, 224], fuse, True, backend)[0], want)
    single, single_degenerate = fuse_maps(maps[3], (224, 224))
    want_single, want_single_degenerate = fuse_maps_reference([maps[3]], (224, 224))
    assert torch.equal(single_degenerate, want_single_degenerate)
    assert torch.equal(single, want_single)



@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("shape,size", [((1, 14, 1), (1, 7)), ((2, 1, 14), (224, 1)), ((1, 5, 1), (9, 9)),
                                        ((1, 1, 6), (7, 1))])
def test_a_map_that_resizes_to_a_constant_is_flagged_on_the_cpu(shape, size, backend):
    """An output side of 1 samples one row (or column); a source side of 1 is constant along it. The
    C++ kernel and the reference interpolate as a + (b - a) * l, exact for equal neighbours, so the
    constant stays constant and is flagged instead of last-bit noise stretched to [0, 1]; the
    differentiable epilogue too."""
    from rethinkcam_fast.ops.map_epilogue import epilogue_forward_impl

    maps = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    cams, degenerate = fuse_maps(maps, size, backend=backend)
    assert torch.equal(epilogue_forward_impl([maps], list(size), "sum", True, backend)[1], degenerate)
    for n in range(shape[0]):
        up = F.interpolate(maps[n:n + 1, None].double(), size=size, mode="bilinear", align_corners=False)[0, 0]
        constant = bool((up.max() - up.min()) < 1e-12)
        assert bool(degenerate[n]) == constant and (not constant or not cams[n].any())


@requires_triton
@pytest.mark.parametrize("splits", [2, 4, 8])
@pytest.mark.parametrize("fuse", ["sum", "max"])
@pytest.mark.parametrize(
    "sizes,out_size",
    [([(3, 4)], (33, 40)), ([(3, 4), (7, 7), (1, 1), (12, 5)], (37, 29)), ([(5, 5), (6, 3)], (2, 3))],
    ids=str,
)
def test_fuse_maps_split_path_equals_one_program_per_image(splits, fuse, sizes, out_size):
    """The split path (a small batch on a GPU: several programs per image) gives exactly what the
    one-program-per-image kernel gives, degenerate layers and images included; chunks of 33x40 and
    37x29 outputs end inside a block, and 2x3 leaves most splits empty."""
    from rethinkcam_fast.ops.fuse_maps import fuse_maps_triton

    gen = torch.Generator().manual_seed(len(sizes) * 10 + splits)
    maps = [torch.rand((5, *s), generator=gen) for s in sizes]
    maps[0][1] = 0.25  # a constant layer (zeros in the fusion)
    maps[-1][2, 0, 0] = float("nan")  # a non-finite layer
    for m in maps:
        m[3] = 7.0  # every layer constant: a degenerate image
    one_program, one_degenerate = fuse_maps_triton(maps, out_size, fuse, num_splits=1)
    split, split_degenerate = fuse_maps_triton(maps, out_size, fuse, num_splits=splits)
    assert torch.equal(split, one_program)
    assert torch.equal(split_degenerate, one_degenerate)
    assert bool(one_degenerate[3]) and not bool(one_degenerate[0])
    want = oracle_fuse(maps, out_size, fuse)
    torch.testing.assert_close(split.double(), want, atol=1e-5, rtol=1e-5)


@requires_triton
def test_fuse_maps_split_count_follows_the_gpu():
    """One program per image once the batch fills about four per SM; otherwise a power of two, at
    most 64 and at most one per block of output pixels; forced counts must be powers of two."""
    from unittest import mock

    from rethinkcam_fast.ops import _launch
    from rethinkcam_fast.ops import fuse_maps as fm

    cuda = torch.device("cuda")
    with mock.patch.object(_launch, "multiprocessor_count", return_value=132):
        assert fm.fuse_splits(64, 224 * 224, 1024, cuda) == 16  # 528 programs wanted over 64 images
        assert fm.fuse_splits(1, 224 * 224, 1024, cuda) == 64
        assert fm.fuse_splits(528, 224 * 224, 1024, cuda) == 1
        assert fm.fuse_splits(1, 6, 8, cuda) == 1  # one block of output: nothing to split
    assert fm.fuse_splits(1, 224 * 224, 1024, torch.device("cpu")) == 1
    with pytest.raises(ValueError, match="power of two"):
        fm.fuse_splits(1, 100, 64, cuda, forced=3)


def test_host_cdiv_and_next_power_of_2_match_tritons():
    """The launchers' plain-Python helpers (triton's are ConstexprFunctions, ~5 us a host call) give
    triton's values, and a block size of at least 1 for empty sizes."""
    triton = pytest.importorskip("triton")
    from rethinkcam_fast._triton import cdiv, next_power_of_2

    for n in range(1, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
    for a in range(-40, 300):
        for b in range(1, 33):
            assert cdiv(a, b) == triton.cdiv(a, b)
    assert next_power_of_2(0) == 1 and next_power_of_2(-5) == 1


def _layout(t, layout):
    if layout == "nhwc":
        return t.to(memory_format=torch.channels_last)
    if layout == "transposed":  # neither NCHW nor channels_last: flat_spatial copies it
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t


@pytest.mark.parametrize("backend", BACKENDS)
def test_flm_layer_reducer_equals_weighted_map_bit_for_bit(backend):
    """The engine's per-layer FLM reduction (backend and kernel plan chosen once, not per layer) gives
    weighted_map's mode="flm" values exactly, for every layout, dtype and shape it meets in one call,
    the reused plans included (the same shapes again, new values)."""
    from rethinkcam_fast.ops.weighted_map import flm_layer_reducer

    reduce = flm_layer_reducer(backend)
    gen = torch.Generator().manual_seed(11)
    cases = [((2, 37, 5, 6), "nchw", torch.float32), ((2, 37, 5, 6), "nhwc", torch.float32),
             ((1, 3, 1, 1), "nchw", torch.float32), ((2, 6, 4, 3), "transposed", torch.float32),
             ((3, 70, 7, 7), "nhwc", torch.bfloat16), ((0, 4, 3, 3), "nchw", torch.float32),
             ((2, 5, 3, 4), "nchw", torch.float64), ((2, 5, 3, 4), "nchw", (torch.bfloat16, torch.float32))]
    for _ in range(2):
        for shape, layout, dtype in cases:
            a_dtype, g_dtype = dtype if isinstance(dtype, tuple) else (dtype, dtype)  # (mixed: no native kernel)
            a = _layout(torch.randn(shape, generator=gen).to(a_dtype), layout)
            g = _layout(torch.randn(shape, generator=gen).to(g_dtype), layout)
            a[..., :1, :1] = float("nan")  # the FLM NaN policy: relu(NaN) = 0 inside the sum
            got = reduce(a.requires_grad_(), g)
            want = weighted_map(a.detach(), grads=g, mode="flm", relu=False, backend=backend)
            assert got.dtype == torch.float32 and got.shape == want.shape and not got.requires_grad
            assert torch.equal(got, want), (shape, layout, dtype)


@requires_triton
def test_flm_layer_reducer_plans_once_per_shape_and_layout(monkeypatch):
    """On the Triton path a layer's grid and arguments come from a plan made once per shape and
    layout: the launches of a second call equal a fresh weighted_map_triton's."""
    from rethinkcam_fast.ops import weighted_map as wm

    launched = []
    monkeypatch.setattr(wm, "launch", lambda kernel, grid, *args, **kw: launched.append((kernel, grid, args[4:], kw)))
    a = torch.randn(2, 9, 5, 6).to(memory_format=torch.channels_last)
    g = torch.randn(2, 9, 5, 6)
    reduce = wm.flm_layer_reducer("triton")
    plans = []
    monkeypatch.setattr(wm, "_flm_plan", lambda *t, _real=wm._flm_plan: plans.append(1) or _real(*t))
    reduce(a, g), reduce(a, g)
    wm.weighted_map_triton(a, None, g, "flm", False)
    assert len(plans) == 1 and len(launched) == 3
    assert launched[0] == launched[1] == launched[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,size", [((2, 5, 6), (10, 12)), ((3, 7, 7), (224, 224)), ((1, 14, 14), (33, 70)),
                                        ((2, 9, 8), (3, 2)), ((1, 1, 6), (7, 1)), ((1, 1, 1), (4, 5))], ids=str)
def test_bilinear_upsample_is_f_interpolate_up_to_rounding_and_exact_on_plateaus(dtype, shape, size):
    """The reference's upsampling (the C++ kernels' lerp arithmetic) samples as F.interpolate does
    (align_corners=False), differs from it only by rounding, keeps a constant map exactly constant, and
    carries gradients; past float range it stays finite as F.interpolate's formula does."""
    from rethinkcam_fast.ops.fuse_maps import bilinear_upsample

    gen = torch.Generator().manual_seed(sum(shape) + size[0])
    maps = torch.rand(shape, generator=gen, dtype=dtype).requires_grad_(True)
    got = bilinear_upsample(maps, size)
    want = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, atol=4 * torch.finfo(dtype).eps, rtol=0)
    (grad,) = torch.autograd.grad(got.sum(), maps)
    (want_grad,) = torch.autograd.grad(want.sum(), maps)
    torch.testing.assert_close(grad, want_grad, atol=1e-4 if dtype == torch.float32 else 1e-10, rtol=1e-5)
    constant = torch.full(shape, 0.3, dtype=dtype)
    assert torch.equal(bilinear_upsample(constant, size), torch.full((shape[0], *size), 0.3, dtype=dtype))
    if shape[1] == 1:  # one source row: every output row is the same samples, exactly (F.interpolate's vary)
        assert torch.equal(got, got[:, :1].expand_as(got))
    extreme = torch.tensor([[[-3e38, 3e38]]], dtype=torch.float32)
    assert torch.isfinite(bilinear_upsample(extreme, (1, 5))).all()


@requires_triton
@pytest.mark.parametrize("splits", [1, 4])
# (the subnormal span's 1 / span, kept for the backward, overflows float32 in the CAM epilogue: the
# interpreter's numpy says so; the forward divides and is exact)
@pytest.mark.filterwarnings("ignore:overflow encountered in divide:RuntimeWarning")
def test_triton_min_max_divides_as_the_cpu_paths_do(splits):
    """Min-max normalisation divides by the span, rounded to nearest, on every path. The Triton kernels
    multiplied by 1 / span, which rounds twice: a map's maximum came out 0.99999994 (uint8 level 254,
    another PaS or protocol threshold than the CPU's) for about one map in six, a fused map the CPU
    finds constant was stretched to [0, 1], and a subnormal span gave inf. At the input's own size the
    upsampling is exact, so every path must agree bit for bit."""
    from rethinkcam_fast import class_activation_map
    from rethinkcam_fast.ops.fuse_maps import fuse_maps_triton

    gen = torch.Generator().manual_seed(5)
    maps = torch.rand(64, 5, 7, generator=gen) * torch.rand(64, 1, 1, generator=gen) * 9
    maps[0] = torch.tensor([4.99913263320922852, 4.99824857711791992]).repeat(5, 4)[:, :7]  # 1/span rounds up
    maps[1] = torch.tensor([0.0, 1e-40, 2e-40]).repeat(5, 3)[:, :7]  # a subnormal span
    got, degenerate = fuse_maps_triton([maps], (5, 7), "sum", num_splits=splits)
    want, want_degenerate = fuse_maps_reference([maps], (5, 7), "sum")
    assert torch.equal(degenerate, want_degenerate) and torch.equal(got, want)
    assert bool((got.amax(dim=(1, 2)) == 1.0).all())
    for fuse in ("sum", "max"):  # two layers whose fusion is constant on the CPU
        pair = [maps[:1], 1 - fuse_maps_reference([maps[:1]], (5, 7), "sum")[0]]
        got, degenerate = fuse_maps_triton(pair, (5, 7), fuse, num_splits=splits)
        want, want_degenerate = fuse_maps_reference(pair, (5, 7), fuse)
        assert torch.equal(degenerate, want_degenerate) and torch.equal(got, want), fuse
    features = maps[:, None]  # one channel, weight 1: the CAM is the map itself, min-max normalised
    cams = class_activation_map(features, torch.ones(1, 1), torch.zeros(64, dtype=torch.long), backend="triton")
    reference = class_activation_map(features, torch.ones(1, 1), torch.zeros(64, dtype=torch.long),
                                     backend="reference")
    assert torch.equal(cams, reference)


def test_a_constant_map_is_flagged_whatever_the_upsampling():
    """Bicubic upsampling of a constant map rounds to last-bit noise; the map is judged constant before
    it is resized (as with bilinear), so it is flagged and zeros, not noise stretched to [0, 1]."""
    maps = torch.full((2, 5, 7), 0.3)
    maps[1] = torch.rand(5, 7, generator=torch.Generator().manual_seed(6))
    for upsample in ("bilinear", "bicubic"):
        cams, degenerate = fuse_maps_reference([maps], (19, 23), "sum", upsample)
        assert degenerate.tolist() == [True, False] and not cams[0].any(), upsample
