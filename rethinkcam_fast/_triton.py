"""Optional Triton import.

Triton ships with CUDA builds of PyTorch; on a CPU-only machine it is only needed to run the kernels
under ``TRITON_INTERPRET=1`` (the tests do). Kernel modules import ``triton``/``tl`` from here so that
their ``@triton.jit`` definitions still parse when Triton is absent; launching one then raises.
"""

from __future__ import annotations

import inspect
import os
import sys

import torch


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_wanted() -> bool:
    """Whether Triton kernels can run here: a torch build for a GPU (CUDA, ROCm, XPU), or its interpreter
    on the CPU (decided when the kernels are defined, i.e. at import). A CPU-only torch needs neither:
    Triton's import and the parsing of every kernel (half a second) are skipped, unless something
    imported Triton already (an offline compile check)."""
    version = torch.version
    return (bool(version.cuda or getattr(version, "hip", None) or getattr(version, "xpu", None))
            or triton_interpreted() or "triton" in sys.modules)


# Why the kernels are stubs, when they are: said by the stub that refuses to launch.
TRITON_MISSING = None
try:
    if not _triton_wanted():
        TRITON_MISSING = ("this torch build has no GPU support and TRITON_INTERPRET is not set, so Triton was not "
                          "loaded (set TRITON_INTERPRET=1 before importing rethinkcam_fast to run the kernels on the "
                          "CPU, slowly)")
        raise ImportError(TRITON_MISSING)
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False
    TRITON_MISSING = TRITON_MISSING or "Triton is not installed; install it with `pip install triton`"

    class _MissingKernel:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError(f"the Triton kernel {self.fn.__name__} cannot run: {TRITON_MISSING}; or use another "
                               "backend")

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


def can_launch_triton(device: "object") -> bool:
    """Whether a Triton kernel can run on tensors of ``device`` right now."""
    if not HAS_TRITON:
        return False
    # (CUDA first: every GPU launch asks, and the environment lookup costs more than the comparison)
    return getattr(device, "type", None) == "cuda" or triton_interpreted()


# ---------------------------------------------------------------------------------------------------
# Launching a compiled kernel without Triton's Python launch path.
#
# ``kernel[grid](*args)`` binds every argument, specialises it (dtype, 16-byte alignment, ints equal to
# 1 or divisible by 16), hashes a cache key and reads several environment knobs before it reaches the
# C launcher: about 30 Python calls and 8 µs a launch on the CI CPU, and more on the slow hosts of the
# H100 profile, where the small ops were host-bound (README, GPU). ``launch`` keeps its own cache, keyed
# by properties at least as fine as those Triton specialises on, computed cheaply; the first launch of a key goes
# through Triton (which compiles, caches and launches), later ones call the compiled kernel's launcher
# directly with the same arguments Triton passes it.

_LAUNCH_MODES = {"1": "fast", "fast": "fast", "0": "triton", "triton": "triton", "verify": "verify"}


def _launch_mode_from_env() -> str:
    value = os.environ.get("RETHINKCAM_FAST_LAUNCH", "1").strip().lower()
    if value not in _LAUNCH_MODES:
        raise ValueError(f"RETHINKCAM_FAST_LAUNCH must be one of {sorted(_LAUNCH_MODES)}, got {value!r}")
    return _LAUNCH_MODES[value]


#: ``"fast"`` (default): the cache above; ``"triton"`` (``RETHINKCAM_FAST_LAUNCH=0``): every launch
#: through ``kernel[grid]``; ``"verify"``: the cache, and every cached launch also asks Triton which
#: compiled kernel it would pick and raises if that is not the cached one (the launch tests).
LAUNCH_MODE = _launch_mode_from_env()

_CACHE_LIMIT = 4096  # keys a kernel keeps (ints are keyed by value: one per shape seen); then it starts over


def _non_int_key(arg):
    """The key part of a positional argument that is not an int: tensors by dtype and 16-byte alignment
    of the data pointer (Triton's pointer specialisation); floats by type only (always fp32); bools and
    other hashables (None, constexpr-like values) by type and value."""
    kind = type(arg)
    if kind is _torch_tensor or isinstance(arg, _torch_tensor):  # (the identity test skips a slow isinstance)
        return arg.dtype, arg.data_ptr() % 16 == 0
    if kind is float:
        return float
    return kind, arg


def _arguments_key(args: tuple) -> tuple:
    """What Triton's specialisation of ``args`` depends on, or finer: ints by value (Triton looks at
    whether one is 1, a multiple of 16, or fits int32; a value decides all three), the rest by
    :func:`_non_int_key`. Ints are most of a launch's arguments (sizes and strides): they take no call."""
    return tuple([arg if type(arg) is int else _non_int_key(arg) for arg in args])


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` with Triton's Python launch path skipped once this kernel has
    run with arguments of the same specialisation (see above). Constexprs and launch options go as
    keyword arguments, runtime arguments positionally, as at every call site of the package (a call
    that does otherwise always takes Triton's path). Triton's path is also taken under its
    interpreter, with launch hooks or pre-run hooks installed (profilers such as proton), or with
    ``RETHINKCAM_FAST_LAUNCH=0``. The key includes the knobs Triton compiles with (``TRITON_DEBUG``,
    the instrumentation mode...). A kernel's module-level constants are read once, at its first
    compilation (Triton re-checks them on every launch; the package's are never reassigned)."""
    size = len(grid)
    if size > 1 and (grid[1] > GRID_YZ_LIMIT or (size > 2 and grid[2] > GRID_YZ_LIMIT)):
        # (checked on every path: the interpreter would run it, the GPU fail with "invalid argument")
        raise ValueError(f"launch grid {tuple(grid)} exceeds CUDA's {GRID_YZ_LIMIT} blocks on axis 1 or 2 "
                         f"({getattr(kernel, '__name__', kernel)}: an input too large for this kernel)")
    if LAUNCH_MODE == "triton" or not isinstance(kernel, _JITFunction):
        kernel[grid](*args, **kwargs)
        return
    runtime, compilation = _knobs.runtime, _knobs.compilation
    if _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook) or kernel.pre_run_hooks:
        kernel[grid](*args, **kwargs)
        return
    active = _driver.active
    device = active.get_current_device()
    # (the knobs that enter Triton's own cache key besides the arguments, read as Triton reads them)
    knobs = (kernel.debug, runtime.debug, compilation.instrumentation_mode,
             getattr(compilation, "fpsan_homomorphic_casts", None), getattr(runtime, "add_stages_inspection_hook", None))
    key = (device, knobs, _arguments_key(args), tuple([(name, type(value), value) for name, value in kwargs.items()]))
    cache = kernel.__dict__.get("_rethinkcam_launch_cache")
    if cache is None:
        cache = kernel.__dict__.setdefault("_rethinkcam_launch_cache", {})
    entry = cache.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)  # Triton's path: compiles on a miss of its own cache
        if hasattr(compiled, "packed_metadata") and _keyable_call(kernel, len(args), kwargs):
            if len(cache) >= _CACHE_LIMIT:
                cache.clear()
            cache[key] = (compiled, compiled.run, _bound_tail(kernel, len(args), kwargs))
        return
    compiled, launcher, tail = entry
    if LAUNCH_MODE == "verify":
        expected = kernel.run(*args, grid=grid, warmup=True, **kwargs)
        if expected is not compiled:
            raise AssertionError(f"launch cache of {kernel.fn.__name__} picked a kernel compiled for another "
                                 f"specialisation than Triton's for the key {key}")
    stream = active.get_current_stream(device)
    launcher(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, stream, compiled.function,
             compiled.packed_metadata, None, None, None, *args, *tail)


def _keyable_call(kernel, positional: int, kwargs: dict) -> bool:
    """Whether the key describes this call site's specialisation: every positional argument a runtime
    parameter (keyed as above: a float constexpr passed positionally would be keyed by type only), and
    every keyword argument a constexpr or a launch option (keyed by type and value: a runtime scalar
    or tensor passed by keyword is not, and would keep the tensor alive in the key). Checked on a miss."""
    params = kernel.params
    if any(param.is_constexpr for param in params[:positional]):
        return False
    by_name = {param.name: param for param in params}
    return all(name not in by_name or by_name[name].is_constexpr for name in kwargs)


def _hooked(hook) -> bool:
    """Whether a launch hook is installed: Triton 3.6+ keeps a ``HookChain`` there, empty unless a
    profiler added a hook (Triton then still builds launch metadata and calls the empty chain from its
    C launcher on every launch, which ``launch`` does not); earlier versions keep ``None``."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _bound_tail(kernel, positional: int, kwargs: dict) -> tuple:
    """The values Triton binds to the parameters after the positional ones, in signature order: the
    keyword arguments, else each parameter's default (constexprs and defaults, fixed by the key)."""
    tail = []
    for param in kernel.params[positional:]:
        if param.name in kwargs:
            tail.append(kwargs[param.name])
        elif param.default is not inspect.Parameter.empty:
            tail.append(param.default)
        else:  # Triton has already launched this call, so it cannot be missing
            raise TypeError(f"{kernel.fn.__name__}: no value for parameter {param.name}")
    return tuple(tail)


if HAS_TRITON:
    from torch import Tensor as _torch_tensor
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver
    from triton.runtime.jit import JITFunction as _JITFunction
else:  # pragma: no cover - without Triton every kernel is a _MissingKernel, which raises when launched
    _JITFunction = ()


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


# CUDA caps a launch grid's axes 1 and 2 at 65,535 blocks (axis 0 at 2**31 - 1), and Triton's
# interpreter does not check: position blocks, which grow with the map (65,535 blocks of 32 positions
# are a 1449 x 1449 map), go on axis 0 through grid_pair.
GRID_YZ_LIMIT = 65535


@triton.jit
def grid_pair(count0):
    """``(i, j)`` of a 1-D launch over ``count0 * count1`` programs that stands for the 2-D grid
    ``(count0, count1)``: ``i`` varies fastest, as a 2-D grid's axis 0 does on the GPU, so the blocks run
    in the same order, and ``count1`` may exceed :data:`GRID_YZ_LIMIT`."""
    pid = tl.program_id(0)
    return pid % count0, pid // count0


@triton.jit
def ieee_reciprocal(y):
    """``1 / y`` rounded to nearest (see :func:`ieee_div`), in ``y``'s float dtype and shape."""
    return ieee_div(tl.full(y.shape, 1.0, y.dtype), y)


__all__ = ["GRID_YZ_LIMIT", "HAS_TRITON", "can_launch_triton", "grid_pair", "ieee_div", "ieee_reciprocal", "launch", "tl", "triton",
           "triton_interpreted"]
