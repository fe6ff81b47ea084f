// CUDA kernel for the gradient modes of weighted_map (see weighted_map_cuda.h).
//
// A block of 256 threads covers (image n, a tile of kTileS pixels); its threads split the channels
// kThreadsK ways: thread (ts, tk) sums k = tk, tk + kThreadsK, ... for pixel ts in float32, then the
// kThreadsK partial sums of a pixel are added in order of tk by one thread.  Every output is summed
// in a fixed order, so the result is deterministic (it differs from torch's and Triton's order in
// rounding only).  Two thread shapes, by layout, so that a warp's loads are contiguous:
//   * NCHW (stride_s == 1): 32 pixels x 8 channel groups (a warp reads 32 consecutive pixels);
//   * channels_last (stride_k == 1): 8 pixels x 32 channel groups (a warp reads 32 consecutive channels).
// NaN policy, as every backend: the ReLUs inside the sum map NaN to 0; the optional ReLU of the
// summed map keeps NaN.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../common/dtype.h"
#include "weighted_map_cuda.h"

namespace rcam {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float relu_nan_to_zero(float v) { return v > 0.0f ? v : 0.0f; }

template <typename T, int kMode, int kTileS>
__global__ void __launch_bounds__(kThreads) weighted_map_grad_kernel(
    const T* __restrict__ a, const T* __restrict__ g, float* __restrict__ out, int64_t K, int64_t S,
    int64_t a_sn, int64_t a_sk, int64_t a_ss, int64_t g_sn, int64_t g_sk, int64_t g_ss, bool relu) {
  constexpr int kThreadsK = kThreads / kTileS;
  __shared__ float partial[kThreadsK][kTileS];
  // Thread order: for NCHW the pixel index varies fastest within a warp, for channels_last the
  // channel group does.
  const int t = threadIdx.x;
  const int ts = kTileS >= 32 ? t % kTileS : t / kThreadsK;
  const int tk = kTileS >= 32 ? t / kTileS : t % kThreadsK;
  const int64_t n = blockIdx.y;
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kTileS + ts;
  float acc = 0.0f;
  if (s < S) {
    const T* ap = a + n * a_sn + s * a_ss;
    const T* gp = g + n * g_sn + s * g_ss;
    for (int64_t k = tk; k < K; k += kThreadsK) {
      const float gv = relu_nan_to_zero(to_acc(gp[k * g_sk]));
      float av = to_acc(ap[k * a_sk]);
      if (kMode == 2) av = relu_nan_to_zero(av);
      acc += gv * av;
    }
  }
  partial[tk][ts] = acc;
  __syncthreads();
  if (tk == 0 && s < S) {
    float sum = 0.0f;
    for (int j = 0; j < kThreadsK; ++j) sum += partial[j][ts];
    out[n * S + s] = relu && sum < 0.0f ? 0.0f : sum;  // keeps NaN, as torch.relu
  }
}

template <typename T, int kMode, int kTileS>
void launch(const void* a, const void* g, float* out, int64_t N, int64_t K, int64_t S, int64_t a_sn, int64_t a_sk,
            int64_t a_ss, int64_t g_sn, int64_t g_sk, int64_t g_ss, bool relu, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((S + kTileS - 1) / kTileS), static_cast<unsigned>(N));
  weighted_map_grad_kernel<T, kMode, kTileS><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(a), static_cast<const T*>(g), out, K, S, a_sn, a_sk, a_ss, g_sn, g_sk, g_ss, relu);
}

template <typename T, int kMode>
void launch_layout(bool channels_last, const void* a, const void* g, float* out, int64_t N, int64_t K, int64_t S,
                   int64_t a_sn, int64_t a_sk, int64_t a_ss, int64_t g_sn, int64_t g_sk, int64_t g_ss, bool relu,
                   cudaStream_t stream) {
  if (channels_last) {
    launch<T, kMode, 8>(a, g, out, N, K, S, a_sn, a_sk, a_ss, g_sn, g_sk, g_ss, relu, stream);
  } else {
    launch<T, kMode, 32>(a, g, out, N, K, S, a_sn, a_sk, a_ss, g_sn, g_sk, g_ss, relu, stream);
  }
}

template <typename T>
void launch_mode(int mode, bool channels_last, const void* a, const void* g, float* out, int64_t N, int64_t K,
                 int64_t S, int64_t a_sn, int64_t a_sk, int64_t a_ss, int64_t g_sn, int64_t g_sk, int64_t g_ss,
                 bool relu, cudaStream_t stream) {
  if (mode == 1) {
    launch_layout<T, 1>(channels_last, a, g, out, N, K, S, a_sn, a_sk, a_ss, g_sn, g_sk, g_ss, relu, stream);
  } else {
    launch_layout<T, 2>(channels_last, a, g, out, N, K, S, a_sn, a_sk, a_ss, g_sn, g_sk, g_ss, relu, stream);
  }
}

}  // namespace

void weighted_map_grad(const void* a, const void* g, float* out, int64_t N, int64_t K, int64_t S,
                       int64_t a_stride_n, int64_t a_stride_k, int64_t a_stride_s, int64_t g_stride_n,
                       int64_t g_stride_k, int64_t g_stride_s, int dtype, int mode, bool relu,
                       std::uintptr_t stream) {
  if (N < 0 || K < 0 || S < 0 || N > 65535 || (mode != 1 && mode != 2)) {
    throw std::invalid_argument("rethinkcam_fast.weighted_map_grad (CUDA): bad sizes or mode (N <= 65535, mode 1 or 2)");
  }
  if (N == 0 || S == 0) return;
  // channels_last when both tensors have unit channel stride (a warp then reads 32 channels in a row).
  const bool channels_last = a_stride_k == 1 && g_stride_k == 1 && K > 1;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      launch_mode<float>(mode, channels_last, a, g, out, N, K, S, a_stride_n, a_stride_k, a_stride_s, g_stride_n,
                         g_stride_k, g_stride_s, relu, s);
      break;
    case kFloat16:
      launch_mode<half_t>(mode, channels_last, a, g, out, N, K, S, a_stride_n, a_stride_k, a_stride_s, g_stride_n,
                          g_stride_k, g_stride_s, relu, s);
      break;
    case kBFloat16:
      launch_mode<bf16_t>(mode, channels_last, a, g, out, N, K, S, a_stride_n, a_stride_k, a_stride_s, g_stride_n,
                          g_stride_k, g_stride_s, relu, s);
      break;
    default:
      throw std::invalid_argument(std::string("rethinkcam_fast.weighted_map_grad (CUDA): dtype ") + dtype_name(dtype) +
                                  " not supported (float32, float16, bfloat16)");
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("rethinkcam_fast.weighted_map_grad (CUDA): ") + cudaGetErrorString(err));
  }
}

}  // namespace cuda
}  // namespace rcam
