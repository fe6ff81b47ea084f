// trunc(255 * x) to uint8, parallel over contiguous chunks (see levels.h).
#include "levels.h"

#include <type_traits>

#include "../common/dtype.h"
#include "parallel.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace rcam {
namespace cpu {

void uint8_levels(const void* x, int dtype, int64_t count, uint8_t* out, int num_threads) {
  if (count <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* src = static_cast<const T*>(x);
    const int threads = effective_threads(count, num_threads, 262144);
    parallel_for(0, count, threads, [&](int64_t b, int64_t e) {
#if defined(__SSE2__)
      if constexpr (std::is_same_v<T, float>) {
        // 16 at a time: clamp (max/min return the second operand for NaN: NaN -> 0), truncate to
        // int32, narrow with saturating packs (no effect on 0..255).
        const __m128 zero = _mm_setzero_ps(), top = _mm_set1_ps(255.0f);
        for (; b + 16 <= e; b += 16) {
          __m128i q[4];
          for (int j = 0; j < 4; ++j) {
            __m128 v = _mm_mul_ps(_mm_loadu_ps(src + b + 4 * j), top);
            v = _mm_min_ps(_mm_max_ps(v, zero), top);
            q[j] = _mm_cvttps_epi32(v);
          }
          const __m128i lo = _mm_packs_epi32(q[0], q[1]), hi = _mm_packs_epi32(q[2], q[3]);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(out + b), _mm_packus_epi16(lo, hi));
        }
      }
#endif
      // Written so that the compiler vectorises it: clamp with selects, truncate to int32
      // (cvttps2dq), narrow to uint8.
      for (int64_t k = b; k < e; ++k) {
        A v = to_acc(src[k]) * A(255);
        v = v > A(0) ? v : A(0);  // also NaN -> 0
        v = v < A(255) ? v : A(255);
        out[k] = static_cast<uint8_t>(static_cast<int32_t>(v));  // truncation, as torch's cast
      }
    });
  });
}

}  // namespace cpu
}  // namespace rcam
