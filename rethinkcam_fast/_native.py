"""Defensive loading of the native extension modules.

``_C`` holds the torch-free C++ CPU kernels and always builds; ``_C_cuda`` holds the torch-free CUDA
kernels and builds only where ``nvcc`` was found. Neither import may make ``import rethinkcam_fast``
fail: ops fall back to their pure-PyTorch reference and say so once.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

# The dtype codes of csrc/common/dtype.h.
NATIVE_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

_modules: dict[str, ModuleType | None] = {}
_errors: dict[str, str] = {}
_warned: set[str] = set()


def _load(name: str) -> ModuleType | None:
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"rethinkcam_fast.{name}")
        except ImportError as exc:  # missing build, ABI mismatch, missing CUDA runtime
            _modules[name] = None
            _errors[name] = f"{type(exc).__name__}: {exc}"
    return _modules[name]


def cpu_module() -> ModuleType | None:
    """The CPU extension module, or ``None`` when it is not built."""
    return _load("_C")


def cuda_module() -> ModuleType | None:
    """The CUDA extension module, or ``None`` when it was not built (no ``nvcc`` at build time)."""
    return _load("_C_cuda")


def cpu_kernel(name: str):
    """The C++ CPU kernel ``name`` (a function of ``_C``), or ``None`` when the extension is not built
    or is an older build without it (callers then take their fallback)."""
    module = cpu_module()
    return None if module is None else getattr(module, name, None)


def has_native() -> bool:
    """True when the C++ CPU kernels are importable (the CPU ops then run natively)."""
    return cpu_module() is not None


def has_cuda_kernels() -> bool:
    """True when the CUDA extension is importable *and* a CUDA device is usable right now."""
    return cuda_module() is not None and torch.cuda.is_available()


def load_error(name: str) -> str | None:
    """Why ``name`` (``"_C"`` or ``"_C_cuda"``) failed to import, if it did."""
    _load(name)
    return _errors.get(name)


def current_stream_handle(device: torch.device) -> int:
    """The calling thread's current CUDA stream on ``device``, as the raw handle the CUDA kernels
    launch on (what ``torch.cuda.current_stream(device).cuda_stream`` gives), through the one C call
    Triton's own launcher uses: ``torch.cuda.current_stream`` builds a Python ``Stream`` first, host
    time paid once a layer in Fully-CAM's hooks."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(index) if raw is not None else torch.cuda.current_stream(device).cuda_stream


def kernel_last_arg(t: torch.Tensor) -> int:
    """The native kernels' last argument for tensors like ``t``: a thread count for the CPU kernels,
    the current stream handle for the CUDA ones."""
    return current_stream_handle(t.device) if t.is_cuda else torch.get_num_threads()


def _source_tree_hint() -> str:
    """A hint when the package was imported from an unbuilt source checkout (a Python session started in
    the repository's root imports ./rethinkcam_fast, not the installed package with its extensions)."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if os.path.exists(os.path.join(root, "pyproject.toml")) and os.path.exists(os.path.join(root, "CMakeLists.txt")):
        return (f" (rethinkcam_fast was imported from the source tree {root}, which holds no compiled extension: "
                "run Python from another directory to use the installed package)")
    return ""


def warn_fallback(op: str, reason: str, fallback: str = "the pure-PyTorch reference") -> None:
    """Warn once per (op, reason) that an op runs a slower fallback implementation."""
    if "No module named" in reason:
        reason += _source_tree_hint()
    key = f"{op}:{reason}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"rethinkcam_fast.{op}: {reason}; falling back to {fallback} (slower).",
            RuntimeWarning,
            stacklevel=3,
        )
