"""Streaming localization: CAMs and PaS boxes for a stream of frames, in order, with bounded latency.

Data flow per batch of frames::

    decode (OpenCV, a background thread, bounded queue)  ->  uint8 HWC frames on the host
    -> pinned host buffer -> device (non-blocking)  ->  float, normalise, resize to the model's input
    -> CAMEngine (any method; optional bf16 autocast) -> maps at the frame's own size -> PaS threshold
    -> labels, scores, thresholds and uint8 levels packed into one buffer -> one copy to the host
    -> largest-contour box (C++ border follower) -> FrameResult per frame, in input order

Frames are grouped into batches of at most ``batch_size`` frames of one size, and a frame of another
size mid-stream simply starts a new batch. On CUDA, batches overlap: a batch is submitted to the device
before the previous one's results are collected, so the host's work on one batch overlaps the
device's on the next; a result is then at most ``2 * batch_size - 1`` frames late (without overlap,
``batch_size - 1``), and when the source has no frame ready (a live camera) finished results are
handed out at once; after ``max_wait`` seconds without a frame the partial batch goes too. Memory is
bounded by the decode queue and two batches, whatever the length of the input.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ._cuda_graph import CapturedCall
from ._files import is_stream, replaceable
from .engine import CAMEngine, _class_index
from .folding import fold_batchnorm
from .localize import IMAGENET_MEAN, IMAGENET_STD, input_channels, json_number
from .ops.boxes import CONVENTIONS, boxes_from_packed, pack_results, packed_to_host
from .ops.percentile_threshold import check_pas_parameters, percentile_threshold

LUMA = (0.299, 0.587, 0.114)  # RGB -> grey (ITU-R BT.601), for single-channel models


@dataclass
class FrameResult:
    """One frame's localization.

    Attributes:
        index: position of the frame in the stream (0-based).
        label: the class explained (top-1 unless a target was given).
        score: its logit.
        box: ``(x0, y0, x1, y1)`` inclusive pixel extents in the frame's own coordinates, from the
            largest contour above the PaS threshold; ``(0, 0, 0, 0)`` when the map is empty.
        cam: the map ``Tensor[H, W]`` in ``[0, 1]`` at the frame's size (on the device), when
            ``keep_cams=True``; else ``None``. A view into one copy of its batch's maps (``.clone()``
            it to keep one frame's map without the others).
    """

    index: int
    label: int
    score: float
    box: tuple[int, int, int, int]
    cam: Tensor | None = None

    def as_json(self) -> dict:
        """``frame``, ``label``, ``score`` (None when not finite: JSON has no NaN), ``box``."""
        return {"frame": self.index, "label": self.label, "score": json_number(self.score), "box": list(self.box)}


def _require_cv2():
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - OpenCV is a test dependency
        raise ImportError("video input/output needs OpenCV: pip install 'rethinkcam_fast[video]' "
                          "(or opencv-python-headless)") from exc
    return cv2


class VideoReadError(RuntimeError):
    """A video source that cannot be opened or decoded."""


class FrameBatchError(RuntimeError):
    """The model (or the CAM engine) failed on a batch of frames; the message names the frames and their
    size (e.g. a frame too small for the model's pooling, mid-stream); the original error is the cause."""


@dataclass
class DecodeReport:
    """What a stream delivered: frames decoded (by :func:`read_frames`), the count the container
    announced, its frame rate, the frames localized, whether a ``KeyboardInterrupt`` stopped it, and
    the output files :func:`localize_video` left on disk (``*.partial*`` ones when a second interrupt
    came while the first one's outputs were being closed).
    Frame indices count decoded frames: a frame the decoder skips (a corrupt packet) shifts the later
    ones, and shows only as fewer frames read than announced (``truncated``)."""

    frames_read: int = 0
    frames_announced: int | None = None
    fps: float | None = None
    frames_processed: int = 0
    interrupted: bool = False
    written: list[str] = field(default_factory=list)  # output files on disk (localize_video), in order

    limited: bool = False  # (localize_video's max_frames stopped the stream: not a truncation)

    @property
    def truncated(self) -> bool:
        return (not self.limited and self.frames_announced is not None
                and 0 < self.frames_read < self.frames_announced - 1)


def _video_source(source: str | int | os.PathLike | bytes) -> str | int:
    """A path (``str``, ``bytes`` or path-like), a URL (``rtsp://...``) or a camera index, as OpenCV takes it."""
    if isinstance(source, (bool, np.bool_)) or not isinstance(source, (str, int, bytes, os.PathLike)):
        raise TypeError(f"a video source is a path, a URL or a camera index, got {type(source).__name__}")
    return int(source) if isinstance(source, int) else os.fsdecode(os.fspath(source))


def read_frames(source: str | int | os.PathLike, report: DecodeReport | None = None) -> Iterator[np.ndarray]:
    """Decode a video file (path), a stream (URL, e.g. ``rtsp://``) or a camera (index) with OpenCV: RGB
    ``uint8 [H, W, 3]`` frames.

    Raises :class:`VideoReadError` when the source cannot be opened or yields no frame at all; a
    stream that breaks off after some frames stops cleanly at the last good one (``report`` then
    says how many frames were read and how many the container announced). A file whose index comes
    after its frames (MP4's ``moov`` atom, as most encoders write it) cannot be opened at all once cut
    short; AVI and MKV files can.
    """
    cv2 = _require_cv2()
    source = _video_source(source)
    is_file = isinstance(source, str) and "://" not in source
    if is_file and not os.path.exists(source):
        raise VideoReadError(f"video file not found: {source}")
    if is_file and os.path.isdir(source):
        raise VideoReadError(f"video source {source!r} is a directory")
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        if isinstance(source, int):
            raise VideoReadError(f"cannot open camera {source} (no such device, or it is in use)")
        what = ("not a video OpenCV can decode, or an incomplete file (an MP4 cut short has no index and "
                "cannot be opened)") if is_file else "the stream cannot be opened"
        raise VideoReadError(f"cannot open video source {source!r}: {what}")
    report = report if report is not None else DecodeReport()
    announced = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    report.frames_announced = announced if announced > 0 else None
    fps = capture.get(cv2.CAP_PROP_FPS)
    report.fps = fps if fps and fps > 0 else None
    try:
        while True:
            ok, frame = capture.read()
            if not ok or frame is None:
                break
            report.frames_read += 1
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        capture.release()
    if report.frames_read == 0:
        raise VideoReadError(f"no frame could be decoded from {source!r}")


NOT_READY = object()  # prefetch(..., poll=True): the next frame is not decoded yet
IDLE = object()  # prefetch(..., idle=t): no frame for t seconds


def prefetch(frames: Iterable, depth: int, *, poll: bool = False, idle: float | None = None,
             gate: threading.Event | None = None) -> Iterator:
    """Iterate ``frames`` in a background thread, at most ``depth`` items ahead (decode overlaps compute).

    Exceptions of the producer are re-raised in the consumer, at the point they happened. With
    ``poll``, :data:`NOT_READY` is yielded (once) before waiting for an item that is not there yet, so
    that the consumer can do other work first (the stream hands out finished results instead of
    holding them while a live source is slow); with ``idle`` too, :data:`IDLE` is yielded (once) when
    that wait has lasted ``idle`` seconds (the stream then sends a partial batch). With ``gate``, the
    producer hands over the first item, then waits for the gate to be set before it asks the source
    for the next one (the source stays on the producer's thread throughout, with whatever
    thread-local state it sets).

    When the consumer stops early (a break, an error, Ctrl-C), the producer is told to stop and
    waited for at most a second: a source stuck inside its ``next()`` (a frozen camera, a stalled
    network stream) is left to its daemon thread rather than hanging the caller (so that generator
    cannot be iterated again until its ``next()`` returns).
    """
    items: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for count, item in enumerate(frames):
                while not stop.is_set():
                    try:
                        items.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if count == 0 and gate is not None:
                    while not gate.wait(0.1) and not stop.is_set():
                        pass
                if stop.is_set():
                    return
            items.put(("done", done))
        except BaseException as exc:  # handed to the consumer
            items.put(("error", exc))

    thread = threading.Thread(target=produce, name="rethinkcam-decode", daemon=True)
    thread.start()
    try:
        while True:
            wait = None  # (blocks until an item comes)
            if poll and items.empty():
                yield NOT_READY
                wait = idle
            try:
                kind, value = items.get(timeout=wait)
            except queue.Empty:  # (idle seconds without an item)
                yield IDLE
                kind, value = items.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stop.set()
        deadline = time.monotonic() + 1.0
        while thread.is_alive() and time.monotonic() < deadline:  # unblock a producer waiting on a full queue
            try:
                items.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def _as_hwc_uint8(frame, index: int) -> Tensor:
    """A frame as a CPU ``uint8 [H, W, 3]`` tensor.

    Accepted: numpy arrays or tensors, ``uint8 [H, W, C]`` (C = 1, 3, or 4 with the alpha dropped),
    ``uint8 [C, H, W]`` (C = 1 or 3, torchvision's ``read_image`` layout: taken as such when the last
    dimension cannot be channels), ``uint8 [H, W]`` (grey), float ``[C, H, W]`` (C = 1 or 3) or float
    ``[H, W]`` in ``[0, 1]``.
    """
    if isinstance(frame, np.ndarray):
        frame = torch.from_numpy(np.ascontiguousarray(frame))
    if not isinstance(frame, Tensor):
        raise TypeError(f"frame {index}: expected a numpy array or a tensor, got {type(frame).__name__}")
    frame = frame.detach()
    given = tuple(frame.shape)
    if frame.dim() not in (2, 3):
        raise ValueError(f"frame {index}: expected [H, W, C], [C, H, W] or [H, W], got shape {given}")
    if frame.dtype != torch.uint8:
        if not frame.is_floating_point():
            raise TypeError(f"frame {index}: expected uint8 [H, W, C] or float [C, H, W] in [0, 1], got "
                            f"{frame.dtype} {given}")
        if frame.dim() == 3:
            if frame.shape[0] not in (1, 3):
                raise ValueError(f"frame {index}: a float frame is [C, H, W] with 1 or 3 channels, got shape {given}")
            frame = frame.permute(1, 2, 0)
        low, high = (float(v) for v in torch.aminmax(frame)) if frame.numel() else (0.0, 0.0)
        if not (0.0 <= low and high <= 1.0):  # (NaN fails too) 0-255 floats would clamp to a white frame
            raise ValueError(f"frame {index}: a float frame holds values in [0, 1], got [{low:g}, {high:g}]"
                             + (" (0-255 data: pass it as uint8)" if high > 1.0 and high <= 255.0 else ""))
        frame = (frame * 255).round().to(torch.uint8)
    if frame.dim() == 3 and frame.shape[0] in (1, 3) and frame.shape[2] not in (1, 3, 4):  # uint8 [C, H, W]
        frame = frame.permute(1, 2, 0)
    if frame.dim() == 2:  # grey
        frame = frame[:, :, None]
    if frame.shape[2] == 4:  # RGBA: the alpha channel is not part of the picture the model sees
        frame = frame[:, :, :3]
    if frame.shape[2] == 1:
        frame = frame.expand(-1, -1, 3)
    if frame.shape[2] != 3 or frame.shape[0] < 1 or frame.shape[1] < 1:
        raise ValueError(f"frame {index}: expected uint8 [H, W, C] with 1, 3 or 4 channels (or [C, H, W] with 1 or 3) "
                         f"and a non-empty image, got shape {given}")
    return frame


def _input_size(size) -> tuple[int, int] | None:
    """``input_size`` as ``(H, W)`` positive ints (one int: a square), or ``None``."""
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
        raise TypeError(f"input_size must be None, an int or a pair (H, W) of ints, got {size!r}")
    if min(pair) < 1:
        raise ValueError(f"input_size must be positive, got {size!r}")
    return int(pair[0]), int(pair[1])


class VideoLocalizer:
    """CAM + PaS box for every frame of a stream, batched on the device, results in order.

    Args:
        model: the classifier (put in ``eval()`` by the caller; its mode is left untouched).
        method: any :class:`CAMEngine` method; ``engine_options`` are passed on (``nwc``,
            ``target_layers``...), except ``pas_q`` / ``pas_theta`` (the PaS threshold, cut here after
            the CAM) and ``box_convention`` (default ``"exact"``, inclusive pixel extents in the frame, as
            the JSON lines give them; ``"wsol"`` for the reference's one pixel larger boxes). ``boxes`` and
            ``output_size`` are the video path's own (one box per frame, maps in the frame's pixels):
            passing them raises ``TypeError``.
        input_size: ``(H, W)`` the model sees, or one int for a square (frames are resized on the
            device); ``None``: as is.
        mean, std: per-channel normalisation after scaling to ``[0, 1]`` (ImageNet's by default;
            ``None`` for none); applied to 3-channel input only. A model whose first convolution
            takes one channel gets grey frames (BT.601 luma).
        batch_size: frames per batch — the latency bound (a frame waits for at most
            ``batch_size - 1`` later frames, one batch more with ``overlap_batches``).
        device: where to compute (default: the model's parameters' device).
        bf16: run the model under bfloat16 autocast.
        keep_cams: attach each frame's map to its result (for overlays).
        prefetch_frames: decode queue depth (frames decoded ahead of the compute).
        max_wait: seconds without a new frame after which a partial batch goes to the device anyway
            (a live camera between frames, a stalled stream), so that a frame's latency is bounded in
            time as well as in frames; ``None``: a batch waits until it is full or the stream ends.
            With ``cuda_graph``, partial batches run eagerly: for a source slower than
            ``1 / max_wait`` frames a second, raise it or pass ``None`` to keep replaying full batches.
        cuda_graph: on CUDA, capture preprocessing + forward + backward to the target layer + CAM +
            PaS threshold once per batch shape and replay it (boxes are cut after the replay). Frames
            of one size in full batches replay; other batches run eagerly. Needs a model without
            data-dependent control flow and without host syncs in its forward.
        overlap_batches: submit each batch to the device before collecting the previous one's
            results (throughput: the host's work on one batch overlaps the device's on the next). A
            result then waits for up to one more batch when the source is faster than the device
            (a file); when the source has no frame ready (a live camera) finished results are
            handed out at once. ``False``: every batch's results before the next batch starts (the
            lowest latency per frame, at batch 1). Default (``None``): on CUDA only (on the CPU the
            model runs synchronously, so there is nothing to overlap).
        channels_last: feed the model channels_last (NHWC) batches, the fast layout for convolutions
            in batches on recent GPUs; ``False`` feeds contiguous NCHW (the model's weights must be NCHW
            too: a convolution runs NHWC when its input or its weight is channels_last). At batch 1 the H100 profile of
            ResNet50 spent 0.54 ms of 1.26 ms of GPU time a frame in cuDNN's NHWC batch-norm kernel
            (10 µs per layer): the benchmark's ``ours-graph-nchw`` row measures the other layout.
        fold_batchnorm: run a copy of the model with its eval-mode batch norms folded into the
            convolutions before them (:func:`rethinkcam_fast.fold_batchnorm`), the target layers kept
            as they are, so the maps are the same up to float rounding and a ResNet50 runs 53 kernels
            fewer a forward. The copy is made on the first frame (after one call that finds the
            default target layer, if none was given): weight changes to ``model`` after that do not
            reach it. The model must be traceable by ``torch.fx`` (a clear error at the first frame
            otherwise).
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "cam",
        *,
        input_size: tuple[int, int] | None = (224, 224),
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        batch_size: int = 8,
        device: torch.device | str | None = None,
        bf16: bool = False,
        keep_cams: bool = False,
        prefetch_frames: int = 32,
        max_wait: float | None = 0.1,
        cuda_graph: bool = False,
        overlap_batches: bool | None = None,
        channels_last: bool = True,
        fold_batchnorm: bool = False,
        **engine_options,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_wait is not None and not max_wait > 0:
            raise ValueError(f"max_wait must be None or a positive number of seconds, got {max_wait!r}")
        if cuda_graph and engine_options.get("warn_degenerate"):
            raise ValueError("warn_degenerate=True reads the device on the host after every batch, which a CUDA "
                             "graph capture cannot do: leave it off with cuda_graph=True")
        if (mean is None) != (std is None):
            raise ValueError("mean and std go together: give both or neither")
        if device is None:
            param = next(model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            why = "this PyTorch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device={str(device)!r}: {why} (torch {torch.__version__})")
        self.model = model
        self.input_size = _input_size(input_size)
        self.batch_size = int(batch_size)
        self.bf16 = bool(bf16)
        self.keep_cams = bool(keep_cams)
        self.prefetch_frames = int(prefetch_frames)
        self.max_wait = None if max_wait is None else float(max_wait)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got {self.device}")
        self.cuda_graph = bool(cuda_graph)
        self.overlap_batches = self.device.type == "cuda" if overlap_batches is None else bool(overlap_batches)
        self._graphs: dict[tuple[int, ...], CapturedCall] = {}
        engine_options.setdefault("warn_degenerate", False)  # no per-batch device sync for a warning
        # PaS and the box are cut here, after the (possibly replayed) CAM, not inside the engine.
        pas_q, pas_theta = engine_options.pop("pas_q", 90.0), engine_options.pop("pas_theta", 0.35)
        try:  # (checked as CAMEngine checks them, and made floats once)
            self.pas_q, self.pas_theta = check_pas_parameters(pas_q, pas_theta)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"pas_q={pas_q!r}, pas_theta={pas_theta!r}: {exc}") from None
        for name in ("boxes", "output_size"):
            if name in engine_options:
                raise TypeError(f"VideoLocalizer sets {name}= itself (one box a frame, cut from maps in the frame's "
                                "own pixels): leave it out")
        self.box_convention = engine_options.pop("box_convention", "exact")
        if self.box_convention not in CONVENTIONS:
            raise ValueError(f"box_convention must be one of {CONVENTIONS}, got {self.box_convention!r}")
        engine_options["boxes"] = False
        self.engine = CAMEngine(model, method, **engine_options)
        self._engine_options = engine_options
        if fold_batchnorm and method == "fullycam" and engine_options.get("target_layers") is None:
            warnings.warn("fold_batchnorm=True does nothing for method='fullycam' with its default target layers: "
                          "every convolution is a target, so no batch norm can fold into one", stacklevel=2)
            fold_batchnorm = False
        self._fold_pending = bool(fold_batchnorm)
        # Streams on several threads may share a localizer: the fold (once) and each CUDA-graph replay
        # with the copies of its outputs (which the next replay overwrites) run under this lock.
        self._lock = threading.RLock()
        self.channels = input_channels(model)
        self._luma = torch.tensor(LUMA, dtype=torch.float32, device=self.device)
        self._mean = None if mean is None else torch.tensor(mean, dtype=torch.float32, device=self.device)
        self._std = None if std is None else torch.tensor(std, dtype=torch.float32, device=self.device)
        if self._mean is not None and (self._mean.numel() != 3 or self._std.numel() != 3):
            raise ValueError("mean and std must have 3 values (RGB)")

    # -- preprocessing ----------------------------------------------------------------------

    def _to_device(self, frames: list[Tensor]) -> Tensor:
        """``uint8 [B, H, W, 3]`` on the device: stacked straight into pinned memory (one host copy),
        then a non-blocking copy on CUDA. PyTorch's pinned-memory cache keeps the buffer from reuse
        until that copy has run."""
        if self.device.type != "cuda":
            return torch.stack(frames).to(self.device)
        batch = torch.empty((len(frames), *frames[0].shape), dtype=torch.uint8, pin_memory=True)
        torch.stack(frames, out=batch)
        return batch.to(self.device, non_blocking=True)

    def preprocess(self, batch_u8: Tensor) -> Tensor:
        """``uint8 [B, H, W, 3]`` (device) -> normalised ``float32 [B, 3, h, w]`` at input_size, channels_last
        (or NCHW with ``channels_last=False``)."""
        x = batch_u8.permute(0, 3, 1, 2).float().div_(255)
        if self.channels == 1:
            x = (x * self._luma[None, :, None, None]).sum(dim=1, keepdim=True)
        elif self._mean is not None:
            x = (x - self._mean[None, :, None, None]) / self._std[None, :, None, None]
        if self.input_size is not None and tuple(x.shape[2:]) != self.input_size:
            # antialias: a downscaled frame feeds the model as `rethinkcam localize` feeds an image
            x = torch.nn.functional.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False,
                                                antialias=True)
        return x.contiguous(memory_format=self.memory_format)

    # -- the stream ---------------------------------------------------------------------------

    def explain(self, batch_u8: Tensor, targets: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Device ``uint8 [B, H, W, 3]`` -> ``(labels, scores, cams [B, H, W], PaS thresholds)``, all on
        the device, no host sync (so that it can be captured in a CUDA graph)."""
        if self._fold_pending:
            self._fold_model(batch_u8, targets)
        images = self.preprocess(batch_u8)
        # No cast cache: under a caller's enclosing autocast the cached bf16 weights would outlive this
        # call (and a CUDA graph captured here would read them after they are freed). The maps in the
        # frame's own pixels, for this call only (streams of other sizes may share the localizer).
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            result = self.engine.call_at_size(images, targets, (batch_u8.shape[1], batch_u8.shape[2]))
        thresholds = percentile_threshold(result.cams, self.pas_q, self.pas_theta, validate=False)
        return result.labels, result.scores, result.cams, thresholds

    def _explain_packed(self, batch_u8: Tensor, targets: int | None) -> tuple[Tensor, Tensor]:
        """:meth:`explain`, with what the host needs packed into one device buffer: ``(packed uint8,
        cams)``. No host sync either, so that it can be captured."""
        labels, scores, cams, thresholds = self.explain(batch_u8, targets)
        return pack_results(labels, scores, thresholds, cams), cams

    def _submit(self, first_index: int, frames: list[Tensor], targets: int | None) -> _InFlight:
        """Enqueue a batch: frames to the device, the (replayed or eager) explain, its packed results
        to pinned host memory; returns without waiting for the device (on CUDA)."""
        try:
            return self._submit_batch(first_index, frames, targets)
        except RuntimeError as exc:
            if isinstance(exc, FrameBatchError):
                raise
            last = first_index + len(frames) - 1
            which = f"frame {first_index}" if last == first_index else f"frames {first_index}-{last}"
            height, width = frames[0].shape[:2]
            raise FrameBatchError(f"{which} ({width}x{height} pixels): the model failed on them: {exc}") from exc

    def _submit_batch(self, first_index: int, frames: list[Tensor], targets: int | None) -> _InFlight:
        batch_u8 = self._to_device(frames)
        if not (self.cuda_graph and len(frames) == self.batch_size):
            packed, cams = self._explain_packed(batch_u8, targets)
            return self._in_flight(first_index, packed, cams)
        key = tuple(batch_u8.shape) + (-1 if targets is None else int(targets),)
        with self._lock:
            if key not in self._graphs:
                if len(self._graphs) >= 4:  # a few frame sizes at most; drop the oldest capture
                    self._graphs.pop(next(iter(self._graphs)))
                self._graphs[key] = CapturedCall(lambda u8: self._explain_packed(u8, targets), batch_u8)
            packed, cams = self._graphs[key](batch_u8)
            # A replay's outputs are the graph's, overwritten by the next replay: copies are taken now,
            # in stream order (the maps on the device, the packed results to the host).
            return self._in_flight(first_index, packed, cams)

    def _in_flight(self, first_index: int, packed: Tensor, cams: Tensor) -> _InFlight:
        kept = cams.clone() if self.keep_cams else None
        host, done = packed_to_host(packed)
        return _InFlight(first_index, tuple(cams.shape), host, done, kept)

    def _fold_model(self, batch_u8: Tensor, targets: int | None) -> None:
        """Swap the engine for one on a batch-norm-folded copy of the model, with the same target layers
        (the default one found first, by one call on the batch's first frame) and classifier kept.
        Tracing patches ``nn.Module.__call__`` process-wide while it runs: the stream holds its decode
        thread (which may run modules of the caller's frame source) until the fold is done."""
        with self._lock:  # (another thread's stream may be folding the shared localizer right now)
            if self._fold_pending:
                self._fold_pending = False  # (the call below must not fold again)
                self._fold_model_now(batch_u8, targets)

    def _fold_model_now(self, batch_u8: Tensor, targets: int | None) -> None:
        engine = self.engine
        try:
            if engine.target_layers is None or (engine.method == "cam" and engine.classifier is None):
                self.explain(batch_u8[:1], targets)  # (finds the default target and the classifier)
            names = [engine.layer_name(layer) for layer in engine.target_layers]
            # (the given classifier, or the one the call found: a 1x1 conv head must stay a module too)
            classifier = self._engine_options.get("classifier") or (engine.classifier if engine.method == "cam" else None)
            inside = classifier is not None and any(m is classifier for m in self.model.modules())
            folded = fold_batchnorm(self.model, names + ([classifier] if inside else []))
            options = dict(self._engine_options, target_layers=names)
            if inside:
                options["classifier"] = folded.get_submodule(engine.layer_name(classifier))
            self.engine = CAMEngine(folded, engine.method, **options)
        except BaseException:
            self._fold_pending = True  # not folded: a later batch tries again (and fails the same way)
            raise

    def _collect(self, job: _InFlight) -> list[FrameResult]:
        """Wait for a submitted batch's results, cut its boxes on the host, one result per frame."""
        labels, scores, _, boxes = boxes_from_packed(job.host, job.done, job.shape, self.box_convention)
        labels, scores, boxes = labels.tolist(), scores.tolist(), boxes.tolist()
        return [
            FrameResult(index=job.first_index + k, label=int(labels[k]), score=float(scores[k]),
                        box=tuple(int(v) for v in boxes[k]), cam=None if job.cams is None else job.cams[k])
            for k in range(job.shape[0])
        ]

    def stream(self, frames: Iterable, targets: int | None = None) -> Iterator[FrameResult]:
        """Yield a :class:`FrameResult` per frame, in order.

        Args:
            frames: numpy arrays or tensors: ``uint8 [H, W, 3]`` (RGB; also 1 channel, or 4 with the
                alpha dropped), ``uint8 [H, W]`` (grey), float ``[C, H, W]`` or ``[H, W]`` in ``[0, 1]``;
                decoded ahead in a background thread. If the source raises, the frames already
                received are localized and yielded first.
            targets: a class index to explain in every frame (default: each frame's top-1).
        """
        if isinstance(frames, (str, bytes, os.PathLike)):
            raise TypeError(f"stream() takes frames, got the path {frames!r}: decode it with read_frames(path), "
                            "or use localize_video(localizer, path)")
        if targets is not None:
            one = _class_index(targets)
            if one is None:
                raise TypeError(f"targets must be None or one class index for every frame, got {type(targets).__name__}")
            targets = one
        # Folding traces the model, which patches nn.Module.__call__ process-wide: the decode thread
        # holds the source back after the first frame until the fold on that frame is done (see
        # _fold_model), and the source itself never leaves the decode thread.
        gate = threading.Event()
        if not self._fold_pending:
            gate.set()
        pending: list[Tensor] = []
        first = 0
        index = 0
        in_flight: _InFlight | None = None  # a submitted batch whose results are not handed out yet

        def submit(first_index: int, batch: list[Tensor]) -> list[FrameResult]:
            # The next batch goes to the device before the previous one's results are collected: the
            # host's work for one batch (stacking frames, cutting boxes) overlaps the device's for the next.
            nonlocal in_flight
            previous, in_flight = in_flight, self._submit(first_index, batch, targets)
            if not self.overlap_batches:
                previous, in_flight = in_flight, None
            return [] if previous is None else self._collect(previous)

        def drain() -> list[FrameResult]:
            nonlocal in_flight
            previous, in_flight = in_flight, None
            return [] if previous is None else self._collect(previous)

        def finish() -> Iterator[FrameResult]:  # the last (possibly partial) batch, then what is in flight
            nonlocal pending
            if pending:
                batch, pending = pending, []
                yield from submit(first, batch)
            yield from drain()

        try:
            for frame in prefetch(frames, self.prefetch_frames, poll=True, idle=self.max_wait, gate=gate):
                if frame is NOT_READY:  # the source is slower than the device: hand out what is done
                    yield from drain()
                    continue
                if frame is IDLE:  # no frame for max_wait seconds: the partial batch goes now
                    if pending:
                        batch, batch_first, pending, first = pending, first, [], index
                        yield from submit(batch_first, batch)
                    yield from drain()
                    continue
                hwc = _as_hwc_uint8(frame, index)
                if not gate.is_set():  # the first frame: fold on it (before any batch or capture), then
                    self._fold_model(self._to_device([hwc]), targets)  # let the source go on
                    gate.set()
                if pending and hwc.shape != pending[0].shape:  # another size: close the batch first
                    # (pending is emptied before any result is handed out: once submitted, a batch is
                    # in flight, and an error while results are yielded must not submit it again)
                    batch, batch_first, pending, first = pending, first, [], index
                    yield from submit(batch_first, batch)
                pending.append(hwc)
                index += 1
                if len(pending) == self.batch_size:
                    batch, batch_first, pending, first = pending, first, [], index
                    yield from submit(batch_first, batch)
        except Exception:
            # The source failed (a broken file, a camera gone, a bad frame): the frames already
            # received are still localized and yielded, then the error goes on to the caller.
            yield from finish()
            raise
        yield from finish()


@dataclass
class _InFlight:
    """A batch submitted to the device (see VideoLocalizer._submit)."""

    first_index: int
    shape: tuple[int, int, int]  # the maps' [B, H, W]
    host: Tensor  # the packed results on the host (pinned memory, filled by an async copy on CUDA)
    done: object | None  # torch.cuda.Event recorded after that copy; None off CUDA
    cams: Tensor | None  # copies of the maps (keep_cams)


def localize_video(
    localizer: VideoLocalizer,
    source: str | int | os.PathLike | Iterable,
    *,
    out_video: str | None = None,
    out_jsonl: str | None = None,
    fps: float | None = None,
    display_scale: int = 1,
    on_frame: Callable[[FrameResult], None] | None = None,
    max_frames: int | None = None,
    report: DecodeReport | None = None,
) -> DecodeReport:
    """Run ``localizer`` over a file, a URL, a camera index or an iterable of frames; optionally write an
    annotated video (heatmap overlay + box) and one JSON line per frame.

    Outputs are written to temporary files next to their targets (``*.partial*``) and renamed when the
    stream ends, so a failed run leaves no file, and an interrupted one (``KeyboardInterrupt``: Ctrl-C,
    or SIGTERM under the ``rethinkcam`` command) keeps what it finished: the video is closed (a playable
    file with every frame written so far) and the JSON lines are complete; ``report.interrupted``
    says so, then the interrupt goes on to the caller. Each JSON line is flushed as it is written;
    ``out_jsonl="-"`` writes them to standard output instead. ``max_frames`` stops after that many
    frames (a camera never ends on its own). ``display_scale`` enlarges the annotated frames (nearest
    neighbour) for small inputs; the video's frames are padded to even sizes (what the MP4 encoder
    takes) and later frames of another size are resized to the first one's. Returns what the decoder
    reported (into ``report`` when one is given: the caller can read it after an interrupt too).
    """
    if display_scale < 1:
        raise ValueError(f"display_scale must be >= 1, got {display_scale}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be None or >= 1, got {max_frames}")
    if out_video == "-":
        raise ValueError("out_video '-': a video is written to a file (out_jsonl='-' writes the JSON lines to stdout)")
    to_stdout = out_jsonl == "-"
    # The files the temporary outputs are renamed over (a symlink's file: the link stays; the names
    # given are the ones reported), checked before any frame is read; None for JSON lines written into
    # a pipe or a device.
    video_file = _check_target("out_video", out_video) if out_video is not None else None
    jsonl_file = _check_target("out_jsonl", out_jsonl) if out_jsonl is not None and not to_stdout else None
    into_stream = out_jsonl is not None and not to_stdout and jsonl_file is None  # (a pipe, /dev/null...)
    if video_file is not None and video_file == jsonl_file:  # (through a symlink too)
        raise ValueError(f"out_video and out_jsonl are the same file: {out_video!r} and {out_jsonl!r}")
    import json
    import sys

    report = report if report is not None else DecodeReport()
    frames = read_frames(source, report) if isinstance(source, (str, int, bytes, os.PathLike)) else source
    if max_frames is not None:
        frames = _limited(frames, max_frames, report)
    if out_video is not None and not localizer.keep_cams:
        raise ValueError("writing a video needs the maps: create the VideoLocalizer with keep_cams=True")
    writer = None
    temp_video = temp_jsonl = None
    jsonl = None
    keep_partials = False  # (after an interrupt: a second one must not delete what the first kept)
    cv2 = _require_cv2() if out_video is not None else None
    raw_frames: dict[int, np.ndarray] = {}
    frame_size = None

    def remember(stream):  # keep the raw frames for the overlay until their result arrives
        for k, frame in enumerate(stream):
            if out_video is not None:
                frame = _as_hwc_uint8(frame, k)  # converted once: stream() passes uint8 HWC tensors through
                raw_frames[k] = frame.numpy()
            yield frame

    def finalize() -> None:  # close the outputs and give them their names
        nonlocal writer, jsonl, temp_video, temp_jsonl
        if writer is not None:
            writer.release()
            writer = None
            os.replace(temp_video, video_file)
            report.written.append(out_video)
            temp_video = None
        if jsonl is not None and not to_stdout:
            jsonl.close()
            jsonl = None
            if temp_jsonl is not None:  # (written into a pipe or a device: nothing to rename)
                os.replace(temp_jsonl, jsonl_file)
                temp_jsonl = None
            report.written.append(out_jsonl)

    try:
        if to_stdout:
            jsonl = sys.stdout
        elif into_stream:  # (appended: /dev/stdout redirected with >> keeps what the log held)
            jsonl = open(out_jsonl, "a", encoding="utf-8", buffering=1)  # (line-buffered: flushed per frame)
        elif out_jsonl is not None:
            temp_jsonl = jsonl_file + ".partial"
            jsonl = open(temp_jsonl, "w", encoding="utf-8", buffering=1)
        try:
            for result in localizer.stream(remember(frames)):
                if out_video is not None:
                    image = overlay(raw_frames.pop(result.index), result.cam, result.box, display_scale)
                    if writer is None:
                        temp_video = _temp_name(video_file)
                        rate = fps or report.fps or 25.0
                        frame_size = (image.shape[0] + image.shape[0] % 2, image.shape[1] + image.shape[1] % 2)
                        writer = cv2.VideoWriter(temp_video, cv2.VideoWriter_fourcc(*"mp4v"), rate,
                                                 (frame_size[1], frame_size[0]))
                        if not writer.isOpened():
                            raise VideoReadError(f"cannot write video {out_video!r} (codec mp4v unavailable for "
                                                 f"{os.path.splitext(out_video)[1] or 'a file without extension'}?)")
                    image = cv2.cvtColor(_fit(image, frame_size, cv2), cv2.COLOR_RGB2BGR)
                with _signals_deferred():  # (a frame's video frame and JSON line: both, or neither)
                    if writer is not None:
                        writer.write(image)
                    if jsonl is not None:
                        jsonl.write(json.dumps(result.as_json(), allow_nan=False) + "\n")
                        if to_stdout:
                            jsonl.flush()
                    report.frames_processed += 1
                if on_frame is not None:
                    on_frame(result)
        except KeyboardInterrupt:
            report.interrupted = True
            if report.frames_processed:  # what is finished stays: a playable video, complete lines
                keep_partials = True  # (a second interrupt inside finalize leaves the *.partial files)
                finalize()
            raise
        if report.frames_processed == 0:  # an empty video is not a result: write nothing, say so
            raise VideoReadError("the source gave no frames; nothing was written")
        finalize()
    finally:
        if writer is not None:
            writer.release()
        if jsonl is not None and not to_stdout:
            jsonl.close()
        for leftover in (temp_video, temp_jsonl):
            if leftover is not None and os.path.exists(leftover):
                if keep_partials:
                    report.written.append(leftover)
                else:
                    os.remove(leftover)
    return report


def _limited(frames: Iterable, count: int, report: DecodeReport) -> Iterator:
    """The first ``count`` frames (no frame more is asked for: a camera's next one may be a while);
    ``report.limited`` once they are all there."""
    for k, frame in enumerate(frames):
        yield frame
        if k + 1 == count:
            report.limited = True
            return


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM held back (POSIX, main thread) until the block is done: their
    ``KeyboardInterrupt`` then comes after it, not halfway through."""
    deferrable = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if not deferrable:
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _fit(image: np.ndarray, size: tuple[int, int], cv2) -> np.ndarray:
    """``image`` at the video's frame size ``(H, W)``: a frame one pixel smaller (the even padding of an
    odd size) is padded with black at the bottom and right; one of another size is resized."""
    height, width = image.shape[:2]
    if (height, width) == size:
        return image
    if size[0] - height in (0, 1) and size[1] - width in (0, 1):
        return cv2.copyMakeBorder(image, 0, size[0] - height, 0, size[1] - width, cv2.BORDER_CONSTANT, value=0)
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)


def _check_target(name: str, path: str) -> str | None:
    """The file an output at ``path`` replaces (a symlink's file), once it is known one can be made
    there; ``None`` for JSON lines going into a device or a pipe (written into, not replaced: the video
    must be a file)."""
    if os.path.isdir(path):
        raise ValueError(f"{name} {path!r} is a directory; give a file name")
    if name == "out_jsonl" and is_stream(path):
        return None
    real = replaceable(path, name)
    folder = os.path.dirname(real)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{name} {path!r}: the folder {folder} does not exist")
    return real


def _temp_name(path: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.partial{ext or '.mp4'}"


def overlay(frame: np.ndarray, cam: Tensor | None, box: tuple[int, int, int, int], scale: int = 1,
            alpha: float = 0.45) -> np.ndarray:
    """RGB ``uint8 [scale*H, scale*W, 3]``: the frame with the map as a heat overlay and the box in green."""
    cv2 = _require_cv2()
    image = frame.copy()
    if cam is not None:
        heat = (cam.detach().float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
        heat = cv2.applyColorMap(heat, cv2.COLORMAP_JET)[:, :, ::-1]  # BGR -> RGB
        image = cv2.addWeighted(image, 1 - alpha, heat, alpha, 0)
    if scale > 1:
        image = cv2.resize(image, (image.shape[1] * scale, image.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    x0, y0, x1, y1 = box
    if (x0, y0, x1, y1) != (0, 0, 0, 0):
        corners = ((x0 * scale, y0 * scale), ((x1 + 1) * scale - 1, (y1 + 1) * scale - 1))
        cv2.rectangle(image, *corners, (0, 255, 0), max(1, min(image.shape[:2]) // 150))
    return np.ascontiguousarray(image)


__all__ = ["DecodeReport", "FrameBatchError", "FrameResult", "VideoLocalizer", "VideoReadError", "localize_video",
           "overlay", "prefetch", "read_frames"]
