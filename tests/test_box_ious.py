"""best_box_ious (component trees) against an oracle written from wsolevaluation's semantics with OpenCV.

The oracle below calls OpenCV directly for every (image, threshold) — it shares no code with the op —
and applies DESIGN.md §3: contour boxes in the reference's convention, the largest contour only
unless multi_contour, ``[0, 0, 0, 0]`` for an empty mask, inclusive-area IoU, best over boxes x GT.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_boxes import adversarial_masks, reference_largest

import rethinkcam_fast
from rethinkcam_fast import (
    best_box_ious,
    box_iou_matrix,
    boxes_from_cams,
    cam_curve_thresholds,
    protocol_thresholds,
)
from rethinkcam_fast.ops.box_ious import best_box_ious_reference
from rethinkcam_fast.ops.level_sweep import GPU_BOXES_ENV, VARIANT_ENV, level_sweep
from rethinkcam_fast.ops.boxes import TREE_MIN_LEVELS

cv2 = pytest.importorskip("cv2")
requires_tree = pytest.mark.skipif(
    not hasattr(rethinkcam_fast._native.cpu_module(), "threshold_box_ious"), reason="native _C not built"
)


def numpy_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU with inclusive areas; 0 where the union is not positive."""
    ious = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            iw = max(0, min(p[2], q[2]) - max(p[0], q[0]) + 1)
            ih = max(0, min(p[3], q[3]) - max(p[1], q[1]) + 1)
            inter = iw * ih
            union = (p[2] - p[0] + 1) * (p[3] - p[1] + 1) + (q[2] - q[0] + 1) * (q[3] - q[1] + 1) - inter
            ious[i, j] = inter / union if union > 0 else 0.0
    return ious


def oracle(level_map: np.ndarray, thresholds, gt: np.ndarray, multi_contour: bool) -> list[float]:
    height, width = level_map.shape
    best = []
    for thr in thresholds:
        contours, _ = cv2.findContours((level_map > thr).astype(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
        if not contours:
            boxes = [[0, 0, 0, 0]]
        else:
            if not multi_contour:
                contours = [max(contours, key=cv2.contourArea)]
            boxes = []
            for c in contours:
                x, y, w, h = cv2.boundingRect(c)
                boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
        best.append(float(numpy_iou(np.asarray(boxes), gt).max()))
    return best


def random_gt(rng: np.random.Generator, counts: list[int], height: int, width: int):
    boxes = []
    for _ in range(sum(counts)):
        xs = np.sort(rng.integers(0, width, 2))
        ys = np.sort(rng.integers(0, height, 2))
        boxes.append([xs[0], ys[0], xs[1], ys[1]])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return torch.tensor(boxes, dtype=torch.long).reshape(-1, 4), torch.tensor(offsets, dtype=torch.long)


def assert_matches_oracle(cams: torch.Tensor, table: torch.Tensor, gt: torch.Tensor, offsets: torch.Tensor) -> None:
    levels = (255 * cams.float().numpy()).astype(np.uint8)
    for multi in (True, False):
        got = best_box_ious(cams, table, gt, offsets, multi)
        assert got.dtype == torch.float64 and got.shape == table.shape
        for n in range(len(cams)):
            expected = oracle(levels[n], table[n].tolist(), gt[offsets[n] : offsets[n + 1]].numpy(), multi)
            assert got[n].tolist() == expected, (n, multi)  # identical doubles, not approximately


def multilevel_maps(rng: np.random.Generator, n: int, height: int, width: int, num_levels: int) -> torch.Tensor:
    """Maps with few distinct levels: nested rings, holes inside components inside holes, ties."""
    values = rng.integers(0, num_levels, size=(n, height, width))
    return torch.from_numpy((values * (255 // (num_levels - 1))).astype(np.float32) / 255)


@requires_tree
@pytest.mark.parametrize("seed", range(6))
def test_multilevel_maps_all_thresholds(seed):
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(1, 30)), int(rng.integers(1, 30))
    cams = multilevel_maps(rng, 3, height, width, int(rng.integers(2, 6)))
    table = torch.arange(256).repeat(3, 1)
    gt, offsets = random_gt(rng, [1, 2, 3], height, width)
    assert_matches_oracle(cams, table, gt, offsets)


@requires_tree
def test_adversarial_shapes():
    masks = adversarial_masks()
    cams = torch.from_numpy(masks.astype(np.float32))
    rng = np.random.default_rng(7)
    gt, offsets = random_gt(rng, [2] * len(masks), *masks.shape[1:])
    assert_matches_oracle(cams, torch.tensor([[0, 254, 255]] * len(masks)), gt, offsets)


@requires_tree
@pytest.mark.parametrize("interval", [0.01, 0.001])
def test_smooth_maps_protocol_thresholds(interval):
    gen = torch.Generator().manual_seed(3)
    low = torch.rand((3, 1, 7, 7), generator=gen)
    up = torch.nn.functional.interpolate(low, size=(48, 40), mode="bilinear", align_corners=False)[:, 0]
    cams = (up - up.amin((1, 2), keepdim=True)) / (up.amax((1, 2), keepdim=True) - up.amin((1, 2), keepdim=True))
    table = protocol_thresholds(cams, cam_curve_thresholds(interval))
    gt, offsets = random_gt(np.random.default_rng(1), [1, 3, 2], 48, 40)
    if interval == 0.001:  # 1,000 columns: compare on the distinct levels, then check the gather
        distinct = torch.unique(table)
        assert_matches_oracle(cams, distinct.repeat(3, 1), gt, offsets)
        full = best_box_ious(cams, table, gt, offsets)
        per_level = best_box_ious(cams, distinct.repeat(3, 1), gt, offsets)
        index = torch.searchsorted(distinct, table)
        assert torch.equal(full, per_level.gather(1, index))
    else:
        assert_matches_oracle(cams, table, gt, offsets)


@requires_tree
@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 14), w=st.integers(1, 14), levels=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_property_random_maps(h, w, levels, seed):
    rng = np.random.default_rng(seed)
    cams = multilevel_maps(rng, 2, h, w, levels)
    table = torch.from_numpy(rng.integers(0, 256, size=(2, 6)))
    gt, offsets = random_gt(rng, [1, 2], h, w)
    assert_matches_oracle(cams, table, gt, offsets)


@requires_tree
def test_native_equals_reference_fallback():
    rng = np.random.default_rng(11)
    cams = multilevel_maps(rng, 4, 21, 17, 4)
    table = torch.from_numpy(rng.integers(0, 256, size=(4, 9)))
    gt, offsets = random_gt(rng, [1, 1, 2, 3], 21, 17)
    levels = (cams * 255).to(torch.uint8)
    for multi in (True, False):
        assert torch.equal(best_box_ious(cams, table, gt, offsets, multi),
                           best_box_ious_reference(levels, table, gt, offsets, multi))


@requires_tree
@pytest.mark.parametrize("seed", range(4))
def test_tree_largest_boxes_equal_border_following(seed):
    """boxes_from_cams switches to the component trees from TREE_MIN_LEVELS distinct thresholds on."""
    rng = np.random.default_rng(seed)
    cams = multilevel_maps(rng, 3, 19, 23, 3 + seed) if seed % 2 else torch.rand(3, 19, 23)
    table = torch.arange(256).repeat(3, 1)
    assert TREE_MIN_LEVELS <= 256
    got = boxes_from_cams(cams, table, convention="exact")
    module = rethinkcam_fast._native.cpu_module()
    traced = torch.zeros((3, 256, 4), dtype=torch.int64)
    levels = (cams * 255).to(torch.uint8).contiguous()
    module.contour_largest_boxes(levels.data_ptr(), table.data_ptr(), traced.data_ptr(), 3, 19, 23, 256, 1)
    exact = torch.cat([traced[..., :2], traced[..., :2] + traced[..., 2:] - 1], dim=-1)
    exact[(traced == 0).all(-1)] = 0
    assert torch.equal(got, exact)
    for n, t in [(0, 0), (1, 100), (2, 200)]:
        assert got[n, t].tolist() == reference_largest(levels[n].numpy(), t, "exact")


def nested_rivals(rng: np.random.Generator, n: int) -> torch.Tensor:
    """Multi-level maps where contour areas hinge on nesting: rings (sometimes a ring inside a ring)
    with blobs inside their holes, next to a bar whose area is within a few half-cells of the ring's
    (a hole's polygon encloses what lies inside it, so leaving the blobs out picks the bar). Each
    shape sits on its own level, so thresholds between them drop shapes one at a time."""
    maps = np.zeros((n, 24, 48), np.float32)
    for m in maps:
        size = int(rng.integers(7, 13))
        level = rng.integers(1, 6, size=4) / 6.0
        m[1:1 + size, 1:1 + size] = level[0]
        m[2:size, 2:size] = 0
        if size >= 11 and rng.random() < 0.5:  # a ring inside the ring's hole
            m[3:size - 1, 3:size - 1] = level[1]
            m[4:size - 2, 4:size - 2] = 0
        c, b = 1 + size // 2, int(rng.integers(1, 3))
        m[c - b:c + b, c - b:c + b] = level[2]  # a blob in the middle
        ring_area = (size - 1) ** 2
        width = int(np.clip(ring_area // 2 + rng.integers(-3, 4), 2, 32))  # a 3-row bar: area 2 (width - 1)
        m[15:18, 14:14 + width] = level[3]
    return torch.from_numpy(maps)


@requires_tree
@pytest.mark.parametrize("seed", range(3))
def test_components_inside_holes_keep_opencv_largest_contour(seed):
    """The largest contour at every threshold (component trees, best_box_ious v1, the GPU level-sweep
    code emulated) equals OpenCV's when components lie inside holes."""
    rng = np.random.default_rng(50 + seed)
    cams = nested_rivals(rng, 12)
    levels = (cams * 255).to(torch.uint8).numpy()
    table = torch.arange(256).repeat(len(cams), 1)
    got = boxes_from_cams(cams, table)
    gt, offsets = random_gt(rng, [1] * len(cams), *cams.shape[1:])
    ious = best_box_ious(cams, table, gt, offsets, multi_contour=False)
    wanted = sorted({int(v) for v in np.unique(levels)} | {0})
    for n in range(len(cams)):
        for t in wanted:
            assert got[n, t].tolist() == reference_largest(levels[n], t, "wsol"), (seed, n, t)
        assert ious[n, wanted].tolist() == oracle(levels[n], wanted, gt[offsets[n]:offsets[n + 1]].numpy(), False)
    emulated_matches_cpu(cams, table[:, wanted], gt, offsets, block_threads=7)


def test_protocol_thresholds_match_numpy():
    cams = torch.rand(4, 9, 11, generator=torch.Generator().manual_seed(5)).double()
    cams[3] = 0  # all-zero map: every threshold is 0
    ts = cam_curve_thresholds(0.001)
    got = protocol_thresholds(cams, ts)
    for n in range(4):
        u8 = (cams[n].numpy() * 255).astype(np.uint8)
        assert got[n].tolist() == [int(t * np.max(u8)) for t in ts]
    assert protocol_thresholds(cams[:0], ts).shape == (0, len(ts))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        protocol_thresholds(cams, [0.5, 1.0])
    with pytest.raises(ValueError, match="^interval must lie in"):
        cam_curve_thresholds(0)


def test_box_iou_matrix_matches_inclusive_formula():
    rng = np.random.default_rng(2)
    a = torch.from_numpy(rng.integers(0, 20, size=(7, 4)))
    b = torch.from_numpy(rng.integers(0, 20, size=(5, 4)))
    a[:, 2:] = a[:, :2] + a[:, 2:] // 3  # valid boxes
    b[:, 2:] = b[:, :2] + b[:, 2:] // 3
    b[0] = torch.tensor([5, 5, 3, 3])  # inverted: a union <= 0 scores 0
    assert box_iou_matrix(a, b).numpy().tolist() == numpy_iou(a.numpy(), b.numpy()).tolist()


@requires_tree
def test_edge_cases():
    gt = torch.tensor([[0, 0, 0, 0], [2, 2, 5, 5]])
    zeros = torch.zeros(2, 8, 8)  # all-zero maps: empty masks score the [0, 0, 0, 0] box
    got = best_box_ious(zeros, torch.tensor([[0, 100]] * 2), gt, torch.tensor([0, 1, 2]))
    assert got.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    one_pixel = torch.zeros(1, 8, 8)
    one_pixel[0, 3, 4] = 1.0
    got = best_box_ious(one_pixel, torch.tensor([0]), torch.tensor([[4, 3, 5, 4]]), torch.tensor([0, 1]))
    assert got.tolist() == [1.0]  # wsol box of a single pixel: [x, y, x + 1, y + 1]
    empty = best_box_ious(torch.zeros(0, 8, 8), torch.zeros(0, 5, dtype=torch.long),
                          torch.zeros(0, 4, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert empty.shape == (0, 5)
    single = best_box_ious(torch.rand(2, 8, 8), torch.tensor([10, 20]), gt, torch.tensor([0, 1, 2]))
    assert single.shape == (2,)


def test_bad_input_raises_clear_errors():
    cams = torch.rand(2, 6, 6)
    gt = torch.tensor([[0, 0, 3, 3], [1, 1, 4, 4]])
    offsets = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="N \\+ 1 = 3 entries"):
        best_box_ious(cams, 0, gt, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="image 1 has no ground-truth box"):
        best_box_ious(cams, 0, gt, torch.tensor([0, 2, 2]))
    with pytest.raises(ValueError, match="rise from 0"):
        best_box_ious(cams, 0, gt, torch.tensor([0, 1, 3]))
    with pytest.raises(TypeError, match="gt_boxes must hold integer pixel coordinates"):
        best_box_ious(cams, 0, gt.float(), offsets)
    with pytest.raises(ValueError, match=r"shape \(G, 4\)"):
        best_box_ious(cams, 0, gt[:, :3], offsets)
    with pytest.raises(ValueError, match="uint8 levels"):
        best_box_ious(cams, 300, gt, offsets)
    bad = cams.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"cams\[1\] has non-finite values"):
        best_box_ious(bad, 0, gt, offsets)
    with pytest.raises(TypeError, match="floating dtype"):
        best_box_ious(cams.long(), 0, gt, offsets)
    # Boxes that are not boxes: inverted or negative. Boxes reaching past the grid are scored as the
    # reference scores them (real annotations stick out of their image by a few pixels).
    for box, problem in (([3, 1, 2, 4], "inverted"), ([-1, 0, 2, 2], "negative")):
        with pytest.raises(ValueError, match=rf"box \[{box[0]}, {box[1]}, {box[2]}, {box[3]}\] of image 1 .*{problem}"):
            best_box_ious(cams, 0, torch.tensor([[0, 0, 3, 3], box]), offsets)
    full = best_box_ious(torch.ones(2, 6, 6), 0, torch.tensor([[0, 0, 11, 5], [1, 1, 4, 4]]), offsets)
    assert full[0].item() == 36 / 72  # the full-map box [0, 0, 5, 5] against a box twice as wide


def test_the_box_ops_agree_on_maps_without_pixels_and_name_bad_thresholds():
    """Maps with H or W = 0 are one ValueError naming cams in every op (an empty batch, of any extent,
    gives empty outputs); thresholds too large for any integer type, or intervals that are not
    numbers, are errors naming the argument."""
    empty_extent = torch.zeros(2, 0, 5)
    gt, offsets = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]]), torch.tensor([0, 1, 2])
    for call in (lambda: rethinkcam_fast.percentile_threshold(empty_extent),
                 lambda: rethinkcam_fast.boxes_from_cams(empty_extent, 0),
                 lambda: rethinkcam_fast.protocol_thresholds(empty_extent, [0.5]),
                 lambda: best_box_ious(empty_extent, 0, gt, offsets)):
        with pytest.raises(ValueError, match=r"cams must have a non-empty spatial extent, got shape \(2, 0, 5\)"):
            call()
    assert rethinkcam_fast.percentile_threshold(torch.zeros(0, 0, 5)).shape == (0,)
    cams = torch.rand(2, 6, 6)
    for thresholds in (2**70, -1, 256):
        with pytest.raises(ValueError, match=rf"uint8 levels in \[0, 255\], got {thresholds}"):
            rethinkcam_fast.boxes_from_cams(cams, thresholds)
    with pytest.raises(ValueError, match="got values from 0 to 300"):
        rethinkcam_fast.boxes_from_cams(cams, torch.tensor([0, 300]))
    for interval in ("0.1", None, True):
        with pytest.raises(TypeError, match="^interval must be a real number"):  # (its argument's name)
            rethinkcam_fast.cam_curve_thresholds(interval)
    with pytest.raises(TypeError, match="multi_contour must be a bool"):
        best_box_ious(cams, 0, gt, offsets, multi_contour="no")
    for call in (lambda: best_box_ious(cams, 0, gt, offsets, validate="no"),
                 lambda: rethinkcam_fast.boxes_from_cams(cams, 0, validate="no"),
                 lambda: rethinkcam_fast.percentile_threshold(cams, validate="no"),
                 lambda: protocol_thresholds(cams, [0.5], validate="no")):
        with pytest.raises(TypeError, match="validate must be a bool"):
            call()
    with pytest.raises(TypeError, match="gt_boxes must hold integer pixel coordinates .*got torch.bool"):
        best_box_ious(cams, 0, gt.bool(), offsets)
    with pytest.raises(TypeError, match="integer pixel coordinates .*got torch.bool"):
        rethinkcam_fast.box_iou_matrix(gt.bool(), gt)
    from rethinkcam_fast.evaluation import BoxEvaluator

    with pytest.raises(TypeError, match="multi_contour must be a bool"):
        BoxEvaluator(0.1, multi_contour="no")
    with pytest.raises(ValueError, match=r"maps must have a non-empty spatial extent"):
        BoxEvaluator(0.1).update(empty_extent, [gt[:1], gt[1:]])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_maps_give_the_cpu_result_on_the_device():
    rng = np.random.default_rng(9)
    cams = multilevel_maps(rng, 3, 33, 29, 4)
    table = protocol_thresholds(cams, cam_curve_thresholds(0.01))
    gt, offsets = random_gt(rng, [1, 2, 1], 33, 29)
    for multi in (True, False):
        cpu = best_box_ious(cams, table, gt, offsets, multi)
        gpu = best_box_ious(cams.cuda(), table.cuda(), gt.cuda(), offsets.cuda(), multi)
        assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
    assert torch.equal(protocol_thresholds(cams.cuda(), cam_curve_thresholds(0.01)).cpu(), table)
    assert torch.equal(boxes_from_cams(cams.cuda(), table.cuda()).cpu(), boxes_from_cams(cams, table))


def emulated_matches_cpu(cams: torch.Tensor, table: torch.Tensor, gt, offsets, block_threads: int) -> None:
    """The CUDA level-sweep kernel's code, run phase by phase on the CPU, equals the CPU kernels."""
    levels = (cams * 255).to(torch.uint8).contiguous()
    n, height, width = levels.shape
    for multi in (True, False):
        iou, xywh = level_sweep(levels, table, gt, offsets, multi, emulate=True, block_threads=block_threads)
        assert torch.equal(iou, best_box_ious(cams, table, gt, offsets, multi)), multi
        if not multi:
            traced = torch.zeros((n, table.shape[1], 4), dtype=torch.int64)
            rethinkcam_fast._native.cpu_module().contour_largest_boxes(
                levels.data_ptr(), table.contiguous().data_ptr(), traced.data_ptr(), n, height, width,
                table.shape[1], 1)
            assert torch.equal(xywh, traced)


def sweep_status(cams: torch.Tensor, table: torch.Tensor, multi: bool) -> torch.Tensor:
    """The emulated sweep's status per wanted (image, threshold): what it settled itself (0) and what
    it left to the host (2: a shared maximum area)."""
    levels = (cams * 255).to(torch.uint8).contiguous()
    n, height, width = levels.shape
    wanted = torch.zeros((n, 256), dtype=torch.uint8)
    wanted.scatter_(1, table, 1)
    iou = torch.zeros((n, 256), dtype=torch.float64)
    xywh = torch.zeros((n, 256, 4), dtype=torch.int64)
    status = torch.full((n, 256), -1, dtype=torch.int32)
    gt, offsets = torch.zeros((n, 4), dtype=torch.int64), torch.arange(n + 1)
    rethinkcam_fast._native.cpu_module().emulate_level_sweep(
        levels.data_ptr(), n, height, width, wanted.data_ptr(), gt.data_ptr(), offsets.data_ptr(), multi,
        64, iou.data_ptr(), xywh.data_ptr(), status.data_ptr())
    return status.gather(1, table)


@requires_tree
@pytest.mark.parametrize("block_threads", [1, 7, 64])
@pytest.mark.parametrize("seed", range(6))
def test_gpu_level_sweep_code_emulated(seed, block_threads):
    rng = np.random.default_rng(100 + seed)
    height, width = int(rng.integers(1, 26)), int(rng.integers(1, 26))
    if seed % 3 == 1:
        cams = multilevel_maps(rng, 3, height, width, int(rng.integers(2, 6)))
    elif seed % 3 == 2:
        cams = torch.from_numpy(rng.random((3, height, width)).astype(np.float32))
    else:
        cams = torch.from_numpy((rng.random((3, height, width)) < 0.5 + 0.1 * seed).astype(np.float32))
    table = torch.from_numpy(rng.integers(0, 256, size=(3, 10)))
    table[:, :3] = torch.tensor([0, 85, 254])
    table[0, 3] = 255  # never foreground
    gt, offsets = random_gt(rng, [1, 2, 1], height, width)
    emulated_matches_cpu(cams, table, gt, offsets, block_threads)


@requires_tree
@pytest.mark.parametrize("seed", range(3))
def test_gpu_level_sweep_code_emulated_with_one_threshold_per_map(seed):
    """PaS: one threshold per map, where the largest contour's filled foreground comes straight from
    the final union-find roots (no pointer jumping); 0 and 255 (never foreground) included."""
    rng = np.random.default_rng(300 + seed)
    masks = adversarial_masks()
    cams = torch.cat([torch.from_numpy(masks.astype(np.float32)),
                      multilevel_maps(rng, 4, *masks.shape[1:], 4),
                      torch.from_numpy(rng.random((4, *masks.shape[1:])).astype(np.float32))])
    table = torch.from_numpy(rng.integers(0, 256, size=(len(cams), 1)))
    table[:3, 0] = torch.tensor([0, 254, 255])
    gt, offsets = random_gt(rng, [1] * len(cams), *cams.shape[1:])
    emulated_matches_cpu(cams, table, gt, offsets, block_threads=int(rng.integers(1, 40)))


@requires_tree
def test_gpu_level_sweep_code_emulated_on_adversarial_shapes():
    masks = adversarial_masks()
    cams = torch.from_numpy(masks.astype(np.float32))
    gt, offsets = random_gt(np.random.default_rng(3), [1] * len(masks), *masks.shape[1:])
    emulated_matches_cpu(cams, torch.tensor([[0, 254]] * len(masks)), gt, offsets, block_threads=5)


@requires_tree
def test_gpu_level_sweep_code_emulated_at_1000_thresholds_of_smooth_maps():
    """The evaluator's case: 224 x 224 maps upsampled from 7 x 7, every protocol threshold. Holes and
    components inside them occur at many levels; the sweep settles every level itself (no level is
    left to the host but shared maximum areas, which these maps do not have)."""
    gen = torch.Generator().manual_seed(5)
    low = torch.rand((3, 1, 7, 7), generator=gen)
    up = torch.nn.functional.interpolate(low, size=(224, 224), mode="bicubic", align_corners=False)[:, 0]
    lo, hi = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
    cams = ((up - lo) / (hi - lo)).clamp(0, 1)
    table = protocol_thresholds(cams, cam_curve_thresholds(0.001))
    gt, offsets = random_gt(np.random.default_rng(5), [1, 3, 2], 224, 224)
    emulated_matches_cpu(cams, table, gt, offsets, block_threads=256)
    levels = (cams * 255).to(torch.uint8)
    holed = 0
    for n in range(3):  # the maps do have holes at some thresholds: the background sweeps ran
        present = torch.unique(levels[n]).tolist()
        holed += sum(_has_hole(levels[n].numpy() > t) for t in present[:: max(1, len(present) // 40)])
    assert holed > 0
    for multi in (True, False):
        assert torch.equal(sweep_status(cams, table, multi), torch.zeros_like(table, dtype=torch.int32))


def _has_hole(mask: np.ndarray) -> bool:
    import cv2

    _, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    return hierarchy is not None and bool((hierarchy[0][:, 3] >= 0).any())


@requires_tree
def test_gpu_level_sweep_leaves_only_shared_maximum_areas_to_the_host():
    """Two squares of the same area: the largest contour is OpenCV's first, which only the border
    follower knows; the sweep marks that level (status 2) and the host's answer is used."""
    mask = np.zeros((1, 12, 12), np.float32)
    mask[0, 7:10, 1:4] = 1.0  # lower-left square
    mask[0, 1:4, 7:10] = 1.0  # upper-right square, same area, first in raster order
    cams = torch.from_numpy(mask)
    table = torch.tensor([[0]])
    assert sweep_status(cams, table, multi=False).tolist() == [[2]]
    gt = torch.tensor([[7, 1, 9, 3]])
    iou, xywh = level_sweep((cams * 255).to(torch.uint8), table, gt, torch.tensor([0, 1]), False, emulate=True)
    assert xywh[0, 0].tolist() == reference_xywh(mask[0] > 0)
    emulated_matches_cpu(cams, table, gt, torch.tensor([0, 1]), block_threads=3)


def reference_xywh(mask: np.ndarray) -> list[int]:
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    return list(cv2.boundingRect(max(contours, key=cv2.contourArea)))


def test_gpu_level_sweep_reports_an_internal_inconsistency(monkeypatch):
    """A hole count that disagrees with the Euler number (status 3) is a bug: it must raise, not pass
    as a result."""
    module = rethinkcam_fast._native.cpu_module()
    if not hasattr(module, "emulate_level_sweep"):
        pytest.skip("native _C not built")

    class Broken:
        def __getattr__(self, name):
            return getattr(module, name)

        @staticmethod
        def emulate_level_sweep(*args):
            import ctypes

            status_ptr = args[-1]  # int32 [N, 256]: mark image 0, threshold 7
            ctypes.c_int32.from_address(status_ptr + 4 * 7).value = 3

    monkeypatch.setattr(rethinkcam_fast._native, "cpu_module", lambda: Broken())
    levels = torch.zeros((1, 4, 4), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="internal error.*image 0 at threshold 7"):
        level_sweep(levels, torch.tensor([[7]]), torch.tensor([[0, 0, 1, 1]]), torch.tensor([0, 1]), True,
                    emulate=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(rethinkcam_fast._native.cuda_module() is None, reason="CUDA extension not built")
@pytest.mark.parametrize("interval", [0.01, 0.001])
@pytest.mark.parametrize("variant", ["2-blocks", "1-block", "shared-parents"])
def test_cuda_level_sweep_equals_the_cpu_kernels(monkeypatch, interval, variant):
    """The CUDA kernel itself (opt-in until verified here), each build: identical IoUs and boxes to the CPU."""
    monkeypatch.setenv(GPU_BOXES_ENV, "1")
    monkeypatch.setenv(VARIANT_ENV, variant)
    rng = np.random.default_rng(21)
    gen = torch.Generator().manual_seed(21)
    low = torch.rand((6, 1, 7, 7), generator=gen)
    up = torch.nn.functional.interpolate(low, size=(224, 224), mode="bicubic", align_corners=False)[:, 0]
    smooth = ((up - up.amin((1, 2), keepdim=True)) / (up.amax((1, 2), keepdim=True) - up.amin((1, 2), keepdim=True)))
    cams = torch.cat([smooth.clamp(0, 1), multilevel_maps(rng, 4, 224, 224, 4)])
    table = protocol_thresholds(cams, cam_curve_thresholds(interval))
    gt, offsets = random_gt(rng, [1, 2] * 5, 224, 224)
    for multi in (True, False):
        cpu = best_box_ious(cams, table, gt, offsets, multi)
        gpu = best_box_ious(cams.cuda(), table.cuda(), gt.cuda(), offsets.cuda(), multi)
        assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu), multi
    assert torch.equal(boxes_from_cams(cams.cuda(), table.cuda()).cpu(), boxes_from_cams(cams, table))


def test_protocol_thresholds_name_a_bad_map_instead_of_blaming_the_thresholds():
    maps = torch.rand(3, 5, 5)
    maps[2, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"cams\[2\] has non-finite values"):
        protocol_thresholds(maps, cam_curve_thresholds(0.1))
    maps[2, 1, 1] = 3.0
    with pytest.raises(ValueError, match=r"cams\[2\] has values outside \[0, 1\]"):
        protocol_thresholds(maps, cam_curve_thresholds(0.1))


def test_box_iou_matrix_refuses_float_boxes_and_bad_shapes():
    a = torch.tensor([[0, 0, 3, 3]])
    with pytest.raises(TypeError, match="boxes_b must hold integer pixel coordinates"):
        box_iou_matrix(a, torch.tensor([[0.0, 0.0, 2.5, 2.5]]))
    with pytest.raises(ValueError, match=r"boxes_a must have shape \(K, 4\)"):
        box_iou_matrix(torch.tensor([[0, 0, 3]]), a)
    assert box_iou_matrix(a.int(), a.short()).tolist() == [[1.0]]


def test_level_sweep_launcher_refuses_what_the_kernel_cannot_take():
    """Host pointers must never reach the CUDA kernel, nor other dtypes than it reads."""
    levels = torch.zeros((1, 4, 4), dtype=torch.uint8)
    table, gt, offsets = torch.tensor([[7]]), torch.tensor([[0, 0, 1, 1]]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="levels must be uint8 on a CUDA device"):
        level_sweep(levels, table, gt, offsets, True)
    with pytest.raises(ValueError, match=r"levels must be uint8 on the CPU \(emulate=True\)"):
        level_sweep(levels.float(), table, gt, offsets, True, emulate=True)
    with pytest.raises(ValueError, match="table must be int64"):
        level_sweep(levels, table.int(), gt, offsets, True, emulate=True)
    with pytest.raises(ValueError, match="1 to 2\\^29 pixels"):
        level_sweep(torch.zeros((1, 0, 4), dtype=torch.uint8), table, gt, offsets, True, emulate=True)


def test_level_sweep_kernel_variant_is_checked(monkeypatch):
    from rethinkcam_fast.ops.level_sweep import VARIANT_ENV, sweep_variant

    assert sweep_variant() == (2, 2)
    monkeypatch.setenv(VARIANT_ENV, "1-block")
    assert sweep_variant() == (1, 1)
    monkeypatch.setenv(VARIANT_ENV, "shared-parents")
    assert sweep_variant() == (3, 1)
    monkeypatch.setenv(VARIANT_ENV, "4")
    with pytest.raises(ValueError, match="must be one of .*got '4'"):
        sweep_variant()


def test_cam_thresholds_must_be_numbers():
    cams = torch.rand(2, 5, 5)
    with pytest.raises(TypeError, match="cam_thresholds must be numbers"):
        protocol_thresholds(cams, ["0.5"])  # numpy's float64 would parse it


def test_box_iou_matrix_of_empty_boxes_is_zero_not_nan():
    """Boxes with no pixel (inclusive extents with x1 < x0) have an empty union: IoU 0, never NaN."""
    empty = torch.tensor([[5, 5, 4, 4]])  # x1 < x0, y1 < y0: no pixel
    iou = rethinkcam_fast.box_iou_matrix(empty, empty)
    assert torch.isfinite(iou).all() and float(iou[0, 0]) == 0.0
