"""Hand-written eager baselines shared by the benchmark suites (what a careful user would write)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def eager_gradcam(model, target, images):
    """A careful hand-written on-device Grad-CAM: hook, autograd.grad, weights, sum, ReLU, resize, min-max."""
    logits, act = forward_with_activation(model, target, images)
    labels = logits.argmax(1)
    (grad,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), act)
    cam = (grad.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True).relu()
    cam = F.interpolate(cam.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    flat = cam.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(cam)


def forward_with_activation(model, target, images):
    """``(logits, target layer output)`` from one forward that records a graph."""
    store = {}
    handle = target.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        logits = model(images.detach().requires_grad_(True))
    finally:
        handle.remove()
    return logits, store["a"]


def minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo)).view_as(maps)


def eager_cam(features, weight, labels, size):
    """The eager formulation: channel sum, bilinear upsampling, per-image min-max (autograd backward)."""
    m = torch.einsum("nk,nkhw->nhw", weight[labels].float(), features.float())
    return minmax(F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0])


def eager_flm(activations, gradients, size, fuse="sum"):
    parts = []
    for a, g in zip(activations, gradients):
        m = (g.float().relu() * a.float().relu()).sum(1)
        parts.append(minmax(F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]))
    fused = sum(parts) if fuse == "sum" else torch.stack(parts).amax(0)
    return minmax(fused)
