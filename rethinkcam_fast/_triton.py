"""Optional Triton import.

Triton ships with CUDA builds of PyTorch; on a CPU-only machine it is only needed to run the kernels
under ``TRITON_INTERPRET=1`` (the tests do). Kernel modules import ``triton``/``tl`` from here so that
their ``@triton.jit`` definitions still parse when Triton is absent; launching one then raises.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

    class _MissingKernel:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError(
                f"Triton is not installed, so the kernel {self.fn.__name__} cannot run; "
                "install it with `pip install triton` or use another backend."
            )

    class _TritonStub:
        @staticmethod
        def jit(fn=None, **_kwargs):
            return _MissingKernel(fn) if fn is not None else _MissingKernel

    class _LanguageStub:
        constexpr = "constexpr"

    triton = _TritonStub()  # type: ignore[assignment]
    tl = _LanguageStub()  # type: ignore[assignment]


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the launchers' host code. ``triton.cdiv`` is a ``ConstexprFunction`` in
    Triton 3.6+ whose host call costs ~5 µs (argument unwrapping); the launchers call it a dozen times
    per op, host time that an H100 profile showed to dominate small ops."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` for host code, as ``triton.next_power_of_2`` for ``n >= 1``;
    1 for ``n <= 1`` (a block size, never 0)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def can_launch_triton(device: "object") -> bool:
    """Whether a Triton kernel can run on tensors of ``device`` right now."""
    if not HAS_TRITON:
        return False
    # (CUDA first: every GPU launch asks, and the environment lookup costs more than the comparison)
    return getattr(device, "type", None) == "cuda" or triton_interpreted()


@triton.jit
def ieee_div(x, y):
    """``x / y`` rounded to nearest, as PyTorch, NumPy and C++ divide; ``x`` and ``y`` of one float dtype.

    On NVIDIA GPUs Triton lowers a float32 ``/`` to the approximate ``div.full.f32`` (up to 2 ulp off)
    and Triton's interpreter divides exactly, so the CPU tests cannot see the difference: a reciprocal
    count that must equal the reference bit for bit, or a resize scale that must be PyTorch's
    ``(float)input_size / output_size``, divides here. float64 ``/`` already is ``div.rn.f64``.
    """
    if y.dtype == tl.float32:
        q = tl.math.div_rn(x, y)
    else:
        q = x / y
    return q


@triton.jit
def ieee_reciprocal(y):
    """``1 / y`` rounded to nearest (see :func:`ieee_div`), in ``y``'s float dtype and shape."""
    return ieee_div(tl.full(y.shape, 1.0, y.dtype), y)


__all__ = ["HAS_TRITON", "can_launch_triton", "ieee_div", "ieee_reciprocal", "tl", "triton", "triton_interpreted"]
