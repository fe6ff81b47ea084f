"""Generated WSOL datasets for the evaluation tests: smooth score maps, GT boxes or masks, metadata files."""

from __future__ import annotations

import os

import cv2
import numpy as np


def smooth_maps(count: int, height: int, width: int, seed: int) -> list[np.ndarray]:
    """Min-max normalised maps: bicubic upsampling of small random grids (a few blobs, some holes),
    plus the cases that matter to the protocol: an all-zero map (empty masks: box [0, 0, 0, 0]), a
    ring (a contour with a hole), and values just below the level boundaries ``k / 255``; float32
    and float64 maps alternate."""
    rng = np.random.default_rng(seed)
    maps = []
    for index in range(count):
        cells = int(rng.integers(3, 9))
        grid = rng.random((cells, cells)).astype(np.float32) ** 2
        up = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float64)
        up = (up - up.min()) / (up.max() - up.min())
        if index % 4 == 1:  # a ring: a hole in the middle of a blob
            yy, xx = np.mgrid[0:height, 0:width]
            radius = np.hypot((yy - height / 2) / height, (xx - width / 2) / width)
            up = np.clip(up * 0.3 + np.exp(-((radius - 0.25) ** 2) / 0.004), 0, None)
            up /= up.max()
        if index % 4 == 3:  # values right at the uint8 level boundaries
            levels = rng.integers(1, 255, size=64)
            rows, cols = rng.integers(0, height, 64), rng.integers(0, width, 64)
            up[rows, cols] = np.nextafter(levels / 255, 0)
        maps.append(up.astype(np.float32 if index % 2 else np.float64))
    if count:
        maps[0] = np.zeros((height, width), dtype=np.float32)  # empty mask at every threshold
    return maps


def random_boxes(rng: np.random.Generator, width: int, height: int, count: int) -> list[tuple[int, int, int, int]]:
    boxes = []
    for _ in range(count):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
        boxes.append((x0, y0, x1, y1))
    return boxes


def object_box(scoremap: np.ndarray, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A GT box in a ``width x height`` original image around the map's region above a random level,
    jittered, so that accuracies land between 0 and 100 % rather than at the extremes."""
    ys, xs = np.nonzero(scoremap > rng.uniform(0.2, 0.8))
    if len(xs) == 0:
        return random_boxes(rng, width, height, 1)[0]
    map_h, map_w = scoremap.shape
    jitter = rng.integers(-40, 41, 4)
    x0 = min(max(int(xs.min() * width / map_w) + int(jitter[0]), 0), width - 1)
    y0 = min(max(int(ys.min() * height / map_h) + int(jitter[1]), 0), height - 1)
    x1 = min(max(int(xs.max() * width / map_w) + int(jitter[2]), x0), width - 1)
    y1 = min(max(int(ys.max() * height / map_h) + int(jitter[3]), y0), height - 1)
    return x0, y0, x1, y1


def image_ids(count: int) -> list[str]:
    """Ids with a class folder and an extension, like CUB's (``<id>.npy`` keeps the ``.jpg``)."""
    return [f"{index % 3:03d}.class_{index % 3}/img_{index:04d}.jpg" for index in range(count)]


def write_lines(path: str, rows) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.writelines(",".join(str(v) for v in row) + "\n" for row in rows)


def write_maps(scoremap_root: str, ids, maps) -> None:
    for image_id, scoremap in zip(ids, maps):
        path = os.path.join(scoremap_root, image_id + ".npy")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.save(path, scoremap)


def make_box_split(root: str, count: int, seed: int, map_size=(224, 224), dataset: str = "CUB",
                   split: str = "test") -> dict:
    """Metadata (odd original sizes, 1-3 boxes per image) and score maps under ``root``."""
    rng = np.random.default_rng(seed)
    ids = image_ids(count)
    sizes = [(int(rng.integers(97, 640)), int(rng.integers(83, 520))) for _ in ids]
    maps = smooth_maps(count, map_size[0], map_size[1], seed + 1)
    boxes = [[object_box(m, w, h, rng)] + random_boxes(rng, w, h, int(rng.integers(0, 3)))
             for m, (w, h) in zip(maps, sizes)]
    labels = [int(rng.integers(0, 5)) for _ in ids]
    split_dir = os.path.join(root, "metadata", dataset, split)
    write_lines(os.path.join(split_dir, "image_ids.txt"), [(i,) for i in ids])
    write_lines(os.path.join(split_dir, "class_labels.txt"), zip(ids, labels))
    write_lines(os.path.join(split_dir, "image_sizes.txt"), [(i, w, h) for i, (w, h) in zip(ids, sizes)])
    write_lines(os.path.join(split_dir, "localization.txt"), [(i, *b) for i, bs in zip(ids, boxes) for b in bs])
    write_maps(os.path.join(root, "scoremaps"), ids, maps)
    return {"ids": ids, "sizes": sizes, "boxes": boxes, "labels": labels, "maps": maps, "split_dir": split_dir,
            "metadata_root": os.path.join(root, "metadata"), "scoremap_root": os.path.join(root, "scoremaps")}


def make_mask_split(root: str, count: int, seed: int, map_size=(224, 224), split: str = "val") -> dict:
    """OpenImages-style metadata with PNG instance masks (1-2 per image) and ignore masks at odd sizes."""
    rng = np.random.default_rng(seed)
    ids = [f"{split}/cls{index % 2}/{index:04d}.jpg" for index in range(count)]
    mask_root = os.path.join(root, "masks", "OpenImages")
    rows = []
    for n, image_id in enumerate(ids):
        width, height = int(rng.integers(61, 400)), int(rng.integers(47, 300))
        stem = image_id[:-4]
        for k in range(int(rng.integers(1, 3))):
            mask = np.zeros((height, width), dtype=np.uint8)
            x0, y0, x1, y1 = random_boxes(rng, width, height, 1)[0]
            cv2.ellipse(mask, ((x0 + x1) // 2, (y0 + y1) // 2), (max(x1 - x0, 2) // 2, max(y1 - y0, 2) // 2), 0, 0, 360, 255, -1)
            path = f"{stem}_m{k}.png"
            os.makedirs(os.path.dirname(os.path.join(mask_root, path)), exist_ok=True)
            cv2.imwrite(os.path.join(mask_root, path), mask)
            ignore = ""
            if k == 0 and n % 3 != 2:  # every third image has no ignore mask
                region = np.zeros((height, width), dtype=np.uint8)
                bx = random_boxes(rng, width, height, 1)[0]
                region[bx[1] : bx[3] + 1, bx[0] : bx[2] + 1] = 255
                ignore = f"{stem}_ignore.png"
                cv2.imwrite(os.path.join(mask_root, ignore), region)
            rows.append((image_id, path, ignore))
    split_dir = os.path.join(root, "metadata", "OpenImages", split)
    write_lines(os.path.join(split_dir, "image_ids.txt"), [(i,) for i in ids])
    write_lines(os.path.join(split_dir, "class_labels.txt"), [(i, 0) for i in ids])
    write_lines(os.path.join(split_dir, "localization.txt"), rows)
    maps = smooth_maps(count, map_size[0], map_size[1], seed + 1)
    write_maps(os.path.join(root, "scoremaps"), ids, maps)
    return {"ids": ids, "maps": maps, "split_dir": split_dir, "metadata_root": os.path.join(root, "metadata"),
            "scoremap_root": os.path.join(root, "scoremaps"), "mask_root": os.path.join(root, "masks"),
            "oracle_mask_root": mask_root}
