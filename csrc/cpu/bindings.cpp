// pybind11 bindings for the CPU kernels: rethinkcam_fast._C
//
// All tensors are passed as integer addresses (tensor.data_ptr()), sizes and strides in elements.
// The GIL is released while the kernels run (contour_boxes creates its numpy outputs with the GIL
// held, once the total size is known, and fills them with it released).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "component_tree.h"
#include "contours.h"
#include "fuse_maps.h"
#include "level_sweep_emulated.h"
#include "levels.h"
#include "map_epilogue.h"
#include "pixel_histogram.h"
#include "tap.h"
#include "flm_reduce_backward.h"
#include "weighted_map.h"

namespace py = pybind11;

namespace {

template <typename P>
P* as_ptr(uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

// Per-layer pointers, checked against the per-layer sizes.
template <typename P>
std::vector<P*> pointer_list(const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& heights,
                             const std::vector<int64_t>& widths) {
  if (heights.size() != ptrs.size() || widths.size() != ptrs.size()) {
    throw std::invalid_argument("rethinkcam_fast: map pointers, heights and widths differ in length");
  }
  std::vector<P*> out;
  for (uintptr_t p : ptrs) out.push_back(as_ptr<P>(p));
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rethinkcam_fast CPU kernels (torch-free; tensors passed as raw pointers)";
  m.attr("__native_version__") = 1;

  m.def(
      "tap_forward",
      [](uintptr_t x_ptr, uintptr_t out_ptr, uintptr_t thr_ptr, uintptr_t inv_ptr, int64_t N,
         int64_t C, int64_t S, int64_t stride_n, int64_t stride_c, int64_t stride_s, double tau,
         int dtype, int num_threads) {
        rcam::cpu::tap_forward(as_ptr<const void>(x_ptr), as_ptr<void>(out_ptr),
                               as_ptr<void>(thr_ptr), as_ptr<void>(inv_ptr), N, C, S, stride_n,
                               stride_c, stride_s, tau, dtype, num_threads);
      },
      py::arg("x_ptr"), py::arg("out_ptr"), py::arg("thr_ptr"), py::arg("inv_ptr"), py::arg("N"),
      py::arg("C"), py::arg("S"), py::arg("stride_n"), py::arg("stride_c"), py::arg("stride_s"),
      py::arg("tau"), py::arg("dtype"), py::arg("num_threads"),
      py::call_guard<py::gil_scoped_release>(),
      "TAP forward.  x: [N, C, S] of dtype (0=f32, 1=f64, 2=f16, 3=bf16) with element strides\n"
      "(stride_n, stride_c, stride_s).  Writes out, thr, inv: contiguous [N, C] buffers of the\n"
      "accumulation type (float64 for float64 input, float32 otherwise).");

  m.def(
      "tap_backward",
      [](uintptr_t grad_out_ptr, uintptr_t x_ptr, uintptr_t thr_ptr, uintptr_t inv_ptr,
         uintptr_t grad_in_ptr, int64_t N, int64_t C, int64_t S, int64_t x_stride_n,
         int64_t x_stride_c, int64_t x_stride_s, int64_t g_stride_n, int64_t g_stride_c,
         int64_t g_stride_s, int dtype, int num_threads) {
        rcam::cpu::tap_backward(as_ptr<const void>(grad_out_ptr), as_ptr<const void>(x_ptr),
                                as_ptr<const void>(thr_ptr), as_ptr<const void>(inv_ptr),
                                as_ptr<void>(grad_in_ptr), N, C, S, x_stride_n, x_stride_c,
                                x_stride_s, g_stride_n, g_stride_c, g_stride_s, dtype, num_threads);
      },
      py::arg("grad_out_ptr"), py::arg("x_ptr"), py::arg("thr_ptr"), py::arg("inv_ptr"),
      py::arg("grad_in_ptr"), py::arg("N"), py::arg("C"), py::arg("S"), py::arg("x_stride_n"),
      py::arg("x_stride_c"), py::arg("x_stride_s"), py::arg("g_stride_n"), py::arg("g_stride_c"),
      py::arg("g_stride_s"), py::arg("dtype"), py::arg("num_threads"),
      py::call_guard<py::gil_scoped_release>(),
      "TAP backward.  grad_out, thr, inv: contiguous [N, C] accumulation-type buffers; x and\n"
      "grad_in: [N, C, S] of dtype with their own strides.  grad_in = (x > thr) * grad_out * inv.");

  m.def(
      "contour_boxes",
      [](uintptr_t levels_ptr, uintptr_t thresholds_ptr, int64_t N, int64_t H, int64_t W,
         int64_t T, int num_threads) {
        rcam::cpu::ContourBoxes res;
        {
          py::gil_scoped_release release;
          res = rcam::cpu::contour_boxes(as_ptr<const uint8_t>(levels_ptr),
                                         as_ptr<const int64_t>(thresholds_ptr), N, H, W, T,
                                         num_threads);
        }
        const py::ssize_t total = static_cast<py::ssize_t>(res.total);
        py::array_t<int64_t> counts(static_cast<py::ssize_t>(res.counts.size()));
        py::array_t<int64_t> boxes(std::vector<py::ssize_t>{total, 4});
        py::array_t<double> areas(total);
        py::array_t<uint8_t> is_hole(total);
        int64_t* counts_p = counts.mutable_data();
        int64_t* boxes_p = boxes.mutable_data();
        double* areas_p = areas.mutable_data();
        uint8_t* is_hole_p = is_hole.mutable_data();
        {
          py::gil_scoped_release release;
          if (!res.counts.empty()) {
            std::memcpy(counts_p, res.counts.data(), res.counts.size() * sizeof(int64_t));
          }
          res.copy_to(boxes_p, areas_p, is_hole_p);
        }
        return py::make_tuple(counts, boxes, areas, is_hole);
      },
      py::arg("levels_ptr"), py::arg("thresholds_ptr"), py::arg("N"), py::arg("H"), py::arg("W"),
      py::arg("T"), py::arg("num_threads"),
      "All contours of mask = levels[n] > thresholds[n, t] as cv2.findContours(mask, RETR_TREE,\n"
      "CHAIN_APPROX_SIMPLE) lists them.  levels: uint8 [N, H, W], thresholds: int64 [N, T], both\n"
      "contiguous.  Returns (counts int64 [N*T], boxes int64 [total, 4] (x, y, w, h) as\n"
      "cv2.boundingRect, areas float64 [total] as cv2.contourArea, is_hole uint8 [total]), contours\n"
      "in cv2 order within each (n, t), (n, t) blocks in row-major order.");

  // The two largest-box kernels (border following per threshold; component trees) share a signature.
  using LargestBoxesFn = void (*)(const uint8_t*, const int64_t*, int64_t*, int64_t, int64_t, int64_t,
                                  int64_t, int);
  auto def_largest_boxes = [&m](const char* name, LargestBoxesFn fn, const char* doc) {
    m.def(
        name,
        [fn](uintptr_t levels_ptr, uintptr_t thresholds_ptr, uintptr_t out_ptr, int64_t N, int64_t H,
             int64_t W, int64_t T, int num_threads) {
          fn(as_ptr<const uint8_t>(levels_ptr), as_ptr<const int64_t>(thresholds_ptr), as_ptr<int64_t>(out_ptr),
             N, H, W, T, num_threads);
        },
        py::arg("levels_ptr"), py::arg("thresholds_ptr"), py::arg("out_ptr"), py::arg("N"), py::arg("H"),
        py::arg("W"), py::arg("T"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(), doc);
  };
  def_largest_boxes(
      "contour_largest_boxes", rcam::cpu::contour_largest_boxes,
      "out: int64 [N, T, 4] <- (x, y, w, h) of max(contours, key=cv2.contourArea) (the first\n"
      "maximum in cv2 order) of mask = levels[n] > thresholds[n, t], or (0, 0, 0, 0) for an empty\n"
      "mask.  levels: uint8 [N, H, W], thresholds: int64 [N, T], out: all contiguous.");

  m.def(
      "threshold_box_ious",
      [](uintptr_t levels_ptr, uintptr_t thresholds_ptr, int64_t N, int64_t H, int64_t W, int64_t T,
         uintptr_t gt_boxes_ptr, uintptr_t gt_offsets_ptr, bool multi_contour, uintptr_t out_ptr,
         int num_threads) {
        rcam::cpu::threshold_box_ious(as_ptr<const uint8_t>(levels_ptr),
                                      as_ptr<const int64_t>(thresholds_ptr), N, H, W, T,
                                      as_ptr<const int64_t>(gt_boxes_ptr),
                                      as_ptr<const int64_t>(gt_offsets_ptr), multi_contour,
                                      as_ptr<double>(out_ptr), num_threads);
      },
      py::arg("levels_ptr"), py::arg("thresholds_ptr"), py::arg("N"), py::arg("H"), py::arg("W"),
      py::arg("T"), py::arg("gt_boxes_ptr"), py::arg("gt_offsets_ptr"), py::arg("multi_contour"),
      py::arg("out_ptr"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
      "out: float64 [N, T] <- best IoU of the contour boxes of levels[n] > thresholds[n, t] (all\n"
      "contours, or the largest) against gt_boxes[gt_offsets[n]:gt_offsets[n + 1]], as\n"
      "wsolevaluation computes it; one pass over all thresholds of an image (component trees).\n"
      "levels: uint8 [N, H, W]; thresholds: int64 [N, T]; gt_boxes: int64 [G, 4]; gt_offsets:\n"
      "int64 [N + 1]; all contiguous.");

  def_largest_boxes(
      "tree_largest_boxes", rcam::cpu::tree_largest_boxes,
      "As contour_largest_boxes (same result), from one pass over all thresholds of each image.");

  m.def(
      "map_largest_boxes",
      [](uintptr_t maps_ptr, int dtype, uintptr_t thresholds_ptr, uintptr_t out_ptr, int64_t N, int64_t H,
         int64_t W, int64_t T, int num_threads, uintptr_t bad_ptr) {
        rcam::cpu::map_largest_boxes(as_ptr<const void>(maps_ptr), dtype, as_ptr<const int64_t>(thresholds_ptr),
                                     as_ptr<int64_t>(out_ptr), N, H, W, T, num_threads, as_ptr<uint8_t>(bad_ptr));
      },
      py::arg("maps_ptr"), py::arg("dtype"), py::arg("thresholds_ptr"), py::arg("out_ptr"), py::arg("N"),
      py::arg("H"), py::arg("W"), py::arg("T"), py::arg("num_threads"), py::arg("bad_ptr") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "As contour_largest_boxes, from float maps [N, H, W] (dtype 0=f32, 1=f64, 2=f16, 3=bf16,\n"
      "contiguous) converted to uint8 levels image by image; with bad_ptr (uint8 [N]) it also flags\n"
      "maps holding a NaN or a value outside [0, 1].");

  m.def(
      "pixel_histogram",
      [](uintptr_t x_ptr, int dtype, int64_t count, uintptr_t foreground_ptr, uintptr_t ignore_ptr,
         uintptr_t edges_ptr, int64_t num_bins, double interval, uintptr_t counts_ptr, int num_threads) {
        rcam::cpu::pixel_histogram(as_ptr<const void>(x_ptr), dtype, count, as_ptr<const uint8_t>(foreground_ptr),
                                   as_ptr<const uint8_t>(ignore_ptr), as_ptr<const double>(edges_ptr), num_bins,
                                   interval, as_ptr<int64_t>(counts_ptr), num_threads);
      },
      py::arg("x_ptr"), py::arg("dtype"), py::arg("count"), py::arg("foreground_ptr"), py::arg("ignore_ptr"),
      py::arg("edges_ptr"), py::arg("num_bins"), py::arg("interval"), py::arg("counts_ptr"),
      py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
      "counts: int64 [2, num_bins] += PxAP score histograms (row 1 foreground, row 0 background,\n"
      "ignored background left out; np.histogram's bins over edges [num_bins + 1], float64).\n"
      "x: contiguous, dtype 0=f32, 1=f64, 2=f16, 3=bf16; foreground/ignore: bool bytes (ignore\n"
      "may be 0); interval > 0: edges[i] == i * interval below the last two bins (faster lookup).");

  m.def(
      "level_histograms",
      [](uintptr_t x_ptr, int dtype, int64_t N, int64_t per_image, uintptr_t hist_ptr, int num_threads,
         uintptr_t bad_ptr) {
        rcam::cpu::level_histograms(as_ptr<const void>(x_ptr), dtype, N, per_image, as_ptr<int64_t>(hist_ptr),
                                    num_threads, as_ptr<uint8_t>(bad_ptr));
      },
      py::arg("x_ptr"), py::arg("dtype"), py::arg("N"), py::arg("per_image"), py::arg("hist_ptr"),
      py::arg("num_threads"), py::arg("bad_ptr") = 0, py::call_guard<py::gil_scoped_release>(),
      "hist: int64 [N, 256] <- counts of the uint8 levels trunc(255 * x) of each map of x [N, per_image]\n"
      "(contiguous, dtype 0=f32, 1=f64, 2=f16, 3=bf16); with bad_ptr (uint8 [N]) it also flags maps\n"
      "holding a NaN or a value outside [0, 1].");

  m.def(
      "uint8_levels",
      [](uintptr_t x_ptr, int dtype, int64_t count, uintptr_t out_ptr, int num_threads, int64_t per_image,
         uintptr_t bad_ptr) {
        rcam::cpu::uint8_levels(as_ptr<const void>(x_ptr), dtype, count, as_ptr<uint8_t>(out_ptr),
                                num_threads, per_image, as_ptr<uint8_t>(bad_ptr));
      },
      py::arg("x_ptr"), py::arg("dtype"), py::arg("count"), py::arg("out_ptr"),
      py::arg("num_threads"), py::arg("per_image") = 0, py::arg("bad_ptr") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "out: uint8 [count] <- trunc(255 * x) in the accumulation type (float64 for float64 x,\n"
      "float32 otherwise), clamped to 0..255 (NaN -> 0).  x: contiguous, dtype 0=f32, 1=f64, 2=f16,\n"
      "3=bf16.  With bad_ptr (uint8 [ceil(count / per_image)]), the same pass sets bad[i] = 1 where\n"
      "image i holds a NaN or a value outside [0, 1].");

  m.def(
      "weighted_map_grad",
      [](uintptr_t a_ptr, uintptr_t g_ptr, uintptr_t out_ptr, int64_t N, int64_t K, int64_t S, int64_t a_stride_n,
         int64_t a_stride_k, int64_t a_stride_s, int64_t g_stride_n, int64_t g_stride_k, int64_t g_stride_s,
         int dtype, int mode, bool relu, int num_threads) {
        rcam::cpu::weighted_map_grad(as_ptr<const void>(a_ptr), as_ptr<const void>(g_ptr), as_ptr<float>(out_ptr), N,
                                     K, S, a_stride_n, a_stride_k, a_stride_s, g_stride_n, g_stride_k, g_stride_s,
                                     dtype, mode, relu, num_threads);
      },
      py::arg("a_ptr"), py::arg("g_ptr"), py::arg("out_ptr"), py::arg("N"), py::arg("K"), py::arg("S"),
      py::arg("a_stride_n"), py::arg("a_stride_k"), py::arg("a_stride_s"), py::arg("g_stride_n"),
      py::arg("g_stride_k"), py::arg("g_stride_s"), py::arg("dtype"), py::arg("mode"), py::arg("relu"),
      py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
      "out: float32 [N, S] <- sum_k relu(G) * A (mode 1, LayerCAM) or sum_k relu(G) * relu(A) (mode 2,\n"
      "FLM), then a ReLU if relu.  A and G: one dtype (0=f32, 1=f64, 2=f16, 3=bf16), element strides\n"
      "over the logical [N, K, S] view (NCHW and channels_last are read in place).");

  m.def(
      "flm_reduce_backward",
      [](uintptr_t grad_maps_ptr, uintptr_t a_ptr, uintptr_t g_ptr, uintptr_t da_ptr, uintptr_t dg_ptr, int64_t N,
         int64_t K, int64_t S, const std::vector<int64_t>& a_strides, const std::vector<int64_t>& g_strides,
         const std::vector<int64_t>& da_strides, const std::vector<int64_t>& dg_strides, int dtype, int num_threads) {
        for (const auto* v : {&a_strides, &g_strides, &da_strides, &dg_strides}) {
          if (v->size() != 3) throw std::invalid_argument("flm_reduce_backward: strides are (n, k, s) triples");
        }
        rcam::cpu::flm_reduce_backward(as_ptr<const void>(grad_maps_ptr), as_ptr<const void>(a_ptr),
                                       as_ptr<const void>(g_ptr), as_ptr<void>(da_ptr), as_ptr<void>(dg_ptr), N, K, S,
                                       a_strides.data(), g_strides.data(), da_strides.data(), dg_strides.data(),
                                       dtype, num_threads);
      },
      py::arg("grad_maps_ptr"), py::arg("a_ptr"), py::arg("g_ptr"), py::arg("da_ptr"), py::arg("dg_ptr"), py::arg("N"),
      py::arg("K"), py::arg("S"), py::arg("a_strides"), py::arg("g_strides"), py::arg("da_strides"),
      py::arg("dg_strides"), py::arg("dtype"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
      "dA, dG [N, K, S] (strided, the inputs' dtype) <- the backward of M = sum_k relu(G) relu(A) for dM\n"
      "(contiguous [N, S], float64 for float64 tensors, float32 otherwise); an image with dM == 0 gets zeros.");

  m.def(
      "fuse_maps",
      [](const std::vector<uintptr_t>& map_ptrs, const std::vector<int64_t>& heights,
         const std::vector<int64_t>& widths, int64_t N, int64_t H, int64_t W, bool fuse_max, uintptr_t out_ptr,
         uintptr_t degenerate_ptr, int num_threads) {
        const std::vector<const float*> maps = pointer_list<const float>(map_ptrs, heights, widths);
        py::gil_scoped_release release;
        rcam::cpu::fuse_maps(maps.data(), heights.data(), widths.data(), static_cast<int64_t>(maps.size()), N, H, W,
                             fuse_max, as_ptr<float>(out_ptr), as_ptr<uint8_t>(degenerate_ptr), num_threads);
      },
      py::arg("map_ptrs"), py::arg("heights"), py::arg("widths"), py::arg("N"), py::arg("H"), py::arg("W"),
      py::arg("fuse_max"), py::arg("out_ptr"), py::arg("degenerate_ptr"), py::arg("num_threads"),
      "out: float32 [N, H, W], degenerate: uint8 [N] <- the layers' maps (contiguous float32\n"
      "[N, heights[l], widths[l]]) upsampled (bilinear, align_corners=False), min-max normalised,\n"
      "fused by sum (or max) and normalised again; as fuse_maps_reference, to float32 rounding.");

  m.def(
      "map_epilogue_forward",
      [](const std::vector<uintptr_t>& map_ptrs, const std::vector<int64_t>& heights,
         const std::vector<int64_t>& widths, int64_t N, int64_t H, int64_t W, bool fuse_max, bool normalize,
         uintptr_t out_ptr, uintptr_t degenerate_ptr, int dtype, int num_threads) {
        const std::vector<const void*> maps = pointer_list<const void>(map_ptrs, heights, widths);
        py::gil_scoped_release release;
        rcam::cpu::map_epilogue_forward(maps.data(), heights.data(), widths.data(), static_cast<int64_t>(maps.size()),
                                        N, H, W, fuse_max, normalize, as_ptr<void>(out_ptr),
                                        as_ptr<uint8_t>(degenerate_ptr), dtype, num_threads);
      },
      py::arg("map_ptrs"), py::arg("heights"), py::arg("widths"), py::arg("N"), py::arg("H"), py::arg("W"),
      py::arg("fuse_max"), py::arg("normalize"), py::arg("out_ptr"), py::arg("degenerate_ptr"), py::arg("dtype"),
      py::arg("num_threads"),
      "out [N, H, W], degenerate uint8 [N] <- the differentiable epilogue's forward (map_epilogue_reference)\n"
      "of the layers' maps (contiguous [N, heights[l], widths[l]]), all of dtype 0 (float32) or 1 (float64).");

  m.def(
      "map_epilogue_backward",
      [](uintptr_t grad_ptr, const std::vector<uintptr_t>& map_ptrs, const std::vector<int64_t>& heights,
         const std::vector<int64_t>& widths, const std::vector<uintptr_t>& grad_map_ptrs, int64_t N, int64_t H,
         int64_t W, bool fuse_max, bool normalize, int dtype, int num_threads) {
        const std::vector<const void*> maps = pointer_list<const void>(map_ptrs, heights, widths);
        const std::vector<void*> grad_maps = pointer_list<void>(grad_map_ptrs, heights, widths);
        py::gil_scoped_release release;
        rcam::cpu::map_epilogue_backward(as_ptr<const void>(grad_ptr), maps.data(), heights.data(), widths.data(),
                                         static_cast<int64_t>(maps.size()), N, H, W, fuse_max, normalize,
                                         grad_maps.data(), dtype, num_threads);
      },
      py::arg("grad_ptr"), py::arg("map_ptrs"), py::arg("heights"), py::arg("widths"), py::arg("grad_map_ptrs"),
      py::arg("N"), py::arg("H"), py::arg("W"), py::arg("fuse_max"), py::arg("normalize"), py::arg("dtype"),
      py::arg("num_threads"),
      "grad_maps[l] (contiguous like the maps, overwritten) <- the differentiable epilogue's backward\n"
      "(map_epilogue_backward_reference) from grad [N, H, W], all of dtype 0 (float32) or 1 (float64).");

  m.def(
      "emulate_level_sweep",
      [](uintptr_t levels_ptr, int64_t N, int64_t H, int64_t W, uintptr_t wanted_ptr, uintptr_t gt_boxes_ptr,
         uintptr_t gt_offsets_ptr, bool multi_contour, int64_t block_threads, uintptr_t iou_ptr,
         uintptr_t xywh_ptr, uintptr_t status_ptr) {
        rcam::cpu::emulate_level_sweep(as_ptr<const uint8_t>(levels_ptr), N, H, W, as_ptr<const uint8_t>(wanted_ptr),
                                       as_ptr<const int64_t>(gt_boxes_ptr), as_ptr<const int64_t>(gt_offsets_ptr),
                                       multi_contour, block_threads, as_ptr<double>(iou_ptr),
                                       as_ptr<int64_t>(xywh_ptr), as_ptr<int32_t>(status_ptr));
      },
      py::arg("levels_ptr"), py::arg("N"), py::arg("H"), py::arg("W"), py::arg("wanted_ptr"),
      py::arg("gt_boxes_ptr"), py::arg("gt_offsets_ptr"), py::arg("multi_contour"), py::arg("block_threads"),
      py::arg("iou_ptr"), py::arg("xywh_ptr"), py::arg("status_ptr"), py::call_guard<py::gil_scoped_release>(),
      "The CUDA level-sweep kernel's code run on the CPU, each phase thread by thread (for tests):\n"
      "levels uint8 [N, H, W], wanted uint8 [N, 256] -> iou float64 [N, 256], xywh int64 [N, 256, 4]\n"
      "(largest mode), status int32 [N, 256] (0 done, 2 tie: trace on the host, 3 inconsistent: a bug),\n"
      "written at the wanted thresholds only.");
}
