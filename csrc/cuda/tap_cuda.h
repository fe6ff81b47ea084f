// CUDA implementation of TAP (thresholded average pooling), forward and backward.
//
// Host-callable launchers; they only enqueue kernels on `stream` (a cudaStream_t passed as an
// integer so that this header needs no CUDA includes) and throw std::runtime_error carrying the
// CUDA error string if a launch fails.  All pointers are device pointers; layouts and semantics
// are identical to the CPU version (csrc/cpu/tap.h).
#pragma once

#include <cstdint>

namespace rcam {
namespace cuda {

void tap_forward(const void* x, void* out, void* thr, void* inv, int64_t N, int64_t C, int64_t S,
                 int64_t stride_n, int64_t stride_c, int64_t stride_s, double tau, int dtype,
                 std::uintptr_t stream);

void tap_backward(const void* grad_out, const void* x, const void* thr, const void* inv,
                  void* grad_in, int64_t N, int64_t C, int64_t S, int64_t x_stride_n,
                  int64_t x_stride_c, int64_t x_stride_s, int64_t g_stride_n, int64_t g_stride_c,
                  int64_t g_stride_s, int dtype, std::uintptr_t stream);

}  // namespace cuda
}  // namespace rcam
