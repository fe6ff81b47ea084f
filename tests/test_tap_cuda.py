"""TAP on a CUDA device: the Triton and CUDA-extension backends against the oracle (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from test_tap import DTYPES, TOL, make_input, oracle

import rethinkcam_fast
from rethinkcam_fast._triton import HAS_TRITON, triton_interpreted
from rethinkcam_fast.ops import tap as tap_mod

pytestmark = pytest.mark.cuda
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

GPU_BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON or triton_interpreted(), reason="needs compiled triton")),
    pytest.param("cuda", marks=pytest.mark.skipif(not rethinkcam_fast.has_cuda_kernels(), reason="CUDA extension not built")),
]
SHAPES = [(2, 3, 4, 5), (64, 2048, 7, 7), (8, 1024, 14, 14), (4, 1024, 28, 28), (2, 64, 112, 112), (1, 3, 257, 259), (5, 70, 1, 1)]


def check(x_cpu, tau, backend, layout):
    x = x_cpu.cuda()
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = rethinkcam_fast.tap(x, tau, backend=backend)
    grad_out = torch.randn(out.shape, device="cuda", dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, x, grad_out.to(out.dtype))
    want, dmask = oracle(x_cpu, tau)
    tol = TOL[x.dtype]
    torch.testing.assert_close(out.double().cpu(), want, rtol=tol, atol=tol)
    want_grad = (dmask * grad_out.cpu().to(x.dtype).double()[:, :, None, None]).to(x.dtype)
    torch.testing.assert_close(grad.cpu(), want_grad, rtol=tol, atol=tol)
    if layout == "nhwc" and x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1:
        assert grad.is_contiguous(memory_format=torch.channels_last)
    return out, grad


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gpu_matches_oracle(backend, dtype, layout, shape):
    x = make_input(shape, dtype, seed=sum(shape))
    x[0, 0] = 0.0
    if shape[1] > 2:
        x[0, 1, 0, 0] = float("nan")
        x[0, 2] = torch.round(x[0, 2])  # ties
    check(x, 0.1, backend, layout)
    check(x, 0.0, backend, layout)


@pytest.mark.skipif(not HAS_TRITON or triton_interpreted(), reason="needs compiled triton")
@pytest.mark.parametrize("num_splits", [2, 8, 32])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_triton_split_path_on_gpu(num_splits, layout):
    x = make_input((1, 3, 160, 170), torch.float32, seed=11).cuda()
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    out, thr, inv = tap_mod.tap_forward_triton(x, 0.1, num_splits=num_splits)
    ref_out, ref_thr, ref_inv = tap_mod._tap_forward_reference(x, 0.1)
    torch.testing.assert_close(out, ref_out)
    assert torch.equal(thr, ref_thr) and torch.equal(inv, ref_inv)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_backward_is_deterministic(backend):
    x = make_input((16, 256, 14, 14), torch.bfloat16, seed=2).cuda().requires_grad_(True)
    grads = []
    for _ in range(3):
        out = rethinkcam_fast.tap(x, 0.1, backend=backend)
        grads.append(torch.autograd.grad(out.float().square().sum(), x)[0])
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_auto_backend_on_gpu_runs_without_warning(recwarn):
    x = torch.randn(4, 8, 7, 7, device="cuda")
    rethinkcam_fast.tap(x)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_compile_on_gpu():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), rethinkcam_fast.TAP(0.1, flatten=True)).cuda()
    x = torch.randn(2, 3, 16, 16, device="cuda")
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))
