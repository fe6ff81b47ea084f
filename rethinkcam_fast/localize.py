"""From a classifier to boxes: WSOL box metrics, per-image records, and ``rethinkcam localize``.

* :func:`wsol_box_metrics` — MaxBoxAcc, MaxBoxAccV2 and Top-1 Loc of a set of CAMs (the WSOL protocol: one
  CAM threshold for the whole dataset), on top of :func:`~rethinkcam_fast.best_box_ious`. It is the
  single place these numbers are computed here, so the evaluator (issue 5) can replace it in one go.
* :func:`localization_records` / :func:`write_outputs` — the JSON list (``label``, ``score``, ``box``
  per image) and the PNG grid that ``rethinkcam demo`` and ``rethinkcam localize`` write.
* :func:`load_user_model` / :func:`localize_files` — a user's own model (a torchvision name or
  ``pkg.module:factory``) and weights file, on image files.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .engine import CAMEngine, CAMResult
from .imageio import overlay_tile, read_image, save_grid
from .models import CHECKPOINT_FORMAT, DigitsCAMNet, load_state_into, model_from_arch, read_weights, state_dict_of
from .ops.box_ious import best_box_ious, cam_curve_thresholds, protocol_thresholds
from .ops.percentile_threshold import lerp_like_numpy, percentile_plan, scaled_levels

V2_IOU_THRESHOLDS = (0.3, 0.5, 0.7)
# Box thresholds int(theta * percentile_q(uint8 map)) by name: plain CAM thresholding (0.2 x max) and PaS.
BOX_THRESHOLDS = {"max": (100.0, 0.2), "pas": (90.0, 0.35)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JSON_NAME, GRID_NAME = "localizations.json", "grid.png"


@dataclass(frozen=True)
class LocalizationMetrics:
    """Percentages over ``num_images`` images, each at its best dataset-wide CAM threshold.

    ``max_box_acc``: largest contour, IoU >= 0.5. ``max_box_acc_v2``: every contour's box, mean over
    IoU >= 0.3 / 0.5 / 0.7. ``top1_loc``: as ``max_box_acc`` and the top-1 class correct.
    ``threshold_standard``: ``"max"`` (levels ``int(t * max)``, the protocol) or ``"p<q>"``
    (``floor(t * percentile_q)``, the PaS standard). ``fixed_top1_loc``: ``{name: Top-1 Loc}`` with
    each map cut at the fixed levels given under that name (no threshold search), when given.
    """

    max_box_acc: float
    max_box_acc_v2: float
    top1_loc: float
    top1_cls: float
    num_images: int
    threshold_standard: str
    fixed_top1_loc: dict[str, float] | None = None


def sweep_levels(cams: Tensor, cam_thresholds: np.ndarray, percentile: float | None = None) -> Tensor:
    """``LongTensor[N, T]`` uint8 levels to cut each map at: ``int(t * max)`` or ``floor(t * percentile_q)``.

    ``cams``: ``Tensor[N, H, W]`` in ``[0, 1]``. The percentile is numpy's default (linear
    interpolation) over the ``uint8(255 * cam)`` levels, as PaS defines it.
    """
    if percentile is None:
        return protocol_thresholds(cams, cam_thresholds)
    levels = scaled_levels(cams.flatten(1), torch.int64).double()  # uint8(255 * cam) levels, truncated
    if len(cams):  # numpy's linear percentile, exactly (torch.quantile has a size limit and other rounding)
        rank_lo, rank_hi, gamma = percentile_plan(levels.shape[1], percentile)
        ordered = levels.sort(dim=1).values
        standard = lerp_like_numpy(ordered[:, rank_lo], ordered[:, rank_hi], gamma)
    else:
        standard = levels.new_zeros(0)
    t = torch.as_tensor(cam_thresholds, dtype=torch.float64, device=cams.device)
    return (t[None, :] * standard[:, None]).floor().to(torch.int64)


def wsol_box_metrics(cams: Tensor, gt_boxes: Tensor, labels: Tensor, predictions: Tensor, *,
                     percentile: float | None = None, cam_curve_interval: float = 0.01,
                     fixed_thresholds: dict[str, Tensor] | None = None) -> LocalizationMetrics:
    """MaxBoxAcc, MaxBoxAccV2 and Top-1 Loc (the WSOL protocol) of ground-truth-class CAMs.

    Args:
        cams: ``Tensor[N, H, W]`` in ``[0, 1]``, the maps of the true classes, in the GT boxes' pixel grid.
        gt_boxes: ``LongTensor[N, 4]``, one inclusive ``x0, y0, x1, y1`` box per image.
        labels, predictions: ``LongTensor[N]`` true and top-1 predicted classes.
        percentile: ``None`` sweeps levels ``int(t * max)`` (the protocol); ``q`` sweeps ``t * percentile_q``.
        cam_curve_interval: spacing of ``t`` in ``np.arange(0, 1, interval)``.
        fixed_thresholds: ``{name: LongTensor[N]}`` uint8 levels (e.g. ``CAMResult.thresholds``) for
            ``fixed_top1_loc``.
    """
    n = len(cams)
    if n == 0:
        raise ValueError("no images to evaluate")
    thresholds = cam_curve_thresholds(cam_curve_interval)
    table = sweep_levels(cams, thresholds, percentile)
    offsets = torch.arange(n + 1, dtype=torch.int64)
    largest = best_box_ious(cams, table, gt_boxes, offsets, multi_contour=False).cpu()  # [N, T]
    every = best_box_ious(cams, table, gt_boxes, offsets, multi_contour=True).cpu()
    correct = (predictions.cpu() == labels.cpu())[:, None]

    def best_rate(hits: Tensor) -> float:  # one threshold for the whole dataset: max over t of the hit rate
        return 100.0 * float(hits.double().mean(dim=0).max())

    return LocalizationMetrics(
        max_box_acc=best_rate(largest >= 0.5),
        max_box_acc_v2=float(np.mean([best_rate(every >= delta) for delta in V2_IOU_THRESHOLDS])),
        top1_loc=best_rate((largest >= 0.5) & correct),
        top1_cls=100.0 * float(correct.double().mean()),
        num_images=n,
        threshold_standard="max" if percentile is None else f"p{percentile:g}",
        fixed_top1_loc=None if fixed_thresholds is None else {
            name: best_rate((best_box_ious(cams, levels[:, None], gt_boxes, offsets, multi_contour=False).cpu() >= 0.5)
                            & correct)
            for name, levels in fixed_thresholds.items()},
    )


def json_number(value) -> float | None:
    """``float(value)``, or None (JSON ``null``) when it is NaN or infinite: ``json.dump`` would write a
    bare ``NaN``, which is not JSON (strict readers refuse the file)."""
    number = float(value)
    return number if math.isfinite(number) else None


def localization_records(names: Sequence[str], result: CAMResult, gt_labels: Tensor | None = None,
                         gt_boxes: Tensor | None = None) -> list[dict[str, Any]]:
    """One JSON-ready dict per image: ``image``, ``label``, ``score`` (logit; None when not finite), ``box`` ``[x0, y0, x1, y1]``,
    ``threshold`` (uint8 level of the box), plus ``gt_label``/``gt_box`` when given."""
    records = []
    for i, name in enumerate(names):
        record: dict[str, Any] = {"image": name, "label": int(result.labels[i]), "score": json_number(result.scores[i]),
                                  "box": [int(v) for v in result.boxes[i]],
                                  "threshold": int(result.thresholds[i])}
        if gt_labels is not None:
            record["gt_label"] = int(gt_labels[i])
        if gt_boxes is not None:
            record["gt_box"] = [int(v) for v in gt_boxes[i]]
        records.append(record)
    return records


def write_outputs(out_dir: str, records: list[dict[str, Any]], tiles: Sequence[np.ndarray],
                  columns: int = 4) -> tuple[str, str]:
    """Write ``localizations.json`` (all records) and ``grid.png`` (the tiles, captioned); returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, grid_path = os.path.join(out_dir, JSON_NAME), os.path.join(out_dir, GRID_NAME)
    with open(json_path, "w") as fh:
        json.dump(records, fh, indent=1, allow_nan=False)
    captions = [f"{os.path.basename(r['image'])[:15]} pred {r['label']} "
                + (f"({r['score']:.1f})" if r["score"] is not None else "(score nan)") for r in records[: len(tiles)]]
    save_grid(grid_path, tiles, captions, columns)
    return json_path, grid_path


# -- a user's own model ---------------------------------------------------------------------------


def build_model(spec: str) -> nn.Module:
    """A torchvision model name (``resnet50``; weights not downloaded) or ``pkg.module:factory``
    (``FILE.py:factory`` too), called without arguments (or a module-level ``nn.Module`` object).

    Raises ``FileNotFoundError`` for a missing ``FILE.py``, ``ValueError`` for anything else wrong."""
    if ":" in spec:
        module_name, _, attr = spec.rpartition(":")
        if module_name.endswith(".py") and not os.path.isfile(module_name):
            raise FileNotFoundError(f"--model {spec}: model file not found: {module_name}")
        try:
            if module_name.endswith(".py"):
                loader = importlib.util.spec_from_file_location("_rethinkcam_user_model", module_name)
                if loader is None:
                    raise ImportError(f"not a python file: {module_name}")
                module = importlib.util.module_from_spec(loader)
                loader.loader.exec_module(module)
            else:
                module = _import_from_here(module_name)
        except Exception as exc:  # ImportError, or the module's own code failing (a SyntaxError, ...)
            raise ValueError(f"--model {spec}: cannot import {module_name} ({type(exc).__name__}: {exc})") from exc
        if not hasattr(module, attr):
            raise ValueError(f"--model {spec}: {module_name} has no attribute {attr!r}")
        factory = getattr(module, attr)
        if isinstance(factory, nn.Module):  # a module-level model object
            model = factory
        elif callable(factory):
            try:
                model = factory()
            except Exception as exc:  # a factory that needs arguments, or fails while building
                raise ValueError(f"--model {spec}: building the model failed: {module_name}.{attr}() raised "
                                 f"{type(exc).__name__}: {exc} (the factory is called without arguments)") from exc
        else:
            raise ValueError(f"--model {spec}: {module_name}.{attr} is neither an nn.Module nor callable")
    else:
        try:
            import torchvision
        except Exception as exc:  # ImportError, or a torchvision built for another torch
            raise ValueError(f"--model {spec}: a torchvision model name needs torchvision, which does not import "
                             f"here ({type(exc).__name__}: {exc}); or pass a python path pkg.module:factory") from exc
        try:
            model = torchvision.models.get_model(spec, weights=None)
        except ValueError as exc:
            raise ValueError(f"--model {spec}: not a torchvision model name ({exc})") from exc
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


def input_policy(spec: str, image_size: int | None, normalize: str) -> tuple[int | None, bool]:
    """How the CLI feeds a ``--model spec``: ``(image_size, ImageNet-normalise?)``. A torchvision name
    gets 224² and ImageNet statistics unless told otherwise; a python path gets the image as it is.
    ``normalize``: ``"auto"``, ``"imagenet"`` or ``"none"``."""
    torchvision_name = ":" not in spec
    size = image_size or (224 if torchvision_name else None)
    return size, (torchvision_name if normalize == "auto" else normalize == "imagenet")


def _import_from_here(module_name: str):
    """``importlib.import_module``, then, for a module found nowhere, again with the working folder on
    the path, where it stays (the module's own later imports of its neighbours need it): ``python -m
    rethinkcam_fast`` has it there, the ``rethinkcam`` command does not (a ``mymodel.py`` next to the
    user, given as ``--model mymodel:make``)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        if exc.name != module_name.split(".")[0] or here in sys.path or "" in sys.path:
            raise
        sys.path.insert(0, here)
        return importlib.import_module(module_name)


def load_user_model(spec: str, weights: str | None, *,
                    on_payload: Callable[[dict[str, Any]], None] | None = None) -> nn.Module:
    """:func:`build_model` plus its weights (``torch.load(weights_only=True)``), in ``eval()`` mode.

    A checkpoint written by ``rethinkcam train`` carries its architecture; when ``spec`` builds a
    :class:`~rethinkcam_fast.models.DigitsCAMNet`, the checkpoint's architecture (pool, widths) is used.
    ``on_payload`` is called with the file as :func:`~rethinkcam_fast.models.read_weights` gives it,
    after the model is built (so a bad ``spec`` is reported first): a caller that also wants the
    checkpoint's metadata reads the file once, and keeps no copy of the weights.
    """
    model = build_model(spec)
    if weights is not None:
        payload = read_weights(weights)
        if on_payload is not None:
            on_payload(payload)
        if isinstance(model, DigitsCAMNet) and payload.get("format") == CHECKPOINT_FORMAT:
            model = model_from_arch(payload.get("arch"), weights)
        load_state_into(model, state_dict_of(payload, weights), weights)
    return model.eval()


def input_channels(model: nn.Module) -> int:
    """Channels of the first ``nn.Conv2d`` (1 or 3): how images are decoded for ``model``."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or first.in_channels not in (1, 3):
        found = "no nn.Conv2d" if first is None else f"{first.in_channels} input channels"
        raise ValueError(f"{type(model).__name__}: cannot feed images to a model with {found} (need 1 or 3)")
    return first.in_channels


def preprocess(image: Tensor, image_size: int | None, normalize: bool) -> Tensor:
    """``ByteTensor[C, H, W]`` -> ``Tensor[1, C, S, S]`` (or ``[1, C, H, W]`` without ``image_size``) in
    ``[0, 1]``, ImageNet-normalised when ``normalize`` (and the image has 3 channels)."""
    x = image[None].float() / 255.0
    if image_size is not None:
        x = nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                                      antialias=True)
    if normalize and x.shape[1] == 3:
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x


def localize_files(paths: Sequence[str], model: nn.Module, method: str = "cam", *, nwc: bool = True,
                   box_threshold: str = "pas", image_size: int | None = None, normalize: bool = False,
                   device: str | torch.device = "cpu", out_dir: str | None = None,
                   tile_size: int = 192, grid: int = 16) -> list[dict[str, Any]]:
    """Localize the top-1 class of every image file: records (see :func:`localization_records`), with
    boxes in the image's own pixels (the CAM is resized to each image's size).

    ``box_threshold``: ``"pas"`` (0.35 x 90th percentile) or ``"max"`` (0.2 x max), see :data:`BOX_THRESHOLDS`.
    Every image is read (and checked) before the model runs, so a bad file fails fast with
    :class:`~rethinkcam_fast.imageio.ImageReadError`. With ``out_dir``, writes the JSON (every image)
    and the PNG grid (the first ``grid`` images: a grid of thousands would be a huge picture).
    """
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if not paths:
        raise ValueError("no images given")
    if out_dir is not None:  # (an image named like an output, in the output folder, would be overwritten)
        for output in (os.path.join(out_dir, JSON_NAME), os.path.join(out_dir, GRID_NAME)):
            for path in paths:
                if os.path.exists(output) and os.path.exists(path) and os.path.samefile(path, output):
                    raise ValueError(f"{path} is an input image and an output of this run ({output}): writing it "
                                     "would destroy the image; choose another output folder")
    channels = input_channels(model)
    images = [read_image(path, channels) for path in paths]
    device = torch.device(device)
    model = model.to(device).eval()
    q, theta = BOX_THRESHOLDS[box_threshold]
    engine = CAMEngine(model, method, nwc=nwc and method == "cam", pas_q=q, pas_theta=theta,
                       box_convention="exact", warn_degenerate=False)
    records, tiles = [], []
    for path, image in zip(paths, images):
        engine.output_size = tuple(image.shape[1:])
        result = engine(preprocess(image, image_size, normalize).to(device))
        records += localization_records([path], result)
        if out_dir is not None and len(tiles) < grid:
            tiles.append(fit_tile(overlay_tile(image, result.cams[0].cpu(), result.boxes[0].tolist()), tile_size))
    if out_dir is not None:
        write_outputs(out_dir, records, tiles)
    return records


def fit_tile(tile: np.ndarray, size: int) -> np.ndarray:
    """Resize ``uint8[h, w, 3]`` to fit a ``size`` x ``size`` cell (aspect kept, white padding)."""
    from PIL import Image

    image = Image.fromarray(tile)
    image.thumbnail((size, size), Image.Resampling.NEAREST if max(tile.shape[:2]) < size else Image.Resampling.LANCZOS)
    if max(image.size) < size:  # small images are enlarged by an integer factor, pixels kept sharp
        factor = size // max(image.size)
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    cell = Image.new("RGB", (size, size), (255, 255, 255))
    cell.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return np.asarray(cell)


__all__ = ["BOX_THRESHOLDS", "GRID_NAME", "JSON_NAME", "LocalizationMetrics", "build_model", "fit_tile", "input_channels",
           "input_policy", "json_number", "load_user_model", "localization_records", "localize_files", "preprocess", "sweep_levels",
           "wsol_box_metrics", "write_outputs"]

