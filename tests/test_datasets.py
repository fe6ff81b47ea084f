"""Cluttered digits: determinism, exact boxes, instance split, and the WSOL metadata layout."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from rethinkcam_fast.datasets import (
    SPLITS,
    ClutteredDigitsConfig,
    generate_split,
    load_source_digits,
    load_wsol_split,
    split_instances,
    write_wsol_dataset,
)

SMALL = ClutteredDigitsConfig(canvas_size=48, digit_size=(12, 24), counts={"train": 40, "val": 10, "test": 30}, seed=5)


@pytest.fixture(scope="module")
def source():
    return load_source_digits()


def _ink_box(region: torch.Tensor) -> list[int]:
    ys, xs = torch.nonzero(region, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def test_same_seed_same_bytes_other_seed_other_canvases(source):
    a, b = generate_split(SMALL, "test", source), generate_split(SMALL, "test", source)
    assert torch.equal(a.images, b.images) and torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)
    assert a.image_ids == b.image_ids
    other = generate_split(ClutteredDigitsConfig(**{**SMALL.__dict__, "seed": 6}), "test", source)
    assert not torch.equal(a.images, other.images)


def test_boxes_are_the_tight_box_of_the_digit_without_clutter(source):
    config = ClutteredDigitsConfig(**{**SMALL.__dict__, "clutter": 0})
    data = generate_split(config, "train", source)
    for image, box in zip(data.images, data.boxes):
        assert _ink_box(image) == box.tolist()


def test_clutter_stays_outside_the_box_and_the_box_is_tight(source):
    data = generate_split(SMALL, "train", source)
    cluttered = 0
    for image, box in zip(data.images, data.boxes):
        x0, y0, x1, y1 = box.tolist()
        assert 0 <= x0 <= x1 < 48 and 0 <= y0 <= y1 < 48
        assert 12 * 3 // 8 <= x1 - x0 + 1 <= 24 and y1 - y0 + 1 <= 24
        inside = image[y0 : y1 + 1, x0 : x1 + 1]
        assert _ink_box(inside) == [0, 0, x1 - x0, y1 - y0]  # ink touches all four sides of the box
        outside = image.clone()
        outside[y0 : y1 + 1, x0 : x1 + 1] = 0
        cluttered += bool(outside.any())
    assert cluttered >= len(data) // 2  # fragments really are drawn


def test_instance_split_is_disjoint_and_every_canvas_uses_its_own_pool(source):
    pools = split_instances(len(source[0]), SMALL.instance_fractions, SMALL.seed)
    assert sum(len(p) for p in pools.values()) == len(source[0]) == 1797
    assert set(pools["train"]).isdisjoint(pools["test"]) and set(pools["val"]).isdisjoint(pools["test"])
    assert set(pools["train"]).isdisjoint(pools["val"])
    for split in SPLITS:
        data = generate_split(SMALL, split, source)
        assert set(data.instances.tolist()) <= set(pools[split].tolist())
        assert torch.equal(data.labels, torch.from_numpy(source[1][data.instances.numpy()]))
    train = generate_split(SMALL, "train", source)
    test = generate_split(SMALL, "test", source)
    assert set(train.instances.tolist()).isdisjoint(test.instances.tolist())


def test_metadata_layout_matches_wsolevaluation_and_round_trips(tmp_path, source):
    splits = {split: generate_split(SMALL, split, source) for split in SPLITS}
    base = write_wsol_dataset(str(tmp_path), splits)
    assert base == os.path.join(str(tmp_path), "ClutteredDigits")
    test = splits["test"]
    meta = tmp_path / "ClutteredDigits" / "test"
    ids = (meta / "image_ids.txt").read_text().splitlines()
    assert ids == test.image_ids and ids[0] == f"test/{int(test.labels[0])}/test_000000.png"
    assert (meta / "class_labels.txt").read_text().splitlines()[0] == f"{ids[0]},{int(test.labels[0])}"
    assert (meta / "image_sizes.txt").read_text().splitlines()[0] == f"{ids[0]},48,48"
    x0, y0, x1, y1 = test.boxes[0].tolist()
    assert (meta / "localization.txt").read_text().splitlines()[0] == f"{ids[0]},{x0},{y0},{x1},{y1}"
    # wsolevaluation's own parser: `image_id, x0s, x1s, y0s, y1s = line.strip('\n').split(',')` (names
    # swapped there, order x0, y0, x1, y1 in the file).
    for line in (meta / "localization.txt").read_text().splitlines(keepends=True):
        image_id, *coords = line.strip("\n").split(",")
        assert len(coords) == 4 and os.path.isfile(os.path.join(base, image_id))
    for split in SPLITS:
        back = load_wsol_split(str(tmp_path), split)
        original = splits[split]
        assert back.image_ids == original.image_ids
        assert torch.equal(back.images, original.images)  # PNG is lossless
        assert torch.equal(back.labels, original.labels) and torch.equal(back.boxes, original.boxes)


def test_torch_dataset_items_and_loader(source):
    data = generate_split(SMALL, "val", source)
    image, label, box = data[3]
    assert image.shape == (1, 48, 48) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert label == int(data.labels[3]) and box.tolist() == data.boxes[3].tolist()
    images, labels, boxes = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert images.shape == (4, 1, 48, 48) and labels.shape == (4,) and boxes.shape == (4, 4)


def test_bad_configs_and_missing_split_are_clear(tmp_path):
    with pytest.raises(ValueError, match="digit_size"):
        ClutteredDigitsConfig(canvas_size=32, digit_size=(20, 40))
    with pytest.raises(ValueError, match="counts"):
        ClutteredDigitsConfig(counts={"training": 5})
    with pytest.raises(ValueError, match="split"):
        generate_split(SMALL, "holdout")
    with pytest.raises(FileNotFoundError, match="no such split"):
        load_wsol_split(str(tmp_path), "test")


def test_source_digits_are_the_real_handwriting(source):
    images, labels = source
    assert images.shape == (1797, 8, 8) and images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0 and set(labels.tolist()) == set(range(10))
    # read from scikit-learn's data file without importing it: what load_digits returns
    from sklearn.datasets import load_digits

    digits = load_digits()
    assert np.array_equal(images, (digits.images / 16.0).astype(np.float32))
    assert np.array_equal(labels, digits.target)


def test_source_digits_fall_back_to_load_digits(monkeypatch):
    """Where scikit-learn keeps its digits elsewhere, load_digits itself reads them."""
    from rethinkcam_fast import datasets

    real_isfile = os.path.isfile
    monkeypatch.setattr(datasets.os.path, "isfile", lambda p: False if p.endswith("digits.csv.gz") else real_isfile(p))
    datasets.load_source_digits.cache_clear()
    try:
        images, labels = datasets.load_source_digits()
    finally:
        datasets.load_source_digits.cache_clear()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)


def test_the_benchmark_goes_through_the_evaluation_commands(source, tmp_path, capsys):
    """write_wsol_dataset's ClutteredDigits folder is a dataset the evaluation commands accept (its kind,
    boxes, read from localization.txt), and evaluate-model feeds the shipped grey model grey images
    in [0, 1] — the same metrics as evaluating the canvases in memory."""
    from rethinkcam_fast import CAMEngine, cli
    from rethinkcam_fast.evaluation import BoxEvaluator, evaluate_model, load_metadata
    from rethinkcam_fast.models import SHIPPED_WEIGHTS, load_shipped_model

    config = ClutteredDigitsConfig(counts={"train": 0, "val": 0, "test": 12}, seed=3)
    split = generate_split(config, "test", source)
    base = write_wsol_dataset(str(tmp_path), {"test": split})
    assert cli.main(["evaluate-model", "--model", "rethinkcam_fast.models:digits_cam_net", "--checkpoint",
                     SHIPPED_WEIGHTS, "--data-root", base, "--metadata-root", str(tmp_path), "--dataset-name",
                     "ClutteredDigits", "--split", "test", "--image-size", "64", "--cam-curve-interval", "0.01",
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Without --image-size, the size comes from the checkpoint's data config (64), not 224.
    assert cli.main(["evaluate-model", "--model", "rethinkcam_fast.models:digits_cam_net", "--checkpoint",
                     SHIPPED_WEIGHTS, "--data-root", base, "--metadata-root", str(tmp_path), "--dataset-name",
                     "ClutteredDigits", "--split", "test", "--cam-curve-interval", "0.01", "--json"]) == 0
    same_size = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: v for k, v in same_size.items() if k != "seconds"} == {k: v for k, v in result.items() if k != "seconds"}

    metadata = load_metadata(str(tmp_path), "ClutteredDigits", "test")
    images = split.images[:, None].float() / 255  # the canvases as written: grey, [0, 1]
    loader = [(images, split.labels, list(split.image_ids))]
    engine = CAMEngine(load_shipped_model()[0], "cam", boxes=False, warn_degenerate=False)
    expected = evaluate_model(engine, loader, BoxEvaluator(0.01, metadata=metadata)).to_dict()
    assert result["MaxBoxAccV2"] == expected["MaxBoxAccV2"] and result["Top-1 Loc"] == expected["Top-1 Loc"]
    assert result["Top-1 Cls"] >= 75.0  # grey, unnormalised input: the model recognises the digits

    with pytest.raises(Exception, match="metadata directory not found"):
        load_metadata(str(tmp_path), "NoSuchDataset", "test")


def test_a_read_back_split_is_checked_like_the_evaluation_metadata(tmp_path, source):
    """load_wsol_split reads the metadata through the evaluation's reader: errors name file and line
    (a duplicated id, a negative or inverted box, a decimal label), and images of several sizes are named."""
    from rethinkcam_fast.evaluation import MetadataError

    base = tmp_path / "ClutteredDigits"
    write_wsol_dataset(str(tmp_path), {"test": generate_split(SMALL, "test", source)})
    meta = base / "test"
    originals = {name: (meta / name).read_text() for name in ("image_ids.txt", "localization.txt", "class_labels.txt")}
    first = originals["image_ids.txt"].splitlines()[0]
    damaged = {
        "image_ids.txt": (originals["image_ids.txt"] + first + "\n", r"image_ids\.txt:\d+: image .* already listed"),
        "localization.txt": (f"{first},-5,2,10,12\n" + originals["localization.txt"].split("\n", 1)[1],
                             r"localization\.txt:1: box coordinates must be non-negative"),
        "class_labels.txt": (f"{first},1.5\n" + originals["class_labels.txt"].split("\n", 1)[1],
                             r"class_labels\.txt:1: label must be an integer"),
    }
    for name, (text, message) in damaged.items():
        (meta / name).write_text(text)
        with pytest.raises(MetadataError, match=message):
            load_wsol_split(str(tmp_path), "test")
        (meta / name).write_text(originals[name])
    from PIL import Image

    second = originals["image_ids.txt"].splitlines()[1]
    Image.fromarray(np.zeros((30, 20), dtype=np.uint8)).save(base / second)
    with pytest.raises(ValueError, match=f"image '{second}' is 20x30, the first '{first}' 48x48"):
        load_wsol_split(str(tmp_path), "test")
