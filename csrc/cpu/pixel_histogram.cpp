// PxAP histograms, parallel over contiguous chunks of pixels (see pixel_histogram.h).
#include "pixel_histogram.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "../common/dtype.h"
#include "parallel.h"

namespace rcam {
namespace cpu {
namespace {

// The bin of x, or -1 when x is outside [edges[0], edges[num_bins]] or NaN.  With a hint
// (inv_interval > 0): floor(x * (1 / interval)) is within one of the true bin for x below the
// arithmetic edges (a few roundings, each a relative error <= 2^-53), so one exact comparison on
// each side settles it; anything the guess does not settle goes to the binary search.
inline int64_t bin_of(double x, const double* edges, int64_t num_bins, double inv_interval, int64_t arithmetic_top) {
  if (!(x >= edges[0] && x <= edges[num_bins])) return -1;
  if (x == edges[num_bins]) return num_bins - 1;  // the closed last bin
  if (inv_interval > 0.0) {
    const double guess = std::floor(x * inv_interval);
    int64_t i = guess < 0.0 ? 0 : guess > static_cast<double>(arithmetic_top) ? arithmetic_top
                                                                               : static_cast<int64_t>(guess);
    i -= edges[i] > x ? 1 : 0;
    i += edges[i + 1] <= x ? 1 : 0;
    if (i >= 0 && edges[i] <= x && x < edges[i + 1]) return i;
  }
  // upper_bound: first edge > x; x < edges[num_bins] here, so the bin is that index - 1.
  return static_cast<int64_t>(std::upper_bound(edges, edges + num_bins + 1, x) - edges) - 1;
}

// Neighbouring pixels of a CAM mostly share a bin: incrementing one counter for all of them would
// chain every increment through the same memory word.  Pixels go round-robin to kLanes copies of
// the histogram instead, added up at the end.
constexpr int kLanes = 4;

}  // namespace

void pixel_histogram(const void* x, int dtype, int64_t count, const uint8_t* foreground, const uint8_t* ignore,
                     const double* edges, int64_t num_bins, double interval, int64_t* counts, int num_threads) {
  if (count < 0 || num_bins < 1) throw std::invalid_argument("rethinkcam_fast.pixel_histogram: bad sizes");
  if (count == 0) return;
  if (x == nullptr || foreground == nullptr || edges == nullptr || counts == nullptr) {
    throw std::invalid_argument("rethinkcam_fast.pixel_histogram: null pointer");
  }
  // The arithmetic guess is clamped to the last bin whose lower edge is a multiple of interval
  // (the bins above, [1, 2) and [2, 3] in PxAP, are reached through the fix-up or the search).
  const int64_t arithmetic_top = std::max<int64_t>(0, num_bins - 2);
  const double inv_interval = interval > 0.0 ? 1.0 / interval : 0.0;
  // Rows of a lane's histogram: 0 background, 1 foreground, 2 ignored (dropped): no branch on the
  // (unpredictable) masks.  A -1 bin (outside the edges) lands in a spare slot before row 0.
  const int64_t stride = num_bins + 1;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* src = static_cast<const T*>(x);
    const int threads = effective_threads(count, num_threads, 262144);
    std::vector<std::vector<int64_t>> partial(static_cast<size_t>(threads));
    // One set of histograms per chunk (chunk c is run by one thread), added in chunk order: integers,
    // so the result never depends on the thread count anyway.
    const int64_t base = count / threads, extra = count % threads;
    parallel_for(0, threads, threads, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        std::vector<int64_t>& local = partial[static_cast<size_t>(c)];
        local.assign(static_cast<size_t>(kLanes * 3 * stride), 0);
        const int64_t b = c * base + std::min(c, extra), e = b + base + (c < extra ? 1 : 0);
        for (int64_t k = b; k < e; ++k) {
          // 1 for foreground, else 2 for ignored, else 0: arithmetic rather than branches.
          const int64_t fg = foreground[k] != 0, ig = ignore != nullptr ? ignore[k] != 0 : 0;
          const int64_t row = fg + 2 * (ig & (fg ^ 1));
          const int64_t i = bin_of(static_cast<double>(to_acc(src[k])), edges, num_bins, inv_interval, arithmetic_top);
          ++local[static_cast<size_t>(((k & (kLanes - 1)) * 3 + row) * stride + 1 + i)];
        }
      }
    });
    for (const std::vector<int64_t>& local : partial) {
      for (int lane = 0; lane < kLanes; ++lane) {
        for (int64_t row = 0; row < 2; ++row) {
          const int64_t* from = local.data() + (lane * 3 + row) * stride + 1;
          for (int64_t i = 0; i < num_bins; ++i) counts[row * num_bins + i] += from[i];
        }
      }
    }
  });
}

}  // namespace cpu
}  // namespace rcam
