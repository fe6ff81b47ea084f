"""Thin ``nn.Module`` wrappers over the ops, and model surgery helpers."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ._validation import check_flag, check_unit_interval
from .ops.tap import tap


class TAP(nn.Module):
    """Thresholded average pooling: a drop-in for ``nn.AdaptiveAvgPool2d(1)`` during training.

    ``Tensor[N, C, H, W] -> Tensor[N, C, 1, 1]`` (``Tensor[N, C]`` with ``flatten=True``); an unbatched
    ``Tensor[C, H, W]`` gives ``[C, 1, 1]`` (``[C]``). See :func:`rethinkcam_fast.tap` for the formula;
    the CAM itself is still computed from the unthresholded feature map. TAP has no train/eval
    difference: it thresholds in ``eval()`` mode too (that is the function the classifier was trained on).

    ``tau`` and ``flatten`` are part of ``state_dict()`` (entry ``<name>._extra_state``, a float64
    tensor ``[tau, flatten]``), so they travel with the weights: loading restores them, and loading a
    TAP model's state dict into a model with a plain pool fails with an unexpected key. A state dict
    saved before this entry existed (without it) still loads, strictly too, as BatchNorm loads files
    older than its ``num_batches_tracked``: the module keeps the ``tau`` it was built with. A
    ``torch.jit.script``-ed TAP keeps ``tau`` as a constant of the scripted code, not in its
    ``state_dict()``.

    ``torch.jit.script`` works (the scripted module calls the registered op
    ``torch.ops.rethinkcam_fast.tap_forward``, with autograd); so do ``torch.compile``, ``torch.export``
    and ``torch.jit.trace``.
    """

    def __init__(self, tau: float = 0.1, flatten: bool = False) -> None:
        super().__init__()
        self.tau = tau
        self.flatten = check_flag("flatten", flatten)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "tau":  # checked when set (a schedule assigning it too), not at the next forward
            value = check_unit_interval("tau", value)
        super().__setattr__(name, value)

    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == 3  # [C, H, W], as nn.AdaptiveAvgPool2d accepts
        batch = x.unsqueeze(0) if unbatched else x
        if torch.jit.is_scripting():  # TorchScript cannot compile tap()'s Python checks; the op itself it can
            if batch.dim() != 4:
                raise ValueError("TAP: x must be a 3-D or 4-D tensor")
            pooled = torch.ops.rethinkcam_fast.tap_forward(batch, self.tau, "auto")[0]
        else:
            if batch.dim() != 4:  # (tap() would say "4-D": the module takes an unbatched map too)
                raise ValueError(f"TAP: x must be a 3-D [C, H, W] or 4-D [N, C, H, W] tensor, got shape {tuple(x.shape)}")
            pooled = tap(batch, self.tau)
        if not self.flatten:
            pooled = pooled[:, :, None, None]
        return pooled[0] if unbatched else pooled

    def get_extra_state(self) -> Tensor:
        # A tensor, not a dict: checkpoints hold tensors only (read with weights_only=True, see models.py).
        return torch.tensor([self.tau, float(self.flatten)], dtype=torch.float64)

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, Tensor) or tuple(state.shape) != (2,):
            shape = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
            raise ValueError(f"TAP extra state must be a tensor [tau, flatten] of shape (2,), got {shape}")
        tau, flatten = (float(v) for v in state.detach().to("cpu", torch.float64))
        if flatten not in (0.0, 1.0):
            raise ValueError(f"TAP extra state: flatten must be 0 or 1, got {flatten}")
        self.tau = check_unit_interval("tau (TAP extra state)", tau)  # (named for the error; set checks again)
        self.flatten = flatten == 1.0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "_extra_state"
        if key in missing_keys:  # a state dict from before TAP recorded tau: the module keeps its own
            missing_keys.remove(key)

    def extra_repr(self) -> str:
        return f"tau={self.tau}" + (", flatten=True" if self.flatten else "")


def _is_global_avg_pool(module: nn.Module) -> bool | None:
    """``None`` if not a global average pool; else whether it flattens its output to ``[N, C]``."""
    if isinstance(module, nn.AdaptiveAvgPool2d):
        size = module.output_size
        return False if size in (1, (1, 1), [1, 1]) else None
    # timm's FastAdaptiveAvgPool: x.mean(dim, keepdim=not flatten), NCHW when dim == (2, 3).
    if type(module).__name__ == "FastAdaptiveAvgPool" and tuple(getattr(module, "dim", (2, 3))) == (2, 3):
        return bool(getattr(module, "flatten", False))
    return None


# Words of a class name, split at underscores and CamelCase boundaries (acronyms kept whole):
# "EffectiveSEModule" -> effective, se, module; "eca_layer" -> eca, layer; "_SE" -> se.
_NAME_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
# Channel-attention blocks whose pooled vector gates (rescales) the block's own input.
_ATTENTION_WORDS = frozenset({"se", "ese", "eca", "squeeze", "excite", "excitation", "attention", "attn",
                              "gate", "gating", "cbam"})


def is_channel_attention_block(module: nn.Module) -> bool:
    """Whether ``module``'s class name marks a squeeze-and-excitation / channel-attention block, whose
    global average pool feeds an attention that rescales the block's input (not a classifier head).

    The rule: a word of the class name (split at ``_`` and CamelCase) is one of ``se``, ``ese``, ``eca``,
    ``squeeze``, ``excite``, ``excitation``, ``attention``, ``attn``, ``gate``, ``gating``, ``cbam``
    (torchvision ``SqueezeExcitation``, timm ``SqueezeExcite`` / ``SEModule`` / ``EffectiveSEModule`` /
    ``EcaModule``, ``SELayer``, CBAM's ``ChannelAttention`` / ``ChannelGate``), unless the name contains
    ``net`` (a whole network such as ``SENet`` or ``SqueezeNet``, whose pool is the head's) or the module
    holds more than four convolutions and linear layers (an attention block holds two or three; a
    network, e.g. an ``AttentionCNN`` inside a wrapper, holds its whole backbone).
    """
    name = type(module).__name__
    if "net" in name.lower() or not any(word.lower() in _ATTENTION_WORDS for word in _NAME_WORDS.findall(name)):
        return False
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules()) <= 4


def replace_gap_with_tap(model: nn.Module, tau: float = 0.1, *, names: Iterable[str] | None = None) -> nn.Module:
    """Swap the global average pools of ``model`` for :class:`TAP` in place and return ``model``.

    Recognised pools: ``nn.AdaptiveAvgPool2d(1)`` (torchvision ResNet / MobileNet / EfficientNet / RegNet
    heads, timm's ``SelectAdaptivePool2d(pool_type="avg")``) and timm's ``FastAdaptiveAvgPool``.
    Not recognised (they are not modules, or not global for every input size): pooling written in a
    ``forward`` (``x.mean((2, 3))``, ``F.adaptive_avg_pool2d``, e.g. torchvision MobileNetV2), a
    fixed-window ``nn.AvgPool2d(k)`` head, and ``nn.AdaptiveAvgPool2d((7, 7))`` (torchvision VGG: not
    a global pool). Replace such a pool with ``nn.AdaptiveAvgPool2d(1)`` first.

    By default every recognised pool is swapped except those whose parent module (not the model
    itself: a classifier named ``AttentionCNN`` keeps its head pool) is a
    squeeze-and-excitation / channel-attention block (:func:`is_channel_attention_block`: torchvision's
    ``SqueezeExcitation`` in MobileNetV3, EfficientNet and RegNetY, ...): there the pooled vector drives
    an attention that rescales the features, and TAP would change that attention, not the classifier's
    pooling. ``names`` (module names as ``model.named_modules()`` gives them, e.g. ``["avgpool"]``)
    swaps exactly those pools instead, attention blocks included. To see what was swapped:
    ``[n for n, m in model.named_modules() if isinstance(m, rcf.TAP)]``.

    Raises:
        ValueError: ``tau`` outside ``[0, 1)``; no recognised pool outside attention blocks (the message
            lists those skipped); a name in ``names`` that is not in ``model`` or not a recognised global
            average pool, or an empty ``names``.
        TypeError: ``model`` not an ``nn.Module``; ``names`` a string or not an iterable of strings.
    """
    tau = check_unit_interval("tau", tau)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if names is not None:
        targets = _named_targets(model, names)
    else:
        targets, skipped = [], []
        for parent_name, parent in model.named_modules():
            for name, child in parent._modules.items():  # every name: one pool registered twice is swapped twice
                flatten = None if child is None else _is_global_avg_pool(child)
                if flatten is None:
                    continue
                if parent_name and is_channel_attention_block(parent):  # (never the model itself: AttentionCNN)
                    skipped.append(f"{parent_name}.{name}")
                else:
                    targets.append((parent, name, flatten))
        if not targets:
            fixed_window = [n for n, m in model.named_modules() if isinstance(m, nn.AvgPool2d)]
            found = (f"; {', '.join(fixed_window[:3])} {'is an' if len(fixed_window) == 1 else 'are'} "
                     "nn.AvgPool2d (a fixed window: global at one input size only)" if fixed_window else "")
            hint = (f"; skipped {len(skipped)} inside squeeze-and-excitation / channel-attention blocks "
                    f"({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}): pass names=[...] to swap "
                    "a pool explicitly" if skipped else "")
            raise ValueError(
                f"{type(model).__name__} has no global average pool module (nn.AdaptiveAvgPool2d(1) or timm "
                f"FastAdaptiveAvgPool) to replace{hint}{found}; a fixed-window nn.AvgPool2d(k) head or pooling written "
                "in forward (x.mean((2, 3)), F.adaptive_avg_pool2d) must become nn.AdaptiveAvgPool2d(1) first"
            )
    for parent, name, flatten in targets:
        setattr(parent, name, TAP(tau, flatten=flatten))
    return model


def _named_targets(model: nn.Module, names: Iterable[str]) -> list[tuple[nn.Module, str, bool]]:
    """``(parent, attribute, flatten)`` for each name of ``names``, checked before anything is swapped."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise TypeError(f"names must be an iterable of module names (e.g. ['avgpool']), got {names!r}")
    names = list(names)
    if not names:
        raise ValueError("names is empty: give the module names of the pools to swap, or names=None for all")
    targets = []
    for full_name in names:
        if not isinstance(full_name, str):
            raise TypeError(f"names must hold module names (str), got {full_name!r}")
        if full_name == "":
            raise ValueError("names: '' is the model itself, not a pool inside it")
        parent_name, _, name = full_name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            parent = None
        child = parent._modules.get(name) if parent is not None else None
        if child is None:
            raise ValueError(f"names: {type(model).__name__} has no module {full_name!r}")
        flatten = _is_global_avg_pool(child)
        if flatten is None:
            raise ValueError(f"names: {full_name!r} is {child!r}, not a global average pool "
                             "(nn.AdaptiveAvgPool2d(1) or timm FastAdaptiveAvgPool)")
        targets.append((parent, name, flatten))
    return targets


__all__ = ["TAP", "is_channel_attention_block", "replace_gap_with_tap"]
