"""Evaluation straight from a model: CAMEngine -> evaluator, no score map files."""

from __future__ import annotations

import json
import os
import shutil
import textwrap

import numpy as np
import pytest
import torch
from _wsol_data import make_mask_split, write_lines
from _wsol_oracle import OracleBoxes, OraclePxAP, gt_mask, read_box_split, read_mask_split, scale_box
from PIL import Image

from rethinkcam_fast import CAMEngine, cli
from rethinkcam_fast.evaluation import (BoxEvaluator, MaskEvaluator, WSOLImageDataset, collate_wsol, evaluate_model,
                                        load_metadata)
from rethinkcam_fast.evaluation.model import IMAGENET_MEAN, IMAGENET_STD, load_model

pytestmark = pytest.mark.filterwarnings("ignore:rethinkcam_fast.best_box_ious:RuntimeWarning")

MODEL_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4))
''')
SIZE = 32


def _write_images(data_root: str, ids, seed: int):
    """RGB images of odd sizes: noise with a bright rectangle; returns their sizes and the rectangles."""
    rng = np.random.default_rng(seed)
    sizes, boxes = [], []
    for image_id in ids:
        width, height = int(rng.integers(41, 90)), int(rng.integers(37, 80))
        pixels = rng.integers(0, 90, (height, width, 3)).astype(np.uint8)
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        x1, y1 = int(rng.integers(x0 + 4, width)), int(rng.integers(y0 + 4, height))
        pixels[y0 : y1 + 1, x0 : x1 + 1] = rng.integers(150, 255, 3)
        path = os.path.join(data_root, image_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(pixels).save(path, format="PNG")
        sizes.append((width, height))
        boxes.append((x0, y0, x1, y1))
    return sizes, boxes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_eval")
    ids = [f"{n % 4:03d}.cls/{n:03d}.jpg" for n in range(9)]
    sizes, boxes = _write_images(str(root / "images"), ids, seed=1)
    split = root / "metadata" / "CUB" / "test"
    write_lines(str(split / "image_ids.txt"), [(i,) for i in ids])
    write_lines(str(split / "class_labels.txt"), [(i, n % 4) for n, i in enumerate(ids)])
    write_lines(str(split / "image_sizes.txt"), [(i, w, h) for i, (w, h) in zip(ids, sizes)])
    write_lines(str(split / "localization.txt"), [(i, *b) for i, b in zip(ids, boxes)])
    (root / "model_def.py").write_text(MODEL_SOURCE)
    model = load_model(f"{root / 'model_def.py'}:build")
    with torch.no_grad():  # a checkpoint that differs from the factory's initialisation
        model[0].weight.mul_(1.5)
    torch.save({"state_dict": model.state_dict()}, root / "model.pt")
    return {"root": str(root), "ids": ids, "split_dir": str(split), "metadata_root": str(root / "metadata"),
            "data_root": str(root / "images"), "model": model}


def _loader(metadata, data_root, batch_size=4):
    return torch.utils.data.DataLoader(WSOLImageDataset(data_root, metadata, SIZE), batch_size=batch_size)


def test_evaluate_model_matches_the_oracle_on_the_engines_maps(dataset):
    metadata = load_metadata(dataset["metadata_root"], "CUB", "test")
    engine = CAMEngine(dataset["model"], "gradcam", boxes=False, warn_degenerate=False)
    got = evaluate_model(engine, _loader(metadata, dataset["data_root"]), BoxEvaluator(0.01, metadata=metadata))
    # Expected: the same batches through the engine by hand, then the oracle image by image.
    ids, sizes, boxes = read_box_split(dataset["split_dir"])
    oracle = OracleBoxes(0.01)
    for images, labels, batch_ids in _loader(metadata, dataset["data_root"]):
        cams = engine(images, targets=labels).cams.numpy()
        top1 = dataset["model"](images).argmax(1)
        for cam, image_id, label, predicted in zip(cams, batch_ids, labels.tolist(), top1.tolist()):
            oracle.add(cam, [scale_box(b, sizes[image_id], (SIZE, SIZE)) for b in boxes[image_id]], label == predicted)
    expected = oracle.result()
    assert got.num_images == 9
    assert got.max_box_acc == expected["MaxBoxAcc"] and got.max_box_acc_v2 == expected["MaxBoxAccV2"]
    assert got.top1_loc == expected["Top-1 Loc"] and got.top1_cls == expected["Top-1 Cls"]
    assert got.gt_known_loc == got.max_box_acc


def test_evaluate_model_with_ragged_box_targets(dataset):
    metadata = load_metadata(dataset["metadata_root"], "CUB", "test")
    items = WSOLImageDataset(dataset["data_root"], metadata, SIZE)
    scaled = {i: b for i, b in zip(metadata.image_ids, metadata.resized_boxes(metadata.image_ids, (SIZE, SIZE))[0])}
    with_boxes = [(image, label, scaled[image_id][None]) for image, label, image_id in items]
    loader = torch.utils.data.DataLoader(with_boxes, batch_size=4, collate_fn=collate_wsol)
    engine = CAMEngine(dataset["model"], "gradcam", boxes=False, warn_degenerate=False)
    by_boxes = evaluate_model(engine, loader, BoxEvaluator(0.01))
    by_ids = evaluate_model(engine, _loader(metadata, dataset["data_root"]), BoxEvaluator(0.01, metadata=metadata))
    assert by_boxes == by_ids and np.array_equal(by_boxes.accuracy_curves, by_ids.accuracy_curves)


def test_image_dataset_normalises_like_the_reference_transform(tmp_path):
    Image.fromarray(np.full((23, 31, 3), (10, 120, 250), dtype=np.uint8)).save(tmp_path / "flat.png")
    write_lines(str(tmp_path / "split" / "image_ids.txt"), [("flat.png",)])
    write_lines(str(tmp_path / "split" / "class_labels.txt"), [("flat.png", 3)])
    write_lines(str(tmp_path / "split" / "image_sizes.txt"), [("flat.png", 31, 23)])
    write_lines(str(tmp_path / "split" / "localization.txt"), [("flat.png", 0, 0, 5, 5)])
    from rethinkcam_fast.evaluation import read_metadata

    image, label, image_id = WSOLImageDataset(str(tmp_path), read_metadata(str(tmp_path / "split")), 16)[0]
    expected = (torch.tensor([10, 120, 250]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert image.shape == (3, 16, 16) and label == 3 and image_id == "flat.png"
    assert torch.allclose(image, expected[:, None, None].expand(3, 16, 16), atol=1e-6)
    os.remove(tmp_path / "flat.png")
    with pytest.raises(FileNotFoundError, match="image 'flat.png' not found"):
        WSOLImageDataset(str(tmp_path), read_metadata(str(tmp_path / "split")), 16)[0]


def test_evaluate_model_pxap_from_mask_metadata(tmp_path):
    data = make_mask_split(str(tmp_path), 5, seed=3, map_size=(8, 8))
    _write_images(str(tmp_path / "images"), data["ids"], seed=2)
    metadata = load_metadata(data["metadata_root"], "OpenImages", "val")
    model = load_model_from_source(tmp_path)
    engine = CAMEngine(model, "layercam", boxes=False, warn_degenerate=False)
    evaluator = MaskEvaluator(0.01, metadata=metadata, mask_root=data["mask_root"])
    got = evaluate_model(engine, _loader(metadata, str(tmp_path / "images")), evaluator)
    ids, masks, ignores = read_mask_split(data["split_dir"])
    oracle = OraclePxAP(0.01)
    for images, labels, batch_ids in _loader(metadata, str(tmp_path / "images")):
        for cam, image_id in zip(engine(images, targets=labels).cams.numpy(), batch_ids):
            oracle.add(cam, gt_mask(data["oracle_mask_root"], masks[image_id], ignores[image_id], (SIZE, SIZE)))
    assert got.pxap == oracle.result() and got.num_images == 5


def load_model_from_source(directory):
    (directory / "model_def.py").write_text(MODEL_SOURCE)
    return load_model(f"{directory / 'model_def.py'}:build")


def test_cli_evaluate_model_json_matches_the_function(dataset, capsys):
    args = ["evaluate-model", "--model", os.path.join(dataset["root"], "model_def.py") + ":build",
            "--checkpoint", os.path.join(dataset["root"], "model.pt"), "--data-root", dataset["data_root"],
            "--metadata-root", dataset["metadata_root"], "--dataset-name", "CUB", "--split", "test",
            "--method", "gradcam", "--image-size", str(SIZE), "--batch-size", "4", "--cam-curve-interval", "0.01",
            "--json"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    (line,) = captured.out.strip().splitlines()  # the JSON object alone; the table on stderr
    result = json.loads(line)
    out = captured.err.strip().splitlines()
    metadata = load_metadata(dataset["metadata_root"], "CUB", "test")
    engine = CAMEngine(dataset["model"], "gradcam", boxes=False, warn_degenerate=False)
    expected = evaluate_model(engine, _loader(metadata, dataset["data_root"]), BoxEvaluator(0.01, metadata=metadata))
    assert result["MaxBoxAcc"] == expected.to_dict()["MaxBoxAcc"] and result["Top-1 Loc"] == expected.to_dict()["Top-1 Loc"]
    assert any("Top-1 Cls" in line for line in out)
    # --upsample bicubic: the maps of wsolevaluation's pipeline (cv2.INTER_CUBIC)
    assert cli.main(args + ["--upsample", "bicubic"]) == 0
    bicubic = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    engine = CAMEngine(dataset["model"], "gradcam", boxes=False, warn_degenerate=False, upsample="bicubic")
    expected = evaluate_model(engine, _loader(metadata, dataset["data_root"]), BoxEvaluator(0.01, metadata=metadata))
    assert bicubic["MaxBoxAccV2"] == expected.to_dict()["MaxBoxAccV2"]
    # Without --checkpoint it runs with the factory's weights, and says so.
    no_weights = [a for a in args if a != "--checkpoint" and not a.endswith("model.pt")]
    assert cli.main(no_weights) == 0
    assert "warning: no --checkpoint" in capsys.readouterr().err


def test_cli_evaluate_model_reads_the_checkpoint_once(dataset, capsys, monkeypatch):
    """Without --image-size the checkpoint's metadata is consulted for the input size: from the same
    read that loads the weights (a ResNet50 checkpoint is ~100 MB)."""
    import torch

    reads = []
    real_load = torch.load

    def counting_load(*args, **kwargs):
        reads.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    args = ["evaluate-model", "--model", os.path.join(dataset["root"], "model_def.py") + ":build",
            "--checkpoint", os.path.join(dataset["root"], "model.pt"), "--data-root", dataset["data_root"],
            "--metadata-root", dataset["metadata_root"], "--dataset-name", "CUB", "--split", "test",
            "--method", "cam", "--batch-size", "4", "--cam-curve-interval", "0.1", "--json"]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert reads == [os.path.join(dataset["root"], "model.pt")]
    # Two faults: the model spec is reported first, before any checkpoint is read.
    bad = [a if a != args[2] else "no_colon" for a in args]
    bad[bad.index("--checkpoint") + 1] = os.path.join(dataset["root"], "missing.pt")
    reads.clear()
    assert cli.main(bad) == 2
    assert "MODULE:CALLABLE" in capsys.readouterr().err and reads == []


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="MODULE:CALLABLE"):
        load_model("no_colon")
    with pytest.raises(FileNotFoundError):
        load_model(f"{tmp_path}/missing.py:build")
    with pytest.raises(ValueError, match="no attribute"):
        load_model("torch.nn:NoSuchModel")


def test_cli_evaluate_model_nwc(dataset, capsys, monkeypatch):
    """--nwc reaches the engine (negative weight clamping; the metrics equal the function's with
    nwc=True), and is refused, exit code 2, for a method other than cam."""
    import rethinkcam_fast.engine as engine_module

    seen = []

    class RecordingEngine(engine_module.CAMEngine):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("nwc"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(engine_module, "CAMEngine", RecordingEngine)
    args = ["evaluate-model", "--model", os.path.join(dataset["root"], "model_def.py") + ":build",
            "--checkpoint", os.path.join(dataset["root"], "model.pt"), "--data-root", dataset["data_root"],
            "--metadata-root", dataset["metadata_root"], "--dataset-name", "CUB", "--split", "test",
            "--image-size", str(SIZE), "--batch-size", "4", "--cam-curve-interval", "0.01", "--json"]
    assert cli.main(args + ["--nwc"]) == 0
    assert seen == [True]
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metadata = load_metadata(dataset["metadata_root"], "CUB", "test")
    engine = engine_module.CAMEngine(dataset["model"], "cam", boxes=False, warn_degenerate=False, nwc=True)
    expected = evaluate_model(engine, _loader(metadata, dataset["data_root"]), BoxEvaluator(0.01, metadata=metadata))
    assert result["MaxBoxAcc"] == expected.to_dict()["MaxBoxAcc"]
    assert cli.main(args) == 0 and seen[-1] is False  # off by default: the standard protocol's plain CAM
    capsys.readouterr()
    assert cli.main(args + ["--nwc", "--method", "gradcam"]) == 2
    assert "applies to --method cam only" in capsys.readouterr().err


def test_top1_predictions_come_from_the_engines_logits_of_this_threads_forward(monkeypatch):
    """evaluate_model reads each batch's top-1 predictions as the engine picks its logits (logits=) and
    from its own thread's forward only (another thread may run the same model meanwhile)."""
    import threading

    from _models import SmallCNN, make
    from torch import nn

    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make(SmallCNN, classes=4)

        def forward(self, x):
            y = self.net(x)
            return y, y.sum()

    model = TwoOutputs().eval()
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(4, 3, 32, 32, generator=gen)
    with torch.no_grad():
        labels = model(images)[0].argmax(1)  # the true top-1: Top-1 Cls is 100 %
    boxes = [torch.tensor([[0, 0, 15, 15]])] * 4
    engine = CAMEngine(model, "gradcam", logits=0, boxes=False)
    real_call = CAMEngine.__call__

    def call_then_another_thread_runs_the_model(self, *args, **kwargs):
        result = real_call(self, *args, **kwargs)
        other = threading.Thread(target=lambda: model(torch.rand(7, 3, 32, 32)))  # another request, batch 7
        other.start()
        other.join()
        return result

    monkeypatch.setattr(CAMEngine, "__call__", call_then_another_thread_runs_the_model)
    metrics = evaluate_model(engine, [(images, labels, boxes)], BoxEvaluator(0.01))
    assert metrics.top1_cls == 100.0


def test_non_finite_logits_are_warned_of_and_worker_errors_are_one_line(dataset, tmp_path, capsys):
    metadata = load_metadata(dataset["metadata_root"], "CUB", "test")
    broken = load_model(os.path.join(dataset["root"], "model_def.py") + ":build")
    with torch.no_grad():
        broken[-1].weight.fill_(float("nan"))  # damaged weights: every logit NaN
    engine = CAMEngine(broken, "gradcam", boxes=False, warn_degenerate=False)
    with pytest.warns(RuntimeWarning, match="9 of 9 images got non-finite logits"):
        evaluate_model(engine, _loader(metadata, dataset["data_root"]), BoxEvaluator(0.01, metadata=metadata))
    # A bad image read by a DataLoader worker process: the worker's own one-line error, not its traceback.
    images = tmp_path / "images"
    shutil.copytree(dataset["data_root"], images)
    (images / dataset["ids"][3]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    args = ["evaluate-model", "--model", os.path.join(dataset["root"], "model_def.py") + ":build",
            "--data-root", str(images), "--metadata-root", dataset["metadata_root"], "--dataset-name", "CUB",
            "--split", "test", "--image-size", str(SIZE), "--batch-size", "4", "--num-workers", "1",
            "--cam-curve-interval", "0.01"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"rethinkcam evaluate-model: error: ValueError: image '{dataset['ids'][3]}' cannot be read")
    assert not any("Traceback" in line for line in err)
