// CPU kernels for TAP: thresholded average pooling.
//
// For every (n, c) row of x ([N, C, S], S = H*W):
//   m     = max_s x[s]                      (NaN-propagating, like torch.max)
//   thr   = round_to_dtype(acc(m) * acc(tau))
//   kept  = x[s] > thr                      (strict; NaN compares false; NaN thr keeps nothing)
//   count = #{s : kept(s) && x[s] > 0}
//   inv   = 1 / max(count, 1)
//   out   = (sum_{kept} x[s]) * inv         (accumulated in acc_t)
// Backward: grad_in[s] = kept(s) ? grad_out * inv : 0.
//
// Memory layouts:
//   * stride_s == 1 (NCHW-contiguous): each row is a contiguous run of S elements; rows are
//     independent work items.  The loops run on 128-bit vectors (simd.h) with four independent
//     accumulators; a scalar loop handles the tail (and everything on other compilers).
//   * stride_c == 1 (channels_last): for one image, sweep s in the outer loop and a tile of
//     consecutive channels in the inner loop, keeping per-channel accumulators in small buffers.
//   * anything else: a plain strided loop per row (correct, not tuned).
// Every (n, c) result is computed by one thread in a fixed order, so the output is deterministic
// and independent of num_threads.
#include "tap.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/dtype.h"
#include "parallel.h"
#include "simd.h"

namespace rcam {
namespace cpu {
namespace {

// Independent accumulators per contiguous row in the scalar code.
constexpr int kLanes = 8;

// Integer counter matching acc_t's width (keeps vectorised compare masks the same width).
template <typename A>
using count_t = std::conditional_t<sizeof(A) == 4, int32_t, int64_t>;

// Channels per tile for the channels_last paths.  Each s step reads one contiguous run of `tile`
// channels.  Long runs keep the hardware prefetchers streaming: measured on a 2-core Xeon, runs
// short enough for a tile's slab to stay in L2 between the two forward passes (at a stride of
// C * sizeof(T) bytes, a new page on every step) were ~2x slower even with software prefetch, and
// splitting an image's channels between threads made a single image slower, not faster.  The
// per-channel accumulators (about 16 bytes per channel) stay in L1/L2.
inline int64_t channels_last_tile(int64_t C) {
  constexpr int64_t kMaxTile = 2048;
  return std::min<int64_t>(C, kMaxTile);
}

// ------------------------------------------------------------------------------------------------
// Forward, one row (kContig: element stride 1, else `stride`).
// ------------------------------------------------------------------------------------------------
template <typename T, bool kContig>
inline void row_forward(const T* __restrict x, int64_t S, int64_t stride, acc_t<T> tau,
                        acc_t<T>* out, acc_t<T>* thr_out, acc_t<T>* inv_out) {
  using A = acc_t<T>;
  using I = count_t<A>;
  const int64_t st = kContig ? 1 : stride;
  const A neg_inf = -std::numeric_limits<A>::infinity();

  // Pass 1: NaN-propagating max.
  A m = neg_inf;
  int64_t s = 0;
#if defined(RCAM_CPU_SIMD)
  if constexpr (kContig) {
    using Tr = simd::Traits<T>;
    using AV = typename Tr::AV;
    using MV = typename Tr::MV;
    constexpr int W = Tr::W;
    // Four independent chains.  The max itself is a plain `v > m ? v : m` (never selects a NaN,
    // maps to maxps), NaNs are tracked separately so the dependency chains stay short.
    AV m0 = simd::splat<AV>(neg_inf), m1 = m0, m2 = m0, m3 = m0;
    MV nan0 = MV{}, nan1 = MV{};
    for (; s + 4 * W <= S; s += 4 * W) {
      AV v0, v1, v2, v3;
      Tr::load_pair(x + s, v0, v1);
      Tr::load_pair(x + s + 2 * W, v2, v3);
      m0 = (v0 > m0) ? v0 : m0;
      m1 = (v1 > m1) ? v1 : m1;
      m2 = (v2 > m2) ? v2 : m2;
      m3 = (v3 > m3) ? v3 : m3;
      nan0 |= (v0 != v0) | (v1 != v1);
      nan1 |= (v2 != v2) | (v3 != v3);
    }
    const AV mm = simd::nan_max(simd::nan_max(m0, m1), simd::nan_max(m2, m3));
    const MV nn = nan0 | nan1;
    bool any_nan = false;
    for (int j = 0; j < W; ++j) {
      m = nan_max(m, A(mm[j]));
      any_nan |= (nn[j] != 0);
    }
    if (any_nan) m = std::numeric_limits<A>::quiet_NaN();
  }
#endif
  {
    A mx[kLanes];
    for (int j = 0; j < kLanes; ++j) mx[j] = neg_inf;
    for (; s + kLanes <= S; s += kLanes) {
      for (int j = 0; j < kLanes; ++j) mx[j] = nan_max(mx[j], to_acc(x[(s + j) * st]));
    }
    for (; s < S; ++s) m = nan_max(m, to_acc(x[s * st]));
    for (int j = 0; j < kLanes; ++j) m = nan_max(m, mx[j]);
  }

  const A thr = tap_threshold<T>(m, tau);

  // Pass 2: masked sum and positive count.
  A sum = A(0);
  int64_t count = 0;
  s = 0;
#if defined(RCAM_CPU_SIMD)
  if constexpr (kContig) {
    using Tr = simd::Traits<T>;
    using AV = typename Tr::AV;
    using MV = typename Tr::MV;
    constexpr int W = Tr::W;
    const AV t = simd::splat<AV>(thr);
    const AV z = simd::splat<AV>(A(0));
    AV s0 = z, s1 = z, s2 = z, s3 = z;
    MV c0 = MV{}, c1 = MV{};
    for (; s + 4 * W <= S; s += 4 * W) {
      AV v0, v1, v2, v3;
      Tr::load_pair(x + s, v0, v1);
      Tr::load_pair(x + s + 2 * W, v2, v3);
      const MV k0 = v0 > t, k1 = v1 > t;  // lanes: -1 where kept, 0 otherwise (NaN: 0)
      const MV k2 = v2 > t, k3 = v3 > t;
      s0 += k0 ? v0 : z;
      s1 += k1 ? v1 : z;
      s2 += k2 ? v2 : z;
      s3 += k3 ? v3 : z;
      c0 += (k0 & (v0 > z)) + (k1 & (v1 > z));  // adds -1 per counted lane
      c1 += (k2 & (v2 > z)) + (k3 & (v3 > z));
    }
    const AV sv = (s0 + s1) + (s2 + s3);
    const MV cv = -(c0 + c1);
    for (int j = 0; j < W; ++j) {
      sum += sv[j];
      count += cv[j];
    }
  }
#endif
  {
    A sm[kLanes];
    I cn[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      sm[j] = A(0);
      cn[j] = 0;
    }
    for (; s + kLanes <= S; s += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const A v = to_acc(x[(s + j) * st]);
        const bool k = v > thr;
        sm[j] += k ? v : A(0);
        cn[j] += static_cast<I>(k & (v > A(0)));
      }
    }
    for (int j = 0; j < kLanes; ++j) {
      sum += sm[j];
      count += cn[j];
    }
    for (; s < S; ++s) {
      const A v = to_acc(x[s * st]);
      const bool k = v > thr;
      sum += k ? v : A(0);
      count += static_cast<int64_t>(k & (v > A(0)));
    }
  }
  const A inv = A(1) / static_cast<A>(std::max<int64_t>(count, 1));
  *out = sum * inv;
  *thr_out = thr;
  *inv_out = inv;
}

// ------------------------------------------------------------------------------------------------
// Forward, channels_last: one image, channels [c0, c0 + cw).  `xn` points at x[n, 0, 0]; the
// channel stride is 1.  The max is accumulated in thr_row and the sum in out_row (both acc_t
// output rows for this tile), the counts in cnt (scratch).
// ------------------------------------------------------------------------------------------------
template <typename T>
void tile_forward_cl(const T* __restrict xn, int64_t c0, int64_t cw, int64_t S, int64_t ss,
                     acc_t<T> tau, acc_t<T>* __restrict out_row, acc_t<T>* __restrict thr_row,
                     acc_t<T>* __restrict inv_row, count_t<acc_t<T>>* __restrict cnt) {
  using A = acc_t<T>;
  using I = count_t<A>;
  const A neg_inf = -std::numeric_limits<A>::infinity();
#if defined(RCAM_CPU_SIMD)
  using Tr = simd::Traits<T>;
  using AV = typename Tr::AV;
  using MV = typename Tr::MV;
  constexpr int64_t W = Tr::W;
  static_assert(sizeof(MV) == sizeof(I) * W, "count lanes must match acc lanes");
#endif

  // Pass 1: running max per channel, kept in thr_row.
  for (int64_t c = 0; c < cw; ++c) thr_row[c] = neg_inf;
  for (int64_t s = 0; s < S; ++s) {
    const T* __restrict xs = xn + s * ss + c0;
    int64_t c = 0;
#if defined(RCAM_CPU_SIMD)
    for (; c + W <= cw; c += W) {
      simd::storeu(thr_row + c, simd::nan_max(simd::loadu<AV>(thr_row + c), Tr::load(xs + c)));
    }
#endif
    for (; c < cw; ++c) thr_row[c] = nan_max(thr_row[c], to_acc(xs[c]));
  }
  for (int64_t c = 0; c < cw; ++c) thr_row[c] = tap_threshold<T>(thr_row[c], tau);

  // Pass 2: masked sum per channel kept in out_row, positive counts in cnt.
  for (int64_t c = 0; c < cw; ++c) {
    out_row[c] = A(0);
    cnt[c] = 0;
  }
  for (int64_t s = 0; s < S; ++s) {
    const T* __restrict xs = xn + s * ss + c0;
    int64_t c = 0;
#if defined(RCAM_CPU_SIMD)
    const AV z = simd::splat<AV>(A(0));
    for (; c + W <= cw; c += W) {
      const AV v = Tr::load(xs + c);
      const MV k = v > simd::loadu<AV>(thr_row + c);
      simd::storeu(out_row + c, simd::loadu<AV>(out_row + c) + (k ? v : z));
      simd::storeu(cnt + c, simd::loadu<MV>(cnt + c) - (k & (v > z)));
    }
#endif
    for (; c < cw; ++c) {
      const A v = to_acc(xs[c]);
      const bool k = v > thr_row[c];
      out_row[c] += k ? v : A(0);
      cnt[c] += static_cast<I>(k & (v > A(0)));
    }
  }
  for (int64_t c = 0; c < cw; ++c) {
    const A inv = A(1) / static_cast<A>(std::max<I>(cnt[c], 1));
    inv_row[c] = inv;
    out_row[c] = out_row[c] * inv;
  }
}

template <typename T>
void forward_impl(const T* x, acc_t<T>* out, acc_t<T>* thr, acc_t<T>* inv, int64_t N, int64_t C,
                  int64_t S, int64_t sn, int64_t sc, int64_t ss, double tau_d, int num_threads) {
  using A = acc_t<T>;
  const A tau = static_cast<A>(tau_d);
  const int64_t rows = N * C;
  const int nt = effective_threads(rows * std::max<int64_t>(S, 1), num_threads);

  if (S > 1 && sc == 1 && ss != 1) {
    // channels_last
    const int64_t tile = channels_last_tile(C);
    const int64_t ntiles = (C + tile - 1) / tile;
    parallel_for(0, N * ntiles, nt, [&](int64_t b, int64_t e) {
      std::vector<count_t<A>> cnt(static_cast<size_t>(tile));
      for (int64_t it = b; it < e; ++it) {
        const int64_t n = it / ntiles;
        const int64_t c0 = (it % ntiles) * tile;
        const int64_t cw = std::min(tile, C - c0);
        const int64_t o = n * C + c0;
        tile_forward_cl<T>(x + n * sn, c0, cw, S, ss, tau, out + o, thr + o, inv + o, cnt.data());
      }
    });
    return;
  }

  const bool contig = (ss == 1) || (S == 1);
  parallel_for(0, rows, nt, [&](int64_t b, int64_t e) {
    int64_t n = b / C, c = b % C;
    for (int64_t r = b; r < e; ++r) {
      const T* xr = x + n * sn + c * sc;
      if (contig) {
        row_forward<T, true>(xr, S, 1, tau, out + r, thr + r, inv + r);
      } else {
        row_forward<T, false>(xr, S, ss, tau, out + r, thr + r, inv + r);
      }
      if (++c == C) {
        c = 0;
        ++n;
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Backward.
// ------------------------------------------------------------------------------------------------
template <typename T, bool kContig>
inline void row_backward(const T* __restrict x, raw_t<T>* __restrict g, int64_t S, int64_t xs,
                         int64_t gs, acc_t<T> thr, raw_t<T> gval) {
  const int64_t xst = kContig ? 1 : xs;
  const int64_t gst = kContig ? 1 : gs;
  const raw_t<T> zero = raw_t<T>(0);  // +0 in every supported format
  int64_t s = 0;
#if defined(RCAM_CPU_SIMD)
  if constexpr (kContig) {
    using Tr = simd::Traits<T>;
    using AV = typename Tr::AV;
    using RV = typename Tr::RV;
    constexpr int W = Tr::W;
    const AV t = simd::splat<AV>(thr);
    const RV gv = simd::splat<RV>(gval);
    for (; s + W <= S; s += W) simd::storeu(g + s, Tr::narrow(Tr::load(x + s) > t) & gv);
  }
#endif
  for (; s < S; ++s) {
    g[s * gst] = (to_acc(x[s * xst]) > thr) ? gval : zero;
  }
}

template <typename T>
void tile_backward_cl(const T* __restrict xn, raw_t<T>* __restrict gn, int64_t cw, int64_t S,
                      int64_t xss, int64_t gss, const acc_t<T>* __restrict thr_row,
                      const raw_t<T>* __restrict gval) {
  const raw_t<T> zero = raw_t<T>(0);
#if defined(RCAM_CPU_SIMD)
  using Tr = simd::Traits<T>;
  using AV = typename Tr::AV;
  using RV = typename Tr::RV;
  constexpr int64_t W = Tr::W;
#endif
  for (int64_t s = 0; s < S; ++s) {
    const T* __restrict xs = xn + s * xss;
    raw_t<T>* __restrict gs = gn + s * gss;
    int64_t c = 0;
#if defined(RCAM_CPU_SIMD)
    for (; c + W <= cw; c += W) {
      const RV k = Tr::narrow(Tr::load(xs + c) > simd::loadu<AV>(thr_row + c));
      simd::storeu(gs + c, k & simd::loadu<RV>(gval + c));
    }
#endif
    for (; c < cw; ++c) gs[c] = (to_acc(xs[c]) > thr_row[c]) ? gval[c] : zero;
  }
}

template <typename T>
void backward_impl(const acc_t<T>* gout, const T* x, const acc_t<T>* thr, const acc_t<T>* inv,
                   T* gin, int64_t N, int64_t C, int64_t S, int64_t xsn, int64_t xsc, int64_t xss,
                   int64_t gsn, int64_t gsc, int64_t gss, int num_threads) {
  using R = raw_t<T>;
  R* g = reinterpret_cast<R*>(gin);
  const int64_t rows = N * C;
  const int nt = effective_threads(rows * std::max<int64_t>(S, 1), num_threads);
  auto gval_of = [&](int64_t r) { return to_raw(from_acc<T>(gout[r] * inv[r])); };

  if (S > 1 && xsc == 1 && gsc == 1 && !(xss == 1 && gss == 1)) {
    // channels_last
    const int64_t tile = channels_last_tile(C);
    const int64_t ntiles = (C + tile - 1) / tile;
    parallel_for(0, N * ntiles, nt, [&](int64_t b, int64_t e) {
      std::vector<R> gv(static_cast<size_t>(tile));
      for (int64_t it = b; it < e; ++it) {
        const int64_t n = it / ntiles;
        const int64_t c0 = (it % ntiles) * tile;
        const int64_t cw = std::min(tile, C - c0);
        for (int64_t c = 0; c < cw; ++c) gv[static_cast<size_t>(c)] = gval_of(n * C + c0 + c);
        tile_backward_cl<T>(x + n * xsn + c0, g + n * gsn + c0, cw, S, xss, gss, thr + n * C + c0,
                            gv.data());
      }
    });
    return;
  }

  const bool contig = (S == 1) || (xss == 1 && gss == 1);
  parallel_for(0, rows, nt, [&](int64_t b, int64_t e) {
    int64_t n = b / C, c = b % C;
    for (int64_t r = b; r < e; ++r) {
      const T* xr = x + n * xsn + c * xsc;
      R* gr = g + n * gsn + c * gsc;
      if (contig) {
        row_backward<T, true>(xr, gr, S, 1, 1, thr[r], gval_of(r));
      } else {
        row_backward<T, false>(xr, gr, S, xss, gss, thr[r], gval_of(r));
      }
      if (++c == C) {
        c = 0;
        ++n;
      }
    }
  });
}

}  // namespace

void tap_forward(const void* x, void* out, void* thr, void* inv, int64_t N, int64_t C, int64_t S,
                 int64_t stride_n, int64_t stride_c, int64_t stride_s, double tau, int dtype,
                 int num_threads) {
  check_dtype(dtype);
  check_sizes(N, C, S);
  if (N == 0 || C == 0) return;
  if (!x || !out || !thr || !inv) {
    throw std::invalid_argument("rethinkcam_fast.tap_forward: null pointer");
  }
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    forward_impl<T>(static_cast<const T*>(x), static_cast<A*>(out), static_cast<A*>(thr),
                    static_cast<A*>(inv), N, C, S, stride_n, stride_c, stride_s, tau, num_threads);
  });
}

void tap_backward(const void* grad_out, const void* x, const void* thr, const void* inv,
                  void* grad_in, int64_t N, int64_t C, int64_t S, int64_t x_stride_n,
                  int64_t x_stride_c, int64_t x_stride_s, int64_t g_stride_n, int64_t g_stride_c,
                  int64_t g_stride_s, int dtype, int num_threads) {
  check_dtype(dtype);
  check_sizes(N, C, S);
  if (N == 0 || C == 0 || S == 0) return;
  if (!grad_out || !x || !thr || !inv || !grad_in) {
    throw std::invalid_argument("rethinkcam_fast.tap_backward: null pointer");
  }
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    backward_impl<T>(static_cast<const A*>(grad_out), static_cast<const T*>(x),
                     static_cast<const A*>(thr), static_cast<const A*>(inv), static_cast<T*>(grad_in),
                     N, C, S, x_stride_n, x_stride_c, x_stride_s, g_stride_n, g_stride_c,
                     g_stride_s, num_threads);
  });
}

}  // namespace cpu
}  // namespace rcam
