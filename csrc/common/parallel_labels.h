// Lock-free union-find for thread blocks, and wsolevaluation's box IoU — shared by the GPU level
// sweep (level_sweep.h) and the CPU component trees (csrc/cpu/component_tree.cpp).
//
// The same code compiles for the device (CUDA atomics in global or shared memory) and for the host,
// where the atomics are plain read-modify-writes: the sequential emulation of the sweep runs its
// phases one thread after another, which is one legal interleaving.  tests/native/
// level_sweep_threads.cpp compiles the device branches for the host against host versions of the
// CUDA atomics, to run them under real concurrency.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RCAM_LABELS_HD __host__ __device__ __forceinline__
#else
#define RCAM_LABELS_HD inline
#endif

namespace rcam {
namespace labels {

// Atomics: CUDA's on the device, plain read-modify-write in the sequential CPU emulation.
// atomicMin (kMax false) or atomicMax (kMax true); returns the old value.
template <bool kMax>
RCAM_LABELS_HD int32_t atomic_extreme_i32(int32_t* p, int32_t v) {
#if defined(__CUDA_ARCH__)
  return kMax ? atomicMax(p, v) : atomicMin(p, v);
#else
  const int32_t old = *p;
  if (kMax ? v > old : v < old) *p = v;
  return old;
#endif
}
RCAM_LABELS_HD int32_t atomic_min_i32(int32_t* p, int32_t v) { return atomic_extreme_i32<false>(p, v); }
RCAM_LABELS_HD int32_t atomic_max_i32(int32_t* p, int32_t v) { return atomic_extreme_i32<true>(p, v); }
RCAM_LABELS_HD int32_t atomic_add_i32(int32_t* p, int32_t v) {
#if defined(__CUDA_ARCH__)
  return atomicAdd(p, v);
#else
  const int32_t old = *p;
  *p = old + v;
  return old;
#endif
}
// Maximum of non-negative doubles through their bit patterns (which order like the values).
RCAM_LABELS_HD void atomic_max_nonneg_double(unsigned long long* p, double v) {
  unsigned long long bits;
  static_assert(sizeof(bits) == sizeof(v), "64-bit double expected");
#if defined(__CUDA_ARCH__)
  bits = static_cast<unsigned long long>(__double_as_longlong(v));
  atomicMax(p, bits);
#else
  __builtin_memcpy(&bits, &v, sizeof(bits));
  if (bits > *p) *p = bits;
#endif
}
RCAM_LABELS_HD double double_of_bits(unsigned long long bits) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(bits));
#else
  double v;
  __builtin_memcpy(&v, &bits, sizeof(v));
  return v;
#endif
}

// A read that sees other threads' atomic updates (atomics happen in L2; a volatile load bypasses a
// possibly stale L1 line on the GPU).  Used for every array that atomics modify.
RCAM_LABELS_HD int32_t load_label(const int32_t* labels, int32_t i) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const volatile int32_t*>(labels + i);
#else
  return labels[i];
#endif
}

// The root of a's set, halving the path on the way: each node visited is pointed at its grandparent
// with an atomic min.  Safe under concurrent unions because every label only ever decreases and
// only ever names an ancestor (every link points at a smaller index of the same set, and sets only
// merge), and roots are never written here (a node with a parent keeps one), so `unite`'s atomic
// link of a root is untouched.  Without it, a run of foreground linked pixel by pixel in raster
// order left chains as long as the run, and every later find walked them through global memory:
// on an H100 the labelling of 256 masks of 224 x 224 took about 12 ms (benchmarks/results/h100_profile.txt).
RCAM_LABELS_HD int32_t find_root(int32_t* labels, int32_t a) {
  for (;;) {
    const int32_t parent = load_label(labels, a);
    if (parent == a) return a;
    const int32_t grand = load_label(labels, parent);
    if (grand == parent) return parent;
    atomic_min_i32(labels + a, grand);
    a = grand;
  }
}

// Lock-free union: the larger root is linked under the smaller with atomicMin; a lost race
// (another thread linked it first) retries from the new roots.  `on_link(b, a)` is called once for
// every root b this call links under the root a (the level sweep records these links).
template <typename OnLink>
RCAM_LABELS_HD void unite(int32_t* labels, int32_t a, int32_t b, OnLink on_link) {
  for (;;) {
    a = find_root(labels, a);
    b = find_root(labels, b);
    if (a == b) return;
    if (a > b) {
      const int32_t t = a;
      a = b;
      b = t;
    }
    const int32_t old = atomic_min_i32(labels + b, a);  // link root b under a
    if (old == b) {
      on_link(b, a);
      return;
    }
    b = old;
  }
}

// wsolevaluation's IoU of box a against the best of n GT boxes (x0, y0, x1, y1 inclusive).
RCAM_LABELS_HD double best_iou_against(int64_t ax0, int64_t ay0, int64_t ax1, int64_t ay1,
                                    const int64_t* gt, int64_t n) {
  double best = 0.0;
  const int64_t area_a = (ax1 - ax0 + 1) * (ay1 - ay0 + 1);
  for (int64_t g = 0; g < n; ++g) {
    const int64_t* b = gt + 4 * g;
    const int64_t lo_x = ax0 > b[0] ? ax0 : b[0], hi_x = ax1 < b[2] ? ax1 : b[2];
    const int64_t lo_y = ay0 > b[1] ? ay0 : b[1], hi_y = ay1 < b[3] ? ay1 : b[3];
    const int64_t iw = hi_x - lo_x + 1 > 0 ? hi_x - lo_x + 1 : 0;
    const int64_t ih = hi_y - lo_y + 1 > 0 ? hi_y - lo_y + 1 : 0;
    const int64_t inter = iw * ih;
    const int64_t uni = area_a + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter;
    const double iou = uni <= 0 ? 0.0 : static_cast<double>(inter) / static_cast<double>(uni);
    if (g == 0 || iou > best) best = iou;
  }
  return best;
}

// The reference's IoU for a contour with inclusive extents: its box is
// [x0, y0, min(x1 + 1, W - 1), min(y1 + 1, H - 1)].
RCAM_LABELS_HD double contour_iou(int64_t x0, int64_t y0, int64_t x1, int64_t y1, int64_t H, int64_t W,
                               const int64_t* gt, int64_t n) {
  return best_iou_against(x0, y0, x1 + 1 < W - 1 ? x1 + 1 : W - 1, y1 + 1 < H - 1 ? y1 + 1 : H - 1, gt, n);
}

// The same for a cv2.boundingRect (x, y, w, h): the reference's box [x, y, min(x + w, W - 1), min(y + h, H - 1)].
RCAM_LABELS_HD double rect_iou(const int64_t* xywh, int64_t H, int64_t W, const int64_t* gt, int64_t n) {
  return contour_iou(xywh[0], xywh[1], xywh[0] + xywh[2] - 1, xywh[1] + xywh[3] - 1, H, W, gt, n);
}

}  // namespace labels
}  // namespace rcam
