"""Streaming localization: order, batching, sizes, files in and out, interruption, bad input."""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from _models import MiniResNet, SmallCNN, make
from conftest import requires_triton

from rethinkcam_fast import CAMEngine
from rethinkcam_fast.video import (
    DecodeReport,
    VideoLocalizer,
    VideoReadError,
    localize_video,
    prefetch,
    read_frames,
)

cv2 = pytest.importorskip("cv2")


def random_frames(count: int, height: int = 40, width: int = 52, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        frame = (rng.random((height, width, 3)) * 60).astype(np.uint8)
        y, x = rng.integers(0, height - 12), rng.integers(0, width - 12)
        frame[y : y + 12, x : x + 12] = 230  # a bright square the model may look at
        frames.append(frame)
    return frames


@pytest.fixture(scope="module")
def model():
    return make(SmallCNN, classes=4).eval()


def test_stream_matches_the_engine_frame_by_frame(model):
    frames = random_frames(7)
    localizer = VideoLocalizer(model, "gradcam", input_size=(32, 32), batch_size=3, keep_cams=True)
    results = list(localizer.stream(frames))
    assert [r.index for r in results] == list(range(7))
    engine = CAMEngine(model, "gradcam", output_size=(40, 52), box_convention="exact", warn_degenerate=False)
    batch = localizer.preprocess(torch.from_numpy(np.stack(frames)))
    expected = engine(batch)
    for k, r in enumerate(results):
        assert r.label == int(expected.labels[k])
        assert r.box == tuple(expected.boxes[k].tolist())
        assert torch.allclose(r.cam, expected.cams[k], atol=1e-5)  # batches of 3 vs one batch of 7
        x0, y0, x1, y1 = r.box
        assert 0 <= x0 <= x1 < 52 and 0 <= y0 <= y1 < 40


def test_box_convention_reaches_the_video_boxes(model, monkeypatch):
    """As the engine's (the video default: exact, inclusive extents, as the JSON lines give them)."""
    import rethinkcam_fast.video as video

    frames = random_frames(4)
    conventions = []
    real = video.boxes_from_packed
    monkeypatch.setattr(video, "boxes_from_packed", lambda *a: conventions.append(a[-1]) or real(*a))
    wsol = list(VideoLocalizer(model, "gradcam", input_size=(32, 32), batch_size=2, box_convention="wsol").stream(frames))
    list(VideoLocalizer(model, "gradcam", input_size=(32, 32), batch_size=4).stream(frames))
    assert conventions == ["wsol", "wsol", "exact"]
    batch = VideoLocalizer(model, input_size=(32, 32)).preprocess(torch.from_numpy(np.stack(frames)))
    expected = CAMEngine(model, "gradcam", output_size=(40, 52), box_convention="wsol", warn_degenerate=False)(batch)
    assert [r.box for r in wsol] == [tuple(b) for b in expected.boxes.tolist()]


def test_nchw_layout_gives_the_same_results(model):
    frames = random_frames(5)
    nhwc = VideoLocalizer(model, "gradcam", input_size=(32, 32), batch_size=2, keep_cams=True)
    nchw = VideoLocalizer(model, "gradcam", input_size=(32, 32), batch_size=2, keep_cams=True, channels_last=False)
    batch = torch.from_numpy(np.stack(frames))
    assert nhwc.preprocess(batch).is_contiguous(memory_format=torch.channels_last)
    assert nchw.preprocess(batch).is_contiguous() and not nchw.preprocess(batch).is_contiguous(
        memory_format=torch.channels_last)
    assert torch.equal(nhwc.preprocess(batch), nchw.preprocess(batch))  # the same values, another layout
    for a, b in zip(nhwc.stream(frames), nchw.stream(frames), strict=True):
        assert (a.index, a.label, a.box) == (b.index, b.label, b.box)
        assert torch.allclose(a.cam, b.cam, atol=1e-5)


@pytest.mark.parametrize("method,target", [("gradcam", None), ("gradcam++", "layer2"), ("cam", None)])
def test_folded_batch_norms_give_the_same_results(method, target):
    resnet = make(MiniResNet, classes=4)
    frames = random_frames(5)
    options = {"input_size": (40, 40), "batch_size": 2, "keep_cams": True}
    if target is not None:
        options["target_layers"] = target
    plain = VideoLocalizer(resnet, method, **options)
    folded = VideoLocalizer(resnet, method, fold_batchnorm=True, **options)
    results = list(zip(plain.stream(frames), folded.stream(frames), strict=True))
    # the folded engine runs a copy without batch norms; the caller's model keeps its 13
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.engine.model.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in resnet.modules()) == 13
    assert folded.engine.target_layers[0] is folded.engine.model.get_submodule(target or "layer3")
    for a, b in results:
        assert (a.index, a.label) == (b.index, b.label)
        assert abs(a.score - b.score) < 1e-4
        assert torch.allclose(a.cam, b.cam, atol=1e-4)
        assert max(abs(u - v) for u, v in zip(a.box, b.box)) <= 1  # a threshold level may move by rounding


def test_folding_holds_the_source_on_its_thread_and_explain_folds_too():
    """torch.fx patches nn.Module.__call__ process-wide while it traces: the stream's decode thread
    hands over the first frame, the stream folds on it, and only then does the source (which may run
    modules) go on. The source never runs on the caller's thread, so its thread-local state (here a
    no_grad block around its yields) stays its own."""
    import threading

    resnet = make(MiniResNet, classes=4)
    localizer = VideoLocalizer(resnet, "gradcam", input_size=(40, 40), batch_size=2, fold_batchnorm=True)
    log = []

    def source():
        with torch.no_grad():
            for frame in random_frames(3):
                folded = not any(isinstance(m, torch.nn.BatchNorm2d) for m in localizer.engine.model.modules())
                log.append((threading.current_thread() is threading.main_thread(), folded))
                yield frame

    assert len(list(localizer.stream(source()))) == 3
    assert log == [(False, False), (False, True), (False, True)]
    assert torch.is_grad_enabled()
    assert list(localizer.stream([])) == []
    direct = VideoLocalizer(resnet, "gradcam", input_size=(40, 40), fold_batchnorm=True)
    direct.explain(torch.from_numpy(np.stack(random_frames(2))))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in direct.engine.model.modules())


def test_streams_on_several_threads_share_one_localizer_and_fold_it_once(monkeypatch):
    """Two threads stream through one folding localizer: the fold runs once (under the localizer's
    lock, while the other thread waits or goes on with the unfolded engine), and each thread gets the
    frames' results in its own order, equal to a single-threaded run."""
    import rethinkcam_fast.video as video

    resnet = make(MiniResNet, classes=4)
    frames = [random_frames(4, seed=s) for s in (1, 2)]
    single = VideoLocalizer(resnet, "gradcam", input_size=(40, 40), batch_size=2)
    want = [[(r.index, r.label, r.box) for r in single.stream(f)] for f in frames]
    shared = VideoLocalizer(resnet, "gradcam", input_size=(40, 40), batch_size=2, fold_batchnorm=True)
    folds, fold = [], video.fold_batchnorm
    start = threading.Barrier(2)

    def counted(*args, **kwargs):
        folds.append(threading.get_ident())
        time.sleep(0.05)  # (the other thread reaches its fold meanwhile)
        return fold(*args, **kwargs)

    monkeypatch.setattr(video, "fold_batchnorm", counted)
    got, errors = [None, None], []

    def run(k):
        try:
            start.wait()
            got[k] = [(r.index, r.label, r.box) for r in shared.stream(frames[k])]
        except BaseException as exc:  # (reported below, not lost in the thread)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(folds) == 1
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in shared.engine.model.modules())
    for a, b in zip(got, want):
        assert [(i, l) for i, l, _ in a] == [(i, l) for i, l, _ in b]
        assert all(max(abs(u - v) for u, v in zip(x[2], y[2])) <= 1 for x, y in zip(a, b))


def test_fold_batchnorm_with_fullycam_defaults_warns_and_runs_unfolded():
    resnet = make(MiniResNet, classes=4)
    with pytest.warns(UserWarning, match="does nothing for method='fullycam'"):
        localizer = VideoLocalizer(resnet, "fullycam", input_size=(40, 40), fold_batchnorm=True)
    assert len(list(localizer.stream(random_frames(2)))) == 2
    assert localizer.engine.model is resnet


def test_fold_batchnorm_on_an_untraceable_model_says_so():
    class Branchy(SmallCNN):
        def forward(self, x):
            if x.mean() > 10:  # data-dependent: torch.fx cannot trace it
                x = x * 0
            return super().forward(x)

    localizer = VideoLocalizer(make(Branchy, classes=4), "gradcam", input_size=(32, 32), batch_size=2,
                               fold_batchnorm=True)
    with pytest.raises(ValueError, match="cannot trace"):
        list(localizer.stream(random_frames(2)))
    with pytest.raises(ValueError, match="cannot trace"):  # not silently unfolded on a second try
        list(localizer.stream(random_frames(2)))


def test_frames_of_another_size_mid_stream_start_a_new_batch(model):
    frames = random_frames(3) + random_frames(2, 30, 24, seed=1) + random_frames(2, seed=2)
    results = list(VideoLocalizer(model, "cam", input_size=(32, 32), batch_size=4).stream(frames))
    assert [r.index for r in results] == list(range(7))
    for r, frame in zip(results, frames):
        x0, y0, x1, y1 = r.box
        assert x1 < frame.shape[1] and y1 < frame.shape[0]  # boxes in each frame's own pixels


def test_latency_is_bounded_by_the_batch(model):
    pulled = []

    def source():
        for k, frame in enumerate(random_frames(12)):
            pulled.append(k)
            yield frame

    localizer = VideoLocalizer(model, "cam", input_size=(32, 32), batch_size=2, prefetch_frames=1,
                               overlap_batches=False)
    for r in localizer.stream(source()):
        # a result waits for at most batch_size - 1 later frames (+ the decode queue's look-ahead)
        assert len(pulled) - 1 - r.index <= 2 - 1 + 2
    pulled.clear()
    overlapped = VideoLocalizer(model, "cam", input_size=(32, 32), batch_size=2, prefetch_frames=1,
                                overlap_batches=True)
    for r in overlapped.stream(source()):
        # overlapping batches: one more batch at most
        assert len(pulled) - 1 - r.index <= 2 * 2 - 1 + 2


def test_overlapped_batches_submit_the_next_batch_before_collecting_and_keep_the_order(model, monkeypatch):
    """With a source faster than the device, batch k + 1 is on the device before batch k's results
    are collected; results, order and boxes are those of the sequential stream."""
    frames = random_frames(9)
    sequential = list(VideoLocalizer(model, "gradcam", input_size=(32, 32), batch_size=2,
                                     overlap_batches=False).stream(frames))
    localizer = VideoLocalizer(model, "gradcam", input_size=(32, 32), batch_size=2, overlap_batches=True)
    assert not VideoLocalizer(model, "cam").overlap_batches  # the default: on CUDA only
    events = []
    submit, collect = localizer._submit, localizer._collect
    monkeypatch.setattr(localizer, "_submit", lambda first, batch, t: events.append(("submit", first)) or submit(first, batch, t))
    monkeypatch.setattr(localizer, "_collect", lambda job: events.append(("collect", job.first_index)) or collect(job))

    def eager_source():  # every frame already decoded: no NOT_READY pause
        yield from frames

    import rethinkcam_fast.video as video

    monkeypatch.setattr(video, "prefetch", lambda items, depth, poll=False, idle=None, gate=None: iter(items))
    results = list(localizer.stream(eager_source()))
    assert [(r.index, r.label, r.box, r.score) for r in results] == [(r.index, r.label, r.box, r.score) for r in sequential]
    assert events[:5] == [("submit", 0), ("submit", 2), ("collect", 0), ("submit", 4), ("collect", 2)]
    assert events[-2:] == [("collect", 6), ("collect", 8)]


def test_an_error_while_results_are_handed_out_never_repeats_a_frame(model, monkeypatch):
    """Overlapping batches: when collecting a batch fails (once), the stream stops with the error and
    never hands out a frame twice or out of order (a submitted batch is never submitted again)."""
    localizer = VideoLocalizer(model, "cam", input_size=(32, 32), batch_size=2, overlap_batches=True)
    collect, failed = localizer._collect, []

    def flaky(job):
        if job.first_index == 0 and not failed:
            failed.append(True)
            raise RuntimeError("cutting the boxes failed")
        return collect(job)

    monkeypatch.setattr(localizer, "_collect", flaky)
    import rethinkcam_fast.video as video

    monkeypatch.setattr(video, "prefetch", lambda items, depth, poll=False, idle=None, gate=None: iter(items))
    seen = []
    with pytest.raises(RuntimeError, match="cutting the boxes failed"):
        for result in localizer.stream(random_frames(6)):
            seen.append(result.index)
    assert seen == sorted(set(seen)), seen


def test_a_slow_source_gets_its_results_without_waiting_for_the_next_batch(model):
    """A live source (frames arriving slower than the device works): overlapping batches must not
    hold a finished batch until the next one is complete."""
    import threading

    release = threading.Event()
    frames = random_frames(4)

    def live():
        yield frames[0]
        yield frames[1]
        release.wait()  # the camera is slow: the next frame comes only when the test says so
        yield frames[2]
        yield frames[3]

    localizer = VideoLocalizer(model, "cam", input_size=(32, 32), batch_size=2, overlap_batches=True)
    stream = localizer.stream(live())
    first = []
    consumer = threading.Thread(target=lambda: first.extend([next(stream), next(stream)]), daemon=True)
    consumer.start()
    consumer.join(timeout=20)  # batch 0's results must come while frame 2 has not arrived
    got_them_early = not consumer.is_alive()
    release.set()
    consumer.join()
    assert got_them_early and [r.index for r in first] == [0, 1]
    assert [r.index for r in stream] == [2, 3]


def test_tensor_frames_and_bf16(model):
    frames = [torch.rand(3, 20, 20), torch.randint(0, 256, (20, 20, 3), dtype=torch.uint8)]
    results = list(VideoLocalizer(model, "cam", input_size=None, mean=None, std=None, bf16=True).stream(frames))
    assert len(results) == 2 and all(isinstance(r.score, float) for r in results)


def write_video(path: str, frames: list[np.ndarray], fps: float = 10.0) -> None:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame[:, :, ::-1].copy())
    writer.release()


def test_file_in_video_and_jsonl_out(model, tmp_path):
    source = str(tmp_path / "in.mp4")
    write_video(source, random_frames(9, 48, 64))
    out_video, out_jsonl = str(tmp_path / "out.mp4"), str(tmp_path / "boxes.jsonl")
    localizer = VideoLocalizer(model, "cam", input_size=(32, 32), batch_size=4, keep_cams=True)
    report = localize_video(localizer, source, out_video=out_video, out_jsonl=out_jsonl)
    assert report.frames_read == 9 and report.frames_processed == 9 and not report.truncated
    lines = [json.loads(line) for line in open(out_jsonl, encoding="utf-8")]
    assert [line["frame"] for line in lines] == list(range(9))
    assert all(set(line) == {"frame", "label", "score", "box"} and len(line["box"]) == 4 for line in lines)
    assert len(list(read_frames(out_video))) == 9  # the annotated video plays back
    assert not [name for name in os.listdir(tmp_path) if "partial" in name]


def test_outputs_into_a_pipe_and_through_symlinks_leave_them_as_they_are(model, tmp_path):
    """JSON lines into a named pipe (``>(jq ...)``, a device) are written into it, not replaced by a
    file; a symlinked output keeps its link and its file gets the result; a checkpoint or a video
    refuses a pipe (they are written by replacing a file)."""
    localizer = VideoLocalizer(model, "cam", input_size=(32, 32), batch_size=4, keep_cams=True)
    pipe = str(tmp_path / "lines.jsonl")
    os.mkfifo(pipe)
    received = []
    reader = threading.Thread(target=lambda: received.extend(open(pipe, encoding="utf-8").read().splitlines()),
                              daemon=True)  # (a writer that never opens the pipe must not hang the tests)
    reader.start()
    localize_video(localizer, random_frames(5), out_jsonl=pipe)
    reader.join(timeout=30)
    assert [json.loads(line)["frame"] for line in received] == list(range(5))
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)
    (tmp_path / "real.jsonl").write_text("old\n")
    (tmp_path / "real.mp4").write_bytes(b"old")
    os.symlink("real.jsonl", tmp_path / "link.jsonl")
    os.symlink("real.mp4", tmp_path / "link.mp4")
    localize_video(localizer, random_frames(5), out_video=str(tmp_path / "link.mp4"),
                   out_jsonl=str(tmp_path / "link.jsonl"))
    assert os.path.islink(tmp_path / "link.jsonl") and os.path.islink(tmp_path / "link.mp4")
    assert len((tmp_path / "real.jsonl").read_text().splitlines()) == 5
    assert len(list(read_frames(str(tmp_path / "real.mp4")))) == 5
    with pytest.raises(ValueError, match="out_video .* is a device, pipe or socket, not a file"):
        localize_video(localizer, random_frames(1), out_video=pipe)
    from rethinkcam_fast.models import DigitsCAMNet, save_checkpoint

    with pytest.raises(ValueError, match="checkpoint .* is a device, pipe or socket, not a file"):
        save_checkpoint(pipe, DigitsCAMNet("tap", widths=(4, 4, 4)))
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)
    # a descriptor path (as /dev/stdout redirected with >> to a log): appended to, the log kept
    log = tmp_path / "run.log"
    log.write_text("EARLIER LOG LINE\n")
    with open(log, "a") as handle:
        inode = os.stat(log).st_ino
        localize_video(localizer, random_frames(3), out_jsonl=f"/proc/self/fd/{handle.fileno()}")
    lines = log.read_text().splitlines()
    assert lines[0] == "EARLIER LOG LINE" and len(lines) == 4 and os.stat(log).st_ino == inode
    # the same file through a symlink; a dangling link into a missing folder: refused before any frame
    os.symlink("both.mp4", tmp_path / "to_video.jsonl")
    with pytest.raises(ValueError, match="same file"):
        localize_video(localizer, random_frames(1), out_video=str(tmp_path / "both.mp4"),
                       out_jsonl=str(tmp_path / "to_video.jsonl"))
    os.symlink("missing/real.jsonl", tmp_path / "dangling.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        localize_video(localizer, random_frames(1), out_jsonl=str(tmp_path / "dangling.jsonl"))


def test_a_long_stream_holds_a_bounded_number_of_frames(model, tmp_path):
    """Memory stays bounded on long inputs: with a video being written (raw frames kept for the
    overlay until their result, maps kept per frame), the frames pulled from the source but not yet
    written never exceed the decode queue plus two batches, and the memory numpy holds (the frames'
    copies, traced by tracemalloc) does not grow from frame 100 to frame 400 (a frame is 9 KB)."""
    import tracemalloc

    frame = random_frames(1, 48, 64)[0]
    pulled, written, most_in_flight, traced = 0, 0, 0, {}

    def source():
        nonlocal pulled
        for _ in range(400):
            pulled += 1
            yield frame.copy()

    def on_frame(_result):
        nonlocal written, most_in_flight
        written += 1
        most_in_flight = max(most_in_flight, pulled - written)
        if written in (100, 400):
            traced[written] = tracemalloc.get_traced_memory()[0]

    localizer = VideoLocalizer(model, "cam", input_size=(16, 16), batch_size=4, keep_cams=True, prefetch_frames=8,
                               overlap_batches=True)
    tracemalloc.start()
    try:
        report = localize_video(localizer, source(), out_video=str(tmp_path / "long.mp4"), on_frame=on_frame)
    finally:
        tracemalloc.stop()
    assert report.frames_processed == written == 400
    assert most_in_flight <= 8 + 2 * 4 + 1
    assert traced[400] - traced[100] < 300 * frame.nbytes // 4  # a frame kept per result would add 300 frames


def test_interrupted_run_keeps_what_it_finished(model, tmp_path):
    """Ctrl-C (a camera's only way to stop) keeps the frames done: a closed, playable video and complete
    JSON lines, under their own names; interrupted before any frame, it leaves nothing."""
    cv2 = pytest.importorskip("cv2")
    out_video, out_jsonl = str(tmp_path / "out.mp4"), str(tmp_path / "boxes.jsonl")
    localizer = VideoLocalizer(model, "cam", input_size=(32, 32), batch_size=2, keep_cams=True)

    def stop_after_four(result):
        if result.index == 3:
            raise KeyboardInterrupt

    report = DecodeReport()
    with pytest.raises(KeyboardInterrupt):
        localize_video(localizer, random_frames(10), out_video=out_video, out_jsonl=out_jsonl,
                       on_frame=stop_after_four, report=report)
    assert report.interrupted and report.frames_processed == 4
    assert sorted(os.listdir(tmp_path)) == ["boxes.jsonl", "out.mp4"] and report.written == [out_video, out_jsonl]
    lines = open(out_jsonl).read().splitlines()
    assert [json.loads(line)["frame"] for line in lines] == [0, 1, 2, 3]
    capture = cv2.VideoCapture(out_video)
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    capture.release()

    # A second Ctrl-C while the first one's outputs are being closed: they stay, as *.partial files.
    twice = tmp_path / "twice"
    twice.mkdir()

    def interrupted_rename(*args):
        raise KeyboardInterrupt

    report = DecodeReport()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", interrupted_rename)
        with pytest.raises(KeyboardInterrupt):
            localize_video(localizer, random_frames(10), out_video=str(twice / "out.mp4"),
                           out_jsonl=str(twice / "b.jsonl"), on_frame=stop_after_four, report=report)
    assert sorted(os.listdir(twice)) == ["b.jsonl.partial", "out.partial.mp4"]
    assert sorted(report.written) == sorted(str(twice / name) for name in os.listdir(twice))

    def interrupted_source():
        raise KeyboardInterrupt
        yield

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KeyboardInterrupt):
        localize_video(localizer, interrupted_source(), out_video=str(empty / "out.mp4"),
                       out_jsonl=str(empty / "b.jsonl"))
    assert os.listdir(empty) == []


def test_unreadable_and_truncated_sources(tmp_path, model):
    with pytest.raises(VideoReadError, match="not found"):
        list(read_frames(str(tmp_path / "missing.mp4")))
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 100)
    with pytest.raises(VideoReadError):
        list(read_frames(str(garbage)))
    source = tmp_path / "whole.mp4"
    write_video(str(source), random_frames(30, 48, 64))
    data = source.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 2 // 3])
    # A broken-off file either cannot be opened (clear error) or stops at its last good frame.
    try:
        report = localize_video(VideoLocalizer(model, "cam", input_size=(32, 32)), str(cut))
    except VideoReadError as exc:
        assert "cut.mp4" in str(exc)
    else:
        assert report.frames_processed == report.frames_read <= 30


def test_prefetch_passes_producer_errors_on():
    def broken():
        yield 1
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetch(broken(), depth=2):
            got.append(item)
    assert got == [1]


def test_bad_input_raises_clear_errors(model):
    localizer = VideoLocalizer(model, "cam", input_size=(32, 32))
    with pytest.raises(ValueError, match="frame 1"):
        list(localizer.stream([random_frames(1)[0], np.zeros((4, 4, 3, 2), np.uint8)]))
    with pytest.raises(TypeError, match="frame 0"):
        list(localizer.stream(["not a frame"]))
    with pytest.raises(ValueError, match="batch_size"):
        VideoLocalizer(model, batch_size=0)
    with pytest.raises(ValueError, match="mean and std"):
        VideoLocalizer(model, mean=(0.5, 0.5, 0.5), std=None)
    with pytest.raises(ValueError, match="keep_cams"):
        localize_video(localizer, random_frames(1), out_video="never.mp4")
    for size, error in ((64.0, TypeError), ((32,), TypeError), ((0, 3), ValueError), ((-5, -5), ValueError)):
        with pytest.raises(error, match="input_size"):
            VideoLocalizer(model, input_size=size)
    assert VideoLocalizer(model, input_size=48).input_size == (48, 48)
    for option in ({"boxes": True}, {"output_size": (4, 4)}):  # the video path's own: never silently dropped
        with pytest.raises(TypeError, match=f"sets {next(iter(option))}= itself"):
            VideoLocalizer(model, **option)
    with pytest.raises(ValueError, match="box_convention must be one of"):
        VideoLocalizer(model, box_convention="bogus")
    for bad in ("90", True):  # as CAMEngine refuses them (float() took both)
        with pytest.raises(TypeError, match=f"pas_q={bad!r}.*q must be a real number"):
            VideoLocalizer(model, pas_q=bad)
    with pytest.raises(ValueError, match=r"pas_theta=1.5.*theta must lie in \[0, 1\]"):
        VideoLocalizer(model, pas_theta=1.5)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda'"):
            VideoLocalizer(model, device="cuda")
    with pytest.raises(ValueError, match=r"frame 0: a float frame holds values in \[0, 1\].*pass it as uint8"):
        list(localizer.stream([torch.rand(3, 8, 8) * 255]))
    with pytest.raises(ValueError, match="frame 1: a float frame"):
        list(localizer.stream([torch.rand(3, 8, 8), torch.full((3, 8, 8), float("nan"))]))
    with pytest.raises(FileNotFoundError, match="out_jsonl .* the folder .* does not exist"):
        localize_video(localizer, random_frames(1), out_jsonl="/no/such/folder/x.jsonl")


def test_cuda_graph_needs_cuda(model):
    with pytest.raises(ValueError, match="CUDA device"):
        VideoLocalizer(model, cuda_graph=True, device="cpu")
    with pytest.raises(ValueError, match="warn_degenerate=True .* CUDA graph"):
        VideoLocalizer(model, cuda_graph=True, device="cpu", warn_degenerate=True)


def test_bf16_explain_keeps_no_cast_cache_past_the_call(model):
    """Under a caller's enclosing autocast, explain's bf16 weight copies must not be cached beyond the
    call (a captured graph would read them after the enclosing block frees them): every call casts
    the weights again."""
    from torch.utils._python_dispatch import TorchDispatchMode

    localizer = VideoLocalizer(model, "cam", input_size=(32, 32), mean=None, std=None, bf16=True)
    batch = torch.from_numpy(np.stack(random_frames(2, 40, 40)))
    weights = {p.data_ptr() for p in model.parameters()}

    class WeightCasts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in weights:
                WeightCasts.count += 1
            return func(*args, **(kwargs or {}))

    per_call = []
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's block: a cache would live until its end
        for _ in range(2):
            before = WeightCasts.count
            with WeightCasts():
                localizer.explain(batch)
            per_call.append(WeightCasts.count - before)
    assert per_call[0] > 0 and per_call[1] == per_call[0], per_call


@requires_triton
@pytest.mark.parametrize("method", ["cam", "gradcam", "layercam", "fullycam"])
def test_explain_is_capturable_no_host_copies_or_syncs_after_warmup(model, monkeypatch, method):
    """What the CUDA-graph path captures (explain: preprocess, engine, PaS thresholds) must not copy
    host data to the device or read device data on the host once warmed up: either is illegal while
    a stream captures. On the CPU, with the Triton kernels (interpreted) that a GPU would launch,
    every tensor-from-host constructor and host read made by our own code is recorded."""
    localizer = VideoLocalizer(model, method, input_size=(32, 32), mean=None, std=None, backend="triton")
    batch = torch.from_numpy(np.stack(random_frames(2, 48, 64)))
    localizer.explain(batch)  # the warm-up before a capture (fills the launchers' cached tables)
    calls = []

    def spy(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("rethinkcam_fast"):
                calls.append(f"{caller}: {name}")
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    for name in ("tensor", "as_tensor", "from_numpy"):
        spy(torch, name)
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero"):
        spy(torch.Tensor, name)
    localizer.explain(batch, None)
    localizer.explain(batch, 1)
    localizer._explain_packed(batch, None)  # what the graph path captures: explain, then the packing
    monkeypatch.undo()
    assert not calls, calls


def test_packed_results_round_trip_and_give_the_boxes_of_the_maps():
    """One buffer carries a batch's labels, scores, PaS thresholds and uint8 levels to the host; the
    boxes cut from it are boxes_from_cams' boxes of the maps."""
    from rethinkcam_fast import boxes_from_cams, percentile_threshold
    from rethinkcam_fast.ops.boxes import largest_boxes_from_levels
    from rethinkcam_fast.ops.boxes import boxes_from_packed, pack_results, packed_to_host, unpack_results

    gen = torch.Generator().manual_seed(3)
    cams = torch.rand((3, 17, 23), generator=gen) ** 3
    cams[1] = 0  # an empty map: box (0, 0, 0, 0)
    labels = torch.tensor([4, 0, 2**40])
    scores = torch.tensor([1.5, -2.25, 3e-8], dtype=torch.bfloat16)
    thresholds = percentile_threshold(cams)
    packed = pack_results(labels, scores, thresholds, cams)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    got_labels, got_scores, got_thresholds, levels = unpack_results(packed.clone(), 3, 17, 23)
    assert got_labels.tolist() == labels.tolist() and got_thresholds.tolist() == thresholds.tolist()
    assert got_scores.tolist() == scores.float().tolist()
    assert torch.equal(levels, (cams * 255).to(torch.uint8))
    for convention in ("exact", "wsol"):
        assert torch.equal(largest_boxes_from_levels(levels, got_thresholds, convention),
                           boxes_from_cams(cams, thresholds, "largest", convention))
    assert largest_boxes_from_levels(levels, got_thresholds)[1].tolist() == [0, 0, 0, 0]
    host, done = packed_to_host(packed)  # off CUDA: the buffer itself, nothing to wait for
    assert done is None and torch.equal(host, packed)
    unpacked = boxes_from_packed(host, done, (3, 17, 23), "exact")
    assert [t.tolist() for t in unpacked[:3]] == [labels.tolist(), scores.float().tolist(), thresholds.tolist()]
    assert torch.equal(unpacked[3], boxes_from_cams(cams, thresholds, "largest", "exact"))
    with pytest.raises(ValueError, match="packed batch of 3 maps of 17x22"):
        unpack_results(packed, 3, 17, 22)
    with pytest.raises(TypeError, match="CPU uint8 tensor"):
        largest_boxes_from_levels(cams, thresholds)
    with pytest.raises(ValueError, match=r"uint8 levels in \[0, 255\]"):
        largest_boxes_from_levels(levels, torch.tensor([0, 256, 3]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["cam", "gradcam", "fullycam"])
def test_cuda_graph_replay_equals_eager(method):
    model = make(SmallCNN, classes=4).cuda().eval()
    frames = random_frames(12, 48, 64)
    eager = list(VideoLocalizer(model, method, input_size=(32, 32), batch_size=4).stream(frames))
    for channels_last in (True, False):
        graphed = VideoLocalizer(model, method, input_size=(32, 32), batch_size=4, cuda_graph=True,
                                 channels_last=channels_last)
        replayed = list(graphed.stream(frames))
        assert len(graphed._graphs) == 1  # one capture, replayed for the three batches
        assert [(r.label, r.box) for r in replayed] == [(r.label, r.box) for r in eager]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_graph_replay_of_the_folded_model(bf16):
    """`--fold-bn` with `--cuda-graph`: the capture records the folded copy (folded before it)."""
    model = make(MiniResNet, classes=4).cuda().eval().to(memory_format=torch.channels_last)
    frames = random_frames(12, 48, 64)
    options = {"input_size": (40, 40), "batch_size": 4, "keep_cams": True, "bf16": bf16}
    eager = list(VideoLocalizer(model, "gradcam", **options).stream(frames))
    graphed = VideoLocalizer(model, "gradcam", cuda_graph=True, fold_batchnorm=True, **options)
    replayed = list(graphed.stream(frames))
    assert len(graphed._graphs) == 1
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in graphed.engine.model.modules())
    for a, b in zip(eager, replayed, strict=True):
        assert a.label == b.label
        assert torch.allclose(a.cam, b.cam, atol=0.05 if bf16 else 1e-3)


def test_moving_digit_clip_is_deterministic_with_exact_boxes():
    from rethinkcam_fast.datasets import moving_digit_clip

    frames, label, boxes = moving_digit_clip(30, seed=4)
    again = moving_digit_clip(30, seed=4)
    assert np.array_equal(frames, again[0]) and label == again[1] and np.array_equal(boxes, again[2])
    assert frames.shape == (30, 64, 64) and 0 <= label < 10
    assert len({tuple(b) for b in boxes.tolist()}) > 10  # it moves
    for frame, (x0, y0, x1, y1) in zip(frames, boxes):
        assert 0 <= x0 <= x1 < 64 and 0 <= y0 <= y1 < 64 and frame[y0 : y1 + 1, x0 : x1 + 1].max() > 0
    with pytest.raises(ValueError, match="num_frames"):
        moving_digit_clip(0)


def test_cli_video_demo_writes_video_and_jsonl(tmp_path, capsys):
    from rethinkcam_fast import cli

    out, jsonl = tmp_path / "demo.mp4", tmp_path / "demo.jsonl"
    assert cli.main(["video", "--demo", "--frames", "12", "--batch", "4", "--quiet", "--out", str(out),
                     "--jsonl", str(jsonl)]) == 0
    printed = capsys.readouterr().out
    assert "12 frames" in printed and "mean IoU" in printed
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [line["frame"] for line in lines] == list(range(12))
    assert len(list(read_frames(str(out)))) == 12
    nchw = tmp_path / "nchw.jsonl"  # the other layout: the same labels and boxes
    assert cli.main(["video", "--demo", "--frames", "12", "--batch", "4", "--quiet", "--nchw", "--jsonl", str(nchw)]) == 0
    assert [(x["label"], x["box"]) for x in map(json.loads, nchw.read_text().splitlines())] == \
        [(x["label"], x["box"]) for x in lines]


def test_cli_video_bad_arguments(tmp_path, capsys):
    from rethinkcam_fast import cli

    assert cli.main(["video", "--jsonl", str(tmp_path / "x.jsonl")]) == 2
    assert "INPUT" in capsys.readouterr().err
    assert cli.main(["video", "clip.mp4", "--jsonl", str(tmp_path / "x.jsonl")]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert cli.main(["video", "--demo"]) == 2
    assert "nothing to write" in capsys.readouterr().err
    assert cli.main(["video", "clip.mp4", "--model", "no_such_module:factory", "--jsonl", str(tmp_path / "x.jsonl")]) == 2
    assert "cannot import" in capsys.readouterr().err
    missing = str(tmp_path / "missing.mp4")
    assert cli.main(["video", missing, "--model", "rethinkcam_fast.models:digits_cam_net", "--jsonl",
                     str(tmp_path / "x.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
    assert cli.main(["video", "9" * 20, "--model", "rethinkcam_fast.models:digits_cam_net", "--jsonl",
                     str(tmp_path / "x.jsonl")]) == 2  # a camera index no C long holds
    assert "too large for a camera index" in capsys.readouterr().err


def test_frame_json_has_no_bare_nan():
    import json

    from rethinkcam_fast.video import FrameResult

    line = json.dumps(FrameResult(index=3, label=1, score=float("nan"), box=(0, 0, 0, 0)).as_json(), allow_nan=False)
    assert json.loads(line) == {"frame": 3, "label": 1, "score": None, "box": [0, 0, 0, 0]}


def test_frames_received_before_a_source_error_are_still_localized(model):
    frames = random_frames(5)

    def broken():
        yield from frames
        raise OSError("camera unplugged")

    localizer = VideoLocalizer(model, "cam", input_size=(32, 32), batch_size=3)
    got = []
    with pytest.raises(OSError, match="camera unplugged"):
        for result in localizer.stream(broken()):
            got.append(result)
    assert [r.index for r in got] == [0, 1, 2, 3, 4]  # the unfinished batch (3, 4) too
    expected = list(VideoLocalizer(model, "cam", input_size=(32, 32), batch_size=3).stream(frames))
    assert [(r.label, r.box) for r in got] == [(r.label, r.box) for r in expected]


def test_an_empty_source_writes_nothing_and_says_so(model, tmp_path):
    localizer = VideoLocalizer(model, "cam", input_size=(32, 32), keep_cams=True)
    out, jsonl = tmp_path / "v.mp4", tmp_path / "v.jsonl"
    with pytest.raises(VideoReadError, match="no frames"):
        localize_video(localizer, [], out_video=str(out), out_jsonl=str(jsonl))
    assert not any(tmp_path.iterdir())


def test_every_frame_form_becomes_the_same_rgb_frame():
    from rethinkcam_fast.video import _as_hwc_uint8

    grey = torch.randint(0, 256, (20, 30), dtype=torch.uint8)
    rgb = grey[:, :, None].expand(-1, -1, 3)
    forms = [grey, grey.numpy(), grey[:, :, None], rgb.numpy(), torch.cat([rgb, torch.full((20, 30, 1), 7, dtype=torch.uint8)], 2),
             grey.float() / 255, (grey.float() / 255)[None], (rgb.float() / 255).permute(2, 0, 1),
             rgb.permute(2, 0, 1), grey[None], (grey.float() / 255).requires_grad_()]  # uint8 CHW: read_image's
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a frame that requires grad: no autograd warning)
        for k, form in enumerate(forms):
            assert torch.equal(_as_hwc_uint8(form, k), rgb), k
    for bad in (torch.rand(2, 20, 30), torch.rand(20, 30, 3), torch.zeros(20, 30, 2, dtype=torch.uint8),
                torch.zeros(2, 3, 4, 5)):
        with pytest.raises(ValueError, match="frame 9"):
            _as_hwc_uint8(bad, 9)


def test_a_frame_feeds_the_model_as_localize_feeds_an_image(model):
    """Same resize (bilinear with antialias) and normalisation as `rethinkcam localize`."""
    from rethinkcam_fast.localize import preprocess

    frame = torch.from_numpy(random_frames(1, 96, 80, seed=4)[0])
    localizer = VideoLocalizer(model, "cam", input_size=(32, 32))
    got = localizer.preprocess(frame[None])
    want = preprocess(frame.permute(2, 0, 1), 32, normalize=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_stalled_source_neither_holds_a_partial_batch_nor_hangs_the_exit(model):
    """A live source that stops delivering (a frozen camera): after max_wait seconds the frames
    already received go out as a partial batch, and leaving the stream returns promptly although the
    source is still stuck inside next()."""
    resume = threading.Event()
    frames = random_frames(3)

    def stalling():
        yield from frames
        resume.wait(20)  # the camera hangs
        yield from frames

    localizer = VideoLocalizer(model, "cam", input_size=(32, 32), batch_size=8, max_wait=0.05)
    start, arrived = time.monotonic(), []
    try:
        for result in localizer.stream(stalling()):
            arrived.append((result.index, time.monotonic() - start))
            if result.index == 2:
                break
        left = time.monotonic() - start
    finally:
        resume.set()
    assert [i for i, _ in arrived] == [0, 1, 2] and arrived[-1][1] < 10
    assert left < 10  # (the consumer waits for the producer at most a second)
    with pytest.raises(ValueError, match="max_wait"):
        VideoLocalizer(model, "cam", max_wait=0)


def test_stream_argument_errors(model):
    localizer = VideoLocalizer(model, "cam", input_size=(32, 32))
    with pytest.raises(TypeError, match="read_frames"):
        next(localizer.stream("clip.mp4"))
    with pytest.raises(TypeError, match="one class index for every frame"):
        next(localizer.stream(random_frames(2), targets=[0, 1]))
    assert next(localizer.stream(random_frames(2), targets=torch.tensor(1))).label == 1


def test_localize_video_limits_pads_and_writes_json_to_stdout(model, tmp_path, capsys):
    """max_frames stops a source early; odd-sized frames are padded to even sizes (not cropped by the
    encoder); out_jsonl="-" writes the lines to standard output; one file for both is refused."""
    cv2 = pytest.importorskip("cv2")
    localizer = VideoLocalizer(model, "cam", input_size=(32, 32), batch_size=2, keep_cams=True)
    out = tmp_path / "odd.mp4"
    report = localize_video(localizer, random_frames(9, height=41, width=53), out_video=str(out), out_jsonl="-",
                            max_frames=5)
    assert report.frames_processed == 5
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["frame"] for line in lines] == [0, 1, 2, 3, 4]
    capture = cv2.VideoCapture(str(out))
    ok, first = capture.read()
    assert ok and first.shape[:2] == (42, 54) and int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 5
    capture.release()
    with pytest.raises(ValueError, match="same file"):
        localize_video(localizer, random_frames(2), out_video=str(tmp_path / "a.mp4"), out_jsonl=str(tmp_path / "a.mp4"))


def test_read_frames_sources_and_messages(tmp_path):
    pytest.importorskip("cv2")
    path = tmp_path / "clip.mp4"
    write_video(str(path), random_frames(4))
    assert len(list(read_frames(path))) == 4  # a Path
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # the index comes last: lost
    with pytest.raises(VideoReadError, match="incomplete file"):
        list(read_frames(str(cut)))
    with pytest.raises(VideoReadError, match="is a directory"):
        list(read_frames(str(tmp_path)))
    with pytest.raises(TypeError, match="path, a URL or a camera index"):
        list(read_frames(1.5))


def test_cli_video_file_options(tmp_path, capsys):
    """--frames stops a file early; --jsonl - prints the lines (the summary goes to stderr); --no-nwc;
    a file named like a camera index is read as the file; bad --out names fail before any work."""
    pytest.importorskip("cv2")
    from rethinkcam_fast import cli

    clip = tmp_path / "0"  # a file named like camera 0
    write_video(str(tmp_path / "clip.mp4"), random_frames(6))
    os.rename(tmp_path / "clip.mp4", clip)
    model = "rethinkcam_fast.models:digits_cam_net"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert cli.main(["video", "0", "--model", model, "--method", "cam", "--frames", "4", "--quiet",
                         "--jsonl", "-"]) == 0
        captured = capsys.readouterr()
        assert [json.loads(line)["frame"] for line in captured.out.splitlines()] == [0, 1, 2, 3]
        assert "4 frames" in captured.err and "truncated" not in captured.err  # (stopped by --frames)
        assert cli.main(["video", "0", "--model", model, "--out", "0.mp4", "--jsonl", "0"]) == 2  # the input itself
        assert "is the input video" in capsys.readouterr().err and os.path.getsize("0") > 1000
        assert cli.main(["video", "0", "--model", model, "--method", "cam", "--no-nwc", "--quiet",
                         "--jsonl", "plain.jsonl"]) == 0
        capsys.readouterr()
        assert len(open("plain.jsonl").read().splitlines()) == 6
        for bad, message in ((["--out", "x.gif"], "ending in one of"), (["--out", "x.mp4", "--jsonl", "x.mp4"], "same file"),
                             (["--no-nwc", "--jsonl", "y.jsonl"], "--method cam only")):
            assert cli.main(["video", "0", "--model", model, *bad]) == 2
            assert message in capsys.readouterr().err
    finally:
        os.chdir(cwd)


def test_a_frame_the_model_cannot_take_is_named(model):
    """A frame too small for the model mid-stream (no input_size): the error names the frame and its
    size, after the frames before it were handed out."""
    from rethinkcam_fast.video import FrameBatchError

    frames = random_frames(3) + [np.zeros((1, 1, 3), np.uint8)]  # (SmallCNN max-pools by 2)
    localizer = VideoLocalizer(model, "cam", input_size=None, batch_size=3)
    got = []
    with pytest.raises(FrameBatchError, match=r"frame 3 \(1x1 pixels\): the model failed on them"):
        for result in localizer.stream(frames):
            got.append(result.index)
    assert got == [0, 1, 2]
