"""The CLI and the built-in demo."""

from __future__ import annotations

import json

import torch

from rethinkcam_fast import cli
from rethinkcam_fast.demo import box_iou, make_shapes, run_demo


def test_make_shapes_is_deterministic_with_exact_boxes():
    images, labels, boxes = make_shapes(16, size=24, seed=3)
    again = make_shapes(16, size=24, seed=3)
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1]) and torch.equal(boxes, again[2])
    assert images.shape == (16, 1, 24, 24) and labels.max() < 4
    for img, box in zip(images[:, 0], boxes):
        x0, y0, x1, y1 = box.tolist()
        assert 0 <= x0 <= x1 < 24 and 0 <= y0 <= y1 < 24
        bright = img > 0.8  # the shape adds 1.0 over N(0, 0.15) noise
        inside = bright[y0 : y1 + 1, x0 : x1 + 1].sum()
        assert inside >= 0.9 * bright.sum()


def test_demo_trains_both_pools_and_writes_json(tmp_path, capsys):
    results = run_demo(out_dir=str(tmp_path), epochs=1, train_size=128, test_size=64, seed=1)
    assert [r.pool for r in results] == ["gap", "tap"]
    for r in results:
        assert 0.0 <= r.test_accuracy <= 100.0
        assert 0.0 <= r.box_accuracy_cam <= 100.0 and 0.0 <= r.box_accuracy_pas <= 100.0
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert [r["pool"] for r in saved["results"]] == ["gap", "tap"]
    assert "box acc PaS %" in capsys.readouterr().out


def test_box_iou_inclusive_convention():
    a = torch.tensor([[0, 0, 9, 9], [0, 0, 4, 4], [5, 5, 5, 5]])
    b = torch.tensor([[0, 0, 9, 9], [5, 5, 9, 9], [5, 5, 6, 6]])
    assert box_iou(a, b).tolist() == [1.0, 0.0, 0.25]


def test_cli_info_reports_live_paths(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "native CPU kernels : yes" in out and "CUDA extension" in out
