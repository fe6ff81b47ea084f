// CPU kernel for the backward of FLM's per-layer reduction (rethinkcam_fast/ops/flm_fuse.py):
//
//   forward:   M[n, s] = sum_k relu(G[n, k, s]) * relu(A[n, k, s])            (relu(NaN) = 0)
//   backward:  dA[n, k, s] = (dM[n, s] * relu(G)) * (A > 0)
//              dG[n, k, s] = (dM[n, s] * relu(A)) * (G > 0)
//
// with an image whose dM is zero everywhere contributing exactly zero (its A and G are treated as 0,
// so an inf there gives 0, not 0 * inf = NaN). A, G, dA and dG share one dtype (0=f32, 1=f64, 2=f16,
// 3=bf16) and are passed with their own element strides over the logical [N, K, S] view (NCHW and
// channels_last in place). dM is a contiguous [N, S] buffer in the accumulation type: float64 for
// float64 tensors, float32 otherwise.
#pragma once

#include <cstdint>

namespace rcam {
namespace cpu {

void flm_reduce_backward(const void* grad_maps, const void* a, const void* g, void* d_a, void* d_g, int64_t N,
                         int64_t K, int64_t S, const int64_t* a_strides, const int64_t* g_strides,
                         const int64_t* da_strides, const int64_t* dg_strides, int dtype, int num_threads);

}  // namespace cpu
}  // namespace rcam
