"""Metadata of the standard WSOL layout (wsolevaluation): ``<metadata_root>/<dataset>/<split>/*.txt``.

Files of one split (one record per line, comma separated, no header):

* ``image_ids.txt``: ``path`` — the split's images, in evaluation order.
* ``class_labels.txt``: ``path,label``.
* ``image_sizes.txt``: ``path,width,height`` of the original image.
* ``localization.txt``: ``path,x0,y0,x1,y1`` per ground-truth box (several lines per image allowed;
  inclusive pixel coordinates of the original image: integers, or decimals (an extension: the
  reference reads ``int()``); a box starting outside its image is an error) — or, for masks (OpenImages),
  ``path,mask.png,ignore.png`` per instance mask, the ignore mask on the image's first line only.

Every malformed line raises :class:`MetadataError` naming ``file:line``; empty lines are skipped.
GT boxes are scaled to the evaluation size exactly like the reference: ``int(x * new_w / w)`` in
float64 (truncation), per coordinate.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

DATASETS = ("CUB", "ILSVRC", "OpenImages")
MASK_DATASETS = ("OpenImages",)


class MetadataError(ValueError):
    """A metadata file is missing, malformed or inconsistent; the message names ``file:line``."""


# Numbers in metadata beyond this are not sizes, labels or pixel coordinates of any image (and would
# overflow the int64 tables or the label tensors later, far from the line that holds them).
_LARGEST = 2**31 - 1


def _shown(text: str, limit: int = 120) -> str:
    """``repr(text)``, cut to ``limit`` characters (an error echoes one line of a file, not a megabyte)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text):,} characters)"


def _lines(path: str) -> list[str]:
    """The lines of a metadata file, read as UTF-8 whatever the locale (a byte-order mark, as Notepad
    writes, is not part of an id)."""
    if not os.path.isfile(path):
        raise MetadataError(f"{path}: metadata file not found")
    try:
        with open(path, encoding="utf-8-sig") as fh:
            return fh.read().splitlines()
    except UnicodeDecodeError as exc:
        raise MetadataError(f"{path}: not UTF-8 text ({exc})") from None


def _records(path: str, fields: int, layout: str) -> Iterator[tuple[int, list[str]]]:
    """``(line_number, fields)`` of every non-empty line of ``path``; exactly ``fields`` comma-separated fields."""
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        parts = line.split(",")
        if len(parts) != fields or not parts[0]:
            raise MetadataError(f"{path}:{number}: expected {layout!r}, got {_shown(line)}")
        yield number, parts


def _once(seen: dict[str, int], path: str, number: int, image_id: str) -> None:
    """A per-image file lists each image once (a second line would silently replace the first)."""
    if image_id in seen:
        raise MetadataError(f"{path}:{number}: image {_shown(image_id)} already listed on line {seen[image_id]}")
    seen[image_id] = number


def _parse_coordinate(path: str, number: int, text: str, what: str) -> float:
    """A box coordinate: an integer or a decimal (an extension: the reference's loader reads ``int()``,
    its resizing ``float()``)."""
    try:
        value = float(text)
    except ValueError:
        raise MetadataError(f"{path}:{number}: {what} must be a number, got {_shown(text)}") from None
    if not np.isfinite(value):
        raise MetadataError(f"{path}:{number}: {what} must be finite, got {_shown(text)}")
    if abs(value) > _LARGEST:
        raise MetadataError(f"{path}:{number}: {what} {_shown(text)} is not a pixel coordinate (beyond 2**31)")
    return value


def _parse_int(path: str, number: int, text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise MetadataError(f"{path}:{number}: {what} must be an integer, got {_shown(text)}") from None
    if abs(value) > _LARGEST:
        raise MetadataError(f"{path}:{number}: {what} {_shown(text)} is out of range (beyond 2**31)")
    return value


@dataclass(frozen=True)
class WSOLMetadata:
    """One split's metadata.

    Attributes:
        directory: the split's directory (``<metadata_root>/<dataset>/<split>``).
        image_ids: the split's image ids, in file order.
        localization: ``"boxes"`` or ``"masks"``.
        class_labels: ``{image_id: label}`` (``None`` when ``class_labels.txt`` is absent).
        image_sizes: ``{image_id: (width, height)}`` (``None`` when ``image_sizes.txt`` is absent; boxes need it).
        boxes: ``{image_id: int64 array [k, 4]}`` original-image boxes ``(x0, y0, x1, y1)``, for ``"boxes"``.
        boxes_past_image: images with a box that ends past the image (warned about when read, naming
            the line; scored as they are, as the reference scores them).
        labels_error: why ``class_labels.txt`` did not parse, raised where labels are needed (the box
            metrics do not read it).
        mask_paths: ``{image_id: (mask, ...)}`` paths relative to the mask root, for ``"masks"``.
        ignore_paths: ``{image_id: path or None}``, for ``"masks"``.
    """

    directory: str
    image_ids: tuple[str, ...]
    localization: str
    class_labels: dict[str, int] | None = None
    image_sizes: dict[str, tuple[int, int]] | None = None
    boxes: dict[str, np.ndarray] | None = None
    mask_paths: dict[str, tuple[str, ...]] | None = None
    ignore_paths: dict[str, str | None] | None = None
    boxes_past_image: frozenset[str] = frozenset()
    labels_error: str | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.image_ids)

    def fingerprint(self) -> str:
        """A short hash of the split's image ids (in order): resumed runs check it."""
        digest = hashlib.sha1("\n".join(self.image_ids).encode("utf-8"))
        return digest.hexdigest()[:16]

    def labels_of(self, image_ids: Sequence[str]) -> Tensor:
        """``LongTensor[N]``: the class labels of ``image_ids``."""
        self.require_labels(image_ids)
        return torch.tensor([self.class_labels[i] for i in _known(self, image_ids)], dtype=torch.int64)

    def require_labels(self, image_ids: Sequence[str] | None = None) -> None:
        """A ``MetadataError`` unless ``class_labels.txt`` gives a label to each of ``image_ids`` (all the
        split's by default): read when present, it is needed only where labels are (Top-1 Loc)."""
        if self.labels_error is not None:  # a class_labels.txt the box metrics never needed to parse
            raise MetadataError(self.labels_error)
        _require(self.class_labels, self.image_ids if image_ids is None else image_ids,
                 os.path.join(self.directory, "class_labels.txt"), "class label")

    def resized_boxes(self, image_ids: Sequence[str], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """GT boxes of ``image_ids`` scaled to a ``size = (height, width)`` evaluation grid.

        Returns:
            ``(LongTensor[G, 4], LongTensor[N + 1])``: the boxes ``(x0, y0, x1, y1)``, and offsets such
            that image ``n``'s boxes are ``boxes[offsets[n]:offsets[n + 1]]``.
        """
        if self.boxes is None:
            raise MetadataError(f"{self.directory}: this split has masks, not boxes")
        table, starts, counts = self._resized_table((int(size[0]), int(size[1])))
        rows = [self._row[i] for i in _known(self, image_ids)]
        picked = [np.arange(starts[r], starts[r] + counts[r]) for r in rows]
        index = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts[rows], dtype=np.int64)]) if rows else np.zeros(1, np.int64)
        return torch.from_numpy(table[index]), torch.from_numpy(offsets.astype(np.int64))

    @property
    def _row(self) -> dict[str, int]:
        if "row" not in self._cache:
            self._cache["row"] = {image_id: n for n, image_id in enumerate(self.image_ids)}
        return self._cache["row"]

    def _resized_table(self, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every box of the split scaled to ``size`` at once (cached for the last few sizes: a split's
        table is megabytes at ImageNet scale, and a run uses one size)."""
        tables = self._cache.setdefault("resized", {})
        if size not in tables:
            if len(tables) >= 4:
                tables.clear()
            boxes = [self.boxes[i] for i in self.image_ids]
            counts = np.array([len(b) for b in boxes], dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            original = np.concatenate(boxes).astype(np.float64)
            wh = np.repeat(np.array([self.image_sizes[i] for i in self.image_ids], dtype=np.float64), counts, axis=0)
            new_h, new_w = float(size[0]), float(size[1])
            scaled = np.empty_like(original)
            # x * new / old in float64, then int() truncation (all values are >= 0), as resize_bbox does.
            scaled[:, 0::2] = original[:, 0::2] * new_w / wh[:, 0:1]
            scaled[:, 1::2] = original[:, 1::2] * new_h / wh[:, 1:2]
            tables[size] = (scaled.astype(np.int64), starts, counts)
        return tables[size]


def _known(metadata: WSOLMetadata, image_ids: Sequence[str]) -> Sequence[str]:
    rows = metadata._row
    for image_id in image_ids:
        if image_id not in rows:
            raise MetadataError(f"image {_shown(image_id)} is not in {os.path.join(metadata.directory, 'image_ids.txt')}")
    return image_ids


def _read_image_ids(directory: str) -> tuple[str, ...]:
    path = os.path.join(directory, "image_ids.txt")
    seen: dict[str, int] = {}
    for number, (image_id,) in _records(path, 1, "path"):
        _once(seen, path, number, image_id)
    return tuple(seen)


def _read_class_labels(directory: str) -> dict[str, int]:
    path = os.path.join(directory, "class_labels.txt")
    labels, seen = {}, {}
    for number, (image_id, label) in _records(path, 2, "path,label"):
        _once(seen, path, number, image_id)
        value = _parse_int(path, number, label, "label")
        if value < 0:
            raise MetadataError(f"{path}:{number}: label must be >= 0, got {value}")
        labels[image_id] = value
    return labels


def _read_image_sizes(directory: str) -> dict[str, tuple[int, int]]:
    path = os.path.join(directory, "image_sizes.txt")
    sizes, seen = {}, {}
    for number, (image_id, width, height) in _records(path, 3, "path,width,height"):
        _once(seen, path, number, image_id)
        w, h = _parse_int(path, number, width, "width"), _parse_int(path, number, height, "height")
        if w <= 0 or h <= 0:
            raise MetadataError(f"{path}:{number}: image size must be positive, got {w}x{h}")
        sizes[image_id] = (w, h)
    return sizes


def _read_boxes(directory: str, sizes: dict[str, tuple[int, int]] | None = None
                ) -> tuple[dict[str, np.ndarray], frozenset[str]]:
    """``(boxes, images with a box past the image)``: boxes per image, float64 ``[k, 4]`` in the original
    image's pixels (integers, or decimals); with ``sizes``, a box that starts outside its image is an
    error, and boxes that end past it are scored as they are (as the reference scores them) with one
    warning naming the first's line."""
    path = os.path.join(directory, "localization.txt")
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    past: set[str] = set()
    first_past, count_past = None, 0
    for number, (image_id, *coords) in _records(path, 5, "path,x0,y0,x1,y1"):
        x0, y0, x1, y1 = box = tuple(_parse_coordinate(path, number, c, name)
                                     for c, name in zip(coords, ("x0", "y0", "x1", "y1")))
        shown = tuple(int(v) if v == int(v) else v for v in box)
        if min(box) < 0:
            raise MetadataError(f"{path}:{number}: box coordinates must be non-negative, got {shown}")
        if x1 < x0 or y1 < y0:
            raise MetadataError(f"{path}:{number}: box must satisfy x0 <= x1 and y0 <= y1, got {shown}")
        size = None if sizes is None else sizes.get(image_id)
        if size is not None and (x0 >= size[0] or y0 >= size[1]):
            raise MetadataError(f"{path}:{number}: box {shown} of image {_shown(image_id)} lies outside the image "
                                f"({size[0]}x{size[1]} in image_sizes.txt)")
        if size is not None and (x1 > size[0] or y1 > size[1]):  # (x1 == width: the usual one past the edge)
            count_past += 1
            first_past = first_past or f"{path}:{number}: box {shown} of image {_shown(image_id)} ({size[0]}x{size[1]})"
            past.add(image_id)
        boxes.setdefault(image_id, []).append(box)
    if count_past:
        more = f" (and {count_past - 1} more)" if count_past > 1 else ""
        warnings.warn(f"{first_past} ends past its image{more}: scored as it is, as the reference scores it",
                      RuntimeWarning, stacklevel=4)
    return {image_id: np.array(b, dtype=np.float64).reshape(-1, 4) for image_id, b in boxes.items()}, frozenset(past)


def _read_masks(directory: str) -> tuple[dict[str, tuple[str, ...]], dict[str, str | None]]:
    path = os.path.join(directory, "localization.txt")
    masks: dict[str, list[str]] = {}
    ignores: dict[str, str | None] = {}
    for number, (image_id, mask, ignore) in _records(path, 3, "path,mask.png,ignore.png"):
        if not mask:
            raise MetadataError(f"{path}:{number}: empty mask path for image {_shown(image_id)}")
        if image_id in masks:
            if ignore:
                raise MetadataError(f"{path}:{number}: image {_shown(image_id)} names an ignore mask on a later line; "
                                    "it goes on the image's first line only (later lines leave it empty)")
            masks[image_id].append(mask)
        else:
            masks[image_id] = [mask]
            ignores[image_id] = ignore or None
    return {k: tuple(v) for k, v in masks.items()}, ignores


def _require(mapping: dict | None, image_ids: Sequence[str], path: str, what: str) -> None:
    if mapping is None:
        raise MetadataError(f"{path}: metadata file not found")
    missing = [i for i in image_ids if i not in mapping]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MetadataError(f"{path}: no {what} for image {_shown(missing[0])}{more}")


def read_metadata(directory: str, localization: str = "boxes") -> WSOLMetadata:
    """Read one split directory. ``localization``: ``"boxes"`` (``x0,y0,x1,y1`` lines) or ``"masks"``.

    ``image_ids.txt`` and ``localization.txt`` are required (and ``image_sizes.txt`` for boxes);
    every listed image must have its localization (and size). ``class_labels.txt`` is read when present
    (each image's label is required only where labels are used: :meth:`WSOLMetadata.require_labels`).
    """
    if localization not in ("boxes", "masks"):
        raise ValueError(f"localization must be 'boxes' or 'masks', got {localization!r}")
    if not os.path.isdir(directory):
        raise MetadataError(f"{directory}: metadata directory not found")
    image_ids = _read_image_ids(directory)
    labels_path = os.path.join(directory, "class_labels.txt")
    # (checked where labels are used: a file that does not parse, e.g. WordNet ids for labels, stops
    # only what needs it, as the reference reads it only for Top-1 Loc)
    labels, labels_error = None, None
    if os.path.isfile(labels_path):
        try:
            labels = _read_class_labels(directory)
        except MetadataError as exc:
            labels_error = str(exc)
    local_path = os.path.join(directory, "localization.txt")
    if localization == "boxes":
        sizes_path = os.path.join(directory, "image_sizes.txt")
        sizes = _read_image_sizes(directory) if os.path.isfile(sizes_path) else None
        _require(sizes, image_ids, sizes_path, "size")
        boxes, past = _read_boxes(directory, sizes)
        _require(boxes, image_ids, local_path, "box")
        return WSOLMetadata(directory, image_ids, "boxes", labels, sizes, boxes=boxes,
                            boxes_past_image=past, labels_error=labels_error)
    masks, ignores = _read_masks(directory)
    _require(masks, image_ids, local_path, "mask")
    return WSOLMetadata(directory, image_ids, "masks", labels, mask_paths=masks, ignore_paths=ignores,
                        labels_error=labels_error)


def detect_localization(directory: str) -> str:
    """``"boxes"`` or ``"masks"`` from the first line of ``<directory>/localization.txt`` (5 fields:
    ``path,x0,y0,x1,y1``; 3 fields: ``path,mask.png,ignore.png``)."""
    path = os.path.join(directory, "localization.txt")
    for number, line in enumerate(_lines(path), 1):
        if line.strip():
            fields = line.strip().split(",")
            if len(fields) in (3, 5):
                return "masks" if len(fields) == 3 else "boxes"
            raise MetadataError(f"{path}:{number}: expected 'path,x0,y0,x1,y1' (boxes) or "
                                f"'path,mask,ignore' (masks), got {_shown(line.strip())}")
    raise MetadataError(f"{path}: no localization lines")


def load_metadata(metadata_root: str, dataset_name: str, split: str) -> WSOLMetadata:
    """``<metadata_root>/<dataset_name>/<split>``: masks for OpenImages, boxes for CUB and ILSVRC; any
    other dataset in the same layout (e.g. ``ClutteredDigits`` from :mod:`rethinkcam_fast.datasets`)
    says which by its ``localization.txt``."""
    if not isinstance(dataset_name, str) or not dataset_name or os.sep in dataset_name or dataset_name in (".", ".."):
        raise ValueError(f"dataset_name must be a folder name under the metadata root, got {dataset_name!r}")
    directory = os.path.join(metadata_root, dataset_name, split)
    if dataset_name in DATASETS:
        localization = "masks" if dataset_name in MASK_DATASETS else "boxes"
    else:
        if not os.path.isdir(directory):
            raise MetadataError(f"{directory}: metadata directory not found (dataset {dataset_name!r}, split {split!r})")
        localization = detect_localization(directory)
    return read_metadata(directory, localization)


__all__ = ["DATASETS", "MetadataError", "WSOLMetadata", "detect_localization", "load_metadata", "read_metadata"]
