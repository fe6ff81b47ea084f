// Bilinear resampling tables shared by the CPU map kernels (fuse_maps.cpp, map_epilogue.cpp).
//
// ATen's align_corners=False convention, in the map's own floating type T (float32 maps in float,
// float64 maps in double, as F.interpolate computes them): scale = T(in) / T(out),
// src = max(scale * (o + 0.5) - 0.5, 0), i0 = min(floor(src), in - 1), i1 = i0 + (i0 < in - 1),
// l1 = clamp(src - i0, 0, 1), l0 = 1 - l1.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace rcam {
namespace cpu {

template <typename T>
struct BilinearAxis {
  std::vector<int64_t> i0, i1;  // the two source neighbours of each output sample
  std::vector<T> l0, l1;        // their weights
};

template <typename T>
BilinearAxis<T> bilinear_axis(int64_t in, int64_t out) {
  BilinearAxis<T> a;
  const size_t n = static_cast<size_t>(out);
  a.i0.resize(n);
  a.i1.resize(n);
  a.l0.resize(n);
  a.l1.resize(n);
  const T scale = static_cast<T>(in) / static_cast<T>(out);
  for (int64_t o = 0; o < out; ++o) {
    T src = scale * (static_cast<T>(o) + static_cast<T>(0.5)) - static_cast<T>(0.5);
    if (src < static_cast<T>(0)) src = static_cast<T>(0);
    const int64_t i = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
    const T l = std::min(std::max(src - static_cast<T>(i), static_cast<T>(0)), static_cast<T>(1));
    const size_t k = static_cast<size_t>(o);
    a.i0[k] = i;
    a.i1[k] = i + (i < in - 1 ? 1 : 0);
    a.l1[k] = l;
    a.l0[k] = static_cast<T>(1) - l;
  }
  return a;
}

// a + (b - a) * l: the interpolation between two neighbours, exact where they are equal. (ATen's
// a * (1 - l) + b * l is not: a plateau comes out with last-bit noise, which a min-max normalisation
// stretches to [0, 1] on a map that resizes to a constant, and which decides which of a plateau's
// pixels tie at a map's extreme. Both are the same linear map up to rounding.) Where b - a
// overflows (finite neighbours of opposite signs near the type's limit) it takes ATen's form, which
// stays finite there.
template <typename T>
inline T lerp(T a, T b, T l) {
  const T d = b - a;
  if (std::fabs(d) <= std::numeric_limits<T>::max()) return a + d * l;
  return a * (static_cast<T>(1) - l) + b * l;  // (inf or NaN neighbours: non-finite either way)
}

template <typename T>
inline bool is_finite(T v) {
  return std::fabs(v) <= std::numeric_limits<T>::max();
}

// Whether a source map [count] normalises to zeros whatever its upsampling: a non-finite value or a
// constant map, judged on its values in J: float (fuse_maps: degenerate_maps in fuse_maps.py converts
// to float32 first, so a float64 map whose values differ below float32's resolution counts as
// constant), or the map's own type (the differentiable epilogue, which keeps float64 maps float64).
template <typename J = float, typename T>
bool source_degenerate(const T* m, int64_t count) {
  J lo = std::numeric_limits<J>::infinity(), hi = -lo;
  bool finite = true;
  for (int64_t k = 0; k < count; ++k) {
    const J v = static_cast<J>(m[k]);
    finite &= is_finite(v);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  return !finite || !(hi > lo);
}

}  // namespace cpu
}  // namespace rcam
