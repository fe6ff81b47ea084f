"""Thin ``nn.Module`` wrappers over the ops, and model surgery helpers."""

from __future__ import annotations

from torch import Tensor, nn

from ._validation import check_unit_interval
from .ops.tap import tap


class TAP(nn.Module):
    """Thresholded average pooling: a drop-in for ``nn.AdaptiveAvgPool2d(1)`` during training.

    ``Tensor[N, C, H, W] -> Tensor[N, C, 1, 1]`` (``Tensor[N, C]`` with ``flatten=True``).
    See :func:`rethinkcam_fast.tap` for the formula; the CAM itself is still computed from the
    unthresholded feature map.
    """

    def __init__(self, tau: float = 0.1, flatten: bool = False) -> None:
        super().__init__()
        self.tau = check_unit_interval("tau", tau)
        self.flatten = bool(flatten)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # unbatched [C, H, W], as nn.AdaptiveAvgPool2d accepts: [C, 1, 1] (or [C])
            return self.forward(x[None])[0]
        pooled = tap(x, self.tau)
        return pooled if self.flatten else pooled[:, :, None, None]

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


def replace_gap_with_tap(model: nn.Module, tau: float = 0.1) -> nn.Module:
    """Swap every global average pool module of ``model`` for :class:`TAP` in place and return it.

    Recognises ``nn.AdaptiveAvgPool2d(1)`` (torchvision ResNet/VGG-style heads, timm's
    ``SelectAdaptivePool2d(pool_type="avg")``) and timm's ``FastAdaptiveAvgPool``. Pooling written as
    ``x.mean((2, 3))`` inside a ``forward`` is not a module and cannot be swapped.

    Raises:
        ValueError: ``tau`` outside ``[0, 1)``, or the model has no global average pool module.
    """
    tau = check_unit_interval("tau", tau)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    targets = []
    for parent in model.modules():
        for name, child in parent._modules.items():  # every name: one pool registered twice is swapped twice
            flatten = None if child is None else _is_global_avg_pool(child)
            if flatten is not None:
                targets.append((parent, name, flatten))
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no global average pool module "
            "(nn.AdaptiveAvgPool2d(1) or timm FastAdaptiveAvgPool) to replace"
        )
    for parent, name, flatten in targets:
        setattr(parent, name, TAP(tau, flatten=flatten))
    return model


__all__ = ["TAP", "replace_gap_with_tap"]
