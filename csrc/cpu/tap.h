// CPU implementation of TAP (thresholded average pooling), forward and backward.
//
// Tensors are passed as raw pointers.  x has the logical shape [N, C, S] (S = H*W) with arbitrary
// element strides; out/thr/inv/grad_out are contiguous [N, C] buffers of acc_t (double for float64
// input, float otherwise); grad_in has x's dtype and its own strides.  See tap.cpp for the maths.
#pragma once

#include <cstdint>

namespace rcam {
namespace cpu {

// Forward: writes out[n,c], thr[n,c] and inv[n,c] (all acc_t, contiguous [N, C]).
void tap_forward(const void* x, void* out, void* thr, void* inv, int64_t N, int64_t C, int64_t S,
                 int64_t stride_n, int64_t stride_c, int64_t stride_s, double tau, int dtype,
                 int num_threads);

// Backward: grad_in[n,c,s] = (x[n,c,s] > thr[n,c]) ? grad_out[n,c] * inv[n,c] : 0, written in
// x's dtype (round to nearest even).
void tap_backward(const void* grad_out, const void* x, const void* thr, const void* inv,
                  void* grad_in, int64_t N, int64_t C, int64_t S, int64_t x_stride_n,
                  int64_t x_stride_c, int64_t x_stride_s, int64_t g_stride_n, int64_t g_stride_c,
                  int64_t g_stride_s, int dtype, int num_threads);

}  // namespace cpu
}  // namespace rcam
