// CUDA kernel for the gradient modes of weighted_map (rethinkcam_fast/ops/weighted_map.py), the
// same contract as csrc/cpu/weighted_map.h:
//
//   mode 1 (LayerCAM):  M[n, s] = sum_k relu(G[n, k, s]) * A[n, k, s]
//   mode 2 (FLM):       M[n, s] = sum_k relu(G[n, k, s]) * relu(A[n, k, s])
//
// optionally followed by a ReLU.  A and G share one dtype (0=f32, 2=f16, 3=bf16; float64 is left to
// the Triton kernel), passed with their own element strides over the logical [N, K, S] view (NCHW
// and channels_last read in place).  M: a contiguous float32 [N, S] device buffer.  It exists for
// the host's sake: Fully-CAM reduces each of its layers inside an autograd hook, and a launch from
// C++ costs a fraction of a Triton launch from Python.  Enqueued on `stream`; launch errors throw
// std::runtime_error with the CUDA error string.
#pragma once

#include <cstdint>

namespace rcam {
namespace cuda {

void weighted_map_grad(const void* a, const void* g, float* out, int64_t N, int64_t K, int64_t S,
                       int64_t a_stride_n, int64_t a_stride_k, int64_t a_stride_s, int64_t g_stride_n,
                       int64_t g_stride_k, int64_t g_stride_s, int dtype, int mode, bool relu,
                       std::uintptr_t stream);

}  // namespace cuda
}  // namespace rcam
