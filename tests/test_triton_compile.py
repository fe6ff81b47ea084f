"""Every Triton kernel compiles for the GPUs we ship for, checked on a machine without one.

The interpreter-based tests check what the kernels compute; this checks that the real compiler
accepts them (see ``tests/triton_compile_check.py``): each launch path, at the GPU benchmarks'
shapes, is compiled to a cubin for sm_90 (H100) and sm_80 (A100) without running. On sm_90, the
machine our targets are set on, no specialisation may spill registers: the launch configurations
(warps per tile) were chosen from this report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rethinkcam_fast._triton import HAS_TRITON

SCRIPT = Path(__file__).with_name("triton_compile_check.py")
TARGETS = {90: 132, 80: 108}  # compute capability x10 -> multiprocessors (H100 SXM, A100)
# Shared memory one block may opt into (CUDA programming guide, compute capabilities table): a kernel
# that asks for more raises OutOfResources at its first launch on that GPU.
MAX_SHARED = {90: 227 * 1024, 80: 163 * 1024}
# Kernels allowed an approximate float32 division (div.full), with the reason; every other one divides
# with ieee_div, since Triton's interpreter (the CPU tests) divides exactly and cannot show the gap.
_TIE_SHARE = "the tie share d / count of fuse='max' (_layer_grad), within the float32 tolerance; div.rn spills there"
APPROXIMATE_DIVISION = {
    "rethinkcam_fast.ops.map_epilogue._layer_bwd_kernel": _TIE_SHARE + "; and _output_support's ratio, "
    "which only bounds a loop and has a margin of two outputs",
    "rethinkcam_fast.ops.map_epilogue._layer_bwd_sums_kernel": _TIE_SHARE,
}


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception:  # noqa: BLE001 - no NVIDIA backend in this Triton build
        return False
    return True


@pytest.mark.skipif(not (HAS_TRITON and _has_nvidia_backend()), reason="needs Triton's NVIDIA backend")
def test_every_kernel_compiles_for_sm90_and_sm80(tmp_path):
    runs = {}
    for arch, sms in TARGETS.items():  # both at once: each is one CPU-bound process
        env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / f"cache{arch}")}  # compile, not from a cache
        env.pop("TRITON_INTERPRET", None)
        report = tmp_path / f"sm{arch}.json"
        cmd = [sys.executable, str(SCRIPT), "--arch", str(arch), "--sms", str(sms), "--json", str(report)]
        runs[arch] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env), report)
    for arch, (proc, report) in runs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"sm_{arch}:\n{out[-3000:]}{err[-6000:]}"
        result = json.loads(report.read_text())
        assert len(result["launchable"]) >= 15, result["launchable"]
        assert not result["failures"] and not result["missing"]
        assert sorted({c["kernel"] for c in result["compiled"]}) == result["launchable"]
        too_big = [(c["kernel"], c["tensors"], c["constexprs"], c["shared"])
                   for c in result["compiled"] if c["shared"] > MAX_SHARED[arch]]
        assert not too_big, f"sm_{arch}: more shared memory than a block may have: {too_big}"
        approximate = [(c["kernel"], c["scenario"], c["approx_div"]) for c in result["compiled"]
                       if c["approx_div"] and c["kernel"] not in APPROXIMATE_DIVISION]
        assert not approximate, f"sm_{arch}: float32 divisions lowered to div.full (use ieee_div): {approximate}"
        if arch == 90:
            # float64 is gradcheck's dtype, not a speed path: its specialisations may spill.
            spilling = [(c["kernel"], c["tensors"], c["constexprs"], c["spill_stores"])
                        for c in result["compiled"] if c.get("spill_stores", 0) and c["constexprs"].get("ACC") != "fp64"
                        and not any(t.startswith("float64") for t in c["tensors"])]
            assert not spilling, spilling
