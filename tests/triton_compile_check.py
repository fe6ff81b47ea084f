"""Compile every Triton kernel of rethinkcam_fast for a GPU architecture, on a machine without a GPU.

The CPU tests run the Triton kernels through Triton's interpreter, which executes the Python source of
a kernel: it never lowers it to PTX, so a kernel that uses something the real compiler rejects (a type
mismatch across ``tl.where`` branches, a block shape that is not a power of two, too much shared
memory) passes there and fails on the first GPU run. This script closes that gap:

* Triton's driver is replaced by a compile-only stand-in that reports the target architecture
  (``--arch 90`` = H100) and a GPU with ``--sms`` multiprocessors, so the launchers size their grids
  (channel / output splits) as they would on that GPU;
* every launch (``kernel[grid](...)``) is turned into a warm-up: Triton specialises the kernel for the
  actual arguments (dtypes, constexprs, 16-byte alignment, ints equal to 1) and compiles it all the
  way (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin, with the ``ptxas`` bundled in the Triton wheel), then
  returns without running it, so outputs stay uninitialised and nothing numeric is checked here;
* the ops are then driven through their public entry points with ``backend="triton"`` on CPU tensors,
  at the shapes the GPU benchmarks use (ResNet50 / VGG16, batches 1-64, fp32 / bf16 / fp16, NCHW and
  channels_last, forward and backward), plus the CAM engine for every method.

It fails (exit 1) if any compilation fails or if any launchable kernel (a ``@triton.jit`` function
named ``*_kernel``) was never compiled, and prints each specialisation's registers, local memory
(spills) and shared memory, read from the cubin with the bundled ``cuobjdump``.

    python tests/triton_compile_check.py --arch 90 [--json out.json]

Run it outside pytest's process: Triton decides at import time whether kernels are interpreted, and
this needs them compiled (``tests/test_triton_compile.py`` runs it in a subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: kernels must be JITFunctions
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class CompileOnlyDriver:
    """The part of Triton's driver interface that compilation touches, for a GPU that is not there."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def is_active(self) -> bool:
        return True

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty


class _Utils:
    """The driver utilities a first launch touches: device properties and a loaded binary."""

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
                "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 32, 0, 1024  # module, function, registers, spills, max threads a block


class NoLaunchDriver(CompileOnlyDriver):
    """Compiles each specialisation, then launches into ``on_launch(kernel name, grid, args)`` (by default
    a no-op): Triton's Python launch path, whole, up to its C launcher."""

    def __init__(self, target: GPUTarget, on_launch=None) -> None:
        super().__init__(target)
        self.utils = _Utils()
        self.on_launch = on_launch

    def launcher_cls(self, src, metadata):
        on_launch = self.on_launch
        if on_launch is None:
            return lambda *args: None
        name = metadata.name

        def launcher(grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, enter_hook,
                     exit_hook, *args):
            on_launch(name, (grid_0, grid_1, grid_2), args)

        return launcher


class Recorder:
    """Every compiled specialisation, and every failure, keyed by kernel name."""

    def __init__(self) -> None:
        self.compiled: list[dict] = []
        self.failures: list[dict] = []
        self.scenario = ""

    def resources(self, kernel) -> dict:
        """``reg`` (registers a thread), ``spill_stores`` / ``spill_loads`` (bytes a thread), ``stack``,
        ``shared`` (bytes a block): ptxas's own report (``-v``) for the PTX Triton generated."""
        arch = f"sm_{kernel.metadata.target.arch}{'a' if kernel.metadata.target.arch >= 90 else ''}"
        ptxas = get_ptxas(kernel.metadata.target.arch).path  # the ptxas Triton itself used
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(kernel.asm["ptx"])
            f.flush()
            text = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", "-o", os.devnull, f.name],
                                  capture_output=True, text=True, check=True).stderr
        numbers = {
            "reg": r"Used (\d+) registers", "stack": r"(\d+) bytes stack frame",
            "spill_stores": r"(\d+) bytes spill stores", "spill_loads": r"(\d+) bytes spill loads",
        }
        found = {key: int(m.group(1)) for key, pattern in numbers.items() if (m := re.search(pattern, text))}
        # div.full.f32 / div.approx.f32: Triton's lowering of a float32 `/` (up to 2 ulp off), which the
        # interpreter cannot show; the kernels divide with ieee_div (div.rn) instead.
        approx = len(re.findall(r"\bdiv\.(?:full|approx)(?:\.ftz)?\.f32\b", kernel.asm["ptx"]))
        # fma.rn.f32: a contracted a * b + c (Triton's default on the GPU, never in the interpreter)
        fma = len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f32\b", kernel.asm["ptx"]))
        return {**found, "shared": kernel.metadata.shared, "approx_div": approx, "fma": fma}

    def patch(self) -> None:
        original = JITFunction.run
        recorder = self

        def compile_only(self, *args, grid, warmup, **kwargs):
            name = f"{self.fn.__module__}.{self.fn.__name__}"
            try:
                kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
            except Exception as exc:  # noqa: BLE001 - every failure is reported, then the run fails
                recorder.failures.append({"kernel": name, "scenario": recorder.scenario,
                                          "error": f"{type(exc).__name__}: {exc}"})
                raise
            meta = kernel.metadata
            key = (name, meta.hash)
            if key not in {(c["kernel"], c["hash"]) for c in recorder.compiled}:
                recorder.compiled.append({
                    "kernel": name, "hash": meta.hash, "scenario": recorder.scenario,
                    "num_warps": meta.num_warps, "num_stages": meta.num_stages,
                    "tensors": [f"{str(a.dtype).removeprefix('torch.')}{list(a.shape)}"
                                for a in args if isinstance(a, torch.Tensor)],
                    "constexprs": {k: str(v) for k, v in kwargs.items() if k.isupper()},
                    **recorder.resources(kernel),
                })
            return kernel

        JITFunction.run = compile_only


def launchable_kernels() -> set[str]:
    """Every ``@triton.jit`` function named ``*_kernel`` in the package's op modules."""
    import importlib
    import pkgutil

    import rethinkcam_fast.ops as ops

    names = set()
    for info in pkgutil.iter_modules(ops.__path__):
        module = importlib.import_module(f"rethinkcam_fast.ops.{info.name}")
        for attr, value in vars(module).items():
            if isinstance(value, JITFunction) and attr.endswith("_kernel") and value.fn.__module__ == module.__name__:
                names.add(f"{module.__name__}.{attr}")
    return names


# ---------------------------------------------------------------------------------------------------
# Scenarios: the launch paths, at the benchmarks' shapes. Outputs are uninitialised memory, so
# nothing here may depend on values (the ops' own validation of user inputs sees real inputs).

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
RESNET50_LAYERS = ((256, 56), (512, 28), (1024, 14), (2048, 7))


def _features(n: int, k: int, s: int, dtype: torch.dtype, channels_last: bool, grad: bool = False):
    x = torch.rand(n, k, s, s).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_(grad)


def scenario_tap():
    import rethinkcam_fast

    for dtype in DTYPES:
        for n, (k, s) in ((64, (2048, 7)), (1, (512, 28)), (8, (64, 112))):
            for channels_last in (False, True):
                x = _features(n, k, s, dtype, channels_last, grad=True)
                rethinkcam_fast.tap(x, 0.1, backend="triton").sum().backward()
    # float64 (tau then arrives as three float32 parts; see ops/tap.py _tau_parts)
    rethinkcam_fast.tap(_features(2, 64, 7, torch.float64, False, grad=True), 0.1, backend="triton").sum().backward()


def scenario_class_activation_map():
    import rethinkcam_fast

    weight = torch.randn(1000, 2048)
    for dtype in DTYPES:
        for n in (64, 1):
            labels = torch.randint(0, 1000, (n,))
            for channels_last in (False, True):
                for nwc, normalize in ((False, True), (True, True), (False, False)):
                    x = _features(n, 2048, 7, dtype, channels_last, grad=True)
                    w = weight.to(dtype).requires_grad_()
                    maps = rethinkcam_fast.class_activation_map(x, w, labels, nwc, (224, 224), normalize,
                                                                backend="triton")
                    maps.sum().backward()


def scenario_flm_fuse():
    import rethinkcam_fast

    for dtype in DTYPES:
        for n, layers in ((8, RESNET50_LAYERS), (1, RESNET50_LAYERS[-1:])):
            for fuse in ("sum", "max"):
                acts = [_features(n, k, s, dtype, True, grad=True) for k, s in layers]
                grads = [_features(n, k, s, dtype, True, grad=True) for k, s in layers]
                cams = rethinkcam_fast.flm_fuse(acts, grads, (224, 224), fuse=fuse, backend="triton")
                cams.sum().backward()


def scenario_small_maps_float64():
    """float64 (gradcheck's dtype) on maps smaller than one 16x16 tile, the launch path that picks
    the fewest warps: on Triton 3.6 its tl.dot tiles once asked for more shared memory than an H100 has."""
    from rethinkcam_fast.ops import map_epilogue as epi

    for fuse in ("sum", "max"):
        for normalize in (True, False):
            maps = [torch.rand(2, 3, 4, dtype=torch.float64), torch.rand(2, 5, 5, dtype=torch.float64)]
            epi.map_epilogue_backward_triton(torch.rand(2, 11, 10, dtype=torch.float64), maps, (11, 10), fuse,
                                             normalize)
    import rethinkcam_fast

    acts = [torch.rand(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)]
    grads = [torch.rand(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)]
    rethinkcam_fast.flm_fuse(acts, grads, (9, 7), fuse="max", backend="triton").sum().backward()
    # several float64 layers on a small batch: the split forward (64 output rows: two chunks)
    for fuse in ("sum", "max"):
        acts = [torch.rand(2, 3, s, s, dtype=torch.float64, requires_grad=True) for s in (8, 4, 2)]
        grads = [torch.rand(2, 3, s, s, dtype=torch.float64, requires_grad=True) for s in (8, 4, 2)]
        rethinkcam_fast.flm_fuse(acts, grads, (64, 64), fuse=fuse, backend="triton").sum().backward()


def scenario_output_size_one():
    """Outputs one pixel high or wide: Triton passes an int argument equal to 1 as a constant, which
    has no tensor methods (`H.to(...)` once failed to compile on sm_90 while the interpreter ran it)."""
    import rethinkcam_fast
    from rethinkcam_fast.ops.fuse_maps import fuse_maps

    labels = torch.tensor([1, 0])
    for size in ((1, 16), (7, 1), (1, 1)):
        x = torch.rand(2, 8, 7, 7, requires_grad=True)
        w = torch.randn(3, 8, requires_grad=True)
        rethinkcam_fast.class_activation_map(x, w, labels, False, size, True, backend="triton").sum().backward()
        acts = [torch.rand(2, 4, s, s, requires_grad=True) for s in (5, 3)]
        grads = [torch.rand(2, 4, s, s, requires_grad=True) for s in (5, 3)]
        rethinkcam_fast.flm_fuse(acts, grads, size, fuse="max", backend="triton").sum().backward()
        fuse_maps([torch.rand(2, 5, 5), torch.rand(2, 3, 3)], size, backend="triton")


def scenario_weighted_and_fused_maps():
    from rethinkcam_fast.ops.fuse_maps import fuse_maps
    from rethinkcam_fast.ops.weighted_map import weighted_map

    for dtype in DTYPES:
        # (10x10: Grad-CAM's one-pass kernel at its largest tile, 128 positions)
        for n, (k, s) in ((64, (2048, 7)), (1, (512, 14)), (4, (256, 10))):
            for channels_last in (False, True):
                a = _features(n, k, s, dtype, channels_last)
                g = _features(n, k, s, dtype, channels_last)
                weighted_map(a, torch.rand(n, k).to(dtype), mode="channel", relu=True, backend="triton")
                weighted_map(a, grads=g, mode="layercam", relu=True, backend="triton")
                weighted_map(a, grads=g, mode="flm", relu=False, backend="triton")
                for mode in ("gradcam", "gradcam++"):  # channel weights from the gradients, in the kernel
                    weighted_map(a, grads=g, mode=mode, relu=True, backend="triton")
        maps = [torch.rand(8, s, s).to(dtype) for _, s in RESNET50_LAYERS]
        for fuse in ("sum", "max"):
            fuse_maps(maps, (224, 224), fuse=fuse, backend="triton")
        fuse_maps(maps[-1:], (224, 224), backend="triton")
        # A batch that fills the GPU on its own takes the one-program-per-image kernel (smaller maps
        # keep this cheap: nothing runs, and the kernel's code does not depend on the sizes).
        for layers in (1, 2):
            fuse_maps([torch.rand(600, 7, 7).to(dtype)] * layers, (28, 28), backend="triton")


def scenario_percentile_threshold():
    import rethinkcam_fast

    for dtype in (*DTYPES, torch.float64):
        for n in (64, 1):  # maps split over programs (atomics) ...
            rethinkcam_fast.percentile_threshold(torch.rand(n, 224, 224).to(dtype), backend="triton")
        # ... and a batch that fills the GPU on its own: one program per map
        rethinkcam_fast.percentile_threshold(torch.rand(600, 28, 28).to(dtype), backend="triton")


def scenario_unaligned_inputs():
    """Inputs whose data pointer is not 16-byte aligned (views into a buffer at an odd offset), between
    aligned ones: Triton compiles another specialisation for them, which a launch cache must tell apart."""
    import rethinkcam_fast
    from rethinkcam_fast.ops.weighted_map import weighted_map

    def view(shape, offset):
        numel = 1
        for size in shape:
            numel *= size
        return torch.rand(offset + numel)[offset:].view(shape)

    for offset in (0, 1, 0, 3):
        rethinkcam_fast.percentile_threshold(view((4, 32, 32), offset), backend="triton")
        weighted_map(view((2, 16, 7, 7), offset), view((2, 16), offset), mode="channel", relu=True,
                     backend="triton")


def scenario_engine():
    """The engine's own launch sequence, every method, on the benchmarks' ResNet50 (batch 2)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import _models

    from rethinkcam_fast import CAMEngine

    model, _target = _models.build("resnet50")
    model.eval()
    images = torch.rand(2, 3, 224, 224).to(memory_format=torch.channels_last)
    for method in ("cam", "gradcam", "gradcam++", "layercam", "fullycam"):
        with CAMEngine(model, method, backend="triton", warn_degenerate=False) as engine:
            engine(images)


def _argument_signature(arg):
    """A launch argument as the launcher sees it, comparable across runs that allocate afresh."""
    if isinstance(arg, torch.Tensor):
        return "tensor", arg.dtype, tuple(arg.shape), arg.stride(), arg.storage_offset(), arg.data_ptr() % 16
    return type(arg).__name__, arg


@triton.jit
def _probe_kernel(x_ptr, n, scale, BLOCK: triton.language.constexpr, SHIFT: triton.language.constexpr):
    """A small kernel for the launch cache's rules (launch_rules)."""
    offsets = triton.language.arange(0, BLOCK)
    mask = offsets < n
    value = triton.language.load(x_ptr + offsets, mask=mask)
    triton.language.store(x_ptr + offsets, value * scale + SHIFT, mask=mask)


def launch_rules() -> list[str]:
    """The cases where ``rethinkcam_fast._triton.launch`` must not use its cache, checked by counting
    the launches that go through Triton's path (``JITFunction.run`` without warm-up): a constexpr passed
    positionally (keyed by type, so 2.0 and 3.0 would share a kernel), a runtime argument passed by
    keyword, a knob Triton compiles with changed after a kernel was cached, pre-run hooks; and the
    plain case, which must use it."""
    import rethinkcam_fast._triton as triton_support
    from triton import knobs

    through_triton = 0
    original = JITFunction.run

    def counted(self, *args, grid, warmup, **kwargs):
        nonlocal through_triton
        through_triton += not warmup
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    problems = []
    x = torch.zeros(64)
    cases = {
        "plain (cached after the first call)": (lambda: triton_support.launch(
            _probe_kernel, (1,), x, 64, 2.0, BLOCK=64, SHIFT=1.0), 1),
        "a constexpr passed positionally": (lambda: triton_support.launch(
            _probe_kernel, (1,), x, 64, 2.0, 64, 1.0), 3),
        "a runtime argument passed by keyword": (lambda: triton_support.launch(
            _probe_kernel, (1,), x, 64, scale=2.0, BLOCK=64, SHIFT=1.0), 3),
    }
    mode = triton_support.LAUNCH_MODE
    triton_support.LAUNCH_MODE = "fast"
    JITFunction.run = counted
    try:
        for what, (call, expected) in cases.items():
            _probe_kernel.__dict__.pop("_rethinkcam_launch_cache", None)
            through_triton = 0
            for _ in range(3):
                call()
            if through_triton != expected:
                problems.append(f"launch rules, {what}: {through_triton} of 3 launches through Triton, expected {expected}")
        plain = cases["plain (cached after the first call)"][0]
        plain()  # cached (from the first case) with the knobs as they are
        debug = knobs.runtime.debug
        try:
            knobs.runtime.debug = not debug
            through_triton = 0
            plain()
            plain()
            if through_triton != 1:
                problems.append(f"launch rules, TRITON_DEBUG changed: {through_triton} of 2 launches through Triton "
                                "(expected 1: the first, which compiles the other specialisation)")
        finally:
            knobs.runtime.debug = debug
        calls = []
        plain()  # cached with the knobs restored
        _probe_kernel.pre_run_hooks.append(lambda *args, **kwargs: calls.append(1))
        try:
            plain()
            if not calls:
                problems.append("launch rules: a pre-run hook added after the kernel was cached did not run")
        finally:
            _probe_kernel.pre_run_hooks.clear()
    finally:
        JITFunction.run = original
        triton_support.LAUNCH_MODE = mode
    print(f"launch rules: {len(cases) + 2 - len(problems)} of {len(cases) + 2} hold")
    return problems


def launch_check(names: list[str]) -> list[str]:
    """Runs each scenario three times with a launcher that records every launch: through Triton's launch
    path (``LAUNCH_MODE = "triton"``), then twice through ``rethinkcam_fast._triton.launch`` in its verify
    mode, which raises when its cache picks another compiled kernel than Triton would. The third run must
    launch from the cache alone, with the same kernels, grids and arguments, in the same order, as
    Triton's run. Returns the problems found."""
    import rethinkcam_fast._triton as triton_support

    log: list = []
    driver.set_active(NoLaunchDriver(driver.active.get_current_target(),
                                     lambda name, grid, args: log.append(
                                         (name, grid, tuple(map(_argument_signature, args))))))
    through_triton = 0
    original = JITFunction.run

    def counted(self, *args, grid, warmup, **kwargs):
        nonlocal through_triton
        through_triton += not warmup  # (the verify mode's own look-ups are warm-ups)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    JITFunction.run = counted
    problems = []
    try:
        for name in names:
            runs = []
            for mode in ("triton", "verify", "verify"):
                triton_support.LAUNCH_MODE = mode
                log.clear()
                through_triton = 0
                torch.manual_seed(0)
                try:
                    SCENARIOS[name]()
                except Exception as exc:  # noqa: BLE001 - reported, then the check fails
                    problems.append(f"{name} ({mode}): {type(exc).__name__}: {exc}")
                    traceback.print_exc()
                    break
                runs.append((list(log), through_triton))
            else:
                (reference, _), _, (cached, misses) = runs
                print(f"launch check {name:<24} {len(reference):5d} launches; from the cache: "
                      f"{len(cached) - misses}/{len(cached)}")
                if misses:
                    problems.append(f"{name}: {misses} launches still went through Triton on the third run")
                if cached != reference:
                    first = next((i for i, (a, b) in enumerate(zip(reference, cached)) if a != b),
                                 min(len(reference), len(cached)))
                    problems.append(f"{name}: launch {first} differs: Triton's path "
                                    f"{reference[first] if first < len(reference) else None}, the cache's "
                                    f"{cached[first] if first < len(cached) else None}")
    finally:
        JITFunction.run = original
        triton_support.LAUNCH_MODE = "triton"
    return problems


SCENARIOS = {
    "tap": scenario_tap,
    "class_activation_map": scenario_class_activation_map,
    "flm_fuse": scenario_flm_fuse,
    "small_maps_float64": scenario_small_maps_float64,
    "output_size_one": scenario_output_size_one,
    "weighted_and_fused_maps": scenario_weighted_and_fused_maps,
    "percentile_threshold": scenario_percentile_threshold,
    "unaligned_inputs": scenario_unaligned_inputs,
    "engine": scenario_engine,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 = H100, 80 = A100")
    parser.add_argument("--sms", type=int, default=132, help="multiprocessors the launchers size grids for")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="default: all")
    parser.add_argument("--json", type=Path, help="write every specialisation's resources here")
    parser.add_argument("--launch-check", action="store_true",
                        help="instead: check rethinkcam_fast's launch cache against Triton's launch path "
                             "(see launch_check); compiles as needed, from TRITON_CACHE_DIR when warm")
    args = parser.parse_args(argv)

    import rethinkcam_fast._triton as triton_support
    from rethinkcam_fast.ops import _launch

    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", args.arch, 32)))
    triton_support.triton_interpreted = lambda: True  # let backend="triton" take CPU tensors
    triton_support.LAUNCH_MODE = "triton"  # every launch through JITFunction.run, which compiles only
    _launch.multiprocessor_count = lambda device: args.sms
    if args.launch_check:
        problems = launch_check(args.scenario or list(SCENARIOS)) + launch_rules()
        for problem in problems:
            print(f"LAUNCH CHECK FAILED: {problem}", file=sys.stderr)
        return 1 if problems else 0
    recorder = Recorder()
    recorder.patch()
    torch.manual_seed(0)

    start = time.perf_counter()
    errors = []
    for name in args.scenario or list(SCENARIOS):
        recorder.scenario = name
        try:
            SCENARIOS[name]()
        except Exception:  # noqa: BLE001
            errors.append(name)
            traceback.print_exc()
    seconds = time.perf_counter() - start

    launchable = sorted(launchable_kernels())
    missing = sorted(set(launchable) - {c["kernel"] for c in recorder.compiled}) if not args.scenario else []
    for c in sorted(recorder.compiled, key=lambda c: (c["kernel"], c["scenario"])):
        print(f"sm_{args.arch} {c['kernel'].rsplit('.', 1)[1]:<28} {c['scenario']:<24} warps {c['num_warps']} "
              f"reg {c.get('reg', '?'):>3}  spills {c.get('spill_stores', '?'):>4} B  shared {c.get('shared', '?'):>6}"
              f"  approx-div {c.get('approx_div', '?')}")
    spilling = [c for c in recorder.compiled if c.get("spill_stores", 0) > 0]
    print(f"\n{len(recorder.compiled)} specialisations of {len({c['kernel'] for c in recorder.compiled})} kernels "
          f"compiled for sm_{args.arch} in {seconds:.0f} s; {len(spilling)} spill registers")
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "sms": args.sms, "compiled": recorder.compiled,
                                         "failures": recorder.failures, "launchable": launchable,
                                         "missing": missing}, indent=1))
    for f in recorder.failures:
        print(f"FAILED to compile {f['kernel']} ({f['scenario']}): {f['error']}", file=sys.stderr)
    if errors:
        print(f"scenarios that raised: {', '.join(errors)}", file=sys.stderr)
    if not launchable:
        print("found no launchable kernels (*_kernel JITFunctions) in rethinkcam_fast.ops", file=sys.stderr)
    if missing:
        print(f"kernels never compiled (add a scenario): {', '.join(missing)}", file=sys.stderr)
    return 1 if errors or recorder.failures or missing or not launchable else 0


if __name__ == "__main__":
    sys.exit(main())
