"""Reading images with clear errors, and drawing CAM overlays (heatmap, predicted box, GT box) into a PNG grid.

Pillow does the file work; the heatmap colouring and box drawing are a few numpy lines.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

PRED_COLOR = (0, 255, 0)  # predicted box: green
GT_COLOR = (255, 0, 255)  # ground-truth box: magenta


class ImageReadError(ValueError):
    """An image file that is missing or cannot be decoded."""


class ImageDecodeError(ValueError):
    """A file that Pillow cannot decode (or refuses to: a header claiming a decompression bomb)."""


def decoded_image(path: str):
    """``path`` opened and decoded by Pillow (a loaded ``PIL.Image``), for every reader of the package.

    Raises:
        FileNotFoundError: no such file, or not a regular file (a directory; a named pipe, which
            would block the reader forever); its message is which: ``"not found"`` or ``"is not a
            regular file"``, for the caller's sentence.
        ImageDecodeError: not a decodable image (truncated or corrupt; a header whose size Pillow
            refuses as a decompression bomb), with Pillow's reason.
    """
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError("is not a regular file" if os.path.exists(path) else "not found")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()  # (closing the file closes the image too)
    except FileNotFoundError:
        raise
    # (Pillow raises SyntaxError for a corrupt PNG chunk, ValueError for a bad PPM header, and its
    # DecompressionBombError, which is neither an OSError nor a ValueError, for huge headers)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{type(exc).__name__}: {exc}") from None


def to_8bit(image):
    """A PIL image with 16-bit or 32-bit integer pixels (``I;16*``, ``I``) rescaled to 8 bits (``L``):
    Pillow's own ``convert("L")`` clips those values at 255, which turns most of a 16-bit image white.
    32-bit float pixels (``F``) in ``[0, 1]`` are scaled by 255 (``convert`` would make them black),
    others clipped to ``[0, 255]``. Other images are returned as they are."""
    from PIL import Image

    if image.mode == "F":
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if pixels.max(initial=0.0) <= 1.0:
            pixels = pixels * 255.0
        return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), mode="L")
    if image.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8), mode="L")
    if image.mode == "I":
        pixels = np.asarray(image, dtype=np.int64)
        top = 65535 if pixels.max(initial=0) <= 65535 else int(pixels.max())
        return Image.fromarray((np.clip(pixels, 0, None) * 255 // max(top, 1)).astype(np.uint8), mode="L")
    return image


def read_image(path: str, channels: int = 3) -> Tensor:
    """Decode ``path`` to ``ByteTensor[channels, H, W]`` (``channels`` 1: grey, 3: RGB).

    Raises:
        ImageReadError: the file is missing, not a file, or not a decodable image.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if os.path.isdir(path):
        raise ImageReadError(f"{path}: is a directory; give image files (e.g. {os.path.join(path, '*.png')})")
    try:
        image = decoded_image(path)
    except FileNotFoundError as exc:
        raise ImageReadError(f"{path}: image {exc}") from None
    except ImageDecodeError as exc:
        raise ImageReadError(f"{path}: not a readable image ({exc})") from None
    pixels = np.array(to_8bit(image).convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def heatmap_colors(cam: np.ndarray) -> np.ndarray:
    """A jet-like colour map: ``float[H, W]`` in ``[0, 1]`` -> ``uint8[H, W, 3]`` (blue -> red)."""
    x = np.clip(cam, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255).astype(np.uint8)


def draw_box(canvas: np.ndarray, box: Sequence[int], color: tuple[int, int, int], scale: int = 1) -> None:
    """Draw the outline of inclusive box ``x0, y0, x1, y1`` (image pixels) on ``uint8[H*scale, W*scale, 3]``."""
    h, w = canvas.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, y0 = max(0, x0 * scale), max(0, y0 * scale)
    x1, y1 = min(w - 1, (x1 + 1) * scale - 1), min(h - 1, (y1 + 1) * scale - 1)
    if x1 < x0 or y1 < y0:
        return
    canvas[y0, x0 : x1 + 1] = canvas[y1, x0 : x1 + 1] = color
    canvas[y0 : y1 + 1, x0] = canvas[y0 : y1 + 1, x1] = color


def overlay_tile(image: Tensor, cam: Tensor, box: Sequence[int], gt_box: Sequence[int] | None = None,
                 scale: int = 1, alpha: float = 0.5) -> np.ndarray:
    """One panel ``uint8[H*scale, W*scale, 3]``: image blended with the heatmap, predicted and GT boxes.

    Args:
        image: ``ByteTensor[C, H, W]`` (C = 1 or 3). cam: ``Tensor[H, W]`` in ``[0, 1]``.
    """
    pixels = image.expand(3, -1, -1).permute(1, 2, 0).numpy().astype(np.float32)
    blended = (1 - alpha) * pixels + alpha * heatmap_colors(cam.float().cpu().numpy()).astype(np.float32)
    tile = np.repeat(np.repeat(blended.round().astype(np.uint8), scale, axis=0), scale, axis=1)
    if gt_box is not None:
        draw_box(tile, gt_box, GT_COLOR, scale)
    draw_box(tile, box, PRED_COLOR, scale)
    return tile


def save_grid(path: str, tiles: Sequence[np.ndarray], captions: Sequence[str], columns: int = 4) -> None:
    """Lay ``tiles`` (equal-sized ``uint8[h, w, 3]``) out in a grid with a caption under each; save as PNG."""
    from PIL import Image, ImageDraw

    if not tiles:
        raise ValueError("no tiles to draw")
    h, w = tiles[0].shape[:2]
    caption_h, pad = 14, 4
    columns = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + caption_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (tile, caption) in enumerate(zip(tiles, captions)):
        x = pad + (i % columns) * (w + pad)
        y = pad + (i // columns) * (h + caption_h + pad)
        grid.paste(Image.fromarray(tile), (x, y))
        draw.text((x, y + h + 1), caption, fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)


__all__ = ["GT_COLOR", "ImageDecodeError", "ImageReadError", "PRED_COLOR", "decoded_image", "draw_box", "heatmap_colors",
           "overlay_tile", "read_image", "save_grid"]
