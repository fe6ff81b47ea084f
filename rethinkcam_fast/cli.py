"""``rethinkcam`` command line (also ``python -m rethinkcam_fast``)."""

from __future__ import annotations

import argparse
import sys


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, epochs=args.epochs, seed=args.seed, tau=args.tau)
    return 0


def _cmd_info(_args: argparse.Namespace) -> int:
    import torch

    from . import __version__, _native
    from ._triton import HAS_TRITON, triton_interpreted

    print(f"rethinkcam_fast {__version__}, torch {torch.__version__}")
    print(f"native CPU kernels : {'yes' if _native.has_native() else 'no (' + str(_native.load_error('_C')) + ')'}")
    cuda_built = _native.cuda_module() is not None
    print(f"CUDA extension     : {'built' if cuda_built else 'not built (' + str(_native.load_error('_C_cuda')) + ')'}")
    print(f"CUDA device        : {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"triton             : {'yes' if HAS_TRITON else 'no'}{' (interpreter)' if triton_interpreted() else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rethinkcam", description="Fast CAMs and WSOL for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a tiny classifier with GAP and with TAP on generated shapes")
    demo.add_argument("--out", help="directory for demo.json")
    demo.add_argument("--epochs", type=_positive_int, default=10)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--tau", type=float, default=0.1, help="TAP threshold ratio in [0, 1)")
    demo.set_defaults(func=_cmd_demo)

    info = sub.add_parser("info", help="which kernels (native, CUDA, Triton) are live here")
    info.set_defaults(func=_cmd_info)

    from .evaluation.cli import add_evaluate_commands

    add_evaluate_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
