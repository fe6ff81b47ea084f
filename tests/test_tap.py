"""TAP: every backend against a float64 oracle of the reference semantics (DESIGN.md §2)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import requires_native, requires_triton
from hypothesis import given, settings
from hypothesis import strategies as st

import rethinkcam_fast
from rethinkcam_fast import _native
from rethinkcam_fast._validation import check_same_device
from rethinkcam_fast.ops import tap as tap_mod

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Tolerances on the pooled value relative to the float64-accumulated oracle: the kept set is exact
# (threshold computed in the input dtype, like the reference), only the final rounding differs.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

CPU_BACKENDS = [
    "reference",
    pytest.param("native", marks=requires_native),
    pytest.param("triton", marks=requires_triton),  # TRITON_INTERPRET=1 on CPU machines
]


def oracle(x: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled[N, C] float64, d pooled / d x as a [N, C, H, W] mask/count) from the reference formula.

    The threshold ``max * tau`` is evaluated in x's dtype, as the reference module does; everything
    else in float64.
    """
    n, c = x.shape[:2]
    thr = (x.amax(dim=(2, 3)) * tau).double()[:, :, None, None]
    xd = x.double()
    kept = xd > thr
    count = (kept & (xd > 0)).sum(dim=(2, 3)).clamp_min(1).double()
    pooled = torch.where(kept, xd, 0.0).sum(dim=(2, 3)) / count
    return pooled, kept.double() / count[:, :, None, None]


def make_input(shape, dtype, channels_last=False, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x


def run(x: torch.Tensor, tau: float, backend: str, grad_out: torch.Tensor | None = None):
    x = x.detach().requires_grad_(True)
    out = rethinkcam_fast.tap(x, tau, backend=backend)
    g = grad_out if grad_out is not None else torch.ones_like(out)
    (grad,) = torch.autograd.grad(out, x, g.to(out.dtype))
    return out, grad


def assert_matches_oracle(x, tau, backend, seed=0):
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(x.shape[:2], generator=gen, dtype=torch.float64)
    out, grad = run(x, tau, backend, grad_out)
    want, dmask = oracle(x, tau)
    tol = TOL[x.dtype]
    assert out.dtype == x.dtype and out.shape == x.shape[:2]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    want_grad = (dmask * grad_out.to(x.dtype).double()[:, :, None, None]).to(x.dtype)
    torch.testing.assert_close(grad, want_grad, rtol=tol, atol=tol)
    assert grad.dtype == x.dtype
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 5, 7, 7), (1, 3, 33, 35), (3, 70, 1, 1), (2, 9, 1, 6)])
def test_matches_oracle(backend, dtype, channels_last, shape):
    x = make_input(shape, dtype, channels_last)
    for tau in (0.0, 0.1, 0.5):
        assert_matches_oracle(x, tau, backend)


@requires_triton
@pytest.mark.parametrize("num_splits", [2, 4, 8])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_triton_split_reduction_matches_oracle(num_splits, channels_last):
    x = make_input((2, 3, 20, 21), torch.float32, channels_last, seed=3)
    x[0, 1, 19, 20] = 7.0  # the max sits in the last slice
    out, thr, inv = tap_mod.tap_forward_triton(x, 0.2, num_splits=num_splits)
    want, _ = oracle(x, 0.2)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    ref_out, ref_thr, ref_inv = tap_mod._tap_forward_reference(x, 0.2)
    assert torch.equal(thr, ref_thr) and torch.equal(inv, ref_inv)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_edge_cases(backend):
    x = torch.randn(2, 6, 5, 5, dtype=torch.float32)
    x[0, 0] = 0.0  # all-zero channel pools to 0 (N_k := 1)
    x[0, 1] = -torch.rand(5, 5) - 0.1  # all-negative channel: nothing kept
    x[0, 2] = 3.0  # every element ties at the max: all kept
    x[0, 3] = 0.0
    x[0, 3, 1, 1] = 2.0  # a single positive pixel
    x[0, 4] = torch.linspace(-1, 1, 25).view(5, 5)
    out, grad = run(x, 0.1, backend)
    assert out[0, 0] == 0 and out[0, 1] == 0 and torch.all(grad[0, :2] == 0)
    assert out[0, 2] == 3.0 and torch.allclose(grad[0, 2], torch.full((5, 5), 1 / 25))
    assert out[0, 3] == 2.0 and grad[0, 3, 1, 1] == 1.0 and grad[0, 3].sum() == 1.0
    # tau = 0 averages the positive elements only: it is not GAP.
    out0, _ = run(x, 0.0, backend)
    pos = x[0, 4][x[0, 4] > 0]
    torch.testing.assert_close(out0[0, 4], pos.mean())
    assert not torch.allclose(out0[0, 4], x[0, 4].mean())
    # tau near 1 keeps only the maximum (and its ties).
    x2 = torch.tensor([[[[1.0, 2.0], [2.0, 0.5]]]])
    out1, grad1 = run(x2, 0.999, backend)
    assert out1.item() == 2.0
    assert torch.equal(grad1, torch.tensor([[[[0.0, 0.5], [0.5, 0.0]]]]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_and_inf_channels_pool_to_zero(backend):
    """The reference's NaN semantics: a NaN max keeps nothing, so the channel pools to 0, zero grad."""
    x = torch.rand(1, 4, 3, 3) + 0.5
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, 0, 2] = float("inf")
    x[0, 2, 2, 2] = float("-inf")
    out, grad = run(x, 0.1, backend)
    want = rethinkcam_fast.tap_reference(x, 0.1)
    assert out[0, 0] == 0 and out[0, 1] == 0 and want[0, 0] == 0 and want[0, 1] == 0
    torch.testing.assert_close(out[0, 2:], want[0, 2:])
    assert torch.all(grad[0, :2] == 0) and torch.isfinite(grad).all()
    out_tau0, _ = run(x, 0.0, backend)  # inf * 0 is NaN: the inf channel still pools to 0
    assert out_tau0[0, 1] == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch_and_large_spatial(backend):
    out, grad = run(torch.randn(0, 4, 7, 7), 0.1, backend)
    assert out.shape == (0, 4) and grad.shape == (0, 4, 7, 7)
    size = 64 if backend == "triton" else 112  # the interpreter is slow; the GPU suite covers 112+
    assert_matches_oracle(make_input((1, 2, size, size), torch.float32), 0.1, backend)


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=requires_native)])
def test_gradcheck_float64(backend):
    x = make_input((2, 3, 4, 4), torch.float64, seed=5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: rethinkcam_fast.tap(t, 0.2, backend=backend), (x,))


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=requires_native)])
@pytest.mark.parametrize("path", ["eager", "custom_op"])
def test_gradgradcheck_float64(backend, path):
    """The backward is differentiable (create_graph=True): a CAM loss through a TAP model's Grad-CAM
    differentiates it again. Both the eager Function and the custom op (what torch.compile sees)."""
    x = make_input((2, 3, 4, 4), torch.float64, seed=7).requires_grad_(True)
    if path == "eager":
        fn = lambda t: rethinkcam_fast.tap(t, 0.2, backend=backend)  # noqa: E731
    else:
        fn = lambda t: torch.ops.rethinkcam_fast.tap_forward(t, 0.2, backend)[0]  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x,))
    # The first-order gradient taken with create_graph has the values of the plain one.
    plain = torch.autograd.grad(fn(x).pow(2).sum(), x)[0]
    graphed = torch.autograd.grad(fn(x).pow(2).sum(), x, create_graph=True)[0]
    assert graphed.requires_grad and torch.equal(plain, graphed.detach())


@requires_triton
def test_gradcheck_float64_triton():
    x = make_input((1, 2, 3, 3), torch.float64, seed=6).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: rethinkcam_fast.tap(t, 0.2, backend="triton"), (x,))


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=requires_native)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck(backend, channels_last):
    x = make_input((2, 3, 4, 5), torch.float32, channels_last).requires_grad_(True)
    torch.library.opcheck(torch.ops.rethinkcam_fast.tap_forward, (x, 0.1, backend))
    _, thr, inv = torch.ops.rethinkcam_fast.tap_forward(x.detach(), 0.1, backend)
    g = torch.randn(2, 3)
    torch.library.opcheck(torch.ops.rethinkcam_fast.tap_backward, (g, x.detach(), thr, inv, backend))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 3),
    c=st.integers(1, 5),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    tau=st.floats(0.0, 0.999),
    quantize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_native_and_reference_agree_with_oracle(n, c, h, w, tau, quantize, seed):
    x = make_input((n, c, h, w), torch.float32, seed=seed)
    if quantize:  # coarse values create many ties, at the max and at the threshold
        x = torch.round(x * 2) / 2
    backends = ["reference"] + (["native"] if rethinkcam_fast.has_native() else [])
    for backend in backends:
        assert_matches_oracle(x, tau, backend, seed=seed)


def test_bad_input_raises_clear_errors():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="x must be a 4-D"):
        rethinkcam_fast.tap(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        rethinkcam_fast.tap(torch.ones(2, 3, 4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        rethinkcam_fast.tap([[1.0]])
    for bad_tau in (-0.1, 1.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="tau must lie in"):
            rethinkcam_fast.tap(x, bad_tau)
    with pytest.raises(TypeError, match="tau must be a real number"):
        rethinkcam_fast.tap(x, "0.1")
    with pytest.raises(ValueError, match="non-empty spatial"):
        rethinkcam_fast.tap(torch.randn(2, 3, 0, 4))
    with pytest.raises(ValueError, match="backend must be one of"):
        rethinkcam_fast.tap(x, backend="fast")
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        rethinkcam_fast.tap(x, backend="cuda")
    with pytest.raises(ValueError, match="tau must lie in"):
        rethinkcam_fast.TAP(tau=2.0)
    pool = rethinkcam_fast.TAP(tau=0.2)
    with pytest.raises(ValueError, match="tau must lie in"):
        pool.tau = 1.5  # checked when set (a schedule assigning it), not at the next forward
    with pytest.raises(TypeError, match="tau must be a real number"):
        pool.tau = torch.tensor([0.1, 0.2])
    assert pool.tau == 0.2
    pool.tau = torch.tensor(0.3, dtype=torch.float64)  # a 0-d tensor is a number: kept as a float
    assert type(pool.tau) is float and pool.tau == 0.3
    assert torch.equal(rethinkcam_fast.tap(x, torch.tensor(0.3)), rethinkcam_fast.tap(x, 0.3))
    with pytest.raises(TypeError, match="tau must be a real number"):
        rethinkcam_fast.tap(x, torch.tensor(True))
    with pytest.raises(ValueError, match="x must be a 4-D tensor"):  # the reference says it as tap does
        rethinkcam_fast.tap_reference(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="one device: grad_out on cpu, x on meta"):
        check_same_device(grad_out=torch.zeros(1), x=torch.zeros(1, device="meta"))


def test_auto_backend_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setitem(_native._modules, "_C", None)
    monkeypatch.setitem(_native._errors, "_C", "ImportError: simulated")
    monkeypatch.setattr(_native, "_warned", set())
    x = make_input((2, 3, 4, 4), torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1, _ = run(x, 0.1, "auto")
        out2, _ = run(x, 0.1, "auto")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "simulated" in messages[0] and "reference" in messages[0]
    assert not rethinkcam_fast.has_native()
    torch.testing.assert_close(out1.double(), oracle(x, 0.1)[0])
    assert torch.equal(out1, out2)


def test_native_extension_status():
    assert isinstance(rethinkcam_fast.has_native(), bool)
    assert isinstance(rethinkcam_fast.has_cuda_kernels(), bool)
    if not torch.cuda.is_available():
        assert not rethinkcam_fast.has_cuda_kernels()


def test_import_does_not_touch_the_gpu():
    """DESIGN.md §5: never query the GPU at import time (a fresh interpreter, so nothing else did)."""
    import subprocess
    import sys

    code = "import torch, rethinkcam_fast; print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@settings(max_examples=200, deadline=None)
@given(tau=st.floats(1e-20, 1.0, exclude_max=True))
def test_tau_reaches_the_triton_kernels_exactly_for_float64(tau):
    """Triton passes Python floats as float32; float64 input gets tau as three float32 parts whose float64
    sum must be tau itself, or the kept set would differ from the reference's on the GPU."""
    import numpy as np

    parts = tap_mod._tau_parts(tau)
    assert all(float(np.float32(p)) == p for p in parts)
    assert (np.float64(parts[0]) + np.float64(parts[1])) + np.float64(parts[2]) == tau


@requires_triton
def test_float64_threshold_uses_the_float64_tau():
    """A value between max * float32(tau) and max * tau decides the output (the reference keeps it)."""
    x = torch.tensor([[[[10.0, 1.000000001]]]], dtype=torch.float64)
    want = tap_mod.tap_reference(x, 0.1)
    import numpy as np

    assert want.item() != tap_mod.tap_reference(x, float(np.float32(0.1))).item()
    torch.testing.assert_close(rethinkcam_fast.tap(x, 0.1, backend="triton"), want, rtol=0, atol=0)


def test_auto_backend_order_on_cuda(monkeypatch):
    """On a CUDA tensor "auto" takes the CUDA extension when it is built (the faster on an H100 in
    every measured shape, benchmarks/results/h100_tap.md), else Triton, else the reference with a
    warning; the device is not touched, so this runs without a GPU."""
    from rethinkcam_fast import _native
    from rethinkcam_fast.ops import tap as tap_mod

    cuda = torch.device("cuda")
    monkeypatch.setattr(_native, "cuda_module", lambda: object())
    monkeypatch.setattr(tap_mod, "can_launch_triton", lambda device: True)
    assert tap_mod._resolve_backend("auto", cuda) == "cuda"
    monkeypatch.setattr(_native, "cuda_module", lambda: None)
    assert tap_mod._resolve_backend("auto", cuda) == "triton"
    monkeypatch.setattr(tap_mod, "can_launch_triton", lambda device: False)
    monkeypatch.setattr(_native, "_warned", set())  # the fallback warns once per process
    with pytest.warns(RuntimeWarning, match="tap"):
        assert tap_mod._resolve_backend("auto", cuda) == "reference"
