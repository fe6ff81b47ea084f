"""The CAM engine against an independent oracle written from DESIGN.md §2 (plain autograd, float64)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import MiniResNet, MiniVGGGAP, SmallCNN, make
from conftest import requires_triton
from torch import nn

import rethinkcam_fast
from rethinkcam_fast import TAP, CAMEngine, CAMResult, boxes_from_cams, replace_gap_with_tap

SINGLE_METHODS = ["cam", "gradcam", "gradcam++", "layercam"]
BACKENDS = ["reference", pytest.param("triton", marks=requires_triton)]


def normalize(maps: torch.Tensor) -> torch.Tensor:
    out = []
    for m in maps:
        lo, hi = m.min(), m.max()
        out.append(torch.zeros_like(m) if not torch.isfinite(m).all() or hi <= lo else (m - lo) / (hi - lo))
    return torch.stack(out) if out else maps


def upsample(m: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def capture(model, layers, images):
    acts = {}
    hooks = [layer.register_forward_hook(lambda mod, i, o, key=i_: acts.__setitem__(key, o)) for i_, layer in enumerate(layers)]
    images = images.detach().requires_grad_(True)
    logits = model(images)
    for h in hooks:
        h.remove()
    return logits, [acts[i] for i in range(len(layers))]


def oracle_single(model, layer, images, labels, method, classifier=None, nwc=False):
    logits, (act,) = capture(model, [layer], images)
    score = logits.gather(1, labels[:, None]).sum()
    a = act.detach().double()
    if method == "cam":
        w = classifier.weight.detach().double()
        w = w.clamp_min(0) if nwc else w
        m = torch.einsum("nk,nkhw->nhw", w[labels], a)
    else:
        (g,) = torch.autograd.grad(score, act)
        g = g.double()
        if method == "gradcam":
            m = (g.mean(dim=(2, 3))[:, :, None, None] * a).sum(1).relu()
        elif method == "gradcam++":
            denom = 2 * g**2 + a.sum(dim=(2, 3))[:, :, None, None] * g**3 + 1e-6
            alpha = torch.where(g != 0, g**2 / denom, 0.0)
            m = ((alpha * g.relu()).sum(dim=(2, 3))[:, :, None, None] * a).sum(1).relu()
        else:
            m = (g.relu() * a).sum(1).relu()
    return normalize(upsample(m, images.shape[-2:]))


def oracle_fully(model, layers, images, labels, fuse):
    logits, acts = capture(model, layers, images)
    grads = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), acts)
    fused = None
    for a, g in zip(acts, grads):
        m = (g.double().relu() * a.detach().double().relu()).sum(1)
        p = normalize(upsample(m, images.shape[-2:]))
        fused = p if fused is None else (fused + p if fuse == "sum" else torch.maximum(fused, p))
    return normalize(fused)


def images_for(seed=0, n=3, size=20):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", SINGLE_METHODS)
def test_single_layer_methods_match_oracle_on_small_cnn(method, backend):
    model = make(SmallCNN)
    images = images_for()
    result = CAMEngine(model, method, model.features, backend=backend)(images)
    want_labels = model(images).argmax(1)
    assert torch.equal(result.labels, want_labels)
    torch.testing.assert_close(result.scores, model(images).gather(1, want_labels[:, None])[:, 0])
    want = oracle_single(model, model.features, images, want_labels, method, classifier=model.fc)
    assert result.cams.shape == (3, 20, 20) and result.cams.dtype == torch.float32
    torch.testing.assert_close(result.cams.double(), want, atol=2e-5, rtol=1e-4)
    assert result.cams.min() >= 0 and result.cams.max() <= 1


@pytest.mark.filterwarnings("ignore:1 of 2 CAMs were constant")  # an all-negative Grad-CAM of a random net
@pytest.mark.parametrize("method", SINGLE_METHODS)
@pytest.mark.parametrize("model_cls", [MiniResNet, MiniVGGGAP], ids=["resnet", "vgg-gap"])
def test_default_layer_and_oracle_on_resnet_and_vgg_shapes(model_cls, method):
    model = make(model_cls)
    images = images_for(1, n=2, size=32)
    engine = CAMEngine(model, method)
    targets = torch.tensor([1, 3])
    result = engine(images, targets=targets)
    expected_layer = model.layer3 if model_cls is MiniResNet else model.features
    assert engine.target_layers == [expected_layer]
    classifier = model.fc if model_cls is MiniResNet else model.classifier
    want = oracle_single(model, expected_layer, images, targets, method, classifier=classifier)
    torch.testing.assert_close(result.cams.double(), want, atol=2e-5, rtol=1e-4)
    assert torch.equal(result.labels, targets)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fuse", ["sum", "max"])
def test_fully_cam_matches_oracle_over_every_conv(fuse, backend):
    model = make(MiniResNet)
    images = images_for(2, n=2, size=32)
    engine = CAMEngine(model, "fullycam", fuse=fuse, return_layer_maps=True, backend=backend)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert engine.target_layers == convs and len(convs) == 13
    result = engine(images)
    want = oracle_fully(model, convs, images, result.labels, fuse)
    torch.testing.assert_close(result.cams.double(), want, atol=5e-5, rtol=1e-4)
    assert len(result.layer_maps) == 13 and "layer2.0.downsample.0" in result.layer_maps


def test_fully_cam_on_one_rectified_layer_equals_layercam():
    """Σ relu(g)·relu(A) = relu(Σ relu(g)·A) when A >= 0, e.g. a ReLU'd block output."""
    model = make(MiniResNet)
    images = images_for(3, n=2, size=32)
    fully = CAMEngine(model, "fullycam", model.layer2)(images)
    layer = CAMEngine(model, "layercam", model.layer2)(images)
    torch.testing.assert_close(fully.cams, layer.cams, atol=1e-6, rtol=1e-5)


def test_cam_on_tap_model_uses_unthresholded_features():
    model = replace_gap_with_tap(make(MiniVGGGAP), tau=0.3)
    assert isinstance(model.avgpool, TAP)
    images = images_for(4, n=2, size=24)
    result = CAMEngine(model, "cam")(images)
    want = oracle_single(model, model.features, images, result.labels, "cam", classifier=model.classifier)
    torch.testing.assert_close(result.cams.double(), want, atol=2e-5, rtol=1e-4)


def test_nwc_changes_the_map_and_never_the_logits():
    model = make(MiniVGGGAP)
    assert (model.classifier.weight < 0).any()
    images = images_for(5, n=3, size=24)
    plain = CAMEngine(model, "cam")(images)
    clamped = CAMEngine(model, "cam", nwc=True)(images)
    assert torch.equal(plain.scores, clamped.scores) and torch.equal(plain.labels, clamped.labels)
    assert not torch.allclose(plain.cams, clamped.cams)
    want = oracle_single(model, model.features, images, plain.labels, "cam", classifier=model.classifier, nwc=True)
    torch.testing.assert_close(clamped.cams.double(), want, atol=2e-5, rtol=1e-4)


def test_engine_leaves_the_model_as_it_found_it():
    model = make(MiniResNet)
    model.layer1.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    images = images_for(6, n=2, size=32)
    for method in ["gradcam", "fullycam", "cam"]:
        with CAMEngine(model, method) as engine:
            engine(images)
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks
    for name, p in model.named_parameters():
        assert p.grad is None and p.requires_grad == flags[name]
    assert not model.training


def test_frozen_model_and_no_grad_context():
    model = make(SmallCNN).requires_grad_(False)
    images = images_for(7)
    with torch.no_grad():
        result = CAMEngine(model, "gradcam", model.features)(images)
    want = oracle_single(model, model.features, images, result.labels, "gradcam")
    torch.testing.assert_close(result.cams.double(), want, atol=2e-5, rtol=1e-4)


def test_channels_last_and_batch_sizes():
    model = make(MiniResNet)
    images = images_for(8, n=4, size=32)
    engine = CAMEngine(model, "gradcam")
    full = engine(images)
    cl = engine(images.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl.cams, full.cams, atol=1e-5, rtol=1e-4)
    one = engine(images[2:3])
    torch.testing.assert_close(one.cams, full.cams[2:3], atol=1e-5, rtol=1e-4)
    empty = engine(images[:0])
    assert empty.cams.shape == (0, 32, 32) and empty.labels.shape == (0,)


def test_bf16_autocast_on_cpu():
    model = make(MiniResNet)
    images = images_for(9, n=2, size=32)
    fp32 = CAMEngine(model, "gradcam")(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = CAMEngine(model, "gradcam")(images)
    assert bf16.cams.dtype == torch.float32 and bf16.cams.min() >= 0 and bf16.cams.max() <= 1
    assert (bf16.cams - fp32.cams).abs().mean() < 0.05


def test_output_size_and_layer_maps():
    model = make(SmallCNN)
    result = CAMEngine(model, "layercam", "features", output_size=(7, 9), return_layer_maps=True)(images_for())
    assert result.cams.shape == (3, 7, 9)
    assert list(result.layer_maps) == ["features"] and result.layer_maps["features"].shape == (3, 10, 10)


def test_constant_map_becomes_zeros_with_a_warning():
    model = make(SmallCNN)
    nn.init.zeros_(model.features[5].weight)
    nn.init.zeros_(model.features[5].bias)  # the last conv outputs zeros everywhere
    with pytest.warns(RuntimeWarning, match="constant or non-finite"):
        result = CAMEngine(model, "cam", model.features)(images_for())
    assert result.degenerate.all() and (result.cams == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CAMEngine(model, "cam", model.features, warn_degenerate=False)(images_for())


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++", "layercam", "fullycam"])
def test_an_image_with_nan_logits_gets_a_zero_flagged_map(method):
    """A NaN pixel makes the image's logits NaN while its gradients stay finite (a Linear's input
    gradient is its weight): LayerCAM's and Fully-CAM's ReLUs (NaN -> 0) would give a plausible map.
    Every method flags it and zeroes it; the other images are as without it."""
    model = make(MiniResNet).eval()
    images = images_for(3, n=3, size=32)
    clean = CAMEngine(model, method, warn_degenerate=False)(images)
    images[1, 0, 5:9, 5:9] = float("nan")
    with pytest.warns(RuntimeWarning, match="1 of 3 CAMs .*non-finite score"):
        got = CAMEngine(model, method)(images, clean.labels)
    assert got.degenerate.tolist() == [False, True, False]
    assert (got.cams[1] == 0).all() and got.boxes[1].tolist() == [0, 0, 0, 0]
    for n in (0, 2):
        torch.testing.assert_close(got.cams[n], clean.cams[n], atol=1e-6, rtol=0)


def test_bad_input_raises_clear_errors():
    model = make(SmallCNN)
    with pytest.raises(ValueError, match="method must be one of"):
        CAMEngine(model, "scorecam")
    with pytest.raises(ValueError, match="'nope' is not a submodule"):
        CAMEngine(model, "gradcam", "nope")
    with pytest.raises(ValueError, match="Conv2d is not a submodule"):
        CAMEngine(model, "gradcam", nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="takes one target layer"):
        CAMEngine(model, "gradcam", [model.features[0], model.features[2]])
    with pytest.raises(ValueError, match="nwc=True"):
        CAMEngine(model, "gradcam", nwc=True)
    with pytest.raises(TypeError, match="target_layers must be a module, its name, or a list"):
        CAMEngine(model, "gradcam", 3)
    with pytest.raises(ValueError, match="backend must be one of"):  # at construction, not at the first call
        CAMEngine(model, "gradcam", backend="gpu")
    engine = CAMEngine(model, "gradcam", model.features)
    with pytest.raises(ValueError, match="images must be a 4-D"):
        engine(torch.randn(3, 20, 20))
    with pytest.raises(ValueError, match="out of range"):
        engine(images_for(), targets=5)
    with pytest.raises(ValueError, match="out of range"):
        engine(images_for(), targets=torch.tensor([0, 1, 7]))
    classes = model.fc.out_features
    with pytest.raises(ValueError, match="out of range"):  # the first class past the last
        engine(images_for(), targets=torch.tensor([0, 1, classes]))
    with pytest.raises(ValueError, match="out of range"):
        engine(images_for(), targets=classes)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        engine(images_for(), targets=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"targets must hold integer class indices \(any integer dtype\), got torch.float32"):
        engine(images_for(), targets=torch.tensor([0.0, 1.0, 2.0]))
    wide = engine(images_for(), targets=torch.tensor([0, 1, 2], dtype=torch.uint32)).labels  # any integer dtype
    assert wide.dtype == torch.int64 and wide.tolist() == [0, 1, 2]
    headless = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2, bias=False))
    headless[4] = nn.Identity()  # logits straight from the pool: no classifier to build a CAM from
    with pytest.raises(ValueError, match="needs the classifier"):
        CAMEngine(headless, "cam")(images_for())
    with pytest.raises(ValueError, match="logits"):
        CAMEngine(nn.Sequential(nn.Conv2d(3, 4, 3)), "gradcam")(images_for())


def test_pas_boxes_follow_the_reference_pipeline():
    cv2 = pytest.importorskip("cv2")
    import numpy as np

    model = make(MiniResNet)
    images = images_for(10, n=3, size=32)
    result = CAMEngine(model, "gradcam")(images)
    assert result.boxes.shape == (3, 4) and result.thresholds.shape == (3,)
    for cam, thr, box in zip(result.cams, result.thresholds, result.boxes):
        u8 = (255 * cam.numpy()).astype(np.uint8)
        assert int(thr) == int(0.35 * np.percentile(u8, 90))
        contours, _ = cv2.findContours((u8 > int(thr)).astype(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
        x, y, w, h = cv2.boundingRect(max(contours, key=cv2.contourArea)) if contours else (0, 0, 0, 0)
        want = [x, y, min(x + w, 31), min(y + h, 31)] if contours else [0, 0, 0, 0]
        assert box.tolist() == want
    plain = CAMEngine(model, "gradcam", boxes=False)(images)
    assert plain.boxes is None and plain.thresholds is None
    with pytest.raises(ValueError, match="theta must lie"):
        CAMEngine(model, "gradcam", pas_theta=2.0)
    with pytest.raises(ValueError, match="box_convention"):
        CAMEngine(model, "gradcam", box_convention="xywh")


def test_exports():
    assert rethinkcam_fast.CAMEngine is CAMEngine
    assert {"cam", "gradcam", "gradcam++", "layercam", "fullycam"} == set(rethinkcam_fast.engine.METHODS)


def test_fullycam_default_layers_leave_out_convs_that_never_run():
    """A conv defined but not used in forward (an auxiliary head, a branch switched off) is not an
    error for the default 'every nn.Conv2d'; the map equals the one from the convs that ran."""
    model = make(SmallCNN)
    model.aux = torch.nn.Conv2d(3, 4, 1)  # never called by SmallCNN.forward
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    default = CAMEngine(model, "fullycam", warn_degenerate=False)(images)
    used = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and name != "aux"]
    explicit = CAMEngine(model, "fullycam", target_layers=used, warn_degenerate=False)(images)
    assert torch.equal(default.cams, explicit.cams)
    with pytest.raises(ValueError, match=r"\['aux'\] produced no 4-D tensor output"):
        CAMEngine(model, "fullycam", target_layers=[*used, model.aux])(images)


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++", "layercam", "fullycam"])
def test_works_inside_inference_mode_and_on_inference_tensors(method):
    """torch.inference_mode() is where many serving loops run: gradient methods leave it for their
    own pass (its tensors cannot be recorded by autograd), with the maps of a normal call."""
    model = make(SmallCNN)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    expected = CAMEngine(model, method, warn_degenerate=False)(images)
    with torch.inference_mode():
        inside = CAMEngine(model, method, warn_degenerate=False)(images)
        inference_images = images.clone()
    outside = CAMEngine(model, method, warn_degenerate=False)(inference_images)
    for got in (inside, outside):
        assert torch.equal(got.cams, expected.cams) and torch.equal(got.boxes, expected.boxes)
    assert all(p.grad is None for p in model.parameters())


class _TwoStream(nn.Module):
    """Two parallel branches from the image: neither conv is upstream of the other."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 5, padding=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1).mean((2, 3)))


@pytest.mark.parametrize("model_fn,layers", [
    (lambda: _TwoStream(), None),
    (lambda: make(MiniResNet), ["layer2.0.conv1", "layer2.0.downsample.0"]),  # a block's conv and its shortcut
])
def test_fullycam_reaches_layers_on_parallel_branches(model_fn, layers):
    """Every target layer gets its gradient even when none is upstream of all others: the default mode
    equals differentiable=True (plain autograd) and no layer's map is left at zero."""
    torch.manual_seed(0)
    model = model_fn().eval()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "received no gradient" would be a failure
        plain = CAMEngine(model, "fullycam", target_layers=layers, return_layer_maps=True)(images)
    assert all(m.abs().sum() > 0 for m in plain.layer_maps.values())
    attached = CAMEngine(model, "fullycam", target_layers=layers, differentiable=True)(images)
    torch.testing.assert_close(plain.cams, attached.cams.detach(), atol=1e-6, rtol=0)


def test_default_target_skips_a_container_that_ends_with_the_pool():
    """nn.Sequential(backbone..., AdaptiveAvgPool2d(1)) outputs [N, C, 1, 1]: the default target is
    the last module with a spatial map inside it, not that container (whose CAM would be zeros)."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                                         nn.AdaptiveAvgPool2d(1))
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.flatten(self.encoder(x), 1))

    torch.manual_seed(1)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(11))
    for method in ("cam", "gradcam", "layercam"):
        engine = CAMEngine(Net().eval(), method)
        result = engine(images)
        # (the ReLU after the conv: for "cam" its output is what the classifier pools; the gradient
        # methods move past the activations that directly follow the conv)
        assert engine.layer_name(engine.target_layers[0]) == "encoder.3" and not result.degenerate.any()


def test_a_target_layer_with_an_empty_feature_map_raises_a_clear_error():
    """The engine hands its maps to the epilogue without the op's own checks: it checks the spatial
    extent itself, naming the layer."""
    class EmptyBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(3, 4, 3)
            self.crop = nn.Identity()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            a = F.relu(self.body(x))
            empty = self.crop(a[:, :, :0])  # [N, 4, 0, w]: on the graph, contributes nothing
            return self.fc(a.mean((2, 3))) + empty.sum()

    model = EmptyBranch().eval()
    images = torch.rand(2, 3, 12, 12)
    for method in ("gradcam", "layercam", "fullycam"):
        with pytest.raises(ValueError, match=r"\['crop'\] produced feature maps with an empty spatial extent"):
            CAMEngine(model, method, target_layers=["crop"] if method == "fullycam" else "crop")(images)
    assert CAMEngine(model, "gradcam", target_layers="body")(images).cams.shape == (2, 12, 12)


def test_a_fuse_mode_set_after_construction_is_still_checked():
    engine = CAMEngine(make(SmallCNN), "gradcam")
    engine.fuse = "mean"
    with pytest.raises(ValueError, match="fuse must be one of"):
        engine(torch.rand(1, 3, 16, 16))


def test_gradient_methods_on_a_layer_off_the_graph_raise_a_clear_error():
    class NoGradStem(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3)
            self.body = nn.Conv2d(4, 4, 3)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            with torch.no_grad():
                x = self.stem(x)
            return self.fc(F.relu(self.body(x)).mean((2, 3)))

    model = NoGradStem().eval()
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"\['stem'\] is not on the autograd graph"):
        CAMEngine(model, "gradcam", target_layers="stem")(images)
    # Fully-CAM over every conv: the stem gets no gradient (zeros, with a warning), the body its map.
    with pytest.warns(RuntimeWarning, match="stem received no gradient") as caught:
        result = CAMEngine(model, "fullycam", return_layer_maps=True, warn_degenerate=False)(images)
    assert result.layer_maps["body"].abs().sum() > 0
    assert {w.filename for w in caught if "no gradient" in str(w.message)} == {__file__}  # (the caller's line)
    with pytest.warns(RuntimeWarning, match="stem received no gradient") as caught:
        CAMEngine(model, "fullycam", differentiable=True, warn_degenerate=False)(images)
    assert {w.filename for w in caught if "no gradient" in str(w.message)} == {__file__}


class _NoGradStemResidual(nn.Module):
    """A frozen stem run under no_grad, then a residual block: the graph starts again after the stem,
    and the block's conv and its shortcut are parallel branches after the cut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(8, 16, 3, 2, 1), nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 1, 2)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        with torch.no_grad():
            x = torch.relu(self.stem(x))
        y = self.c2(torch.relu(self.c1(x))) + self.down(x)
        return self.fc(torch.relu(y).mean((2, 3)))


def test_fullycam_after_a_no_grad_stem_reaches_every_branch_on_the_graph():
    torch.manual_seed(0)
    model = _NoGradStemResidual().eval()
    images = images_for(12, n=2, size=32)
    layers = [model.down, model.c1, model.c2]
    labels = model(images).argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "received no gradient" would be a failure
        result = CAMEngine(model, "fullycam", target_layers=["down", "c1", "c2"], return_layer_maps=True)(images)
    logits, acts = capture(model, layers, images)
    grads = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), acts)
    for name, a, g in zip(["down", "c1", "c2"], acts, grads):
        want = (g.double().relu() * a.detach().double().relu()).sum(1)
        assert want.abs().sum() > 0
        torch.testing.assert_close(result.layer_maps[name].double(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result.cams.double(), oracle_fully(model, layers, images, labels, "sum"),
                               atol=1e-5, rtol=0)
    # Every conv by default: the stem is off the graph (zeros, with a warning), the rest as above.
    with pytest.warns(RuntimeWarning, match="stem received no gradient"):
        every = CAMEngine(model, "fullycam", return_layer_maps=True, warn_degenerate=False)(images)
    for name in ("down", "c1", "c2"):
        torch.testing.assert_close(every.layer_maps[name], result.layer_maps[name])
    with pytest.warns(RuntimeWarning, match="stem received no gradient"):
        attached = CAMEngine(model, "fullycam", differentiable=True, warn_degenerate=False)(images)
    torch.testing.assert_close(attached.cams.detach(), every.cams, atol=1e-6, rtol=0)


def test_fullycam_after_a_cut_the_hooks_cannot_see():
    """A no_grad stem followed by a trainable BatchNorm that is not a target: the targets' inputs are on
    the graph again, so no cut shows at them; the backward to the input reaches nothing, and the call
    runs again with the backward reaching every target layer."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
            self.layer2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            with torch.no_grad():
                x = self.conv1(x)
            return self.fc(self.layer2(self.layer1(torch.relu(self.bn1(x)))).mean((2, 3)))

    torch.manual_seed(3)
    model = Net().eval()
    images = images_for(16, n=2, size=16)
    layers = [model.layer1[0], model.layer2[0]]
    labels = model(images).argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = CAMEngine(model, "fullycam", target_layers=["layer1.0", "layer2.0"])(images)
    torch.testing.assert_close(result.cams.double(), oracle_fully(model, layers, images, labels, "sum"),
                               atol=1e-5, rtol=0)
    with pytest.warns(RuntimeWarning, match="conv1 received no gradient"):
        every = CAMEngine(model, "fullycam", return_layer_maps=True, warn_degenerate=False)(images)
    assert every.layer_maps["layer1.0"].abs().sum() > 0 and every.layer_maps["layer2.0"].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_input_pixel_gives_the_same_result_in_every_mode(backend):
    """One NaN policy (relu(NaN) = 0 inside the FLM sums) for the default and differentiable paths."""
    torch.manual_seed(0)
    model = make(SmallCNN)
    images = images_for(13, n=2, size=16)
    images[1, :, 0, 0] = float("nan")
    runs = [CAMEngine(model, "fullycam", backend=backend, differentiable=d, warn_degenerate=False)(images)
            for d in (False, True)]
    assert torch.equal(runs[0].degenerate, runs[1].degenerate)
    assert torch.equal(runs[0].boxes, runs[1].boxes)
    torch.testing.assert_close(runs[0].cams, runs[1].cams.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["cam", "gradcam", "fullycam"])
def test_one_model_explained_from_several_threads(method):
    """Serving loops share one model across threads: a call's hooks capture only its own thread's
    forward, so concurrent calls give the serial results."""
    import threading

    model = make(MiniResNet)
    batches = [torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(20 + k)) for k in range(4)]
    expected = [CAMEngine(model, method, warn_degenerate=False)(b).cams for b in batches]
    failures: list[str] = []

    def worker(k: int) -> None:
        engine = CAMEngine(model, method, warn_degenerate=False)
        for _ in range(8):
            try:
                got = engine(batches[k]).cams
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(f"thread {k}: {type(exc).__name__}: {exc}")
                return
            if not torch.equal(got, expected[k]):
                failures.append(f"thread {k}: another thread's maps")
                return

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures


def test_numpy_targets_are_accepted_like_tensors():
    """Data loaders and numpy code hand out np.int64 labels and integer arrays."""
    import numpy as np

    model = make(SmallCNN)
    images = images_for(14)
    engine = CAMEngine(model, "gradcam", warn_degenerate=False)
    want = engine(images, targets=torch.tensor([1, 2, 3]))
    got = engine(images, targets=np.array([1, 2, 3]))
    assert torch.equal(got.labels, want.labels) and torch.equal(got.cams, want.cams)
    assert torch.equal(engine(images, targets=np.int64(2)).labels, torch.full((3,), 2))
    for form in (np.array([3, 2, 1])[::-1], np.array([1, 2, 3], np.uint32), np.array([1, 2, 3], ">i8")):
        assert torch.equal(engine(images, targets=form).cams, want.cams)
    assert torch.equal(engine(images, targets=np.array(2)).labels, torch.full((3,), 2))
    with pytest.raises(TypeError, match="targets must be"):
        engine(images, targets=np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="out of range"):
        engine(images, targets=np.int64(99))


def test_cam_with_a_1x1_conv_classifier_finds_the_feature_layer_by_default():
    class ConvHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
            self.classifier = nn.Conv2d(8, 5, 1)

        def forward(self, x):
            return self.classifier(self.features(x)).mean((2, 3))

    torch.manual_seed(2)
    model = ConvHead().eval()
    images = images_for(15, n=2, size=16)
    engine = CAMEngine(model, "cam", classifier=model.classifier, warn_degenerate=False)
    result = engine(images)
    assert engine.layer_name(engine.target_layers[0]) == "features"
    explicit = CAMEngine(model, "cam", target_layers="features.3", classifier=model.classifier, warn_degenerate=False)(images)
    assert torch.equal(result.cams, explicit.cams)


def test_graphed_engine_refuses_what_a_cuda_graph_cannot_do():
    """CAMEngine.graphed needs a CUDA tensor, a non-differentiable engine and None or one int target
    (the replays themselves are tested in tests/test_cam_cuda.py, on a GPU)."""
    model = make(SmallCNN, classes=4)
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        CAMEngine(model, "gradcam").graphed(images)
    with pytest.raises(ValueError, match="differentiable"):
        CAMEngine(model, "gradcam", differentiable=True).graphed(images)
    for bad in (torch.tensor([1, 2]), torch.tensor(1.0), True, 1.0):
        with pytest.raises(TypeError, match="one int class index"):
            CAMEngine(model, "gradcam").graphed(images, targets=bad)
    with pytest.raises(ValueError, match="needs a CUDA tensor"):  # a 0-d integer tensor is one class index
        CAMEngine(model, "gradcam").graphed(images, targets=torch.tensor(1))
    with pytest.raises(ValueError, match="4-D"):
        CAMEngine(model, "gradcam").graphed(images[0])


# -- configuration found from the forward (issues from an API review) ---------------------------------


class _TwoHeads(nn.Module):
    """The forward uses head_a; head_b, of the same shape, is never run."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.head_a, self.head_b = nn.Linear(6, 5), nn.Linear(6, 5)

    def forward(self, x):
        return self.head_a(self.features(x).mean((2, 3)))


class _FunctionalRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 1), 1))


class _Strided(nn.Module):
    """c2's output is 1x1 at 16x16 inputs, 4x4 at 64x64."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 6, 4, stride=4), nn.Conv2d(6, 8, 4, stride=4), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3)))


class _NetworkInNetwork(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.cls = nn.Conv2d(6, 5, 1)

    def forward(self, x):
        return self.cls(self.features(x)).mean((2, 3))


def test_cam_takes_the_classifier_the_forward_runs():
    model = make(_TwoHeads).eval()
    images = images_for()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a GAP model whose head is found: no pooling warning
        engine = CAMEngine(model, "cam", boxes=False)
        got = engine(images)
    assert engine.classifier is model.head_a
    want = CAMEngine(model, "cam", classifier=model.head_a, boxes=False)(images)
    torch.testing.assert_close(got.cams, want.cams, atol=0, rtol=0)


def test_cam_warns_when_the_classifier_does_not_pool_the_target_layer():
    model = make(_FunctionalRelu).eval()
    engine = CAMEngine(model, "cam", boxes=False)
    with pytest.warns(RuntimeWarning, match="'conv2''s output does not give the logits.*gradient method"):
        engine(images_for())  # (F.relu: no module holds the pooled output to name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per engine
        engine(images_for(1))
    sequential = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()
    with pytest.warns(RuntimeWarning, match="'2''s output does not give the logits.*pass target_layers='4'"):
        given = CAMEngine(sequential, "cam", "2", boxes=False)
        given(images_for())  # a given target stays, with advice
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per target and classifier, not once per input size
        for side in (20, 24, 28):
            given(torch.rand(2, 3, side, side))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = CAMEngine(sequential, "cam", boxes=False)  # the default moves past the batch norm and the ReLU
        got = engine(images_for())
        assert engine.target_layers == [sequential[4]]
        torch.testing.assert_close(got.cams, CAMEngine(sequential, "cam", "4", boxes=False)(images_for()).cams)
    tap_model = replace_gap_with_tap(make(SmallCNN)).eval()  # TAP pools the target's output: checked with TAP
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = CAMEngine(tap_model, "cam", boxes=False)
        engine(images_for())
    assert engine.target_layers == [tap_model.features]


def test_bicubic_upsampling_gives_wsolevaluations_maps():
    """upsample="bicubic": the CAM as wsolevaluation's inference computes it — cv2.resize(cam,
    INTER_CUBIC) of the feature-resolution map, then normalize_scoremap (min-max; zeros when constant
    or NaN) — written here with OpenCV and numpy."""
    cv2 = pytest.importorskip("cv2")
    model = make(MiniVGGGAP).eval()
    images = images_for(7, n=4, size=24)
    engine = CAMEngine(model, "cam", upsample="bicubic", return_layer_maps=True, boxes=False)
    got = engine(images)
    bilinear = CAMEngine(model, "cam", boxes=False)(images)
    assert not torch.allclose(got.cams, bilinear.cams, atol=1e-3)  # (bicubic overshoots: another map)
    (layer_maps,) = got.layer_maps.values()
    for n in range(images.shape[0]):
        cam = cv2.resize(layer_maps[n].numpy(), (24, 24), interpolation=cv2.INTER_CUBIC)
        cam = np.zeros_like(cam) if np.isnan(cam).any() or cam.min() == cam.max() else (cam - cam.min()) / (cam.max() - cam.min())
        np.testing.assert_allclose(got.cams[n].numpy(), cam, atol=2e-6, rtol=0)
    fully = CAMEngine(model, "fullycam", upsample="bicubic", fuse="max", return_layer_maps=True, boxes=False)(images)
    want, _ = rethinkcam_fast.ops.fuse_maps.fuse_maps_reference(list(fully.layer_maps.values()), (24, 24), "max",
                                                                 "bicubic")
    torch.testing.assert_close(fully.cams, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="upsample must be one of"):
        CAMEngine(model, "cam", upsample="nearest")
    with pytest.raises(ValueError, match="differentiable=True upsamples bilinearly"):
        CAMEngine(model, "cam", upsample="bicubic", differentiable=True)


def _conv_bn_relu_head(tau=None, batch_norm=True):
    """wsolevaluation's VggCam layout in small: features, conv, (BN,) ReLU, pool (GAP, or TAP with tau), fc."""
    pool = nn.AdaptiveAvgPool2d(1) if tau is None else TAP(tau)
    norm = nn.BatchNorm2d(8) if batch_norm else nn.Identity()  # (kept as a module: the same indices)
    return make(lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
                                      norm, nn.ReLU(), pool, nn.Flatten(), nn.Linear(8, 5)))


@pytest.mark.parametrize("batch_norm", [True, False], ids=["bn", "no-bn"])
@pytest.mark.parametrize("tau", [None, 0.0, 0.3], ids=["gap", "tap0", "tap0.3"])
def test_cam_default_target_is_the_pooled_output_with_gap_or_tap(tau, batch_norm):
    """The rethinking-CAM setup (VGG + TAP): the default target is the ReLU whose output TAP pools, as
    with GAP, not the conv before it (with or without a batch norm between: TAP, which keeps only
    values above tau * max, pools the conv's output and its ReLU alike); a given pre-activation
    target warns, naming it (where the pool tells them apart)."""
    model = _conv_bn_relu_head(tau, batch_norm).eval()
    images = images_for(size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = CAMEngine(model, "cam", boxes=False)
        got = engine(images)
    assert engine.target_layers == [model[4]]
    want = oracle_single(model, model[4], images, got.labels, "cam", classifier=model[7])
    torch.testing.assert_close(got.cams.double(), want, atol=2e-5, rtol=1e-4)
    if batch_norm or tau is None:
        with pytest.warns(RuntimeWarning, match="'2''s output does not give the logits.*pass target_layers='4'"):
            CAMEngine(model, "cam", "2", boxes=False)(images)


def test_cam_pooling_check_in_train_mode_runs_no_extra_forward():
    """A CAM loss in a training loop: in train() mode the check uses the call's own forward only (an
    extra one would update batch-norm statistics, or need the shared model switched to eval()): a
    match settles it, a mismatch (dropout or batch statistics may explain it) waits for the first
    eval()-mode call, whose answer train-mode calls then use."""
    model = _conv_bn_relu_head(0.1).train()
    engine = CAMEngine(model, "cam", differentiable=True, boxes=False)
    with pytest.warns(RuntimeWarning, match="default target '2' is not confirmed.*pass target_layers="):
        engine(images_for(size=16)).cams.sum().backward()
    assert int(model[3].num_batches_tracked) == 1  # one forward
    assert engine.target_layers == [model[2]]  # (the conv before the batch norm: not decided in training)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    engine(images_for(size=16))
    assert engine.target_layers == [model[4]]
    model.train()
    engine(images_for(size=16))
    assert engine.target_layers == [model[4]] and int(model[3].num_batches_tracked) == 2
    matching = _conv_bn_relu_head().train()  # the default's output is what is pooled: settled in training
    engine = CAMEngine(matching, "cam", target_layers=[matching[4]], differentiable=True, boxes=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine(images_for(size=16))
    assert list(engine._pooling.values()) == [None]


def test_cam_pooling_check_leaves_out_images_with_non_finite_logits():
    """A NaN image in the first batch neither decides the check nor warns; a batch with no finite
    logits leaves it to a later call."""
    model = _conv_bn_relu_head().eval()
    images = images_for(size=16)
    images[1, 0, 3, 3] = float("nan")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "CAM map", RuntimeWarning)  # (the NaN image's degenerate map)
        warnings.simplefilter("error", RuntimeWarning)
        engine = CAMEngine(model, "cam", boxes=False, warn_degenerate=False)
        engine(images)
        assert engine.target_layers == [model[4]]
        engine = CAMEngine(model, "cam", boxes=False, warn_degenerate=False)
        engine(torch.full_like(images, float("nan")))  # nothing to tell from
        engine(images_for(size=16))
        assert engine.target_layers == [model[4]]


def test_a_1x1_conv_head_is_found_as_the_cam_classifier():
    model = make(_NetworkInNetwork).eval()
    images = images_for()
    engine = CAMEngine(model, "cam", boxes=False)
    got = engine(images)
    assert engine.classifier is model.cls and engine.target_layers == [model.features]
    want = CAMEngine(model, "cam", classifier=model.cls, boxes=False)(images)
    torch.testing.assert_close(got.cams, want.cams, atol=0, rtol=0)


def test_a_1x1_conv_head_after_a_given_target_or_inside_the_default_one():
    model = make(_NetworkInNetwork).eval()
    engine = CAMEngine(model, "cam", "features", boxes=False)
    engine(images_for())
    assert engine.classifier is model.cls

    class HeadInside(nn.Module):  # the default target (the Sequential) ends with the head
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 1))

        def forward(self, x):
            return self.features(x).mean((2, 3))

    model = make(HeadInside).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = CAMEngine(model, "cam", boxes=False)
        got = engine(images_for())
    assert engine.classifier is model.features[2] and engine.target_layers == [model.features[1]]
    want = CAMEngine(model, "cam", "features.1", classifier=model.features[2], boxes=False)(images_for())
    torch.testing.assert_close(got.cams, want.cams, atol=0, rtol=0)


def test_dropout_in_training_leaves_the_default_target_unconfirmed_with_one_warning():
    """A CAM loss in training (differentiable=True, train() mode): dropout before the classifier
    makes the logits differ from the classifier of the pooled map, which a train-mode forward cannot
    tell from a layer after the target: one warning, then the training goes on."""
    class DropHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
            self.drop, self.fc = nn.Dropout(0.5), nn.Linear(6, 5)

        def forward(self, x):
            return self.fc(self.drop(self.features(x).mean((2, 3))))

    model = make(DropHead).train()
    engine = CAMEngine(model, "cam", differentiable=True, boxes=False)
    with pytest.warns(RuntimeWarning, match="not confirmed") as caught:
        engine(images_for()).cams.sum().backward()
    assert len(caught) == 1 and model.fc.weight.grad is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        engine(images_for())
        CAMEngine(model, "cam", "features", differentiable=True, boxes=False)(images_for())  # a given target: silent


def test_the_default_target_follows_the_input_size_not_the_call_history():
    model = make(_Strided).eval()
    small, large = images_for(size=16), images_for(size=64)
    engine = CAMEngine(model, "gradcam", boxes=False)
    first_small = engine(small)
    assert engine.target_layers == [model.c1]  # c2's map would be 1x1 (constant)
    got_large = engine(large)
    assert engine.target_layers == [model.c2]
    torch.testing.assert_close(got_large.cams, CAMEngine(model, "gradcam", boxes=False)(large).cams, atol=0, rtol=0)
    torch.testing.assert_close(engine(small).cams, first_small.cams, atol=0, rtol=0)
    pinned = CAMEngine(model, "gradcam", [model.c1], boxes=False)
    pinned(large)
    assert pinned.target_layers == [model.c1]  # a target the caller gave stays


def test_a_model_in_training_mode_gets_one_warning():
    model = make(MiniResNet).train()  # (batch norms)
    engine = CAMEngine(model, "gradcam", boxes=False)
    with pytest.warns(RuntimeWarning, match="batch norms or dropout in training mode"):
        engine(images_for())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine(images_for())  # once per engine
        CAMEngine(model, "gradcam", differentiable=True, boxes=False)(images_for())  # training with a CAM loss
        CAMEngine(model.eval(), "gradcam", boxes=False)(images_for())
        wrapper = nn.Sequential(model.eval())
        wrapper.training = True  # a wrapper in train() around an eval() model (DataParallel's): nothing to say
        CAMEngine(wrapper, "gradcam", boxes=False)(images_for())


def test_targets_as_a_list_or_a_0d_tensor_and_argument_names_in_errors():
    model = make(SmallCNN).eval()
    engine = CAMEngine(model, "gradcam", boxes=False)
    images = images_for()
    want = engine(images, targets=torch.tensor([1, 0, 2]))
    assert torch.equal(engine(images, targets=[1, 0, 2]).cams, want.cams)
    assert torch.equal(engine(images, targets=torch.tensor(2)).labels, torch.full((3,), 2))
    labels = torch.tensor([1, 0, 2], dtype=torch.int32)  # a list of labels[i], as a loop over a batch gives
    assert torch.equal(engine(images, targets=[labels[i] for i in range(3)]).cams, want.cams)
    assert torch.equal(engine(images, targets=(np.int16(1), np.array(0), 2)).cams, want.cams)
    assert torch.equal(engine(images, targets=np.array(2)).labels, torch.full((3,), 2))
    for bad in ([1.0, 0, 2], [True, 0, 2], [torch.tensor([1]), 0, 2], [torch.tensor(1.0), 0, 2]):
        with pytest.raises(TypeError, match="a list of ints"):
            engine(images, targets=bad)
    with pytest.raises(ValueError, match="classifier= applies to method='cam' only"):
        CAMEngine(model, "gradcam", classifier=nn.Linear(8, 5))
    with pytest.raises(ValueError, match="pas_q=200"):
        CAMEngine(model, "gradcam", pas_q=200)


def test_one_engine_shared_by_threads_at_two_input_sizes():
    """Each call works from its own input size's default target: calls at another size, on other
    threads, never change it mid-call."""
    import threading

    model = make(_Strided).eval()
    engine = CAMEngine(model, "gradcam", boxes=False, warn_degenerate=False)
    inputs = {16: images_for(size=16), 64: images_for(size=64)}
    want = {size: CAMEngine(model, "gradcam", boxes=False)(x).cams for size, x in inputs.items()}
    errors = []

    def run(size):
        try:
            for _ in range(15):
                torch.testing.assert_close(engine(inputs[size]).cams, want[size], atol=0, rtol=0)
        except Exception as exc:  # (reported below: pytest does not see a thread's exception)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(size,)) for size in (16, 64, 16, 64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_logits_picked_from_a_model_with_several_outputs():
    class TwoOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make(SmallCNN)

        def forward(self, x):
            return {"logits": self.net(x), "aux": x.mean()}

    model, images = TwoOutputs().eval(), images_for()
    want = CAMEngine(model.net, "gradcam", boxes=False)(images).cams
    for pick in ("logits", lambda out: out["logits"]):
        torch.testing.assert_close(CAMEngine(model, "gradcam", boxes=False, logits=pick)(images).cams, want,
                                   atol=0, rtol=0)
    class AsTuple(nn.Module):
        def __init__(self, net) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x), x.mean()

    cams = CAMEngine(model.net, "cam", boxes=False)(images).cams  # ("cam" finds the classifier through it too)
    torch.testing.assert_close(CAMEngine(AsTuple(model.net).eval(), "cam", boxes=False, logits=0)(images).cams, cams,
                               atol=0, rtol=0)
    with pytest.raises(ValueError, match="pick the logits with logits="):
        CAMEngine(model, "gradcam", boxes=False)(images)
    with pytest.raises(ValueError, match="logits='scores' does not pick the logits.*KeyError"):
        CAMEngine(model, "gradcam", boxes=False, logits="scores")(images)
    with pytest.raises(TypeError, match="logits must be None, an index"):
        CAMEngine(model, "gradcam", logits=2.5)


def test_a_moved_cam_target_holds_at_every_input_size_and_after_a_reset():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 5)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_(generator=torch.Generator().manual_seed(0))
    engine = CAMEngine(model, "cam", boxes=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for size in (16, 24, 16, 24):
            engine(images_for(size=size))
            assert engine.target_layers == [model[2]], size
        engine.target_layers = None
        engine(images_for(size=24))
        assert engine.target_layers == [model[2]]


def test_the_pooling_check_survives_a_module_that_refuses_hooks():
    class Scripted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # (torch.jit.script's own, torch >= 2.10)
                self.act = torch.jit.script(nn.Sequential(nn.BatchNorm2d(6), nn.ReLU()).eval())
            self.fc = nn.Linear(6, 5)

        def forward(self, x):
            return self.fc(self.act(self.conv(x)).mean((2, 3)))

    model = make(Scripted).eval()
    with pytest.warns(RuntimeWarning, match="does not give the logits"):  # (no module to name: the search failed)
        CAMEngine(model, "cam", boxes=False)(images_for())
    assert all(not m._forward_hooks for m in model.modules() if not isinstance(m, torch.jit.ScriptModule))


def test_result_moves_as_a_whole_and_reprs_show_shapes_not_values():
    model = make(MiniResNet, classes=5).eval()
    engine = CAMEngine(model, "gradcam", return_layer_maps=True, warn_degenerate=False)
    assert repr(engine).startswith("CAMEngine(MiniResNet, method='gradcam', target_layers=default")
    result = engine(torch.rand(2, 3, 32, 32))
    assert "target_layers=['layer3']" in repr(engine) and len(result) == 2
    text = repr(result)
    assert text.startswith("CAMResult(N=2, device=cpu, labels=int64[2], scores=float32[2], cams=float32[2, 32, 32]")
    assert "layer_maps={'layer3': float32[2, 2, 2]}" in text and "tensor(" not in text
    moved = result.to(torch.device("meta"))  # (another device, on a CPU-only machine)
    for name in ("labels", "scores", "cams", "degenerate", "boxes", "thresholds"):
        assert getattr(moved, name).device.type == "meta"
        assert getattr(moved, name).dtype == getattr(result, name).dtype
    assert moved.layer_maps["layer3"].device.type == "meta" and result.layer_maps["layer3"].device.type == "cpu"
    assert result.cpu().cams is result.cams  # already there: shared, as Tensor.to shares
    trained = CAMEngine(model, "cam", differentiable=True, boxes=False)(torch.rand(2, 3, 32, 32)).to("cpu")
    trained.cams.sum().backward()  # gradients flow through the moved result
    assert model.fc.weight.grad is not None


def test_call_at_size_is_per_call_and_warnings_point_at_the_callers_line():
    """call_at_size leaves the engine's output_size alone (one engine, callers of several sizes, as the
    video path's streams); the engine's warnings name the caller's line, through either entry point."""
    model = make(MiniResNet, classes=5).eval()
    engine = CAMEngine(model, "gradcam", warn_degenerate=False)
    images = torch.rand(2, 3, 32, 32)
    result = engine.call_at_size(images, None, (20, 24))
    assert result.cams.shape == (2, 20, 24) and engine.output_size is None
    assert torch.equal(result.cams, CAMEngine(model, "gradcam", output_size=(20, 24), warn_degenerate=False)(images).cams)
    assert engine(images).cams.shape == (2, 32, 32)
    model.train()
    try:
        for call in (lambda e: e(images), lambda e: e.call_at_size(images, None, (8, 8))):
            with pytest.warns(RuntimeWarning, match="training mode") as caught:
                call(CAMEngine(model, "gradcam", warn_degenerate=False))
            assert caught[0].filename == __file__
    finally:
        model.eval()
    nan = torch.full((1, 3, 32, 32), float("nan"))  # a non-finite score: a zero map, warned about
    for method in ("gradcam", "fullycam"):
        with pytest.warns(RuntimeWarning, match="constant or non-finite") as caught:
            CAMEngine(model, method)(nan)
        assert [w.filename for w in caught] == [__file__] * len(caught)


def test_an_engine_remembers_a_bounded_number_of_input_sizes(monkeypatch):
    """A service sees arbitrary sizes for days: what an engine finds per size (default target,
    classifier, pooling check) starts over past a bound instead of growing; results are unchanged."""
    import rethinkcam_fast.engine as engine_module

    monkeypatch.setattr(engine_module, "_SIZES_KEPT", 3)
    model = make(SmallCNN, classes=4).eval()
    engine = CAMEngine(model, "cam", boxes=False, warn_degenerate=False)
    for side in range(20, 30):
        images = torch.rand(1, 3, side, side)
        assert torch.equal(engine(images).cams, CAMEngine(model, "cam", boxes=False, warn_degenerate=False)(images).cams)
        assert len(engine._found) <= 3 and len(engine._pooling) <= 3


def _flat_net(inplace: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(inplace), nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16),
                         nn.ReLU(inplace), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
def test_gradient_methods_default_past_the_activations_in_place_or_not(method):
    """conv, BatchNorm2d, ReLU as separate modules: the default target is the ReLU, whether it runs in
    place (its output is the conv's output tensor) or not, so both give the same map, the map of the
    rectified features that naming the ReLU gives."""
    images = images_for(31, n=2, size=24)
    results = {}
    for inplace in (True, False):
        engine = CAMEngine(_flat_net(inplace), method, warn_degenerate=False)
        results[inplace] = engine(images).cams
        assert engine.layer_name(engine.target_layers[0]) == "4"
        again = engine(images).cams  # the default found once for the size, then reused
        assert torch.equal(again, results[inplace])
    torch.testing.assert_close(results[True], results[False], atol=1e-6, rtol=0)
    named = CAMEngine(_flat_net(False), method, target_layers="4", warn_degenerate=False)(images).cams
    torch.testing.assert_close(results[False], named, atol=0, rtol=0)
    before_relu = CAMEngine(_flat_net(False), method, target_layers="3", warn_degenerate=False)(images).cams
    if method != "layercam":  # (the move matters on this model; LayerCAM's relu(g) relu(A) is the same
        # before and after a ReLU: the gradient before it is the one after, masked where A <= 0)
        assert (before_relu - named).abs().max() > 0.05
    else:
        torch.testing.assert_close(before_relu, named, atol=1e-6, rtol=0)


class _SqueezeHead(nn.Module):
    """SqueezeNet's layout: features, then Dropout, a 1x1 conv to the classes, ReLU, global pool."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1),
                                      nn.ReLU())
        self.classifier = nn.Sequential(nn.Dropout(), nn.Conv2d(12, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return self.classifier(self.features(x)).flatten(1)


def test_squeezenet_heads_are_classifiers_for_every_method():
    """A 1x1 conv head followed by a ReLU before the pool: ``"cam"`` takes it as the classifier, without
    a warning (its map is the class score map before that ReLU), and the gradient methods do not take
    it as their default target (its "feature map" would be the class's own score map)."""
    model = make(_SqueezeHead)
    images = images_for(32, n=2, size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = CAMEngine(model, "cam", boxes=False, warn_degenerate=False)
        engine(images)
    assert engine.classifier is model.classifier[1] and engine.layer_name(engine.target_layers[0]) == "features"
    for method in ("gradcam", "gradcam++", "layercam"):
        engine = CAMEngine(model, method, warn_degenerate=False)
        got = engine(images).cams
        assert engine.layer_name(engine.target_layers[0]) == "features", method
        torch.testing.assert_close(got, CAMEngine(model, method, "features", warn_degenerate=False)(images).cams,
                                   atol=0, rtol=0)


def test_a_bottleneck_conv_as_wide_as_the_classes_is_not_taken_for_the_cam_classifier():
    """Features that end in a 1x1 conv with as many channels as there are classes, then an MLP head
    (MobileNetV3's layout): no nn.Linear from the features to the classes, so "cam" has no classifier
    (the error), whatever the class count; the conv is not a network-in-network head."""
    for classes in (10, 16):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.Hardswish()),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Sequential(nn.Linear(16, 32), nn.Hardswish(), nn.Linear(32, classes))).eval()
        with pytest.raises(ValueError, match=rf"needs the classifier after the global pool: no nn.Linear\(16 -> {classes}\)"):
            CAMEngine(model, "cam")(images_for(n=1, size=16))


def test_a_logits_selector_leaves_an_output_that_is_already_the_logits():
    """GoogLeNet and Inception return (logits, aux) as a namedtuple in train() mode and the logits
    alone in eval(): logits=0 or "logits" serves both (an index must not pick an image)."""
    import collections

    Out = collections.namedtuple("Out", ["logits", "aux_logits"])

    class Inceptionish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 5)

        def forward(self, x):
            y = self.fc(self.conv(x).relu().mean((2, 3)))
            return Out(y, y * 0) if self.training else y

    model = make(Inceptionish)
    images = images_for(33, n=2, size=16)
    for selector in (0, "logits"):
        engine = CAMEngine(model, "gradcam", logits=selector, warn_degenerate=False)
        model.train()
        trained = engine(images).cams
        model.eval()
        torch.testing.assert_close(engine(images).cams, trained, atol=0, rtol=0)


def test_results_of_batches_concatenate_into_the_result_of_all():
    model = make(SmallCNN, classes=4)
    images = images_for(34, n=5, size=16)
    engine = CAMEngine(model, "layercam", return_layer_maps=True, warn_degenerate=False)
    whole = engine(images)
    joined = CAMResult.cat([engine(images[:2]), engine(images[2:])])
    for name in ("labels", "scores", "degenerate", "boxes", "thresholds"):
        assert torch.equal(getattr(joined, name), getattr(whole, name)), name
    torch.testing.assert_close(joined.cams, whole.cams, atol=1e-6, rtol=0)
    assert joined.layer_maps.keys() == whole.layer_maps.keys() and joined.logits is None
    assert CAMResult.cat([whole]) is whole
    with pytest.raises(ValueError, match="at least one result"):
        CAMResult.cat([])
    plain = CAMEngine(model, "layercam", boxes=False, return_layer_maps=True, warn_degenerate=False)(images[:1])
    with pytest.raises(ValueError, match="boxes is present in some results and not in others"):
        CAMResult.cat([whole, plain])


def test_the_engines_boxes_follow_its_box_convention():
    """Boxes in the convention asked for: "exact" inclusive extents, "wsol" the reference's one pixel
    larger (clipped at the far edges), from the same maps and thresholds."""
    model = make(SmallCNN, classes=4)
    images = images_for(35, n=4, size=24)
    results = {c: CAMEngine(model, "gradcam", box_convention=c, warn_degenerate=False)(images)
               for c in ("exact", "wsol")}
    for convention, result in results.items():
        want = boxes_from_cams(result.cams, result.thresholds, convention=convention)
        assert torch.equal(result.boxes, want), convention
    exact, wsol = results["exact"].boxes, results["wsol"].boxes
    assert torch.equal(wsol[:, :2], exact[:, :2])
    assert torch.equal(wsol[:, 2:], torch.minimum(exact[:, 2:] + 1, torch.tensor([23, 23])))
    assert not torch.equal(wsol, exact)


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_gradient_methods_on_a_compiled_model_equal_eager(method):
    """torch.compile'd models: the hooks' thread check breaks Dynamo's graph at each hooked module
    (a warning), which keeps the target's output on the autograd graph; traced into the compiled
    graph, the gradient methods found their target off the graph."""
    model = _flat_net(False)
    images = images_for(36, n=2, size=16)
    want = CAMEngine(model, method, warn_degenerate=False)(images).cams
    compiled = torch.compile(model, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (Dynamo's graph-break notice)
        got = CAMEngine(compiled, method, warn_degenerate=False)(images).cams
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_shared_activation_module_is_the_default_target_only_through_its_last_run():
    """One ReLU module applied several times (as a ResNet block's): the next calls record a module's
    last run, so the default target moves to it only when that last run is the one that follows the
    conv; otherwise it stays on the conv."""
    class Shared(nn.Module):
        def __init__(self, again: bool) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
            self.relu, self.fc, self.again = nn.ReLU(), nn.Linear(6, 4), again

        def forward(self, x):
            x = self.relu(self.conv2(self.relu(self.conv1(x))))
            if self.again:  # the shared ReLU runs once more, on another tensor
                x = x + self.relu(x - 0.5)
            return self.fc(x.mean((2, 3)))

    images = images_for(37, n=2, size=12)
    for again, want in ((False, "relu"), (True, "conv2")):
        model = make(Shared, again=again)
        engine = CAMEngine(model, "gradcam", warn_degenerate=False)
        first = engine(images).cams
        assert engine.layer_name(engine.target_layers[0]) == want, again
        torch.testing.assert_close(engine(images).cams, first, atol=0, rtol=0)
