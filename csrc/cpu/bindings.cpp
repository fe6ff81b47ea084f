// pybind11 bindings for the CPU kernels: rethinkcam_fast._C
//
// All tensors are passed as integer addresses (tensor.data_ptr()), sizes and strides in elements.
// The GIL is released while the kernels run.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "tap.h"

namespace py = pybind11;

namespace {

template <typename P>
P* as_ptr(uintptr_t p) {
  return reinterpret_cast<P*>(p);
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
}
