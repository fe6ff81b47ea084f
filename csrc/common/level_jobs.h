// One (image, threshold) "level job" for parallel hardware: the contours OpenCV's findContours
// (RETR_TREE) gives for mask = level > thr, reduced to what the box ops need — the largest
// contour's box and the best IoU of the contour boxes against the GT boxes — by parallel
// connected-component labelling instead of border following.
//
// The same code runs as a CUDA thread block (csrc/cuda/level_jobs.cu: a block per job, each phase
// strided over the block's threads, __syncthreads() between phases, atomics in global memory) and
// as a sequential emulation on the CPU (csrc/cpu/level_jobs_emulated.cpp: every phase run thread by
// thread — one legal interleaving), which is how the tests check the logic against OpenCV on a
// machine without a GPU.
//
// What is computed (the facts are those of csrc/cpu/component_tree.cpp):
//   * foreground components (8-connected) by atomic-min union-find over pixel indices: every root
//     is its component's smallest index, i.e. its first pixel in raster order, so y0 is the root's
//     row; x0, x1, y1 by atomic min/max;
//   * background components (4-connected) the same way over node ids p + 1, with node 0 the frame
//     (image border pixels unite with it): the components other than the frame's are the holes,
//     each with its first pixel as root; a hole's border box is its box grown by one pixel;
//   * contour areas (twice, in half cells) from the per-cell shares of each component's pixels,
//     atomically added at the roots; each hole's area joins the outer border of the foreground
//     component holding the pixel above its first pixel.  That is exact when no foreground
//     component lies inside a hole (a hole's polygon also encloses what is nested in it); a
//     component whose first pixel has a hole above it is such a nested one, and its level is left
//     to the caller (`needs_trace`) in largest mode;
//   * the largest contour: the maximum area when exactly one contour has it; a shared maximum sets
//     `needs_trace` and the caller traces that level on the CPU for OpenCV's order.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RCAM_JOB_HD __host__ __device__ __forceinline__
#else
#define RCAM_JOB_HD inline
#endif

namespace rcam {
namespace levels {

// Atomics: CUDA's on the device, plain read-modify-write in the sequential CPU emulation.
// atomicMin (kMax false) or atomicMax (kMax true); returns the old value.
template <bool kMax>
RCAM_JOB_HD int32_t atomic_extreme_i32(int32_t* p, int32_t v) {
#if defined(__CUDA_ARCH__)
  return kMax ? atomicMax(p, v) : atomicMin(p, v);
#else
  const int32_t old = *p;
  if (kMax ? v > old : v < old) *p = v;
  return old;
#endif
}
RCAM_JOB_HD int32_t atomic_min_i32(int32_t* p, int32_t v) { return atomic_extreme_i32<false>(p, v); }
RCAM_JOB_HD int32_t atomic_max_i32(int32_t* p, int32_t v) { return atomic_extreme_i32<true>(p, v); }
RCAM_JOB_HD int32_t atomic_add_i32(int32_t* p, int32_t v) {
#if defined(__CUDA_ARCH__)
  return atomicAdd(p, v);
#else
  const int32_t old = *p;
  *p = old + v;
  return old;
#endif
}
// Maximum of non-negative doubles through their bit patterns (which order like the values).
RCAM_JOB_HD void atomic_max_nonneg_double(unsigned long long* p, double v) {
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
RCAM_JOB_HD double double_of_bits(unsigned long long bits) {
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
RCAM_JOB_HD int32_t load_label(const int32_t* labels, int32_t i) {
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
// on an H100 a 224 x 224 job took about 12 ms / 256 jobs (benchmarks/results/h100_profile.txt).
RCAM_JOB_HD int32_t find_root(int32_t* labels, int32_t a) {
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
// (another thread linked it first) retries from the new roots.
RCAM_JOB_HD void unite(int32_t* labels, int32_t a, int32_t b) {
  for (;;) {
    a = find_root(labels, a);
    b = find_root(labels, b);
    if (a == b) return;
    if (a < b) {
      const int32_t old = atomic_min_i32(labels + b, a);
      if (old == b) return;
      b = old;
    } else {
      const int32_t old = atomic_min_i32(labels + a, b);
      if (old == a) return;
      a = old;
    }
  }
}

// wsolevaluation's IoU of box a against the best of n GT boxes (x0, y0, x1, y1 inclusive).
RCAM_JOB_HD double best_iou_against(int64_t ax0, int64_t ay0, int64_t ax1, int64_t ay1,
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
RCAM_JOB_HD double contour_iou(int64_t x0, int64_t y0, int64_t x1, int64_t y1, int64_t H, int64_t W,
                               const int64_t* gt, int64_t n) {
  return best_iou_against(x0, y0, x1 + 1 < W - 1 ? x1 + 1 : W - 1, y1 + 1 < H - 1 ? y1 + 1 : H - 1, gt, n);
}

// The same for a cv2.boundingRect (x, y, w, h): the reference's box [x, y, min(x + w, W - 1), min(y + h, H - 1)].
RCAM_JOB_HD double rect_iou(const int64_t* xywh, int64_t H, int64_t W, const int64_t* gt, int64_t n) {
  return contour_iou(xywh[0], xywh[1], xywh[0] + xywh[2] - 1, xywh[1] + xywh[3] - 1, H, W, gt, n);
}

// Per-job scratch (global memory), 6 * H * W + 1 int32 values.
struct Scratch {
  int32_t* fg;     // [HW] foreground labels, -1 for background pixels
  int32_t* bg;     // [HW + 1] background labels over nodes p + 1 (node 0: the frame), -1 for foreground
  int32_t* x0;     // [HW] per root pixel (foreground roots at p, hole roots at their first pixel)
  int32_t* x1;
  int32_t* y1;
  int32_t* area2;  // twice the contour area: outer borders (holes added) / hole borders

  static constexpr int64_t ints_per_pixel = 6;
  RCAM_JOB_HD static Scratch at(int32_t* base, int64_t HW) {
    return Scratch{base, base + HW, base + 2 * HW + 1, base + 3 * HW + 1, base + 4 * HW + 1, base + 5 * HW + 1};
  }
};

// Per-job reductions (shared memory on the GPU).
struct Reduction {
  int32_t any_foreground;
  int32_t best_area2;
  int32_t ties;  // contours with area best_area2
  int32_t nested;  // a foreground component lies inside a hole: the areas are not exact
  int32_t box[4];
  unsigned long long best_iou_bits;
};

// One job's inputs.
struct Job {
  const uint8_t* level;  // [H, W]
  int64_t H, W;
  int32_t thr;
  const int64_t* gt;     // [num_gt, 4]
  int64_t num_gt;
  bool multi_contour;
};

// Phase 1: labels and statistics reset; tid 0 resets the reduction.
RCAM_JOB_HD void phase_init(const Job& job, Scratch s, Reduction* red, int64_t tid, int64_t nthreads) {
  const int64_t HW = job.H * job.W;
  for (int64_t p = tid; p < HW; p += nthreads) {
    const bool on = job.level[p] > job.thr;
    s.fg[p] = on ? static_cast<int32_t>(p) : -1;
    s.bg[p + 1] = on ? -1 : static_cast<int32_t>(p + 1);
    s.x0[p] = 0x7fffffff;
    s.x1[p] = -1;
    s.y1[p] = -1;
    s.area2[p] = 0;
  }
  if (tid == 0) {
    s.bg[0] = 0;
    red->any_foreground = 0;
    red->best_area2 = -1;
    red->ties = 0;
    red->nested = 0;
    red->box[0] = red->box[1] = red->box[2] = red->box[3] = 0;
    red->best_iou_bits = 0;
  }
}

// Phase 2: unions — foreground with its W, NW, N, NE neighbours; background with W and N, and
// border pixels with the frame.
RCAM_JOB_HD void phase_union(const Job& job, Scratch s, int64_t tid, int64_t nthreads) {
  const int64_t H = job.H, W = job.W, HW = H * W;
  for (int64_t p = tid; p < HW; p += nthreads) {
    const int32_t x = static_cast<int32_t>(p) % static_cast<int32_t>(W);  // 32-bit division: HW < 2^29
    const int32_t y = static_cast<int32_t>(p) / static_cast<int32_t>(W);
    const int32_t q = static_cast<int32_t>(p);
    if (s.fg[p] >= 0) {
      if (x > 0 && s.fg[p - 1] >= 0) unite(s.fg, q, q - 1);
      if (y > 0) {
        if (x > 0 && s.fg[p - W - 1] >= 0) unite(s.fg, q, static_cast<int32_t>(p - W - 1));
        if (s.fg[p - W] >= 0) unite(s.fg, q, static_cast<int32_t>(p - W));
        if (x + 1 < W && s.fg[p - W + 1] >= 0) unite(s.fg, q, static_cast<int32_t>(p - W + 1));
      }
    } else {
      if (x > 0 && s.bg[p] >= 0) unite(s.bg, q + 1, q);  // node of p - 1 is p
      if (y > 0 && s.bg[p - W + 1] >= 0) unite(s.bg, q + 1, static_cast<int32_t>(p - W + 1));
      if (x == 0 || y == 0 || x + 1 == W || y + 1 == H) unite(s.bg, q + 1, 0);
    }
  }
}

// Phase 3: every label points at its root.
RCAM_JOB_HD void phase_flatten(const Job& job, Scratch s, int64_t tid, int64_t nthreads) {
  const int64_t HW = job.H * job.W;
  for (int64_t p = tid; p < HW; p += nthreads) {
    if (s.fg[p] >= 0) {
      s.fg[p] = find_root(s.fg, static_cast<int32_t>(p));
    } else {
      s.bg[p + 1] = find_root(s.bg, static_cast<int32_t>(p + 1));
    }
  }
}

// Phase 4: boxes and area shares.  Foreground cells (2 x 2 pixels inside the image) with 3 or 4
// foreground pixels give 1 or 2 half cells to their component; background cells give each hole
// present its share (alone: 1; two adjacent pixels: 2; two diagonal: 1 each; three or four: 2).
// Cells on the frame hold no share of a hole (holes never touch the border) nor of the foreground.
RCAM_JOB_HD void phase_stats(const Job& job, Scratch s, int64_t tid, int64_t nthreads) {
  const int64_t H = job.H, W = job.W, HW = H * W;
  for (int64_t p = tid; p < HW; p += nthreads) {
    const int32_t x = static_cast<int32_t>(p) % static_cast<int32_t>(W);
    const int32_t y = static_cast<int32_t>(p) / static_cast<int32_t>(W);
    int32_t root;
    if (s.fg[p] >= 0) {
      root = s.fg[p];
    } else {
      root = s.bg[p + 1] - 1;  // a hole's first pixel, or -1 for the frame's component
    }
    if (root >= 0) {
      atomic_min_i32(s.x0 + root, x);
      atomic_max_i32(s.x1 + root, x);
      atomic_max_i32(s.y1 + root, y);
    }
    if (x + 1 >= W || y + 1 >= H) continue;
    // The cell with p at its top-left corner: a = p, b = right, c = below, d = below-right.
    const int64_t idx[4] = {p, p + 1, p + W, p + W + 1};
    int fg_count = 0;
    for (int k = 0; k < 4; ++k) fg_count += s.fg[idx[k]] >= 0;
    if (fg_count >= 3) {
      const int64_t any = s.fg[idx[0]] >= 0 ? idx[0] : idx[1];  // a or b: one of them is foreground
      atomic_add_i32(s.area2 + s.fg[any], fg_count == 4 ? 2 : 1);
      if (fg_count == 4) continue;
    }
    const int bg_count = 4 - fg_count;
    if (bg_count == 2) {
      const bool diagonal = (s.fg[idx[0]] >= 0) == (s.fg[idx[3]] >= 0);  // a, d alike: b, c the pair
      if (diagonal) {
        for (int k = 0; k < 4; ++k) {
          const int32_t hole = s.fg[idx[k]] >= 0 ? -1 : s.bg[idx[k] + 1] - 1;
          if (hole >= 0) atomic_add_i32(s.area2 + hole, 1);
        }
        continue;
      }
    }
    int64_t first_bg = 0;
    while (s.fg[idx[first_bg]] >= 0) ++first_bg;
    const int32_t hole = s.bg[idx[first_bg] + 1] - 1;
    if (hole >= 0) atomic_add_i32(s.area2 + hole, bg_count == 1 ? 1 : 2);
  }
}

// Phase 5: each hole's area joins the outer border of the component holding the pixel above its
// first pixel (that pixel is foreground; see component_tree.cpp).  A foreground component whose
// first pixel (its root) has a hole's pixel above it lies inside that hole: flagged (the pixel
// above a component's first pixel is background, or the frame on the top row).
RCAM_JOB_HD void phase_holes_to_outer(const Job& job, Scratch s, Reduction* red, int64_t tid, int64_t nthreads) {
  const int64_t W = job.W, HW = job.H * W;
  for (int64_t p = tid; p < HW; p += nthreads) {
    if (s.fg[p] >= 0) {
      if (s.fg[p] == p) {
        red->any_foreground = 1;  // (benign races: every writer writes 1)
        if (p >= W && s.bg[p - W + 1] != 0) red->nested = 1;
      }
      continue;
    }
    if (s.bg[p + 1] != p + 1) continue;  // not a hole's first pixel (or the frame's component)
    atomic_add_i32(s.area2 + s.fg[p - W], load_label(s.area2, static_cast<int32_t>(p)));
  }
}

// Phase 6: contour candidates — the best IoU (all contours) or the maximum area (largest).
RCAM_JOB_HD void phase_candidates(const Job& job, Scratch s, Reduction* red, int64_t tid, int64_t nthreads) {
  const int64_t H = job.H, W = job.W, HW = H * W;
  for (int64_t p = tid; p < HW; p += nthreads) {
    const bool outer = s.fg[p] == p;
    const bool hole = s.fg[p] < 0 && s.bg[p + 1] == p + 1;
    if (!outer && !hole) continue;
    const int32_t q = static_cast<int32_t>(p);
    if (job.multi_contour) {
      const int64_t grow = hole ? 1 : 0;
      const double iou = contour_iou(load_label(s.x0, q) - grow, q / static_cast<int32_t>(W) - grow, load_label(s.x1, q) + grow,
                                     load_label(s.y1, q) + grow, H, W, job.gt, job.num_gt);
      atomic_max_nonneg_double(&red->best_iou_bits, iou);
    } else {
      atomic_max_i32(&red->best_area2, load_label(s.area2, q));
    }
  }
}

// Phase 7 (largest contour only): count the contours with the maximum area; a unique one leaves
// its (x, y, w, h) in the reduction.
RCAM_JOB_HD void phase_largest(const Job& job, Scratch s, Reduction* red, int64_t tid, int64_t nthreads) {
  if (job.multi_contour) return;
  const int64_t W = job.W, HW = job.H * W;
  for (int64_t p = tid; p < HW; p += nthreads) {
    const bool outer = s.fg[p] == p;
    const bool hole = s.fg[p] < 0 && s.bg[p + 1] == p + 1;
    const int32_t q = static_cast<int32_t>(p);
    if ((!outer && !hole) || load_label(s.area2, q) != red->best_area2) continue;
    if (atomic_add_i32(&red->ties, 1) == 0) {
      const int32_t grow = hole ? 1 : 0, x0 = load_label(s.x0, q), y0 = q / static_cast<int32_t>(W);
      red->box[0] = x0 - grow;
      red->box[1] = y0 - grow;
      red->box[2] = load_label(s.x1, q) - x0 + 1 + 2 * grow;
      red->box[3] = load_label(s.y1, q) - y0 + 1 + 2 * grow;
    }
  }
}

// Job results: best IoU, the largest contour's (x, y, w, h) (largest mode; zeros for an empty mask)
// and whether the level must be traced instead (a shared maximum area).
struct JobResult {
  double iou;
  int64_t xywh[4];
  int32_t needs_trace;
};

RCAM_JOB_HD JobResult finish(const Job& job, const Reduction& red) {
  JobResult r{0.0, {0, 0, 0, 0}, 0};
  if (!red.any_foreground) {
    r.iou = best_iou_against(0, 0, 0, 0, job.gt, job.num_gt);
    return r;
  }
  if (job.multi_contour) {
    r.iou = double_of_bits(red.best_iou_bits);
    return r;
  }
  if (red.ties != 1 || red.nested) {
    r.needs_trace = 1;
    return r;
  }
  for (int k = 0; k < 4; ++k) r.xywh[k] = red.box[k];
  r.iou = rect_iou(r.xywh, job.H, job.W, job.gt, job.num_gt);
  return r;
}

}  // namespace levels
}  // namespace rcam
