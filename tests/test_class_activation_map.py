"""class_activation_map: forward equal to the CAM engine's, gradients against an independent float64
autograd oracle (DESIGN.md §2 formulas), gradcheck, opcheck, edge cases and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _models import SmallCNN, make
from conftest import requires_triton

import rethinkcam_fast
from rethinkcam_fast import CAMEngine, class_activation_map
from rethinkcam_fast.ops import class_activation_map as cam_mod

# "auto" on the CPU: the C++ epilogue kernels (forward and backward) around the PyTorch reduction
BACKENDS = ["reference", "auto", pytest.param("triton", marks=requires_triton)]
# Per-dtype tolerance, relative to the largest magnitude of the compared tensor.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def oracle(features, weight, labels, nwc=False, size=None, normalize=True):
    """Written from DESIGN.md §2 in float64 with plain autograd (no code shared with the op)."""
    w = weight.double()
    if nwc:
        w = torch.where(w > 0, w, torch.zeros_like(w))
    m = (w[labels][:, :, None, None] * features.double()).sum(1)
    size = size or tuple(m.shape[1:])
    up = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    if not normalize:
        return up
    flat = up.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo)).view_as(up)


def assert_close_scaled(got, want, tol):
    scale = max(float(want.detach().abs().max()), 1e-30)
    torch.testing.assert_close(got.double(), want.double(), atol=tol * scale, rtol=0)


def make_inputs(shape, classes, dtype, layout="nchw", seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "nhwc":
        features = features.to(memory_format=torch.channels_last)
    weight = torch.randn(classes, shape[1], generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, classes, (shape[0],), generator=gen)
    return features.requires_grad_(True), weight.requires_grad_(True), labels


def check_against_oracle(features, weight, labels, backend, nwc, size, normalize=True, tol=None):
    out = class_activation_map(features, weight, labels, nwc, size, normalize, backend=backend)
    fd = features.detach().double().requires_grad_(True)
    wd = weight.detach().double().requires_grad_(True)
    want = oracle(fd, wd, labels, nwc, size, normalize)
    tol = max(TOL[features.dtype], tol or 0.0)
    assert out.dtype == (torch.float64 if features.dtype == torch.float64 else torch.float32)
    assert_close_scaled(out, want, tol)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grad_out = grad_out.to(out.device)  # the generator draws on the CPU; the op may run on the GPU
    d_features, d_weight = torch.autograd.grad(out, (features, weight), grad_out.to(out.dtype))
    want_features, want_weight = torch.autograd.grad(want, (fd, wd), grad_out)
    assert d_features.dtype == features.dtype and d_weight.dtype == weight.dtype
    assert_close_scaled(d_features, want_features, tol)
    assert_close_scaled(d_weight, want_weight, tol)
    if features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous():
        assert backend == "reference" or d_features.is_contiguous(memory_format=torch.channels_last)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_forward_and_gradients_match_oracle(backend, dtype, layout):
    features, weight, labels = make_inputs((3, 5, 3, 4), 6, dtype, layout)
    for nwc in (False, True):
        check_against_oracle(features, weight, labels, backend, nwc, (7, 9))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape,size",
    [((2, 70, 2, 3), (5, 4)),  # more channels than one channel block
     ((1, 3, 12, 12), (12, 12)),  # more positions than one position block; identity resize
     ((1, 2, 33, 33), (16, 20)),  # downsampling; a source larger than one backward tile
     ((2, 4, 1, 1), (3, 3))],  # a 1x1 map upsamples to a constant: zeros
    ids=str,
)
def test_block_branches_and_sizes(backend, shape, size):
    features, weight, labels = make_inputs(shape, 3, torch.float32, seed=1)
    if shape[2:] == (1, 1):
        out = class_activation_map(features, weight, labels, output_size=size, backend=backend)
        assert (out == 0).all()
        (grad,) = torch.autograd.grad(out.sum(), features)
        assert (grad == 0).all()
        return
    check_against_oracle(features, weight, labels, backend, False, size)


@requires_triton
@pytest.mark.parametrize("num_splits", [2, 4])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_channel_reduction_split_over_channel_chunks(num_splits, layout):
    """The GPU launch splits the channel sum over programs; forced here on the interpreter."""
    features, weight, labels = make_inputs((2, 150, 3, 4), 4, torch.float64, layout, seed=12)
    got = cam_mod.channel_reduce_triton(features.detach(), cam_mod.MODE_CAM, weight=weight.detach(), labels=labels,
                                        nwc=True, num_splits=num_splits)
    want = cam_mod.cam_reduce_reference(features.detach(), weight.detach(), labels, nwc=True)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    grads = torch.randn(features.shape, dtype=torch.float64)
    got = cam_mod.channel_reduce_triton(features.detach(), cam_mod.MODE_FLM, gradients=grads, num_splits=num_splits)
    want = (grads.clamp_min(0) * features.detach().clamp_min(0)).sum(1)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unnormalised_and_feature_resolution(backend):
    features, weight, labels = make_inputs((2, 4, 3, 5), 3, torch.float32, seed=2)
    check_against_oracle(features, weight, labels, backend, True, (6, 7), normalize=False)
    out = check_against_oracle(features, weight, labels, backend, False, None)
    assert out.shape == (2, 3, 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nwc", [False, True])
def test_forward_equals_the_cam_engine(backend, nwc):
    model = make(SmallCNN)
    images = torch.randn(3, 3, 20, 20, generator=torch.Generator().manual_seed(3))
    result = CAMEngine(model, "cam", nwc=nwc, backend=backend, boxes=False)(images)
    store = {}
    handle = model.features.register_forward_hook(lambda m, i, o: store.setdefault("a", o))
    with torch.no_grad():
        model(images)
    handle.remove()
    out = class_activation_map(store["a"], model.fc.weight, result.labels, nwc, (20, 20), backend=backend)
    torch.testing.assert_close(out, result.cams, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nwc", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_float64(backend, nwc, normalize):
    features, weight, labels = make_inputs((2, 2, 2, 3), 3, torch.float64, seed=4)

    def fn(f, w):
        return class_activation_map(f, w, labels, nwc, (4, 5), normalize, backend=backend)

    # The interpreter is slow: the Triton path checks random projections (fast mode), the reference
    # the full Jacobian; test_forward_and_gradients_match_oracle compares both to autograd exactly.
    assert torch.autograd.gradcheck(fn, (features, weight), fast_mode=backend == "triton")


@pytest.mark.parametrize(
    "backend,layout",  # the registrations do not depend on the backend: one Triton run (interpreter time)
    [("reference", "nchw"), ("reference", "nhwc"), pytest.param("triton", "nhwc", marks=requires_triton)],
)
def test_opcheck(backend, layout):
    features, weight, labels = make_inputs((2, 3, 3, 4), 4, torch.float32, layout, seed=5)
    torch.library.opcheck(torch.ops.rethinkcam_fast.cam_reduce, (features, weight, labels, True, backend))
    grad_maps = torch.randn(2, 3, 4)
    torch.library.opcheck(torch.ops.rethinkcam_fast.cam_reduce_backward,
                          (grad_maps, features.detach(), weight.detach(), labels, False, backend))
    # a classifier stored [K, C] (logits = pooled @ head): the weight is a transposed view, and d_weight
    # is contiguous on every backend, as the fake impl says (torch.compile checks the strides)
    head = torch.randn(3, 4)
    for nwc in (False, True):
        torch.library.opcheck(torch.ops.rethinkcam_fast.cam_reduce_backward,
                              (grad_maps, features.detach(), head.t(), labels, nwc, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    features, weight, _ = make_inputs((0, 3, 2, 2), 4, torch.float32)
    labels = torch.zeros(0, dtype=torch.long)
    out = class_activation_map(features, weight, labels, output_size=(5, 5), backend=backend)
    assert out.shape == (0, 5, 5)
    d_features, d_weight = torch.autograd.grad(out.sum(), (features, weight))
    assert d_features.shape == features.shape and (d_weight == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_and_non_finite_maps_are_zeros_with_zero_gradient(backend):
    features, weight, labels = make_inputs((3, 2, 3, 3), 2, torch.float32, seed=6)
    with torch.no_grad():
        features[0] = 1.5  # every channel constant: a constant map
        features[1, 0, 1, 1] = float("nan")
    out = class_activation_map(features, weight, labels, output_size=(6, 6), backend=backend)
    assert (out[:2] == 0).all() and torch.isfinite(out).all()
    assert out[2].min() == 0 and abs(float(out[2].detach().max()) - 1) < 1e-6
    d_features, d_weight = torch.autograd.grad(out.sum(), (features, weight))
    assert (d_features[:2] == 0).all() and torch.isfinite(d_features[2]).all()
    assert torch.isfinite(d_weight).all()  # the NaN image's zero gradient does not turn into NaN
    _, want_weight = torch.autograd.grad(class_activation_map(features[2:], weight, labels[2:], output_size=(6, 6),
                                                              backend=backend).sum(), (features, weight))
    torch.testing.assert_close(d_weight, want_weight)
    clean = class_activation_map(features[2:].detach(), weight, labels[2:], output_size=(6, 6), backend=backend)
    torch.testing.assert_close(out[2:], clean)


def test_first_order_only_with_a_clear_error():
    """The op's own backward is not differentiable again (the README says first-order)."""
    features, weight, labels = make_inputs((2, 3, 3, 3), 4, torch.float32)
    out = class_activation_map(features, weight, labels, output_size=(5, 5))
    (grad,) = torch.autograd.grad(out.square().sum(), features, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()


def test_bad_input_raises_clear_errors():
    features, weight, labels = make_inputs((2, 3, 4, 4), 5, torch.float32)
    with pytest.raises(ValueError, match=r"weight must have shape \[C, 3\]"):
        class_activation_map(features, torch.randn(5, 4), labels)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        class_activation_map(features, weight, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels out of range for 5 classes"):
        class_activation_map(features, weight, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="labels out of range"):
        class_activation_map(features, weight, torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        class_activation_map(features, weight, torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="features must have a floating dtype"):
        class_activation_map(features.detach().long(), weight, labels)
    with pytest.raises(TypeError, match="weight must have a floating dtype"):
        class_activation_map(features, weight.detach().int(), labels)
    with pytest.raises(ValueError, match="features must be a 4-D"):
        class_activation_map(features[0], weight, labels)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        class_activation_map(features, weight, [0, 1])
    with pytest.raises(ValueError, match="output_size must be positive"):
        class_activation_map(features, weight, labels, output_size=(0, 3))
    with pytest.raises(TypeError, match="output_size must be None or a pair"):
        class_activation_map(features, weight, labels, output_size=7)
    with pytest.raises(ValueError, match="non-empty spatial extent"):
        class_activation_map(torch.randn(2, 3, 0, 4), weight, labels)
    with pytest.raises(ValueError, match="backend must be one of"):
        class_activation_map(features, weight, labels, backend="cuda")


def test_exports():
    assert rethinkcam_fast.class_activation_map is class_activation_map
    assert rethinkcam_fast.ClassActivationMapFunction is cam_mod.ClassActivationMapFunction


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_torch_compile_fullgraph_forward_and_backward(backend):
    features, weight, labels = make_inputs((2, 3, 3, 4), 4, torch.float32, seed=8)

    def loss(f, w):
        return class_activation_map(f, w, labels, True, (6, 7), backend=backend).square().mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(features, weight), (features, weight))
    want = torch.autograd.grad(loss(features, weight), (features, weight))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # a classifier stored [K, C]: its weight a transposed view (the backward's strides, traced)
    head = weight.detach().t().contiguous().requires_grad_(True)
    got = torch.autograd.grad(compiled(features, head.t()), head)[0]
    torch.testing.assert_close(got, torch.autograd.grad(loss(features, head.t()), head)[0])


@pytest.mark.slow
def test_inference_ops_in_a_compiled_loss_carry_no_gradient():
    """weighted_map and fuse_maps beside differentiable terms: their outputs carry no gradient, compiled
    as eagerly (they have no autograd formula, so torch.compile gets them on detached inputs)."""
    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    g = torch.randn(2, 3, 4, 4)

    def loss(a, g):
        m = rethinkcam_fast.weighted_map(a, grads=g, mode="layercam")
        fused, _ = rethinkcam_fast.fuse_maps([m, a[:, 0]], (6, 6))
        return a.square().mean() + m.mean() + fused.mean()

    (got,) = torch.autograd.grad(torch.compile(loss, backend="aot_eager")(a, g), a)
    (want,) = torch.autograd.grad(loss(a, g), a)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(want, a.detach() / a.numel() * 2)  # only the square term has a gradient


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "nchw"), (torch.bfloat16, "nhwc")], ids=str)
def test_resnet50_shapes_on_gpu(dtype, layout):
    features, weight, labels = make_inputs((64, 2048, 7, 7), 1000, dtype, layout, seed=9)
    features = features.detach().cuda().requires_grad_(True)
    weight = weight.detach().cuda().requires_grad_(True)
    # float32 sums over 50,176 pixels feed the min/max terms of the gradient: a looser bound than on
    # the small CPU shapes.
    check_against_oracle(features, weight, labels.cuda(), "auto", True, (224, 224), tol=1e-4)


@pytest.mark.cuda
def test_gradcheck_float64_on_gpu():
    features, weight, labels = make_inputs((2, 3, 3, 4), 3, torch.float64, seed=10)
    features = features.detach().cuda().requires_grad_(True)
    weight = weight.detach().cuda().requires_grad_(True)

    def fn(f, w):
        return class_activation_map(f, w, labels.cuda(), True, (9, 11), backend="triton")

    assert torch.autograd.gradcheck(fn, (features, weight))


@pytest.mark.parametrize("name", ["nwc", "normalize"])
@pytest.mark.parametrize("value", ["no", "False", 0, 1, None, torch.tensor(True)])
def test_flags_must_be_real_bools(name, value):
    """bool() of any value would turn nwc="no" into NWC and normalize="False" into normalising."""
    features, weight, labels = make_inputs((2, 3, 4, 4), 5, torch.float32)
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        class_activation_map(features, weight, labels, **{name: value})


def test_numpy_bools_are_accepted_as_flags():
    import numpy as np

    features, weight, labels = make_inputs((2, 3, 4, 4), 5, torch.float32)
    got = class_activation_map(features, weight, labels, nwc=np.bool_(True), normalize=np.False_)
    torch.testing.assert_close(got, class_activation_map(features, weight, labels, nwc=True, normalize=False))


def test_out_of_range_labels_error_names_the_values():
    features, weight, labels = make_inputs((6, 3, 4, 4), 5, torch.float32)
    with pytest.raises(ValueError, match=r"out of range for 5 classes .*valid labels 0\.\.4\): labels\[1\] = 5$"):
        class_activation_map(features, weight, torch.tensor([0, 5, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match=r"labels\[0\] = -1, labels\[2\] = 7, labels\[3\] = 9 \(4 in all\)$"):
        class_activation_map(features, weight, torch.tensor([-1, 0, 7, 9, 1, 5]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_maps_are_judged_in_float64(backend):
    """A float64 map past float32's range, or with a span below float32's resolution, is a map like any
    other (not "constant or non-finite": zeros with no gradient), on every backend, in both ops."""
    weight, labels = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    for values in ([0.0, 1e39, 2e39, 3e39], [1.0, 1.0 + 1e-9, 1.0 + 2e-9, 1.0 + 3e-9]):
        features = torch.tensor(values, dtype=torch.float64).view(1, 1, 2, 2).requires_grad_(True)
        out = class_activation_map(features, weight, labels, backend=backend)
        torch.testing.assert_close(out.flatten(), torch.tensor([0, 1 / 3, 2 / 3, 1], dtype=torch.float64))
        (grad,) = torch.autograd.grad(out[0, 0, 1], features)
        assert grad.abs().max() > 0
        fused = rethinkcam_fast.flm_fuse([features], [torch.ones_like(features)], (2, 2), backend=backend)
        torch.testing.assert_close(fused.flatten(), out.detach().flatten())


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, by design
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_span_past_float32_is_zeros_and_flagged_not_nan(backend):
    """Finite float32 values whose max - min overflows: zeros and degenerate, as fuse_maps and the
    engine's inference maps decide it, never NaN maps or gradients."""
    from rethinkcam_fast.ops.class_activation_map import class_activation_map_with_flags

    features = torch.tensor([-3e38, 3e38, 0.0, 1e38]).view(1, 1, 2, 2).requires_grad_(True)
    weight, labels = torch.ones(1, 1), torch.zeros(1, dtype=torch.long)
    out, degenerate = class_activation_map_with_flags(features, weight, labels, False, [4, 4], True, backend)
    assert torch.equal(out, torch.zeros(1, 4, 4)) and degenerate.tolist() == [True]
    (grad,) = torch.autograd.grad(out.sum(), features)
    assert torch.equal(grad, torch.zeros_like(grad))
    fused = rethinkcam_fast.flm_fuse([features, features.detach().abs()], [torch.ones_like(features)] * 2, (4, 4),
                                     backend=backend)
    assert torch.isfinite(fused).all()


def test_nwc_passes_no_gradient_to_weights_at_exactly_zero():
    """NWC's clamp max(W, 0) passes gradient only where W > 0: a zero weight (a zero-initialised head)
    gets none, like a negative one."""
    features = torch.rand(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    weight = torch.tensor([[0.5, 0.0, -0.2], [0.0, 1.0, 0.3]], dtype=torch.float64, requires_grad=True)
    for backend in ("auto", "reference"):
        weight.grad = None
        cams = class_activation_map(features, weight, torch.tensor([0, 1]), nwc=True, backend=backend)
        (cams * torch.linspace(0, 1, 16, dtype=torch.float64).view(1, 4, 4)).sum().backward()
        assert weight.grad[0, 1] == 0 and weight.grad[0, 2] == 0 and weight.grad[1, 0] == 0, backend
        assert weight.grad[0, 0] != 0 or weight.grad[1, 1] != 0
