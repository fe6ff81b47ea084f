// pybind11 bindings for the CUDA kernels: rethinkcam_fast._C_cuda
//
// Same functions as rethinkcam_fast._C, but pointers are device pointers and the last argument is
// the CUDA stream to launch on, as an integer (torch.cuda.current_stream().cuda_stream).  The
// launches are asynchronous; launch errors raise RuntimeError with the CUDA error string.
// Importing this module does not touch the CUDA driver (the runtime is linked statically and
// initialises lazily), so it imports fine on machines without a GPU.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "level_sweep_cuda.h"
#include "tap_cuda.h"
#include "weighted_map_cuda.h"

namespace py = pybind11;

namespace {

template <typename P>
P* as_ptr(uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "rethinkcam_fast CUDA kernels (torch-free; tensors passed as raw device pointers)";
  m.attr("__native_version__") = 1;

  m.def(
      "tap_forward",
      [](uintptr_t x_ptr, uintptr_t out_ptr, uintptr_t thr_ptr, uintptr_t inv_ptr, int64_t N,
         int64_t C, int64_t S, int64_t stride_n, int64_t stride_c, int64_t stride_s, double tau,
         int dtype, uintptr_t stream) {
        rcam::cuda::tap_forward(as_ptr<const void>(x_ptr), as_ptr<void>(out_ptr),
                                as_ptr<void>(thr_ptr), as_ptr<void>(inv_ptr), N, C, S, stride_n,
                                stride_c, stride_s, tau, dtype, stream);
      },
      py::arg("x_ptr"), py::arg("out_ptr"), py::arg("thr_ptr"), py::arg("inv_ptr"), py::arg("N"),
      py::arg("C"), py::arg("S"), py::arg("stride_n"), py::arg("stride_c"), py::arg("stride_s"),
      py::arg("tau"), py::arg("dtype"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "TAP forward on the GPU (see rethinkcam_fast._C.tap_forward); launched on `stream`.");

  m.def(
      "tap_backward",
      [](uintptr_t grad_out_ptr, uintptr_t x_ptr, uintptr_t thr_ptr, uintptr_t inv_ptr,
         uintptr_t grad_in_ptr, int64_t N, int64_t C, int64_t S, int64_t x_stride_n,
         int64_t x_stride_c, int64_t x_stride_s, int64_t g_stride_n, int64_t g_stride_c,
         int64_t g_stride_s, int dtype, uintptr_t stream) {
        rcam::cuda::tap_backward(as_ptr<const void>(grad_out_ptr), as_ptr<const void>(x_ptr),
                                 as_ptr<const void>(thr_ptr), as_ptr<const void>(inv_ptr),
                                 as_ptr<void>(grad_in_ptr), N, C, S, x_stride_n, x_stride_c,
                                 x_stride_s, g_stride_n, g_stride_c, g_stride_s, dtype, stream);
      },
      py::arg("grad_out_ptr"), py::arg("x_ptr"), py::arg("thr_ptr"), py::arg("inv_ptr"),
      py::arg("grad_in_ptr"), py::arg("N"), py::arg("C"), py::arg("S"), py::arg("x_stride_n"),
      py::arg("x_stride_c"), py::arg("x_stride_s"), py::arg("g_stride_n"), py::arg("g_stride_c"),
      py::arg("g_stride_s"), py::arg("dtype"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "TAP backward on the GPU (see rethinkcam_fast._C.tap_backward); launched on `stream`.");

  m.def(
      "weighted_map_grad",
      [](uintptr_t a_ptr, uintptr_t g_ptr, uintptr_t out_ptr, int64_t N, int64_t K, int64_t S, int64_t a_stride_n,
         int64_t a_stride_k, int64_t a_stride_s, int64_t g_stride_n, int64_t g_stride_k, int64_t g_stride_s,
         int dtype, int mode, bool relu, uintptr_t stream) {
        rcam::cuda::weighted_map_grad(as_ptr<const void>(a_ptr), as_ptr<const void>(g_ptr), as_ptr<float>(out_ptr),
                                      N, K, S, a_stride_n, a_stride_k, a_stride_s, g_stride_n, g_stride_k, g_stride_s,
                                      dtype, mode, relu, stream);
      },
      py::arg("a_ptr"), py::arg("g_ptr"), py::arg("out_ptr"), py::arg("N"), py::arg("K"), py::arg("S"),
      py::arg("a_stride_n"), py::arg("a_stride_k"), py::arg("a_stride_s"), py::arg("g_stride_n"),
      py::arg("g_stride_k"), py::arg("g_stride_s"), py::arg("dtype"), py::arg("mode"), py::arg("relu"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "weighted_map's gradient modes on the GPU (see rethinkcam_fast._C.weighted_map_grad): float32,\n"
      "float16, bfloat16; N <= 65535; launched on `stream`.");

  m.def(
      "level_sweep",
      [](uintptr_t levels_ptr, int64_t N, int64_t H, int64_t W, uintptr_t wanted_ptr, uintptr_t gt_boxes_ptr,
         uintptr_t gt_offsets_ptr, bool multi_contour, uintptr_t scratch_ptr, int64_t grid, int64_t block_threads,
         int64_t variant, uintptr_t iou_ptr, uintptr_t xywh_ptr, uintptr_t status_ptr, uintptr_t stream) {
        rcam::cuda::level_sweep(as_ptr<const uint8_t>(levels_ptr), N, H, W, as_ptr<const uint8_t>(wanted_ptr),
                                as_ptr<const int64_t>(gt_boxes_ptr), as_ptr<const int64_t>(gt_offsets_ptr),
                                multi_contour, as_ptr<int32_t>(scratch_ptr), grid, block_threads, variant,
                                as_ptr<double>(iou_ptr), as_ptr<int64_t>(xywh_ptr), as_ptr<int32_t>(status_ptr),
                                stream);
      },
      py::arg("levels_ptr"), py::arg("N"), py::arg("H"), py::arg("W"), py::arg("wanted_ptr"),
      py::arg("gt_boxes_ptr"), py::arg("gt_offsets_ptr"), py::arg("multi_contour"), py::arg("scratch_ptr"),
      py::arg("grid"), py::arg("block_threads"), py::arg("variant"), py::arg("iou_ptr"), py::arg("xywh_ptr"),
      py::arg("status_ptr"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "The level sweep on the GPU (see rethinkcam_fast._C.emulate_level_sweep): a block per image,\n"
      "every wanted threshold in one pass.  scratch: int32 [grid, 9 * (H*W + 1) + (H*W + 3) / 4];\n"
      "block_threads <= 512; variant: 2 (two blocks per SM), 1 (one), 3 (one, union-find in shared memory).");
}
