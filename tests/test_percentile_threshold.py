"""PaS thresholds against the reference expression, literally: int(theta * np.percentile(uint8(255*cam), q))."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import requires_triton

from rethinkcam_fast import percentile_threshold
from rethinkcam_fast.ops.percentile_threshold import level_histogram_reference, level_histogram_triton


def reference(cam: torch.Tensor, q: float, theta: float) -> int:
    u8 = (255 * cam.numpy().astype(np.float32)).astype(np.uint8)
    return int(theta * np.percentile(u8, q))


def check(cams: torch.Tensor, q: float, theta: float) -> None:
    got = percentile_threshold(cams, q, theta)
    want = [reference(c, q, theta) for c in cams]
    assert got.dtype == torch.int64 and got.tolist() == want


@pytest.mark.parametrize("q, theta", [(90.0, 0.35), (100.0, 0.2), (0.0, 1.0), (50.0, 0.5), (99.9, 0.35), (12.5, 1.0)])
@pytest.mark.parametrize("size", [(1, 1), (1, 2), (2, 3), (7, 7), (224, 224), (13, 31)])
def test_matches_numpy_on_smooth_and_random_maps(q, theta, size):
    gen = torch.Generator().manual_seed(size[0] * 1000 + size[1])
    random = torch.rand((3, *size), generator=gen)
    low = torch.rand((2, 1, 1, max(1, size[0] // 4), max(1, size[1] // 4)), generator=gen)
    smooth = torch.nn.functional.interpolate(low[:, 0], size=size, mode="bilinear", align_corners=False)[:, 0]
    smooth = (smooth - smooth.amin((1, 2), keepdim=True)) / (smooth.amax((1, 2), keepdim=True) - smooth.amin((1, 2), keepdim=True)).clamp_min(1e-12)
    check(torch.cat([random, smooth.clamp(0, 1)]), q, theta)


def test_exhaustive_virtual_index_grid():
    """Every q on a fine grid for several sizes: numpy's float64 index and lerp rounding, replayed."""
    gen = torch.Generator().manual_seed(7)
    for n in (1, 2, 3, 10, 99, 100, 101, 257):
        cams = torch.randint(0, 256, (2, 1, n), generator=gen).float() / 255
        for q in np.linspace(0, 100, 401):
            for theta in (0.35, 0.2, 1.0):
                check(cams, float(q), theta)


@settings(max_examples=200, deadline=None)
@given(
    h=st.integers(1, 12), w=st.integers(1, 12), q=st.floats(0, 100), theta=st.floats(0, 1),
    levels=st.integers(1, 256), seed=st.integers(0, 2**16),
)
def test_property_matches_numpy(h, w, q, theta, levels, seed):
    gen = torch.Generator().manual_seed(seed)
    # Few distinct levels -> many ties; values exactly on k/255 hit the truncation boundary.
    cams = torch.randint(0, levels, (2, h, w), generator=gen).float() / (levels - 1 if levels > 1 else 1)
    check(cams.clamp(0, 1), q, theta)


@requires_triton
@pytest.mark.parametrize("size", [(1, 1), (3, 5), (45, 45), (64, 64), (70, 90)])
def test_triton_histogram_and_thresholds_match(size):
    gen = torch.Generator().manual_seed(size[0])
    cams = torch.rand((3, *size), generator=gen)
    cams[0] = torch.round(cams[0] * 4) / 4  # heavy ties, exact 1.0 values
    for dtype in (torch.float32, torch.float64):
        expected = level_histogram_reference(cams.to(dtype))
        assert torch.equal(level_histogram_triton(cams.to(dtype)), expected)
        # Each map split over programs that add their counts atomically (what a GPU runs for small
        # batches; more programs than blocks leaves some with nothing to count).
        for splits in (2, 4, 64):
            assert torch.equal(level_histogram_triton(cams.to(dtype), num_splits=splits), expected)
    for q, theta in ((90.0, 0.35), (100.0, 0.2), (37.5, 0.9)):
        assert percentile_threshold(cams, q, theta, backend="triton").tolist() == [reference(c, q, theta) for c in cams]


@requires_triton
def test_triton_histogram_of_empty_batches_and_maps():
    for shape in ((0, 4, 4), (2, 0, 5), (0, 0, 0)):
        got = level_histogram_triton(torch.zeros(shape))
        assert got.dtype == torch.int64 and torch.equal(got, torch.zeros(shape[0], 256, dtype=torch.int64))


def test_dtypes_and_empty_batch():
    cams = torch.rand(4, 9, 9, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        lowered = cams.to(dtype)
        got = percentile_threshold(lowered)
        u8 = (255 * lowered.double().numpy() if dtype == torch.float64 else 255 * lowered.float().numpy()).astype(np.uint8)
        assert got.tolist() == [int(0.35 * np.percentile(u, 90)) for u in u8]
    assert percentile_threshold(torch.rand(0, 5, 5)).shape == (0,)


def test_bad_input_raises_clear_errors():
    cams = torch.rand(3, 4, 4)
    bad = cams.clone()
    bad[2, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"cams\[2\] has non-finite values"):
        percentile_threshold(bad)
    bad[2, 1, 1] = 1.5
    with pytest.raises(ValueError, match=r"cams\[2\] has values outside \[0, 1\]"):
        percentile_threshold(bad)
    with pytest.raises(ValueError, match="cams must be a 3-D"):
        percentile_threshold(cams[0])
    with pytest.raises(TypeError, match="floating dtype"):
        percentile_threshold((cams * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"q must lie in \[0, 100\]"):
        percentile_threshold(cams, q=101)
    with pytest.raises(ValueError, match=r"theta must lie in \[0, 1\]"):
        percentile_threshold(cams, theta=-0.1)
    with pytest.raises(TypeError, match="q must be a real number"):
        percentile_threshold(cams, q="90")
    with pytest.raises(TypeError, match="theta must be a real number"):
        percentile_threshold(cams, theta=torch.tensor([0.35]))
    # 0-d tensors and numpy scalars are numbers
    assert torch.equal(percentile_threshold(cams, q=torch.tensor(80.0), theta=np.float32(0.5)),
                       percentile_threshold(cams, q=80.0, theta=float(np.float32(0.5))))
    with pytest.raises(ValueError, match="backend must be one of"):
        percentile_threshold(cams, backend="cuda")


@pytest.mark.cuda
def test_gpu_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cams = torch.rand(64, 224, 224, generator=torch.Generator().manual_seed(1))
    assert torch.equal(percentile_threshold(cams.cuda()).cpu(), percentile_threshold(cams))
    assert torch.equal(percentile_threshold(cams.cuda(), backend="reference").cpu(), percentile_threshold(cams))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_host_levels_equal_scaled_levels(dtype):
    """The native uint8 conversion the box kernels use gives torch's trunc(255 * x), every level."""
    from rethinkcam_fast.ops.percentile_threshold import host_levels, scaled_levels

    maps = torch.rand(3, 37, 53, generator=torch.Generator().manual_seed(2)).to(dtype)
    maps[1].view(-1)[:256] = (torch.arange(256, dtype=torch.float64) / 255).to(dtype)  # every exact level
    maps[2, 0, :3] = torch.tensor([0.0, 1.0, 0.99999994]).to(dtype)
    for layout in (maps, maps.transpose(1, 2)):  # contiguous and not
        assert torch.equal(host_levels(layout), scaled_levels(layout, torch.uint8))
    outside = torch.tensor([[[float("nan"), -1.0, 2.0, float("inf")]]], dtype=dtype)
    assert host_levels(outside).tolist() == [[[0, 0, 255, 255]]]  # clamped, not undefined


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_host_levels_validates_in_the_same_pass(dtype, threads):
    """host_levels(check=...) finds a bad value wherever it sits: in the SIMD body or the scalar tail
    of an image, in an image split between two threads' chunks, and names the first bad image as
    check_unit_maps does; valid edge values (0, -0.0, 1) pass and give the same levels."""
    from rethinkcam_fast.ops.percentile_threshold import host_levels, scaled_levels

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # 3 images of 419 values (odd: images straddle 16-wide blocks and 2-way chunk boundaries),
        # large enough in total for the native code to use both threads.
        maps = torch.rand(3, 419, 1000, generator=torch.Generator().manual_seed(3)).to(dtype)
        maps[0, 0, :3] = torch.tensor([0.0, -0.0, 1.0]).to(dtype)
        assert torch.equal(host_levels(maps, check="cams"), scaled_levels(maps, torch.uint8))
        positions = [(1, 0, 0), (1, 209, 500), (2, 418, 999), (1, 418, 990)]  # first, middle, tail
        for bad_value, problem in ((float("nan"), "non-finite values"), (float("-inf"), "non-finite values"),
                                   (1.5, "values outside"), (-0.25, "values outside")):
            for position in positions:
                bad = maps.clone()
                bad[position] = bad_value
                bad[2, 7, 7] = 2.0  # a later bad image never hides the first
                with pytest.raises(ValueError, match=rf"cams\[{position[0]}\] has {problem}"):
                    host_levels(bad, check="cams")
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_level_histograms_equal_the_reference(dtype, threads):
    """CPU maps take the C++ histogram (levels counted as they are converted, in blocks, four
    interleaved counters, maps handed to threads one by one): same counts as the PyTorch reference,
    every level present, and bad maps named as check_unit_maps names them."""
    from rethinkcam_fast.ops.percentile_threshold import level_histogram_native

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(5)
        maps = torch.rand(5, 97, 131, generator=gen).to(dtype)  # 12,707 pixels: several blocks, a ragged tail
        maps[1].view(-1)[:256] = (torch.arange(256, dtype=torch.float64) / 255).to(dtype)
        maps[2] = 0.0
        maps[3] = 1.0
        assert torch.equal(level_histogram_native(maps, check="cams"), level_histogram_reference(maps))
        for q, theta in ((90.0, 0.35), (100.0, 0.2), (0.0, 1.0), (37.5, 0.5)):
            assert torch.equal(percentile_threshold(maps, q, theta), percentile_threshold(maps, q, theta,
                                                                                          backend="reference"))
        bad = maps.clone()
        bad[3, 96, 130] = float("nan")  # the very last pixel of a map
        bad[4, 0, 0] = -1.0
        with pytest.raises(ValueError, match=r"cams\[3\] has non-finite values"):
            percentile_threshold(bad)
        percentile_threshold(bad, validate=False)  # the caller's promise: no check, no crash
    finally:
        torch.set_num_threads(previous)
