// CPU kernel for fuse_maps: every layer of one image upsampled, normalised and fused in a per-thread
// buffer that stays in cache, instead of one full-size temporary per torch op per layer.
//
// It follows the pure-PyTorch reference (fuse_maps_reference) step by step in float32, and agrees
// with it to float32 rounding (measured: at most a few ulp of the [0, 1] result):
//   * bilinear, align_corners=False, ATen's source index and weight: scale = float(in) / out,
//     src = max(scale * (o + 0.5) - 0.5, 0), i0 = min(floor(src), in - 1), i1 = i0 + (i0 < in - 1),
//     l = clamp(src - i0, 0, 1); along x in the two source rows, then along y, each step as
//     a + (b - a) * l, exact where the two neighbours are equal.  That is the one place where this
//     kernel rounds differently from ATen's a * (1 - l) + b * l on purpose: on a map that resizes
//     to a constant (an output side of 1, a symmetric downsample) ATen's last-bit noise would be
//     stretched to [0, 1] by min-max, where here the map stays constant and is flagged (the
//     PyTorch reference, fuse_maps.bilinear_upsample, interpolates the same way);
//   * a layer is degenerate when its source map has a non-finite value or is constant (decided
//     before upsampling, whose rounding can make a constant map differ in the last bit), or when
//     the upsampled span is not a positive finite number; it then contributes zeros;
//   * normalisation divides, (v - lo) / (hi - lo), as the reference does;
//   * layers are fused in order (sum, or a running maximum) and the fused map is normalised again
//     (one layer: already normalised, returned as is).
// Images are independent work items; each is computed by one thread, so results do not depend on
// num_threads.
#include "fuse_maps.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bilinear.h"
#include "parallel.h"

namespace rcam {
namespace cpu {
namespace {

// Bilinear upsampling of m [h, w] into up [H, W]; returns (lo, hi) of the result, or NaNs when a
// value is not finite (finite neighbours near the float32 limit can overflow).
void upsample(const float* m, int64_t w, const BilinearAxis<float>& ya, const BilinearAxis<float>& xa, int64_t H,
              int64_t W, float* up, float* lo_out, float* hi_out) {
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  bool finite = true;
  for (int64_t oy = 0; oy < H; ++oy) {
    const float* r0 = m + ya.i0[static_cast<size_t>(oy)] * w;
    const float* r1 = m + ya.i1[static_cast<size_t>(oy)] * w;
    const float wy1 = ya.l1[static_cast<size_t>(oy)];
    float* dst = up + oy * W;
    for (int64_t ox = 0; ox < W; ++ox) {
      const int64_t x0 = xa.i0[static_cast<size_t>(ox)], x1 = xa.i1[static_cast<size_t>(ox)];
      const float wx1 = xa.l1[static_cast<size_t>(ox)];
      // Equal neighbours give their value exactly (see the top of the file).
      const float v = lerp(lerp(r0[x0], r0[x1], wx1), lerp(r1[x0], r1[x1], wx1), wy1);
      dst[ox] = v;
      finite &= is_finite(v);
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
  }
  *lo_out = finite ? lo : std::numeric_limits<float>::quiet_NaN();
  *hi_out = finite ? hi : std::numeric_limits<float>::quiet_NaN();
}

// Span check shared by the per-layer and final normalisations: degenerate unless 0 < span < inf.
inline bool bad_span(float lo, float hi) {
  const float span = hi - lo;
  return !(span > 0.0f) || !is_finite(span) || !is_finite(lo) || !is_finite(hi);
}

}  // namespace

void fuse_maps(const float* const* maps, const int64_t* heights, const int64_t* widths, int64_t L, int64_t N,
               int64_t H, int64_t W, bool fuse_max, float* out, uint8_t* degenerate, int num_threads) {
  if (L < 1) throw std::invalid_argument("rethinkcam_fast.fuse_maps: no maps");
  if (N < 0 || H < 0 || W < 0) throw std::invalid_argument("rethinkcam_fast.fuse_maps: negative size");
  const int64_t HW = H * W;
  if (N == 0 || HW == 0) return;
  std::vector<BilinearAxis<float>> ys, xs;
  int64_t work = 0;
  for (int64_t l = 0; l < L; ++l) {
    if (heights[l] < 1 || widths[l] < 1 || maps[l] == nullptr) {
      throw std::invalid_argument("rethinkcam_fast.fuse_maps: map " + std::to_string(l) + " is empty or null");
    }
    ys.push_back(bilinear_axis<float>(heights[l], H));
    xs.push_back(bilinear_axis<float>(widths[l], W));
    work += HW + heights[l] * widths[l];
  }
  const int threads = static_cast<int>(std::min<int64_t>(effective_threads(N * work, num_threads, 65536), N));
  parallel_for(0, N, threads, [&](int64_t b, int64_t e) {
    std::unique_ptr<float[]> up(new float[static_cast<size_t>(HW)]);
    for (int64_t n = b; n < e; ++n) {
      float* o = out + n * HW;
      bool layer_bad = false;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t hw = heights[l] * widths[l];
        const float* m = maps[l] + n * hw;
        float lo = 0.0f, hi = 0.0f;
        layer_bad = source_degenerate(m, hw);
        if (!layer_bad) {
          upsample(m, widths[l], ys[static_cast<size_t>(l)], xs[static_cast<size_t>(l)], H, W, up.get(), &lo, &hi);
          layer_bad = bad_span(lo, hi);
        }
        const float span = hi - lo;
        const float* u = up.get();
        if (l == 0) {
          if (layer_bad) {
            std::fill(o, o + HW, 0.0f);
          } else {
            for (int64_t k = 0; k < HW; ++k) o[k] = (u[k] - lo) / span;
          }
        } else if (!layer_bad) {
          if (fuse_max) {
            for (int64_t k = 0; k < HW; ++k) o[k] = std::max(o[k], (u[k] - lo) / span);
          } else {
            for (int64_t k = 0; k < HW; ++k) o[k] = o[k] + (u[k] - lo) / span;
          }
        } else if (fuse_max) {
          for (int64_t k = 0; k < HW; ++k) o[k] = std::max(o[k], 0.0f);
        }  // (sum with a zero map: adding 0.0f changes nothing)
      }
      if (L == 1) {
        degenerate[n] = layer_bad ? 1 : 0;
        continue;
      }
      float lo = std::numeric_limits<float>::infinity(), hi = -lo;
      for (int64_t k = 0; k < HW; ++k) {
        lo = std::min(lo, o[k]);
        hi = std::max(hi, o[k]);
      }
      const bool bad = bad_span(lo, hi);
      degenerate[n] = bad ? 1 : 0;
      if (bad) {
        std::fill(o, o + HW, 0.0f);
      } else {
        const float span = hi - lo;
        for (int64_t k = 0; k < HW; ++k) o[k] = (o[k] - lo) / span;
      }
    }
  });
}

}  // namespace cpu
}  // namespace rcam
