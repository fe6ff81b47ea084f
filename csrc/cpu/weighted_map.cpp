// CPU kernel for the gradient modes of weighted_map: LayerCAM's sum_k relu(G) * A and Fully-CAM's
// FLM sum_k relu(G) * relu(A), read once and never materialising the [N, K, h, w] products (the
// eager formulation makes three full-size temporaries per layer: relu(G), relu(A), the product).
//
// Numerics, as the pure-PyTorch reference (weighted_map_reference): every element is converted to
// float32 first (float64 inputs too, as the reference's .float()), products and sums in float32.
// The summation order differs from torch's reduction, so results agree to rounding, not bitwise.
// NaN policy (the same on every backend): the ReLUs inside the sum map NaN to 0 (fmax, as Fully-CAM's
// FLM ops do); the optional ReLU of the summed map keeps NaN (torch.relu), so a NaN map reaches the
// epilogue, which flags it degenerate.  Every output is summed by one thread in a fixed order, so the
// result does not depend on num_threads.
//
// Layouts (strides in elements over the logical [N, K, S] view):
//   * stride_s == 1 for both (NCHW): a block of kBlockS consecutive pixels is accumulated over
//     k in a local array; the inner loop runs over independent pixels, so it vectorises without
//     reassociating any sum.
//   * stride_k == 1 for both (channels_last): each pixel's channels are a contiguous run, summed
//     in kLanes interleaved partial sums (vectorisable, no reassociation within a lane), folded in
//     a fixed order at the end.
//   * anything else: a plain strided loop (correct, not tuned).
#include "weighted_map.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common/dtype.h"
#include "parallel.h"

namespace rcam {
namespace cpu {
namespace {

constexpr int64_t kBlockS = 256;  // pixels per work item in the NCHW path (1 KB of float sums)
constexpr int kLanes = 8;         // interleaved partial sums per pixel in the channels_last path

inline float relu_keep_nan(float v) { return v < 0.0f ? 0.0f : v; }
inline float relu_nan_to_zero(float v) { return v > 0.0f ? v : 0.0f; }

template <typename T>
inline float load_f32(const T* p) {
  return static_cast<float>(to_acc(*p));
}

template <typename T, int Mode>
inline float term(const T* a, const T* g) {
  const float gv = relu_nan_to_zero(load_f32(g));
  const float av = load_f32(a);
  return gv * (Mode == 2 ? relu_nan_to_zero(av) : av);
}

template <typename T, int Mode>
void run_nchw(const T* a, const T* g, float* out, int64_t N, int64_t K, int64_t S, int64_t asn, int64_t ask,
              int64_t gsn, int64_t gsk, bool relu, int num_threads) {
  const int64_t blocks = (S + kBlockS - 1) / kBlockS;
  const int threads = effective_threads(N * K * S, num_threads, 65536);
  parallel_for(0, N * blocks, threads, [&](int64_t b, int64_t e) {
    float acc[kBlockS];
    for (int64_t item = b; item < e; ++item) {
      const int64_t n = item / blocks, s0 = (item % blocks) * kBlockS;
      const int64_t len = std::min(kBlockS, S - s0);
      std::fill(acc, acc + len, 0.0f);
      const T* an = a + n * asn + s0;
      const T* gn = g + n * gsn + s0;
      for (int64_t k = 0; k < K; ++k) {
        const T* ak = an + k * ask;
        const T* gk = gn + k * gsk;
        for (int64_t j = 0; j < len; ++j) acc[j] += term<T, Mode>(ak + j, gk + j);
      }
      float* o = out + n * S + s0;
      for (int64_t j = 0; j < len; ++j) o[j] = relu ? relu_keep_nan(acc[j]) : acc[j];
    }
  });
}

template <typename T, int Mode>
void run_channels_last(const T* a, const T* g, float* out, int64_t N, int64_t K, int64_t S, int64_t asn,
                       int64_t ass, int64_t gsn, int64_t gss, bool relu, int num_threads) {
  const int threads = effective_threads(N * K * S, num_threads, 65536);
  parallel_for(0, N * S, threads, [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t n = item / S, s = item % S;
      const T* ap = a + n * asn + s * ass;
      const T* gp = g + n * gsn + s * gss;
      float lanes[kLanes] = {};
      int64_t k = 0;
      for (; k + kLanes <= K; k += kLanes) {
        for (int j = 0; j < kLanes; ++j) lanes[j] += term<T, Mode>(ap + k + j, gp + k + j);
      }
      for (int j = 0; k < K; ++k, ++j) lanes[j] += term<T, Mode>(ap + k, gp + k);
      float sum = 0.0f;
      for (int j = 0; j < kLanes; ++j) sum += lanes[j];
      out[item] = relu ? relu_keep_nan(sum) : sum;
    }
  });
}

template <typename T, int Mode>
void run_strided(const T* a, const T* g, float* out, int64_t N, int64_t K, int64_t S, int64_t asn, int64_t ask,
                 int64_t ass, int64_t gsn, int64_t gsk, int64_t gss, bool relu, int num_threads) {
  const int threads = effective_threads(N * K * S, num_threads, 65536);
  parallel_for(0, N * S, threads, [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t n = item / S, s = item % S;
      float sum = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        sum += term<T, Mode>(a + n * asn + k * ask + s * ass, g + n * gsn + k * gsk + s * gss);
      }
      out[item] = relu ? relu_keep_nan(sum) : sum;
    }
  });
}

template <typename T, int Mode>
void run(const T* a, const T* g, float* out, int64_t N, int64_t K, int64_t S, int64_t asn, int64_t ask,
         int64_t ass, int64_t gsn, int64_t gsk, int64_t gss, bool relu, int num_threads) {
  if (ass == 1 && gss == 1) {
    run_nchw<T, Mode>(a, g, out, N, K, S, asn, ask, gsn, gsk, relu, num_threads);
  } else if (ask == 1 && gsk == 1) {
    run_channels_last<T, Mode>(a, g, out, N, K, S, asn, ass, gsn, gss, relu, num_threads);
  } else {
    run_strided<T, Mode>(a, g, out, N, K, S, asn, ask, ass, gsn, gsk, gss, relu, num_threads);
  }
}

}  // namespace

void weighted_map_grad(const void* a, const void* g, float* out, int64_t N, int64_t K, int64_t S,
                       int64_t a_stride_n, int64_t a_stride_k, int64_t a_stride_s, int64_t g_stride_n,
                       int64_t g_stride_k, int64_t g_stride_s, int dtype, int mode, bool relu,
                       int num_threads) {
  check_dtype(dtype);
  check_sizes(N, K, S);
  if (mode != 1 && mode != 2) {
    throw std::invalid_argument("rethinkcam_fast.weighted_map_grad: mode must be 1 (layercam) or 2 (flm), got " +
                                std::to_string(mode));
  }
  if (N * S == 0) return;
  if (out == nullptr || (K > 0 && (a == nullptr || g == nullptr))) {
    throw std::invalid_argument("rethinkcam_fast.weighted_map_grad: null pointer");
  }
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* at = static_cast<const T*>(a);
    const T* gt = static_cast<const T*>(g);
    if (mode == 1) {
      run<T, 1>(at, gt, out, N, K, S, a_stride_n, a_stride_k, a_stride_s, g_stride_n, g_stride_k, g_stride_s, relu,
                num_threads);
    } else {
      run<T, 2>(at, gt, out, N, K, S, a_stride_n, a_stride_k, a_stride_s, g_stride_n, g_stride_k, g_stride_s, relu,
                num_threads);
    }
  });
}

}  // namespace cpu
}  // namespace rcam
