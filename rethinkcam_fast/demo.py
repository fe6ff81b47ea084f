"""The built-in demo: train a tiny classifier with GAP and with TAP on generated shapes, CPU is enough.

Each image is a ``size x size`` canvas of noise holding one filled shape (square, disc, plus or
ring: the class) at a random position and scale, so the ground-truth box is known exactly. Two
identical CNNs (conv stack -> global pool -> linear) are trained from the same seed, one pooling with
GAP and one with TAP. We report classification accuracy and GT-known box accuracy (IoU >= 0.5) of
the boxes the CAM engine cuts from each model's CAM (with NWC) at the plain CAM threshold and at PaS,
measured, not assumed. Everything is deterministic for a given seed and needs no download.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .engine import CAMEngine
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



@dataclass
class DemoResult:
    pool: str
    test_accuracy: float
    box_accuracy_cam: float  # GT-known: IoU >= 0.5 with the plain CAM threshold (q=100, theta=0.2)
    box_accuracy_pas: float  # the same with PaS (q=90, theta=0.35)
    train_seconds: float
    train_images_per_second: float


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of inclusive pixel boxes ``[N, 4]`` (x0, y0, x1, y1), the protocol's ``+1`` convention."""
    ix = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0]) + 1).clamp_min(0)
    iy = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1]) + 1).clamp_min(0)
    inter = (ix * iy).double()
    area_a = ((a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)).double()
    area_b = ((b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)).double()
    return inter / (area_a + area_b - inter)


def _box_accuracy(model: nn.Module, images: Tensor, labels: Tensor, gt_boxes: Tensor, q: float, theta: float) -> float:
    """GT-known box accuracy (%) of the CAM engine's boxes: plain CAM + NWC, threshold (q, theta)."""
    engine = CAMEngine(model, "cam", model.features, nwc=True, pas_q=q, pas_theta=theta,
                       box_convention="exact", warn_degenerate=False)
    boxes = engine(images, targets=labels).boxes
    return 100.0 * (box_iou(boxes, gt_boxes) >= 0.5).double().mean().item() if len(images) else 0.0


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
    plain = _box_accuracy(model, test_x, test_y, test_boxes, 100.0, 0.2)
    pas = _box_accuracy(model, test_x, test_y, test_boxes, 90.0, 0.35)
    return DemoResult(pool_name, accuracy, plain, pas, seconds, epochs * len(train_x) / seconds)


def run_demo(out_dir: str | None = None, epochs: int = 10, train_size: int = 1536, test_size: int = 512,
             seed: int = 0, tau: float = 0.1) -> list[DemoResult]:
    """Train GAP and TAP models on generated shapes; print and optionally save ``demo.json`` in ``out_dir``."""
    data = (make_shapes(train_size, seed=seed), make_shapes(test_size, seed=seed + 1))
    results = [train_and_evaluate(name, data, epochs, seed, tau) for name in ("gap", "tap")]
    print(f"rethinkcam demo: {train_size} train / {test_size} test shapes, {epochs} epochs, tau={tau}, seed={seed}")
    print(f"{'pool':<6}{'test acc %':>12}{'box acc CAM %':>15}{'box acc PaS %':>15}{'train s':>10}{'img/s':>9}")
    for r in results:
        print(f"{r.pool:<6}{r.test_accuracy:>12.1f}{r.box_accuracy_cam:>15.1f}{r.box_accuracy_pas:>15.1f}"
              f"{r.train_seconds:>10.1f}{r.train_images_per_second:>9.0f}")
    print("box acc: GT-known, IoU >= 0.5, CAM + NWC boxes from the CAM engine; "
          "CAM threshold = 0.2 x max, PaS = 0.35 x 90th percentile")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "demo.json")
        with open(path, "w") as fh:
            json.dump({"seed": seed, "tau": tau, "epochs": epochs, "results": [asdict(r) for r in results]}, fh, indent=2)
        print(f"wrote {path}")
    return results
