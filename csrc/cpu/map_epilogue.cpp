// CPU kernels of the differentiable CAM epilogue: forward and backward of map_epilogue_reference
// (rethinkcam_fast/ops/map_epilogue.py), one image per work item, every layer of it in per-thread
// buffers of one output map each that stay in cache, instead of a full-size temporary per torch op.
//
// The arithmetic is the reference's, step by step, in the maps' type T:
//   * U_l = bilinear(M_l) (align_corners=False, ATen's indices and weights: bilinear.h), computed as
//     the engine's fuse_maps.cpp computes it, lerp(lerp(m00, m01, lx1), lerp(m10, m11, lx1), ly1):
//     exact where neighbours are equal, so the pixels of a plateau at a map's extreme all tie there
//     and share its gradient (F.interpolate's rounding leaves some of them an ulp off; elsewhere the
//     two agree to rounding); without normalisation, F.interpolate's formula;
//   * P_l = (U_l - lo) / (hi - lo), zeros when the source map is constant or non-finite (judged in
//     T, float64 for float64 maps), when U_l holds a non-finite value, or when hi - lo is not a
//     positive finite number (a span past T's range would normalise to NaN);
//   * several maps: F = P_0 + P_1 + ... in order, or their maximum (NaN propagating, as amax), then
//     F's own min-max (one map: out = P_0; normalize = false: out = U_0).
// The backward differentiates that function as autograd differentiates the reference: the min and
// the max carry gradient, shared evenly by their tied pixels,
//     dx = g / span + [x == lo] * (s2 - s1) / (span * #lo) - [x == hi] * s2 / (span * #hi),
//     s1 = sum g, s2 = sum g * (x - lo) / span,
// (written as the reference writes it, with inv = 1 / span), zero for a degenerate map; with max
// fusion a pixel's gradient is shared evenly by the layers tied at the maximum; the adjoint of the
// upsampling applies ATen's weights separably (a row of outputs into a row of sources, then into
// the two source rows), computing each output's gradient as it goes (no [H, W] gradient is stored).
// The backward recomputes U_l, P_l and F with the forward's code, so the pixels found at a minimum,
// a maximum or a tie are the forward's. s1 and s2 are summed in double (the reference sums float32
// in float32, pairwise); the results agree with the reference's to rounding (a few ulp in float64).
// Results do not depend on the number of threads.
#include "map_epilogue.h"

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

template <typename T>
struct Layer {
  const T* maps;  // [N, h, w]
  int64_t h, w;
  BilinearAxis<T> ys, xs;
};

template <typename T>
std::vector<Layer<T>> layer_tables(const void* const* maps, const int64_t* heights, const int64_t* widths, int64_t L,
                                   int64_t H, int64_t W) {
  std::vector<Layer<T>> layers;
  for (int64_t l = 0; l < L; ++l) {
    if (heights[l] < 1 || widths[l] < 1 || maps[l] == nullptr) {
      throw std::invalid_argument("rethinkcam_fast.map_epilogue: map " + std::to_string(l) + " is empty or null");
    }
    layers.push_back({static_cast<const T*>(maps[l]), heights[l], widths[l], bilinear_axis<T>(heights[l], H),
                      bilinear_axis<T>(widths[l], W)});
  }
  return layers;
}

// Upsampling of image n's map of a layer into up [H, W]: by lerp (see the top of the file), or with
// Raw (normalize = false) by F.interpolate's formula, (m00 * lx0 + m01 * lx1) * ly0 + (m10 * lx0 +
// m11 * lx1) * ly1 (equal to its results to rounding): there no extreme is taken, and an infinite
// value stays infinite (lerp's inf - inf would make it NaN).
template <bool Raw = false, typename T>
void upsample(const Layer<T>& layer, int64_t n, int64_t H, int64_t W, T* up) {
  const T* m = layer.maps + n * layer.h * layer.w;
  for (int64_t oy = 0; oy < H; ++oy) {
    const size_t y = static_cast<size_t>(oy);
    const T* r0 = m + layer.ys.i0[y] * layer.w;
    const T* r1 = m + layer.ys.i1[y] * layer.w;
    const T ly0 = layer.ys.l0[y], ly1 = layer.ys.l1[y];
    T* dst = up + oy * W;
    for (int64_t ox = 0; ox < W; ++ox) {
      const size_t x = static_cast<size_t>(ox);
      const int64_t x0 = layer.xs.i0[x], x1 = layer.xs.i1[x];
      const T lx0 = layer.xs.l0[x], lx1 = layer.xs.l1[x];
      if constexpr (Raw) {
        dst[ox] = (r0[x0] * lx0 + r0[x1] * lx1) * ly0 + (r1[x0] * lx0 + r1[x1] * lx1) * ly1;
      } else {
        dst[ox] = lerp(lerp(r0[x0], r0[x1], lx1), lerp(r1[x0], r1[x1], lx1), ly1);
      }
    }
  }
}

// The adjoint of upsample: grad_map [h, w] = the sum of each output's gradient d(k) (k = oy * W + ox,
// a function: values are computed as they are scattered) times its four weights; separably, a row
// of outputs into row [w] first, then into the two source rows. grad_map is overwritten.
template <typename T, typename D>
void upsample_adjoint(const Layer<T>& layer, int64_t H, int64_t W, const D& d, T* row, T* grad_map) {
  std::fill(grad_map, grad_map + layer.h * layer.w, static_cast<T>(0));
  for (int64_t oy = 0; oy < H; ++oy) {
    std::fill(row, row + layer.w, static_cast<T>(0));
    for (int64_t ox = 0; ox < W; ++ox) {
      const size_t x = static_cast<size_t>(ox);
      const T v = d(oy * W + ox);
      row[layer.xs.i0[x]] += layer.xs.l0[x] * v;
      row[layer.xs.i1[x]] += layer.xs.l1[x] * v;
    }
    const size_t y = static_cast<size_t>(oy);
    T* r0 = grad_map + layer.ys.i0[y] * layer.w;
    T* r1 = grad_map + layer.ys.i1[y] * layer.w;
    const T ly0 = layer.ys.l0[y], ly1 = layer.ys.l1[y];
    for (int64_t j = 0; j < layer.w; ++j) {
      r0[j] += ly0 * row[j];
      r1[j] += ly1 * row[j];
    }
  }
}

// A map's min-max statistics as the reference's _minmax_differentiable decides them.
template <typename T>
struct Range {
  T lo = 0, hi = 0;
  bool degenerate = true;
};

template <typename T>
Range<T> min_max(const T* x, int64_t count, bool forced) {
  T lo = std::numeric_limits<T>::infinity(), hi = -lo;
  bool finite = true;
  for (int64_t k = 0; k < count; ++k) {
    finite &= is_finite(x[k]);
    lo = std::min(lo, x[k]);
    hi = std::max(hi, x[k]);
  }
  Range<T> r;
  // A non-finite value (NaN or inf) makes amin or amax non-finite: the reference zeroes the map.
  // (a span past T's range, finite values near +-3e38 in float32, would normalise to NaN)
  r.degenerate = forced || !finite || !(hi - lo > static_cast<T>(0)) || !is_finite(hi - lo);
  r.lo = lo;
  r.hi = hi;
  return r;
}

// amax over layers: NaN wins, as torch's.
template <typename T>
inline T max_nan(T a, T b) {
  return (a != a || b != b) ? std::numeric_limits<T>::quiet_NaN() : std::max(a, b);
}

// P = minmax(x) into p (may alias x); returns the statistics.
template <typename T>
Range<T> normalize_into(const T* x, int64_t count, bool forced, T* p) {
  const Range<T> r = min_max(x, count, forced);
  if (r.degenerate) {
    std::fill(p, p + count, static_cast<T>(0));
  } else {
    const T span = r.hi - r.lo;
    for (int64_t k = 0; k < count; ++k) p[k] = (x[k] - r.lo) / span;
  }
  return r;
}

// The per-image work of both passes: recomputes each layer's upsampling and normalisation.
template <typename T>
struct Image {
  const std::vector<Layer<T>>& layers;
  int64_t L, H, W, HW;
  bool fuse_max;
  std::unique_ptr<T[]> up, part;
  std::vector<uint8_t> forced;  // [L] of the current image: its source map constant or non-finite

  Image(const std::vector<Layer<T>>& layers_, int64_t H_, int64_t W_, bool max_)
      : layers(layers_), L(static_cast<int64_t>(layers_.size())), H(H_), W(W_), HW(H_ * W_), fuse_max(max_),
        up(new T[static_cast<size_t>(H_ * W_)]), part(new T[static_cast<size_t>(H_ * W_)]),
        forced(static_cast<size_t>(L)) {}

  // Image n's per-layer source checks, before its other work.
  void start(int64_t n) {
    for (int64_t l = 0; l < L; ++l) {
      const Layer<T>& layer = layers[static_cast<size_t>(l)];
      const int64_t hw = layer.h * layer.w;
      forced[static_cast<size_t>(l)] = source_degenerate<T>(layer.maps + n * hw, hw) ? 1 : 0;
    }
  }

  bool forced_at(int64_t l) const { return forced[static_cast<size_t>(l)] != 0; }

  // up = U_l, part = P_l of image n (after start(n)); returns P_l's statistics.
  Range<T> layer(int64_t n, int64_t l) {
    upsample(layers[static_cast<size_t>(l)], n, H, W, up.get());
    return normalize_into(up.get(), HW, forced_at(l), part.get());
  }

  // fused = F (before its own min-max) of image n, for several layers.
  void fuse(int64_t n, T* fused) {
    for (int64_t l = 0; l < L; ++l) {
      layer(n, l);
      const T* p = part.get();
      if (l == 0) {
        std::copy(p, p + HW, fused);
      } else if (fuse_max) {
        for (int64_t k = 0; k < HW; ++k) fused[k] = max_nan(fused[k], p[k]);
      } else {
        for (int64_t k = 0; k < HW; ++k) fused[k] = fused[k] + p[k];
      }
    }
  }
};

// The gradient of minmax at x (the reference's _minmax_backward) for an upstream gradient g:
// at(g(k), x[k]), or zeros when degenerate.
template <typename T>
struct MinMaxGrad {
  T lo = 0, hi = 0, inv = 0, a_lo = 0, a_hi = 0;
  bool degenerate = true;

  T at(T g, T x) const {
    return g * inv + (x == lo ? a_lo : static_cast<T>(0)) + (x == hi ? a_hi : static_cast<T>(0));
  }
};

// g: k -> the upstream gradient at k.
template <typename T, typename G>
MinMaxGrad<T> minmax_grad(const G& g, const T* x, int64_t count, bool forced) {
  const Range<T> r = min_max(x, count, forced);
  MinMaxGrad<T> c;
  if (r.degenerate) return c;
  c.degenerate = false;
  c.lo = r.lo;
  c.hi = r.hi;
  c.inv = static_cast<T>(1) / (r.hi - r.lo);
  double s1 = 0.0, s2 = 0.0;
  int64_t c_lo = 0, c_hi = 0;
  for (int64_t k = 0; k < count; ++k) {
    const T gk = g(k);
    s1 += static_cast<double>(gk);
    s2 += static_cast<double>(gk * (x[k] - r.lo));
    c_lo += x[k] == r.lo;
    c_hi += x[k] == r.hi;
  }
  const T sum1 = static_cast<T>(s1);
  const T sum2 = static_cast<T>(s2) * c.inv;
  c.a_lo = c.inv * (sum2 - sum1) / static_cast<T>(c_lo);
  c.a_hi = -c.inv * sum2 / static_cast<T>(c_hi);
  return c;
}

template <typename T>
int threads_for(const std::vector<Layer<T>>& layers, int64_t N, int64_t HW, int num_threads) {
  int64_t work = 0;
  for (const Layer<T>& layer : layers) work += 3 * HW + layer.h * layer.w;
  return static_cast<int>(std::min<int64_t>(effective_threads(N * work, num_threads, 65536), N));
}

template <typename T>
void forward(const void* const* maps, const int64_t* heights, const int64_t* widths, int64_t L, int64_t N, int64_t H,
             int64_t W, bool fuse_max, bool normalize, T* out, uint8_t* degenerate, int num_threads) {
  const std::vector<Layer<T>> layers = layer_tables<T>(maps, heights, widths, L, H, W);
  const int64_t HW = H * W;
  const int threads = threads_for(layers, N, HW, num_threads);
  parallel_for(0, N, threads, [&](int64_t b, int64_t e) {
    Image<T> image(layers, H, W, fuse_max);
    for (int64_t n = b; n < e; ++n) {
      T* o = out + n * HW;
      if (!normalize) {
        upsample<true>(layers[0], n, H, W, o);
        degenerate[n] = 0;
      } else if (L == 1) {
        image.start(n);
        upsample(layers[0], n, H, W, o);
        degenerate[n] = normalize_into(o, HW, image.forced_at(0), o).degenerate ? 1 : 0;
      } else {
        image.start(n);
        image.fuse(n, o);
        degenerate[n] = normalize_into(o, HW, false, o).degenerate ? 1 : 0;
      }
    }
  });
}

template <typename T>
void backward(const T* grad, const void* const* maps, const int64_t* heights, const int64_t* widths, int64_t L,
              int64_t N, int64_t H, int64_t W, bool fuse_max, bool normalize, void* const* grad_maps,
              int num_threads) {
  const std::vector<Layer<T>> layers = layer_tables<T>(maps, heights, widths, L, H, W);
  const int64_t HW = H * W;
  const int threads = threads_for(layers, N, HW, num_threads);
  auto grad_map = [&](int64_t l, int64_t n) {
    const Layer<T>& layer = layers[static_cast<size_t>(l)];
    return static_cast<T*>(grad_maps[l]) + n * layer.h * layer.w;
  };
  int64_t max_w = 0;
  for (const Layer<T>& layer : layers) max_w = std::max(max_w, layer.w);
  parallel_for(0, N, threads, [&](int64_t b, int64_t e) {
    Image<T> image(layers, H, W, fuse_max);
    const size_t hw = static_cast<size_t>(HW);
    std::unique_ptr<T[]> row(new T[static_cast<size_t>(max_w)]);
    std::unique_ptr<T[]> fused(L > 1 ? new T[hw] : nullptr), d_fused(L > 1 ? new T[hw] : nullptr);
    std::unique_ptr<T[]> ties(fuse_max && L > 1 ? new T[hw] : nullptr);
    const T* up = image.up.get();
    const T* part = image.part.get();
    // Layer l's gradient through its min-max and upsampling, from its upstream gradient share(k).
    auto layer_backward = [&](int64_t n, int64_t l, const auto& share) {
      const Layer<T>& layer = layers[static_cast<size_t>(l)];
      T* out = grad_map(l, n);
      const MinMaxGrad<T> c = minmax_grad(share, up, HW, image.forced_at(l));
      if (c.degenerate) {
        std::fill(out, out + layer.h * layer.w, static_cast<T>(0));
      } else {
        upsample_adjoint(layer, H, W, [&](int64_t k) { return c.at(share(k), up[k]); }, row.get(), out);
      }
    };
    for (int64_t n = b; n < e; ++n) {
      const T* g = grad + n * HW;
      auto upstream = [g](int64_t k) { return g[k]; };
      if (!normalize) {
        upsample_adjoint(layers[0], H, W, upstream, row.get(), grad_map(0, n));
        continue;
      }
      image.start(n);
      if (L == 1) {
        upsample(layers[0], n, H, W, image.up.get());
        layer_backward(n, 0, upstream);
        continue;
      }
      image.fuse(n, fused.get());
      const MinMaxGrad<T> c = minmax_grad(upstream, fused.get(), HW, false);
      for (int64_t k = 0; k < HW; ++k) d_fused[k] = c.degenerate ? static_cast<T>(0) : c.at(g[k], fused[k]);
      if (fuse_max) {  // how many layers reach the maximum at each pixel
        std::fill(ties.get(), ties.get() + HW, static_cast<T>(0));
        for (int64_t l = 0; l < L; ++l) {
          image.layer(n, l);
          for (int64_t k = 0; k < HW; ++k) ties[k] += part[k] == fused[k] ? static_cast<T>(1) : static_cast<T>(0);
        }
      }
      for (int64_t l = 0; l < L; ++l) {
        image.layer(n, l);
        if (fuse_max) {  // (g * tied) / #tied, as the reference writes it
          layer_backward(n, l, [&](int64_t k) {
            return d_fused[k] * (part[k] == fused[k] ? static_cast<T>(1) : static_cast<T>(0)) / ties[k];
          });
        } else {
          layer_backward(n, l, [&](int64_t k) { return d_fused[k]; });
        }
      }
    }
  });
}

void check_sizes(int64_t L, int64_t N, int64_t H, int64_t W, bool normalize, int dtype) {
  if (L < 1) throw std::invalid_argument("rethinkcam_fast.map_epilogue: no maps");
  if (!normalize && L != 1) throw std::invalid_argument("rethinkcam_fast.map_epilogue: normalize=False takes one map");
  if (N < 0 || H < 0 || W < 0) throw std::invalid_argument("rethinkcam_fast.map_epilogue: negative size");
  if (dtype != 0 && dtype != 1) {
    throw std::invalid_argument("rethinkcam_fast.map_epilogue: dtype must be 0 (float32) or 1 (float64)");
  }
}

}  // namespace

void map_epilogue_forward(const void* const* maps, const int64_t* heights, const int64_t* widths, int64_t L,
                          int64_t N, int64_t H, int64_t W, bool fuse_max, bool normalize, void* out,
                          uint8_t* degenerate, int dtype, int num_threads) {
  check_sizes(L, N, H, W, normalize, dtype);
  if (N == 0 || H * W == 0) return;
  if (dtype == 0) {
    forward<float>(maps, heights, widths, L, N, H, W, fuse_max, normalize, static_cast<float*>(out), degenerate,
                   num_threads);
  } else {
    forward<double>(maps, heights, widths, L, N, H, W, fuse_max, normalize, static_cast<double*>(out), degenerate,
                    num_threads);
  }
}

void map_epilogue_backward(const void* grad, const void* const* maps, const int64_t* heights, const int64_t* widths,
                           int64_t L, int64_t N, int64_t H, int64_t W, bool fuse_max, bool normalize,
                           void* const* grad_maps, int dtype, int num_threads) {
  check_sizes(L, N, H, W, normalize, dtype);
  if (N == 0) return;  // (empty buffers may have null addresses)
  if (H * W > 0 && grad == nullptr) throw std::invalid_argument("rethinkcam_fast.map_epilogue: null grad");
  for (int64_t l = 0; l < L; ++l) {
    if (grad_maps[l] == nullptr) throw std::invalid_argument("rethinkcam_fast.map_epilogue: null gradient buffer");
  }
  if (H * W == 0) {  // no outputs: every gradient is zero
    for (int64_t l = 0; l < L; ++l) {
      const size_t count = static_cast<size_t>(N * heights[l] * widths[l]);
      if (dtype == 0) {
        std::fill(static_cast<float*>(grad_maps[l]), static_cast<float*>(grad_maps[l]) + count, 0.0f);
      } else {
        std::fill(static_cast<double*>(grad_maps[l]), static_cast<double*>(grad_maps[l]) + count, 0.0);
      }
    }
    return;
  }
  if (dtype == 0) {
    backward<float>(static_cast<const float*>(grad), maps, heights, widths, L, N, H, W, fuse_max, normalize,
                    grad_maps, num_threads);
  } else {
    backward<double>(static_cast<const double*>(grad), maps, heights, widths, L, N, H, W, fuse_max, normalize,
                     grad_maps, num_threads);
  }
}

}  // namespace cpu
}  // namespace rcam
