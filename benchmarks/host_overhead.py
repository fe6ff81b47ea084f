"""Host time of the GPU launch paths, measured on a machine without a GPU.

On the H100 the misses of the CAM-op and small-batch targets were host time: the GPU work of
``class_activation_map`` forward+backward took 0.43 ms against 3.2 ms of host time a call (README, GPU
section). This script measures that host time here, so that it can be cut between GPU sessions:

* Triton's driver is replaced by a stand-in (``tests/triton_compile_check.py``'s, for ``--arch``) whose
  launcher only counts: every launch goes through the package's launch path (``rethinkcam_fast._triton.launch``:
  its cache of compiled specialisations, else Triton's whole Python launch path: argument binding,
  specialisation key, cache lookup) and stops where the C launcher would hand the kernel to the driver;
  each specialisation is compiled once, on first use, with the wheel's ``ptxas``; each case's
  ``ours-triton-launch`` row is ``ours`` with every launch through Triton's path
  (``RETHINKCAM_FAST_LAUNCH=0``), timed in the same rounds;
* the ops run with ``backend="triton"`` on CPU tensors of tiny shapes, so the aten ops between the
  launches cost their dispatch (a few µs) and almost no compute, as small CUDA tensors do;
* launchers size their grids for ``--sms`` multiprocessors, as on the GPU.

Each case is timed against the eager PyTorch formulation in the same run (best of ``--rounds``), and
one extra call counts its Triton launches and aten ops, another its Python function calls (a
deterministic measure of the host work; timings on a shared VM drift by several per cent). Not measured: the C launcher and the driver
(``cuLaunchKernelEx``, about 10 µs a launch in the H100 profile) and CUDA's own aten dispatch, so the
absolute numbers are lower than on a GPU host; the counts and the ratios are what to compare.

    python benchmarks/host_overhead.py [--case cam_op --case engine_gradcam ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import triton_compile_check as offline  # noqa: E402  (pops TRITON_INTERPRET before triton is imported)

from _common import through_triton_launch_path  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402


class Counter(TorchDispatchMode):
    """aten ops dispatched under it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


_LAUNCHES = [0]  # kernels handed to the (stand-in) C launcher, by either launch path


def _count_launch(name, grid, args) -> None:
    _LAUNCHES[0] += 1


def count_launches_and_ops(fn) -> tuple[int, int]:
    before = _LAUNCHES[0]
    with Counter() as counter:
        fn()
    return _LAUNCHES[0] - before, counter.ops


def count_python_calls(fn) -> int:
    """Python and builtin function calls in one call of ``fn`` (every thread's, the autograd engine's
    included): a deterministic measure of host work, where timings on a shared 2-core VM drift by
    several per cent."""
    import threading

    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return calls


def best_us(fns: dict, calls: int, rounds: int) -> dict:
    """Best µs a call of each function, the rounds interleaved (each round times every function in
    turn), so that the machine's slow drifts reach all of them alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return {name: seconds * 1e6 for name, seconds in best.items()}


# ---------------------------------------------------------------------------------------------------
# Cases: (name, {provider: zero-argument call}); the first provider is the baseline.


def case_cam_op():
    """class_activation_map forward+backward (issue 8's op) against its eager formulation."""
    from _baselines import eager_cam

    from rethinkcam_fast import class_activation_map

    features = torch.rand(2, 64, 7, 7).to(memory_format=torch.channels_last).requires_grad_(True)
    weight = torch.randn(10, 64).requires_grad_(True)
    labels = torch.tensor([1, 7])
    grad_out = torch.randn(2, 28, 28)

    def eager():
        eager_cam(features, weight, labels, (28, 28)).backward(grad_out)

    def ours():
        class_activation_map(features, weight, labels, output_size=(28, 28), backend="triton").backward(grad_out)

    return "class_activation_map fwd+bwd [2,64,7,7] -> 28²", {"eager": eager, "ours": ours}


def case_flm_op():
    """flm_fuse forward+backward over four layers against its eager formulation."""
    from _baselines import eager_flm

    from rethinkcam_fast import flm_fuse

    acts = [torch.rand(2, 8, s, s).to(memory_format=torch.channels_last).requires_grad_(True) for s in (8, 4, 2, 1)]
    grads = [torch.randn_like(a).requires_grad_(True) for a in acts]
    grad_out = torch.randn(2, 16, 16)

    def eager():
        eager_flm(acts, grads, (16, 16)).backward(grad_out)

    def ours():
        flm_fuse(acts, grads, (16, 16), backend="triton").backward(grad_out)

    return "flm_fuse fwd+bwd 4 layers [2,8,s,s] -> 16²", {"eager": eager, "ours": ours}


def _mini_resnet():
    """The tests' small torchvision-style ResNet (tests/_models.py; benchmarks/_models.py has the big ones)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_test_models", REPO / "tests" / "_models.py")
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    return models.make(models.MiniResNet).eval().to(memory_format=torch.channels_last)


def _single_layer_case(method: str, eager=None):
    from _baselines import forward_with_activation

    from rethinkcam_fast import CAMEngine

    model = _mini_resnet()
    target = model.layer3
    images = torch.rand(1, 3, 32, 32).to(memory_format=torch.channels_last)
    engine = CAMEngine(model, method, target, backend="triton", boxes=False, warn_degenerate=False)

    def floor():
        logits, act = forward_with_activation(model, target, images)
        torch.autograd.grad(logits.gather(1, logits.argmax(1)[:, None]).sum(), act)

    providers = {"fwd+partial-bwd": floor}
    if eager is not None:
        providers[f"eager-{method}"] = lambda: eager(model, target, images)
    providers["ours"] = lambda: engine(images)
    return f"CAMEngine {method} b1 MiniResNet 32²", providers


def case_engine_gradcam():
    """CAMEngine Grad-CAM at batch 1 (issue 3's b1 miss) against forward + partial backward and the
    hand-written eager Grad-CAM."""
    from _baselines import eager_gradcam

    return _single_layer_case("gradcam", eager_gradcam)


def case_engine_gradcampp():
    """CAMEngine Grad-CAM++ at batch 1 (the method furthest from its floor on the H100 at b1)."""
    return _single_layer_case("gradcam++")


def case_engine_fullycam():
    """CAMEngine Fully-CAM (every conv) at batch 1 against forward + backward to the input; and the
    same engine with its per-layer reduction launched from C++ (the CUDA extension's kernel, opt-in
    through RETHINKCAM_CUDA_WEIGHTED_MAP=1; here a no-op stands for the C++ launch), which replaces a
    Triton launch per layer."""
    from rethinkcam_fast import CAMEngine
    from rethinkcam_fast.ops import weighted_map as wm

    model = _mini_resnet()
    images = torch.rand(1, 3, 32, 32).to(memory_format=torch.channels_last)
    engine = CAMEngine(model, "fullycam", backend="triton", boxes=False, warn_degenerate=False)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())

    def floor():
        x = images.detach().requires_grad_(True)
        logits = model(x)
        torch.autograd.grad(logits.gather(1, logits.argmax(1)[:, None]).sum(), x)

    def cpp_launched():
        real = wm._native_grad_modes
        wm._native_grad_modes = lambda a, g, mode, backend: (lambda *args: None) if mode in ("layercam", "flm") else None
        try:
            engine(images)  # the epilogue still on Triton: only the per-layer reduction differs
        finally:
            wm._native_grad_modes = real

    return f"CAMEngine fullycam b1 MiniResNet ({convs} convs) 32²", {
        "fwd+full-bwd": floor, "ours": lambda: engine(images), "ours-cpp-launch": cpp_launched}


def case_pas_threshold():
    """PaS thresholds of a batch of maps (the histogram kernel, then the order statistics)."""
    from rethinkcam_fast import percentile_threshold

    cams = torch.rand(4, 32, 32)

    def eager():  # numpy's percentile on the device, as torch.quantile does it (a sort)
        levels = (cams * 255).to(torch.uint8).flatten(1).double()
        (0.35 * torch.quantile(levels, 0.9, dim=1)).long()

    return "percentile_threshold [4,32,32]", {
        "eager-quantile": eager, "ours": lambda: percentile_threshold(cams, validate=False, backend="triton")}


CASES = {"cam_op": case_cam_op, "flm_op": case_flm_op, "engine_gradcam": case_engine_gradcam,
         "engine_gradcampp": case_engine_gradcampp,
         "engine_fullycam": case_engine_fullycam, "pas_threshold": case_pas_threshold}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="default: all")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--calls", type=int, default=200, help="calls a round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import rethinkcam_fast._triton as triton_support
    from rethinkcam_fast.ops import _launch

    driver.set_active(offline.NoLaunchDriver(GPUTarget("cuda", args.arch, 32), on_launch=_count_launch))
    triton_support.triton_interpreted = lambda: True  # backend="triton" takes CPU tensors
    _launch.multiprocessor_count = lambda device: args.sms
    torch.set_num_threads(1)
    torch.manual_seed(0)

    import rethinkcam_fast

    rows = []
    print(f"rethinkcam_fast from {Path(rethinkcam_fast.__file__).parent} (the installed package, as the tests use)")
    print(f"host time a call (µs, best of {args.rounds} interleaved rounds of {args.calls} calls); launches and aten "
          f"ops counted in one call; Triton's launch path up to its C launcher, no GPU (sm_{args.arch} stand-in)\n")
    for name in args.case or list(CASES):
        title, providers = CASES[name]()
        providers["ours-triton-launch"] = through_triton_launch_path(providers["ours"])
        baseline = next(iter(providers))
        measured = {}
        for provider, fn in providers.items():
            fn()  # compile every specialisation first
            launches, ops = count_launches_and_ops(fn)
            measured[provider] = {"launches": launches, "aten_ops": ops, "python_calls": count_python_calls(fn)}
        for provider, us in best_us(providers, args.calls, args.rounds).items():
            measured[provider]["us"] = us
        print(f"### {title}")
        for provider, m in measured.items():
            ratio = m["us"] / measured[baseline]["us"]
            print(f"  {provider:<18} {m['us']:9.1f} µs  {ratio:5.2f}x {baseline:<16} {m['launches']:3d} Triton launches"
                  f"  {m['aten_ops']:4d} aten ops  {m['python_calls']:6d} Python calls")
            rows.append({"case": name, "title": title, "provider": provider, "baseline": baseline, **m})
        print()
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "sms": args.sms, "torch": torch.__version__,
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
