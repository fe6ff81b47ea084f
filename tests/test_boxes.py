"""boxes_from_cams against OpenCV itself: findContours(RETR_TREE, CHAIN_APPROX_SIMPLE) + boundingRect."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rethinkcam_fast import boxes_from_cams

cv2 = pytest.importorskip("cv2")


def levels_of(cams: torch.Tensor) -> np.ndarray:
    return (255 * cams.float().numpy()).astype(np.uint8)


def reference_contours(level_map: np.ndarray, threshold: int):
    mask = (level_map > threshold).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    return contours


def to_convention(rect, height, width, convention):
    x, y, w, h = rect
    if convention == "wsol":  # wsolevaluation's compute_bboxes_from_scoremaps
        return [x, y, min(x + w, width - 1), min(y + h, height - 1)]
    return [x, y, x + w - 1, y + h - 1]


def reference_largest(level_map, threshold, convention):
    contours = reference_contours(level_map, threshold)
    if not contours:
        return [0, 0, 0, 0]
    best = max(contours, key=cv2.contourArea)
    return to_convention(cv2.boundingRect(best), *level_map.shape, convention)


def reference_all(level_map, threshold, convention):
    return [to_convention(cv2.boundingRect(c), *level_map.shape, convention) for c in reference_contours(level_map, threshold)]


def masks_to_cams(masks: np.ndarray) -> torch.Tensor:
    """Binary masks as maps whose uint8 level is 255 on the foreground, 0 elsewhere (threshold 0)."""
    return torch.from_numpy(masks.astype(np.float32))


def assert_matches(cams: torch.Tensor, thresholds: torch.Tensor, convention: str = "wsol") -> None:
    levels = levels_of(cams)
    table = thresholds.reshape(len(cams), -1)
    got = boxes_from_cams(cams, thresholds, "largest", convention)
    got = got.reshape(len(cams), -1, 4)
    ragged = boxes_from_cams(cams, thresholds, "all", convention)
    for n in range(len(cams)):
        for t, thr in enumerate(table[n].tolist()):
            assert got[n, t].tolist() == reference_largest(levels[n], thr, convention), (n, thr)
            assert ragged.boxes_of(n, t).tolist() == reference_all(levels[n], thr, convention), (n, thr)


ADVERSARIAL = {
    "single pixels": [(1, 1), (1, 5), (5, 2), (7, 9)],
    "diagonal chain": [(i, i) for i in range(6)],
    "anti-diagonal": [(i, 7 - i) for i in range(8)],
}


def adversarial_masks() -> np.ndarray:
    masks = []
    for pixels in ADVERSARIAL.values():
        m = np.zeros((10, 12), np.uint8)
        for r, c in pixels:
            m[r, c] = 1
        masks.append(m)
    ring = np.zeros((10, 12), np.uint8)
    ring[1:9, 1:10] = 1
    ring[3:7, 3:8] = 0
    ring[4:6, 5] = 1  # a component inside the hole
    masks.append(ring)
    nested = np.zeros((10, 12), np.uint8)
    nested[0:10, 0:12] = 1
    nested[1:9, 1:11] = 0
    nested[2:8, 2:10] = 1
    nested[3:7, 3:9] = 0
    nested[4:6, 4:8] = 1  # rings inside rings, touching every border
    masks.append(nested)
    line = np.zeros((10, 12), np.uint8)
    line[5, 1:11] = 1  # one pixel wide: area 0
    line[1, 2:5] = 1
    masks.append(line)
    ties = np.zeros((10, 12), np.uint8)
    ties[1:3, 1:3] = 1
    ties[1:3, 6:8] = 1
    ties[6:8, 3:5] = 1  # three equal areas
    masks.append(ties)
    checker = (np.indices((10, 12)).sum(0) % 2).astype(np.uint8)
    masks.append(checker)
    masks.append(np.ones((10, 12), np.uint8))
    masks.append(np.zeros((10, 12), np.uint8))
    diagonal_holes = np.ones((10, 12), np.uint8)
    diagonal_holes[3, 3] = diagonal_holes[4, 4] = diagonal_holes[6, 8] = 0
    masks.append(diagonal_holes)
    return np.stack(masks)


@pytest.mark.parametrize("convention", ["wsol", "exact"])
def test_adversarial_shapes(convention):
    cams = masks_to_cams(adversarial_masks())
    assert_matches(cams, torch.zeros(len(cams), dtype=torch.long), convention)


@pytest.mark.parametrize("size", [(1, 1), (1, 9), (9, 1), (5, 5), (17, 23), (64, 64)])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_random_masks(size, density):
    rng = np.random.default_rng(size[0] * 100 + size[1] + int(density * 10))
    masks = (rng.random((4, *size)) < density).astype(np.uint8)
    assert_matches(masks_to_cams(masks), torch.zeros(4, dtype=torch.long))


def test_smooth_maps_many_thresholds():
    gen = torch.Generator().manual_seed(0)
    low = torch.rand((3, 1, 7, 7), generator=gen)
    up = torch.nn.functional.interpolate(low, size=(56, 56), mode="bilinear", align_corners=False)[:, 0]
    cams = (up - up.amin((1, 2), keepdim=True)) / (up.amax((1, 2), keepdim=True) - up.amin((1, 2), keepdim=True))
    thresholds = torch.arange(0, 256, 5).repeat(3, 1)
    assert_matches(cams, thresholds)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 16), w=st.integers(1, 16), density=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_property_random_masks(h, w, density, seed):
    masks = (np.random.default_rng(seed).random((2, h, w)) < density).astype(np.uint8)
    assert_matches(masks_to_cams(masks), torch.zeros(2, dtype=torch.long))


def test_repeated_thresholds_are_traced_once_with_the_same_result():
    gen = torch.Generator().manual_seed(4)
    cams = torch.rand(3, 24, 24, generator=gen)
    table = (torch.arange(1000, dtype=torch.float64) / 1000 * 255).long().repeat(3, 1)  # 256 distinct
    got = boxes_from_cams(cams, table)
    assert got.shape == (3, 1000, 4)
    for n in range(3):
        for t in (0, 1, 2, 3, 500, 998, 999):
            assert got[n, t].tolist() == reference_largest(levels_of(cams)[n], int(table[n, t]), "wsol")
    perm = torch.randperm(1000, generator=gen)
    assert torch.equal(boxes_from_cams(cams, table[:, perm]), got[:, perm])  # order of thresholds is free


def test_threshold_forms_and_shapes():
    cams = torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(1))
    assert boxes_from_cams(cams, 128).shape == (3, 4)
    assert torch.equal(boxes_from_cams(cams, torch.tensor(128, dtype=torch.uint8)), boxes_from_cams(cams, 128))
    assert boxes_from_cams(cams, torch.tensor([10, 128, 250])).shape == (3, 4)
    assert boxes_from_cams(cams, torch.tensor([[10, 128], [0, 5], [254, 255]])).shape == (3, 2, 4)
    full = boxes_from_cams(cams, torch.tensor([[255]] * 3))  # nothing is > 255: empty masks
    assert (full == 0).all()
    ragged = boxes_from_cams(cams, torch.tensor([[10, 128], [0, 5], [254, 255]]), "all")
    assert ragged.offsets.shape == (3, 3) and int(ragged.offsets[-1, -1]) == len(ragged.boxes)
    assert torch.equal(ragged.offsets[1:, 0], ragged.offsets[:-1, -1])
    empty = boxes_from_cams(torch.rand(0, 5, 5), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0, 4)


def test_bad_input_raises_clear_errors():
    cams = torch.rand(2, 6, 6)
    ragged = boxes_from_cams(cams, torch.tensor([100, 120]), mode="all")
    assert torch.equal(ragged.boxes_of(-1, -1), ragged.boxes_of(1, 0))
    with pytest.raises(IndexError, match=r"boxes_of\(10, 0\): there are 2 images and 1 thresholds"):
        ragged.boxes_of(10, 0)
    with pytest.raises(ValueError, match=r"thresholds must be uint8 levels"):
        boxes_from_cams(cams, 256)
    with pytest.raises(ValueError, match=r"thresholds must be uint8 levels"):
        boxes_from_cams(cams, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match=r"shape \(2,\) or \(2, T\)"):
        boxes_from_cams(cams, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer uint8 levels"):
        boxes_from_cams(cams, torch.tensor([0.5, 0.2]))
    bad = cams.clone()
    bad[1, 2, 2] = float("inf")
    with pytest.raises(ValueError, match=r"cams\[1\] has non-finite values"):
        boxes_from_cams(bad, 0)
    with pytest.raises(ValueError, match="mode must be one of"):
        boxes_from_cams(cams, 0, mode="biggest")
    with pytest.raises(ValueError, match="convention must be one of"):
        boxes_from_cams(cams, 0, convention="xyxy")
    with pytest.raises(ValueError, match="cams must be a 3-D"):
        boxes_from_cams(cams[None], 0)


def test_all_mode_traces_repeated_thresholds_once_with_the_same_result():
    gen = torch.Generator().manual_seed(6)
    cams = torch.rand(2, 15, 18, generator=gen)
    table = torch.tensor([[0, 40, 40, 255, 0, 128], [128, 0, 40, 40, 40, 7]])  # 5 distinct < 6 columns
    ragged = boxes_from_cams(cams, table, "all")
    levels = levels_of(cams)
    for n in range(2):
        for t, thr in enumerate(table[n].tolist()):
            assert ragged.boxes_of(n, t).tolist() == reference_all(levels[n], thr, "wsol"), (n, t)
            alone = boxes_from_cams(cams[n : n + 1], torch.tensor([[thr]]), "all")
            start, stop = int(ragged.offsets[n, t]), int(ragged.offsets[n, t + 1])
            assert torch.equal(ragged.areas[start:stop], alone.areas)
            assert torch.equal(ragged.is_hole[start:stop], alone.is_hole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_one_threshold_per_map_matches_opencv_every_dtype(dtype, threads):
    """One threshold per CPU map takes the fused path (each map converted and traced while in
    cache, images handed to threads one by one): same boxes as OpenCV on the map's uint8 levels."""
    gen = torch.Generator().manual_seed(11)
    low = torch.rand(9, 1, 6, 6, generator=gen)
    cams = torch.nn.functional.interpolate(low, size=(37, 41), mode="bilinear", align_corners=False)[:, 0]
    cams = ((cams - cams.amin((1, 2), keepdim=True)) / (cams.amax((1, 2), keepdim=True)
                                                        - cams.amin((1, 2), keepdim=True))).to(dtype)
    cams[3] = 0.0  # all-zero map: every threshold gives an empty mask
    levels = levels_of(cams)
    thresholds = torch.tensor([0, 10, 60, 100, 128, 200, 254, 255, 90])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = boxes_from_cams(cams, thresholds)
        exact = boxes_from_cams(cams, thresholds[:, None], convention="exact")
    finally:
        torch.set_num_threads(previous)
    for n, thr in enumerate(thresholds.tolist()):
        assert got[n].tolist() == reference_largest(levels[n], thr, "wsol"), (n, thr)
        assert exact[n, 0].tolist() == reference_largest(levels[n], thr, "exact"), (n, thr)
    bad = cams.clone()
    bad[5, 3, 3] = float("nan")
    bad[7, 0, 0] = 1.5
    with pytest.raises(ValueError, match=r"cams\[5\] has non-finite values"):
        boxes_from_cams(bad, thresholds)
    assert boxes_from_cams(bad, thresholds, validate=False).shape == (9, 4)  # the caller's promise
    with pytest.raises(ValueError, match="non-empty spatial extent"):  # maps without pixels (as every box op)
        boxes_from_cams(cams[:, :0], thresholds)


def test_without_the_extension_or_opencv_the_error_says_what_to_install(monkeypatch):
    """OpenCV is an extra: an install whose C++ extension is missing falls back to it, and without it
    too the error names both ways out, not a bare ModuleNotFoundError."""
    import sys

    from rethinkcam_fast import _native

    monkeypatch.setattr(_native, "cpu_kernel", lambda name: None)
    monkeypatch.setattr(_native, "_warned", set())  # (the fallback warning is given once a process)
    monkeypatch.setitem(sys.modules, "cv2", None)  # (import cv2 then raises ImportError)
    with pytest.warns(RuntimeWarning, match="falling back to an OpenCV loop"):
        with pytest.raises(RuntimeError, match="C\\+\\+ extension.*pip install opencv-python-headless"):
            boxes_from_cams(torch.rand(1, 8, 8), 100, mode="all")


def test_thresholds_as_lists_and_numpy_arrays_are_tensors_too():
    cams = torch.rand(3, 9, 9, generator=torch.Generator().manual_seed(2))
    levels = [[10, 200], [50, 60], [0, 255]]
    want = boxes_from_cams(cams, torch.tensor(levels))
    assert torch.equal(boxes_from_cams(cams, levels), want)
    assert torch.equal(boxes_from_cams(cams, np.array(levels, dtype=np.uint8)), want)
    assert torch.equal(boxes_from_cams(cams, [10, 50, 0]), boxes_from_cams(cams, torch.tensor([10, 50, 0])))
    for bad in ([0.5, 1.0, 2.0], np.array([True, False, True])):
        with pytest.raises(TypeError, match="integer uint8 levels"):
            boxes_from_cams(cams, bad)
    with pytest.raises(ValueError, match=r"uint8 levels in \[0, 255\]"):
        boxes_from_cams(cams, [10, 300, 0])


def test_thresholds_of_every_integer_dtype_and_no_other():
    """One rule for integer inputs across the box ops: any signed or unsigned integer dtype is a level
    (uint16 to uint64 included), complex, bool and floating ones are refused, never cast."""
    cams = torch.rand(3, 9, 9, generator=torch.Generator().manual_seed(3))
    want = boxes_from_cams(cams, torch.tensor([10, 50, 0]))
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.uint16, torch.uint32, torch.uint64):
        assert torch.equal(boxes_from_cams(cams, torch.tensor([10, 50, 0], dtype=dtype)), want), dtype
    with pytest.raises(ValueError, match=r"uint8 levels in \[0, 255\], got 9223372036854775808"):  # not wrapped
        boxes_from_cams(cams, torch.tensor([2**63, 1, 1], dtype=torch.uint64))
    with pytest.raises(ValueError, match="rectangular .* got a ragged list"):
        boxes_from_cams(cams, [[1, 2], [3], [4, 5]])
    for dtype in (torch.complex64, torch.bool, torch.float16):
        with pytest.raises(TypeError, match=f"thresholds must hold integer uint8 levels .*got {dtype}"):
            boxes_from_cams(cams, torch.tensor([1, 0, 1], dtype=dtype))
    gt, offsets = torch.tensor([[0, 0, 4, 4]] * 3), torch.tensor([0, 1, 2, 3])
    from rethinkcam_fast import best_box_ious
    for name, args in (("gt_boxes", (gt.to(torch.complex64), offsets)), ("gt_offsets", (gt, offsets.to(torch.complex64)))):
        with pytest.raises(TypeError, match=f"{name} must hold integer"):
            best_box_ious(cams, 0, *args)


def test_threshold_255_is_a_level():
    """255 is the top uint8 level (an empty foreground: u8 > 255 never holds), accepted as an int and in
    a tensor; 256 is not a level."""
    cams = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(boxes_from_cams(cams, 255), torch.zeros(2, 4, dtype=torch.long))
    assert torch.equal(boxes_from_cams(cams, torch.tensor([255, 255])), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="uint8 levels"):
        boxes_from_cams(cams, 256)


def test_ragged_boxes_print_counts_not_every_box():
    cams = torch.rand(2, 9, 9, generator=torch.Generator().manual_seed(5))
    ragged = boxes_from_cams(cams, torch.tensor([[60, 120], [100, 200]]), mode="all")
    text = repr(ragged)
    assert text.startswith(f"RaggedBoxes({ragged.boxes.shape[0]} boxes, ") and "for 2 images x 2 thresholds" in text
