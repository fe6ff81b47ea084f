"""The CLI: subcommands and their help (the demo, train and localize jobs are tested in test_demo.py)."""

from __future__ import annotations

import pytest

from rethinkcam_fast import cli


def test_cli_info_reports_live_paths(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "native CPU kernels : yes" in out and "CUDA extension" in out


@pytest.mark.parametrize("command", ["demo", "train", "localize"])
def test_subcommands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0 and "--out" in capsys.readouterr().out


def test_train_cli_writes_a_checkpoint_and_the_dataset(tmp_path, capsys):
    from rethinkcam_fast.datasets import load_wsol_split
    from rethinkcam_fast.models import load_checkpoint

    out = tmp_path / "m.pt"
    code = cli.main(["train", "--out", str(out), "--pool", "gap", "--widths", "4", "8", "8", "--epochs", "1",
                     "--train-size", "64", "--val-size", "16", "--test-size", "8", "--canvas-size", "32",
                     "--seed", "4", "--data-out", str(tmp_path / "data"), "--quiet"])
    assert code == 0 and "trained gap model" in capsys.readouterr().out
    model, meta = load_checkpoint(str(out))
    assert model.arch["widths"] == [4, 8, 8] and meta["data"]["seed"] == 4 and meta["data"]["canvas_size"] == 32
    assert len(load_wsol_split(str(tmp_path / "data"), "test")) == 8


def test_bad_arguments_and_weights_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--out", str(tmp_path / "m.pt"), "--tau", "1.5"])
    assert exit_info.value.code == 2 and "must lie in [0, 1)" in capsys.readouterr().err
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 truncated zip")
    assert cli.main(["demo", "--weights", str(broken), "--out", str(tmp_path / "d")]) == 2
    assert "not a readable PyTorch weights file" in capsys.readouterr().err
