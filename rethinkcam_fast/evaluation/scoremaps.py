"""Evaluating saved score maps (``<scoremap_root>/<image_id>.npy``) against a metadata split.

:func:`evaluate_scoremaps` is what ``rethinkcam evaluate`` runs: maps are read by a few threads a
batch ahead, stacked, moved to the device and accumulated; with ``resume=FILE`` the counters and the
number of images done are saved (atomically) after every batch, so an interrupted run continues where
it stopped and ends with the same numbers. Under ``torchrun`` each rank evaluates ``ids[rank::world]``
and the counters are all-reduced.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .._files import replaceable
from .box_evaluator import BoxEvaluator, BoxMetrics
from .distributed import any_rank_failed, rank_and_world, sum_over_ranks
from .mask_evaluator import MaskEvaluator, MaskMetrics
from .metadata import WSOLMetadata, load_metadata

STATE_FORMAT = "rethinkcam-evaluate-state/1"


def scoremap_path(scoremap_root: str, image_id: str) -> str:
    """``<scoremap_root>/<image_id>.npy`` (the id keeps its extension: ``a/b.jpg`` -> ``a/b.jpg.npy``)."""
    return os.path.join(scoremap_root, image_id + ".npy")


def _npy_error(exc: Exception) -> str:
    """numpy's reason, except its advice about pickles: with ``allow_pickle=False`` it gives it for any
    file that is not a ``.npy`` array (text, a truncated header), which misleads."""
    text = str(exc)
    return "not a .npy array file (or a damaged one)" if "allow_pickle" in text else text


def _require_array(loaded, image_id: str, path: str) -> None:
    """An .npz archive under a .npy name loads as an NpzFile, not an array."""
    if not isinstance(loaded, np.ndarray):
        raise ValueError(f"score map of image {image_id!r} is not a .npy array ({path} holds a "
                         f"{type(loaded).__name__})")


def load_scoremap(scoremap_root: str, image_id: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """One saved score map: a 2-D floating array (of ``shape`` when given). Errors name the image."""
    path = scoremap_path(scoremap_root, image_id)
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"score map of image {image_id!r} not found: {path}") from None
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"score map of image {image_id!r} cannot be read ({path}): {_npy_error(exc)}") from None
    _require_array(array, image_id, path)
    if array.dtype.kind != "f" or array.dtype.itemsize > 8:
        raise ValueError(f"score map of image {image_id!r} must be a float16, float32 or float64 array, got "
                         f"{array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"score map of image {image_id!r} must be 2-D [H, W], got shape {array.shape}")
    if shape is not None and array.shape != tuple(shape):
        raise ValueError(f"score map of image {image_id!r} has shape {array.shape}, expected {tuple(shape)} "
                         "(the first image's)")
    return array


def evaluation_shape(scoremap_root: str, image_id: str) -> tuple[int, int]:
    """The evaluation grid ``(H, W)``: the shape of the split's first score map (read without loading it)."""
    path = scoremap_path(scoremap_root, image_id)
    try:
        loaded = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"score map of image {image_id!r} not found: {path}") from None
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"score map of image {image_id!r} cannot be read ({path}): {_npy_error(exc)}") from None
    _require_array(loaded, image_id, path)
    shape = loaded.shape
    if len(shape) != 2:
        raise ValueError(f"score map of image {image_id!r} must be 2-D [H, W], got shape {shape}")
    if 0 in shape:
        raise ValueError(f"score map of image {image_id!r} is empty, shape {shape}")
    return int(shape[0]), int(shape[1])


def make_evaluator(metadata: WSOLMetadata, *, cam_curve_interval: float = 0.001,
                   iou_thresholds: Sequence[float] = (30, 50, 70), multi_contour: bool = True,
                   mask_root: str | None = None, device: torch.device | str | None = None
                   ) -> BoxEvaluator | MaskEvaluator:
    """The evaluator a split calls for: :class:`MaskEvaluator` for mask metadata, else :class:`BoxEvaluator`."""
    if metadata.localization == "masks":
        if mask_root is None:
            raise ValueError(f"{metadata.directory} has mask annotations: a mask root is needed (--mask-root)")
        return MaskEvaluator(cam_curve_interval, metadata=metadata, mask_root=mask_root, device=device)
    if mask_root is not None:  # (the reference takes a mask root for every dataset; it is unused on boxes)
        warnings.warn(f"mask_root {mask_root!r} is not used: {metadata.directory} has box annotations",
                      stacklevel=2)
    return BoxEvaluator(cam_curve_interval, iou_thresholds, multi_contour, metadata=metadata, device=device)


def _prefetched(ids: Sequence[str], batch_size: int, load_batch: Callable[[list[str]], Any],
                workers: int) -> Iterator[Any]:
    """``load_batch(chunk)`` for consecutive chunks, computed by threads up to two batches ahead."""
    chunks = [list(ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque[Future] = deque()
        for chunk in chunks:
            pending.append(pool.submit(load_batch, chunk))
            if len(pending) > 2:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _atomic_save(payload: dict[str, Any], path: str) -> None:
    path = replaceable(path, "evaluation state")  # (a symlink's file; never a device or a pipe)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _snapshot(evaluator: BoxEvaluator | MaskEvaluator, run: dict[str, Any], done: int) -> dict[str, Any]:
    saved = evaluator.state_dict()
    saved["state"] = {name: value.cpu() for name, value in saved["state"].items()}
    return {"format": STATE_FORMAT, "run": run, "processed": done, "evaluator": saved}


def state_file(resume: str, rank: int, world: int) -> str:
    """Where a rank keeps its state: ``resume`` itself for one process, ``<resume>.rank<r>`` otherwise."""
    return resume if world == 1 else f"{resume}.rank{rank}"


def _restore(path: str, run: dict[str, Any], evaluator: BoxEvaluator | MaskEvaluator) -> int:
    """Load a saved state into ``evaluator``; returns how many of this shard's images it covers."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign or damaged file: say which, in one line; torch's advice to
        # retry with weights_only=False (which would run the file's code) is not passed on
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        if "Weights only load failed" in first:
            first = "not written by torch.save, or damaged"
        raise ValueError(f"{path}: not a readable evaluation state ({type(exc).__name__}: {first})") from None
    if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a rethinkcam evaluation state file")
    if saved.get("run") != run:
        raise ValueError(f"{path}: saved for a different run {saved.get('run')}, this run is {run}")
    try:
        evaluator.load_state_dict(saved["evaluator"])
        return int(saved["processed"])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a complete evaluation state ({type(exc).__name__}: {exc})") from None


def _check_all_present(scoremap_root: str, image_ids: Sequence[str]) -> None:
    """Every map of the run is there before the first is read: at ImageNet scale a map missing near the
    end would otherwise stop the run after most of its work, and one rerun per missing map would find
    them (a stat per file: a fraction of a second for 50,000)."""
    missing = [image_id for image_id in image_ids if not os.path.isfile(scoremap_path(scoremap_root, image_id))]
    if missing:
        more = ""
        if len(missing) > 1:
            shown = ", ".join(repr(i) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
            more = f"; {len(missing)} of {len(image_ids)} are missing: {shown}"
        raise FileNotFoundError(f"score map of image {missing[0]!r} not found: "
                                f"{scoremap_path(scoremap_root, missing[0])}{more}")


def evaluate_scoremaps(
    scoremap_root: str,
    metadata_root: str,
    dataset_name: str,
    split: str,
    *,
    mask_root: str | None = None,
    cam_curve_interval: float = 0.001,
    iou_thresholds: Sequence[float] = (30, 50, 70),
    multi_contour: bool = True,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    resume: str | None = None,
    progress: bool = False,
    workers: int = 4,
) -> BoxMetrics | MaskMetrics:
    """Evaluate ``<scoremap_root>/<image_id>.npy`` for every image of ``<metadata_root>/<dataset_name>/<split>``.

    Boxes (CUB, ILSVRC) give :class:`BoxMetrics`, masks (OpenImages, with ``mask_root``) :class:`MaskMetrics`.
    Every map must be 2-D, floating, finite, in ``[0, 1]`` and of the first map's shape, which is the
    grid GT boxes are scaled to (224 x 224 in the standard protocol); missing maps raise an error
    naming how many and the first few before any is read, and a bad map an error naming the image
    before anything of its batch is counted.

    Args:
        device: where maps are accumulated (default: CUDA when available, else the CPU).
        batch_size: maps per device batch.
        resume: a state file: loaded when it exists (it must come from the same run), rewritten
            atomically after every batch. Under ``torchrun`` each rank keeps ``<resume>.rank<r>``.
        progress: show a progress bar (rank 0).
        workers: threads reading files.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metadata = load_metadata(metadata_root, dataset_name, split)
    evaluator = make_evaluator(metadata, cam_curve_interval=cam_curve_interval, iou_thresholds=iou_thresholds,
                               multi_contour=multi_contour, mask_root=mask_root, device=device)
    rank, world = rank_and_world()
    shard = metadata.image_ids[rank::world]
    if metadata.image_ids and not os.path.isfile(scoremap_path(scoremap_root, metadata.image_ids[0])):
        # (the first map gives the grid: without it, every missing map of the split is named; every
        # rank reaches the same error here, so none waits for another)
        _check_all_present(scoremap_root, metadata.image_ids)
    shape = evaluation_shape(scoremap_root, metadata.image_ids[0]) if metadata.image_ids else None
    run = {"dataset": dataset_name, "split": split, "image_ids": metadata.fingerprint(), "map_shape": shape,
           "scoremap_root": os.path.abspath(scoremap_root), "rank": rank, "world_size": world}
    path = state_file(resume, rank, world) if resume else None
    done = _restore(path, run, evaluator) if path and os.path.exists(path) else 0
    resumed = done

    def load_batch(ids: list[str]) -> tuple[list[str], Tensor, tuple[Tensor, ...]]:
        maps = np.stack([load_scoremap(scoremap_root, image_id, shape) for image_id in ids])
        return ids, torch.from_numpy(maps), evaluator.load_targets(ids, shape)

    failure: BaseException | None = None
    with tqdm(total=len(shard), initial=done, unit="img", desc="evaluate", dynamic_ncols=True,
              disable=None if progress and rank == 0 else True) as bar:
        try:
            _check_all_present(scoremap_root, shard[done:])
            for ids, maps, targets in _prefetched(shard[done:], batch_size, load_batch, workers):
                evaluator.update(maps.to(device), *targets, image_ids=ids)
                done += len(ids)
                if path:
                    _atomic_save(_snapshot(evaluator, run, done), path)
                bar.update(len(ids))
        except Exception as exc:
            if world == 1:
                raise
            failure = exc
    if any_rank_failed(failure is not None, evaluator.device):
        if failure is not None:
            raise failure
        raise RuntimeError("evaluation failed on another rank (see its error)")
    total = evaluator.clone()
    if world > 1:
        total.all_reduce()
    return dataclasses.replace(total.compute(), resumed_images=sum_over_ranks(resumed, evaluator.device))


__all__ = ["evaluate_scoremaps", "evaluation_shape", "load_scoremap", "make_evaluator", "scoremap_path", "state_file"]
