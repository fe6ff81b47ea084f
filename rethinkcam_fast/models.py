"""A small VGG-GAP-style classifier for the cluttered-digits benchmark, and its checkpoint format.

``DigitsCAMNet``: conv stack (VGG blocks, two 2x2 max pools) -> extra 3x3 conv (the CAM layer, as
in VGG-GAP) -> global pool (GAP or TAP) -> linear. The CAM layer keeps 1/4 of the input resolution
(16x16 on a 64x64 canvas).

Checkpoints are plain dicts of tensors and primitives, so they load with ``torch.load(...,
weights_only=True)`` and nothing else::

    {"format": "rethinkcam_fast.digits_cam_net/1", "arch": {...}, "state_dict": {...}, "meta": {...}}
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._files import replaceable
from .datasets import NUM_CLASSES
from .modules import TAP

CHECKPOINT_FORMAT = "rethinkcam_fast.digits_cam_net/1"
POOLS = ("gap", "tap")


class DigitsCAMNet(nn.Module):
    """``Tensor[N, in_channels, H, W] -> logits Tensor[N, classes]``; ``features`` ends at the CAM layer.

    Args:
        pool: ``"gap"`` (global average pooling) or ``"tap"`` (thresholded average pooling, ``tau``).
        tau: TAP's threshold ratio in ``[0, 1)`` (ignored for GAP).
        widths: channels of the three stages; the CAM layer has ``widths[-1]`` channels.
        classes, in_channels: output classes and input channels.
    """

    def __init__(self, pool: str = "tap", tau: float = 0.1, widths: tuple[int, int, int] = (16, 32, 64),
                 classes: int = NUM_CLASSES, in_channels: int = 1) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths must be three positive channel counts, got {widths}")
        self._shape = {"widths": [int(w) for w in widths], "classes": int(classes), "in_channels": int(in_channels)}
        self._built_tau = float(tau)  # recorded for a GAP model too, as it was given
        w1, w2, w3 = widths

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *conv(in_channels, w1), *conv(w1, w1), nn.MaxPool2d(2),
            *conv(w1, w2), *conv(w2, w2), nn.MaxPool2d(2),
            *conv(w2, w3),
            *conv(w3, w3),  # the extra conv of VGG-GAP: the layer the CAM is read from
        )
        self.pool = TAP(tau) if pool == "tap" else nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(w3, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))

    @property
    def arch(self) -> dict[str, Any]:
        """The checkpoint's architecture record, read from the modules as they are now (a pool swapped by
        :func:`rethinkcam_fast.replace_gap_with_tap` after construction included)."""
        if isinstance(self.pool, TAP):
            pool, tau = "tap", float(self.pool.tau)
        elif isinstance(self.pool, nn.AdaptiveAvgPool2d) and self.pool.output_size in (1, (1, 1), [1, 1]):
            pool, tau = "gap", self._built_tau
        else:
            raise ValueError(f"DigitsCAMNet.pool is {type(self.pool).__name__}: a checkpoint records TAP or GAP only")
        return {"pool": pool, "tau": tau, **self._shape}


def digits_cam_net(pool: str = "tap", **kwargs: Any) -> DigitsCAMNet:
    """Factory for ``--model rethinkcam_fast.models:digits_cam_net``."""
    return DigitsCAMNet(pool=pool, **kwargs)


class CheckpointError(ValueError):
    """A weights file that cannot be read, or that does not fit the model."""


def save_checkpoint(path: str, model: DigitsCAMNet, meta: Mapping[str, Any] | None = None,
                    resume: Mapping[str, Any] | None = None) -> None:
    """Write ``model``'s checkpoint atomically: a temporary file in the same directory, then ``os.replace``.

    A crash mid-write leaves the previous file intact; readers never see a partial file. ``resume``
    (the training state of an unfinished run: tensors, numbers and lists only, so that it reads back
    with ``weights_only=True``) is stored under ``"resume"``.
    """
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in _plain_state_dict(model).items()}
    payload = {"format": CHECKPOINT_FORMAT, "arch": dict(model.arch), "state_dict": state, "meta": dict(meta or {})}
    if resume is not None:
        payload["resume"] = dict(resume)
    path = replaceable(path, "checkpoint")  # (a symlink's file; never a device or a pipe)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """State dict without ``torch.compile``'s ``_orig_mod.`` prefix."""
    inner = getattr(model, "_orig_mod", model)
    return inner.state_dict()


def read_weights(path: str) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that say what is wrong with the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: " + ("not a regular file" if os.path.exists(path) else "weights file not found"))
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # torch names the global it refused; otherwise: a damaged file
            # (torch's own text advises weights_only=False, which would run the file's code: not shown)
            raise CheckpointError(f"{path}: not a readable PyTorch weights file (not written by torch.save, "
                                  "or damaged)") from exc
        # A whole pickled model (torch.save(model)) or other objects: code, not weights.
        raise CheckpointError(
            f"{path}: holds pickled Python objects, not only tensors (e.g. a whole model saved with "
            "torch.save(model)); it is not loaded, since unpickling can run code. Save "
            "model.state_dict() instead and pass that file") from exc
    except Exception as exc:  # truncated zip, random bytes, an empty file, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: not a readable PyTorch weights file (not written by torch.save, or damaged: "
                              f"{type(exc).__name__}{': ' + first if first else ''})") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a state dict or a checkpoint dict, got {type(payload).__name__}")
    return payload


def state_dict_of(payload: Mapping[str, Any], path: str) -> dict[str, Tensor]:
    """The state dict inside a loaded weights file: ours (``"state_dict"``), common wrappers, or a bare one."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(payload.get(key), Mapping):
            payload = payload[key]
            break
    if not payload or not all(isinstance(v, Tensor) for v in payload.values()):
        raise CheckpointError(f"{path}: holds no state dict (a mapping of parameter names to tensors)")
    return dict(payload)


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP's, torch.compile's


def _unwrapped(state: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """``state`` with the prefixes of the wrappers it was saved through taken off: DDP's ``module.`` and
    ``torch.compile``'s ``_orig_mod.``, stacked in any order (``compile(DDP(model))`` saves both), one
    shared by every key at a time, as far as matches the model's own keys best (a model may have a
    child called ``module``: DDP then saves ``module.module.*``, which loads as ``module.*``)."""
    best, best_overlap = state, len(own.keys() & state.keys())
    while True:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            return best
        state = {k[len(prefix):]: v for k, v in state.items()}
        overlap = len(own.keys() & state.keys())
        if overlap > best_overlap:
            best, best_overlap = state, overlap


def load_state_into(model: nn.Module, state: Mapping[str, Tensor], path: str) -> nn.Module:
    """``model.load_state_dict(state, strict=True)`` with a readable error for another architecture (the
    model, which every caller builds for the purpose, may then hold some of the weights); the prefixes
    of DDP and ``torch.compile`` wrappers are taken off as the model's keys need. Which keys
    may be absent is the modules' own rule (a TAP from before its ``tau`` was saved keeps its own)."""
    own = model.state_dict()
    state = _unwrapped(state, own)
    wrong_shape = {k for k, v in own.items() if k in state and state[k].shape != v.shape}
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in wrong_shape]
    try:
        keys = model.load_state_dict({k: v for k, v in state.items() if k not in wrong_shape}, strict=False)
    except RuntimeError as exc:  # a tensor torch cannot copy in (sparse, complex, ...): its reason, in one line
        reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise CheckpointError(f"{path}: its weights cannot be loaded into {type(model).__name__} ({reason})") from None
    missing = [k for k in keys.missing_keys if k not in wrong_shape]
    unexpected = keys.unexpected_keys
    if missing or unexpected or mismatched:
        details = []
        for what, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                details.append(f"{len(items)} {what} (e.g. {', '.join(items[:3])})")
        raise CheckpointError(f"{path}: weights are for another architecture than {type(model).__name__}: "
                              + "; ".join(details))
    return model


def model_from_arch(arch: Any, path: str) -> DigitsCAMNet:
    """The :class:`DigitsCAMNet` a checkpoint's ``arch`` record describes (fresh weights)."""
    try:
        return DigitsCAMNet(pool=arch["pool"], tau=arch["tau"], widths=tuple(arch["widths"]),
                            classes=arch["classes"], in_channels=arch["in_channels"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid architecture record {arch!r} ({exc})") from exc


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> tuple[DigitsCAMNet, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights: ``(model.eval(), meta)``."""
    payload = read_weights(path)
    if payload.get("format") != CHECKPOINT_FORMAT or not isinstance(payload.get("arch"), dict):
        raise CheckpointError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint (format={payload.get('format')!r}); "
                              "for a bare state dict use `rethinkcam localize --model ... --weights ...`")
    model = model_from_arch(payload["arch"], path)
    load_state_into(model, state_dict_of(payload, path), path)
    return model.to(map_location).eval(), dict(payload.get("meta") or {})


SHIPPED_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "digits_tap.pt")


def load_shipped_model(map_location: str | torch.device = "cpu") -> tuple[DigitsCAMNet, dict[str, Any]]:
    """The model shipped inside the package (trained with TAP; see the README for the command and seed)."""
    if not os.path.isfile(SHIPPED_WEIGHTS):
        raise CheckpointError(f"{SHIPPED_WEIGHTS}: the shipped weights are missing from this installation")
    return load_checkpoint(SHIPPED_WEIGHTS, map_location)


__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "DigitsCAMNet", "SHIPPED_WEIGHTS", "digits_cam_net",
           "load_checkpoint", "load_shipped_model", "load_state_into", "model_from_arch", "read_weights", "save_checkpoint",
           "state_dict_of"]
