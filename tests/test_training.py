"""Training smoke test, checkpoints (atomic write, weights_only load, wrong architecture), progress bar."""

from __future__ import annotations

import io
import os
import re

import pytest
import torch

from rethinkcam_fast import models
from rethinkcam_fast.datasets import ClutteredDigitsConfig, generate_cluttered_digits
from rethinkcam_fast.models import CheckpointError, DigitsCAMNet, load_checkpoint, load_state_into, save_checkpoint
from rethinkcam_fast.training import ProgressBar, TrainOptions, classify, train_digits_model

# Learnable in a few steps: no clutter, small canvases.
TINY_DATA = ClutteredDigitsConfig(canvas_size=32, digit_size=(12, 20), clutter=0,
                                  counts={"train": 128, "val": 32, "test": 0}, seed=1)
TINY_WIDTHS = (8, 16, 16)


@pytest.fixture(scope="module")
def tiny_splits():
    return generate_cluttered_digits(TINY_DATA)


def _train(splits, checkpoint=None, epochs=3, widths=TINY_WIDTHS):
    options = TrainOptions(epochs=epochs, batch_size=32, lr=1e-2, seed=3, device="cpu")
    return train_digits_model("tap", 0.1, widths, options, TINY_DATA, splits, checkpoint, progress=False)


def test_training_learns_and_checkpoints_every_epoch(tmp_path, tiny_splits):
    path = str(tmp_path / "ckpt" / "model.pt")
    report = _train(tiny_splits, path)
    assert len(report.train_loss) == 3 and all(torch.isfinite(torch.tensor(report.train_loss)))
    assert report.train_loss[-1] < 0.92 * report.train_loss[0]  # it learns (2.3 = chance for 10 classes)
    assert len(report.val_accuracy) == 3 and 0 <= report.val_accuracy[-1] <= 100
    assert not report.model.training and report.device == "cpu"
    assert os.listdir(tmp_path / "ckpt") == ["model.pt"]  # no temporary file left behind
    loaded, meta = load_checkpoint(path)
    assert meta["epoch"] == 3 and meta["data"]["seed"] == 1 and meta["options"]["epochs"] == 3
    assert meta["train_loss"] == report.train_loss and loaded.arch == report.model.arch
    x = tiny_splits["val"].float_images()
    torch.testing.assert_close(loaded(x), report.model(x), rtol=0, atol=0)
    assert classify(report.model, x).shape == (len(x),)


def test_training_is_seeded(tiny_splits):
    small = {"train": tiny_splits["train"].subset(64)}
    first, again = _train(small, epochs=1, widths=(4, 8, 8)), _train(small, epochs=1, widths=(4, 8, 8))
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[name]), name
    init = DigitsCAMNet("tap", widths=(4, 8, 8))
    assert not torch.equal(init.classifier.weight, first.model.classifier.weight)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "model.pt")
    first = DigitsCAMNet("gap", widths=TINY_WIDTHS)
    save_checkpoint(path, first, {"note": "first"})
    before = open(path, "rb").read()

    def crash(obj, fh, *args, **kwargs):
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(models.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, DigitsCAMNet("tap", widths=TINY_WIDTHS))
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["model.pt"]
    monkeypatch.undo()
    model, meta = load_checkpoint(path)
    assert meta == {"note": "first"} and model.arch["pool"] == "gap"


def test_loads_only_with_weights_only(tmp_path, monkeypatch):
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, DigitsCAMNet("tap", widths=TINY_WIDTHS))
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(models.torch, "load", spy)
    load_checkpoint(path)
    assert calls == [True]


class _Payload:  # any class at all: a full pickle would run code to rebuild it
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickled_code_missing_and_corrupt_files_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "x": _Payload()}, str(evil))
    with pytest.raises(CheckpointError, match="holds pickled Python objects, not only tensors"):
        load_checkpoint(str(evil))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 20)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(str(corrupt))
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    plain = tmp_path / "plain.pt"
    torch.save([torch.zeros(1)], str(plain))
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_checkpoint(str(plain))


def test_wrong_architecture_is_named(tmp_path):
    path = str(tmp_path / "small.pt")
    save_checkpoint(path, DigitsCAMNet("tap", widths=TINY_WIDTHS))
    state = torch.load(path, weights_only=True)["state_dict"]
    with pytest.raises(CheckpointError, match=r"another architecture .*shape mismatch"):
        load_state_into(DigitsCAMNet("tap"), state, path)
    with pytest.raises(CheckpointError, match="missing"):
        load_state_into(DigitsCAMNet("tap", widths=TINY_WIDTHS), {k: v for k, v in state.items() if "classifier" not in k},
                        path)
    bare = str(tmp_path / "bare.pt")
    torch.save(state, bare)
    with pytest.raises(CheckpointError, match="not a rethinkcam_fast.digits_cam_net/1 checkpoint"):
        load_checkpoint(bare)


def test_weights_saved_from_wrapped_models_load():
    """DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes, stacked in either order
    (``torch.compile(DDP(model))`` saves ``_orig_mod.module.*``)."""
    from rethinkcam_fast.models import state_dict_of

    model = DigitsCAMNet("tap", widths=TINY_WIDTHS)
    state = model.state_dict()
    for prefix in ("", "module.", "_orig_mod.", "_orig_mod.module.", "module._orig_mod."):
        wrapped = {prefix + k: v for k, v in state.items()}
        fresh = load_state_into(DigitsCAMNet("tap", widths=TINY_WIDTHS), state_dict_of(wrapped, prefix), prefix)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items()), prefix

    class Holder(torch.nn.Module):  # a model whose network is a child called "module"
        def __init__(self):
            super().__init__()
            self.module = torch.nn.Linear(3, 2)

    holder = Holder()
    for prefix in ("", "module.", "_orig_mod.module."):  # as saved plain, through DDP, through compile(DDP)
        wrapped = {prefix + k: v for k, v in holder.state_dict().items()}
        fresh = load_state_into(Holder(), state_dict_of(wrapped, prefix), prefix)
        assert torch.equal(fresh.module.weight, holder.module.weight), prefix


def test_progress_bar_prints_one_line_per_epoch_when_not_a_terminal():
    stream = io.StringIO()
    bar = ProgressBar(4, "epoch 1/1", stream=stream)
    for _ in range(4):
        bar.update(loss=0.5)
    bar.close(loss=0.25)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("epoch 1/1 [####") and "4/4" in lines[0] and "loss 0.25" in lines[0]


def test_progress_bar_redraws_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    bar = ProgressBar(2, "epoch 1/1", stream=stream, refresh=0.0)
    bar.update(loss=torch.tensor(2.0))
    bar.update(loss=torch.tensor(1.0))
    bar.close(loss=1.0)
    text = stream.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and "1/2 " in text and "loss 2\r" in text


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="epochs"):
        TrainOptions(epochs=0)
    with pytest.raises(ValueError, match="pool"):
        DigitsCAMNet("max")
    from rethinkcam_fast.training import train_model

    with pytest.raises(TypeError, match="DigitsCAMNet only"):
        train_model(torch.nn.Linear(2, 2), None, TrainOptions(), checkpoint_path="x.pt")


def test_ablation_script_smoke(tmp_path, capsys):
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py"
    spec = importlib.util.spec_from_file_location("bench_ablation", path)
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    out = tmp_path / "ablation.json"
    threads = torch.get_num_threads()
    try:
        assert ablation.main(["--seeds", "0", "--epochs", "1", "--train-size", "64", "--test-size", "40",
                              "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    record = json.loads(out.read_text())
    rows = record["per_seed"][0]["rows"]
    assert list(rows) == [name for name, *_ in ablation.ROWS] and rows["+ PaS"]["threshold_standard"] == "p90"
    assert all(0 <= row[key] <= 100 for row in rows.values() for key, _ in ablation.COLUMNS)
    assert "| + NWC |" in (tmp_path / "ablation.md").read_text() and "| CAM (GAP) |" in capsys.readouterr().out


def test_custom_loss_with_a_differentiable_cam_term(tiny_splits):
    """train_model's loss_fn hook: a CAM term through class_activation_map changes the result, and a
    term that is identically zero does not (same seed, same data)."""
    from rethinkcam_fast import class_activation_map
    from rethinkcam_fast.training import cross_entropy_loss, train_model

    small = tiny_splits["train"].subset(64)
    options = TrainOptions(epochs=1, batch_size=32, lr=1e-2, seed=3, device="cpu")
    calls = []

    def with_cam_term(scale):
        def loss_fn(model, images, labels):
            features = model.features(images)
            logits = model.classifier(model.pool(features).flatten(1))
            cam = class_activation_map(features, model.classifier.weight, labels, output_size=tuple(images.shape[2:]))
            calls.append(cam.shape)
            return torch.nn.functional.cross_entropy(logits, labels) + scale * cam.mean()
        return loss_fn

    def trained(loss_fn):
        torch.manual_seed(3)
        return train_model(DigitsCAMNet("tap", widths=(4, 8, 8)), small, options, progress=False,
                           loss_fn=loss_fn).model.state_dict()

    plain = trained(cross_entropy_loss)
    zero = trained(with_cam_term(0.0))
    area = trained(with_cam_term(5.0))
    assert calls and calls[0] == (32, 32, 32)
    for name, value in plain.items():
        torch.testing.assert_close(zero[name], value, rtol=1e-5, atol=1e-6)  # CE + 0 x term == CE
    assert any(not torch.allclose(area[name], value) for name, value in plain.items() if value.is_floating_point())


def test_checkpoint_records_the_options_as_applied(tmp_path, tiny_splits):
    """On the CPU neither bf16 autocast nor channels_last is applied: the checkpoint must say so, with
    the resolved device and the thread count."""
    from rethinkcam_fast.training import applied_options

    path = str(tmp_path / "m.pt")
    options = TrainOptions(epochs=1, batch_size=32, seed=3, device="auto", amp=True, channels_last=True)
    train_digits_model("tap", 0.1, (4, 8, 8), options, TINY_DATA, {"train": tiny_splits["train"].subset(32)}, path,
                       progress=False)
    meta = load_checkpoint(path)[1]
    assert meta["options"]["device"] == "cpu" and meta["options"]["amp"] is False
    assert meta["options"]["channels_last"] is False and meta["threads"] == torch.get_num_threads()
    assert TrainOptions(**meta["options"]) == applied_options(options, torch.device("cpu"))
    on_gpu = applied_options(options, torch.device("cuda", 0))
    assert on_gpu.amp and on_gpu.channels_last and on_gpu.device == "cuda:0"
    assert "channels_last_on_cpu" not in TrainOptions.__doc__


def _cli_error(argv, capsys) -> tuple[int, str]:
    from rethinkcam_fast import cli

    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_train_cli_data_out_errors_come_before_any_work(tmp_path, capsys, monkeypatch):
    from rethinkcam_fast import datasets

    def no_work(*args, **kwargs):
        raise AssertionError("the data was generated before the arguments were checked")

    monkeypatch.setattr(datasets, "generate_cluttered_digits", no_work)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = tmp_path / "new" / "m.pt"
    train = ["train", "--out", str(out), "--epochs", "1", "--train-size", "8", "--quiet"]
    code, err = _cli_error([*train, "--data-out", str(a_file)], capsys)
    assert code == 2 and err == f"rethinkcam: error: --data-out {a_file}: exists and is not a directory\n"
    assert not (tmp_path / "new").exists()  # the --out folder it made is removed again
    blocked = tmp_path / "data"
    blocked.mkdir()
    (blocked / "ClutteredDigits").write_text("x")
    code, err = _cli_error([*train, "--data-out", str(blocked)], capsys)
    assert code == 2 and "ClutteredDigits exists and is not a directory" in err
    code, err = _cli_error([*train, "--data-out", str(a_file / "sub")], capsys)
    assert code == 2 and err.startswith(f"rethinkcam: error: --data-out {a_file / 'sub'}: {a_file} is a file, not a "
                                        "directory")
    code, err = _cli_error([*train, "--data-out", str(tmp_path / "fresh"), "--seed", "-1"], capsys)
    assert code == 2 and "--seed must be >= 0" in err
    code, err = _cli_error([*train, "--seed", str(2**64)], capsys)  # (torch.manual_seed's range, before any data)
    assert code == 2 and "< 2**64" in err
    assert not (tmp_path / "fresh").exists()  # the --data-out folder it made is removed again


def test_train_cli_help_says_what_compile_compiles(capsys):
    from rethinkcam_fast import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "torch.compile the training loss function" in text and "torch.compile the model" not in text


def _example():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_with_cam_loss.py"
    spec = importlib.util.spec_from_file_location("train_with_cam_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--train-size", "0"], "argument --train-size: must be a positive integer, got 0"),
    (["--test-size", "0"], "argument --test-size: must be a positive integer, got 0"),
    (["--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
    (["--weight", "nan"], "argument --weight: must be a finite number >= 0, got nan"),
    (["--weight", "inf"], "argument --weight: must be a finite number >= 0, got inf"),
    (["--seeds", "0", "-1"], "argument --seeds: must be a non-negative integer, got -1"),
    (["--device", "tpu"], "--device tpu: not a device"),
    (["--json", "."], "--json .: is a directory"),
    (["--json", "/no/such/folder/x.json"], "--json /no/such/folder/x.json: the folder /no/such/folder does not exist"),
])
def test_example_checks_its_options_before_any_work(argv, message, capsys, monkeypatch):
    example = _example()
    monkeypatch.setattr(example, "generate_cluttered_digits", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(SystemExit) as exit_info:
        example.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_example_docstring_does_not_claim_a_whole_graph_for_the_shift_loss():
    doc = " ".join(_example().__doc__.split())
    assert "compiles the whole loss" not in doc and "graph break" in doc


def test_an_interrupted_training_run_resumes_to_the_same_weights(tmp_path, capsys, monkeypatch):
    """`rethinkcam train` stopped after its first epoch (Ctrl-C) and continued with --resume ends with
    the weights of the run that was never stopped (CPU, the one thread it recorded, applied by --resume
    itself); the last checkpoint carries no
    training state, and a finished or foreign file has nothing to resume."""
    from rethinkcam_fast import cli, training
    from rethinkcam_fast.models import read_weights

    train = ["train", "--epochs", "2", "--train-size", "48", "--val-size", "8", "--test-size", "0",
             "--canvas-size", "24", "--widths", "4", "4", "4", "--batch-size", "16", "--threads", "1", "--quiet"]
    previous = torch.get_num_threads()
    try:
        whole = tmp_path / "whole.pt"
        assert cli.main([*train, "--out", str(whole)]) == 0
        stopped = tmp_path / "stopped.pt"
        save = training.save_checkpoint

        def save_then_interrupt(path, model, meta, resume=None):
            save(path, model, meta, resume)
            if meta["epoch"] == 1:
                raise KeyboardInterrupt

        monkeypatch.setattr(training, "save_checkpoint", save_then_interrupt)
        assert cli.main([*train, "--out", str(stopped)]) == 130
        monkeypatch.setattr(training, "save_checkpoint", save)
        assert read_weights(str(stopped))["resume"]["epoch"] == 1
        torch.set_num_threads(2)  # (a new process's default: --resume applies the run's recorded count)
        assert cli.main(["train", "--out", str(stopped), "--resume", "--quiet"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    got, want = read_weights(str(stopped)), read_weights(str(whole))
    assert "resume" not in got and "resume" not in want
    assert got["meta"]["epoch"] == 2 and got["meta"]["train_loss"] == want["meta"]["train_loss"]
    for key, value in want["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key
    capsys.readouterr()
    assert cli.main(["train", "--out", str(whole), "--resume"]) == 2
    assert "nothing to resume (the run finished)" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(tmp_path / "missing.pt"), "--resume"]) == 2
    assert "is not a checkpoint file" in capsys.readouterr().err


def test_a_malformed_training_state_is_one_line_naming_the_file(tmp_path, capsys):
    """`rethinkcam train --resume` on a checkpoint of the right format whose training state is
    incomplete or from another version: one line, exit code 2, before any data is generated."""
    from rethinkcam_fast import cli

    model = DigitsCAMNet("tap", widths=TINY_WIDTHS)
    state = {"optimizer": {}, "schedule": {}, "order": torch.zeros(1), "rng": torch.zeros(1), "epoch": 1,
             "train_loss": [1.0], "val_accuracy": [0.5]}
    cases = {
        "unknown_field": ({"data": {"bogus": 1}, "options": {}}, state, "recorded data or options are not this "
                                                                       "version's .*bogus"),
        "data_not_a_mapping": ({"data": [1, 2], "options": {}}, state, "recorded data or options"),
        "no_optimizer": ({"data": {}, "options": {}}, {k: v for k, v in state.items() if k != "optimizer"},
                         r"not a complete training state \(no optimizer\)"),
        "bad_optimizer": ({"data": {"canvas_size": 24, "digit_size": [10, 14], "counts": {"train": 8, "val": 0, "test": 0}},
                           "options": {"epochs": 2, "batch_size": 8, "device": "cpu"}}, state,
                          "training state does not fit this run"),
    }
    for name, (meta, resume, message) in cases.items():
        path = str(tmp_path / f"{name}.pt")
        save_checkpoint(path, model, meta=meta, resume=resume)
        assert cli.main(["train", "--out", path, "--resume", "--quiet"]) == 2, name
        err = capsys.readouterr().err
        assert re.search(f"{re.escape(path)}: .*{message}", err) and "Traceback" not in err, (name, err)
        assert len(err.strip().splitlines()) == 1, err


def test_weights_torch_cannot_copy_in_are_refused_with_the_reason(tmp_path):
    model = DigitsCAMNet("tap", widths=TINY_WIDTHS)
    state = {k: (v.to_sparse() if v.dim() == 2 else v) for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"x\.pt: its weights cannot be loaded into DigitsCAMNet \(.*sparse"):
        load_state_into(DigitsCAMNet("tap", widths=TINY_WIDTHS), state, "x.pt")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"not written by torch.save, or damaged: \w+\)"):
        load_checkpoint(str(empty))
    with pytest.raises(CheckpointError, match=f"{tmp_path}: not a regular file"):
        load_checkpoint(str(tmp_path))


def test_the_learning_rate_warms_up_to_its_peak_exactly_once():
    from rethinkcam_fast.training import warmup_cosine

    factor = warmup_cosine(50, 0.2)  # ten warm-up steps
    values = [factor(step) for step in range(50)]
    assert values[:10] == [(s + 1) / 10 for s in range(10)] and values[10] == 1.0
    assert max(values) == 1.0 and all(b < a for a, b in zip(values[10:], values[11:]))
