"""Ground-truth masks for PxAP (OpenImages30k layout): PNG files, resized to the score maps' grid.

As the reference: every instance mask and the ignore mask are read as 8-bit grayscale, resized with
OpenCV's ``INTER_NEAREST`` rule and binarised with ``> 0.5`` (any non-zero pixel); the foreground is
the union of the instances, the ignore region is the ignore mask minus the foreground.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..imageio import ImageDecodeError, decoded_image
from .metadata import MetadataError, WSOLMetadata


def nearest_indices(dst: int, src: int) -> np.ndarray:
    """Source index of each of ``dst`` output pixels under OpenCV's ``INTER_NEAREST``.

    OpenCV computes ``floor(x * (1 / (dst / src)))`` in double precision and clamps to ``src - 1``;
    the reciprocal of the ratio (not ``src / dst``) is what it multiplies by, so we do the same.
    """
    step = 1.0 / (dst / src)
    return np.minimum(np.floor(np.arange(dst, dtype=np.float64) * step).astype(np.int64), src - 1)


def resize_nearest(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image[h, w]`` resized to ``size = (height, width)`` exactly like ``cv2.resize(..., INTER_NEAREST)``."""
    rows = nearest_indices(int(size[0]), image.shape[0])
    cols = nearest_indices(int(size[1]), image.shape[1])
    return image[rows[:, None], cols[None, :]]


def read_grayscale(path: str) -> np.ndarray:
    """An image file as a ``uint8 [h, w]`` grayscale array (8-bit PNG masks; colour is converted to luma)."""
    try:
        image = decoded_image(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"mask file {exc}: {path}") from None
    except ImageDecodeError as exc:
        raise ValueError(f"cannot read mask file {path}: {exc}") from None
    return np.asarray(image.convert("L"))


def resolve_mask_root(mask_root: str, dataset_name: str = "OpenImages") -> str:
    """The directory mask paths are relative to.

    The reference joins ``--mask_root`` with the dataset name (``<mask_root>/OpenImages/<path>``); a
    ``mask_root`` that already is that directory is accepted as well.
    """
    nested = os.path.join(mask_root, dataset_name)
    if os.path.isdir(nested):
        return nested
    if os.path.isdir(mask_root):
        return mask_root
    raise FileNotFoundError(f"mask root not found: {mask_root}")


def load_masks(metadata: WSOLMetadata, image_ids: Sequence[str], mask_root: str,
               size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Foreground and ignore masks of ``image_ids`` at ``size = (height, width)``.

    ``mask_root`` is the directory the metadata's mask paths are relative to (see :func:`resolve_mask_root`).

    Returns:
        ``(BoolTensor[N, H, W], BoolTensor[N, H, W])``: foreground (union of the instance masks) and
        ignore region (the ignore mask minus the foreground; all False when the image has none).
    """
    if metadata.mask_paths is None:
        raise MetadataError(f"{metadata.directory}: this split has boxes, not masks")
    height, width = int(size[0]), int(size[1])
    foreground = np.zeros((len(image_ids), height, width), dtype=bool)
    ignore = np.zeros_like(foreground)
    for n, image_id in enumerate(image_ids):
        if image_id not in metadata.mask_paths:
            raise MetadataError(f"image {image_id!r} has no mask in {os.path.join(metadata.directory, 'localization.txt')}")
        for relative in metadata.mask_paths[image_id]:
            foreground[n] |= resize_nearest(read_grayscale(os.path.join(mask_root, relative)), size) > 0
        ignore_path = metadata.ignore_paths.get(image_id)
        if ignore_path:
            ignore[n] = (resize_nearest(read_grayscale(os.path.join(mask_root, ignore_path)), size) > 0) & ~foreground[n]
    return torch.from_numpy(foreground), torch.from_numpy(ignore)


__all__ = ["load_masks", "nearest_indices", "read_grayscale", "resize_nearest", "resolve_mask_root"]
