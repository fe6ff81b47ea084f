"""``rethinkcam`` command line (also ``python -m rethinkcam_fast``)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings


# rethinkcam_fast.engine.METHODS, spelled out so that building the parser needs no op module
# (tests/test_cli.py checks that the two agree).
CAM_METHODS = ("cam", "gradcam", "gradcam++", "layercam", "fullycam")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


_positive_int.__name__ = "positive integer"  # (argparse says "invalid positive integer value: '1e3'")


def _tap_tau(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEFAULT_OUT, run_demo
    from .models import CheckpointError

    made: list[str] = []
    try:
        made = _check_output_dir(args.out or DEFAULT_OUT)
        given = {"out_dir": args.out, "method": args.method, "box_threshold": args.box_threshold}
        run_demo(count=args.count, grid=args.grid, weights=args.weights,
                 **{k: v for k, v in given.items() if v is not None})  # run_demo's defaults otherwise
    except (CheckpointError, ValueError) as exc:
        return _fail(exc, made)
    return 0


def _check_output_dir(path: str) -> list[str]:
    """A folder for outputs exists at ``path`` or can be made there, and is writable, and the files
    demo and localize write there are not folders — checked before any work, so that a bad ``--out``
    is not found only after the run (or half-way through its outputs). Returns the folders it made."""
    from .localize import GRID_NAME, JSON_NAME

    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {path}: exists and is not a directory")
    for name in (JSON_NAME, GRID_NAME):
        if os.path.isdir(os.path.join(path, name)):
            raise ValueError(f"--out {path}: {os.path.join(path, name)} is a directory, where the command writes a file")
    return _writable_folder(path, f"--out {path}", "it", "the directory")


def _writable_folder(folder: str, label: str, it: str, the_folder: str) -> list[str]:
    """Make ``folder`` if needed and check that it is writable; errors start with ``label``. Returns
    the folders it made, outermost first: a command that fails removes them again if still empty
    (:func:`_fail`), so a failed run leaves no empty output folder behind."""
    made, probe = [], os.path.abspath(folder)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        made.insert(0, probe)
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):  # (makedirs would say "File exists")
        raise ValueError(f"{label}: {probe} is a file, not a directory")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        _remove_if_empty(made)
        raise ValueError(f"{label}: cannot create {it} ({exc.strerror})") from None
    if not os.access(folder, os.W_OK):
        _remove_if_empty(made)
        raise ValueError(f"{label}: {the_folder} is not writable")
    return made


def _remove_if_empty(made: list[str]) -> None:
    """Remove folders :func:`_writable_folder` made, innermost first, while they are empty."""
    for folder in reversed(made):
        try:
            os.rmdir(folder)
        except OSError:  # not empty (the run wrote something: keep it), or gone
            return


def _fail(exc: Exception | str, made: list[str] | None = None) -> int:
    """Print the error, remove the (still empty) output folders the command ``made``; exit code 2."""
    _remove_if_empty(made or [])
    print(f"rethinkcam: error: {exc}", file=sys.stderr)
    return 2


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .datasets import DATASET_NAME, ClutteredDigitsConfig, generate_cluttered_digits, write_wsol_dataset
    from .models import CheckpointError
    from .training import TrainOptions, resolve_device, resume_training, train_digits_model

    if args.resume:  # the run recorded in --out: its model, data, options and thread count (--threads
        if not os.path.isfile(args.out):  # overrides that one; the other options are not read)
            return _fail(f"--resume: {args.out} is not a checkpoint file to continue")
        try:
            report = resume_training(args.out, progress=not args.quiet, threads=args.threads)
        except CheckpointError as exc:
            return _fail(exc)
        print(f"resumed and trained on {report.device} in {report.seconds:.1f} s; wrote {args.out}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    made: list[str] = []
    data_out_made: list[str] = []
    try:  # everything that can be wrong with the arguments fails here, before the data and the training
        resolve_device(args.device)
        made = check_output_file(args.out)
        if args.data_out:  # a writable folder, and its dataset folder (written into) not a file
            dataset_dir = os.path.join(args.data_out, DATASET_NAME)
            for folder, what in ((args.data_out, "exists"), (dataset_dir, f"{dataset_dir} exists")):
                if os.path.exists(folder) and not os.path.isdir(folder):
                    raise ValueError(f"--data-out {args.data_out}: {what} and is not a directory")
            data_out_made = _writable_folder(args.data_out, f"--data-out {args.data_out}", "it", "the directory")
        if not 0 <= args.seed < 2**64:  # (torch.manual_seed's range: checked before any data is made)
            raise ValueError(f"--seed must be >= 0 and < 2**64, got {args.seed}")
        if args.tau is not None and args.pool != "tap":
            raise ValueError(f"--tau is TAP's threshold: it needs --pool tap (got --pool {args.pool})")
        if args.canvas_size < 8:
            raise ValueError(f"--canvas-size must be at least 8 (the digits' 8x8 source grid), got {args.canvas_size}")
        low, high = ClutteredDigitsConfig.digit_size
        data = ClutteredDigitsConfig(canvas_size=args.canvas_size, seed=args.seed,
                                     digit_size=(min(low, args.canvas_size), min(high, args.canvas_size)),
                                     counts={"train": args.train_size, "val": args.val_size, "test": args.test_size})
        options = TrainOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                               device=args.device, amp=not args.no_amp, compile=args.compile)
    except ValueError as exc:
        _remove_if_empty(data_out_made)
        return _fail(exc, made)
    splits = generate_cluttered_digits(data)
    if args.data_out:
        print(f"wrote {write_wsol_dataset(args.data_out, splits)}")
    tau = 0.1 if args.tau is None else args.tau
    report = train_digits_model(args.pool, tau, tuple(args.widths), options, data, splits, args.out,
                                progress=not args.quiet)
    val = f", val acc {report.val_accuracy[-1]:.1f} %" if report.val_accuracy else ""
    print(f"trained {args.pool} model on {report.device} in {report.seconds:.1f} s "
          f"({report.images_per_second:.0f} img/s){val}; wrote {args.out}")
    return 0


def check_output_file(path: str, option: str = "--out") -> list[str]:
    """A file can be written at ``path`` (its folder exists or can be made, and it is not a folder, a
    device or a pipe: the file is replaced atomically); returns the folders it made (see
    :func:`_writable_folder`)."""
    from ._files import output_folder, replaceable

    if os.path.isdir(path):
        raise ValueError(f"{option} {path}: is a directory; give a file name")
    replaceable(path, option)
    folder = output_folder(path)  # (a symlink's file's folder)
    return _writable_folder(folder, f"{option} {path}", "its folder", f"the folder {folder}")


def _warn_non_finite(bad: int, total: int, what: str = "image") -> None:
    """One line when the model gave non-finite logits: their maps are zeros, their boxes empty."""
    if bad:
        print(f"rethinkcam: warning: {bad} of {total} {what}(s) got non-finite logits (NaN or inf: damaged weights, or "
              "an overflow in the model): their maps are zeros, their boxes empty, their scores null in the JSON",
              file=sys.stderr)


def _cmd_localize(args: argparse.Namespace) -> int:
    from .imageio import ImageReadError
    from .localize import input_channels, input_policy, load_user_model, localize_files
    from .models import CheckpointError

    from .training import resolve_device

    image_size, normalize = input_policy(args.model, args.image_size, args.normalize)
    made: list[str] = []
    try:
        device = resolve_device(args.device)
        if args.no_nwc and args.method != "cam":  # (as video and evaluate-model refuse it)
            raise ValueError("--no-nwc applies to --method cam only")
        made = _check_output_dir(args.out)
        model = load_user_model(args.model, args.weights)
        if args.normalize == "imagenet" and input_channels(model) == 1:
            raise ValueError("--normalize imagenet: the model takes one channel (grey images in [0, 1]); ImageNet's "
                             "statistics are for RGB models")
        if args.weights is None:
            print(f"rethinkcam: warning: no --weights: {args.model} runs with the weights its factory gives it"
                  + (" (random for a torchvision name)" if ":" not in args.model else ""), file=sys.stderr)
        records = localize_files(args.images, model, args.method, nwc=not args.no_nwc, box_threshold=args.box_threshold,
                                 image_size=image_size, normalize=normalize, device=device, out_dir=args.out,
                                 grid=args.grid)
    except (ImageReadError, CheckpointError, ValueError, FileNotFoundError) as exc:
        return _fail(exc, made)
    except RuntimeError as exc:  # the model itself failed on these inputs (too small, wrong channels, ...)
        return _fail(f"the model failed on the input: {str(exc).strip().splitlines()[0]}", made)
    for record in records:
        score = "nan" if record["score"] is None else f"{record['score']:.3f}"
        print(f"{record['image']}: class {record['label']} score {score} box {record['box']}")
    _warn_non_finite(sum(record["score"] is None for record in records), len(records))
    print(f"wrote {args.out}")
    return 0


def _cmd_info(_args: argparse.Namespace) -> int:
    import torch

    from . import __version__, _native
    from ._triton import HAS_TRITON, TRITON_MISSING, triton_interpreted

    print(f"rethinkcam_fast {__version__}, torch {torch.__version__}")
    print(f"native CPU kernels : {'yes' if _native.has_native() else 'no (' + str(_native.load_error('_C')) + ')'}")
    cuda_built = _native.cuda_module() is not None
    if not cuda_built:
        cuda_state = f"not built ({_native.load_error('_C_cuda')})"
    else:
        cuda_state = "built, live" if _native.has_cuda_kernels() else "built (not live: no CUDA device in this torch)"
    print(f"CUDA extension     : {cuda_state}")
    print(f"CUDA device        : {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    triton_state = ("yes" + (" (interpreter)" if triton_interpreted() else "")) if HAS_TRITON else f"no: {TRITON_MISSING}"
    print(f"triton             : {triton_state}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("rethinkcam_fast")
    except PackageNotFoundError:  # run from a source tree that was never installed
        installed = "unknown (not installed)"
    parser = argparse.ArgumentParser(prog="rethinkcam", description="Fast CAMs and WSOL for PyTorch.")
    parser.add_argument("--version", action="version", version=f"rethinkcam_fast {installed}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="localize real handwritten digits with the shipped model (CPU, no downloads)")
    demo.add_argument("--out", help="directory for localizations.json and grid.png (default: ./rethinkcam_demo)")
    demo.add_argument("--count", type=_positive_int, default=200, help="test canvases to localize (default: 200)")
    demo.add_argument("--grid", type=_positive_int, default=16, help="canvases drawn in grid.png (default: 16)")
    demo.add_argument("--weights", help="a checkpoint from `rethinkcam train` (default: the shipped model)")
    demo.add_argument("--method", choices=CAM_METHODS,
                      help="CAM method (default: the one the ablation favours, demo.DEMO_METHOD; cam uses NWC)")
    demo.add_argument("--box-threshold", choices=["max", "pas"],
                      help="box threshold 0.2 x max or PaS, 0.35 x p90 (default: the one the ablation favours)")
    demo.set_defaults(func=_cmd_demo)

    train = sub.add_parser("train", help="train the cluttered-digits CNN (GAP or TAP) and write a checkpoint")
    train.add_argument("--out", required=True, help="checkpoint file (written atomically after every epoch)")
    train.add_argument("--pool", choices=["gap", "tap"], default="tap", help="global pool (default: tap)")
    train.add_argument("--tau", type=_tap_tau, help="TAP threshold ratio in [0, 1), with --pool tap (default: 0.1)")
    train.add_argument("--widths", type=_positive_int, nargs=3, default=[16, 32, 64], help="channels per stage (default: 16 32 64)")
    train.add_argument("--epochs", type=_positive_int, default=6, help="(default: 6)")
    train.add_argument("--batch-size", type=_positive_int, default=64, help="(default: 64)")
    train.add_argument("--lr", type=float, default=4e-3, help="AdamW learning rate (default: 0.004)")
    train.add_argument("--seed", type=int, default=0, help="seeds the data (instance split, canvases) and training")
    train.add_argument("--canvas-size", type=_positive_int, default=64,
                       help="canvas side in pixels, at least 8; digits are 20-32 px, at most the canvas (default: 64)")
    train.add_argument("--train-size", type=_positive_int, default=4000, help="(default: 4000)")
    train.add_argument("--val-size", type=int, default=500, help="(default: 500)")
    train.add_argument("--test-size", type=int, default=1000, help="(default: 1000)")
    train.add_argument("--data-out", help="also write the generated dataset (PNGs + WSOL metadata) here")
    train.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    train.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice)")
    train.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    train.add_argument("--compile", action="store_true",
                       help="torch.compile the training loss function (the model's forward is traced inside it)")
    train.add_argument("--resume", action="store_true",
                       help="continue the interrupted run whose checkpoint is --out (its recorded model, data, "
                            "options and thread count, which --threads overrides; the other training options are "
                            "not read)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=_cmd_train)

    localize = sub.add_parser("localize", help="boxes and CAMs for your own images and classifier")
    localize.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    localize.add_argument("--model", required=True,
                          help="a torchvision model name (resnet50, ...), or MODULE:CALLABLE or FILE.py:CALLABLE "
                               "returning the nn.Module")
    localize.add_argument("--weights", help="state dict or checkpoint file (loaded with weights_only=True)")
    localize.add_argument("--method", default="cam", choices=CAM_METHODS,
                          help="CAM method (default: cam, with negative weight clamping unless --no-nwc)")
    localize.add_argument("--no-nwc", action="store_true", help="no negative weight clamping (method cam)")
    localize.add_argument("--box-threshold", choices=["max", "pas"], default="max",
                          help="box threshold: 0.2 x max (default) or PaS (0.35 x 90th percentile)")
    localize.add_argument("--image-size", type=_positive_int,
                          help="resize to this square for the model (default: 224 for torchvision names, else none)")
    localize.add_argument("--normalize", choices=["auto", "imagenet", "none"], default="auto",
                          help="input normalisation (auto: ImageNet for torchvision names, none otherwise)")
    localize.add_argument("--device", default="cpu")
    localize.add_argument("--out", default="rethinkcam_localize", help="directory for localizations.json and grid.png (default: rethinkcam_localize)")
    localize.add_argument("--grid", type=_positive_int, default=16,
                          help="images drawn in grid.png, the first ones (default: 16; every image is in the JSON)")
    localize.set_defaults(func=_cmd_localize)

    info = sub.add_parser("info", help="which kernels (native, CUDA, Triton) are live here")
    info.set_defaults(func=_cmd_info)

    from .evaluation.cli import add_evaluate_commands
    from .video_cli import add_video_command

    add_evaluate_commands(sub)
    add_video_command(sub, CAM_METHODS, _positive_int)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (a job scheduler, `kill`) unwinds like Ctrl-C, so that the commands' cleanup runs (the
    # video command removes its *.partial outputs), and either ends with one line, not a traceback.
    # (Handlers can only be set from the main thread; getsignal gives None for a handler set outside
    # Python, which is restored as the default.)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _raise_interrupt)
    # The library's warnings (a box past its image, an unused mask root, non-finite logits) as the
    # commands' own: one line, not Python's file:line and source line from inside the package.
    python_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, _Terminated)
        print(f"rethinkcam: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)  # the shell's convention: 143, 130
    except MemoryError:  # (a size too large for this machine: --count, --scale...)
        print("rethinkcam: error: out of memory (a size or count too large for this machine?)", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader of stdout went away (`| head`): quietly, as a shell tool does
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error at exit's flush)
        except (OSError, ValueError):
            pass
        return 128 + 13  # SIGPIPE
    except OSError as exc:  # writing an output failed (a full disk, a folder where a file goes...)
        print(f"rethinkcam: error: {exc}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = python_format
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"rethinkcam: warning: {message}\n"


class _Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C (the commands' cleanup runs the same way)."""


def _raise_interrupt(signum, frame) -> None:
    raise _Terminated


if __name__ == "__main__":
    sys.exit(main())
