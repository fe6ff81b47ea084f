"""The CAM engine: CAM (+NWC), Grad-CAM, Grad-CAM++, LayerCAM and Fully-CAM (CGM + FLM), batched, on the device.

Data flow: model -> hooked activations (and gradients) -> per-layer maps at feature resolution
(:func:`rethinkcam_fast.ops.weighted_map.weighted_map`) -> upsample + normalise + fuse
(:func:`rethinkcam_fast.ops.fuse_maps.fuse_maps`) -> :class:`CAMResult`. Every tensor stays on the
input's device. Hooks live only for the duration of one call, so an engine never leaves hooks behind.
"""

from __future__ import annotations

import copy
import itertools
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from numbers import Integral

import numpy as np
import torch
from torch import Tensor, nn

from ._cuda_graph import CapturedCall
from ._validation import INTEGER_DTYPES, check_float_dtype, check_integer_dtype, check_tensor, output_size_arg
from .folding import TRANSIENT_HOOK
from .ops._launch import autocast_off, check_backend
from .ops.boxes import CONVENTIONS, boxes_from_cams, boxes_from_packed, pack_results, packed_to_host
from .ops.level_sweep import gpu_boxes_enabled
from .ops.class_activation_map import class_activation_map_with_flags
from .ops.flm_fuse import flm_fuse_with_flags
from .ops.fuse_maps import FUSE_MODES, UPSAMPLE_MODES, fuse_maps_reference, fuse_maps_trusted
from .ops.map_epilogue import acc_dtype, map_epilogue_op
from .ops.percentile_threshold import check_pas_parameters, percentile_threshold
from .ops.weighted_map import flm_layer_reducer, weighted_map, weighted_map_reference, weighted_map_trusted

METHODS = ("cam", "gradcam", "gradcam++", "layercam", "fullycam")
_SIZES_KEPT = 1024  # input sizes whose default target, classifier and pooling check an engine remembers


@dataclass(repr=False)
class CAMResult:
    """What the engine returns for a batch of ``N`` images.

    Attributes:
        labels: ``LongTensor[N]``, the classes explained.
        scores: ``Tensor[N]`` (float32), their logits (the seed paper's "weight"); attached to the graph
            with ``differentiable=True``, detached otherwise.
        cams: ``Tensor[N, H, W]`` float32 in ``[0, 1]``, on the input's device; attached to the graph
            with ``differentiable=True`` (float64 then for a float64 model, whose gradients stay float64).
        degenerate: ``BoolTensor[N]``, images whose map was constant or non-finite, or whose target score
            was (their ``cams`` are zeros; ``layer_maps`` are left as computed).
        layer_maps: per-layer maps at feature resolution (``{name: Tensor[N, h, w]}``), on request.
        boxes: ``LongTensor[N, 4]`` (x0, y0, x1, y1) of the largest contour above the PaS threshold
            (``None`` with ``boxes=False``); ``[0, 0, 0, 0]`` for an empty mask.
        thresholds: ``LongTensor[N]``, the uint8 PaS thresholds the boxes were cut at.
        logits: ``Tensor[N, C]``, the model's output, attached to the graph (``differentiable=True``
            only, so a training loop needs one forward for its classification and CAM losses).
    """

    labels: Tensor
    scores: Tensor
    cams: Tensor
    degenerate: Tensor
    layer_maps: dict[str, Tensor] | None = None
    boxes: Tensor | None = None
    thresholds: Tensor | None = None
    logits: Tensor | None = None

    def __len__(self) -> int:
        """``N``, the number of images."""
        return len(self.labels)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CAMResult:
        """A result with every tensor on ``device`` (dtypes kept; tensors already there are shared,
        as ``Tensor.to`` shares them; gradients flow through the copies)."""
        def move(t):
            return t.to(device, non_blocking=non_blocking) if isinstance(t, Tensor) else t

        values = {f.name: move(getattr(self, f.name)) for f in fields(self)}
        if self.layer_maps is not None:
            values["layer_maps"] = {name: move(m) for name, m in self.layer_maps.items()}
        return CAMResult(**values)

    def cpu(self) -> CAMResult:
        """:meth:`to` the CPU."""
        return self.to("cpu")

    @classmethod
    def cat(cls, results: Sequence[CAMResult]) -> CAMResult:
        """One result for the images of several, in order (the results of batches of one dataset: the
        engine's memory grows with the batch, so large sets are explained in chunks). Every field is
        concatenated along the images; a field must be present in all results or in none (and
        ``layer_maps`` with the same layers), and maps must have one size and one device."""
        if not results:
            raise ValueError("CAMResult.cat needs at least one result")
        if len(results) == 1:
            return results[0]
        values = {}
        for f in fields(cls):
            parts = [getattr(r, f.name) for r in results]
            if all(p is None for p in parts):
                values[f.name] = None
            elif any(p is None for p in parts):
                raise ValueError(f"CAMResult.cat: {f.name} is present in some results and not in others")
            elif f.name == "layer_maps":
                if any(p.keys() != parts[0].keys() for p in parts):
                    raise ValueError("CAMResult.cat: the results' layer_maps name different layers")
                values[f.name] = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
            else:
                values[f.name] = torch.cat(parts)
        return cls(**values)

    def __repr__(self) -> str:
        """Shapes, dtypes and the device, not the values (print a field for those)."""
        def describe(t):
            if not isinstance(t, Tensor):
                return repr(t)
            return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"

        parts = [f"{f.name}={describe(getattr(self, f.name))}" for f in fields(self)
                 if f.name != "layer_maps" and getattr(self, f.name) is not None]
        if self.layer_maps is not None:
            parts.append(f"layer_maps={{{', '.join(f'{k!r}: {describe(v)}' for k, v in self.layer_maps.items())}}}")
        return f"CAMResult(N={len(self)}, device={self.cams.device}, {', '.join(parts)})"


def _warn_degenerate(degenerate: Tensor, stacklevel: int) -> None:
    """One warning for the maps that were constant or non-finite and came out as zeros (``degenerate``,
    ``bool [N]``; reading it syncs with the device)."""
    if bool(degenerate.any()):
        warnings.warn(
            f"{int(degenerate.sum())} of {len(degenerate)} CAMs were constant or non-finite (or explained a non-finite "
            "score) and were set to zeros",
            RuntimeWarning,
            stacklevel=stacklevel,
        )


class GraphedCAM:
    """A :class:`CAMEngine` call captured in a CUDA graph (see :meth:`CAMEngine.graphed`).

    ``graphed(images) -> CAMResult`` for images shaped like the example. The result's tensors are
    copies (``copy=False`` returns the graph's own outputs, overwritten by the next call).
    ``layer_maps`` is not returned.
    """

    def __init__(self, engine: CAMEngine, example: Tensor, targets: int | Tensor | None = None) -> None:
        check_tensor("example", example, ndim=4)
        check_float_dtype("example", example)
        if engine.differentiable:
            raise ValueError("CAMEngine.graphed does not apply to differentiable=True: a replay returns no autograd graph")
        if targets is not None and _class_index(targets) is None:
            raise TypeError(f"targets must be None or one int class index, got {type(targets).__name__}")
        if example.device.type != "cuda":
            raise ValueError(f"CAMEngine.graphed needs a CUDA tensor (CUDA graphs), got one on {example.device}")
        self.engine = engine
        self.shape, self.dtype, self.device = tuple(example.shape), example.dtype, example.device
        self.targets = None if targets is None else _class_index(targets)
        # The captured call runs on a copy that never warns (a host sync) nor cuts boxes (on the host,
        # after the replay): the caller's engine, which other threads may share, is left as it is.
        self._captured = copy.copy(engine)
        self._captured.warn_degenerate, self._captured.boxes = False, False
        # The caller's autocast, re-entered inside the captured call without its cast cache: cached
        # bf16 copies of the weights are freed when the caller's autocast ends, and a graph that read
        # them would read freed memory (the casts are captured instead; weight updates reach them).
        self._autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        # Boxes cut on the host come from one copy of the packed thresholds and uint8 levels (into
        # this pinned buffer), instead of a synchronising copy of each, then the boxes copied back.
        self._host_boxes = engine.boxes and not gpu_boxes_enabled(example)
        self._call = CapturedCall(self._explain, example)
        self._host = (torch.empty(self._call.static_out[-1].numel(), dtype=torch.uint8, pin_memory=True)
                      if self._host_boxes else None)
        self._copied = torch.cuda.Event() if self._host_boxes else None

    def _explain(self, images: Tensor) -> tuple[Tensor, ...]:
        """The captured work: no host sync (no degenerate warning), thresholds on the device, and (for
        boxes cut on the host) what they need packed into one buffer."""
        enabled, dtype = self._autocast
        with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
            result = self._captured(images, self.targets)
        engine = self._captured
        thresholds = percentile_threshold(result.cams, engine.pas_q, engine.pas_theta, validate=False,
                                          backend=engine.backend)
        outputs = (result.labels, result.scores, result.cams, result.degenerate, thresholds)
        if self._host_boxes:
            outputs += (pack_results(result.labels, result.scores, thresholds, result.cams),)
        return outputs

    def __call__(self, images: Tensor, *, copy: bool = True) -> CAMResult:
        if tuple(images.shape) != self.shape or images.dtype != self.dtype or images.device != self.device:
            raise ValueError(f"this capture takes images {list(self.shape)} {self.dtype} on {self.device}, got "
                             f"{list(images.shape)} {images.dtype} on {images.device}: capture another with "
                             "CAMEngine.graphed")
        outputs = self._call(images)
        engine = self.engine
        # Boxes from the packed copy: packed at capture (the engine then cut boxes on the host), and
        # wanted now; otherwise boxes_from_cams below, as the eager engine cuts them.
        host_boxes = self._host_boxes and engine.boxes
        if host_boxes:  # in stream order, before a later replay overwrites the packed buffer
            packed_to_host(outputs[-1], self._host, self._copied)
        labels, scores, cams, degenerate, thresholds = (t.clone() for t in outputs[:5]) if copy else outputs[:5]
        result = CAMResult(labels=labels, scores=scores, cams=cams, degenerate=degenerate)
        if engine.warn_degenerate:
            _warn_degenerate(degenerate, stacklevel=3)
        if engine.boxes:
            result.thresholds = thresholds
            if host_boxes:
                boxes = boxes_from_packed(self._host, self._copied, tuple(cams.shape), engine.box_convention)[3]
                result.boxes = boxes.to(self.device)
            else:
                result.boxes = boxes_from_cams(cams, thresholds, "largest", engine.box_convention, validate=False)
        return result


@dataclass
class _Capture:
    """Activations (and, for Fully-CAM, per-layer maps) recorded during one call."""

    activations: dict[int, Tensor] = field(default_factory=dict)
    order: list[nn.Module] = field(default_factory=list)  # modules in the order their forward finished
    maps: dict[int, Tensor] = field(default_factory=dict)
    # Modules whose floating input was off the autograd graph although grad mode was on (after a
    # no_grad region or a detach): the graph of the scores starts again at their outputs.
    cut_inputs: set[int] = field(default_factory=set)
    # The hooks sit on the model's (shared) modules for the call's duration: another thread running
    # the same model meanwhile must not land in this call's capture.
    thread: int = field(default_factory=threading.get_ident)
    # "cam" without a classifier yet: (nn.Linear or nn.Conv2d, its 2-D output or None, len(order) when
    # it finished) per run.
    linears: list[tuple[nn.Module, Tensor | None, int]] = field(default_factory=list)
    # A gradient method's default target being found: (activation or norm module, its input, its
    # output, len(order) when it finished) per run that kept a 4-D shape.
    followers: list[tuple[nn.Module, Tensor, Tensor, int]] = field(default_factory=list)


# Modules that may directly follow a default target's convolution without being conv-like themselves:
# conv -> BatchNorm -> ReLU written as separate modules. A gradient method explains the last of them,
# so that an in-place activation (whose output is the conv's output tensor) and an out-of-place one
# give the same map, and the map is of the rectified features, as with a target that holds its ReLU.
_FOLLOWERS = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardtanh, nn.Softplus, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
)


def _past_activations(target: nn.Module, capture: _Capture) -> nn.Module:
    """The last module of the chain of ``_FOLLOWERS`` that takes the target's output (each the one
    before's) after the target finished; the target itself when none does. A module that runs more
    than once in the forward (one ReLU shared by a block) continues the chain only with its last
    run: the next calls at this size record a module's last run."""
    output = capture.activations[id(target)]
    finished = capture.order.index(target)
    last_run = {id(module): i for i, (module, *_) in enumerate(capture.followers)}
    for i, (module, given, produced, done) in enumerate(capture.followers):
        if done > finished and given is output:
            if last_run[id(module)] != i:
                break
            target, output = module, produced
    capture.activations[id(target)] = output
    return target


def _is_conv_head(module: nn.Module) -> bool:
    """A 1x1 ungrouped ``nn.Conv2d``: what a network-in-network head is (a classifier per pixel)."""
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


def _conv_head_ran_last(capture: _Capture, num_classes: int) -> nn.Conv2d | None:
    """The 1x1 conv to the classes that was the last layer with weights to run (a network-in-network
    head, as SqueezeNet's), from the call's record of ``nn.Linear``/``nn.Conv2d`` runs; else None."""
    if not capture.linears:
        return None
    last = capture.linears[-1][0]
    return last if _is_conv_head(last) and last.out_channels == num_classes else None


def _contains_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def _class_index(value) -> int | None:
    """One class index given as a Python or numpy integer, or as a 0-d integer tensor or array (what
    ``labels[i]`` gives); None for anything else (bools included)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Tensor) and value.dim() == 0 and value.dtype in INTEGER_DTYPES:
        return int(value)
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
        return int(value)
    return None
_NO_DOUBLE_BACKWARD = (
    "method={method!r} with differentiable=True differentiates the model's gradient (create_graph=True): the "
    "loss's backward is then a double backward, which a torch.compile'd model's backward cannot do (AOT autograd); "
    "explain the uncompiled model, or take the CAM loss with method='cam' (rcf.class_activation_map on the "
    "features), which needs no gradient")
_UNCHECKED = object()  # (the pooling check not made yet)
_UNDECIDED_IN_TRAINING = object()  # (the pooling check, in train() mode: settled by the first eval()-mode call)


def _remember(cache: dict, key, value) -> None:
    """``cache[key] = value``, the cache started over once it holds ``_SIZES_KEPT`` entries."""
    if len(cache) >= _SIZES_KEPT:
        cache.clear()
    cache[key] = value


def _trains(module: nn.Module) -> bool:
    """The module has a parameter that requires grad: run with grad enabled, its output is then on the
    graph whatever its input (a frozen module's output is on it only if its input is)."""
    return any(p.requires_grad for p in module.parameters())


class CAMEngine:
    """Class activation maps for a batch of images, every method on the device.

    Args:
        model: an image classifier returning logits ``[N, C]``. Its mode (``eval()``/``train()``),
            parameters, their ``.grad`` and ``requires_grad`` are left untouched.
        method: ``"cam"``, ``"gradcam"``, ``"gradcam++"``, ``"layercam"`` or ``"fullycam"``.
        target_layers: modules or their names (``model.named_modules()``). Default: the last
            conv-like layer (the last module, in execution order, that contains a convolution and
            outputs a 4-D map with a spatial extent, found for each input size) for the single-layer
            methods — for Grad-CAM, Grad-CAM++ and LayerCAM, past the ReLU-type activation and
            batch/group/instance norm modules that directly follow it (``conv, BatchNorm2d, ReLU`` as
            separate modules: the ReLU, in place or not) and never a 1x1 conv head to the classes
            (SqueezeNet's class score maps); every ``nn.Conv2d`` for ``"fullycam"``.
        classifier: for ``"cam"``: the ``nn.Linear`` (or 1x1 ``nn.Conv2d``) after the global pool.
            Default: the ``nn.Linear`` from the target layer's channels to the classes that the forward
            runs after the target layer (the one whose output is the logits); a 1x1 conv head to the
            classes (network in network) when the forward has none (with a ReLU between it and the
            pool, as SqueezeNet's, the map is the class score map before that ReLU). Checked once
            against the logits (a warning when the classifier does not pool the target layer's output).
        nwc: negative weight clamping for ``"cam"``: ``max(W, 0)`` in the map (logits unchanged).
        output_size: ``(H, W)`` of the maps; default the input's size.
        fuse: multi-layer fusion, ``"sum"`` (Fully-CAM's formula) or ``"max"`` (LayerCAM-style: the
            element-wise max of the per-layer normalised maps, without the ``tanh(2 M / max M)`` scaling
            the LayerCAM paper applies to shallow layers).
        upsample: ``"bilinear"`` (``align_corners=False``; the fused kernels) or ``"bicubic"``, the
            resize of wsolevaluation's reference pipeline (``cv2.INTER_CUBIC``, which PyTorch's bicubic
            equals to rounding), for maps to compare with numbers computed there; it runs as PyTorch
            ops (no fused kernel) and not with ``differentiable=True``.
        return_layer_maps: also return each layer's map at feature resolution.
        warn_degenerate: warn when a map is constant or non-finite (costs one device sync).
        boxes: also return PaS boxes (``result.boxes``; the contour kernel runs on the CPU, so CUDA
            maps are copied to the host as uint8 levels).
        pas_q, pas_theta: the PaS threshold ``int(pas_theta * percentile(uint8 map, pas_q))``
            (defaults 90 and 0.35; ``100, 0.2`` is plain CAM thresholding).
        box_convention: ``"wsol"`` (the reference's, 1 px large) or ``"exact"`` (inclusive extents).
        backend: kernels: ``"auto"`` (Triton on CUDA; on the CPU the C++ kernels where an op has one —
            LayerCAM/FLM reductions and the upsample-normalise-fuse epilogue — else PyTorch),
            ``"triton"``, ``"reference"`` (pure PyTorch everywhere).
        differentiable: return maps attached to the autograd graph, for losses on CAMs in a training
            loop (grad mode is enabled for the call). ``"cam"`` differentiates through the features
            and the classifier weight (:func:`rethinkcam_fast.class_activation_map`); the gradient
            methods take ``dy/dA`` with ``create_graph=True`` — a double backward through the network
            when the loss is backpropagated — and ``"fullycam"`` fuses with
            :func:`rethinkcam_fast.flm_fuse`. The min-max normalisation is differentiable. Costs: every
            target layer's activations (and for gradient methods their gradients, all layers at once
            for Fully-CAM) stay alive until the loss's backward; README "Differentiable CAMs" gives the
            measured times. Boxes are cut from the detached maps. Off by default: maps are then
            detached, parameters' ``.grad`` and ``requires_grad`` are never touched.
        logits: for a model whose forward returns more than the logits (a tuple, a dict, an object
            with fields): an index, a key or attribute name, or a callable that picks the logits
            ``[N, C]`` from the output. An index or a name applies to such outputs only: an output that
            is a 2-D tensor is the logits (GoogLeNet and Inception return a namedtuple in ``train()``
            and the logits alone in ``eval()``). Default: the output is the logits.

    Usage::

        with CAMEngine(model, "gradcam") as engine:
            result = engine(images)           # top-1 classes
            result = engine(images, targets=labels)
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "gradcam",
        target_layers: list[nn.Module | str] | nn.Module | str | None = None,
        *,
        classifier: nn.Module | None = None,
        nwc: bool = False,
        output_size: tuple[int, int] | None = None,
        fuse: str = "sum",
        upsample: str = "bilinear",
        return_layer_maps: bool = False,
        warn_degenerate: bool = True,
        boxes: bool = True,
        pas_q: float = 90.0,
        pas_theta: float = 0.35,
        box_convention: str = "wsol",
        backend: str = "auto",
        differentiable: bool = False,
        logits: Callable[[object], Tensor] | int | str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if fuse not in FUSE_MODES:
            raise ValueError(f"fuse must be one of {FUSE_MODES}, got {fuse!r}")
        if nwc and method != "cam":
            raise ValueError("nwc=True (negative weight clamping) applies to method='cam' only")
        if differentiable and method != "cam" and type(model).__name__ == "OptimizedModule":  # torch.compile's wrapper
            raise ValueError(_NO_DOUBLE_BACKWARD.format(method=method))
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        if upsample != "bilinear" and differentiable:
            raise ValueError("upsample='bicubic' applies to inference maps only: differentiable=True upsamples "
                             "bilinearly (the differentiable ops' kernels)")
        self.model = model
        self.method = method
        if not (logits is None or callable(logits) or isinstance(logits, (int, str))) or isinstance(logits, bool):
            raise TypeError(f"logits must be None, an index, a key or a callable, got {type(logits).__name__}")
        self.logits = logits
        # What a call finds from the forward, per input size (a layer whose output is 1x1 at one size
        # is not at another): the single-layer default target and the "cam" classifier. Each call
        # works from its own size's entry, so calls at other sizes, from other threads too, never
        # change it; target_layers and classifier show the latest call's (assigning either makes it
        # the given one).
        self._found: dict[tuple[int, ...], tuple[nn.Module | None, nn.Module | None]] = {}
        # "cam": (input size, target, classifier) checked against the logits -> the module the target
        # moves to (a default target whose output the classifier does not pool), or None.
        self._pooling: dict[tuple, nn.Module | None] = {}
        # (both start over past _SIZES_KEPT entries, _remember: a service sees arbitrary sizes for days,
        # and an entry is one forward to find again)
        self._warned_pooling: set[tuple[int, int]] = set()  # (target, classifier) pairs warned about
        self._warned_training = False
        self._warned_unconfirmed = False  # ("cam"'s pooling check undecided in train() mode: said once)
        # The modules whose behaviour depends on train()/eval() (the training-mode warning reads these).
        self._mode_modules = [m for m in model.modules()
                              if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))]
        self.classifier = classifier
        self.nwc = bool(nwc)
        self.output_size = None if output_size is None else tuple(output_size_arg(output_size, (0, 0)))
        self.fuse = fuse
        self.upsample = upsample
        self.return_layer_maps = return_layer_maps
        self.warn_degenerate = warn_degenerate
        if box_convention not in CONVENTIONS:
            raise ValueError(f"box_convention must be one of {CONVENTIONS}, got {box_convention!r}")
        self.boxes = bool(boxes)
        self.pas_q, self.pas_theta, self.box_convention = pas_q, pas_theta, box_convention
        if self.boxes:  # checked (and made floats) now rather than after a forward pass, and once
            try:
                self.pas_q, self.pas_theta = check_pas_parameters(pas_q, pas_theta)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"pas_q={pas_q!r}, pas_theta={pas_theta!r}: {exc}") from None
        check_backend(backend)  # now, not at the first call
        self.backend = backend
        self.differentiable = bool(differentiable)
        self._names = {id(m): name or type(model).__name__ for name, m in model.named_modules()}
        self._default_layers = False
        self.target_layers = target_layers

    # -- configuration ------------------------------------------------------------------------

    @property
    def target_layers(self) -> list[nn.Module] | None:
        """The target layers: the given ones, or the latest call's default (``None`` before one)."""
        return self._target_layers

    @target_layers.setter
    def target_layers(self, value) -> None:
        self._target_layers = self._resolve_layers(value)
        self._find_target = self._target_layers is None
        self._found.clear()
        self._pooling.clear()

    @property
    def classifier(self) -> nn.Module | None:
        """``"cam"``'s classifier: the given one, or the one the latest call found."""
        return self._classifier

    @classifier.setter
    def classifier(self, value) -> None:
        if value is not None and not isinstance(value, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"classifier must be an nn.Linear or a 1x1 nn.Conv2d, got {type(value).__name__}")
        if value is not None and self.method != "cam":
            raise ValueError(f"classifier= applies to method='cam' only (method={self.method!r} takes its weights "
                             "from the gradients)")
        self._classifier = value
        self._find_head = self.method == "cam" and value is None
        self._found.clear()
        self._pooling.clear()

    def _training(self) -> bool:
        """Whether a module whose behaviour depends on the mode (batch norm, dropout) is in train()."""
        return any(m.training for m in self._mode_modules)

    def _resolve_layers(self, target_layers) -> list[nn.Module] | None:
        if target_layers is None:
            if self.method == "fullycam":
                convs = [m for m in self.model.modules() if isinstance(m, nn.Conv2d)]
                if not convs:
                    raise ValueError(f"{type(self.model).__name__} has no nn.Conv2d for method='fullycam'")
                self._default_layers = True  # convs that the forward never runs are left out per call
                return convs
            return None  # the last conv-like layer, found on the first call
        if isinstance(target_layers, (nn.Module, str)):
            target_layers = [target_layers]
        if not isinstance(target_layers, (list, tuple)):
            raise TypeError("target_layers must be a module, its name, or a list of them, got "
                            f"{type(target_layers).__name__}")
        layers = []
        for layer in target_layers:
            if isinstance(layer, str):
                try:
                    layer = self.model.get_submodule(layer)
                except AttributeError:
                    raise ValueError(f"target layer {layer!r} is not a submodule of {type(self.model).__name__}") from None
            elif not isinstance(layer, nn.Module) or id(layer) not in self._names:
                raise ValueError(f"target layer {type(layer).__name__} is not a submodule of {type(self.model).__name__}")
            layers.append(layer)
        if not layers:
            raise ValueError("target_layers is empty")
        if len(layers) > 1 and self.method != "fullycam":
            raise ValueError(f"method={self.method!r} takes one target layer, got {len(layers)}; use 'fullycam'")
        return layers

    def layer_name(self, module: nn.Module) -> str:
        """``module``'s name in the model (as ``named_modules()`` gives it; the model's class name for
        the model itself), or its class name when it is not one of the model's modules."""
        return self._names.get(id(module), type(module).__name__)

    def __repr__(self) -> str:
        layers = self._target_layers
        where = ("default (found at the first call)" if layers is None else
                 f"{len(layers)} convs" if self._default_layers and len(layers) > 3 else
                 str([self.layer_name(m) for m in layers]))
        options = [f"method={self.method!r}", f"target_layers={where}"]
        if self.method == "cam":
            options.append(f"nwc={self.nwc}")
        if self.method == "fullycam":
            options.append(f"fuse={self.fuse!r}")
        options += [f"output_size={self.output_size}", f"upsample={self.upsample!r}",
                    f"boxes={self.boxes}" + (f" (PaS q={self.pas_q}, theta={self.pas_theta}, {self.box_convention!r})"
                                             if self.boxes else ""),
                    f"backend={self.backend!r}", f"differentiable={self.differentiable}"]
        return f"CAMEngine({type(self.model).__name__}, {', '.join(options)})"

    # -- context manager: hooks live only inside __call__, so there is nothing left to remove ----

    def __enter__(self) -> CAMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release: hooks are removed at the end of every call (kept for symmetry)."""

    # -- the call -----------------------------------------------------------------------------

    def __call__(self, images: Tensor, targets: int | Tensor | np.ndarray | list | None = None) -> CAMResult:
        """Explain ``targets`` (default: top-1) for ``images[N, C, H, W]``; see :class:`CAMResult`.

        ``targets``: ``None`` (each image's top-1 class), one class for every image (an int, or a 0-d
        integer tensor or array), or one per image (an integer tensor or array ``[N]``, or a list of
        ints or 0-d integer tensors).

        Works inside ``torch.no_grad()`` and ``torch.inference_mode()`` too: gradient methods (and
        ``differentiable=True``) leave them for their own pass (an inference-mode input is copied
        once into a normal tensor, which autograd can record).
        """
        return self._call(images, targets, None)

    def call_at_size(self, images: Tensor, targets: int | Tensor | np.ndarray | list | None,
                     output_size: tuple[int, int] | None) -> CAMResult:
        """:meth:`__call__` with maps (and boxes) at ``output_size = (H, W)`` for this call only (``None``:
        the engine's ``output_size``), leaving the engine as it is: one engine can serve callers that
        want different sizes from several threads (the video path: each frame's own pixels)."""
        return self._call(images, targets, output_size)

    def _call(self, images: Tensor, targets, output_size) -> CAMResult:
        """The call, one frame below the public entry points (the warnings' stack levels count it)."""
        check_tensor("images", images, ndim=4)
        check_float_dtype("images", images)
        # (the model's own flag first: an eval() model, the usual case, costs one attribute read a call)
        if not self._warned_training and not self.differentiable and self.model.training and self._training():
            self._warned_training = True
            warnings.warn(f"{type(self.model).__name__} has batch norms or dropout in training mode: calls update "
                          "the batch norms' running statistics and dropout makes the maps random; call model.eval() "
                          "for inference CAMs (the engine leaves the mode to you)", RuntimeWarning, stacklevel=3)
        needs_graph = self.method != "cam" or self.differentiable
        size = None if output_size is None else tuple(output_size_arg(output_size, (0, 0)))
        if not needs_graph:
            with torch.set_grad_enabled(False):
                return self._explain(images, targets, out_size=size, depth=1)
        with torch.inference_mode(False), torch.enable_grad():
            if images.is_inference():
                images = images.clone()
            return self._explain(images, targets, out_size=size, depth=1)

    def graphed(self, example: Tensor, targets: int | Tensor | None = None) -> GraphedCAM:
        """This engine's call for batches shaped like ``example``, captured once in a CUDA graph.

        Calling the result with images of the same shape, dtype and device copies them in and
        replays the capture (forward, backward to the target layers, maps, PaS thresholds), then
        cuts the boxes on the host: the per-call host work of the eager engine — a kernel launch per
        layer, Python in every hook — is gone, which is what dominates small batches (on an H100 the
        video path's batch-1 frame took 2.3 ms replayed against 14 ms eager). Capture under the
        ``torch.autocast`` you want replayed.

        Args:
            example: ``Tensor[N, C, H, W]`` on a CUDA device (its values do not matter).
            targets: ``None`` (top-1) or one class index for every image (an int, or a 0-d integer
                tensor); fixed at capture.
        Raises:
            ValueError: a tensor off CUDA, or ``differentiable=True`` (a replay returns no graph).
            TypeError: ``targets`` neither ``None`` nor an int.
        """
        return GraphedCAM(self, example, targets)

    def _explain(self, images: Tensor, targets: int | Tensor | None, *, out_size: tuple[int, int] | None = None,
                 stand_in: bool | None = None,
                 exhaustive: bool = False, head: nn.Module | None = None,
                 pooled: nn.Module | None = None, depth: int = 0) -> CAMResult:
        """One call. ``stand_in``: record the graph from a leaf copy of the images (``None``: decide);
        ``exhaustive``: Fully-CAM's backward also runs to every target layer (see _fully_cam_maps);
        both are set by the retries below, in the rare models that need them; ``head``: a 1x1 conv
        classifier found by the call (see _find_classifier); ``pooled``: ``"cam"``'s default target
        moved to the module whose output the classifier pools (see _check_pooling); ``out_size``: this
        call's output size (``call_at_size``); ``depth``: frames between the user's call and this one
        beyond ``_call`` (the public entry point, then one per restart: the warnings' stack levels)."""
        given = images
        output_size = out_size or self.output_size or (images.shape[2], images.shape[3])
        capture = _Capture()
        size = tuple(images.shape[2:])
        found_target, classifier = self._found.get(size, (None, None))
        if not self._find_head:
            classifier = self._classifier
        elif head is not None:
            classifier = head
        if pooled is not None:  # "cam": the default target, moved to the module whose output the classifier pools
            found_target = pooled
        layers = ([found_target] if found_target is not None else None) if self._find_target else self._target_layers
        # A 1x1 conv classifier is not a feature layer: the default target is found among the modules
        # that do not hold it.
        head = classifier if isinstance(classifier, nn.Conv2d) else None
        candidates = layers if layers is not None else [
            m for m in self.model.modules()
            if m is not self.model and _contains_conv(m) and (head is None or all(x is not head for x in m.modules()))
        ]
        if not candidates:
            what = type(self.model).__name__
            raise ValueError(f"{what} has no convolutional layer inside it to explain: CAMEngine takes a classifier "
                             "(convolutional features, then logits [N, num_classes])")
        needs_grad = self.method != "cam"
        if needs_grad and stand_in is None:
            stand_in = not (self.differentiable and self._graph_reaches_targets(images, layers))
        if needs_grad and stand_in:
            # A graph must be recorded even for a frozen (or partly frozen) model; an input that
            # requires grad does it without touching the parameters.
            images = images.detach().requires_grad_(True)
        handles = []
        try:  # (hooks registered one by one inside: a module refusing one must not orphan the others')
            hook = self._forward_hook(capture)  # (one closure for every module)
            for m in candidates:
                handles.append(m.register_forward_hook(hook))
            # which nn.Linear (or 1x1 conv head) makes the logits: "cam"'s classifier, or (the default
            # target of a gradient method) a network-in-network head that is not a feature layer
            if (self.method == "cam" and classifier is None) or (layers is None and needs_grad):
                hook = self._linear_hook(capture)
                for m in self.model.modules():
                    if isinstance(m, (nn.Linear, nn.Conv2d)):
                        handles.append(m.register_forward_hook(hook))
            if layers is None and needs_grad:  # the activations and norms right after the default target
                hook = self._follower_hook(capture)
                for m in self.model.modules():
                    if isinstance(m, _FOLLOWERS):
                        handles.append(m.register_forward_hook(hook))
            logits = self._logits_of(self.model(images))
        finally:
            for handle in handles:
                handle.remove()
        if layers is None:
            if not capture.order:
                raise ValueError("no conv-like layer produced a 4-D feature map during the forward pass")
            # The last conv-like module whose output still has a spatial extent: a container that
            # ends with the global pool (``nn.Sequential(*backbone_with_pool)``) outputs [N, C, 1, 1],
            # whose "map" is one value — its CAM would be constant, i.e. zeros.
            spatial = [m for m in capture.order if capture.activations[id(m)].shape[2] * capture.activations[id(m)].shape[3] > 1]
            if needs_grad:  # a 1x1 conv head (SqueezeNet's) gives class scores, not features: not a target
                nin = _conv_head_ran_last(capture, logits.shape[1])
                spatial = [m for m in spatial if nin is None or all(x is not nin for x in m.modules())] or spatial
            layers = [(spatial or capture.order)[-1]]
            if needs_grad:
                layers = [_past_activations(layers[0], capture)]
        if self.method == "cam" and classifier is None:
            classifier = self._find_classifier(layers[0], capture, logits)
            if any(m is classifier for m in layers[0].modules()):  # the default target held the 1x1 conv head:
                # again, with it as the head (the target is then found among the modules without it)
                return self._explain(given, targets, out_size=out_size, stand_in=stand_in, exhaustive=exhaustive,
                                     head=classifier, depth=depth + 1)
        if self._find_target or self._find_head:
            _remember(self._found, size,
                      (layers[0] if self._find_target else None, classifier if self._find_head else None))
            if self._find_target:  # (the latest call's, for the caller to read)
                self._target_layers = layers
            if self._find_head:
                self._classifier = classifier
        labels = self._resolve_targets(targets, logits)
        scores = logits.gather(1, labels[:, None])[:, 0]
        if self._default_layers:  # "every nn.Conv2d" means every one that ran
            layers = [m for m in layers if id(m) in capture.activations] or layers
        missing = [self.layer_name(m) for m in layers if id(m) not in capture.activations]
        if missing:
            raise ValueError(f"target layer(s) {missing} produced no 4-D tensor output during the forward pass")

        if self.method == "cam" and logits.shape[0]:
            key = (size, id(layers[0]), id(classifier))
            better = self._pooling.get(key, _UNCHECKED)
            training = self._training()
            if (better is _UNCHECKED or (better is _UNDECIDED_IN_TRAINING and not training)) and not (
                    logits.is_cuda and torch.cuda.is_current_stream_capturing()):  # (no host sync in a capture)
                better = self._check_pooling(layers[0], capture.activations[id(layers[0])], logits, classifier,
                                             images, training, may_move=self._find_target and pooled is None,
                                             stacklevel=4 + depth)
                if better is not _UNCHECKED:  # (_UNCHECKED: this batch could not tell; a later call checks)
                    _remember(self._pooling, key, better)
            if better is _UNCHECKED or better is _UNDECIDED_IN_TRAINING:
                better = None
            if better is not None and pooled is None and self._find_target:
                # The default target, moved to the output the classifier pools (also where another
                # thread's first call at this size stored the unmoved one meanwhile).
                return self._explain(given, targets, out_size=out_size, stand_in=stand_in, exhaustive=exhaustive,
                                     head=head, pooled=better, depth=depth + 1)
        if self.method != "cam":
            if not stand_in and any(not capture.activations[id(m)].requires_grad and not _trains(m) for m in layers):
                # (differentiable=True, a default target found frozen): record from a stand-in input
                return self._explain(given, targets, out_size=out_size, stand_in=True, exhaustive=exhaustive,
                                     head=head, pooled=pooled, depth=depth + 1)
            self._check_on_graph(layers, capture, scores)
        if self.differentiable:
            maps, cams, degenerate = self._differentiable_maps(layers, capture, labels, scores, logits, output_size,
                                                               classifier, depth)
        else:
            if self.method == "fullycam":
                maps = self._fully_cam_maps(layers, capture, scores, images, exhaustive, depth)
                if maps is None:  # a cut the forward hooks could not see: again, reaching every layer
                    return self._explain(given, targets, out_size=out_size, stand_in=stand_in, exhaustive=True,
                                         head=head, pooled=pooled, depth=depth + 1)
            else:
                activation = capture.activations[id(layers[0])]
                maps = [self._single_layer_map(layers[0], activation, labels, scores, logits.shape[1], classifier)]
            # (the checks fuse_maps would make that the engine's own maps can fail)
            device = maps[0].device
            if any(m.shape[1] * m.shape[2] == 0 or m.device != device for m in maps):
                empty = [self.layer_name(l) for l, m in zip(layers, maps) if m.shape[1] * m.shape[2] == 0]
                if empty:
                    raise ValueError(f"target layer(s) {empty} produced feature maps with an empty spatial extent")
                where = {self.layer_name(l): str(m.device) for l, m in zip(layers, maps)}
                raise ValueError(f"the target layers' outputs lie on several devices ({where}): CAMEngine fuses "
                                 "their maps on one device")
            if self.fuse not in FUSE_MODES:  # (attributes set after construction)
                raise ValueError(f"fuse must be one of {FUSE_MODES}, got {self.fuse!r}")
            if self.upsample not in UPSAMPLE_MODES:
                raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {self.upsample!r}")
            size = [int(output_size[0]), int(output_size[1])]
            if self.upsample == "bilinear":
                cams, degenerate = fuse_maps_trusted(maps, size, self.fuse, self.backend)
            else:  # (PyTorch's interpolation: the epilogue kernels are bilinear)
                cams, degenerate = fuse_maps_reference(maps, size, self.fuse, self.upsample)
        # A map explaining a non-finite score (NaN logits: a NaN in the image) is zeros and flagged,
        # whatever the method: the NaN policy of Fully-CAM's ReLUs (NaN -> 0) can leave such a map finite
        # and plausible-looking. (No host sync, five aten ops: y - y is 0 exactly when y is finite.)
        scored = scores.detach()
        bad = (scored - scored).ne(0)
        if bad.device != cams.device:  # (a model split over devices: the head's scores, the target's maps)
            bad = bad.to(cams.device)
        bad_images = bad.view(-1, 1, 1)
        cams = cams.masked_fill(bad_images, 0) if self.differentiable else cams.masked_fill_(bad_images, 0)
        degenerate = degenerate | bad
        if self.warn_degenerate:
            _warn_degenerate(degenerate, stacklevel=4 + depth)  # (_warn_degenerate, _explain, _call, the entry point)
        layer_maps = None
        if self.return_layer_maps:
            layer_maps = {self.layer_name(m): mp for m, mp in zip(layers, maps)}
        result = CAMResult(labels=labels, scores=scored.float(), cams=cams, degenerate=degenerate,
                           layer_maps=layer_maps)
        if self.differentiable:
            result.scores, result.logits = scores.float(), logits
        if self.boxes:  # the maps come out of fuse_maps finite and in [0, 1]: no need to re-validate
            plain = cams.detach()
            result.thresholds = percentile_threshold(plain, self.pas_q, self.pas_theta, validate=False,
                                                     backend=self.backend)
            result.boxes = boxes_from_cams(plain, result.thresholds, "largest", self.box_convention, validate=False)
        return result

    def _logits_of(self, output) -> Tensor:
        """The logits ``[N, num_classes]`` in the model's output: the output itself, or what
        ``logits=`` picks from it (an index into a tuple, a key of a dict or an attribute name, a
        callable)."""
        picked = output
        if isinstance(output, Tensor) and output.dim() == 2 and not callable(self.logits):
            # An index or key picks from a multi-output result; GoogLeNet and Inception return the
            # logits alone in eval() mode (a namedtuple in train()), and an index would pick an image.
            return output
        try:
            if callable(self.logits):
                picked = self.logits(output)
            elif isinstance(self.logits, int):
                picked = output[self.logits]
            elif isinstance(self.logits, str):
                picked = output[self.logits] if isinstance(output, Mapping) else getattr(output, self.logits)
        except (IndexError, KeyError, AttributeError, TypeError) as exc:
            raise ValueError(f"logits={self.logits!r} does not pick the logits from the model's output "
                             f"({type(output).__name__}): {type(exc).__name__}: {exc}") from None
        if not isinstance(picked, Tensor) or picked.dim() != 2:
            shape = tuple(picked.shape) if isinstance(picked, Tensor) else type(picked).__name__
            hint = "" if self.logits is not None or isinstance(picked, Tensor) else (
                "; for a model that returns several outputs, pick the logits with logits= (an index, a key or a "
                "callable)")
            raise ValueError(f"the model must return logits [N, num_classes], got {shape}{hint}")
        return picked

    def _graph_reaches_targets(self, images: Tensor, layers: list[nn.Module] | None) -> bool:
        """Whether the forward puts the target layers' outputs on the graph by itself — the input
        requires grad, or every target layer has a parameter that requires grad — so that
        differentiable maps reach the caller's images and parameters without a stand-in input (which
        would record, and later backpropagate through, a frozen backbone for nothing). With the
        default single target, not known before a call at this input size, any trainable parameter
        counts; a frozen target found then makes the call start again from a stand-in."""
        if images.requires_grad:
            return True
        if layers is None:
            return any(p.requires_grad for p in self.model.parameters())
        return all(_trains(m) for m in layers)

    def _forward_hook(self, capture: _Capture):
        """Record a module's 4-D output. It is the tensor object itself: in-place ops that follow
        (``ReLU(inplace=True)``) show in it, as in pytorch-grad-cam. (It runs after every forward of a
        hooked module — 53 of them in a ResNet50 Fully-CAM call — so the capture's containers are
        bound once and the input scan is a plain loop: 1 µs a call less on the CI CPU.) On a
        ``torch.compile``'d model Dynamo cannot trace the thread check and breaks the graph at each
        hooked module, with a warning: that break keeps the recorded output a tensor of the autograd
        graph, whose gradient the engine takes (traced into the compiled graph, it would be an output
        of the compiled function, off the graph)."""
        activations, order, cut_inputs, thread = capture.activations, capture.order, capture.cut_inputs, capture.thread
        get_ident, is_grad_enabled = threading.get_ident, torch.is_grad_enabled

        def hook(module: nn.Module, inputs, output) -> None:
            if not isinstance(output, Tensor) or output.dim() != 4 or get_ident() != thread:
                return
            key = id(module)
            if key in activations:  # a module run twice counts where it last finished
                order.remove(module)
            activations[key] = output
            order.append(module)
            if is_grad_enabled():
                for t in inputs:  # a floating input off the graph in grad mode: the graph starts again here
                    if isinstance(t, Tensor) and not t.requires_grad and t.is_floating_point():
                        cut_inputs.add(key)
                        return
            cut_inputs.discard(key)

        setattr(hook, TRANSIENT_HOOK, True)  # (removed when the call ends: fold_batchnorm looks past it)
        return hook

    @staticmethod
    def _follower_hook(capture: _Capture):
        """Records each run of an activation or norm module (``_FOLLOWERS``) that keeps its input's
        4-D shape: ``(module, input, output, len(order) when it finished)``; see _past_activations."""
        followers, order, thread = capture.followers, capture.order, capture.thread

        def hook(module: nn.Module, inputs, output) -> None:
            if (isinstance(output, Tensor) and output.dim() == 4 and inputs and isinstance(inputs[0], Tensor)
                    and inputs[0].shape == output.shape and threading.get_ident() == thread):
                followers.append((module, inputs[0], output, len(order)))

        setattr(hook, TRANSIENT_HOOK, True)
        return hook

    @staticmethod
    def _linear_hook(capture: _Capture):
        """Records each run of an ``nn.Linear`` or ``nn.Conv2d``: the output itself only when 2-D (the
        logits are; keeping a ConvNeXt's pointwise outputs [N, H, W, 4C] would hold them all)."""
        linears, order, thread = capture.linears, capture.order, capture.thread

        def hook(module: nn.Module, inputs, output) -> None:
            if isinstance(output, Tensor) and threading.get_ident() == thread:
                linears.append((module, output if output.dim() == 2 else None, len(order)))

        setattr(hook, TRANSIENT_HOOK, True)
        return hook

    def _find_classifier(self, target: nn.Module, capture: _Capture, logits: Tensor) -> nn.Module:
        """``"cam"``: the classifier, from what the forward ran: an ``nn.Linear`` from the target's
        channels to the classes that ran after the target layer — the one whose output is the logits,
        else the last — rather than any the model holds (a second head, an unused layer). With none, a
        1x1 conv from those channels to the classes that ran after it as the last layer with weights
        to run (a network-in-network head; not a bottleneck's 1x1 conv inside a later block); or,
        for a default target that is or ends with such a conv, that conv (the call then runs again,
        the target found among the modules without it); else the last such ``nn.Linear`` the model
        holds (one the forward applies without calling the module). Raises when there is none."""
        channels, num_classes = capture.activations[id(target)].shape[1], logits.shape[1]
        after = capture.order.index(target) + 1 if target in capture.order else 0
        ran = [(m, out) for m, out, done in capture.linears if done >= after and isinstance(m, nn.Linear)
               and m.in_features == channels and m.out_features == num_classes]
        if ran:
            return next((m for m, out in ran if out is logits), ran[-1][0])
        head = _conv_head_ran_last(capture, num_classes)
        if head is not None:
            if capture.linears[-1][2] >= after and head is not target and head.in_channels == channels:
                return head  # a 1x1 conv head after the (given) target
            if self._find_target and channels == num_classes and any(m is head for m in target.modules()):
                # a default target that is (or ends with) the head; a bottleneck conv that happens to
                # have as many channels as there are classes is not the head: an MLP head ran after it
                return head
        held = [m for m in self.model.modules()  # applied without its hooks (F.linear(x, fc.weight), fc.forward)
                if isinstance(m, nn.Linear) and m.in_features == channels and m.out_features == num_classes]
        if held:  # (checked against the logits by _check_pooling)
            return held[-1]
        raise ValueError(
            f"method='cam' needs the classifier after the global pool: no nn.Linear({channels} -> {num_classes}) "
            f"ran after the target layer {self.layer_name(target)!r} in {type(self.model).__name__}'s forward; "
            "pass classifier= (an nn.Linear, or a 1x1 nn.Conv2d) or target_layers=")

    def _check_pooling(self, target: nn.Module, activation: Tensor, logits: Tensor, classifier: nn.Module,
                       images: Tensor, training: bool, may_move: bool, stacklevel: int):
        """``"cam"``, once per input size, target and classifier: the CAM is ``W`` times the target layer's output,
        which is the classifier's view of the logits only if the forward pools that very output into it
        — a global average, or a :class:`TAP` of the model (the CAM itself is then still taken from the
        unthresholded output). When the classifier applied to the pool of that output does not give the
        logits — an activation or a batch norm module after the target layer, one applied functionally
        (``F.relu``), another pool, a head of several layers — look for the module, finishing after the
        target, whose output it does pool (one more forward). With ``may_move`` (a default target)
        that module is returned, to be the target; otherwise warn, naming it when there is one.

        Images with non-finite logits are left out; ``_UNCHECKED`` when none is left (a later call
        checks). In ``train()`` mode a match in the call's own forward settles it too, but a mismatch may
        be dropout's (or a batch statistic's) doing: ``_UNDECIDED_IN_TRAINING``, with one warning for a
        default target and no extra forward (it would update batch-norm statistics, or need the shared
        model switched to ``eval()``); the first ``eval()``-mode call decides."""
        from .modules import TAP
        from .ops.tap import tap

        taus = sorted({float(m.tau) for m in self.model.modules() if isinstance(m, TAP)})
        with torch.no_grad(), autocast_off(activation):  # (no cast of the weights: a captured call reads none)
            want = logits.detach().float()  # (the classifier on the logits' device, once)
            weight = self._classifier_weight(classifier, activation.shape[1], logits.shape[1]).float().to(want.device)
            bias = getattr(classifier, "bias", None)
            bias = None if bias is None else bias.detach().float().to(want.device)
            finite = torch.isfinite(want).all(dim=1)
            if not bool(finite.any()):
                return _UNCHECKED
            want = want[finite]
            scale = float(want.abs().max())
        low_precision = any(t.dtype in (torch.float16, torch.bfloat16) for t in (activation, logits, classifier.weight))
        tolerance = (3e-2 if low_precision else 1e-3) * (scale + 1.0)

        def error(output: Tensor) -> float:  # max |classifier(pool of output) - logits|, the closest pool's
            with torch.no_grad(), autocast_off(output):
                x = output.detach().float()[finite.to(output.device)]
                best = float("inf")
                for pooled in [x.mean(dim=(2, 3))] + [tap(x, tau) for tau in taus]:
                    pooled = pooled.to(want.device) @ weight.T
                    pooled = pooled if bias is None else pooled + bias
                    best = min(best, float((pooled - want).abs().max()))
                if isinstance(classifier, nn.Conv2d):  # a 1x1 conv head whose class score maps pass a ReLU
                    # before the pool (SqueezeNet's): the CAM is the class's score map before that ReLU
                    scores = torch.einsum("nkhw,ck->nchw", x.to(want.device), weight)
                    scores = scores if bias is None else scores + bias[:, None, None]
                    best = min(best, float((scores.relu().mean(dim=(2, 3)) - want).abs().max()))
                return best

        off = error(activation)
        # TAP keeps only values above tau * max > 0, so it pools a map and its ReLU alike: a default
        # target with negative values may have a ReLU after it (wsolevaluation's VGG: conv6, ReLU, pool)
        # whose output is what is pooled; looked for as for a mismatch.
        relu_blind = bool(taus) and may_move and bool((activation < 0).any())
        if off <= tolerance and not relu_blind:
            return None
        if training:
            if may_move and not self._warned_unconfirmed:
                self._warned_unconfirmed = True
                warnings.warn(
                    f"method='cam' in train() mode: the default target {self.layer_name(target)!r} is not confirmed as "
                    "the output the classifier pools (dropout and batch statistics change a train-mode forward; a "
                    "ReLU or batch norm after the layer changes what is pooled), and checking needs one more forward: "
                    "the first eval()-mode call does it and may move the default target; for a CAM loss in training, "
                    "pass target_layers= the module whose output is pooled", RuntimeWarning, stacklevel=stacklevel)
            return _UNDECIDED_IN_TRAINING
        pair = (id(target), id(classifier))
        if off > tolerance and not may_move and pair in self._warned_pooling:
            return None  # (said once per target and classifier: no extra forward to name the fix again)
        pooled_layer = self._pooled_layer(images, target, weight.shape[1], error, tolerance)
        if off <= tolerance:  # (TAP, matched at the target already: a ReLU after it, if any)
            return pooled_layer if pooled_layer is not None and pooled_layer is not target else None
        if may_move and pooled_layer is not None:
            return pooled_layer
        advice = (f"pass target_layers={self.layer_name(pooled_layer)!r}, whose output it pools" if pooled_layer
                  is not None else "pass the module whose output is pooled as target_layers=, or use a gradient method")
        if pair in self._warned_pooling:  # (once per target and classifier, not once per input size)
            return None
        self._warned_pooling.add(pair)
        warnings.warn(
            f"method='cam': {type(classifier).__name__} {self.layer_name(classifier)!r} applied to the global pool "
            f"of target layer {self.layer_name(target)!r}'s output does not give the logits (off by {off:.3g}): the "
            "forward changes that output before the classifier sees it (an activation after the layer, as a module "
            "or F.relu; another pool; a head of several layers), so the map is not the classifier's CAM; " + advice,
            RuntimeWarning, stacklevel=stacklevel)
        return None

    def _pooled_layer(self, images: Tensor, target: nn.Module, channels: int, error, tolerance: float):
        """The module whose output the classifier pools: among the modules whose last run finishes
        after the target's, with a 4-D output of ``channels`` channels that varies over a spatial
        extent, the last one whose pool the classifier turns into the logits (so the outermost of
        modules sharing that tensor: a block rather than its final ReLU); or None, also when the extra
        forward (no grad; made in eval() mode only) fails (the check is advice, not the call's work)."""
        last: dict[int, tuple[int, nn.Module, Tensor | None]] = {}  # a module's last run: (order, module, output)
        thread, counter = threading.get_ident(), itertools.count()

        def record(module, inputs, output) -> None:
            if threading.get_ident() != thread:
                return
            keep = (isinstance(output, Tensor) and output.dim() == 4 and output.shape[1] == channels
                    and output.shape[2] * output.shape[3] > 1)
            last[id(module)] = (next(counter), module, output if keep else None)

        setattr(record, TRANSIENT_HOOK, True)  # (removed when the check ends: fold_batchnorm looks past it)
        handles = []
        try:
            for m in self.model.modules():  # (one by one: a module refusing hooks must not orphan the others')
                if m is not self.model:
                    handles.append(m.register_forward_hook(record))
            with torch.no_grad():
                self._logits_of(self.model(images.detach()))
        except Exception:  # (a ScriptModule refuses hooks; memory; the model's own error on a second run)
            return None
        finally:
            for handle in handles:
                handle.remove()
        if id(target) not in last:
            return None
        after = last[id(target)][0]
        found = None
        for order, module, output in sorted(last.values(), key=lambda item: item[0]):
            if order <= after or output is None:
                continue
            with torch.no_grad():
                flat = output.detach().flatten(2)
                if bool((flat.amax(dim=2) == flat.amin(dim=2)).all()):  # constant over the pixels: no map
                    continue
            if error(output) <= tolerance:
                found = module
        return found

    def _resolve_targets(self, targets, logits: Tensor) -> Tensor:
        n, num_classes = logits.shape
        if targets is None:
            return logits.detach().argmax(dim=1)
        one = _class_index(targets)  # one class for every image (a 0-d tensor or array too)
        if one is not None:
            targets = one
        elif isinstance(targets, np.ndarray) and targets.dtype.kind in "iu":  # numpy labels, as data loaders give
            # (any integer dtype, byte order or stride)
            targets = torch.from_numpy(np.ascontiguousarray(targets, np.int64))
        elif isinstance(targets, (list, tuple)):  # one class per image: ints, or 0-d tensors as labels[i] gives
            indices = [_class_index(t) for t in targets]
            if all(i is not None for i in indices):
                targets = torch.tensor(indices, dtype=torch.long)
        if isinstance(targets, (bool, np.bool_)) or not isinstance(targets, (Integral, Tensor)):
            raise TypeError("targets must be None, an int, a list of ints or an integer tensor [N], got "
                            f"{type(targets).__name__}")
        if isinstance(targets, Integral):  # numpy integers too
            targets = int(targets)
            if not 0 <= targets < num_classes:
                raise ValueError(f"target class {targets} out of range for {num_classes} classes")
            return torch.full((n,), targets, dtype=torch.long, device=logits.device)
        check_integer_dtype("targets", targets, "integer class indices")
        if targets.shape != (n,):
            raise ValueError(f"targets must have shape ({n},) to match the batch, got {tuple(targets.shape)}")
        targets = targets.to(device=logits.device, dtype=torch.long)
        if n and bool(((targets < 0) | (targets >= num_classes)).any()):
            raise ValueError(f"targets out of range for {num_classes} classes: {targets.tolist()}")
        return targets

    # -- per-method maps ------------------------------------------------------------------------

    def _single_layer_map(self, layer: nn.Module, activation: Tensor, labels: Tensor, scores: Tensor,
                          num_classes: int, classifier: nn.Module | None) -> Tensor:
        if self.method == "cam":
            weight = self._classifier_weight(classifier, activation.shape[1], num_classes)
            if self.nwc:
                weight = weight.clamp_min(0)
            # No ReLU: plain CAM is min-max normalised as is (won-bae / wsolevaluation).
            return weighted_map(activation.detach(), weight[labels], mode="channel", relu=False, backend=self.backend)
        try:
            (grad,) = torch.autograd.grad(scores.sum(), activation, create_graph=self.differentiable)
        except RuntimeError as exc:
            if "not have been used in the graph" in str(exc):
                raise self._off_graph_error([layer]) from None
            self._check_double_backward(exc)
            raise
        if self.differentiable:  # plain PyTorch ops: the graph runs through the activation and its gradient
            def reduce(a, weights=None, grads=None, mode="channel", relu=True):
                # (float32 sums, as the kernel's; a float64 model keeps float64, as the differentiable ops)
                return weighted_map_reference(a, weights, grads, mode, relu, acc=acc_dtype(a))
        else:
            activation = activation.detach()

            def reduce(a, weights=None, grads=None, mode="channel", relu=True):
                return weighted_map_trusted(a, weights, grads, mode=mode, relu=relu, backend=self.backend)
        # LayerCAM, Grad-CAM and Grad-CAM++ (channel weights from the gradient, in the op: DESIGN.md §2)
        return reduce(activation, grads=grad, mode=self.method, relu=True)

    def _differentiable_maps(self, layers, capture, labels, scores, logits, output_size, classifier, depth=1):
        """``(per-layer maps, cams, degenerate)``: cams attached to the graph, the per-layer maps (only
        with ``return_layer_maps``) detached."""
        size = [int(output_size[0]), int(output_size[1])]
        if self.method == "fullycam":
            acts = [capture.activations[id(m)] for m in layers]
            on_graph = [a for a in acts if a.requires_grad]  # (a no_grad stem's outputs are not)
            try:
                found = iter(torch.autograd.grad(scores.sum(), on_graph, create_graph=True, allow_unused=True))
            except RuntimeError as exc:
                self._check_double_backward(exc)
                raise
            grads = [next(found) if a.requires_grad else None for a in acts]
            for module, grad in zip(layers, grads):
                if grad is None:
                    warnings.warn(
                        f"layer {self.layer_name(module)} received no gradient from the target score; its map is zeros",
                        RuntimeWarning,
                        stacklevel=4 + depth,  # (this, _explain, _call, the entry point; restarts)
                    )
            grads = [torch.zeros_like(a) if g is None else g for a, g in zip(acts, grads)]
            cams, degenerate = flm_fuse_with_flags(acts, grads, size, self.fuse, self.backend)
            if not self.return_layer_maps:
                return [], cams, degenerate
            reduce = flm_layer_reducer(self.backend)
            return [reduce(a.detach(), g.detach()) for a, g in zip(acts, grads)], cams, degenerate
        activation = capture.activations[id(layers[0])]
        if self.method != "cam":
            (layer_map,) = maps = [self._single_layer_map(layers[0], activation, labels, scores, logits.shape[1], None)]
            cams, degenerate = map_epilogue_op(maps, size, "sum", True, self.backend)
            return [layer_map.detach()], cams, degenerate
        weight = self._classifier_weight(classifier, activation.shape[1], logits.shape[1], detach=False)
        cams, degenerate = class_activation_map_with_flags(activation, weight, labels, self.nwc, size, True, self.backend)
        if not self.return_layer_maps:
            return [], cams, degenerate
        plain = weight.detach().clamp_min(0) if self.nwc else weight.detach()
        return [weighted_map(activation.detach(), plain[labels], mode="channel", relu=False, backend=self.backend)], \
            cams, degenerate

    @staticmethod
    def _classifier_weight(classifier: nn.Module, channels: int, num_classes: int, detach: bool = True) -> Tensor:
        """``W[C, K]`` of the call's classifier (given, or found by _find_classifier)."""
        weight = classifier.weight.detach() if detach else classifier.weight
        if weight.dim() == 4:
            if weight.shape[2:] != (1, 1):
                raise ValueError(f"a conv classifier must be 1x1, got kernel {tuple(weight.shape[2:])}")
            weight = weight[:, :, 0, 0]
        if weight.shape != (num_classes, channels):
            raise ValueError(
                f"classifier weight {tuple(weight.shape)} does not map the target layer's {channels} channels "
                f"to {num_classes} classes"
            )
        return weight

    def _check_on_graph(self, layers: list[nn.Module], capture: _Capture, scores: Tensor) -> None:
        """Gradient methods need the target layers' outputs on the autograd graph of the scores."""
        off = [m for m in layers if not capture.activations[id(m)].requires_grad]
        if not scores.requires_grad or len(off) == len(layers):
            raise self._off_graph_error(off or layers)

    def _off_graph_error(self, layers: list[nn.Module]) -> ValueError:
        return ValueError(
            f"method={self.method!r}: the output of target layer(s) {[self.layer_name(m) for m in layers]} is not "
            "on the autograd graph of the logits (the model computes it under no_grad/inference_mode, or it is a "
            "torch.compile'd model, whose hooks see tensors outside the compiled graph); gradient methods need "
            "it: explain the uncompiled model, or use method='cam'")

    def _check_double_backward(self, exc: RuntimeError) -> None:
        """A clear error for a gradient that a compiled model's backward refuses to differentiate again
        (``differentiable=True``: ``create_graph=True``); other errors are the caller's to re-raise."""
        if "donated buffers" in str(exc) or "does not currently support double backward" in str(exc):
            raise ValueError(_NO_DOUBLE_BACKWARD.format(method=self.method)) from None

    def _fully_cam_maps(self, layers: list[nn.Module], capture: _Capture, scores: Tensor, images: Tensor,
                        exhaustive: bool = False, depth: int = 1) -> list[Tensor] | None:
        """CGM: one backward from the target scores; FLM's per-layer reduction runs inside tensor hooks.

        Each layer's gradient is reduced to ``M_n = sum_k relu(g) * relu(A)`` the moment autograd
        produces it, so the gradients of all layers are never alive together. Returns None when a
        target layer on the graph was not reached (a cut the hooks could not see, e.g. a no_grad
        stem followed by a trainable BatchNorm that is not a target): the caller runs the call again
        with ``exhaustive``, where the backward also runs to every target layer's output (their
        gradients are then all returned at once: more memory, in those models only).
        """
        keys = [id(m) for m in layers]
        handles = []
        reduce = flm_layer_reducer(self.backend)  # (the backend chosen once, not in each layer's hook)

        def make_hook(key: int):
            def hook(grad: Tensor | None) -> None:
                if grad is None:  # seen with torch.compile'd models: no gradient reached this tensor
                    return
                activation = capture.activations.pop(key, None)
                if activation is not None:
                    capture.maps[key] = reduce(activation, grad)

            return hook

        for key in keys:
            activation = capture.activations[key]
            if activation.requires_grad:
                handles.append(activation.register_hook(make_hook(key)))
        # The backward must reach every target layer, and target layers can lie on parallel branches
        # (two streams; a residual block's conv and its downsample shortcut), so no one of them is
        # an ancestor of all others. It therefore runs down to the input (the engine's own leaf
        # copy of the images): every layer on a path from the images to the score gets its hook, at
        # the price of the first layer's input gradient ([N, C, H, W], usually 3 channels). Where the
        # model cuts the graph (a no_grad stem, a detach), the layers right after each cut are where
        # the graph starts again: the backward also runs down to their outputs (their gradients are
        # returned too, a few tensors), so the branches after the cut get their hooks as well.
        restarts = [key for key in keys if (exhaustive or key in capture.cut_inputs) and key in capture.activations
                    and capture.activations[key].requires_grad]
        sources = ([images] if images.requires_grad else []) + [capture.activations[key] for key in restarts]
        try:
            grads = torch.autograd.grad(scores.sum(), sources, allow_unused=True) if sources else ()
            for key, grad in zip(restarts, grads[len(sources) - len(restarts):]):
                if key not in capture.maps and grad is not None:  # a hook on an input need not fire
                    capture.maps[key] = reduce(capture.activations[key], grad)
            del grads
            if not exhaustive and any(key not in capture.maps and key in capture.activations
                                      and capture.activations[key].requires_grad for key in keys):
                return None
            if not capture.maps:  # no target layer is on the graph at all (a compiled model)
                raise self._off_graph_error(layers)
        finally:
            for handle in handles:
                handle.remove()
        maps = []
        for module, key in zip(layers, keys):
            if key not in capture.maps:
                warnings.warn(
                    f"layer {self.layer_name(module)} received no gradient from the target score; its map is zeros",
                    RuntimeWarning,
                    stacklevel=4 + depth,  # (this, _explain, _call, the entry point; restarts)
                )
                act = capture.activations.get(key)
                shape = act.shape if act is not None else (scores.shape[0], 1, 1, 1)
                maps.append(torch.zeros((shape[0], shape[2], shape[3]), device=scores.device if act is None else act.device))
            else:
                maps.append(capture.maps[key])
        return maps


__all__ = ["CAMEngine", "CAMResult", "GraphedCAM", "METHODS"]
