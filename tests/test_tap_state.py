"""TAP's tau and flatten travel with the weights (state_dict extra state); old state dicts; TorchScript."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import rethinkcam_fast
from rethinkcam_fast import TAP, replace_gap_with_tap


def gap_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5))


def tap_net(tau: float) -> nn.Sequential:
    return replace_gap_with_tap(gap_net(), tau)


def test_tau_and_flatten_are_in_the_state_dict_and_restored_on_load():
    torch.manual_seed(0)
    saved = tap_net(0.3)
    saved[2].flatten = True
    state = saved.state_dict()
    assert state["2._extra_state"].tolist() == [0.3, 1.0] and state["2._extra_state"].dtype == torch.float64
    loaded = tap_net(0.1)
    loaded.load_state_dict(state)
    assert loaded[2].tau == 0.3 and loaded[2].flatten is True
    x = torch.randn(4, 3, 10, 10)
    torch.testing.assert_close(loaded(x), saved(x), rtol=0, atol=0)


def test_tap_state_dict_into_a_gap_model_is_an_unexpected_key():
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"2\._extra_state\""):
        gap_net().load_state_dict(tap_net(0.3).state_dict())


def test_a_state_dict_without_the_entry_still_loads_strictly():
    """Files saved before TAP recorded tau (the shipped model's, users' checkpoints) load as before,
    strict included; the module keeps the tau it was built with (the file does not know it)."""
    old = {k: v for k, v in tap_net(0.3).state_dict().items() if not k.endswith("_extra_state")}
    model = tap_net(0.2)
    assert model.load_state_dict(old).missing_keys == []
    assert model[2].tau == 0.2
    wrong = dict(old, **{"0.weight": old["0.weight"][:1]})  # every other key is still checked
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(wrong)
    del old["0.bias"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"0\.bias\""):
        model.load_state_dict(old)


def test_extra_state_survives_torch_save_with_weights_only():
    buffer = io.BytesIO()
    torch.save(tap_net(0.25).state_dict(), buffer)
    buffer.seek(0)
    model = tap_net(0.1)
    model.load_state_dict(torch.load(buffer, weights_only=True))
    assert model[2].tau == 0.25


@pytest.mark.parametrize("state, message", [
    (torch.tensor([1.5, 0.0], dtype=torch.float64), r"tau \(TAP extra state\) must lie in \[0, 1\)"),
    (torch.tensor([float("nan"), 0.0], dtype=torch.float64), r"must lie in \[0, 1\)"),
    (torch.tensor([0.1, 2.0], dtype=torch.float64), "flatten must be 0 or 1"),
    (torch.zeros(3), r"shape \(2,\), got \(3,\)"),
    ({"tau": 0.1}, r"shape \(2,\), got dict"),
])
def test_bad_extra_state_is_refused(state, message):
    pool = TAP(0.1)
    with pytest.raises(ValueError, match=message):
        pool.load_state_dict({"_extra_state": state})
    assert pool.tau == 0.1


def test_a_checkpoint_round_trip_keeps_tau(tmp_path):
    from rethinkcam_fast.models import DigitsCAMNet, load_checkpoint, save_checkpoint

    path = str(tmp_path / "c.pt")
    save_checkpoint(path, DigitsCAMNet("tap", tau=0.35, widths=(4, 4, 4)))
    model, _ = load_checkpoint(path)
    assert model.pool.tau == 0.35
    assert torch.load(path, weights_only=True)["state_dict"]["pool._extra_state"].tolist() == [0.35, 0.0]


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("flatten", [False, True])
def test_tap_is_scriptable(flatten):
    torch.manual_seed(0)
    model = tap_net(0.3)
    model[2].flatten = flatten
    if flatten:
        model[3] = nn.Identity()
    scripted = torch.jit.script(model)
    x = torch.randn(4, 3, 10, 10, requires_grad=True)
    torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(scripted(x).sum(), x)
    (want,) = torch.autograd.grad(model(x).sum(), x)
    torch.testing.assert_close(grad, want, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(x), model(x), rtol=0, atol=0)
    pool = torch.jit.script(TAP(0.2, flatten=flatten))
    unbatched = torch.rand(3, 5, 4)
    torch.testing.assert_close(pool(unbatched), TAP(0.2, flatten=flatten)(unbatched), rtol=0, atol=0)
    with pytest.raises(Exception, match="3-D or 4-D"):
        pool(torch.rand(5, 4))


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_a_traced_tap_model_saves_and_loads():
    """torch.jit.trace records the registered op, not the Python autograd.Function (which torch.jit.save
    cannot export)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), TAP(0.2, flatten=True), nn.Linear(4, 2))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    traced = torch.jit.trace(model, x)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(loaded(x).sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(model(x).sum(), x)[0], rtol=0, atol=0)


def test_tap_behaves_the_same_in_eval_mode():
    x = torch.randn(2, 4, 5, 5)
    pool = TAP(0.1)
    train_out = pool.train()(x)
    torch.testing.assert_close(pool.eval()(x), train_out, rtol=0, atol=0)
    torch.testing.assert_close(train_out.flatten(1), rethinkcam_fast.tap(x, 0.1), rtol=0, atol=0)
