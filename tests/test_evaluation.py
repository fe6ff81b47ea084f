"""WSOL evaluators against the slow oracle (tests/_wsol_oracle.py): identical numbers, and their state.

Parity means ``==`` on floats: MaxBoxAcc per δ, MaxBoxAccV2, the best CAM thresholds, the whole
accuracy curve over thresholds, Top-1 Loc, and PxAP.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch
from _wsol_data import make_box_split, make_mask_split, smooth_maps
from _wsol_oracle import OracleBoxes, OraclePxAP, gt_mask, predicted_boxes, read_mask_split, scale_box

from rethinkcam_fast.evaluation import BoxEvaluator, MaskEvaluator
from rethinkcam_fast.evaluation.masks import resize_nearest

pytestmark = pytest.mark.filterwarnings("ignore:rethinkcam_fast.best_box_ious:RuntimeWarning")


@pytest.fixture(scope="module")
def box_data(tmp_path_factory):
    """12 maps at 224x224 with 1-3 GT boxes each from odd original sizes, scaled like the protocol."""
    data = make_box_split(str(tmp_path_factory.mktemp("boxes")), 12, seed=5)
    data["gt"] = [[scale_box(b, size, (224, 224)) for b in boxes] for boxes, size in zip(data["boxes"], data["sizes"])]
    rng = np.random.default_rng(9)
    data["predictions"] = [label if rng.random() < 0.6 else (label + 1) % 5 for label in data["labels"]]
    return data


def _oracle_boxes(data, interval, multi_contour, deltas=(30, 50, 70), classify=False):
    oracle = OracleBoxes(interval, deltas, multi_contour)
    for n, (scoremap, gt) in enumerate(zip(data["maps"], data["gt"])):
        oracle.add(scoremap, gt, data["labels"][n] == data["predictions"][n] if classify else None)
    return oracle.result()


def _ours_boxes(data, interval, multi_contour, deltas=(30, 50, 70), classify=False, splits=(0, 5, 7, 12)):
    evaluator = BoxEvaluator(interval, deltas, multi_contour)
    for start, stop in zip(splits[:-1], splits[1:]):  # uneven batches, mixed float32/float64 maps
        maps = torch.stack([torch.from_numpy(m).double() if n % 3 else torch.from_numpy(m.astype(np.float32))
                            for n, m in enumerate(data["maps"][start:stop])])
        boxes = [torch.tensor(g) for g in data["gt"][start:stop]]
        extra = {}
        if classify:
            extra = {"labels": torch.tensor(data["labels"][start:stop]),
                     "predictions": torch.tensor(data["predictions"][start:stop])}
        evaluator.update(maps, boxes, image_ids=data["ids"][start:stop], **extra)
    return evaluator.compute()


@pytest.mark.parametrize("multi_contour", [True, False], ids=["all-contours", "largest-contour"])
@pytest.mark.parametrize("interval", [0.01, 0.001])
def test_box_metrics_identical_to_oracle(box_data, interval, multi_contour):
    expected = _oracle_boxes(box_data, interval, multi_contour, classify=True)
    got = _ours_boxes(box_data, interval, multi_contour, classify=True)
    assert got.num_images == 12
    assert got.max_box_acc == expected["MaxBoxAcc"]
    assert got.max_box_acc_v2 == expected["MaxBoxAccV2"]
    assert got.best_cam_threshold == expected["best_cam_threshold"]
    assert np.array_equal(got.accuracy_curves, expected["curves"])
    assert got.top1_loc == expected["Top-1 Loc"] and got.top1_cls == expected["Top-1 Cls"]
    assert got.gt_known_loc == got.max_box_acc
    # The data are not trivial: accuracies strictly between 0 and 100 % somewhere on the curve.
    assert ((expected["curves"] > 0) & (expected["curves"] < 100)).any()


def test_generated_data_exercise_every_contour_mode(box_data):
    """The parity data must reach the case that distinguishes the two box modes."""
    multi = _oracle_boxes(box_data, 0.01, True)["curves"]
    largest = _oracle_boxes(box_data, 0.01, False)["curves"]
    assert not np.array_equal(multi, largest)


def test_float32_maps_give_the_float64_levels_of_the_reference():
    """The reference computes uint8(255 * x) on float64 maps; for float32 maps the float32 product
    (what the evaluator computes) never truncates differently, even next to every level boundary."""
    levels = np.arange(1, 256) / 255
    near = np.concatenate([np.nextafter(levels.astype(np.float32), np.float32(d)) for d in (0, 2)]
                          + [levels.astype(np.float32), np.random.default_rng(0).random(200_000).astype(np.float32)])
    in_float64 = (255 * near.astype(np.float64)).astype(np.uint8)
    assert np.array_equal((torch.from_numpy(near) * 255).to(torch.uint8).numpy(), in_float64)


def test_custom_iou_thresholds_and_json_keys(box_data):
    expected = _oracle_boxes(box_data, 0.01, True, deltas=(10, 45, 90))
    got = _ours_boxes(box_data, 0.01, True, deltas=(10, 45, 90))
    assert got.max_box_acc == expected["MaxBoxAcc"] and got.max_box_acc_v2 == expected["MaxBoxAccV2"]
    as_json = got.to_dict()
    assert list(as_json["MaxBoxAcc"]) == ["10", "45", "90"] and "Top-1 Loc" not in as_json


def test_oracle_reproduces_the_reference_test_boxes():
    """The reference's own unit-test expectations (largest contour, thresholds 0, .2, .4, .6, .8)."""
    unimodal = np.array([[0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.4, 0.4, 0.4, 0.6],
                         [0.0, 0.4, 1.0, 0.8, 0.6], [0.0, 0.4, 0.4, 0.4, 0.6]])
    multimodal = np.array([[0.4, 0.0, 0.2, 0.2, 0.2], [0.4, 0.4, 0.0, 0.4, 0.0],
                           [0.0, 0.0, 0.0, 0.4, 0.0], [1.0, 0.6, 0.8, 0.2, 0.2]])
    expected = {
        "unimodal": [[1, 1, 4, 3], [1, 1, 4, 3], [2, 1, 4, 3], [2, 2, 4, 3], [2, 2, 3, 3]],
        "multimodal": [[0, 0, 4, 3], [0, 0, 2, 2], [0, 3, 3, 3], [2, 3, 3, 3], [0, 3, 1, 3]],
    }
    for name, scoremap in (("unimodal", unimodal), ("multimodal", multimodal)):
        levels = (scoremap * 255).astype(np.uint8)
        got = [list(predicted_boxes(levels, int(t * levels.max()), False)[0]) for t in np.arange(0, 1, 0.2)]
        assert got == expected[name]


def test_iou_exactly_at_the_threshold_counts_as_correct():
    """``best_iou >= δ / 100``: a 10x10 predicted box against GT boxes with IoU exactly 0.3, 0.5 and 0.7."""
    maps = torch.zeros(3, 20, 20, dtype=torch.float64)
    maps[:, 0:9, 0:9] = 1.0  # contour box x=0, y=0, w=h=9 -> [0, 0, 9, 9] in the wsol convention: area 100
    gt = [[(0, 0, 9, 2)], [(0, 0, 9, 4)], [(0, 0, 9, 6)]]  # areas 30, 50, 70 inside it
    oracle = OracleBoxes(0.5)
    for scoremap, boxes in zip(maps.numpy(), gt):
        oracle.add(scoremap, boxes)
    evaluator = BoxEvaluator(0.5)
    evaluator.update(maps, [torch.tensor(g) for g in gt])
    got = evaluator.compute()
    assert got.max_box_acc == oracle.result()["MaxBoxAcc"] == {30: 100.0, 50: 2 * 100.0 / 3, 70: 100.0 / 3}


def test_box_evaluator_keeps_state_on_the_maps_device_and_counts_per_threshold():
    evaluator = BoxEvaluator(0.25, (50,))
    maps = torch.zeros(2, 8, 8, dtype=torch.float64)
    maps[:, 2:6, 2:6] = 1.0
    evaluator.update(maps, torch.tensor([[2, 2, 6, 6], [0, 0, 7, 7]]), torch.tensor([0, 1, 2]))
    state = evaluator.state_dict()["state"]
    assert state["correct"].device == maps.device
    # Predicted box at every threshold: [2, 2, 6, 6] (wsol convention): IoU 1 with image 0, 25/64 with image 1.
    assert state["correct"].tolist() == [[1, 1, 1, 1]] and int(state["num_images"]) == 2
    metrics = evaluator.compute()
    assert metrics.max_box_acc == {50: 50.0} and metrics.best_cam_threshold == {50: 0.0}


# -- PxAP -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mask_data(tmp_path_factory):
    data = make_mask_split(str(tmp_path_factory.mktemp("masks")), 8, seed=11, map_size=(96, 128))
    ids, masks, ignores = read_mask_split(data["split_dir"])
    data["gt"] = [gt_mask(data["oracle_mask_root"], masks[i], ignores[i], (128, 96)) for i in ids]
    assert any((g == 255).any() for g in data["gt"]) and any(not (g == 255).any() for g in data["gt"])
    return data


@pytest.mark.parametrize("interval", [0.01, 0.001])
def test_pxap_identical_to_oracle(mask_data, interval):
    oracle = OraclePxAP(interval)
    evaluator = MaskEvaluator(interval)
    for scoremap, gt in zip(mask_data["maps"], mask_data["gt"]):
        oracle.add(scoremap, gt)
    for start in range(0, 8, 3):
        gt = torch.from_numpy(np.stack(mask_data["gt"][start : start + 3]))
        maps = torch.stack([torch.from_numpy(m) for m in mask_data["maps"][start : start + 3]])
        evaluator.update(maps, gt == 1, gt == 255)
    assert evaluator.compute().pxap == oracle.result()


def test_pxap_perfect_and_constant_maps():
    foreground = torch.zeros(1, 20, 30, dtype=torch.bool)
    foreground[0, 5:15, 4:20] = True
    ignore = torch.zeros_like(foreground)
    ignore[0, 0:3, :] = True
    perfect = MaskEvaluator(0.01)
    perfect.update(foreground.double(), foreground, ignore)
    assert perfect.compute().pxap == 100.0
    for value in (0.0, 0.5, 1.0):  # a constant map: AP = the foreground share of the counted pixels
        constant = MaskEvaluator(0.01)
        constant.update(torch.full((1, 20, 30), value), foreground, ignore)
        share = 160 / (600 - 90)
        assert constant.compute().pxap == pytest.approx(100 * share, abs=1e-9)


def test_pxap_errors_without_foreground_or_counted_pixels():
    evaluator = MaskEvaluator(0.1)
    evaluator.update(torch.rand(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no ground-truth foreground"):
        evaluator.compute()
    with pytest.raises(ValueError, match="BoolTensor"):
        evaluator.update(torch.rand(2, 4, 4), torch.zeros(2, 4, 5, dtype=torch.bool))


def test_resize_nearest_is_opencv_inter_nearest():
    rng = np.random.default_rng(0)
    for _ in range(60):
        src_h, src_w, dst_h, dst_w = (int(v) for v in rng.integers(1, 500, 4))
        image = rng.integers(0, 256, (src_h, src_w)).astype(np.uint8)
        expected = cv2.resize(image, (dst_w, dst_h), interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(resize_nearest(image, (dst_h, dst_w)), expected), (src_h, src_w, dst_h, dst_w)


# -- state: empty, merge, state_dict -------------------------------------------------------------------

def test_compute_on_an_empty_evaluator_raises():
    for evaluator in (BoxEvaluator(0.01), MaskEvaluator(0.01)):
        with pytest.raises(ValueError, match="no images were accumulated"):
            evaluator.compute()
        if isinstance(evaluator, BoxEvaluator):  # an empty batch counts nothing
            evaluator.update(torch.zeros(0, 8, 8), torch.zeros(0, 4, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
            with pytest.raises(ValueError, match="no images were accumulated"):
                evaluator.compute()


def _box_halves(data, interval):
    halves = []
    for part in (slice(0, 7), slice(7, 12)):
        evaluator = BoxEvaluator(interval)
        maps = torch.stack([torch.from_numpy(m).double() for m in data["maps"][part]])
        evaluator.update(maps, [torch.tensor(g) for g in data["gt"][part]])
        halves.append(evaluator)
    return halves


def test_merge_of_two_halves_equals_the_whole(box_data, mask_data):
    first, second = _box_halves(box_data, 0.01)
    merged = first.clone().merge(second).compute()
    whole = _ours_boxes(box_data, 0.01, True)
    assert merged.max_box_acc == whole.max_box_acc and np.array_equal(merged.accuracy_curves, whole.accuracy_curves)
    assert first.num_images == 7  # clone() left the first half alone
    parts = []
    for part in (slice(0, 3), slice(3, 8)):
        evaluator = MaskEvaluator(0.01)
        gt = torch.from_numpy(np.stack(mask_data["gt"][part]))
        evaluator.update(torch.stack([torch.from_numpy(m) for m in mask_data["maps"][part]]), gt == 1, gt == 255)
        parts.append(evaluator)
    oracle = OraclePxAP(0.01)
    for scoremap, gt in zip(mask_data["maps"], mask_data["gt"]):
        oracle.add(scoremap, gt)
    assert parts[0].merge(parts[1]).compute().pxap == oracle.result()
    with pytest.raises(ValueError, match="different configuration"):
        first.merge(BoxEvaluator(0.001))
    with pytest.raises(TypeError):
        first.merge(MaskEvaluator(0.01))


def test_state_dict_round_trip_through_a_file(box_data, tmp_path):
    first, second = _box_halves(box_data, 0.001)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    restored = BoxEvaluator(0.001)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert restored.num_images == 7
    restored.merge(second)
    assert restored.compute() .max_box_acc == _ours_boxes(box_data, 0.001, True).max_box_acc
    with pytest.raises(ValueError, match="different configuration"):
        BoxEvaluator(0.001, multi_contour=False).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="not a MaskEvaluator state"):
        MaskEvaluator(0.001).load_state_dict(first.state_dict())
    broken = first.state_dict()
    broken["state"]["correct"] = broken["state"]["correct"][:, :10]
    with pytest.raises(ValueError, match="does not match"):
        BoxEvaluator(0.001).load_state_dict(broken)
    restored.reset()
    assert restored.num_images == 0


def test_top1_needs_labels_and_predictions_for_every_image_or_is_left_out():
    maps = torch.rand(2, 8, 8)
    boxes = [torch.tensor([[0, 0, 3, 3]]), torch.tensor([[1, 1, 5, 5]])]
    evaluator = BoxEvaluator(0.1)
    with pytest.raises(ValueError, match="both labels and predictions"):
        evaluator.update(maps, boxes, labels=torch.tensor([0, 1]))
    evaluator.update(maps, boxes, labels=torch.tensor([0, 1]), predictions=torch.tensor([0, 0]))
    evaluator.update(maps, boxes)
    with pytest.warns(RuntimeWarning, match="for 2 of 4 images"):
        metrics = evaluator.compute()  # the box metrics stand; Top-1 is left out
    assert metrics.top1_loc is None and metrics.num_images == 4 and metrics.max_box_acc_v2 >= 0


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_value, problem", [(float("nan"), "non-finite"), (float("inf"), "non-finite"),
                                                (1.5, "values outside"), (-0.1, "values outside")])
def test_bad_maps_raise_naming_the_image_and_count_nothing(bad_value, problem):
    maps = torch.rand(3, 10, 10)
    maps[2, 4, 4] = bad_value
    boxes = [torch.tensor([[0, 0, 5, 5]])] * 3
    for evaluator, update in ((BoxEvaluator(0.1), lambda e: e.update(maps, boxes, image_ids=["a", "b", "c.jpg"])),
                              (MaskEvaluator(0.1), lambda e: e.update(maps, maps > 0.5, image_ids=["a", "b", "c.jpg"]))):
        with pytest.raises(ValueError, match=rf"image 'c\.jpg' has {problem}"):
            update(evaluator)
        assert evaluator.num_images == 0
    with pytest.raises(ValueError, match=r"maps\[2\]"):
        BoxEvaluator(0.1).update(maps, boxes)


def test_bad_gt_boxes_and_arguments_raise():
    maps = torch.rand(2, 10, 10)
    evaluator = BoxEvaluator(0.1)
    with pytest.raises(ValueError, match="image 'b' is not"):
        evaluator.update(maps, [torch.tensor([[0, 0, 5, 5]]), torch.tensor([[6, 0, 5, 5]])], image_ids=["a", "b"])
    with pytest.raises(ValueError, match="image 'b' has no GT box"):
        evaluator.update(maps, torch.tensor([[0, 0, 5, 5]]), torch.tensor([0, 1, 1]), image_ids=["a", "b"])
    with pytest.raises(ValueError, match="gt_offsets"):
        evaluator.update(maps, torch.tensor([[0, 0, 5, 5]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="metadata"):
        evaluator.update(maps)
    with pytest.raises(ValueError, match=r"image 'b' lies outside the maps' 10x10 grid"):  # e.g. image pixels
        evaluator.update(maps, [torch.tensor([[0, 0, 5, 5]]), torch.tensor([[80, 2, 190, 9]])], image_ids=["a", "b"])
    with pytest.raises(ValueError, match=r"image 'b' lies outside"):  # x0 == W: the first pixel past the grid
        evaluator.update(maps, [torch.tensor([[0, 0, 5, 5]]), torch.tensor([[10, 2, 10, 9]])], image_ids=["a", "b"])
    assert evaluator.num_images == 0
    with pytest.warns(RuntimeWarning, match=r"maps\[1\] reaches past the maps' 10x10 grid"):
        evaluator.update(maps, [torch.tensor([[0, 0, 10, 10]]), torch.tensor([[2, 2, 11, 9]])])
    assert evaluator.num_images == 2  # (x1 == W, a scaled box at the edge, passes without a warning)
    evaluator.reset()
    two = torch.tensor([[0, 0, 5, 5], [2, 2, 8, 8]])
    for columns in (two.T, two.reshape(1, 8), two.reshape(8), torch.zeros(1, 5, dtype=torch.long)):  # not [k, 4]
        with pytest.raises(ValueError, match=r"gt_boxes\[1\]: an image's GT boxes are \[k, 4\]"):
            evaluator.update(maps, [two, columns])
    evaluator.update(maps, [two, torch.tensor([2, 2, 8, 8])])  # one box as [4]
    assert evaluator.num_images == 2
    evaluator.reset()
    with pytest.raises(ValueError, match="percentages"):
        BoxEvaluator(0.1, (50, 150))
    with pytest.raises(ValueError, match="repeat"):
        BoxEvaluator(0.1, (50, 50))
    with pytest.raises(ValueError, match="cam_curve_interval"):
        MaskEvaluator(1.5)


@pytest.mark.cuda
def test_box_and_mask_evaluators_on_cuda_match_cpu(box_data, mask_data):
    cpu = _ours_boxes(box_data, 0.01, True)
    evaluator = BoxEvaluator(0.01)
    maps = torch.stack([torch.from_numpy(m).double() for m in box_data["maps"]]).cuda()
    evaluator.update(maps, [torch.tensor(g).cuda() for g in box_data["gt"]])
    assert evaluator.device.type == "cuda"
    assert evaluator.compute().max_box_acc == cpu.max_box_acc
    gt = torch.from_numpy(np.stack(mask_data["gt"])).cuda()
    masks = MaskEvaluator(0.001)
    masks.update(torch.stack([torch.from_numpy(m) for m in mask_data["maps"]]).cuda(), gt == 1, gt == 255)
    oracle = OraclePxAP(0.001)
    for scoremap, g in zip(mask_data["maps"], mask_data["gt"]):
        oracle.add(scoremap, g)
    assert masks.device.type == "cuda" and masks.compute().pxap == oracle.result()


def test_smooth_maps_are_valid_score_maps():
    for scoremap in smooth_maps(6, 17, 23, seed=2):
        assert scoremap.shape == (17, 23) and 0 <= scoremap.min() and scoremap.max() <= 1
    assert os.path.basename(__file__).startswith("test_")


def _torch_path_histogram(evaluator: MaskEvaluator, maps, foreground, ignore):
    """The device path's counts (bins from _bins, one scatter_add), computed directly."""
    bins = evaluator._bins(maps.double())
    row = foreground.long()
    if ignore is not None:
        row = torch.where(ignore & ~foreground, 2, row)
    counts = torch.zeros(3 * evaluator.num_bins, dtype=torch.int64)
    counts.scatter_add_(0, (row * evaluator.num_bins + bins).flatten(), torch.ones(bins.numel(), dtype=torch.int64))
    return counts[: 2 * evaluator.num_bins].view(2, -1)


@pytest.mark.parametrize("interval", [0.001, 0.01, 0.3, 1 / 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arithmetic", [True, False], ids=["guess", "search"])
def test_native_pxap_histogram_counts_as_the_device_path(interval, dtype, arithmetic):
    """CPU maps go through the C++ histogram; it must count exactly as the scatter_add path, scores
    sitting exactly on an edge (and one ulp either side of it), 0 and 1 included, with and without
    ignore regions, with the x / interval guess and with the binary search."""
    gen = torch.Generator().manual_seed(4)
    evaluator = MaskEvaluator(interval)
    evaluator._arithmetic_bins = evaluator._arithmetic_bins and arithmetic
    edges = torch.from_numpy(evaluator.cam_thresholds)
    on_edges = torch.cat([edges, edges.nextafter(torch.tensor(2.0, dtype=torch.float64)),
                          edges[1:].nextafter(torch.tensor(-1.0, dtype=torch.float64)),
                          torch.tensor([0.0, 1.0, 1.0 - 2**-53])])
    values = torch.cat([on_edges, torch.rand(3 * 50 * 40 - len(on_edges), generator=gen, dtype=torch.float64)])
    maps = values.view(3, 50, 40).to(dtype).clamp_(0, 1)
    foreground = torch.rand(3, 50, 40, generator=gen) < 0.3
    ignore = torch.rand(3, 50, 40, generator=gen) < 0.2
    for ig in (ignore, None):
        before = evaluator._state["histogram"].clone()
        evaluator.update(maps, foreground, ig)
        got = evaluator._state["histogram"] - before
        assert torch.equal(got, _torch_path_histogram(evaluator, maps, foreground, ig))


def test_numpy_scalars_are_numbers_too():
    """Values read from numpy (np.int64 thresholds, np.float32 intervals) are accepted like Python's."""
    from rethinkcam_fast import boxes_from_cams

    cams = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(12))
    assert torch.equal(boxes_from_cams(cams, np.int64(100)), boxes_from_cams(cams, 100))
    a = BoxEvaluator(np.float64(0.01), iou_thresholds=[np.int64(30), np.float32(50.0), 70])
    b = BoxEvaluator(0.01, iou_thresholds=[30, 50, 70])
    assert a.cam_curve_interval == b.cam_curve_interval and list(a.iou_thresholds) == list(b.iou_thresholds)
    with pytest.raises(TypeError):
        boxes_from_cams(cams, np.bool_(True))
