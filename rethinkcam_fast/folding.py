"""Batch-norm folding for inference: ``conv -> BatchNorm2d(eval)`` becomes one convolution.

In eval mode a batch norm is an affine map per channel, ``y = (x - mean) / sqrt(var + eps) * gamma +
beta``, so a convolution whose output feeds only that batch norm can absorb it: its weights scaled by
``gamma / sqrt(var + eps)`` per output channel, its bias shifted. The network computes the same
function (up to float rounding) with one kernel fewer per layer. On the H100 the video path's batch-1
frame spent 0.54 of 1.26 ms of GPU time in cuDNN's 53 batch-norm kernels of a ResNet50 (README, GPU);
batched, a batch norm is a memory-bound pass over each activation.

A CAM needs some layers' outputs exactly as the model computes them (the target layers, whose
activations and gradients make the map), so :func:`fold_batchnorm` keeps the modules it is told to keep
as modules: each is traced on its own (its inside folded too, since its output is all a CAM sees) and
called from the folded model, so forward hooks on it still fire with the same output. Fully-CAM's
targets are the convolutions themselves: nothing before their batch norm can fold, and nothing does.

The folded model is a copy (``torch.fx`` traced): the caller's model, its parameters and their
``requires_grad`` are untouched, and later updates to the caller's weights do not reach the copy.
Tracing records tensor operations only, so inside the modules it traces through (those that hold a
batch norm, kept ones included) a ``torch.no_grad()`` or ``torch.autocast`` block is not kept
and a branch on ``self.training`` is fixed at the mode the model is in: run such a model unfolded. Hooks cannot be carried into a traced copy either (a forward hook would run
once, on the tracer's proxies), so a model with hooks is refused.
"""

from __future__ import annotations

import copy
import threading
from collections import Counter
from collections.abc import Iterable

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .ops.tap import _memory_format


class _KeepTracer(fx.Tracer):
    """Traces through the modules that hold a batch norm, except the ``keep`` ones (by identity): the
    others (PyTorch's own layers, and e.g. a TAP pool or an attention head whose forward branches on
    values) are called as they are, since nothing inside them can fold.

    While it traces, torch.fx patches ``nn.Module.__call__`` and ``__getattr__`` for the whole process:
    a module called from another thread (a service's other requests, another engine on the same model)
    would land in this trace. Calls from any thread but the tracing one run as they are."""

    def __init__(self, keep: set[int]) -> None:
        super().__init__()
        self.keep = keep
        self.thread = threading.get_ident()

    def call_module(self, m, forward, args, kwargs):
        if threading.get_ident() != self.thread:
            return forward(*args, **kwargs)  # (fx's forward here: the original nn.Module.__call__)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self.thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (id(module) in self.keep or super().is_leaf_module(module, qualified_name)
                or not any(isinstance(m, nn.BatchNorm2d) for m in module.modules()))


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    # (exactly nn.Conv2d: a parametrized conv, whose weight is computed rather than stored, has its own
    # class, ParametrizedConv2d)
    return (type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and not bn.training
            and bn.track_running_stats and bn.running_mean is not None and bn.num_features == conv.out_channels)


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# Marks the hooks a CAMEngine call registers for its own duration (engine.py): another thread's call may
# hold some while a model is folded; they are not the model's, so they neither stop the folding nor go
# into the copy (where they would run on the tracer's proxies and feed the other call's capture).
TRANSIENT_HOOK = "_rethinkcam_transient_hook"


def _own_hooks(module: nn.Module, attr: str) -> list:
    hooks = list(getattr(module, attr, {}).values())  # (one C call: atomic against other threads' hooks)
    return [h for h in hooks if not getattr(h, TRANSIENT_HOOK, False)]


def _drop_transient_hooks(model: nn.Module) -> None:
    for m in model.modules():
        for attr in _HOOKS:
            hooks = getattr(m, attr, None)
            if hooks:
                for key in [k for k, h in hooks.items() if getattr(h, TRANSIENT_HOOK, False)]:
                    del hooks[key]


def _copy_without_transient_hooks(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without the engine calls' transient hooks. Another thread's call may add
    or remove its hooks while the copy walks the hook dicts ("OrderedDict mutated during iteration"):
    the copy is then made again."""
    for attempt in range(20):
        try:
            twin = copy.deepcopy(model)
            break
        except RuntimeError as exc:
            if "mutated during iteration" not in str(exc) or attempt == 19:
                raise
    _drop_transient_hooks(twin)
    return twin


def _check_no_hooks(model: nn.Module) -> None:
    """Refuse a model with module hooks (or global ones): a traced copy cannot keep them."""
    hooked = [name or type(model).__name__ for name, m in model.named_modules()
              if any(_own_hooks(m, attr) for attr in _HOOKS)]
    if hooked:
        raise ValueError(f"fold_batchnorm: {hooked[:5]} {'have' if len(hooked) > 1 else 'has'} hooks, which a traced "
                         "copy cannot keep (remove them, e.g. detach a CAM tool, or run the model unfolded)")
    global_hooks = [name for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                      "_global_backward_hooks", "_global_backward_pre_hooks")
                    if getattr(nn.modules.module, name, None)]
    if global_hooks:
        raise ValueError("fold_batchnorm: global module hooks are installed (nn.modules.module.register_module_*_hook), "
                         "which would run on the tracer's proxies: remove them or run the model unfolded")


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A copy of ``conv`` computing ``bn(conv(x))``: the arithmetic in float64 (``fuse_conv_bn_weights``),
    then the conv's own dtype, device, memory format and ``requires_grad``."""
    weight = conv.weight

    def double(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().double()

    fused_weight, fused_bias = fuse_conv_bn_weights(double(weight), double(conv.bias), double(bn.running_mean),
                                                    double(bn.running_var), bn.eps, double(bn.weight), double(bn.bias))
    folded = copy.deepcopy(conv)
    folded.weight = nn.Parameter(fused_weight.to(weight.dtype).contiguous(memory_format=_memory_format(weight)),
                                 requires_grad=weight.requires_grad)
    folded.bias = nn.Parameter(fused_bias.to(weight.dtype), requires_grad=weight.requires_grad)
    return folded


def _fold_graph(module: fx.GraphModule, keep: set[int]) -> int:
    """Folds, in place in the traced copy ``module``, every ``conv -> bn`` pair of call nodes where the
    conv's output has no other user and neither module is called anywhere else nor kept; returns how
    many folded."""
    calls = Counter(node.target for node in module.graph.nodes if node.op == "call_module")
    folded = 0
    for node in list(module.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        if calls[node.target] != 1 or calls[source.target] != 1:
            continue
        conv, bn = module.get_submodule(source.target), module.get_submodule(node.target)
        if id(conv) in keep or id(bn) in keep or not _foldable(conv, bn):
            continue
        parent, _, name = source.target.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, name, _folded_conv(conv, bn))
        node.replace_all_uses_with(source)
        module.graph.erase_node(node)
        folded += 1
    if folded:
        module.graph.lint()
        module.delete_all_unused_submodules()
        module.recompile()
    return folded


def fold_batchnorm(model: nn.Module, keep: nn.Module | str | Iterable[nn.Module | str] = ()) -> nn.Module:
    """A copy of ``model`` with every eval-mode ``BatchNorm2d`` folded into the ``Conv2d`` before it.

    Args:
        model: the network (traced with ``torch.fx``: its forward must not branch on tensor values).
            A batch norm in training mode, without running statistics, after something else than a
            convolution, or after a convolution whose output is also used elsewhere, stays as it is.
        keep: a module of ``model`` (or its name), or several, that must stay modules with the outputs the model
            gives them, e.g. a CAM's target layers, so that hooks on them see what they saw: each is
            folded on its own and stays under its name (``folded.get_submodule(name)``). A kept
            convolution is not folded with the batch norm after it. Keep the layers a CAM explains and
            give them to the engine as ``target_layers``: other modules that hold a batch norm are
            inlined into the copy's graph, so a default target found on the copy can differ.
    Returns:
        The folded copy (an ``fx.GraphModule``, or a copy of ``model`` when nothing folds), in
        ``model``'s training mode, with the same submodule names for every module it still calls.
    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a ``keep`` entry is not a submodule of ``model`` or is not called by its forward,
            the model has hooks, or it cannot be traced (the tracer's message is included).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(keep, (nn.Module, str)):  # one entry (a string is not a list of its letters)
        keep = [keep]
    _check_no_hooks(model)
    names = {id(m): name for name, m in model.named_modules()}
    kept_names = []
    for entry in keep:
        if isinstance(entry, str):
            try:
                model.get_submodule(entry)
            except AttributeError:
                raise ValueError(f"keep: {entry!r} is not a submodule of {type(model).__name__}") from None
            kept_names.append(entry)
        elif isinstance(entry, nn.Module) and id(entry) in names:
            kept_names.append(names[id(entry)])
        else:
            raise ValueError(f"keep: {type(entry).__name__} is not a submodule of {type(model).__name__}")
    if "" in kept_names:  # keeping the whole model: nothing may change
        return _copy_without_transient_hooks(model)
    # The copy first: a traced GraphModule shares its submodules with the traced root, and folding
    # replaces some of them.
    twin = _copy_without_transient_hooks(model)
    kept = {id(twin.get_submodule(name)): name for name in kept_names}
    folded = _trace_and_fold(twin, set(kept), type(model).__name__)
    # Each kept module: folded on its own (what a hook on it sees is its output, unchanged), and put
    # back under its name. Nested kept modules stay inside their outermost kept ancestor.
    for name in sorted(set(kept.values()), key=len):
        if any(name.startswith(other + ".") for other in kept.values() if other != name):
            continue
        try:
            inner = folded.get_submodule(name)
        except AttributeError:  # (a traced copy holds only the modules its forward calls)
            inner = None
        if type(inner) is not type(twin.get_submodule(name)):  # absent, or only its parameters read
            raise ValueError(f"keep: {name!r} is not called as a module by {type(model).__name__}'s forward "
                             "(a traced copy keeps only the modules its forward calls)")
        inner_keep = {id(inner.get_submodule(n[len(name) + 1:])) for n in kept.values() if n.startswith(name + ".")}
        if inner_keep or not any(isinstance(m, nn.BatchNorm2d) for m in inner.modules()):
            continue
        replacement = _trace_and_fold(inner, set(), f"{type(model).__name__}.{name}", whole_if_untraceable=True)
        parent, _, attr = name.rpartition(".")
        setattr(folded.get_submodule(parent) if parent else folded, attr, replacement)
    return folded


# One fx trace at a time in the process: each patches nn.Module.__call__ process-wide, and two at once
# would route each other's calls and restore the patches out of order.
_TRACE_LOCK = threading.Lock()


def _trace_and_fold(module: nn.Module, keep: set[int], what: str, whole_if_untraceable: bool = False) -> nn.Module:
    """``module`` traced (``keep`` as leaves) and folded; ``module`` itself when nothing folds (or, with
    ``whole_if_untraceable``, when it cannot be traced: a kept module is then run as it is)."""
    tracer = _KeepTracer(keep)
    try:
        with _TRACE_LOCK:
            graph = tracer.trace(module)
    except Exception as exc:  # noqa: BLE001 - fx raises many types; the message names the cause
        if whole_if_untraceable:
            return module
        raise ValueError(f"fold_batchnorm cannot trace {what} with torch.fx ({type(exc).__name__}: {exc}); "
                         "run it unfolded") from exc
    traced = fx.GraphModule(tracer.root, graph, type(module).__name__)
    traced.training = module.training  # (the root's flag only: each submodule keeps its own mode)
    if not _fold_graph(traced, keep):
        return module
    return traced
