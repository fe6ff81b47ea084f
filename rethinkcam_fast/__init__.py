"""rethinkcam_fast: fast class-activation maps and weakly supervised object localization for PyTorch.

Nothing here queries the GPU at import time, and a missing native extension only means the ops run
their pure-PyTorch reference (with a one-time warning); see :func:`has_native` and
:func:`has_cuda_kernels`.
"""

from __future__ import annotations

from ._native import has_cuda_kernels, has_native
from .modules import TAP, replace_gap_with_tap
from .ops.tap import TAPFunction, tap, tap_reference

__version__ = "0.1.0"

__all__ = [
    "TAP",
    "TAPFunction",
    "__version__",
    "has_cuda_kernels",
    "has_native",
    "replace_gap_with_tap",
    "tap",
    "tap_reference",
]
