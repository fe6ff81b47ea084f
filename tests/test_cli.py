"""The CLI: subcommands and their help (the demo, train and localize jobs are tested in test_demo.py)."""

from __future__ import annotations

import os
import signal
import threading
import time

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
    with pytest.raises(SystemExit) as exit_info:  # the bound itself: TAP's tau < 1
        cli.main(["train", "--out", str(tmp_path / "m.pt"), "--tau", "1.0"])
    assert exit_info.value.code == 2 and "must lie in [0, 1), got 1.0" in capsys.readouterr().err
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 truncated zip")
    assert cli.main(["demo", "--weights", str(broken), "--out", str(tmp_path / "d")]) == 2
    assert "not a readable PyTorch weights file" in capsys.readouterr().err


def test_user_mistakes_are_one_line_errors_before_any_work(tmp_path, capsys, monkeypatch):
    """Each of these used to end in a traceback (or, for a missing --weights, in silent random output)."""
    import numpy as np
    import torch
    from PIL import Image

    monkeypatch.chdir(tmp_path)  # (the default output folders are made here, and removed after a failure)

    image = tmp_path / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(image)
    model = ["--model", "rethinkcam_fast.models:digits_cam_net"]

    def error_of(argv: list[str]) -> str:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.splitlines()[-1].startswith("rethinkcam: error: ") and "Traceback" not in err
        return err.splitlines()[-1]

    if not torch.cuda.is_available():
        for argv in (["localize", str(image), *model], ["train", "--out", str(tmp_path / "m.pt")],
                     ["video", "--demo", "--jsonl", str(tmp_path / "b.jsonl")]):
            assert "--device cuda" in error_of([*argv, "--device", "cuda"])
    assert "not a device" in error_of(["localize", str(image), *model, "--device", "gpu0"])
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert f"{a_file} is a file, not a directory" in error_of(["train", "--out", str(a_file / "m.pt")])
    train = ["train", "--out", str(tmp_path / "m.pt"), "--epochs", "1", "--train-size", "8"]
    for flags, message in ((["--canvas-size", "7"], "at least 8"), (["--pool", "gap", "--tau", "0.2"], "--pool tap"),
                           (["--lr", "inf"], "lr must be"),
                           (["--lr", "0"], "lr must be"), (["--seed", "-1"], "--seed"),
                           (["--val-size", "-1"], "non-negative"), (["--device", "meta"], "not supported")):
        assert message in error_of([*train, *flags]), flags
    assert "or --demo for the built-in clip" in error_of(["video", "--jsonl", str(tmp_path / "b.jsonl")])
    # Output paths are checked before the work, not after it.
    assert "exists and is not a directory" in error_of(["demo", "--out", str(a_file)])
    assert "exists and is not a directory" in error_of(["localize", str(image), *model, "--out", str(a_file)])
    assert "is a directory" in error_of(["video", "--demo", "--jsonl", str(tmp_path)])
    assert "--fps must be a positive" in error_of(["video", "--demo", "--jsonl", str(tmp_path / "b.jsonl"), "--fps", "-1"])
    assert "leave out --model" in error_of(["video", "--demo", "--jsonl", str(tmp_path / "b.jsonl"), *model])
    assert f"{a_file} is a file, not a directory" in error_of(["video", "--demo", "--jsonl", str(a_file / "x.jsonl")])
    outputs = tmp_path / "outputs"
    (outputs / "grid.png").mkdir(parents=True)  # a folder where localize writes its grid: refused before the run
    assert "grid.png is a directory, where the command writes a file" in error_of(
        ["localize", str(image), *model, "--out", str(outputs)])
    assert not (outputs / "localizations.json").exists()
    assert "is a directory" in error_of(["video", "--demo", "--out", str(tmp_path / "new" / "x.mp4"),
                                         "--jsonl", str(tmp_path)])
    assert not (tmp_path / "new").exists()  # the folder made for --out is removed again after the failure
    pickled = tmp_path / "whole_model.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)
    assert "torch.save(model)" in error_of(["localize", str(image), *model, "--weights", str(pickled)])
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(tiny)
    assert "the model failed on the input" in error_of(["localize", str(tiny), *model])
    assert not (tmp_path / "rethinkcam_localize").exists()  # no empty default output folder left behind
    # No --weights: it runs, but says the model has its factory's (random) weights.
    assert cli.main(["localize", str(image), *model, "--out", str(tmp_path / "loc")]) == 0
    assert "warning: no --weights" in capsys.readouterr().err


def test_version(capsys):
    import rethinkcam_fast

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"rethinkcam_fast {rethinkcam_fast.__version__}"


def test_an_interrupted_command_ends_with_one_line(monkeypatch, capsys):
    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_info", interrupted)
    assert cli.main(["info"]) == 130
    assert capsys.readouterr().err.strip() == "rethinkcam: interrupted"

    if threading.current_thread() is not threading.main_thread():  # (no handler: SIGTERM would end the run)
        pytest.skip("signal handlers need the main thread")

    def terminated(_args):  # SIGTERM, as the handler main() installs delivers it
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # (the handler raises in the main thread before this returns)

    monkeypatch.setattr(cli, "_cmd_info", terminated)
    assert cli.main(["info"]) == 143
    assert capsys.readouterr().err.strip() == "rethinkcam: terminated"


def test_iou_thresholds_given_as_fractions_are_refused(capsys):
    from rethinkcam_fast.evaluation.cli import _percentage

    assert _percentage("50") == 50 and _percentage("0") == 0
    with pytest.raises(Exception, match="looks like a fraction"):
        _percentage("0.5")


def test_the_cli_method_choices_are_the_engines():
    from rethinkcam_fast.cli import CAM_METHODS
    from rethinkcam_fast.engine import METHODS

    assert CAM_METHODS == METHODS


def test_a_closed_stdout_ends_quietly_as_a_shell_tool_does(tmp_path):
    """`rethinkcam ... | head -1`: the reader went away; no BrokenPipeError traceback, SIGPIPE's code."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "rethinkcam_fast", "info"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the first line (Python and torch start up first)
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr


def test_conflicting_flags_and_write_failures_are_one_line_errors(tmp_path, capsys, monkeypatch):
    """Flags a command would silently ignore are refused (as the other commands refuse them), a failed
    write is one line (exit 1), not a traceback, and argparse names a refused value readably."""
    import numpy as np
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    image = tmp_path / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(image)
    model = ["--model", "rethinkcam_fast.models:digits_cam_net"]

    def error_of(argv: list[str], code: int = 2) -> str:
        assert cli.main(argv) == code
        err = capsys.readouterr().err.strip()
        assert err.splitlines()[-1].startswith("rethinkcam: error: ") and "Traceback" not in err
        return err.splitlines()[-1]

    assert "leave out --image-size/--normalize" in error_of(
        ["video", "--demo", "--jsonl", "-", "--image-size", "16"])
    assert "--no-nwc applies to --method cam only" in error_of(
        ["localize", str(image), *model, "--method", "gradcam", "--no-nwc"])
    assert "the model takes one channel" in error_of(["localize", str(image), *model, "--normalize", "imagenet"])
    assert "is a directory; give image files" in error_of(["localize", str(tmp_path), *model])
    (tmp_path / "out" / "localizations.json").mkdir(parents=True)  # a folder where the command writes a file
    assert "localizations.json is a directory, where the command writes a file" in error_of(
        ["demo", "--count", "2", "--out", str(tmp_path / "out")])  # (before the run, not after it)
    with pytest.raises(SystemExit):
        cli.main(["demo", "--count", "1e3"])
    assert "invalid positive integer value: '1e3'" in capsys.readouterr().err


def test_the_video_progress_bar_stays_out_of_logs(tmp_path, capsys):
    """stderr is not a terminal here (a log): no progress-bar redraws, the summary line only."""
    assert cli.main(["video", "--demo", "--frames", "6", "--jsonl", str(tmp_path / "b.jsonl")]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "frame/s" not in captured.err and "frames/s" in captured.out


def test_a_cpu_only_torch_skips_triton_and_says_why(tmp_path):
    """Without a GPU build of torch and without TRITON_INTERPRET, no Triton kernel can run: Triton is
    not imported (half a second of every command), `rethinkcam info` says why, the CPU paths work, and
    a forced Triton backend names the reason."""
    import subprocess
    import sys

    import torch

    if torch.version.cuda or getattr(torch.version, "hip", None):
        pytest.skip("a GPU build of torch loads Triton")
    script = ("import sys, torch, rethinkcam_fast as r\n"
              "print('triton loaded:', 'triton' in sys.modules)\n"
              "x = torch.rand(2, 3, 6, 6)\n"
              "print('tap:', tuple(r.tap(x, 0.1).shape))\n"
              "from rethinkcam_fast.ops.fuse_maps import _fuse_maps_kernel\n"
              "try:\n    _fuse_maps_kernel[(1,)]()\nexcept RuntimeError as e:\n    print('stub:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "triton loaded: False" in run.stdout and "tap: (2, 3)" in run.stdout
    assert "TRITON_INTERPRET is not set, so Triton was not loaded" in run.stdout
    info = subprocess.run([sys.executable, "-m", "rethinkcam_fast", "info"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert "triton             : no: this torch build has no GPU support" in info.stdout, info.stdout
