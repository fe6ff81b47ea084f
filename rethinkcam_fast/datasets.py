"""Cluttered digits: a WSOL benchmark built from real handwriting, with exact ground-truth boxes.

The source is scikit-learn's copy of the UCI handwritten digits (1,797 real digits, 8x8, 16 grey
levels), shipped inside the scikit-learn package: nothing is downloaded. Each canvas holds one digit
(the class) scaled to a random size and placed at a random position, among *fragments* of other
digits of the same split (random crops of them, scaled alike) that never touch the digit's box.

* **Exact boxes.** The digit is drawn on its own uint8 layer; its box is the tight box of that
  layer's non-zero pixels, inclusive ``x0, y0, x1, y1`` in canvas pixels. Fragments are placed
  outside the box, so the canvas inside the box *is* the digit layer.
* **Instance split.** The 1,797 digits are shuffled once (per seed) and cut into disjoint train /
  val / test pools; every canvas of a split (its digit and its fragments) draws from its own pool,
  so no test digit instance is ever seen in training.
* **Deterministic.** One ``numpy`` PCG64 stream per split, seeded from ``(seed, split)``: the same
  config gives the same canvases.
* **Standard layout.** :func:`write_wsol_dataset` writes PNGs plus the wsolevaluation metadata
  (``<root>/<dataset>/<split>/{image_ids,class_labels,image_sizes,localization}.txt``; the image ids
  are paths relative to ``<root>/<dataset>``), which :func:`load_wsol_split` reads back.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

DATASET_NAME = "ClutteredDigits"
SPLITS = ("train", "val", "test")
NUM_CLASSES = 10
SOURCE_SIZE = 8  # load_digits images are 8x8
_PLACEMENT_TRIES = 20  # rejection-sampling attempts per clutter fragment before it is dropped


@dataclass(frozen=True)
class ClutteredDigitsConfig:
    """How to generate the benchmark.

    Attributes:
        canvas_size: side of the square canvas in pixels.
        digit_size: ``(min, max)`` side in pixels of the scaled 8x8 digit grid (inclusive range).
        clutter: fragments of other digits per canvas (fewer when there is no room outside the box).
        fragment_size: ``(min, max)`` side of a fragment, in source (8x8) pixels.
        counts: canvases per split.
        instance_fractions: shares of the 1,797 digit instances given to train / val / test.
        seed: the generator's seed.
    """

    canvas_size: int = 64
    digit_size: tuple[int, int] = (20, 32)
    clutter: int = 6
    fragment_size: tuple[int, int] = (3, 5)
    counts: dict[str, int] = field(default_factory=lambda: {"train": 4000, "val": 500, "test": 1000})
    instance_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.digit_size
        if not (SOURCE_SIZE <= lo <= hi <= self.canvas_size):
            raise ValueError(f"digit_size must satisfy 8 <= min <= max <= canvas_size, got {self.digit_size}")
        if not (1 <= self.fragment_size[0] <= self.fragment_size[1] <= SOURCE_SIZE):
            raise ValueError(f"fragment_size must satisfy 1 <= min <= max <= 8, got {self.fragment_size}")
        if self.clutter < 0:
            raise ValueError(f"clutter must be >= 0, got {self.clutter}")
        if set(self.counts) - set(SPLITS) or any(int(n) < 0 for n in self.counts.values()):
            raise ValueError(f"counts must map splits {SPLITS} to non-negative numbers, got {self.counts}")
        if len(self.instance_fractions) != 3 or min(self.instance_fractions) <= 0:
            raise ValueError(f"instance_fractions must be three positive shares, got {self.instance_fractions}")


@dataclass
class CanvasSet(Dataset):
    """One split in memory, usable as a torch ``Dataset``.

    Attributes:
        images: ``ByteTensor[N, H, W]`` (grey levels).
        labels: ``LongTensor[N]`` digit classes.
        boxes: ``LongTensor[N, 4]`` inclusive ``x0, y0, x1, y1`` in canvas pixels.
        image_ids: ``N`` paths relative to ``<root>/<dataset>`` (the wsolevaluation image ids).
        instances: ``LongTensor[N]``, index of the source digit in ``load_digits`` (``-1`` if unknown).

    ``dataset[i]`` is ``(Tensor[1, H, W] float in [0, 1], label, LongTensor[4] box)``.
    """

    images: Tensor
    labels: Tensor
    boxes: Tensor
    image_ids: list[str]
    instances: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int, Tensor]:
        return self.images[index, None].float() / 255.0, int(self.labels[index]), self.boxes[index]

    def float_images(self) -> Tensor:
        """All images as ``Tensor[N, 1, H, W]`` float32 in ``[0, 1]``."""
        return self.images[:, None].float() / 255.0

    def subset(self, count: int) -> CanvasSet:
        """The first ``count`` canvases."""
        return CanvasSet(self.images[:count], self.labels[:count], self.boxes[:count], self.image_ids[:count],
                         self.instances[:count])


@functools.lru_cache(maxsize=1)
def load_source_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits: ``(float32[1797, 8, 8] in [0, 1], int64[1797])``, read-only. No download."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:  # a runtime dependency, but say what to do if it is missing
        raise ImportError("the cluttered-digits benchmark needs scikit-learn: pip install scikit-learn")
    # The file load_digits reads, read as it reads it, without importing scikit-learn (and SciPy):
    # seconds of every `rethinkcam demo`; load_digits itself where the file is not there.
    table = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
    if os.path.isfile(table):
        data = np.loadtxt(table, delimiter=",")
        pixels, target = data[:, :-1].reshape(-1, 8, 8), data[:, -1]
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels, target = digits.images, digits.target
    images, labels = (pixels / 16.0).astype(np.float32), target.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False  # shared by every caller (cached)
    return images, labels


def split_instances(num_instances: int, fractions: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """Disjoint, sorted instance indices per split: a seeded shuffle cut by ``fractions``."""
    order = np.random.Generator(np.random.PCG64([seed, 0x5EED])).permutation(num_instances)
    shares = np.asarray(fractions, dtype=np.float64) / float(sum(fractions))
    cuts = np.round(np.cumsum(shares)[:-1] * num_instances).astype(int)
    return {split: np.sort(part) for split, part in zip(SPLITS, np.split(order, cuts))}


def _interpolation_matrix(size: int) -> np.ndarray:
    """``float64[size, 8]``: bilinear resampling of 8 pixels to ``size`` (PyTorch's ``align_corners=False`` rule)."""
    src = np.maximum((np.arange(size) + 0.5) * (SOURCE_SIZE / size) - 0.5, 0.0)
    low = np.floor(src).astype(int)
    high = np.minimum(low + 1, SOURCE_SIZE - 1)
    frac = src - low
    matrix = np.zeros((size, SOURCE_SIZE))
    np.add.at(matrix, (np.arange(size), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(size), high), frac)
    return matrix


def _scaled_digits(images: np.ndarray, sizes: range, pool: np.ndarray) -> dict[int, np.ndarray]:
    """The ``pool``'s digits at every size: ``{s: uint8[count, s, s]}`` (bilinear, then rounded to grey
    levels), indexed like ``images``; the other instances' rows stay zeros (a split never draws them).

    Separable bilinear resampling as two small matrix products in float64 (numpy: cheap, and independent
    of torch's thread count).
    """
    scaled = {}
    source = images[pool].astype(np.float64)
    for s in sizes:
        m = _interpolation_matrix(s)
        up = np.einsum("yi,nij,xj->nyx", m, source, m, optimize=True)
        scaled[s] = np.zeros((len(images), s, s), dtype=np.uint8)
        scaled[s][pool] = np.rint(np.clip(up, 0.0, 1.0) * 255).astype(np.uint8)
    return scaled


def _tight_box(layer: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(layer)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _overlaps(x0: int, y0: int, x1: int, y1: int, box: tuple[int, int, int, int]) -> bool:
    return not (x1 < box[0] or x0 > box[2] or y1 < box[1] or y0 > box[3])


def _draw_canvas(rng: np.random.Generator, config: ClutteredDigitsConfig, scaled: dict[int, np.ndarray],
                 pool: np.ndarray, instance: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    size = config.canvas_size
    s = int(rng.integers(config.digit_size[0], config.digit_size[1] + 1))
    x, y = (int(v) for v in rng.integers(0, size - s + 1, size=2))
    canvas = np.zeros((size, size), dtype=np.uint8)
    canvas[y : y + s, x : x + s] = scaled[s][instance]
    gx0, gy0, gx1, gy1 = _tight_box(canvas)
    box = (gx0, gy0, gx1, gy1)
    for _ in range(config.clutter):
        other = int(pool[rng.integers(len(pool))])
        fs = int(rng.integers(config.fragment_size[0], config.fragment_size[1] + 1))
        fragment_scale = int(rng.integers(config.digit_size[0], config.digit_size[1] + 1))
        side = max(1, round(fs * fragment_scale / SOURCE_SIZE))
        cx, cy = (int(v) for v in rng.integers(0, fragment_scale - side + 1, size=2))
        piece = scaled[fragment_scale][other, cy : cy + side, cx : cx + side]
        for _try in range(_PLACEMENT_TRIES):
            px, py = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            if not _overlaps(px, py, px + side - 1, py + side - 1, box):
                region = canvas[py : py + side, px : px + side]
                np.maximum(region, piece, out=region)
                break
    return canvas, box


def generate_split(config: ClutteredDigitsConfig, split: str, source: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> CanvasSet:
    """Generate one split in memory (deterministic in ``(config, split)``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, labels = source if source is not None else load_source_digits()
    pool = split_instances(len(images), config.instance_fractions, config.seed)[split]
    count = int(config.counts.get(split, 0))
    scaled = _scaled_digits(images, range(config.digit_size[0], config.digit_size[1] + 1), pool)
    rng = np.random.Generator(np.random.PCG64([config.seed, SPLITS.index(split)]))
    canvases = np.zeros((count, config.canvas_size, config.canvas_size), dtype=np.uint8)
    boxes = np.zeros((count, 4), dtype=np.int64)
    instances = pool[rng.integers(len(pool), size=count)] if count else np.zeros(0, dtype=np.int64)
    for i, instance in enumerate(instances):
        canvases[i], boxes[i] = _draw_canvas(rng, config, scaled, pool, int(instance))
    ids = [f"{split}/{int(labels[inst])}/{split}_{i:06d}.png" for i, inst in enumerate(instances)]
    return CanvasSet(torch.from_numpy(canvases), torch.from_numpy(labels[instances].astype(np.int64)),
                     torch.from_numpy(boxes), ids, torch.from_numpy(instances.astype(np.int64)))


def generate_cluttered_digits(config: ClutteredDigitsConfig | None = None) -> dict[str, CanvasSet]:
    """Every split of ``config.counts`` in memory: ``{split: CanvasSet}``."""
    config = config or ClutteredDigitsConfig()
    source = load_source_digits()
    return {split: generate_split(config, split, source) for split in SPLITS if config.counts.get(split, 0)}


def write_wsol_dataset(root: str, splits: dict[str, CanvasSet], dataset_name: str = DATASET_NAME) -> str:
    """Write PNGs and the wsolevaluation metadata under ``<root>/<dataset_name>``; returns that directory.

    Per split: ``image_ids.txt`` (``path``), ``class_labels.txt`` (``path,label``), ``image_sizes.txt``
    (``path,w,h``), ``localization.txt`` (``path,x0,y0,x1,y1``). Images lie at ``<root>/<dataset>/<path>``.
    """
    from PIL import Image

    base = os.path.join(root, dataset_name)
    for split, data in splits.items():
        meta_dir = os.path.join(base, split)
        os.makedirs(meta_dir, exist_ok=True)
        h, w = data.images.shape[1:]
        for image_id, image in zip(data.image_ids, data.images.numpy()):
            path = os.path.join(base, image_id)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(image).save(path)  # uint8 [H, W]: grey ("L")
        rows = list(zip(data.image_ids, data.labels.tolist(), data.boxes.tolist()))
        _write_lines(os.path.join(meta_dir, "image_ids.txt"), [i for i, _, _ in rows])
        _write_lines(os.path.join(meta_dir, "class_labels.txt"), [f"{i},{label}" for i, label, _ in rows])
        _write_lines(os.path.join(meta_dir, "image_sizes.txt"), [f"{i},{w},{h}" for i, _, _ in rows])
        _write_lines(os.path.join(meta_dir, "localization.txt"),
                     [f"{i},{b[0]},{b[1]},{b[2]},{b[3]}" for i, _, b in rows])
    return base


def _write_lines(path: str, lines: list[str]) -> None:
    with open(path, "w") as fh:
        fh.writelines(line + "\n" for line in lines)


def load_wsol_split(root: str, split: str, dataset_name: str = DATASET_NAME) -> CanvasSet:
    """Read a split written by :func:`write_wsol_dataset` (or any single-box grey WSOL split) into memory.

    The metadata is read (and checked, errors naming ``file:line``) as the evaluation reads it
    (:func:`rethinkcam_fast.evaluation.read_metadata`); every image must have the first one's size. An
    image with several boxes keeps its first one (cluttered digits have exactly one).
    """
    from .evaluation.metadata import read_metadata
    from .imageio import read_image

    base = os.path.join(root, dataset_name)
    meta_dir = os.path.join(base, split)
    if not os.path.isdir(meta_dir):
        raise FileNotFoundError(f"{meta_dir}: no such split directory")
    metadata = read_metadata(meta_dir, "boxes")
    ids = list(metadata.image_ids)
    labels = metadata.labels_of(ids)
    images = [read_image(os.path.join(base, i), channels=1)[0] for i in ids]
    for image_id, image in zip(ids, images):
        if image.shape != images[0].shape:
            raise ValueError(f"{meta_dir}: image {image_id!r} is {image.shape[1]}x{image.shape[0]}, the first "
                             f"{ids[0]!r} {images[0].shape[1]}x{images[0].shape[0]}: a split held in one tensor "
                             "needs one size")
    boxes = torch.tensor([[int(v) for v in metadata.boxes[i][0]] for i in ids], dtype=torch.long).reshape(-1, 4)
    return CanvasSet(torch.stack(images) if ids else torch.zeros((0, 0, 0), dtype=torch.uint8), labels, boxes, ids,
                     torch.full((len(ids),), -1, dtype=torch.long))


def moving_digit_clip(num_frames: int = 240, config: ClutteredDigitsConfig | None = None, seed: int = 0,
                      speed: float = 1.5) -> tuple[np.ndarray, int, np.ndarray]:
    """A clip for the video demo: one test-split digit gliding over a fixed cluttered canvas.

    The digit (an instance never seen in training) bounces off the canvas edges at ``speed`` pixels
    per frame; the clutter is drawn once from fragments of other test digits, as in the benchmark.

    Returns:
        ``(frames uint8[num_frames, S, S], label, boxes int64[num_frames, 4])``: grey frames, the digit's
        class, and its exact inclusive ``x0, y0, x1, y1`` box in each frame.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    config = config or ClutteredDigitsConfig()
    images, labels = load_source_digits()
    pool = split_instances(len(images), config.instance_fractions, config.seed)["test"]
    rng = np.random.Generator(np.random.PCG64([seed, 0xC11F]))
    s = int(rng.integers(config.digit_size[0], config.digit_size[1] + 1))
    scaled = _scaled_digits(images, range(config.digit_size[0], config.digit_size[1] + 1), pool)
    instance = int(pool[rng.integers(len(pool))])
    # The clutter: a benchmark canvas whose own digit is then erased (only its fragments stay).
    background, box = _draw_canvas(rng, config, scaled, pool, instance)
    background[box[1] : box[3] + 1, box[0] : box[2] + 1] = 0
    digit = scaled[s][instance]
    size = config.canvas_size
    position = rng.uniform(0, size - s, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    velocity = speed * np.array([np.cos(angle), np.sin(angle)])
    frames = np.zeros((num_frames, size, size), dtype=np.uint8)
    boxes = np.zeros((num_frames, 4), dtype=np.int64)
    for k in range(num_frames):
        x, y = (int(round(v)) for v in position)
        frame = background.copy()
        region = frame[y : y + s, x : x + s]
        np.maximum(region, digit, out=region)
        layer = np.zeros_like(frame)
        layer[y : y + s, x : x + s] = digit
        frames[k], boxes[k] = frame, _tight_box(layer)
        position += velocity
        for axis in range(2):  # bounce
            if not 0 <= position[axis] <= size - s:
                velocity[axis] = -velocity[axis]
                position[axis] = min(max(position[axis], 0), size - s)
    return frames, int(labels[instance]), boxes


__all__ = ["DATASET_NAME", "NUM_CLASSES", "SPLITS", "CanvasSet", "ClutteredDigitsConfig", "generate_cluttered_digits", "moving_digit_clip",
           "generate_split", "load_source_digits", "load_wsol_split", "split_instances", "write_wsol_dataset"]
