"""Test configuration.

Triton decides at kernel-definition time whether to interpret, so ``TRITON_INTERPRET=1`` must be set
before any ``rethinkcam_fast`` kernel module is imported: on a machine without CUDA we set it here,
which runs the Triton kernels on the CPU (tiny shapes only). The suite refuses to run against a
package whose native extension is missing (typically: the source tree imported instead of the
installed package) unless ``RETHINKCAM_ALLOW_NO_NATIVE=1`` says that is intended.
"""

from __future__ import annotations

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# The CUDA tests hold GPU results to CPU references at float32 tolerances (and labels to equality):
# TF32 convolutions and matmuls (cuDNN's default) would round inputs to 10-bit mantissas first.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

import rethinkcam_fast  # noqa: E402  (after TRITON_INTERPRET)
from rethinkcam_fast import _native  # noqa: E402
from rethinkcam_fast._triton import HAS_TRITON, triton_interpreted  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    if not rethinkcam_fast.has_native() and os.environ.get("RETHINKCAM_ALLOW_NO_NATIVE") != "1":
        raise pytest.UsageError(
            "rethinkcam_fast was imported from "
            f"{os.path.dirname(rethinkcam_fast.__file__)} without its C++ extension "
            f"({_native.load_error('_C')}). Install the package first (pip install '.[test]') and run "
            "`pytest` from the repository root, or set RETHINKCAM_ALLOW_NO_NATIVE=1."
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


# Triton kernels on CPU tensors: only through the interpreter (set above on machines without CUDA).
requires_triton = pytest.mark.skipif(
    not (HAS_TRITON and triton_interpreted()), reason="needs triton and TRITON_INTERPRET=1 for CPU tensors"
)
requires_native = pytest.mark.skipif(not rethinkcam_fast.has_native(), reason="C++ extension not built")
