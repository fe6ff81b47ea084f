"""The main job end to end (`rethinkcam demo`), `rethinkcam localize`, the WSOL box metrics, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import rethinkcam_fast
from rethinkcam_fast import cli
from rethinkcam_fast.datasets import ClutteredDigitsConfig, generate_split
from rethinkcam_fast.demo import run_demo
from rethinkcam_fast.localize import LocalizationMetrics, wsol_box_metrics
from rethinkcam_fast.models import SHIPPED_WEIGHTS, DigitsCAMNet, load_shipped_model, save_checkpoint

TINY = ClutteredDigitsConfig(canvas_size=32, digit_size=(12, 20), clutter=2, counts={"test": 6}, seed=2)
SHIPPED_FIELDS = {"image", "label", "score", "box", "threshold", "gt_label", "gt_box"}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An untrained small model whose checkpoint records the tiny data config (the demo regenerates from it)."""
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    torch.manual_seed(0)
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.__dict__.items()}
    save_checkpoint(path, DigitsCAMNet("tap", widths=(4, 8, 8)), {"data": data, "val_accuracy": [12.5]})
    return path


def _check_outputs(out, count: int, size: int) -> list[dict]:
    records = json.loads((out / "localizations.json").read_text())
    assert isinstance(records, list) and len(records) == count
    for record in records:
        assert SHIPPED_FIELDS <= set(record) and 0 <= record["label"] < 10 and isinstance(record["score"], float)
        x0, y0, x1, y1 = record["box"]
        assert 0 <= x0 <= x1 < size and 0 <= y0 <= y1 < size
    with Image.open(out / "grid.png") as grid:
        assert grid.format == "PNG" and grid.width > 100 and grid.height > 100
    return records


def test_demo_end_to_end_on_a_tiny_setting(tmp_path, tiny_checkpoint, capsys):
    report = run_demo(out_dir=str(tmp_path), count=6, grid=4, weights=tiny_checkpoint)
    records = _check_outputs(tmp_path, 6, 32)
    test = generate_split(TINY, "test")
    assert [r["gt_box"] for r in records] == test.boxes.tolist()  # the canvases of the recorded data config
    assert [r["gt_label"] for r in records] == test.labels.tolist()
    out = capsys.readouterr().out
    assert "MaxBoxAcc" in out and "Top-1 Loc" in out and "localizations.json" in out
    metrics = report.metrics
    assert metrics.num_images == 6 and 0 <= metrics.top1_loc <= metrics.max_box_acc <= 100


def test_cli_demo_with_the_shipped_model(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "--count", "40", "--grid", "8"]) == 0
    records = _check_outputs(tmp_path, 40, 64)
    out = capsys.readouterr().out
    assert "digits_tap.pt" in out and "MaxBoxAcc" in out
    # The shipped model is trained: it classifies unseen digits far above chance (10 %).
    correct = sum(r["label"] == r["gt_label"] for r in records)
    assert correct >= 30


def test_shipped_model_is_small_and_loads_weights_only():
    import os

    assert os.path.getsize(SHIPPED_WEIGHTS) <= 2 * 1024 * 1024
    model, meta = load_shipped_model()
    assert isinstance(model, DigitsCAMNet) and model.arch["pool"] == "tap" and not model.training
    assert meta["options"]["seed"] == 0 and meta["data"]["seed"] == 0


def _write_canvases(tmp_path, count: int = 2) -> list[str]:
    data = generate_split(ClutteredDigitsConfig(counts={"test": count}, seed=0), "test")
    paths = []
    for i in range(count):
        path = tmp_path / f"digit_{i}.png"
        Image.fromarray(data.images[i].numpy()).save(path)
        paths.append(str(path))
    return paths


def test_localize_cli_on_image_files(tmp_path, capsys):
    paths = _write_canvases(tmp_path)
    rgb = tmp_path / "rgb.jpg"  # a colour JPEG of another size: decoded to grey for a 1-channel model
    Image.fromarray(np.stack([np.asarray(Image.open(paths[0]).resize((80, 72)))] * 3, axis=-1)).save(rgb)
    out = tmp_path / "out"
    code = cli.main(["localize", *paths, str(rgb), "--model", "rethinkcam_fast.models:digits_cam_net",
                     "--weights", SHIPPED_WEIGHTS, "--out", str(out)])
    assert code == 0
    records = json.loads((out / "localizations.json").read_text())
    assert [r["image"] for r in records] == [*paths, str(rgb)]
    for record, (w, h) in zip(records, [(64, 64), (64, 64), (80, 72)]):
        x0, y0, x1, y1 = record["box"]
        assert 0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h and 0 <= record["label"] < 10
    assert (out / "grid.png").is_file() and "box [" in capsys.readouterr().out


def test_localize_with_a_factory_from_a_file_and_resizing(tmp_path):
    factory = tmp_path / "my_model.py"
    factory.write_text("from rethinkcam_fast.models import DigitsCAMNet\n\n"
                       "def make():\n    return DigitsCAMNet('gap', widths=(4, 8, 8))\n")
    paths = _write_canvases(tmp_path, 1)
    out = tmp_path / "out"
    code = cli.main(["localize", *paths, "--model", f"{factory}:make", "--image-size", "48", "--method", "gradcam",
                     "--box-threshold", "pas", "--out", str(out)])
    assert code == 0
    (record,) = json.loads((out / "localizations.json").read_text())
    x0, y0, x1, y1 = record["box"]
    assert 0 <= x0 <= x1 < 64 and 0 <= y0 <= y1 < 64  # the map is resized back to the image's own 64x64


def test_localize_bad_input_is_a_clear_error(tmp_path, capsys):
    good = _write_canvases(tmp_path, 1)[0]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)
    bad_weights = tmp_path / "bad.pt"
    bad_weights.write_bytes(b"random bytes, not a zip")
    other_arch = tmp_path / "other.pt"
    save_checkpoint(str(other_arch), DigitsCAMNet("tap", widths=(4, 8, 8)))
    model = ["--model", "rethinkcam_fast.models:DigitsCAMNet"]
    factories = tmp_path / "factories.py"
    factories.write_text("def needs_args(width):\n    return None\n\ndef fails():\n    raise RuntimeError('no GPU here')\n")
    broken = tmp_path / "broken.py"
    broken.write_text("def make(:\n")
    cases = [
        ([good, "--model", f"{factories}:needs_args"], "needs_args() raised TypeError"),
        ([good, "--model", f"{factories}:fails"], "building the model failed"),
        ([good, "--model", f"{broken}:make"], "cannot import"),
        ([str(tmp_path / "missing.png"), *model, "--weights", SHIPPED_WEIGHTS], "image not found"),
        ([str(corrupt), *model, "--weights", SHIPPED_WEIGHTS], "not a readable image"),
        ([good, *model, "--weights", str(bad_weights)], "not a readable PyTorch weights file"),
        ([good, *model, "--weights", str(tmp_path / "none.pt")], "weights file not found"),
        ([good, "--model", "rethinkcam_fast.models:not_there", "--weights", SHIPPED_WEIGHTS], "no attribute"),
        ([good, "--model", "no_such_module_xyz:f"], "cannot import"),
        ([good, "--model", "not_a_torchvision_model_xyz"], "not_a_torchvision_model_xyz"),
    ]
    for argv, message in cases:
        assert cli.main(["localize", *argv, "--out", str(tmp_path / "o")]) == 2, argv
        assert message in capsys.readouterr().err, argv
        assert not (tmp_path / "o").exists(), argv  # nothing written, no empty output folder left
    # A weights file of another architecture: the builder follows the checkpoint's record for our
    # own model, so use a bare state dict against the default architecture.
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(str(other_arch), weights_only=True)["state_dict"], str(bare))
    assert cli.main(["localize", good, *model, "--weights", str(bare), "--out", str(tmp_path / "o")]) == 2
    assert "another architecture" in capsys.readouterr().err


def test_box_metrics_count_one_threshold_for_the_whole_dataset():
    gt = torch.tensor([[4, 4, 11, 11], [20, 20, 27, 27], [0, 0, 7, 7]])
    cams = torch.zeros(3, 32, 32)
    for cam, (x0, y0, x1, y1) in zip(cams, gt.tolist()):
        cam[y0 : y1 + 1, x0 : x1 + 1] = 1.0
    cams[2] = 0.0
    cams[2, 24:32, 24:32] = 1.0  # image 2 is localized in the wrong place
    labels = torch.tensor([1, 2, 3])
    metrics = wsol_box_metrics(cams, gt, labels, torch.tensor([1, 2, 0]),
                               fixed_thresholds={"half": torch.full((3,), 127)})
    assert isinstance(metrics, LocalizationMetrics) and metrics.num_images == 3
    assert metrics.max_box_acc == pytest.approx(200 / 3) and metrics.max_box_acc_v2 == pytest.approx(200 / 3)
    assert metrics.top1_loc == pytest.approx(200 / 3)
    assert metrics.top1_cls == pytest.approx(200 / 3) and metrics.fixed_top1_loc == {"half": pytest.approx(200 / 3)}
    wrong_class = wsol_box_metrics(cams, gt, labels, torch.tensor([0, 2, 3]))
    assert wrong_class.max_box_acc == pytest.approx(200 / 3) and wrong_class.top1_loc == pytest.approx(100 / 3)
    # The PaS standard cuts at t * p90 instead of t * max. On a 0.3 background, a box covering 6 % of the
    # map leaves p90 at the background level: every t < 1 keeps the whole map, so nothing is localized.
    lifted = cams.clamp_min(0.3)
    assert wsol_box_metrics(lifted, gt, labels, labels).max_box_acc == pytest.approx(200 / 3)
    pas = wsol_box_metrics(lifted, gt, labels, labels, percentile=90.0)
    assert pas.threshold_standard == "p90" and pas.max_box_acc == 0.0
    with pytest.raises(ValueError, match="no images"):
        wsol_box_metrics(cams[:0], gt[:0], labels[:0], labels[:0])


def test_percentile_standard_matches_numpy():
    from rethinkcam_fast.localize import sweep_levels

    generator = torch.Generator().manual_seed(0)
    cams = torch.rand(5, 17, 23, generator=generator) ** 3
    t = np.arange(0, 1, 0.01)
    levels = sweep_levels(cams, t, percentile=90.0)
    for cam, row in zip(cams, levels):
        standard = np.percentile(np.uint8(255 * cam.numpy()), 90.0)
        assert row.tolist() == np.floor(t * standard).astype(np.int64).tolist()
    assert torch.equal(sweep_levels(cams, t), rethinkcam_fast.protocol_thresholds(cams, t))


def test_16_bit_grey_images_are_scaled_not_clipped(tmp_path):
    """Pillow's convert('L') clips 16-bit pixels at 255 (a 16-bit image turns white); read_image
    keeps the top 8 bits instead, for grey and RGB models."""
    import numpy as np
    from PIL import Image

    from rethinkcam_fast.imageio import read_image

    pixels = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(pixels).save(path)  # mode I;16
    grey = read_image(str(path), channels=1)[0].numpy()
    assert np.array_equal(grey, (pixels >> 8).astype(np.uint8))
    rgb = read_image(str(path), channels=3).numpy()
    assert all(np.array_equal(rgb[c], grey) for c in range(3))


def test_localize_with_non_finite_logits_writes_null_scores_and_warns(tmp_path, capsys):
    """Damaged (NaN) weights: the JSON stays JSON (``null``, not a bare ``NaN``), the grid is drawn, and
    one warning line says how many images got non-finite logits."""
    paths = _write_canvases(tmp_path, 2)
    model = DigitsCAMNet("gap", widths=(4, 8, 8))
    nan_weights = tmp_path / "nan.pt"
    torch.save({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                for k, v in model.state_dict().items()}, str(nan_weights))
    out = tmp_path / "out"
    factory = tmp_path / "m.py"
    factory.write_text("from rethinkcam_fast.models import DigitsCAMNet\n\ndef make():\n"
                       "    return DigitsCAMNet('gap', widths=(4, 8, 8))\n")
    assert cli.main(["localize", *paths, "--model", f"{factory}:make", "--weights", str(nan_weights),
                     "--out", str(out)]) == 0
    text = (out / "localizations.json").read_text()
    records = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert [r["score"] for r in records] == [None, None] and all(r["box"] == [0, 0, 0, 0] for r in records)
    captured = capsys.readouterr()
    assert "score nan" in captured.out and "2 of 2 image(s) got non-finite logits" in captured.err
    assert (out / "grid.png").is_file()


def test_localize_refuses_to_overwrite_an_input_image(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    photo = out / "grid.png"  # an input that is where the grid would be written
    os.replace(_write_canvases(tmp_path, 1)[0], photo)
    before = photo.read_bytes()
    assert cli.main(["localize", str(photo), "--model", "rethinkcam_fast.models:DigitsCAMNet", "--weights",
                     SHIPPED_WEIGHTS, "--out", str(out)]) == 2
    assert "would destroy the image" in capsys.readouterr().err
    assert photo.read_bytes() == before and not (out / "localizations.json").exists()


def test_localize_draws_the_first_images_of_many(tmp_path, monkeypatch):
    """Every image is in the JSON; the grid holds the first --grid ones (a grid of thousands would be a
    huge picture, and every tile was kept in memory until the end)."""
    from rethinkcam_fast import localize

    drawn = []
    monkeypatch.setattr(localize, "save_grid", lambda path, tiles, captions, columns=4: drawn.append(len(tiles)))
    paths = _write_canvases(tmp_path, 3)
    argv = ["localize", *paths, "--model", "rethinkcam_fast.models:DigitsCAMNet", "--weights", SHIPPED_WEIGHTS]
    assert cli.main([*argv, "--out", str(tmp_path / "a"), "--grid", "2"]) == 0
    assert drawn == [2] and len(json.loads((tmp_path / "a" / "localizations.json").read_text())) == 3
    assert cli.main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert drawn == [2, 3]


def test_localize_max_threshold_is_a_fifth_of_the_maps_maximum(tmp_path):
    """--box-threshold max is plain CAM thresholding, 0.2 x max: level int(0.2 * 255) = 51 of a map
    normalised to [0, 1]; pas is 0.35 x the 90th percentile of the levels."""
    paths = _write_canvases(tmp_path, 2)
    argv = ["localize", *paths, "--model", "rethinkcam_fast.models:DigitsCAMNet", "--weights", SHIPPED_WEIGHTS]
    assert cli.main([*argv, "--out", str(tmp_path / "max"), "--box-threshold", "max"]) == 0
    records = json.loads((tmp_path / "max" / "localizations.json").read_text())
    assert [r["threshold"] for r in records] == [51, 51]


def test_a_failed_localize_removes_every_folder_it_made(tmp_path, capsys):
    nested = tmp_path / "a" / "b" / "c"
    assert cli.main(["localize", str(tmp_path / "missing.png"), "--model", "rethinkcam_fast.models:DigitsCAMNet",
                     "--weights", SHIPPED_WEIGHTS, "--out", str(nested)]) == 2
    assert "image not found" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_the_rethinkcam_command_imports_a_model_module_from_the_working_folder(tmp_path):
    """`python -m rethinkcam_fast` has the working folder on the import path, the `rethinkcam` console
    script does not: --model mymodel:make finds mymodel.py there all the same."""
    import shutil
    import subprocess
    import sys

    script = shutil.which("rethinkcam", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the rethinkcam console script is not installed next to this interpreter")
    (tmp_path / "mymodel.py").write_text("from rethinkcam_fast.models import DigitsCAMNet\n\n"
                                         "def make():\n    return DigitsCAMNet('gap', widths=(4, 8, 8))\n")
    paths = _write_canvases(tmp_path, 1)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([script, "localize", *paths, "--model", "mymodel:make", "--out", str(tmp_path / "out")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "(random for a torchvision name)" not in run.stderr and "no --weights" in run.stderr
