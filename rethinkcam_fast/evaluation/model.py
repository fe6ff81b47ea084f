"""Evaluation straight from a model: CAMs from :class:`~rethinkcam_fast.CAMEngine`, accumulated on the
device, no score map written anywhere.

The maps are the ground-truth class's (``engine(images, targets=labels)``), so the box metrics are
GT-known; the model's own top-1 prediction is read from the same forward pass (a hook on the model's
output) and gives Top-1 Loc and Top-1 Cls.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..engine import CAMEngine
from ..folding import TRANSIENT_HOOK
from ..imageio import ImageDecodeError, decoded_image, to_8bit
from ..localize import IMAGENET_MEAN, IMAGENET_STD, load_user_model
from .box_evaluator import BoxEvaluator, BoxMetrics
from .mask_evaluator import MaskEvaluator, MaskMetrics
from .metadata import WSOLMetadata



class WSOLImageDataset(torch.utils.data.Dataset):
    """A metadata split's images as the reference's evaluation transform gives them.

    Each item is ``(image, label, image_id)``: ``image`` is ``Tensor[C, S, S]`` float32 — the file at
    ``<data_root>/<image_id>`` converted to RGB (``channels=3``) or grey (``channels=1``, PIL's ``L``),
    resized to ``S x S`` with PIL's bilinear filter (what torchvision's ``Resize`` does to a PIL image),
    scaled to ``[0, 1]`` and, with ``normalize``, normalised with ``mean`` and ``std`` (one value per
    channel; ImageNet's by default). The default ``DataLoader`` collate batches it.
    """

    def __init__(self, data_root: str, metadata: WSOLMetadata, image_size: int = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, *,
                 channels: int = 3, normalize: bool = True) -> None:
        metadata.require_labels()
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        if normalize and (len(mean) != channels or len(std) != channels):
            raise ValueError(f"normalize needs one mean and one std per channel ({channels}), got {len(mean)} "
                             f"and {len(std)}; pass normalize=False for images in [0, 1]")
        self.data_root = data_root
        self.metadata = metadata
        self.image_size = int(image_size)
        self.channels = channels
        self.normalize = bool(normalize)
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.metadata.image_ids)

    def __getitem__(self, index: int) -> tuple[Tensor, int, str]:
        from PIL import Image

        image_id = self.metadata.image_ids[index]
        path = os.path.join(self.data_root, image_id)
        try:
            image = decoded_image(path)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"image {image_id!r} {exc}: {path}") from None
        except ImageDecodeError as exc:
            raise ValueError(f"image {image_id!r} cannot be read ({path}): {exc}") from None
        mode = "RGB" if self.channels == 3 else "L"
        rgb = to_8bit(image).convert(mode).resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        array = np.array(rgb, dtype=np.uint8)
        pixels = torch.from_numpy(array.reshape(*array.shape[:2], self.channels)).permute(2, 0, 1).float().div(255)
        if self.normalize:
            pixels = (pixels - self.mean) / self.std
        return pixels, self.metadata.class_labels[image_id], image_id


def collate_wsol(items: Sequence[tuple[Tensor, int, Any]]) -> tuple[Tensor, Tensor, list[Any]]:
    """``DataLoader`` collate for ``(image, label, target)`` items whose targets are ragged (e.g. a
    ``LongTensor[k, 4]`` of boxes per image): images stacked, labels a ``LongTensor[N]``, targets a list."""
    images = torch.stack([item[0] for item in items])
    labels = torch.as_tensor([int(item[1]) for item in items], dtype=torch.int64)
    return images, labels, [item[2] for item in items]


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def evaluate_model(
    engine: CAMEngine,
    batches: Iterable,
    evaluator: BoxEvaluator | MaskEvaluator,
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
    distributed: bool | None = None,
) -> BoxMetrics | MaskMetrics:
    """Run ``engine`` over ``batches`` and return the evaluator's metrics.

    Args:
        engine: a :class:`~rethinkcam_fast.CAMEngine` (``boxes=False`` spares the PaS boxes it would
            otherwise cut and this function ignores). Its maps must come out at the evaluation size
            (the images' size unless the engine has ``output_size``).
        batches: an iterable of ``(images[N, C, H, W], labels[N], targets)`` — e.g. a ``DataLoader`` over
            :class:`WSOLImageDataset`. ``targets`` are ``N`` image ids, resolved through the evaluator's
            metadata, or (box evaluation) ``N`` box tensors ``[k, 4]`` in the maps' grid (see
            :func:`collate_wsol`).
        evaluator: accumulates; it keeps whatever it had before.
        device: where images go (default: the model's parameters' device).
        progress: show a progress bar.
        distributed: all-reduce the counters over the default process group before computing
            (default: when one is initialised). Each rank must feed its own shard of the data.
    """
    if not isinstance(engine, CAMEngine):
        raise TypeError(f"engine must be a CAMEngine, got {type(engine).__name__}")
    device = torch.device(device) if device is not None else _model_device(engine.model)
    seen: list[Tensor] = []
    thread = threading.get_ident()

    def keep_logits(_module: nn.Module, _inputs: Any, output: Any) -> None:
        # This thread's forwards only (another thread may run the same model), and the logits as the
        # engine picks them from the model's output (its logits= option).
        if threading.get_ident() != thread:
            return
        try:
            seen[:] = [engine._logits_of(output).detach()]
        except ValueError:
            seen[:] = []

    setattr(keep_logits, TRANSIENT_HOOK, True)  # (this evaluation's own: fold_batchnorm looks past it)
    handle = engine.model.register_forward_hook(keep_logits)
    non_finite, total_images = torch.zeros((), dtype=torch.int64, device=device), 0  # (counted on the device)
    try:
        for images, labels, targets in tqdm(batches, unit="batch", disable=None if progress else True):
            images = images.to(device)
            labels = torch.as_tensor(labels, dtype=torch.int64).to(device)
            result = engine(images, targets=labels)
            if not seen:
                raise ValueError("the model's forward did not return a logits tensor")
            predictions = seen[0].argmax(dim=1)
            non_finite += (~torch.isfinite(seen[0]).all(dim=1)).sum().to(device)
            total_images += len(predictions)
            if all(isinstance(t, str) for t in targets):
                if isinstance(evaluator, BoxEvaluator):
                    evaluator.update(result.cams, image_ids=list(targets), labels=labels, predictions=predictions)
                else:
                    evaluator.update(result.cams, image_ids=list(targets))
            elif isinstance(evaluator, BoxEvaluator):
                evaluator.update(result.cams, list(targets), labels=labels, predictions=predictions)
            else:
                raise TypeError("mask evaluation from a model takes image ids as targets")
    finally:
        handle.remove()
    if int(non_finite):
        warnings.warn(f"{int(non_finite)} of {total_images} images got non-finite logits (NaN or inf: damaged weights, or "
                      "an overflow in the model): their maps are zeros and their predictions meaningless",
                      RuntimeWarning, stacklevel=2)
    total = evaluator.clone()
    if distributed is None:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        total.all_reduce()
    return total.compute()


def load_model(spec: str, checkpoint: str | None = None, *, on_payload=None) -> nn.Module:
    """Build a model from ``MODULE:CALLABLE`` or ``path/to/file.py:CALLABLE`` (called without arguments,
    or an ``nn.Module`` object itself), then load a checkpoint (a plain ``state_dict``, one under a
    ``"state_dict"`` / ``"model"`` key, or a ``rethinkcam train`` checkpoint) with
    ``torch.load(weights_only=True)`` — :func:`rethinkcam_fast.localize.load_user_model`, which
    ``rethinkcam localize`` and ``rethinkcam video`` use too. ``on_payload``: called with the checkpoint as
    read (see :func:`rethinkcam_fast.localize.load_user_model`)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"--model must be MODULE:CALLABLE or FILE.py:CALLABLE, got {spec!r}")
    return load_user_model(spec, checkpoint, on_payload=on_payload)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "WSOLImageDataset", "collate_wsol", "evaluate_model", "load_model"]
