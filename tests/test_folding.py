"""fold_batchnorm: the same function with fewer layers, kept modules untouched, the caller's model intact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _models import MiniResNet, MiniVGGGAP, make
from rethinkcam_fast import CAMEngine, fold_batchnorm


def _batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _output_of(model: nn.Module, layer: str, images: torch.Tensor) -> torch.Tensor:
    seen = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.setdefault("out", o.clone()))
    try:
        model(images)
    finally:
        handle.remove()
    return seen["out"]


@pytest.fixture
def resnet():
    return make(MiniResNet)


def test_folds_every_batch_norm_and_computes_the_same(resnet):
    images = torch.rand(3, 3, 40, 40)
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    folded = fold_batchnorm(resnet)
    assert _batch_norms(resnet) == 13 and _batch_norms(folded) == 0
    with torch.no_grad():
        torch.testing.assert_close(folded(images), resnet(images), atol=1e-5, rtol=1e-5)
    # the caller's model is untouched: same tensors, same values, its batch norms still there
    after = resnet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p is not q for p in resnet.parameters() for q in folded.parameters())


def test_kept_layer_keeps_its_output_and_is_folded_inside(resnet):
    images = torch.rand(2, 3, 40, 40)
    folded = fold_batchnorm(resnet, keep=[resnet.layer2])
    assert _batch_norms(folded) == 0  # layer2's own batch norms folded too: only its output must hold
    with torch.no_grad():
        torch.testing.assert_close(_output_of(folded, "layer2", images), _output_of(resnet, "layer2", images),
                                   atol=1e-5, rtol=1e-5)


def test_kept_conv_stays_unfolded(resnet):
    images = torch.rand(2, 3, 40, 40)
    folded = fold_batchnorm(resnet, keep=["conv1", "layer1.0.conv2"])
    assert _batch_norms(folded) == 2  # bn1 and layer1.0.bn2 stay after their kept convs
    with torch.no_grad():
        for name in ("conv1", "layer1.0.conv2"):
            torch.testing.assert_close(_output_of(folded, name, images), _output_of(resnet, name, images))
        torch.testing.assert_close(folded(images), resnet(images), atol=1e-5, rtol=1e-5)


def test_nothing_to_fold_returns_a_copy():
    vgg = make(MiniVGGGAP)  # no batch norm
    folded = fold_batchnorm(vgg)
    assert folded is not vgg and _batch_norms(folded) == 0
    images = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(folded(images), vgg(images))


def test_training_mode_batch_norm_is_left_alone(resnet):
    resnet.train()
    resnet.layer1[0].bn1.eval()  # one frozen batch norm in a training model folds; the rest do not
    folded = fold_batchnorm(resnet)
    assert _batch_norms(folded) == 12
    assert folded.training and all(m.training for m in folded.modules() if isinstance(m, nn.BatchNorm2d))


class _SharedOutput(nn.Module):
    """The conv's output feeds its batch norm and a skip connection: folding would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.shared_conv = nn.Conv2d(3, 3, 1)
        self.shared_bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y) + y
        # one batch norm called after two convs, and one conv called twice: neither pair may fold
        return self.shared_bn(self.shared_conv(z)) + self.shared_bn(self.shared_conv(z * 2))


def test_outputs_used_elsewhere_and_shared_modules_stay():
    model = make(_SharedOutput)
    folded = fold_batchnorm(model)
    assert _batch_norms(folded) == 2
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(folded(images), model(images))


def test_channels_last_and_bfloat16_weights_keep_their_layout_and_dtype(resnet):
    model = resnet.to(torch.bfloat16).to(memory_format=torch.channels_last)
    folded = fold_batchnorm(model)
    conv = folded.get_submodule("layer1.0.conv1")
    assert conv.weight.dtype == torch.bfloat16 and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(p.requires_grad for p in folded.parameters())
    images = torch.rand(2, 3, 40, 40, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(folded(images).float(), model(images).float(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++", "layercam"])
def test_engine_on_the_folded_model_gives_the_same_maps(resnet, method):
    images = torch.rand(4, 3, 48, 48)
    folded = fold_batchnorm(resnet, keep=["layer3"])
    kw = {"backend": "reference", "warn_degenerate": False}
    ours = CAMEngine(folded, method, "layer3", **kw)(images)
    theirs = CAMEngine(resnet, method, "layer3", **kw)(images)
    assert torch.equal(ours.labels, theirs.labels)
    torch.testing.assert_close(ours.scores, theirs.scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.cams, theirs.cams, atol=1e-4, rtol=1e-4)


class _ValueBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.bn(self.conv(x))


def test_bad_input_raises_clear_errors(resnet):
    with pytest.raises(TypeError, match="nn.Module"):
        fold_batchnorm("resnet")
    with pytest.raises(ValueError, match="'layer9' is not a submodule"):
        fold_batchnorm(resnet, keep=["layer9"])
    with pytest.raises(ValueError, match="'layer9' is not a submodule"):  # one name, not a list of letters
        fold_batchnorm(resnet, keep="layer9")
    with pytest.raises(ValueError, match="Conv2d is not a submodule"):
        fold_batchnorm(resnet, keep=[nn.Conv2d(1, 1, 1)])
    with pytest.raises(ValueError, match="cannot trace _ValueBranch"):
        fold_batchnorm(make(_ValueBranch))
    # a kept module that cannot be traced on its own is kept whole
    outer = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), _ValueBranch()).eval()
    folded = fold_batchnorm(outer, keep=["2"])
    assert _batch_norms(folded) == 1 and type(folded.get_submodule("2")) is _ValueBranch


def test_hooks_unused_kept_modules_and_parametrized_convs(resnet):
    handle = resnet.layer1.register_forward_hook(lambda m, i, o: None)
    with pytest.raises(ValueError, match=r"\['layer1'\] has hooks"):
        fold_batchnorm(resnet)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        with pytest.raises(ValueError, match="global module hooks"):
            fold_batchnorm(resnet)
    finally:
        handle.remove()
    resnet.unused = nn.Conv2d(3, 3, 1)  # a submodule the forward never calls
    with pytest.raises(ValueError, match="'unused' is not called as a module"):
        fold_batchnorm(resnet, keep=["unused"])
    del resnet.unused

    class ReadsWeights(MiniResNet):  # the classifier's parameters read directly: fx keeps no Linear
        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = torch.flatten(self.avgpool(self.layer3(self.layer2(self.layer1(x)))), 1)
            return nn.functional.linear(x, self.fc.weight, self.fc.bias)

    with pytest.raises(ValueError, match="'fc' is not called as a module"):
        fold_batchnorm(make(ReadsWeights), keep=["fc"])
    # a parametrized weight is computed from others on every call: that conv keeps its batch norm
    torch.nn.utils.parametrizations.weight_norm(resnet.conv1)
    folded = fold_batchnorm(resnet)
    assert _batch_norms(folded) == 1 and isinstance(folded.get_submodule("bn1"), nn.BatchNorm2d)
    images = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(folded(images), resnet(images), atol=1e-5, rtol=1e-5)


def test_folding_leaves_other_threads_models_alone():
    """torch.fx patches nn.Module.__call__ for the whole process while it traces: another thread's
    forward (a service's other requests) must run as it is, not land in the trace."""
    import threading

    from _models import SmallCNN

    other = make(SmallCNN).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = other(x)
    stop, outcomes = threading.Event(), {"ok": 0, "failed": []}

    def requests():
        while not stop.is_set():
            try:
                with torch.no_grad():
                    if torch.equal(other(x), expected):
                        outcomes["ok"] += 1
                    else:
                        outcomes["failed"].append("wrong values")
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                outcomes["failed"].append(repr(exc)[:200])

    thread = threading.Thread(target=requests)
    thread.start()
    try:
        for _ in range(10):
            fold_batchnorm(make(MiniResNet).eval())
    finally:
        stop.set()
        thread.join()
    assert outcomes["failed"] == [] and outcomes["ok"] > 0


def test_a_cam_call_in_progress_on_another_thread_neither_stops_the_folding_nor_enters_the_copy(resnet):
    """An engine call holds hooks on the model for its duration; folding the model meanwhile (another
    thread) looks past them and leaves them out of the copy. A user's own hook still stops it."""
    from rethinkcam_fast.folding import TRANSIENT_HOOK

    model = resnet.eval()

    def engine_hook(module, inputs, output):
        raise AssertionError("the engine's hook ran inside the folded copy")

    setattr(engine_hook, TRANSIENT_HOOK, True)
    handle = model.fc.register_forward_hook(engine_hook)  # (a module the folded copy keeps as it is)
    try:
        folded = fold_batchnorm(model)
        folded(torch.rand(1, 3, 32, 32))
        assert not any(getattr(m, "_forward_hooks", None) for m in folded.modules())
        assert len(model.fc._forward_hooks) == 1  # the original keeps it (its call removes it)
        mine = model.layer2.register_forward_hook(lambda *a: None)
        with pytest.raises(ValueError, match="has hooks"):
            fold_batchnorm(model)
        mine.remove()
    finally:
        handle.remove()


def test_two_folds_at_once_in_two_threads_both_succeed_and_restore_the_module_call():
    """Each fx trace patches nn.Module.__call__ process-wide: a second fold started while the first is
    inside its trace (held there by a gate) must neither break it nor leave a patch behind."""
    import threading

    entered = {name: threading.Event() for name in "AB"}
    release = threading.Event()

    class Gated(nn.Module):  # traced through (it holds a batch norm): its forward runs under the trace
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            name = threading.current_thread().name
            if name in entered:
                entered[name].set()
                release.wait(10)
            return self.bn(self.conv(x))

    def model():
        return nn.Sequential(Gated(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()

    original_call, original_getattr = nn.Module.__call__, nn.Module.__getattr__
    results = {}

    def fold(name):
        try:
            results[name] = fold_batchnorm(model())
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            results[name] = exc

    first = threading.Thread(target=fold, args=("A",), name="A")
    first.start()
    assert entered["A"].wait(10)
    second = threading.Thread(target=fold, args=("B",), name="B")
    second.start()
    entered["B"].wait(1)  # (one trace at a time: B enters only after A's trace ends)
    release.set()
    first.join()
    second.join()
    assert not any(isinstance(r, Exception) for r in results.values()), results
    assert all(_batch_norms(r) == 0 for r in results.values()) and len(results) == 2
    assert nn.Module.__call__ is original_call and nn.Module.__getattr__ is original_getattr


def test_every_hook_a_call_registers_is_marked_transient(monkeypatch):
    """The engine's calls (the pooling check's extra forward included) and evaluate_model register
    hooks for their own duration only: each is marked, so folding on another thread looks past it."""
    from rethinkcam_fast.evaluation import BoxEvaluator, evaluate_model
    from rethinkcam_fast.folding import TRANSIENT_HOOK

    registered = []
    real = nn.Module.register_forward_hook

    def spy(self, hook, *args, **kwargs):
        registered.append(hook)
        return real(self, hook, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "register_forward_hook", spy)
    # "cam" whose default target (the conv) is not what the classifier pools (after BN and ReLU): the
    # pooling check runs its extra hooked forward to find the pooled module
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()
    engine = CAMEngine(model, "cam", boxes=False, warn_degenerate=False)
    engine(torch.rand(2, 3, 20, 20))
    evaluate_model(engine, [(torch.rand(2, 3, 20, 20), torch.tensor([0, 1]), [torch.tensor([[0, 0, 9, 9]])] * 2)],
                   BoxEvaluator(0.1))
    assert {h.__name__ for h in registered} >= {"hook", "record", "keep_logits"}
    assert all(getattr(h, TRANSIENT_HOOK, False) for h in registered)
