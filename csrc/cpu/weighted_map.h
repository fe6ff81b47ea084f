// CPU kernel for the gradient modes of weighted_map (rethinkcam_fast/ops/weighted_map.py):
//
//   mode 1 (LayerCAM):  M[n, s] = sum_k relu(G[n, k, s]) * A[n, k, s]
//   mode 2 (FLM):       M[n, s] = sum_k relu(G[n, k, s]) * relu(A[n, k, s])
//
// optionally followed by a ReLU.  A and G share one dtype (0=f32, 1=f64, 2=f16, 3=bf16) and are
// passed with their own element strides over the logical [N, K, S] (S = h * w) view, so NCHW and
// channels_last tensors are read in place.  M is a contiguous float32 [N, S] buffer.
#pragma once

#include <cstdint>

namespace rcam {
namespace cpu {

void weighted_map_grad(const void* a, const void* g, float* out, int64_t N, int64_t K, int64_t S,
                       int64_t a_stride_n, int64_t a_stride_k, int64_t a_stride_s, int64_t g_stride_n,
                       int64_t g_stride_k, int64_t g_stride_s, int dtype, int mode, bool relu,
                       int num_threads);

}  // namespace cpu
}  // namespace rcam
