"""Shared benchmark helpers: device choice, synchronisation, environment description."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess

import torch


@contextlib.contextmanager
def environment(name: str, value: str):
    """``os.environ[name] = value`` inside the block, the previous state restored after it."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name)
        else:
            os.environ[name] = previous


def through_triton_launch_path(fn):
    """``fn`` with every Triton launch through Triton's own launch path (``RETHINKCAM_FAST_LAUNCH=0``)
    instead of the package's launch cache (``rethinkcam_fast._triton.launch``): a row that measures,
    in the same run, what the cache saves."""
    import rethinkcam_fast._triton as triton_support

    def run():
        mode, triton_support.LAUNCH_MODE = triton_support.LAUNCH_MODE, "triton"
        try:
            return fn()
        finally:
            triton_support.LAUNCH_MODE = mode

    return run


@contextlib.contextmanager
def torch_threads(count: int):
    """``torch.set_num_threads(count)`` inside the block (the native kernels follow it too)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def bench_device() -> torch.device:
    """CUDA when available (override with RETHINKCAM_BENCH_DEVICE=cpu|cuda)."""
    wanted = os.environ.get("RETHINKCAM_BENCH_DEVICE")
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {_cpu_model()}, {torch.get_num_threads()} threads"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def quick() -> bool:
    """RETHINKCAM_BENCH_QUICK=1: smaller shapes, for the 2-core CPU machine."""
    return os.environ.get("RETHINKCAM_BENCH_QUICK", "0") not in ("", "0")
