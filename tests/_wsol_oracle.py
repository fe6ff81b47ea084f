"""A slow, obvious implementation of the WSOL evaluation protocol (DESIGN.md §3): the tests' oracle.

One image at a time, one CAM threshold at a time: OpenCV for contours, mask reading and resizing,
plain Python for IoU and counting, ``np.histogram`` for PxAP. Written from the protocol's description,
not from the library: it shares no code with ``rethinkcam_fast.evaluation``. Where the protocol's
numbers depend on numpy's own arithmetic (the pairwise sum in PxAP, the mean behind MaxBoxAccV2) the
oracle calls the same numpy reduction, so "identical" can mean identical to the last bit.
"""

from __future__ import annotations

import os

import cv2
import numpy as np


# -- metadata -------------------------------------------------------------------------------------

def read_lines(path: str) -> list[list[str]]:
    with open(path) as fh:
        return [line.rstrip("\n").split(",") for line in fh if line.strip()]


def read_box_split(directory: str) -> tuple[list[str], dict, dict]:
    """image ids, {id: (w, h)}, {id: [(x0, y0, x1, y1), ...]}."""
    ids = [fields[0] for fields in read_lines(os.path.join(directory, "image_ids.txt"))]
    sizes = {f[0]: (int(f[1]), int(f[2])) for f in read_lines(os.path.join(directory, "image_sizes.txt"))}
    boxes: dict[str, list] = {}
    for f in read_lines(os.path.join(directory, "localization.txt")):
        boxes.setdefault(f[0], []).append(tuple(int(v) for v in f[1:5]))
    return ids, sizes, boxes


def read_mask_split(directory: str) -> tuple[list[str], dict, dict]:
    """image ids, {id: [mask paths]}, {id: ignore path or ''}."""
    ids = [fields[0] for fields in read_lines(os.path.join(directory, "image_ids.txt"))]
    masks: dict[str, list] = {}
    ignores: dict[str, str] = {}
    for image_id, mask, ignore in read_lines(os.path.join(directory, "localization.txt")):
        if image_id not in masks:
            masks[image_id], ignores[image_id] = [], ignore
        masks[image_id].append(mask)
    return ids, masks, ignores


def scale_box(box, image_size, new_size) -> tuple[int, int, int, int]:
    """Box in an image of ``image_size = (w, h)`` scaled to ``new_size = (w, h)``; ``int()`` truncation."""
    (w, h), (new_w, new_h) = image_size, new_size
    x0, y0, x1, y1 = (float(v) for v in box)
    return int(x0 * new_w / w), int(y0 * new_h / h), int(x1 * new_w / w), int(y1 * new_h / h)


def read_mask(path: str, size_wh) -> np.ndarray:
    image = np.float32(cv2.imread(path, cv2.IMREAD_GRAYSCALE))
    return cv2.resize(image, size_wh, interpolation=cv2.INTER_NEAREST) > 0.5


def gt_mask(mask_root: str, mask_paths, ignore_path: str, size_wh) -> np.ndarray:
    """uint8 map: 1 foreground, 0 background, 255 ignored (ignore region minus foreground)."""
    foreground = np.zeros((size_wh[1], size_wh[0]), dtype=bool)
    for path in mask_paths:
        foreground |= read_mask(os.path.join(mask_root, path), size_wh)
    out = foreground.astype(np.uint8)
    if ignore_path:
        ignore = read_mask(os.path.join(mask_root, ignore_path), size_wh) & ~foreground
        out[ignore] = 255
    return out


# -- boxes ------------------------------------------------------------------------------------------

def iou(a, b) -> float:
    """Inclusive-coordinate IoU (``area = (x1 - x0 + 1) * (y1 - y0 + 1)``); 0 for a non-positive union."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1) * max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return 0.0 if union <= 0 else inter / union


def predicted_boxes(levels: np.ndarray, level: int, multi_contour: bool) -> list[tuple[int, int, int, int]]:
    height, width = levels.shape
    mask = (levels > level).astype(np.uint8)
    contours = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    if not contours:
        return [(0, 0, 0, 0)]
    if not multi_contour:
        contours = [max(contours, key=cv2.contourArea)]
    boxes = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        boxes.append((x, y, min(x + w, width - 1), min(y + h, height - 1)))
    return boxes


class OracleBoxes:
    """Counts ``correct[δ][t]`` image by image; Top-1 counts when a classification result is given."""

    def __init__(self, interval: float, deltas=(30, 50, 70), multi_contour: bool = True) -> None:
        self.thresholds = list(np.arange(0, 1, interval))
        self.deltas = list(deltas)
        self.multi_contour = multi_contour
        self.correct = {d: [0] * len(self.thresholds) for d in self.deltas}
        self.correct_top1 = {d: [0] * len(self.thresholds) for d in self.deltas}
        self.count = 0
        self.classified_right = 0

    def add(self, scoremap: np.ndarray, gt_boxes, top1_right: bool | None = None) -> None:
        levels = (np.asarray(scoremap, dtype=np.float64) * 255).astype(np.uint8)
        top = int(levels.max())
        for index, t in enumerate(self.thresholds):
            boxes = predicted_boxes(levels, int(t * top), self.multi_contour)
            best = max(iou(p, g) for p in boxes for g in gt_boxes)
            for d in self.deltas:
                if best >= d / 100:
                    self.correct[d][index] += 1
                    if top1_right:
                        self.correct_top1[d][index] += 1
        self.count += 1
        self.classified_right += bool(top1_right)

    def result(self) -> dict:
        accuracy = {d: [c * 100.0 / self.count for c in self.correct[d]] for d in self.deltas}
        best_index = {d: max(range(len(self.thresholds)), key=lambda i: (accuracy[d][i], -i)) for d in self.deltas}
        max_box_acc = {d: accuracy[d][best_index[d]] for d in self.deltas}
        return {
            "MaxBoxAcc": max_box_acc,
            "MaxBoxAccV2": float(np.mean([max_box_acc[d] for d in self.deltas])),
            "best_cam_threshold": {d: float(self.thresholds[best_index[d]]) for d in self.deltas},
            "Top-1 Loc": {d: max(c * 100.0 / self.count for c in self.correct_top1[d]) for d in self.deltas},
            "Top-1 Cls": self.classified_right * 100.0 / self.count,
            "curves": np.array([accuracy[d] for d in self.deltas]),
        }


# -- PxAP -------------------------------------------------------------------------------------------

class OraclePxAP:
    def __init__(self, interval: float) -> None:
        self.edges = list(np.arange(0, 1, interval)) + [1.0, 2.0, 3.0]
        self.positive = np.zeros(len(self.edges) - 1)
        self.negative = np.zeros(len(self.edges) - 1)

    def add(self, scoremap: np.ndarray, mask: np.ndarray) -> None:
        """``mask``: 1 foreground, 0 background, 255 ignored."""
        scores = np.asarray(scoremap, dtype=np.float64)
        self.positive += np.histogram(scores[mask == 1], bins=self.edges)[0]
        self.negative += np.histogram(scores[mask == 0], bins=self.edges)[0]

    def result(self) -> float:
        """Step-sum AP over the cuts ``score >= edge``, from the highest edge down."""
        total_positive = self.positive.sum()
        tp = fp = 0.0
        precision, recall, defined = [], [], []
        for pos, neg in zip(self.positive[::-1], self.negative[::-1]):
            tp += pos
            fp += neg
            defined.append(tp + fp != 0)
            precision.append(tp / (tp + fp) if tp + fp else float("nan"))
            recall.append(tp / total_positive)
        terms = [precision[i] * (recall[i] - recall[i - 1]) for i in range(1, len(recall)) if defined[i]]
        return float(np.sum(np.array(terms))) * 100  # numpy's pairwise sum, as the protocol's code sums


# -- whole splits from files (what `rethinkcam evaluate` reads) -------------------------------------------

def evaluate_box_split(scoremap_root: str, split_dir: str, interval: float, deltas=(30, 50, 70),
                       multi_contour: bool = True) -> dict:
    ids, sizes, boxes = read_box_split(split_dir)
    oracle = OracleBoxes(interval, deltas, multi_contour)
    for image_id in ids:
        scoremap = np.load(os.path.join(scoremap_root, image_id + ".npy"))
        height, width = scoremap.shape
        gt = [scale_box(b, sizes[image_id], (width, height)) for b in boxes[image_id]]
        oracle.add(scoremap, gt)
    return oracle.result()


def evaluate_mask_split(scoremap_root: str, split_dir: str, mask_root: str, interval: float) -> float:
    ids, masks, ignores = read_mask_split(split_dir)
    oracle = OraclePxAP(interval)
    for image_id in ids:
        scoremap = np.load(os.path.join(scoremap_root, image_id + ".npy"))
        height, width = scoremap.shape
        oracle.add(scoremap, gt_mask(mask_root, masks[image_id], ignores[image_id], (width, height)))
    return oracle.result()
