"""TAP as a module: drop-in shape, model surgery, training loop, torch.compile without graph breaks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rethinkcam_fast
from rethinkcam_fast import TAP, replace_gap_with_tap


class TinyResNetStyle(nn.Module):
    """Head laid out like torchvision's ResNet: self.avgpool = AdaptiveAvgPool2d((1, 1)), flatten, fc."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


class FastAdaptiveAvgPool(nn.Module):
    """Same structure and attributes as timm's class of this name (mean over (2, 3), optional flatten)."""

    def __init__(self, flatten: bool = False) -> None:
        super().__init__()
        self.flatten = flatten
        self.dim = (2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(self.dim, keepdim=not self.flatten)


class SelectAdaptivePool2d(nn.Module):
    """timm-style wrapper: an inner pool module plus a flatten module."""

    def __init__(self, fast: bool) -> None:
        super().__init__()
        self.pool = FastAdaptiveAvgPool(flatten=True) if fast else nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Identity() if fast else nn.Flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(x))


class TimmStyle(nn.Module):
    def __init__(self, fast: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.global_pool = SelectAdaptivePool2d(fast)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.global_pool(torch.relu(self.conv(x))))


def test_tap_module_is_a_drop_in_for_adaptive_avg_pool():
    x = torch.randn(4, 5, 7, 7)
    gap, pool = nn.AdaptiveAvgPool2d(1), TAP(0.1)
    assert pool(x).shape == gap(x).shape == (4, 5, 1, 1)
    torch.testing.assert_close(pool(x).flatten(1), rethinkcam_fast.tap(x, 0.1))
    assert TAP(0.3, flatten=True)(x).shape == (4, 5)
    assert "tau=0.3" in repr(TAP(0.3))


def test_replace_gap_in_torchvision_style_and_vgg_style_models():
    torch.manual_seed(0)
    model = TinyResNetStyle()
    x = torch.randn(2, 3, 9, 9)
    features = model.features(x)
    returned = replace_gap_with_tap(model, tau=0.2)
    assert returned is model and isinstance(model.avgpool, TAP) and model.avgpool.tau == 0.2
    torch.testing.assert_close(model(x), model.fc(rethinkcam_fast.tap(features, 0.2)))

    vgg_like = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    replace_gap_with_tap(vgg_like)
    assert isinstance(vgg_like[1], TAP) and vgg_like(x).shape == (2, 2)


@pytest.mark.parametrize("fast", [False, True], ids=["adaptive", "fast"])
def test_replace_gap_in_timm_style_models(fast):
    model = TimmStyle(fast)
    x = torch.randn(2, 3, 8, 8)
    want_shape = model(x).shape
    replace_gap_with_tap(model, 0.1)
    assert isinstance(model.global_pool.pool, TAP)
    assert model.global_pool.pool.flatten is fast
    assert model(x).shape == want_shape
    torch.testing.assert_close(
        model(x), model.head(rethinkcam_fast.tap(torch.relu(model.conv(x)), 0.1))
    )


def test_replace_gap_rejects_models_without_a_global_pool():
    with pytest.raises(ValueError, match="no global average pool"):
        replace_gap_with_tap(nn.Sequential(nn.Conv2d(3, 3, 1), nn.AdaptiveAvgPool2d(2)))
    with pytest.raises(ValueError, match="tau must lie in"):
        replace_gap_with_tap(TinyResNetStyle(), tau=1.0)


def test_training_step_updates_parameters_through_tap():
    torch.manual_seed(0)
    model = replace_gap_with_tap(TinyResNetStyle())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 9, 9), torch.randint(0, 3, (8,))
    before = model.features[0].weight.detach().clone()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert model.features[0].weight.grad is not None and model.features[0].weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, model.features[0].weight)


def test_bf16_autocast_on_cpu():
    model = replace_gap_with_tap(TinyResNetStyle())
    x = torch.randn(2, 3, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert torch.isfinite(model.fc.weight.grad).all()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_full_graph_forward_and_backward(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = replace_gap_with_tap(TinyResNetStyle(), tau=0.1)
    x = torch.randn(4, 3, 9, 9)
    eager_out = model(x)
    (eager_grad,) = torch.autograd.grad(eager_out.sum(), model.features[0].weight)
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: a break raises
    out = compiled(x)
    (grad,) = torch.autograd.grad(out.sum(), model.features[0].weight)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-5)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_tap_module_takes_unbatched_input_like_adaptive_avg_pool():
    x = torch.rand(3, 5, 4)
    assert TAP(0.1)(x).shape == nn.AdaptiveAvgPool2d(1)(x).shape == (3, 1, 1)
    torch.testing.assert_close(TAP(0.1)(x), TAP(0.1)(x[None])[0])
    assert TAP(0.1, flatten=True)(x).shape == (3,)


def test_replace_gap_swaps_a_pool_registered_under_two_names():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(3, 8, 3)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.aux_pool = self.pool

    model = replace_gap_with_tap(TwoHeads())
    assert isinstance(model.pool, TAP) and isinstance(model.aux_pool, TAP)


def test_a_checkpoint_records_the_pool_the_model_has_now(tmp_path):
    from rethinkcam_fast.models import DigitsCAMNet, load_checkpoint, save_checkpoint

    model = replace_gap_with_tap(DigitsCAMNet(pool="gap", widths=(4, 4, 4)), 0.3)
    save_checkpoint(str(tmp_path / "c.pt"), model)
    loaded = load_checkpoint(str(tmp_path / "c.pt"))[0]
    assert isinstance(loaded.pool, TAP) and loaded.pool.tau == 0.3


class SqueezeExcitation(nn.Module):
    """The structure of torchvision.ops.SqueezeExcitation (MobileNetV3, EfficientNet, RegNetY): the pooled
    vector gates the block's own input."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(self.avgpool(x)))))


class MobileNetV3Style(nn.Module):
    def __init__(self, head_pool: nn.Module) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Hardswish(), SqueezeExcitation(16, 4),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.Hardswish())
        self.avgpool = head_pool
        self.classifier = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _tap_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, TAP)]


def test_replace_gap_leaves_squeeze_and_excitation_pools_alone():
    torch.manual_seed(0)
    model = MobileNetV3Style(nn.AdaptiveAvgPool2d(1))
    x = torch.randn(2, 3, 10, 10)
    features = model.features(x)
    assert replace_gap_with_tap(model, 0.2) is model
    assert _tap_names(model) == ["avgpool"]
    assert type(model.features[2].avgpool) is nn.AdaptiveAvgPool2d
    torch.testing.assert_close(model.features(x), features)  # the attention is unchanged
    torch.testing.assert_close(model(x), model.classifier(rethinkcam_fast.tap(features, 0.2)))


def test_a_model_named_like_an_attention_block_keeps_its_head_pool_swappable():
    """The rule looks at the pool's parent module, never at the model itself (AttentionCNN, SEResNeXt50)."""
    for class_name in ("AttentionCNN", "SEResNeXt50"):
        model = type(class_name, (nn.Sequential,), {})(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                       nn.Linear(4, 2))
        replace_gap_with_tap(model)
        assert _tap_names(model) == ["1"], class_name
        backbone = [layer for _ in range(3) for layer in (nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())]
        wrapped = nn.Sequential(type(class_name, (nn.Sequential,), {})(  # (inside a wrapper: its backbone tells)
            nn.Conv2d(3, 4, 3), *backbone, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)))
        replace_gap_with_tap(wrapped)
        assert _tap_names(wrapped) == ["0.7"], class_name


def test_replace_gap_with_only_se_pools_and_a_fixed_window_head_raises():
    model = MobileNetV3Style(nn.AvgPool2d(10))
    with pytest.raises(ValueError, match=r"no global average pool.*skipped 1 .*features\.2\.avgpool.*names=.*"
                                         r"avgpool is an nn\.AvgPool2d"):
        replace_gap_with_tap(model)
    assert _tap_names(model) == []  # nothing swapped


def test_replace_gap_names_swaps_exactly_the_given_pools():
    model = MobileNetV3Style(nn.AdaptiveAvgPool2d(1))
    replace_gap_with_tap(model, 0.3, names=["features.2.avgpool"])  # an SE pool, on request
    assert _tap_names(model) == ["features.2.avgpool"] and model.features[2].avgpool.tau == 0.3
    assert type(model.avgpool) is nn.AdaptiveAvgPool2d
    model = TimmStyle(fast=True)
    replace_gap_with_tap(model, names=iter(["global_pool.pool"]))
    assert _tap_names(model) == ["global_pool.pool"] and model.global_pool.pool.flatten


@pytest.mark.parametrize("names, error, message", [
    (["fc2"], ValueError, r"names: MobileNetV3Style has no module 'fc2'"),
    (["features.9.avgpool"], ValueError, r"no module 'features\.9\.avgpool'"),
    (["classifier"], ValueError, r"names: 'classifier' is Linear.*not a global average pool"),
    (["avgpool", "features.0"], ValueError, r"'features\.0' is Conv2d"),
    ([""], ValueError, "the model itself"),
    ([], ValueError, "names is empty"),
    ("avgpool", TypeError, "iterable of module names"),
    ([3], TypeError, "module names"),
])
def test_replace_gap_names_errors(names, error, message):
    model = MobileNetV3Style(nn.AdaptiveAvgPool2d(1))
    with pytest.raises(error, match=message):
        replace_gap_with_tap(model, names=names)
    assert _tap_names(model) == []  # all names checked before any swap


@pytest.mark.parametrize("class_name, attention", [
    ("SqueezeExcitation", True), ("SqueezeExcite", True), ("SEModule", True), ("EffectiveSEModule", True),
    ("SELayer", True), ("_SE", True), ("se_block", True), ("EcaModule", True), ("eca_layer", True),
    ("ChannelAttention", True), ("ChannelGate", True), ("CBAM", True),
    ("SENet", False), ("SEResNet", False), ("SqueezeNet", False), ("ResNet", False), ("Sequential", False),
    ("SelectAdaptivePool2d", False), ("ClassifierHead", False), ("Bottleneck", False), ("Sequence", False),
])
def test_channel_attention_block_naming_rule(class_name, attention):
    from rethinkcam_fast.modules import is_channel_attention_block

    block = type(class_name, (nn.Module,), {})()
    assert is_channel_attention_block(block) is attention
    holder = type(class_name, (nn.Module,), {})()
    holder.pool = nn.AdaptiveAvgPool2d(1)
    model = nn.Sequential(holder, nn.Flatten())
    if attention:
        with pytest.raises(ValueError, match="skipped 1"):
            replace_gap_with_tap(model)
    else:
        assert _tap_names(replace_gap_with_tap(model)) == ["0.pool"]


def test_tap_module_checks_its_flag_and_names_the_shapes_it_takes():
    with pytest.raises(TypeError, match="flatten must be a bool"):
        TAP(0.1, flatten="no")  # bool("no") is True
    with pytest.raises(ValueError, match=r"3-D \[C, H, W\] or 4-D \[N, C, H, W\] tensor, got shape \(3, 3\)"):
        TAP()(torch.rand(3, 3))
