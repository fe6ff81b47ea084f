"""WSOL evaluation from files: metadata, saved score maps, resume, the CLI, and torchrun with 2 ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from _wsol_data import make_box_split, make_mask_split, write_lines
from _wsol_oracle import evaluate_box_split, evaluate_mask_split

from rethinkcam_fast import cli
from rethinkcam_fast.evaluation import MetadataError, evaluate_scoremaps, load_metadata, read_metadata

pytestmark = pytest.mark.filterwarnings("ignore:rethinkcam_fast.best_box_ious:RuntimeWarning")


@pytest.fixture(scope="module")
def boxes(tmp_path_factory):
    return make_box_split(str(tmp_path_factory.mktemp("cub")), 10, seed=21)


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    return make_mask_split(str(tmp_path_factory.mktemp("openimages")), 7, seed=4)


def _evaluate(data, **kwargs):
    return evaluate_scoremaps(data["scoremap_root"], data["metadata_root"], "CUB", "test", **kwargs)


# -- parity through files ---------------------------------------------------------------------------

@pytest.mark.parametrize("interval", [0.01, 0.001])
def test_scoremap_files_match_the_oracle(boxes, masks, interval):
    expected = evaluate_box_split(boxes["scoremap_root"], boxes["split_dir"], interval)
    got = _evaluate(boxes, cam_curve_interval=interval, batch_size=4)
    assert got.max_box_acc == expected["MaxBoxAcc"] and got.max_box_acc_v2 == expected["MaxBoxAccV2"]
    assert np.array_equal(got.accuracy_curves, expected["curves"])
    pxap = evaluate_scoremaps(masks["scoremap_root"], masks["metadata_root"], "OpenImages", "val",
                              mask_root=masks["mask_root"], cam_curve_interval=interval, batch_size=3)
    assert pxap.pxap == evaluate_mask_split(masks["scoremap_root"], masks["split_dir"], masks["oracle_mask_root"], interval)


def test_boxes_are_scaled_with_the_reference_truncation(boxes):
    metadata = load_metadata(boxes["metadata_root"], "CUB", "test")
    scaled, offsets = metadata.resized_boxes(boxes["ids"], (96, 130))
    expected = [(int(float(x0) * 130 / w), int(float(y0) * 96 / h), int(float(x1) * 130 / w), int(float(y1) * 96 / h))
                for bs, (w, h) in zip(boxes["boxes"], boxes["sizes"]) for x0, y0, x1, y1 in bs]
    assert [tuple(b) for b in scaled.tolist()] == expected
    assert offsets.tolist() == [0] + list(np.cumsum([len(b) for b in boxes["boxes"]]))
    for side in range(20, 30):  # the split's scaled tables are kept for a few sizes only (megabytes each at scale)
        metadata.resized_boxes(boxes["ids"][:2], (side, side))
        assert len(metadata._cache["resized"]) <= 4
    assert torch.equal(metadata.resized_boxes(boxes["ids"], (96, 130))[0], scaled)


def test_reference_resize_case(tmp_path):
    """wsolevaluation's test: box (1, 2, 4, 3) of a 10x20 image resized to 35x10 -> (3, 1, 14, 1)."""
    split = tmp_path / "split"
    write_lines(str(split / "image_ids.txt"), [("a.jpg",)])
    write_lines(str(split / "image_sizes.txt"), [("a.jpg", 10, 20)])
    write_lines(str(split / "localization.txt"), [("a.jpg", 1, 2, 4, 3)])
    boxes, _ = read_metadata(str(split)).resized_boxes(["a.jpg"], (10, 35))
    assert boxes.tolist() == [[3, 1, 14, 1]]


def test_box_scaling_keeps_the_reference_operation_order(tmp_path):
    """``x * new / old``, not ``x * (new / old)``: they truncate differently for these boxes."""
    split = tmp_path / "split"
    write_lines(str(split / "image_ids.txt"), [("a.jpg",), ("b.jpg",)])
    write_lines(str(split / "image_sizes.txt"), [("a.jpg", 80, 110), ("b.jpg", 160, 142)])
    write_lines(str(split / "localization.txt"), [("a.jpg", 45, 55, 45, 55), ("b.jpg", 85, 71, 90, 71)])
    boxes, _ = read_metadata(str(split)).resized_boxes(["a.jpg", "b.jpg"], (224, 224))
    assert boxes.tolist() == [[126, 112, 126, 112], [119, 112, 126, 112]]
    assert int(45 * (224 / 80)) == 125  # the other order would lose a pixel


# -- malformed metadata -------------------------------------------------------------------------------

def _split(tmp_path, **files):
    split = tmp_path / "CUB" / "test"
    base = {"image_ids.txt": "a.jpg\nb.jpg\n", "class_labels.txt": "a.jpg,0\nb.jpg,1\n",
            "image_sizes.txt": "a.jpg,100,80\nb.jpg,50,60\n",
            "localization.txt": "a.jpg,1,2,30,40\nb.jpg,0,0,10,10\nb.jpg,5,5,6,6\n"}
    base.update(files)
    split.mkdir(parents=True, exist_ok=True)
    for name, text in base.items():
        if text is not None:
            (split / name).write_text(text)
    return str(tmp_path), str(split)


@pytest.mark.parametrize("files, message", [
    ({"localization.txt": "a.jpg,1,2,30,40\nb.jpg,0,0,10\n"}, r"localization\.txt:2: expected 'path,x0,y0,x1,y1'"),
    ({"localization.txt": "a.jpg,1,2,30,40\nb.jpg,0,0,ten,10\n"}, r"localization\.txt:2: x1 must be a number"),
    ({"localization.txt": "a.jpg,1,2,30,40\nb.jpg,0,0,nan,10\n"}, r"localization\.txt:2: x1 must be finite"),
    ({"localization.txt": "a.jpg,120,2,130,40\nb.jpg,0,0,3,10\n"}, r"localization\.txt:1: box \(120, 2, 130, 40\) "
                                                                     r"of image 'a\.jpg' lies outside the image"),
    ({"image_sizes.txt": "a.jpg,100,80\nb.jpg,50,60\na.jpg,50,50\n"}, r"image_sizes\.txt:3: image 'a\.jpg' already"),
    ({"class_labels.txt": "a.jpg,0\nb.jpg,1\na.jpg,3\n"}, r"class_labels\.txt:3: image 'a\.jpg' already listed"),
    ({"localization.txt": "a.jpg,1,2,30,40\nb.jpg,9,0,3,10\n"}, r"localization\.txt:2: box must satisfy x0 <= x1"),
    ({"localization.txt": "a.jpg,-1,2,30,40\nb.jpg,0,0,3,10\n"}, r"localization\.txt:1: box coordinates must be non-negative"),
    ({"localization.txt": "a.jpg,1,2,30,40\n"}, r"localization\.txt: no box for image 'b\.jpg'"),
    ({"image_sizes.txt": "a.jpg,100,80\nb.jpg,50,0\n"}, r"image_sizes\.txt:2: image size must be positive"),
    ({"image_sizes.txt": "a.jpg,100,80\n"}, r"image_sizes\.txt: no size for image 'b\.jpg'"),
    ({"image_sizes.txt": None}, r"image_sizes\.txt: metadata file not found"),
    ({"image_ids.txt": "a.jpg\nb.jpg\na.jpg\n"}, r"image_ids\.txt:3: image 'a\.jpg' already listed on line 1"),
    ({"image_ids.txt": "a.jpg,x\n"}, r"image_ids\.txt:1: expected 'path'"),
    ({"class_labels.txt": "a.jpg,0\nb.jpg,one\n"}, r"class_labels\.txt:2: label must be an integer"),
    # numbers no image has: errors on their line, not an int64 overflow later
    ({"localization.txt": "a.jpg,5,5,1e30,15\nb.jpg,0,0,3,10\n"}, r"localization\.txt:1: x1 '1e30' is not a pixel coord"),
    ({"class_labels.txt": "a.jpg,0\nb.jpg,99999999999999999999\n"}, r"class_labels\.txt:2: label '9+' is out of range"),
    ({"image_sizes.txt": "a.jpg,100,80\nb.jpg,50,4294967296\n"}, r"image_sizes\.txt:2: height '4294967296' is out of"),
    # a megabyte line is echoed cut short
    ({"image_ids.txt": "a.jpg\n" + "x" * 1_000_000 + ",y\n"}, r"image_ids\.txt:2: expected 'path', got 'x{120}'\.\.\. "
                                                             r"\(1,000,002 characters\)$"),
])
def test_malformed_metadata_names_file_and_line(tmp_path, files, message):
    root, _ = _split(tmp_path, **files)
    if "class_labels.txt" in files:  # read where labels are used (Top-1 Loc): the box metrics run without
        metadata = load_metadata(root, "CUB", "test")
        assert metadata.class_labels is None and metadata.boxes is not None
        with pytest.raises(MetadataError, match=message):
            metadata.labels_of(["a.jpg"])
        return
    with pytest.raises(MetadataError, match=message):
        load_metadata(root, "CUB", "test").require_labels()


def test_boxes_ending_past_their_image_are_named_once_by_their_line(tmp_path):
    """Scored as they are (the reference does), with one warning naming the first's line and how many
    more, not a warning per batch asking whether the boxes are in the maps' pixels."""
    import warnings

    boxes = make_box_split(str(tmp_path), 6, seed=3)
    clean = _evaluate(boxes, cam_curve_interval=0.01)
    local = os.path.join(boxes["split_dir"], "localization.txt")
    sizes = dict(line.split(",", 1) for line in open(os.path.join(boxes["split_dir"], "image_sizes.txt")).read().split())
    lines = open(local).read().split()
    past = []
    for k in (1, 4):  # the end of two boxes moved far past their images
        image_id, x0, y0, x1, y1 = lines[k].split(",")
        width, height = (int(v) for v in sizes[image_id].split(","))
        lines[k] = ",".join([image_id, x0, y0, str(width * 3), str(height * 3)])
        past.append(image_id)
    open(local, "w").write("\n".join(lines) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metadata = load_metadata(boxes["metadata_root"], "CUB", "test")
        result = _evaluate(boxes, cam_curve_interval=0.01)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert metadata.boxes_past_image == frozenset(past)
    assert len([m for m in messages if "ends past its image (and 1 more)" in m and "localization.txt:2:" in m]) == 2
    assert not any("maps' pixels" in m for m in messages), messages
    assert result.num_images == clean.num_images


def test_metadata_with_a_byte_order_mark_and_unparsed_labels(tmp_path):
    """A BOM (as Notepad writes UTF-8) is not part of the first id; WordNet ids in class_labels.txt
    stop only what needs integer labels."""
    boxes = make_box_split(str(tmp_path), 6, seed=3)
    clean = _evaluate(boxes, cam_curve_interval=0.01)
    split = boxes["split_dir"]
    for name in ("image_ids.txt", "image_sizes.txt", "localization.txt"):
        path = os.path.join(split, name)
        text = open(path, encoding="utf-8").read()
        open(path, "w", encoding="utf-8-sig").write(text)
    labels = os.path.join(split, "class_labels.txt")
    open(labels, "w").write("".join(f"{i},n0{k}\n" for k, i in enumerate(boxes["ids"])))
    assert _evaluate(boxes, cam_curve_interval=0.01) == clean
    with pytest.raises(MetadataError, match=r"class_labels\.txt:1: label must be an integer"):
        load_metadata(boxes["metadata_root"], "CUB", "test").require_labels()


def test_mask_metadata_rules(tmp_path):
    split = tmp_path / "OpenImages" / "val"
    split.mkdir(parents=True)
    (split / "image_ids.txt").write_text("a.jpg\n")
    (split / "localization.txt").write_text("a.jpg,a_m0.png,a_ignore.png\na.jpg,a_m1.png,other_ignore.png\n")
    with pytest.raises(MetadataError, match=r"localization\.txt:2: .*names an ignore mask on a later line"):
        load_metadata(str(tmp_path), "OpenImages", "val")
    (split / "localization.txt").write_text("a.jpg,a_m0.png,\n\na.jpg,a_m1.png,\n")  # blank lines are skipped
    metadata = load_metadata(str(tmp_path), "OpenImages", "val")
    assert metadata.mask_paths == {"a.jpg": ("a_m0.png", "a_m1.png")} and metadata.ignore_paths == {"a.jpg": None}
    with pytest.raises(MetadataError, match="metadata directory not found .*'VOC'"):
        load_metadata(str(tmp_path), "VOC", "val")  # any folder name is a dataset: this one is missing
    for bad in ("", "..", "a/b"):
        with pytest.raises(ValueError, match="dataset_name must be a folder name"):
            load_metadata(str(tmp_path), bad, "val")
    other = tmp_path / "MyMasks" / "val"  # another masks dataset, recognised by its localization.txt
    other.mkdir(parents=True)
    for name in ("image_ids.txt", "localization.txt"):
        (other / name).write_text((split / name).read_text())
    assert load_metadata(str(tmp_path), "MyMasks", "val").localization == "masks"


# -- bad score maps ------------------------------------------------------------------------------------

@pytest.fixture
def small_split(tmp_path):
    return make_box_split(str(tmp_path), 5, seed=8, map_size=(40, 48))


@pytest.mark.parametrize("damage, error, message", [
    (lambda path: os.remove(path), FileNotFoundError, r"score map of image '001\.class_1/img_0001\.jpg' not found"),
    (lambda path: np.save(path, np.zeros((40, 47))), ValueError, r"img_0001\.jpg' has shape \(40, 47\), expected \(40, 48\)"),
    (lambda path: np.save(path, np.zeros((40, 48), dtype=np.uint8)), ValueError, r"img_0001\.jpg' must be a float16"),
    (lambda path: np.save(path, np.zeros((40, 48), dtype=np.longdouble)), ValueError, r"img_0001\.jpg' must be a float"),
    (lambda path: np.savez(open(path, "wb"), np.zeros((40, 48))), ValueError, r"img_0001\.jpg' is not a \.npy array"),
    (lambda path: np.save(path, np.full((40, 48), np.nan)), ValueError, r"img_0001\.jpg' has non-finite values"),
    (lambda path: np.save(path, np.full((40, 48), 1.25)), ValueError, r"img_0001\.jpg' has values outside \[0, 1\]"),
    (lambda path: open(path, "wb").write(b"not numpy"), ValueError, r"img_0001\.jpg' cannot be read.*not a \.npy array"),
])
def test_bad_score_map_files_name_the_image(small_split, damage, error, message):
    damage(os.path.join(small_split["scoremap_root"], small_split["ids"][1] + ".npy"))
    with pytest.raises(error, match=message):
        _evaluate(small_split, cam_curve_interval=0.1)


def test_cli_reports_errors_on_stderr_with_exit_code_1(small_split, capsys):
    os.remove(os.path.join(small_split["scoremap_root"], small_split["ids"][3] + ".npy"))
    code = cli.main(["evaluate", "--scoremap-root", small_split["scoremap_root"], "--metadata-root",
                     small_split["metadata_root"], "--dataset-name", "CUB", "--split", "test"])
    captured = capsys.readouterr()
    assert code == 2 and "img_0003.jpg' not found" in captured.err and captured.out == ""


def test_every_missing_map_is_counted_before_any_is_read(small_split, monkeypatch):
    import rethinkcam_fast.evaluation.scoremaps as scoremaps

    for k in (1, 3, 4):
        os.remove(os.path.join(small_split["scoremap_root"], small_split["ids"][k] + ".npy"))
    read = []
    monkeypatch.setattr(scoremaps, "load_scoremap", lambda *a: read.append(a) or np.zeros((40, 48)))
    with pytest.raises(FileNotFoundError, match=r"img_0001\.jpg' not found: .*; 3 of 5 are missing: .*img_0001"
                                                r".*img_0003.*img_0004"):
        _evaluate(small_split, cam_curve_interval=0.1)
    assert read == []
    os.remove(os.path.join(small_split["scoremap_root"], small_split["ids"][0] + ".npy"))  # the grid's map too
    with pytest.raises(FileNotFoundError, match=r"img_0000\.jpg' not found: .*; 4 of 5 are missing"):
        _evaluate(small_split, cam_curve_interval=0.1)


def test_cli_names_a_mean_over_other_deltas_for_what_it_is(small_split, capsys):
    args = ["evaluate", "--scoremap-root", small_split["scoremap_root"], "--metadata-root",
            small_split["metadata_root"], "--dataset-name", "CUB", "--split", "test", "--cam-curve-interval", "0.1"]
    assert cli.main(args) == 0
    assert "MaxBoxAccV2 (mean over δ) %" in capsys.readouterr().out
    assert cli.main([*args, "--iou-thresholds", "50"]) == 0
    out = capsys.readouterr().out
    assert "mean MaxBoxAcc over δ = 50, every contour (MaxBoxAccV2 takes δ = 30, 50, 70)" in out
    assert "MaxBoxAccV2 (mean over δ)" not in out


# -- resume -------------------------------------------------------------------------------------------

def test_resume_after_an_interruption_gives_the_uninterrupted_numbers(boxes, tmp_path):
    whole = _evaluate(boxes, cam_curve_interval=0.01)
    damaged = os.path.join(boxes["scoremap_root"], boxes["ids"][7] + ".npy")
    original = open(damaged, "rb").read()
    open(damaged, "wb").write(b"cut off")  # (a missing map stops the run before any is read)
    state = str(tmp_path / "state.pt")
    try:
        with pytest.raises(ValueError, match="img_0007"):
            _evaluate(boxes, cam_curve_interval=0.01, batch_size=3, resume=state)
        saved = torch.load(state, weights_only=True)
        assert saved["processed"] == 6  # two whole batches, nothing of the failing one
        assert int(saved["evaluator"]["state"]["num_images"]) == 6
    finally:
        open(damaged, "wb").write(original)
    resumed = _evaluate(boxes, cam_curve_interval=0.01, batch_size=3, resume=state)
    assert resumed.max_box_acc == whole.max_box_acc and np.array_equal(resumed.accuracy_curves, whole.accuracy_curves)
    assert resumed.num_images == 10 and resumed.resumed_images == 6 and whole.resumed_images == 0
    again = _evaluate(boxes, cam_curve_interval=0.01, batch_size=3, resume=state)  # complete: nothing re-read
    assert again.max_box_acc == whole.max_box_acc and again.resumed_images == 10
    with pytest.raises(ValueError, match="different configuration"):
        _evaluate(boxes, cam_curve_interval=0.01, multi_contour=False, resume=state)
    other_split = os.path.join(boxes["metadata_root"], "CUB", "val")
    shutil.copytree(boxes["split_dir"], other_split, dirs_exist_ok=True)
    with pytest.raises(ValueError, match="different run"):
        evaluate_scoremaps(boxes["scoremap_root"], boxes["metadata_root"], "CUB", "val", resume=state)
    moved = str(tmp_path / "regenerated_maps")  # other score maps (e.g. regenerated elsewhere): not resumed
    shutil.copytree(boxes["scoremap_root"], moved)
    with pytest.raises(ValueError, match="different run"):
        evaluate_scoremaps(moved, boxes["metadata_root"], "CUB", "test", cam_curve_interval=0.01, resume=state)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt: not a readable evaluation state"):
        _evaluate(boxes, resume=str(tmp_path / "junk.pt"))


def test_empty_split_raises_a_clear_error(tmp_path):
    root, _ = _split(tmp_path, **{"image_ids.txt": "\n"})
    with pytest.raises(ValueError, match="no images were accumulated"):
        evaluate_scoremaps(str(tmp_path / "maps"), root, "CUB", "test")


# -- CLI ----------------------------------------------------------------------------------------------

def _cli_args(data, dataset="CUB", split="test", interval="0.01"):
    args = ["evaluate", "--scoremap-root", data["scoremap_root"], "--metadata-root", data["metadata_root"],
            "--dataset-name", dataset, "--split", split, "--cam-curve-interval", interval]
    return args + (["--mask-root", data["mask_root"]] if "mask_root" in data else [])


def test_cli_json_line_and_table(boxes, masks, capsys):
    assert cli.main(_cli_args(boxes) + ["--iou-thresholds", "30", "50", "70", "--no-multi-contour", "--json"]) == 0
    captured = capsys.readouterr()
    (line,) = captured.out.strip().splitlines()  # stdout: the JSON object alone (`| jq`); the table on stderr
    result = json.loads(line)
    out = captured.err.strip().splitlines()
    expected = evaluate_box_split(boxes["scoremap_root"], boxes["split_dir"], 0.01, multi_contour=False)
    assert result["MaxBoxAcc"] == {str(k): v for k, v in expected["MaxBoxAcc"].items()}
    # (the oracle's key; ours names it for what it is: not V2)
    assert result["mean_MaxBoxAcc"] == expected["MaxBoxAccV2"] and result["multi_contour"] is False
    assert "MaxBoxAccV2" not in result
    # largest contour only: the mean over δ is printed, but not under V2's name (V2 uses every contour)
    assert any("mean MaxBoxAcc over δ, largest contour" in line for line in out) and "CUB/test, 10 images" in out[0]
    assert not any(line.startswith("MaxBoxAccV2") for line in out)
    assert cli.main(_cli_args(masks, "OpenImages", "val") + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["PxAP"] == evaluate_mask_split(masks["scoremap_root"], masks["split_dir"], masks["oracle_mask_root"], 0.01)


def test_cli_needs_a_mask_root_for_openimages(masks, capsys):
    args = [a for a in _cli_args(masks, "OpenImages", "val")]
    args = args[: args.index("--mask-root")]
    assert cli.main(args) == 2
    assert "mask root is needed (--mask-root)" in capsys.readouterr().err


def _run_module(args, cwd, env_extra=None, timeout=120):
    env = {**os.environ, **(env_extra or {})}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-P", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_torchrun_two_cpu_ranks_give_the_one_process_numbers(boxes, tmp_path):
    """``torchrun --nproc_per_node=2 -m rethinkcam_fast evaluate`` on gloo: sharded, all-reduced, identical."""
    single = _evaluate(boxes, cam_curve_interval=0.01)
    state = str(tmp_path / "state.pt")
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rethinkcam_fast",
            *_cli_args(boxes), "--json", "--resume", state]
    done = _run_module(args, cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["world_size"] == 2 and result["num_images"] == 10
    assert result["MaxBoxAcc"] == {str(k): v for k, v in single.max_box_acc.items()}
    assert result["MaxBoxAccV2"] == single.max_box_acc_v2
    assert result["best_cam_threshold"] == {str(k): v for k, v in single.best_cam_threshold.items()}
    per_rank = [torch.load(f"{state}.rank{r}", weights_only=True)["processed"] for r in (0, 1)]
    assert per_rank == [5, 5]


def test_torchrun_a_failing_rank_stops_every_rank_with_its_error(small_split, tmp_path):
    os.remove(os.path.join(small_split["scoremap_root"], small_split["ids"][3] + ".npy"))  # rank 1's shard
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rethinkcam_fast",
            *_cli_args(small_split), "--json"]
    done = _run_module(args, cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"}, timeout=60)
    assert done.returncode != 0 and "{" not in done.stdout
    assert "img_0003.jpg' not found" in done.stderr and "failed on another rank" in done.stderr


def test_decimal_box_coordinates_and_undecodable_metadata(tmp_path):
    """Decimal coordinates (an extension: the reference's loader reads int()) are scaled by the
    reference's resize arithmetic (float(), then truncation); a file that is not UTF-8 is named."""
    root, split = _split(tmp_path, **{"localization.txt": "a.jpg,10.5,2,30.75,40.0\nb.jpg,0,0,10,10\n"})
    metadata = load_metadata(root, "CUB", "test")
    boxes, offsets = metadata.resized_boxes(["a.jpg"], (40, 50))
    want = [int(10.5 * 50 / 100), int(2 * 40 / 80), int(30.75 * 50 / 100), int(40.0 * 40 / 80)]
    assert boxes.tolist() == [want] and offsets.tolist() == [0, 1]
    with open(os.path.join(split, "image_ids.txt"), "wb") as fh:
        fh.write("a.jpg\n\u00e9.jpg\n".encode("latin-1"))
    with pytest.raises(MetadataError, match=r"image_ids\.txt: not UTF-8 text"):
        load_metadata(root, "CUB", "test")


def test_iou_thresholds_given_as_fractions_are_refused():
    from rethinkcam_fast.evaluation import BoxEvaluator

    with pytest.raises(ValueError, match=r"0\.5 looks like a fraction .* give 50 for IoU >= 0\.5"):
        BoxEvaluator(0.01, iou_thresholds=(0.5,))


def test_class_labels_are_needed_only_where_labels_are(tmp_path):
    root, _ = _split(tmp_path, **{"class_labels.txt": "a.jpg,0\n"})  # no label for b.jpg
    metadata = load_metadata(root, "CUB", "test")  # enough for the box metrics, which use no labels
    assert metadata.labels_of(["a.jpg"]).tolist() == [0]
    with pytest.raises(MetadataError, match=r"class_labels\.txt: no class label for image 'b\.jpg'"):
        metadata.labels_of(["a.jpg", "b.jpg"])
    from rethinkcam_fast.evaluation import WSOLImageDataset

    with pytest.raises(MetadataError, match=r"no class label for image 'b\.jpg'"):
        WSOLImageDataset(str(tmp_path), metadata, 32)  # (Top-1 Loc needs them all)


def test_cli_resume_folder_made_for_a_failed_run_is_removed(small_split, tmp_path, capsys):
    os.remove(os.path.join(small_split["scoremap_root"], small_split["ids"][2] + ".npy"))
    state = tmp_path / "new" / "state.pt"
    assert cli.main(_cli_args(small_split) + ["--resume", str(state)]) == 2
    assert "img_0002.jpg' not found" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_cli_threads_option(boxes, capsys, monkeypatch):
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    assert cli.main(_cli_args(boxes) + ["--threads", "1", "--json"]) == 0
    assert set_to == [1] and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_images"] == 10
    with pytest.raises(SystemExit):
        cli.main(_cli_args(boxes) + ["--threads", "0"])


def test_a_mask_root_on_a_box_split_is_named_as_unused(boxes, tmp_path):
    """The reference takes ``--mask_root`` for every dataset; on boxes it is unused, and said so."""
    plain = _evaluate(boxes, cam_curve_interval=0.01)
    with pytest.warns(UserWarning, match="mask_root .* is not used: .* has box annotations"):
        given = _evaluate(boxes, cam_curve_interval=0.01, mask_root=str(tmp_path))
    assert given == plain


def test_localization_of_another_dataset_is_read_as_utf8(tmp_path):
    """Datasets other than CUB/ILSVRC/OpenImages say boxes or masks by their localization.txt: read as
    UTF-8 like every other metadata file (not in the locale's encoding), and a file that is not UTF-8
    is named."""
    root, split = _split(tmp_path)
    os.rename(os.path.join(root, "CUB"), os.path.join(root, "Digits"))
    local = os.path.join(root, "Digits", "test", "localization.txt")
    with open(local, "a", encoding="utf-8") as fh:
        fh.write("caf\u00e9.jpg,1,1,2,2\n")
    from rethinkcam_fast.evaluation.metadata import detect_localization

    assert detect_localization(os.path.dirname(local)) == "boxes"
    with open(local, "wb") as fh:
        fh.write(b"\xff\xfebad,1,1,2,2\n")
    with pytest.raises(MetadataError, match=r"localization\.txt: not UTF-8 text"):
        load_metadata(root, "Digits", "test")


def test_cli_warnings_are_one_line_of_the_command(boxes, tmp_path):
    """The library's warnings, printed by a command, read as the command's own: one
    `rethinkcam: warning:` line, not Python's file:line and a source line from inside the package."""
    run = _run_module(["-m", "rethinkcam_fast", *_cli_args(boxes), "--mask-root", str(tmp_path)], cwd=tmp_path,
                      env_extra={"PYTHONWARNINGS": "default"})
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if "mask_root" in line]
    assert lines == [f"rethinkcam: warning: mask_root {str(tmp_path)!r} is not used: "
                     f"{os.path.join(boxes['metadata_root'], 'CUB', 'test')} has box annotations"], run.stderr
    assert "UserWarning" not in run.stderr and "warnings.warn" not in run.stderr


def test_cli_rate_of_a_resumed_run_counts_only_what_it_evaluated(boxes, tmp_path, capsys):
    """The table's title names the images taken from the state file, and the rate leaves them out
    (a resumed run that had nothing left to do is not thousands of images a second)."""
    state = str(tmp_path / "state.pt")
    assert cli.main(_cli_args(boxes) + ["--resume", state]) == 0
    first = capsys.readouterr().out
    assert "10 images," in first and "resumed" not in first
    assert cli.main(_cli_args(boxes) + ["--resume", state, "--json"]) == 0
    captured = capsys.readouterr()
    assert f"10 images (10 resumed from {state})" in captured.err and "(0 img/s)" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["resumed_images"] == 10
