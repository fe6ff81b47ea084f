"""Train the cluttered-digits classifier (GAP or TAP): AMP on the GPU, channels_last, optional ``torch.compile``.

:func:`train_model` trains any classifier on a :class:`~rethinkcam_fast.datasets.CanvasSet`;
:func:`train_digits_model` generates the benchmark and trains :class:`~rethinkcam_fast.models.DigitsCAMNet`
(``rethinkcam train``). Checkpoints are written atomically after every epoch
(:func:`~rethinkcam_fast.models.save_checkpoint`) and read back with ``weights_only=True``.
Everything is seeded: the same options give the same weights on the same machine and torch build.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from .datasets import CanvasSet, ClutteredDigitsConfig, generate_cluttered_digits
from .models import DigitsCAMNet, save_checkpoint


@dataclass(frozen=True)
class TrainOptions:
    """Optimisation settings (AdamW; linear warm-up then cosine decay of the learning rate).

    ``device="auto"`` picks CUDA when available. ``amp`` (bf16 autocast) and ``channels_last`` apply on
    CUDA only (:func:`applied_options` gives what a run on a device really uses); ``compile`` wraps the
    training objective, ``loss_fn(model, images, labels)``, in ``torch.compile``: the model's forward is
    traced inside it, the backward compiled through AOTAutograd, the optimizer step stays eager.
    """

    epochs: int = 6
    batch_size: int = 64
    lr: float = 4e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")


@dataclass
class TrainReport:
    """What training returns: the trained model (``eval()`` mode, on the CPU) and what happened."""

    model: nn.Module
    seconds: float
    images_per_second: float
    train_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    device: str = "cpu"


def applied_options(options: TrainOptions, device: torch.device) -> TrainOptions:
    """``options`` as a run on ``device`` applies them: the resolved device, and ``amp`` /
    ``channels_last`` off unless it is a CUDA device. Checkpoints record this, not the request."""
    on_cuda = device.type == "cuda"
    return replace(options, device=str(device), amp=options.amp and on_cuda,
                   channels_last=options.channels_last and on_cuda)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``cpu``, ``cuda`` or ``cuda:N`` as ``torch.device`` parses it.

    Raises ``ValueError`` for a string that names no device or another device type, or a CUDA device this PyTorch cannot use
    (no CUDA build, no GPU, or an index past the last GPU) — before any work starts."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {device}: not a device ({exc})") from None
    if resolved.type not in ("cpu", "cuda"):  # (meta, mps, xpu...: not a device this project runs on)
        raise ValueError(f"--device {device}: not supported here; use cpu, cuda, cuda:N or auto")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {device}: {why} (torch {torch.__version__}); use --device cpu or auto")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return resolved


class ProgressBar:
    """A one-line text progress bar on ``stream``: redrawn in place on a terminal (at most every
    ``refresh`` seconds), else one line when closed. Stats may be tensors; they are read only when drawn."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, enabled: bool = True,
                 refresh: float = 0.25) -> None:
        self.total, self.label, self.stream, self.enabled = total, label, stream or sys.stderr, enabled
        self.interactive = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = self.last_draw = time.perf_counter()
        self.refresh = refresh
        self.count = 0

    def update(self, steps: int = 1, **stats: float | Tensor) -> None:
        self.count += steps
        if self.interactive and time.perf_counter() - self.last_draw >= self.refresh:
            self._draw(stats, end="\r")

    def close(self, **stats: float | Tensor) -> None:
        if self.enabled:
            self._draw(stats, end="\n")

    def _draw(self, stats: dict[str, float | Tensor], end: str) -> None:
        width = 24
        done = int(width * self.count / max(self.total, 1))
        extra = " ".join(f"{k} {float(v):.3g}" for k, v in stats.items())
        self.last_draw = time.perf_counter()
        self.stream.write(f"{self.label} [{'#' * done}{'.' * (width - done)}] {self.count}/{self.total} "
                          f"{self.last_draw - self.start:.1f}s {extra}{end}")
        self.stream.flush()


def warmup_cosine(total_steps: int, warmup_fraction: float = 0.2):
    """Learning-rate factor per step: linear warm-up over ``warmup_fraction`` of the steps, then cosine to 0."""
    warmup = max(1, int(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return factor


@torch.no_grad()
def classify(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Top-1 predictions ``LongTensor[N]`` for ``images[N, C, H, W]`` (model in ``eval()`` mode, its device)."""
    device = next(model.parameters()).device
    model.eval()
    out = [model(images[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def cross_entropy_loss(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    """The default training objective: cross-entropy of ``model(images)``."""
    return nn.functional.cross_entropy(model(images), labels)


def train_model(model: nn.Module, train: CanvasSet, options: TrainOptions, val: CanvasSet | None = None,
                checkpoint_path: str | None = None, checkpoint_meta: dict[str, Any] | None = None,
                progress: bool = True,
                loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor] = cross_entropy_loss,
                resume: dict[str, Any] | None = None) -> TrainReport:
    """Train ``model`` on ``train`` (``images[N, H, W]`` grey canvases, ``labels[N]``).

    ``loss_fn(model, images, labels) -> scalar`` is the objective (cross-entropy by default; e.g. plus a
    CAM term through :func:`rethinkcam_fast.class_activation_map`, see ``examples/train_with_cam_loss.py``);
    with ``options.compile`` it is passed through ``torch.compile`` (which traces the model's forward
    inside it).

    The training canvases are moved to the device once. After every epoch: validation accuracy (if
    ``val``), and an atomic checkpoint at ``checkpoint_path`` (``DigitsCAMNet`` only) whose ``meta`` is
    ``checkpoint_meta`` plus ``options`` (:func:`applied_options`: what this run applied), ``threads``
    (``torch.get_num_threads()``), ``epoch``, ``train_loss`` and ``val_accuracy``; until the last epoch
    it also holds the run's training state (optimizer, schedule, batch order and RNG states), which
    ``resume`` (a checkpoint's ``"resume"`` entry, the model holding its weights) continues from, to the
    same weights as an uninterrupted run on the same machine (see :func:`resume_training`). Returns the
    model in ``eval()`` mode, moved back to the CPU.
    """
    if checkpoint_path is not None and not isinstance(model, DigitsCAMNet):
        raise TypeError(f"checkpoints are written for DigitsCAMNet only, got {type(model).__name__}")
    device = resolve_device(options.device)
    applied = applied_options(options, device)
    torch.manual_seed(options.seed)
    channels_last, use_amp = applied.channels_last, applied.amp
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_loss = torch.compile(loss_fn) if options.compile else loss_fn
    steps_per_epoch = math.ceil(len(train) / options.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(options.epochs * steps_per_epoch))
    order_generator = torch.Generator().manual_seed(options.seed)
    images, labels = train.float_images().to(device), train.labels.to(device)  # 16 kB per 64x64 canvas
    report = TrainReport(model, 0.0, 0.0, device=str(device))
    first_epoch = 0
    if resume is not None:
        try:
            optimizer.load_state_dict(resume["optimizer"])
            schedule.load_state_dict(resume["schedule"])
            order_generator.set_state(resume["order"])
            torch.set_rng_state(resume["rng"])
            first_epoch = int(resume["epoch"])
            report.train_loss, report.val_accuracy = list(resume["train_loss"]), list(resume["val_accuracy"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # (another version's or a damaged state)
            from .models import CheckpointError

            where = f"{checkpoint_path}: " if checkpoint_path else ""
            raise CheckpointError(f"{where}training state does not fit this run ({type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no details'})") from None
    start = time.perf_counter()
    for epoch in range(first_epoch, options.epochs):
        model.train()
        bar = ProgressBar(steps_per_epoch, f"epoch {epoch + 1}/{options.epochs}", enabled=progress)
        order = torch.randperm(len(train), generator=order_generator)
        total_loss = torch.zeros((), device=device)
        for i in range(0, len(order), options.batch_size):
            index = order[i : i + options.batch_size].to(device)
            x = images[index].contiguous(memory_format=torch.channels_last) if channels_last else images[index]
            y = labels[index]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = step_loss(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.detach() * len(index)
            bar.update(loss=loss.detach())
        report.train_loss.append(float(total_loss) / len(train))
        stats = {"loss": report.train_loss[-1]}
        if val is not None and len(val):
            accuracy = 100.0 * float((classify(model, val.float_images()) == val.labels).double().mean())
            report.val_accuracy.append(accuracy)
            stats["val_acc"] = accuracy
        bar.close(**stats)
        if checkpoint_path is not None:
            unfinished = epoch + 1 < options.epochs
            state = {"epoch": epoch + 1, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     "order": order_generator.get_state(), "rng": torch.get_rng_state(),
                     "train_loss": report.train_loss, "val_accuracy": report.val_accuracy} if unfinished else None
            save_checkpoint(checkpoint_path, model, {
                **(checkpoint_meta or {}), "options": asdict(applied), "threads": torch.get_num_threads(),
                "epoch": epoch + 1, "train_loss": report.train_loss, "val_accuracy": report.val_accuracy}, state)
    report.seconds = time.perf_counter() - start
    report.images_per_second = (options.epochs - first_epoch) * len(train) / max(report.seconds, 1e-9)
    report.model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    return report


def train_digits_model(pool: str = "tap", tau: float = 0.1, widths: tuple[int, int, int] = (16, 32, 64),
                       options: TrainOptions | None = None, data: ClutteredDigitsConfig | None = None,
                       splits: dict[str, CanvasSet] | None = None, checkpoint_path: str | None = None,
                       progress: bool = True) -> TrainReport:
    """Generate cluttered digits (``data``, or use ``splits``) and train a :class:`DigitsCAMNet` on them.

    The checkpoint's ``meta`` records the data config, the options as applied (see :func:`train_model`),
    the thread count, the torch version and the losses and accuracies, so a shipped file says how it was made.
    """
    options = options or TrainOptions()
    data = data or ClutteredDigitsConfig()
    splits = splits if splits is not None else generate_cluttered_digits(data)
    torch.manual_seed(options.seed)
    model = DigitsCAMNet(pool=pool, tau=tau, widths=widths)
    return train_model(model, splits["train"], options, splits.get("val"), checkpoint_path, _run_meta(data), progress)


def _run_meta(data: ClutteredDigitsConfig) -> dict[str, Any]:
    """What a digits run's checkpoints record besides the training's own entries: the data config
    (JSON-like: tuples as lists; :func:`resume_training` reads it back) and the torch version."""
    return {"data": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(data).items()},
            "torch": str(torch.__version__)}


# What train_model reads from a checkpoint's "resume" entry.
_RESUME_KEYS = ("optimizer", "schedule", "order", "rng", "epoch", "train_loss", "val_accuracy")


def resume_training(checkpoint_path: str, progress: bool = True, threads: int | None = None) -> TrainReport:
    """Continue the :func:`train_digits_model` run whose checkpoint (written after an epoch, before the
    last) is ``checkpoint_path``: the model, data and options recorded there, the data generated
    again from its recorded config and seed, the optimizer, schedule, batch order and RNG states
    restored; the checkpoint is updated after every epoch as before. On the machine and thread count
    that wrote it, the result equals the uninterrupted run's weights (a CUDA run's kernels may differ
    in the last bits). ``threads``: CPU threads for the rest of the run (``torch.set_num_threads``);
    ``None``: the count the checkpoint recorded, which the equality needs (a CPU sum's order follows it).

    Raises:
        CheckpointError: not a checkpoint, or one with nothing to resume (a finished run, or one from
            before checkpoints held the training state).
    """
    from .models import CheckpointError, load_state_into, model_from_arch, read_weights, state_dict_of

    payload = read_weights(checkpoint_path)
    resume, meta = payload.get("resume"), payload.get("meta") or {}
    if not isinstance(resume, dict) or "data" not in meta or "options" not in meta:
        finished = isinstance(meta.get("epoch"), int) and meta.get("epoch") == (meta.get("options") or {}).get("epochs")
        raise CheckpointError(f"{checkpoint_path}: nothing to resume ("
                              + ("the run finished" if finished else "no training state in this checkpoint") + ")")
    missing = [key for key in _RESUME_KEYS if key not in resume] + (["arch"] if "arch" not in payload else [])
    if missing:
        raise CheckpointError(f"{checkpoint_path}: not a complete training state (no {', '.join(missing)})")
    try:  # (a state written by another version, or edited: one line naming the file, before any work)
        data = ClutteredDigitsConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["data"].items()})
        options = TrainOptions(**meta["options"])
    except (AttributeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint_path}: its recorded data or options are not this version's "
                              f"({type(exc).__name__}: {exc})") from None
    recorded = meta.get("threads")
    if threads is not None or isinstance(recorded, int) and recorded > 0:
        torch.set_num_threads(threads if threads is not None else recorded)
    model = model_from_arch(payload["arch"], checkpoint_path)
    load_state_into(model, state_dict_of(payload, checkpoint_path), checkpoint_path)
    splits = generate_cluttered_digits(data)
    return train_model(model, splits["train"], options, splits.get("val"), checkpoint_path, _run_meta(data), progress,
                       resume=resume)


__all__ = ["ProgressBar", "TrainOptions", "TrainReport", "applied_options", "classify", "cross_entropy_loss",
           "resolve_device", "resume_training", "train_digits_model", "train_model"]
