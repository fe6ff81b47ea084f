"""The built-in demo: train a tiny classifier with GAP and with TAP on generated shapes, CPU is enough.

Each image is a ``size x size`` canvas of noise holding one filled shape (square, disc, plus or
ring: the class) at a random position and scale, so the ground-truth box is known exactly. Two
identical CNNs (conv stack -> global pool -> linear) are trained from the same seed, one pooling with
GAP and one with TAP. We report classification accuracy and the pointing accuracy of the class
activation map (is the CAM's peak inside the object's box?), measured, not assumed. Everything is
deterministic for a given seed and needs no download.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .modules import TAP

CLASSES = ("square", "disc", "plus", "ring")


def make_shapes(count: int, size: int = 24, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Generate ``(images[count, 1, size, size], labels[count], boxes[count, 4])``, boxes inclusive x0,y0,x1,y1."""
    gen = torch.Generator().manual_seed(seed)
    images = 0.15 * torch.randn(count, 1, size, size, generator=gen)
    labels = torch.randint(0, len(CLASSES), (count,), generator=gen)
    boxes = torch.empty(count, 4, dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(count):
        extent = int(torch.randint(7, size // 2 + 1, (1,), generator=gen))
        x0 = int(torch.randint(0, size - extent + 1, (1,), generator=gen))
        y0 = int(torch.randint(0, size - extent + 1, (1,), generator=gen))
        cx, cy, r = x0 + (extent - 1) / 2, y0 + (extent - 1) / 2, extent / 2
        inside = (xx >= x0) & (xx < x0 + extent) & (yy >= y0) & (yy < y0 + extent)
        dist = ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()
        shape = {
            0: inside,
            1: dist <= r,
            2: inside & (((xx - cx).abs() <= extent / 6) | ((yy - cy).abs() <= extent / 6)),
            3: (dist <= r) & (dist >= r * 0.55),
        }[int(labels[i])]
        images[i, 0][shape] += 1.0
        ys, xs = torch.nonzero(shape, as_tuple=True)
        boxes[i] = torch.tensor([int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())])
    return images, labels, boxes


class TinyCAMNet(nn.Module):
    """conv stack -> global pool (GAP or TAP) -> linear: the VGG-GAP layout at toy scale."""

    def __init__(self, pool: nn.Module, classes: int = len(CLASSES), width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width // 4, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width // 4, width // 2, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width // 2, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.pool = pool
        self.fc = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))

    def cam(self, x: Tensor, labels: Tensor) -> Tensor:
        """Plain CAM of ``labels`` from the unthresholded features, upsampled to the input size."""
        feats = self.features(x)
        weights = self.fc.weight[labels]  # [N, K]
        cam = torch.einsum("nk,nkhw->nhw", weights, feats).relu()
        return nn.functional.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


@dataclass
class DemoResult:
    pool: str
    test_accuracy: float
    cam_pointing_accuracy: float
    train_seconds: float
    train_images_per_second: float


def _pointing_accuracy(cams: Tensor, boxes: Tensor) -> float:
    n, _, w = cams.shape
    peak = cams.flatten(1).argmax(dim=1)
    py, px = peak // w, peak % w
    hit = (px >= boxes[:, 0]) & (px <= boxes[:, 2]) & (py >= boxes[:, 1]) & (py <= boxes[:, 3])
    return 100.0 * hit.float().mean().item() if n else 0.0


def train_and_evaluate(pool_name: str, data, epochs: int, seed: int, tau: float) -> DemoResult:
    (train_x, train_y, _), (test_x, test_y, test_boxes) = data
    torch.manual_seed(seed)
    pool = TAP(tau) if pool_name == "tap" else nn.AdaptiveAvgPool2d(1)
    model = TinyCAMNet(pool)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = 64
    start = time.perf_counter()
    model.train()
    order_gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=order_gen)
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            loss = nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        accuracy = 100.0 * (model(test_x).argmax(1) == test_y).float().mean().item()
        pointing = _pointing_accuracy(model.cam(test_x, test_y), test_boxes)
    return DemoResult(pool_name, accuracy, pointing, seconds, epochs * len(train_x) / seconds)


def run_demo(out_dir: str | None = None, epochs: int = 10, train_size: int = 1536, test_size: int = 512,
             seed: int = 0, tau: float = 0.1) -> list[DemoResult]:
    """Train GAP and TAP models on generated shapes; print and optionally save ``demo.json`` in ``out_dir``."""
    data = (make_shapes(train_size, seed=seed), make_shapes(test_size, seed=seed + 1))
    results = [train_and_evaluate(name, data, epochs, seed, tau) for name in ("gap", "tap")]
    print(f"rethinkcam demo: {train_size} train / {test_size} test shapes, {epochs} epochs, tau={tau}, seed={seed}")
    print(f"{'pool':<6}{'test acc %':>12}{'CAM pointing %':>16}{'train s':>10}{'img/s':>9}")
    for r in results:
        print(f"{r.pool:<6}{r.test_accuracy:>12.1f}{r.cam_pointing_accuracy:>16.1f}{r.train_seconds:>10.1f}"
              f"{r.train_images_per_second:>9.0f}")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "demo.json")
        with open(path, "w") as fh:
            json.dump({"seed": seed, "tau": tau, "epochs": epochs, "results": [asdict(r) for r in results]}, fh, indent=2)
        print(f"wrote {path}")
    return results
