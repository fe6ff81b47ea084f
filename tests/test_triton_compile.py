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


needs_nvidia_backend = pytest.mark.skipif(not (HAS_TRITON and _has_nvidia_backend()),
                                          reason="needs Triton's NVIDIA backend")


def _env(cache: Path) -> dict:
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache)}
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.fixture(scope="module")
def compile_runs(tmp_path_factory):
    """Both architectures compiled from scratch, once for the module: ``{arch: (process, stdout, stderr,
    report path, cache dir)}``."""
    root = tmp_path_factory.mktemp("triton_compile")
    started = {}
    for arch, sms in TARGETS.items():  # both at once: each is one CPU-bound process
        cache = root / f"cache{arch}"  # compile, not from a cache
        report = root / f"sm{arch}.json"
        cmd = [sys.executable, str(SCRIPT), "--arch", str(arch), "--sms", str(sms), "--json", str(report)]
        started[arch] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=_env(cache)), report, cache)
    runs = {}
    for arch, (proc, report, cache) in started.items():
        out, err = proc.communicate(timeout=900)
        runs[arch] = (proc, out, err, report, cache)
    return runs


@needs_nvidia_backend
def test_every_kernel_compiles_for_sm90_and_sm80(compile_runs):
    for arch, (proc, out, err, report, _cache) in compile_runs.items():
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
        # The map epilogues (inference and differentiable) must round as the C++ kernels and as each
        # other: launched with EXACT_FP, no contracted multiply-adds.
        # (_layer_bwd_kernel's are its tl.dot's multiply-accumulates, the upsampling's adjoint, which
        # nothing compares by equality; with fusion off, nothing else there contracts.)
        contracted = [(c["kernel"], c["scenario"], c["fma"]) for c in result["compiled"] if c["fma"]
                      and c["kernel"].startswith(("rethinkcam_fast.ops.fuse_maps.", "rethinkcam_fast.ops.map_epilogue."))
                      and c["kernel"] != "rethinkcam_fast.ops.map_epilogue._layer_bwd_kernel"]
        assert not contracted, f"sm_{arch}: map epilogue kernels with FMA contraction (launch with EXACT_FP): {contracted}"
        if arch == 90:
            # float64 is gradcheck's dtype, not a speed path: its specialisations may spill.
            spilling = [(c["kernel"], c["tensors"], c["constexprs"], c["spill_stores"])
                        for c in result["compiled"] if c.get("spill_stores", 0) and c["constexprs"].get("ACC") != "fp64"
                        and not any(t.startswith("float64") for t in c["tensors"])]
            assert not spilling, spilling


@needs_nvidia_backend
def test_launch_cache_launches_what_triton_launches(compile_runs):
    """``rethinkcam_fast._triton.launch`` skips Triton's Python launch path for specialisations it has seen:
    every scenario, run through Triton's path and then twice through the cache (its verify mode asks Triton
    which compiled kernel it would pick, and raises on a difference), must make the same launches: same
    kernels, grids and arguments, in order, the last run entirely from the cache (unaligned inputs
    included); and the rules for the calls it must leave to Triton (``launch_rules``). sm_90's kernels
    are already compiled."""
    proc, out, err, _report, cache = compile_runs[90]
    assert proc.returncode == 0, f"sm_90 did not compile:\n{err[-3000:]}"
    check = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", "--sms", str(TARGETS[90]), "--launch-check"],
                           capture_output=True, text=True, env=_env(cache), timeout=600)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-6000:]
    checked = [line for line in check.stdout.splitlines() if line.startswith("launch check ")]
    assert len(checked) >= 9, check.stdout
    assert all(line.split("from the cache: ")[1].split("/")[0] == line.split("/")[-1] for line in checked), check.stdout
    # ... and it stays out of the way where its key could not tell specialisations apart (a constexpr
    # passed positionally, a runtime argument by keyword, a changed TRITON_DEBUG, a pre-run hook)
    assert "launch rules: 5 of 5 hold" in check.stdout, check.stdout
