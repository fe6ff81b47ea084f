// Portable 128-bit SIMD helpers for the CPU kernels, built on the GCC/Clang vector extensions
// (no intrinsics, so the same code compiles to SSE on x86-64 and NEON on aarch64).
//
// GCC does not auto-vectorise the NaN-propagating max reduction or the masked sum over a
// contiguous row (they are loop-carried reductions with selects), so the hot loops spell out the
// vector operations explicitly.  Other compilers (or -DRCAM_NO_SIMD) use the scalar code in
// tap.cpp.
//
// For every storage type T, Traits<T> provides
//   AV  acc_t<T> vector (4 x float or 2 x double), W lanes
//   MV  signed integer vector with AV's lane width (result type of AV comparisons: 0 / -1)
//   RV  W raw output elements (uint32 / uint64 / uint16 bit patterns) for branch-free stores
//   load(p)        W consecutive elements of T -> AV (16-bit types are widened exactly)
//   load_pair(p, a, b)  2W consecutive elements -> two AV in an unspecified lane order (for
//                  order-independent reductions; lets 16-bit types use one 16-byte load)
//   narrow(mask)   MV mask -> RV mask (same lanes)
#pragma once

#if (defined(__GNUC__) || defined(__clang__)) && !defined(RCAM_NO_SIMD)
#define RCAM_CPU_SIMD 1

#include <cstdint>
#include <cstring>

#include "../common/dtype.h"

namespace rcam {
namespace cpu {
namespace simd {

typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef double f64x2 __attribute__((vector_size(16)));
typedef int64_t i64x2 __attribute__((vector_size(16)));
typedef uint64_t u64x2 __attribute__((vector_size(16)));
typedef int16_t i16x4 __attribute__((vector_size(8)));
typedef uint16_t u16x4 __attribute__((vector_size(8)));

template <typename V, typename P>
inline V loadu(const P* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename P>
inline void storeu(P* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename V, typename S>
inline V splat(S s) {
  V v;
  for (unsigned i = 0; i < sizeof(V) / sizeof(S); ++i) v[i] = s;
  return v;
}

// Exact 16-bit float -> float widening, vectorised version of rcam::half_bits_to_float:
//   normal:     (em << 13) + ((127 - 15) << 23)          rebias the exponent
//   inf / NaN:  (em << 13) + ((255 - 31) << 23)          all-ones exponent, payload kept
//   zero / sub: bits(float(em) * 2^-24)                  exact, result is a float normal
// (em = the half without its sign bit), then the sign is OR-ed back in.
// w: one zero-extended half bit pattern per 32-bit lane.
inline f32x4 half_bits4_to_float4(i32x4 w) {
  const i32x4 em = w & 0x7fff;
  const i32x4 sign = (w ^ em) << 16;
  const i32x4 shifted = em << 13;
  const i32x4 normal = shifted + 0x38000000;
  const i32x4 infnan = shifted + 0x70000000;
  const i32x4 sub = (i32x4)(__builtin_convertvector(em, f32x4) * 5.9604644775390625e-08f);
  const i32x4 bits = (em >= 0x7c00) ? infnan : ((em < 0x0400) ? sub : normal);
  return (f32x4)(bits | sign);
}

inline f32x4 half4_to_float4(u16x4 h) {
  return half_bits4_to_float4(__builtin_convertvector(h, i32x4));  // zero-extends (h unsigned)
}

inline f32x4 bf16x4_to_float4(u16x4 b) {
  return (f32x4)(__builtin_convertvector(b, u32x4) << 16);
}

template <typename T>
struct Traits;

template <>
struct Traits<float> {
  using AV = f32x4;
  using MV = decltype(AV{} > AV{});
  using RV = u32x4;
  static constexpr int W = 4;
  static AV load(const float* p) { return loadu<AV>(p); }
  static void load_pair(const float* p, AV& a, AV& b) {
    a = loadu<AV>(p);
    b = loadu<AV>(p + W);
  }
  static RV narrow(MV m) { return (RV)m; }
};

template <>
struct Traits<double> {
  using AV = f64x2;
  using MV = decltype(AV{} > AV{});
  using RV = u64x2;
  static constexpr int W = 2;
  static AV load(const double* p) { return loadu<AV>(p); }
  static void load_pair(const double* p, AV& a, AV& b) {
    a = loadu<AV>(p);
    b = loadu<AV>(p + W);
  }
  static RV narrow(MV m) { return (RV)m; }
};

template <>
struct Traits<half_t> {
  using AV = f32x4;
  using MV = decltype(AV{} > AV{});
  using RV = u16x4;
  static constexpr int W = 4;
  static AV load(const half_t* p) { return half4_to_float4(loadu<u16x4>(p)); }
  static void load_pair(const half_t* p, AV& a, AV& b) {
    const i32x4 w = loadu<i32x4>(p);  // lanes hold (even element) | (odd element) << 16
    a = half_bits4_to_float4(w & 0xffff);
    b = half_bits4_to_float4((i32x4)((u32x4)w >> 16));
  }
  static RV narrow(MV m) { return (RV)__builtin_convertvector(m, i16x4); }
};

template <>
struct Traits<bf16_t> {
  using AV = f32x4;
  using MV = decltype(AV{} > AV{});
  using RV = u16x4;
  static constexpr int W = 4;
  static AV load(const bf16_t* p) { return bf16x4_to_float4(loadu<u16x4>(p)); }
  static void load_pair(const bf16_t* p, AV& a, AV& b) {
    const i32x4 w = loadu<i32x4>(p);  // lanes hold (even element) | (odd element) << 16
    a = (f32x4)(w << 16);
    b = (f32x4)(w & (int32_t)0xffff0000u);
  }
  static RV narrow(MV m) { return (RV)__builtin_convertvector(m, i16x4); }
};

// Lane-wise NaN-propagating max (see rcam::nan_max).
template <typename AV>
inline AV nan_max(AV m, AV v) {
  return ((v > m) | (v != v)) ? v : m;
}

}  // namespace simd
}  // namespace cpu
}  // namespace rcam

#endif  // GCC / Clang
