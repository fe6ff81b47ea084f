"""CAMEngine(differentiable=True): maps attached to the graph, equal to the default mode's, and losses on
them backpropagate into the parameters exactly as plain autograd (create_graph=True) says; the default
mode is unchanged."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _models import MiniResNet, SmallCNN, make
from conftest import requires_triton
from test_class_activation_map import assert_close_scaled
from test_class_activation_map import oracle as cam_oracle
from test_flm_fuse import oracle as flm_oracle

from rethinkcam_fast import CAMEngine

BACKENDS = ["reference", pytest.param("triton", marks=requires_triton)]
CASES = [("cam", "sum"), ("gradcam", "sum"), ("gradcam++", "sum"), ("layercam", "sum"), ("fullycam", "sum"),
         ("fullycam", "max")]


def images_for(seed=0, n=3, size=20):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def engine(model, method, fuse="sum", **kwargs):
    return CAMEngine(model, method, fuse=fuse, warn_degenerate=False, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,fuse", CASES)
def test_maps_equal_the_default_mode(backend, method, fuse):
    if backend == "triton" and (method in ("gradcam++", "layercam") or fuse == "max"):
        pytest.skip("covered by gradcam / by test_flm_fuse (same kernels); keeps the interpreter time down")
    model = make(MiniResNet)
    images = images_for(1, n=2, size=32)
    plain = engine(model, method, fuse, backend=backend)(images)
    attached = engine(model, method, fuse, backend=backend, differentiable=True, return_layer_maps=True)(images)
    assert attached.cams.requires_grad and not plain.cams.requires_grad
    torch.testing.assert_close(attached.cams, plain.cams, atol=1e-6, rtol=0)
    assert torch.equal(attached.labels, plain.labels) and torch.equal(attached.degenerate, plain.degenerate)
    assert torch.equal(attached.boxes, plain.boxes) and torch.equal(attached.thresholds, plain.thresholds)
    assert all(not m.requires_grad for m in attached.layer_maps.values())
    assert attached.logits.requires_grad and attached.logits.shape == (2, 6) and plain.logits is None


def oracle_loss(model, method, images, labels, weights, fuse="sum"):
    """The same CAM loss written with plain autograd (create_graph=True), DESIGN.md §2 formulas."""
    if method == "fullycam":
        layers = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    else:
        layers = [model.features]
    acts = []
    hooks = [m.register_forward_hook(lambda mod, i, o: acts.append(o)) for m in layers]
    logits = model(images)
    for h in hooks:
        h.remove()
    size = tuple(images.shape[-2:])
    if method == "cam":
        cams = cam_oracle(acts[0], model.fc.weight, labels, False, size)
    else:
        grads = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), acts, create_graph=True)
        if method == "fullycam":
            cams = flm_oracle(acts, grads, size, fuse)
        else:  # gradcam
            m = (grads[0].mean((2, 3), keepdim=True) * acts[0]).sum(1).relu()
            up = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].flatten(1)
            lo, hi = up.amin(1, keepdim=True), up.amax(1, keepdim=True)
            cams = ((up - lo) / (hi - lo)).view(-1, *size)
    return (cams * weights).sum()


@pytest.mark.parametrize("method,fuse", [("cam", "sum"), ("gradcam", "sum"), ("fullycam", "sum"), ("fullycam", "max")])
def test_cam_loss_backpropagates_into_the_parameters_as_autograd_does(method, fuse):
    model = make(SmallCNN).double()
    images = images_for(2).double()
    params = [p for p in model.parameters()]
    result = engine(model, method, fuse, differentiable=True, backend="reference", boxes=False)(images, targets=torch.tensor([0, 3, 1]))
    assert result.cams.dtype == torch.float64
    weights = torch.rand(result.cams.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = torch.autograd.grad((result.cams * weights).sum(), params, allow_unused=True)
    want = torch.autograd.grad(oracle_loss(model, method, images, result.labels, weights, fuse), params,
                               allow_unused=True)
    reached = 0
    for g, w in zip(got, want):
        if w is None or not w.any():
            assert g is None or not g.any()
            continue
        assert_close_scaled(g, w, 1e-9)  # (float64 throughout: a float64 model's maps are float64)
        reached += 1
    assert reached >= len(params) - 1  # every parameter but the classifier bias moves the map


def test_default_mode_is_unchanged_and_one_forward_serves_both_losses():
    model = make(MiniResNet)
    model.layer1.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    images = images_for(4, n=2, size=32)
    for method in ("cam", "gradcam", "fullycam"):
        plain = engine(model, method)(images)
        assert not plain.cams.requires_grad and not plain.scores.requires_grad and plain.logits is None
        result = engine(model, method, differentiable=True)(images)
        assert result.cams.requires_grad and result.scores.requires_grad
    for name, p in model.named_parameters():  # neither mode touched .grad or requires_grad
        assert p.grad is None and p.requires_grad == flags[name]
    labels = torch.tensor([1, 4])
    result = engine(model, "gradcam", differentiable=True)(images, targets=labels)
    loss = F.cross_entropy(result.logits, labels) + 0.5 * result.cams.mean()
    loss.backward()
    assert model.fc.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.layer1.parameters())  # frozen stays frozen
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks


def test_frozen_model_under_no_grad_passes_gradient_to_the_images():
    model = make(SmallCNN).requires_grad_(False)
    images = images_for(5).requires_grad_(True)
    with torch.no_grad():  # differentiable=True enables grad mode for its own call
        result = engine(model, "gradcam", differentiable=True, boxes=False)(images)
    (grad,) = torch.autograd.grad(result.cams.square().mean(), images)
    assert grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    # Without any input or parameter requiring grad the maps are still computed (on a stand-in input).
    plain_images = images.detach()
    again = engine(model, "gradcam", differentiable=True, boxes=False)(plain_images)
    torch.testing.assert_close(again.cams, result.cams)


def test_bf16_autocast_on_cpu():
    model = make(SmallCNN)
    images = images_for(8)
    for method in ("cam", "gradcam", "fullycam"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = engine(model, method, boxes=False)(images)
            result = engine(model, method, differentiable=True, boxes=False)(images)
        assert result.cams.dtype == torch.float32
        # bf16 level: on the CPU the default path's Grad-CAM sum runs under autocast, ours in float32.
        torch.testing.assert_close(result.cams, plain.cams, atol=2e-2, rtol=0)
        (grad,) = torch.autograd.grad(result.cams.square().mean(), model.features[0].weight)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.cuda
@pytest.mark.parametrize("method,fuse", [("cam", "sum"), ("gradcam", "sum"), ("fullycam", "max")])
def test_differentiable_engine_on_gpu_matches_cpu(method, fuse):
    model = make(MiniResNet)
    images = images_for(6, n=4, size=64)
    cpu = engine(model, method, fuse, backend="reference", differentiable=True)(images)
    cpu_grads = torch.autograd.grad(cpu.cams.square().sum(), [model.conv1.weight, model.fc.weight], allow_unused=True)
    model.cuda()
    try:
        gpu = engine(model, method, fuse, differentiable=True)(images.cuda())
        gpu_grads = torch.autograd.grad(gpu.cams.square().sum(), [model.conv1.weight, model.fc.weight],
                                        allow_unused=True)
    finally:
        model.cpu()
    torch.testing.assert_close(gpu.cams.cpu(), cpu.cams, atol=2e-3, rtol=1e-3)
    for g, c in zip(gpu_grads, cpu_grads):
        if c is None:
            assert g is None
            continue
        torch.testing.assert_close(g.cpu(), c, atol=2e-3 * float(c.abs().max()), rtol=1e-2)


@pytest.mark.cuda
def test_bf16_autocast_channels_last_training_step_on_gpu():
    model = make(MiniResNet).cuda().to(memory_format=torch.channels_last).train()
    images = torch.randn(8, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    labels = torch.randint(0, 6, (8,), device="cuda")
    for method in ("cam", "gradcam", "fullycam"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            result = engine(model, method, differentiable=True, boxes=False)(images, targets=labels)
            loss = F.cross_entropy(result.logits.float(), labels) + result.cams.mean()
        loss.backward()
        assert torch.isfinite(model.conv1.weight.grad).all() and model.conv1.weight.grad.abs().sum() > 0
        model.zero_grad(set_to_none=True)


class _AutogradTAP(torch.nn.Module):
    """TAP written in differentiable torch ops (no custom backward): the oracle for a TAP model."""

    def __init__(self, tau: float) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, x):
        kept = x > x.amax(dim=(2, 3), keepdim=True) * self.tau
        count = (kept & (x > 0)).sum(dim=(2, 3), keepdim=True).clamp_min(1)
        return torch.where(kept, x, 0).sum(dim=(2, 3), keepdim=True) / count


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "fullycam"])
def test_cam_loss_through_a_tap_model(method):
    """A model trained with TAP (the pool's backward runs again under create_graph): the CAM loss
    reaches the parameters exactly as with TAP written in plain autograd ops."""
    from rethinkcam_fast import replace_gap_with_tap

    model = replace_gap_with_tap(make(SmallCNN).double(), tau=0.2)
    oracle = make(SmallCNN).double()
    oracle.avgpool = _AutogradTAP(0.2)
    images = images_for(6).double()
    targets = torch.tensor([0, 3, 1])
    weights = torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = []
    for net in (model, oracle):
        result = engine(net, method, differentiable=True, backend="reference", boxes=False)(images, targets=targets)
        grads.append(torch.autograd.grad((result.cams * weights).sum(), list(net.parameters()), allow_unused=True))
    reached = 0
    for got, want in zip(*grads):
        if want is None:
            assert got is None or not got.any()
            continue
        assert_close_scaled(got, want, 1e-6 if method in ("gradcam", "gradcam++") else 1e-9)
        reached += int(bool(want.any()))
    assert reached >= 4


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "fullycam"])
def test_a_frozen_backbone_under_a_trainable_head(method):
    """Frozen convolutions, a trainable classifier: the frozen layers' outputs are put on the graph (a
    stand-in input records it), the maps equal the default mode's, and a CAM loss trains the head only."""
    model = make(SmallCNN)
    model.features.requires_grad_(False)
    images = images_for(6, n=2)
    plain = engine(model, method)(images)
    attached = engine(model, method, differentiable=True)(images)
    torch.testing.assert_close(attached.cams.detach(), plain.cams, atol=1e-5, rtol=0)
    attached.cams.square().mean().backward()
    assert model.fc.weight.grad is not None and model.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.features.parameters())


def test_fullycam_differentiable_with_a_frozen_stem():
    model = make(MiniResNet)
    model.conv1.requires_grad_(False)
    images = images_for(7, n=2, size=32)
    plain = engine(model, "fullycam")(images)
    attached = engine(model, "fullycam", differentiable=True)(images)
    torch.testing.assert_close(attached.cams.detach(), plain.cams, atol=1e-5, rtol=0)


def test_a_stand_in_input_only_when_a_frozen_target_needs_it():
    """A frozen backbone under a trainable target layer needs no stand-in input: recording from one
    would save the backbone's activations and backpropagate through it for nothing. A frozen target
    layer does need it."""
    model = make(SmallCNN)
    model.features[:4].requires_grad_(False)  # the first two convs frozen; features.5 trains
    seen = []
    hook = model.features[0].register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].requires_grad))
    images = images_for(8, n=2)
    try:
        for target, stand_in in (("features.5", False), ("features.2", True), (None, False)):
            seen.clear()
            result = engine(model, "gradcam", target_layers=target, differentiable=True)(images)
            assert seen == [stand_in], target
            plain = engine(model, "gradcam", target_layers=target)(images)
            torch.testing.assert_close(result.cams.detach(), plain.cams, atol=1e-5, rtol=0)
    finally:
        hook.remove()


def test_a_compiled_model_with_a_gradient_cam_loss_gets_a_clear_error():
    """differentiable=True makes the loss's backward a double backward, which a torch.compile'd model's
    backward cannot do (AOT autograd): said at construction ("cam" needs no gradient: allowed)."""
    compiled = torch.compile(make(SmallCNN))  # (lazy: nothing compiles here)
    for method in ("gradcam", "fullycam"):
        with pytest.raises(ValueError, match="double backward"):
            engine(compiled, method, differentiable=True)
    engine(compiled, "cam", differentiable=True)
    engine(compiled, "gradcam")  # (without differentiable=True, no second backward)
