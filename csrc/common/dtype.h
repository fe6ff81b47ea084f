// Shared dtype helpers for the rethinkcam_fast native kernels (CPU and CUDA).
//
// The kernels are torch-free: tensors arrive as raw pointers plus sizes/strides and an integer
// dtype code.  16-bit floats are carried around as their raw bit patterns (half_t / bf16_t) and
// converted to/from float with the functions below.
//
// Host conversions are written with plain integer bit manipulation so that they do not depend on
// the FP environment (no F16C needed, correct under flush-to-zero / denormals-are-zero):
//   * half/bf16 -> float is exact (every half/bf16 value is representable as a float);
//   * float -> half/bf16 rounds to nearest, ties to even; overflow goes to +-inf, NaN stays NaN
//     (quieted), subnormal results are produced correctly.
// When compiled for the device (__CUDA_ARCH__) the same functions use the hardware conversion
// intrinsics, which implement identical rounding.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define RCAM_HD __host__ __device__ __forceinline__
#else
#define RCAM_HD inline
#endif

namespace rcam {

// dtype codes shared with the Python side.
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline const char* dtype_name(int dtype) {
  switch (dtype) {
    case kFloat32: return "float32";
    case kFloat64: return "float64";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

inline void check_dtype(int dtype) {
  if (dtype < kFloat32 || dtype > kBFloat16) {
    throw std::invalid_argument("rethinkcam_fast: unsupported dtype code " + std::to_string(dtype) +
                                " (expected 0=float32, 1=float64, 2=float16, 3=bfloat16)");
  }
}

inline void check_sizes(int64_t N, int64_t C, int64_t S) {
  if (N < 0 || C < 0 || S < 0) {
    throw std::invalid_argument("rethinkcam_fast: negative size (N=" + std::to_string(N) +
                                ", C=" + std::to_string(C) + ", S=" + std::to_string(S) + ")");
  }
}

// Raw 16-bit storage types (layout-compatible with torch.float16 / torch.bfloat16 elements).
struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

// ------------------------------------------------------------------------------------------------
// float <-> bits
// ------------------------------------------------------------------------------------------------
RCAM_HD uint32_t f32_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

RCAM_HD float bits_to_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// ------------------------------------------------------------------------------------------------
// IEEE binary16
// ------------------------------------------------------------------------------------------------
RCAM_HD float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  // Written branch-free (selects) so that the compiler can vectorise loops over it.
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t expo = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  // Normal: rebias the exponent 15 -> 127 and widen the mantissa 10 -> 23 bits.
  const uint32_t normal = sign | ((expo + 112u) << 23) | (mant << 13);
  // Inf / NaN: all-ones exponent, payload kept (a quiet NaN stays quiet).
  const uint32_t infnan = sign | 0x7f800000u | (mant << 13);
  // Zero / subnormal: value = mant * 2^-24.  The int->float conversion and the power-of-two scale
  // are exact and the result (>= 2^-24) is a float normal, so FTZ/DAZ cannot affect it.
  const uint32_t sub = sign | f32_to_bits(static_cast<float>(mant) * 5.9604644775390625e-08f);
  const uint32_t bits = (expo == 0x1fu) ? infnan : ((expo == 0u) ? sub : normal);
  return bits_to_f32(bits);
#endif
}

RCAM_HD uint16_t float_to_half_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  uint32_t x = f32_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) {  // NaN: keep the top payload bits, force the quiet bit.
    return static_cast<uint16_t>(sign | 0x7e00u | ((x >> 13) & 0x3ffu));
  }
  if (x >= 0x477ff000u) {  // >= 65520 (half-way between 65504 and 2^16, tie -> even = inf), or inf
    return static_cast<uint16_t>(sign | 0x7c00u);
  }
  if (x >= 0x38800000u) {  // result is a half normal (|f| >= 2^-14)
    // Rebias the exponent (127 -> 15; unsigned wrap-around is intended) and round to nearest even
    // on bit 13.  A carry out of the mantissa correctly bumps the exponent.
    x += 0xc8000fffu + ((x >> 13) & 1u);
    return static_cast<uint16_t>(sign | (x >> 13));
  }
  if (x <= 0x33000000u) {  // |f| <= 2^-25: rounds to +-0 (exactly 2^-25 is a tie -> even = 0)
    return sign;
  }
  // Half subnormal: result = round(|f| * 2^24) with ties to even.
  const uint32_t e = x >> 23;                        // biased float exponent, 102..112
  const uint32_t m = (x & 0x7fffffu) | 0x800000u;    // implicit leading one
  const uint32_t shift = 126u - e;                   // 14..24
  uint32_t r = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  r += static_cast<uint32_t>((rem > halfway) || (rem == halfway && (r & 1u)));
  return static_cast<uint16_t>(sign | r);  // r == 0x400 encodes the smallest normal: correct
#endif
}

// ------------------------------------------------------------------------------------------------
// bfloat16 (the top half of a float32)
// ------------------------------------------------------------------------------------------------
RCAM_HD float bf16_bits_to_float(uint16_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
#else
  return bits_to_f32(static_cast<uint32_t>(b) << 16);
#endif
}

RCAM_HD uint16_t float_to_bf16_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t x = f32_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) {  // NaN: truncate and force the quiet bit
    return static_cast<uint16_t>((x >> 16) | 0x0040u);
  }
  // Round to nearest even on bit 16; overflow of the largest finite values correctly gives inf.
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
#endif
}

// ------------------------------------------------------------------------------------------------
// Typed helpers used by the kernels.
//   acc_t<T>: accumulation type (double for float64, float otherwise)
//   to_acc(v): storage -> acc_t (exact)
//   from_acc<T>(a): acc_t -> storage, round to nearest even
//   round_to<T>(a): acc_t rounded to T's precision and back (identity for float/double)
// ------------------------------------------------------------------------------------------------
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

RCAM_HD float to_acc(float v) { return v; }
RCAM_HD double to_acc(double v) { return v; }
RCAM_HD float to_acc(half_t v) { return half_bits_to_float(v.bits); }
RCAM_HD float to_acc(bf16_t v) { return bf16_bits_to_float(v.bits); }

template <typename T>
struct FromAcc;
template <>
struct FromAcc<float> {
  static RCAM_HD float apply(float a) { return a; }
};
template <>
struct FromAcc<double> {
  static RCAM_HD double apply(double a) { return a; }
};
template <>
struct FromAcc<half_t> {
  static RCAM_HD half_t apply(float a) { return half_t{float_to_half_bits(a)}; }
};
template <>
struct FromAcc<bf16_t> {
  static RCAM_HD bf16_t apply(float a) { return bf16_t{float_to_bf16_bits(a)}; }
};

template <typename T>
RCAM_HD T from_acc(acc_t<T> a) {
  return FromAcc<T>::apply(a);
}

template <typename T>
RCAM_HD acc_t<T> round_to(acc_t<T> a) {
  return to_acc(from_acc<T>(a));
}

// NaN-propagating running maximum (like torch.max): once a NaN is seen the result stays NaN.
//   v > m   -> take v;  v is NaN -> take v (NaN);  m is NaN -> both tests false, keep NaN.
// Written with a bitwise | so that it compiles to a branch-free select.
template <typename A>
RCAM_HD A nan_max(A m, A v) {
  return ((v > m) | (v != v)) ? v : m;
}

// The TAP threshold: max * tau computed in acc_t, rounded to the input dtype (mimics PyTorch
// evaluating `max_vals * tau` in the input dtype).
template <typename T>
RCAM_HD acc_t<T> tap_threshold(acc_t<T> m, acc_t<T> tau) {
  return round_to<T>(m * tau);
}

// Raw bit patterns of each storage and accumulation type, for branch-free selects and stores
// (a value ANDed with an all-ones or all-zeros mask: the value or +0, whatever the value is).
template <typename T>
struct RawType;
template <>
struct RawType<float> {
  using type = uint32_t;
};
template <>
struct RawType<double> {
  using type = uint64_t;
};
template <>
struct RawType<half_t> {
  using type = uint16_t;
};
template <>
struct RawType<bf16_t> {
  using type = uint16_t;
};
template <typename T>
using raw_t = typename RawType<T>::type;

template <typename T>
inline raw_t<T> to_raw(T v) {
  raw_t<T> r;
  static_assert(sizeof(r) == sizeof(v), "raw size mismatch");
  std::memcpy(&r, &v, sizeof(r));
  return r;
}

// Host-side dispatch on a dtype code: calls f with a value of the storage type (float, double,
// half_t or bf16_t); an unknown code throws through check_dtype.
template <typename F>
void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat64: f(double{}); break;
    case kFloat16: f(half_t{}); break;
    case kBFloat16: f(bf16_t{}); break;
    default: check_dtype(dtype);
  }
}

}  // namespace rcam
