// See flm_reduce_backward.h. Numerics, as the PyTorch reference (flm_reduce_backward_reference):
// every element converted to the accumulation type (float32, or float64 for float64 tensors), the
// products formed in the reference's order, ``(dM * relu(x)) * mask`` with the mask 0 or 1 (so a NaN
// or inf product stays NaN where the mask is 0, as in PyTorch), then rounded once to the tensors'
// dtype. Results equal the reference's values and NaN positions (relu(-0.0) is +0 here, -0.0 in the
// reference's fmax, as in the Triton kernel; NaN payloads may differ) and do not depend on num_threads.
//
// Layouts: when both outputs have stride_s == 1 (NCHW) a work item is one (n, k) row over the
// pixels; otherwise one (n, s) pixel over the channels (a contiguous run in channels_last, strided in
// anything else); inputs are read with their own strides. The unit-stride loops are separate
// instantiations so that they vectorise. Each element is written by one thread.
#include "flm_reduce_backward.h"

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "../common/dtype.h"
#include "parallel.h"

namespace rcam {
namespace cpu {
namespace {

// Branch-free forms (a branch on the sign of random-signed data mispredicts half the time, and the
// loops did not vectorise with it; a product by a converted bool GCC turns back into a branch):
// ``value`` where v > 0, else +0, as the value's bits ANDed with a mask. relu(v) (relu(NaN) = +0) is
// kept_where_positive(v, v); the 0/1 factor of the mask products is kept_where_positive(v, 1), by
// which a product is multiplied (so NaN * 0 stays NaN, as in PyTorch).
template <typename A>
inline A kept_where_positive(A v, A value) {
  using U = raw_t<A>;
  const U bits = to_raw(value) & (static_cast<U>(0) - static_cast<U>(v > A(0)));
  A out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

struct Strides {
  int64_t n, k, s;
};

template <typename T>
struct Pass {
  using Acc = acc_t<T>;
  const Acc* dm;
  const T* a;
  const T* g;
  T* da;
  T* dg;
  Strides as, gs, das, dgs;
  const std::vector<uint8_t>* dead;
  int64_t S;  // pixels an image (dM's row length)

  // ``count`` elements of image n from (k, s), stepping by the given strides in each tensor, all
  // under the same dM value (a row: one k, consecutive s) or a run of dM values (a pixel run is one
  // s, so dM is fixed too). A dead image reads neither A nor G (an inf there must not reach the
  // products): the formulas then run on zeros, which keeps the sign of a -0.0 in dM as PyTorch does.
  template <bool Dead, bool Unit, int GradStep>
  static inline void span(const T* __restrict__ pa, const T* __restrict__ pg, T* __restrict__ pda,
                          T* __restrict__ pdg, int64_t count, int64_t sa, int64_t sg, int64_t sda, int64_t sdg,
                          const Acc* __restrict__ grad) {
    // (Unit and GradStep are compile-time so that the unit-stride loops vectorise)
    if (Unit) sa = sg = sda = sdg = 1;
    for (int64_t j = 0; j < count; ++j) {
      const Acc gm = grad[j * GradStep];
      const Acc av = Dead ? Acc(0) : to_acc(pa[j * sa]);
      const Acc gv = Dead ? Acc(0) : to_acc(pg[j * sg]);
      pda[j * sda] = from_acc<T>((gm * kept_where_positive(gv, gv)) * kept_where_positive(av, Acc(1)));
      pdg[j * sdg] = from_acc<T>((gm * kept_where_positive(av, av)) * kept_where_positive(gv, Acc(1)));
    }
  }

  // One work item: image n, channel k, all S pixels (rows) or pixel s, all K channels (pixels).
  inline void item(int64_t n, int64_t k, int64_t s, int64_t count, bool over_s) const {
    const T* pa = a + n * as.n + k * as.k + s * as.s;
    const T* pg = g + n * gs.n + k * gs.k + s * gs.s;
    T* pda = da + n * das.n + k * das.k + s * das.s;
    T* pdg = dg + n * dgs.n + k * dgs.k + s * dgs.s;
    const Acc* row = dm + n * S + s;
    const bool is_dead = (*dead)[static_cast<size_t>(n)] != 0;
    if (over_s) {  // consecutive pixels of one channel: dM steps with the pixel
      spans<1>(pa, pg, pda, pdg, count, as.s, gs.s, das.s, dgs.s, row, is_dead);
    } else {  // the channels of one pixel: one dM value
      spans<0>(pa, pg, pda, pdg, count, as.k, gs.k, das.k, dgs.k, row, is_dead);
    }
  }

  // span() with its compile-time flags chosen: a dead image, unit strides everywhere, or neither.
  template <int GradStep>
  static inline void spans(const T* pa, const T* pg, T* pda, T* pdg, int64_t count, int64_t sa, int64_t sg,
                           int64_t sda, int64_t sdg, const Acc* row, bool is_dead) {
    if (is_dead) {
      span<true, false, GradStep>(pa, pg, pda, pdg, count, sa, sg, sda, sdg, row);
    } else if (sa == 1 && sg == 1 && sda == 1 && sdg == 1) {
      span<false, true, GradStep>(pa, pg, pda, pdg, count, 1, 1, 1, 1, row);
    } else {
      span<false, false, GradStep>(pa, pg, pda, pdg, count, sa, sg, sda, sdg, row);
    }
  }

};

template <typename T>
void run(const Pass<T>& p, int64_t N, int64_t K, int64_t S, int num_threads) {
  const int threads = effective_threads(N * K * S, num_threads, 65536);
  // The outputs' layout decides (they are written once, the inputs' layout follows them in every
  // common case): NCHW outputs take one (n, k) row over the pixels per work item, channels_last ones
  // one (n, s) pixel over the channels. Inputs of another layout (a view, an input expanded along the
  // pixels) are read with their strides either way.
  const bool rows = p.das.s == 1 && p.dgs.s == 1 && !(p.das.k == 1 && p.dgs.k == 1);
  if (rows) {
    parallel_for(0, N * K, threads, [&](int64_t b, int64_t e) {
      for (int64_t item = b; item < e; ++item) p.item(item / K, item % K, 0, S, true);
    });
    return;
  }
  parallel_for(0, N * S, threads, [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) p.item(item / S, 0, item % S, K, false);
  });
}

}  // namespace

void flm_reduce_backward(const void* grad_maps, const void* a, const void* g, void* d_a, void* d_g, int64_t N,
                         int64_t K, int64_t S, const int64_t* a_strides, const int64_t* g_strides,
                         const int64_t* da_strides, const int64_t* dg_strides, int dtype, int num_threads) {
  check_dtype(dtype);
  check_sizes(N, K, S);
  if (N * K * S == 0) return;
  if (grad_maps == nullptr || a == nullptr || g == nullptr || d_a == nullptr || d_g == nullptr) {
    throw std::invalid_argument("rethinkcam_fast.flm_reduce_backward: null pointer");
  }
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    const Acc* dm = static_cast<const Acc*>(grad_maps);
    // An image whose map got no gradient contributes exactly zero (see the header).
    std::vector<uint8_t> dead(static_cast<size_t>(N), 1);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t s = 0; s < S; ++s) {
        if (dm[n * S + s] != Acc(0)) {
          dead[static_cast<size_t>(n)] = 0;
          break;
        }
      }
    }
    const auto strides = [](const int64_t* v) { return Strides{v[0], v[1], v[2]}; };
    const Pass<T> pass{dm, static_cast<const T*>(a), static_cast<const T*>(g), static_cast<T*>(d_a),
                       static_cast<T*>(d_g), strides(a_strides), strides(g_strides), strides(da_strides),
                       strides(dg_strides), &dead, S};
    run<T>(pass, N, K, S, num_threads);
  });
}

}  // namespace cpu
}  // namespace rcam
