// trunc(255 * x) to uint8, parallel over contiguous chunks, optionally checking [0, 1] on the way
// (see levels.h).
#include "levels.h"

#include <algorithm>
#include <atomic>
#include <memory>
#include <type_traits>

#include "../common/dtype.h"
#include "parallel.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace rcam {
namespace cpu {
namespace {

// Converts src[b, e) to out[b, e); returns whether any value is NaN or outside [0, 1] (only looked
// for when `check`: the comparisons cost nothing next to the memory traffic, but stay off when
// unwanted).
template <typename T, bool check>
bool convert_range(const T* src, int64_t b, int64_t e, uint8_t* out) {
  using A = acc_t<T>;
  bool bad = false;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    // 16 at a time: clamp (max/min return the second operand for NaN: NaN -> 0), truncate to
    // int32, narrow with saturating packs (no effect on 0..255).  The range test uses the
    // negated ordered compares, true for NaN too: !(x >= 0) | !(x <= 1).
    const __m128 zero = _mm_setzero_ps(), one = _mm_set1_ps(1.0f), top = _mm_set1_ps(255.0f);
    __m128 outside = _mm_setzero_ps();
    for (; b + 16 <= e; b += 16) {
      __m128i q[4];
      for (int j = 0; j < 4; ++j) {
        const __m128 x = _mm_loadu_ps(src + b + 4 * j);
        if constexpr (check) outside = _mm_or_ps(outside, _mm_or_ps(_mm_cmpnge_ps(x, zero), _mm_cmpnle_ps(x, one)));
        __m128 v = _mm_mul_ps(x, top);
        v = _mm_min_ps(_mm_max_ps(v, zero), top);
        q[j] = _mm_cvttps_epi32(v);
      }
      const __m128i lo = _mm_packs_epi32(q[0], q[1]), hi = _mm_packs_epi32(q[2], q[3]);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + b), _mm_packus_epi16(lo, hi));
    }
    if constexpr (check) bad = _mm_movemask_ps(outside) != 0;
  }
#endif
  // Written so that the compiler vectorises it: clamp with selects, truncate to int32 (cvttps2dq),
  // narrow to uint8.
  for (int64_t k = b; k < e; ++k) {
    const A x = to_acc(src[k]);
    if constexpr (check) bad |= !(x >= A(0) && x <= A(1));
    A v = x * A(255);
    v = v > A(0) ? v : A(0);  // also NaN -> 0
    v = v < A(255) ? v : A(255);
    out[k] = static_cast<uint8_t>(static_cast<int32_t>(v));  // truncation, as torch's cast
  }
  return bad;
}

}  // namespace

bool convert_levels(const void* x, int dtype, int64_t offset, int64_t count, uint8_t* out, bool check) {
  bool bad = false;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* src = static_cast<const T*>(x) + offset;
    bad = check ? convert_range<T, true>(src, 0, count, out) : convert_range<T, false>(src, 0, count, out);
  });
  return bad;
}

void level_histograms(const void* x, int dtype, int64_t N, int64_t per_image, int64_t* hist, int num_threads,
                      uint8_t* bad) {
  if (N <= 0) return;
  std::fill(hist, hist + 256 * N, int64_t{0});
  if (bad != nullptr) std::fill(bad, bad + N, uint8_t{0});
  if (per_image <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* src = static_cast<const T*>(x);
    const int threads = static_cast<int>(std::min<int64_t>(effective_threads(N * per_image, num_threads, 262144), N));
    std::atomic<int64_t> next{0};
    parallel_for(0, threads, threads, [&](int64_t, int64_t) {
      // Levels of a block of pixels at a time (stays in L1), counted into 4 interleaved histograms:
      // neighbouring pixels of a smooth map share a level, and one counter would chain every add.
      constexpr int64_t kBlock = 4096;
      uint8_t level[kBlock];
      uint32_t lanes[4][256];
      for (int64_t n; (n = next.fetch_add(1, std::memory_order_relaxed)) < N;) {
        std::fill(&lanes[0][0], &lanes[0][0] + 4 * 256, uint32_t{0});
        int64_t* out = hist + 256 * n;
        bool outside = false;
        for (int64_t b = 0; b < per_image; b += kBlock) {
          const int64_t count = std::min(kBlock, per_image - b);
          const T* block = src + n * per_image + b;
          outside |= bad != nullptr ? convert_range<T, true>(block, 0, count, level)
                                    : convert_range<T, false>(block, 0, count, level);
          int64_t k = 0;
          for (; k + 4 <= count; k += 4) {
            ++lanes[0][level[k]];
            ++lanes[1][level[k + 1]];
            ++lanes[2][level[k + 2]];
            ++lanes[3][level[k + 3]];
          }
          for (; k < count; ++k) ++lanes[0][level[k]];
          if (b + kBlock < per_image && (b / kBlock) % 256 == 255) {  // uint32 lanes: flush before 2^32
            for (int v = 0; v < 256; ++v) {
              out[v] += int64_t{lanes[0][v]} + lanes[1][v] + lanes[2][v] + lanes[3][v];
              lanes[0][v] = lanes[1][v] = lanes[2][v] = lanes[3][v] = 0;
            }
          }
        }
        for (int v = 0; v < 256; ++v) out[v] += int64_t{lanes[0][v]} + lanes[1][v] + lanes[2][v] + lanes[3][v];
        if (bad != nullptr) bad[n] = outside ? 1 : 0;
      }
    });
  });
}

void uint8_levels(const void* x, int dtype, int64_t count, uint8_t* out, int num_threads, int64_t per_image,
                  uint8_t* bad) {
  if (count <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* src = static_cast<const T*>(x);
    const int threads = effective_threads(count, num_threads, 262144);
    if (bad == nullptr || per_image <= 0) {
      parallel_for(0, count, threads, [&](int64_t b, int64_t e) { convert_range<T, false>(src, b, e, out); });
      return;
    }
    // A chunk may hold the end of one image and the start of the next, and an image may span
    // chunks: flags are set per image segment, through atomics (two chunks can share an image).
    const int64_t images = (count + per_image - 1) / per_image;
    std::unique_ptr<std::atomic<uint8_t>[]> flags(new std::atomic<uint8_t>[static_cast<size_t>(images)]);
    for (int64_t i = 0; i < images; ++i) flags[i].store(0, std::memory_order_relaxed);
    parallel_for(0, count, threads, [&](int64_t b, int64_t e) {
      while (b < e) {
        const int64_t image = b / per_image;
        const int64_t stop = std::min(e, (image + 1) * per_image);
        if (convert_range<T, true>(src, b, stop, out)) flags[image].store(1, std::memory_order_relaxed);
        b = stop;
      }
    });
    for (int64_t i = 0; i < images; ++i) bad[i] = flags[i].load(std::memory_order_relaxed);
  });
}

}  // namespace cpu
}  // namespace rcam
