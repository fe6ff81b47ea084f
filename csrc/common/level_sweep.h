// The level sweep: every wanted threshold of one uint8 map in one pass of a thread block — the
// parallel form of the component trees of csrc/cpu/component_tree.cpp, for the GPU.
//
// Labelling each threshold's mask from scratch (the first GPU kernel, "level jobs") redid the work
// about 200 times for 1,000 thresholds (about 200 distinct levels of a 224 x 224 map).  Here a block takes one image and
// adds its pixels in level order, as the CPU's component trees do, but a batch at a time: a batch is
// every pixel joining between two consecutive wanted thresholds, and all of a batch's unions run in
// parallel (lock-free union-find, parallel_labels.h).  After each batch the block reads the wanted
// threshold off the live components.  A single threshold is one batch.
//
// Statistics live at each component's root; union-find links the larger root under the smaller, so
// a root is its component's first pixel in raster order (its row is the box's y0).  A batch's new
// pixels add themselves to their root; a root linked during the batch is recorded by `unite` and
// adds its statistics to its new root.  Both are atomic, after all unions (a barrier), so nothing
// depends on the order of the races.  Cell shares and bit quads change only in the cells holding a
// new pixel; each such cell is counted once, by its first new pixel in raster order, as
// share(after) - share(before), which telescopes to the sequential sum whatever the order in which
// the batch's pixels would have joined one by one.
//
// All-contour IoUs (MaxBoxAccV2), two sweeps (the facts are those of component_tree.cpp):
//   * kOuterIoU — foreground, thresholds falling (mask = level > thr, 8-connected): the box of each
//     component (its outer border's box).  The number of holes comes from the Euler number,
//     C - holes = (Q1 - Q3 - 2 QD) / 4 over the cells of the image padded with background (Gray's
//     bit quads), kept as a running sum of the new pixels' cell changes.
//   * kHoleIoU — background, thresholds rising (4-connected, border pixels joined to the frame node
//     0), only at levels with holes: every live component but the frame's is a hole, its border box
//     its box grown by one pixel.  The count must equal the Euler count (else kInconsistent).
// Largest contour (MaxBoxAcc): the contour of maximum area is an outer border (a hole's polygon lies
// inside its component's outer polygon, and so does anything nested in the hole), and the area
// inside an outer border is the polygon area of its component with the holes filled: per 2 x 2 cell
// of pixel centres, a half cell for 3 filled pixels and two for 4 (the fg_area2 of
// component_tree.cpp plus the hole areas, nested components included).  So:
//   * kFrameLinks — background, rising: union-find with every link recorded with its threshold.
//     Pointer jumping then gives each pixel the first wanted threshold at which it reaches the
//     frame ("reach"; 255 if never): at threshold t the filled foreground is reach > t.  With one
//     wanted threshold (PaS) the final roots say it directly: no jumping.
//   * kFilledAreas — foreground, falling, over reach instead of level: the components are the outer
//     borders with their holes filled (no component nests in another), each with its box and exact
//     area.  A unique maximum gives the box; a shared one (kTie) goes to the host's border follower
//     for OpenCV's order.  The filled mask has no holes (checked through the Euler number).
//
// The code is written once for a "block" that runs a phase on every thread and then waits for all
// of them: __syncthreads() on the GPU (csrc/cuda/level_sweep.cu), one thread after another in the
// CPU emulation (csrc/cpu/level_sweep_emulated.cpp), host threads and a std::barrier in
// tests/native/level_sweep_threads.cpp.  Every thread runs the driver (sweep_image); its decisions
// read only shared values written before the last barrier, so all threads take the same branches.
#pragma once

#include <cstdint>

#include "parallel_labels.h"

namespace rcam {
namespace sweep {

using labels::atomic_add_i32;
using labels::atomic_max_i32;
using labels::atomic_min_i32;
using labels::find_root;
using labels::load_label;

constexpr int32_t kLevels = 256;
constexpr int32_t kNever = kLevels - 1;  // reach of a pixel that joins the frame at no wanted threshold

enum Status : int32_t {
  kDone = 0,          // iou (and for the largest contour, xywh) are final
  kTie = 2,           // largest contour with a shared maximum area: trace it on the host
  kInconsistent = 3,  // a hole count disagrees with the Euler number (a bug)
};

enum Mode : int32_t { kOuterIoU, kHoleIoU, kFrameLinks, kFilledAreas };
RCAM_LABELS_HD bool is_foreground(Mode mode) { return mode == kOuterIoU || mode == kFilledAreas; }

// Per-block scratch in global memory: nine int32 arrays over the nodes 0..HW (node p + 1 is pixel p,
// node 0 the frame of the background sweeps), then the reach of every pixel (uint8).
struct Scratch {
  int32_t* parent;
  int32_t* order;  // pixels in ascending key order (counting sort); start[v] indexes it
  int32_t* x0;     // kFrameLinks: the root each root was linked under, then pointer-jumping buffers
  int32_t* x1;     // kFrameLinks: the threshold of that link
  int32_t* y1;
  int32_t* area2;
  int32_t* roots[2];  // live roots before / after the batch (ping-pong)
  int32_t* merged;    // roots linked during the batch
  uint8_t* reach;     // [HW]

  static constexpr int64_t kArrays = 9;
  RCAM_LABELS_HD static int64_t ints(int64_t HW) { return kArrays * (HW + 1) + (HW + 3) / 4; }
  RCAM_LABELS_HD static Scratch at(int32_t* base, int64_t HW) {
    const int64_t n = HW + 1;
    Scratch s;
    s.parent = base;
    s.order = base + n;
    s.x0 = base + 2 * n;
    s.x1 = base + 3 * n;
    s.y1 = base + 4 * n;
    s.area2 = base + 5 * n;
    s.roots[0] = base + 6 * n;
    s.roots[1] = base + 7 * n;
    s.merged = base + 8 * n;
    s.reach = reinterpret_cast<uint8_t*>(base + 9 * n);
    return s;
  }
};

// Per-block state shared by the threads (__shared__ on the GPU, 3.6 KB).
struct Shared {
  int32_t start[kLevels + 1];  // start[v]: pixels with key < v
  int32_t cursor[kLevels];     // counts, then scatter cursors
  int32_t holes[kLevels];      // kOuterIoU: holes at each wanted level
  uint8_t wanted[kLevels];
  int32_t cur;  // roots[cur] holds the n_roots live roots before the batch
  int32_t n_roots, n_next, n_merged;
  int32_t euler4;  // 4 x (Euler number) of the current foreground
  int32_t any_holes;
  int32_t best_area2, ties;
  int32_t box[4];
  int32_t jumped[3];  // pointer jumping: whether round r changed a pointer, in jumped[r % 3]
  int32_t n_wanted;   // wanted thresholds below 255 (255 is never foreground)
  int32_t top_wanted;  // the largest of them
  unsigned long long best_iou_bits;
};

// One image's inputs and its rows of the outputs.
struct Image {
  const uint8_t* level;  // [H, W]
  int32_t H, W;
  const uint8_t* wanted;  // [256]: 1 where the threshold is wanted
  const int64_t* gt;      // [num_gt, 4]
  int64_t num_gt;
  bool multi_contour;
  double* iou;      // [256]
  int64_t* xywh;    // [256, 4]
  int32_t* status;  // [256]
};

// The pixels joining in a batch: keys lo..hi.  Foreground (thresholds falling): present before
// means key > hi, after means key >= lo.  Background (rising): key < lo, key <= hi.
struct Batch {
  int32_t lo, hi;
  bool fg;
  RCAM_LABELS_HD bool joins(int32_t v) const { return v >= lo && v <= hi; }
  RCAM_LABELS_HD bool before(int32_t v) const { return fg ? v > hi : v < lo; }
  RCAM_LABELS_HD bool after(int32_t v) const { return fg ? v >= lo : v <= hi; }
};

// A 2 x 2 cell's pixels as bits (1 top-left, 2 top-right, 4 bottom-left, 8 bottom-right).
RCAM_LABELS_HD int32_t cell_count(int32_t bits) { return (bits & 1) + ((bits >> 1) & 1) + ((bits >> 2) & 1) + (bits >> 3); }
// Half cells of the foreground polygon in the cell: 0, 0, 0, 1, 2 for 0..4 pixels.
RCAM_LABELS_HD int32_t cell_share(int32_t bits) {
  const int32_t k = cell_count(bits);
  return k == 4 ? 2 : k == 3 ? 1 : 0;
}
// The cell's bit-quad term of 4 x Euler (8-connected foreground): Q1 - Q3 - 2 QD.
RCAM_LABELS_HD int32_t cell_quad(int32_t bits) {
  const int32_t k = cell_count(bits);
  return (k == 1) - (k == 3) - 2 * (bits == 9 || bits == 6);
}

// Every node its own root (kFrameLinks: linked nowhere) with the box of its pixel; the batch
// bookkeeping reset.
RCAM_LABELS_HD void phase_reset_nodes(const Image& im, const Scratch& s, Shared* sh, Mode mode, int64_t tid,
                                   int64_t nt) {
  const int32_t W = im.W, HW = im.H * im.W;
  for (int32_t node = static_cast<int32_t>(tid); node <= HW; node += static_cast<int32_t>(nt)) {
    const int32_t p = node > 0 ? node - 1 : 0;
    s.parent[node] = node;
    s.x0[node] = mode == kFrameLinks ? node : p % W;
    s.x1[node] = mode == kFrameLinks ? 0 : p % W;
    s.y1[node] = p / W;
    s.area2[node] = 0;
  }
  if (tid == 0) {
    sh->cur = 0;
    sh->n_roots = sh->n_next = sh->n_merged = 0;
    sh->euler4 = 0;
    sh->best_area2 = -1;
    sh->ties = 0;
    sh->best_iou_bits = 0;
    if (is_foreground(mode) && sh->wanted[kLevels - 1]) {  // level > 255: always empty
      im.iou[kLevels - 1] = labels::best_iou_against(0, 0, 0, 0, im.gt, im.num_gt);
      im.status[kLevels - 1] = kDone;
    }
  }
}

// Unions of the batch's pixels with their present neighbours (8 foreground, 4 background plus the
// frame for border pixels); a pair of new pixels is united once, from the later one.  Links are
// recorded: for merging statistics, or (kFrameLinks) with the batch's threshold.
RCAM_LABELS_HD void phase_unite(const Image& im, const uint8_t* key, const Scratch& s, Shared* sh, const Batch& b,
                             Mode mode, int32_t thr, int64_t tid, int64_t nt) {
  const int32_t H = im.H, W = im.W;
  const int32_t first = sh->start[b.lo], last = sh->start[b.hi + 1];
  const Scratch links = s;
  int32_t* n_merged = &sh->n_merged;
  const bool frame_links = mode == kFrameLinks;
  auto record = [links, n_merged, frame_links, thr](int32_t child, int32_t root) {
    if (frame_links) {
      links.x0[child] = root;
      links.x1[child] = thr;
    } else {
      links.merged[atomic_add_i32(n_merged, 1)] = child;
    }
  };
  for (int32_t i = first + static_cast<int32_t>(tid); i < last; i += static_cast<int32_t>(nt)) {
    const int32_t p = s.order[i], x = p % W, y = p / W;
    for (int32_t dy = -1; dy <= 1; ++dy) {
      for (int32_t dx = -1; dx <= 1; ++dx) {
        if ((dx == 0 && dy == 0) || (!b.fg && dx != 0 && dy != 0)) continue;
        const int32_t qx = x + dx, qy = y + dy;
        if (qx < 0 || qy < 0 || qx >= W || qy >= H) continue;
        const int32_t q = qy * W + qx, v = key[q];
        if (b.before(v) || (q < p && b.joins(v))) labels::unite(s.parent, p + 1, q + 1, record);
      }
    }
    if (!b.fg && (x == 0 || y == 0 || x + 1 == W || y + 1 == H)) labels::unite(s.parent, p + 1, 0, record);
  }
}

// After the unions: the new pixels' boxes, cell shares and bit quads go to their roots; the roots
// linked in this batch add their statistics to their new roots; the live roots (old ones still
// roots, new pixels that are roots) are listed in roots[cur ^ 1].
RCAM_LABELS_HD void phase_stats(const Image& im, const uint8_t* key, const Scratch& s, Shared* sh, const Batch& b,
                             Mode mode, int64_t tid, int64_t nt) {
  const int32_t H = im.H, W = im.W;
  const int32_t first = sh->start[b.lo], last = sh->start[b.hi + 1];
  int32_t* next = s.roots[sh->cur ^ 1];
  int32_t euler4 = 0;
  for (int32_t i = first + static_cast<int32_t>(tid); i < last; i += static_cast<int32_t>(nt)) {
    const int32_t p = s.order[i], x = p % W, y = p / W, node = p + 1;
    const int32_t root = find_root(s.parent, node);
    if (root != node) {
      atomic_min_i32(s.x0 + root, x);
      atomic_max_i32(s.x1 + root, x);
      atomic_max_i32(s.y1 + root, y);
    } else {
      next[atomic_add_i32(&sh->n_next, 1)] = node;
    }
    if (!b.fg) continue;
    for (int32_t c = 0; c < 4; ++c) {  // the four cells holding p, by their top-left pixel
      const int32_t cx = x - 1 + (c & 1), cy = y - 1 + (c >> 1);
      int32_t before = 0, after = 0;
      bool owner = true;
      for (int32_t k = 0; k < 4; ++k) {
        const int32_t qx = cx + (k & 1), qy = cy + (k >> 1);
        if (qx < 0 || qy < 0 || qx >= W || qy >= H) continue;  // outside: background
        const int32_t q = qy * W + qx, v = key[q];
        before |= b.before(v) ? 1 << k : 0;
        after |= b.after(v) ? 1 << k : 0;
        if (q < p && b.joins(v)) owner = false;  // an earlier new pixel counts this cell
      }
      if (!owner) continue;
      euler4 += cell_quad(after) - cell_quad(before);
      const bool inside = cx >= 0 && cy >= 0 && cx + 1 < W && cy + 1 < H;
      const int32_t gain = inside && mode == kFilledAreas ? cell_share(after) - cell_share(before) : 0;
      if (gain != 0) atomic_add_i32(s.area2 + root, gain);  // share > 0: all its pixels are in p's component
    }
  }
  if (euler4 != 0) atomic_add_i32(&sh->euler4, euler4);
  for (int32_t j = static_cast<int32_t>(tid); j < sh->n_merged; j += static_cast<int32_t>(nt)) {
    const int32_t child = s.merged[j], root = find_root(s.parent, child);
    atomic_min_i32(s.x0 + root, load_label(s.x0, child));
    atomic_max_i32(s.x1 + root, load_label(s.x1, child));
    atomic_max_i32(s.y1 + root, load_label(s.y1, child));
    const int32_t area2 = load_label(s.area2, child);
    if (area2 != 0) atomic_add_i32(s.area2 + root, area2);
  }
  const int32_t* live = s.roots[sh->cur];
  for (int32_t j = static_cast<int32_t>(tid); j < sh->n_roots; j += static_cast<int32_t>(nt)) {
    const int32_t r = live[j];
    if (load_label(s.parent, r) == r) next[atomic_add_i32(&sh->n_next, 1)] = r;
  }
}

// A live root's contour box (inclusive extents); a hole's border box is its box grown by one pixel.
struct Extent {
  int32_t x0, y0, x1, y1;
};
RCAM_LABELS_HD Extent root_extent(const Image& im, const Scratch& s, int32_t root, bool hole) {
  const int32_t grow = hole ? 1 : 0;
  return Extent{load_label(s.x0, root) - grow, (root - 1) / im.W - grow, load_label(s.x1, root) + grow,
                load_label(s.y1, root) + grow};
}

// At a wanted level: the best contour IoU (all contours) or the maximum area (largest contour).
RCAM_LABELS_HD void phase_reduce(const Image& im, const Scratch& s, Shared* sh, Mode mode, int64_t tid, int64_t nt) {
  const int32_t* live = s.roots[sh->cur ^ 1];
  for (int32_t j = static_cast<int32_t>(tid); j < sh->n_next; j += static_cast<int32_t>(nt)) {
    const int32_t r = live[j];
    if (mode == kFilledAreas) {
      atomic_max_i32(&sh->best_area2, load_label(s.area2, r));
    } else {
      const Extent e = root_extent(im, s, r, mode == kHoleIoU);
      labels::atomic_max_nonneg_double(
          &sh->best_iou_bits, labels::contour_iou(e.x0, e.y0, e.x1, e.y1, im.H, im.W, im.gt, im.num_gt));
    }
  }
}

// Largest contour: count the roots with the maximum area; a unique one leaves its (x, y, w, h).
RCAM_LABELS_HD void phase_ties(const Image& im, const Scratch& s, Shared* sh, Mode mode, int64_t tid, int64_t nt) {
  if (mode != kFilledAreas) return;
  const int32_t* live = s.roots[sh->cur ^ 1];
  for (int32_t j = static_cast<int32_t>(tid); j < sh->n_next; j += static_cast<int32_t>(nt)) {
    const int32_t r = live[j];
    if (load_label(s.area2, r) != sh->best_area2 || atomic_add_i32(&sh->ties, 1) != 0) continue;
    const Extent e = root_extent(im, s, r, false);
    sh->box[0] = e.x0;
    sh->box[1] = e.y0;
    sh->box[2] = e.x1 - e.x0 + 1;
    sh->box[3] = e.y1 - e.y0 + 1;
  }
}

// Thread 0: the level's results, then the next batch's bookkeeping.
RCAM_LABELS_HD void phase_record(const Image& im, Shared* sh, Mode mode, int32_t thr, int32_t comps, int32_t holes,
                              int64_t tid) {
  if (tid != 0) return;
  double* iou = im.iou + thr;
  int32_t* status = im.status + thr;
  const double best = labels::double_of_bits(sh->best_iou_bits);
  if (mode == kHoleIoU) {  // a level with holes: the best of its hole boxes and its outer boxes
    if (best > *iou) *iou = best;
    if (comps != sh->holes[thr]) *status = kInconsistent;
  } else if (sh->euler4 % 4 != 0 || holes < 0 || (mode == kFilledAreas && holes != 0)) {
    *status = kInconsistent;
  } else if (comps == 0) {
    *iou = labels::best_iou_against(0, 0, 0, 0, im.gt, im.num_gt);
    *status = kDone;
  } else if (mode == kOuterIoU) {
    *iou = best;
    *status = kDone;
    sh->holes[thr] = holes;
    if (holes > 0) sh->any_holes = 1;
  } else if (sh->ties != 1) {
    *status = kTie;
  } else {
    int64_t* xywh = im.xywh + 4 * thr;
    for (int k = 0; k < 4; ++k) xywh[k] = sh->box[k];
    *iou = labels::rect_iou(xywh, im.H, im.W, im.gt, im.num_gt);
    *status = kDone;
  }
  sh->cur ^= 1;
  sh->n_roots = sh->n_next;
  sh->n_next = 0;
  sh->n_merged = 0;
  sh->best_area2 = -1;
  sh->ties = 0;
  sh->best_iou_bits = 0;
}

// One sweep over the wanted levels (kHoleIoU: those with holes) in `key`'s order.
template <typename Block>
RCAM_LABELS_HD void run_sweep(Block& block, const Image& im, const uint8_t* key, const Scratch& s, Shared* sh,
                           Mode mode) {
  const bool fg = is_foreground(mode);
  block.run([&](int64_t tid, int64_t nt) { phase_reset_nodes(im, s, sh, mode, tid, nt); });
  int32_t bound = fg ? kLevels - 1 : 0;  // foreground: keys > bound present; background: keys < bound
  for (int32_t step = 0; step < kLevels - 1; ++step) {
    const int32_t thr = fg ? kLevels - 2 - step : step;
    if (!sh->wanted[thr] || (mode == kHoleIoU && sh->holes[thr] == 0)) continue;
    const Batch b = fg ? Batch{thr + 1, bound, true} : Batch{bound, thr, false};
    bound = fg ? thr : thr + 1;
    block.run([&](int64_t tid, int64_t nt) { phase_unite(im, key, s, sh, b, mode, thr, tid, nt); });
    if (mode == kFrameLinks) continue;  // only the links are wanted
    block.run([&](int64_t tid, int64_t nt) { phase_stats(im, key, s, sh, b, mode, tid, nt); });
    const int32_t comps = sh->n_next;
    const int32_t holes = fg ? comps - sh->euler4 / 4 : 0;
    block.run([&](int64_t tid, int64_t nt) { phase_reduce(im, s, sh, mode, tid, nt); });
    if (mode == kFilledAreas) block.run([&](int64_t tid, int64_t nt) { phase_ties(im, s, sh, mode, tid, nt); });
    block.run([&](int64_t tid, int64_t) { phase_record(im, sh, mode, thr, comps, holes, tid); });
  }
}

// After kFrameLinks: each pixel's reach, the threshold of the last link on its way up the link
// forest when that way ends at the frame (thresholds never fall along the way: a root is linked
// after the links below it), else kNever.  Pointer jumping: every round doubles the part of the
// way each node has covered, keeping the largest threshold met; (x0, x1) and (y1, area2) hold
// (pointer, threshold) for even and odd rounds.
template <typename Block>
RCAM_LABELS_HD void reach_frame(Block& block, const Image& im, const Scratch& s, Shared* sh) {
  const int32_t HW = im.H * im.W;
  if (sh->n_wanted <= 1) {  // one threshold (PaS): a pixel reaches the frame there iff its root is the frame
    block.run([&](int64_t tid, int64_t nt) {
      for (int32_t p = static_cast<int32_t>(tid); p < HW; p += static_cast<int32_t>(nt)) {
        const bool framed = sh->n_wanted == 1 && find_root(s.parent, p + 1) == 0;
        s.reach[p] = static_cast<uint8_t>(framed ? sh->top_wanted : kNever);
      }
    });
    return;
  }
  block.run([&](int64_t tid, int64_t) {
    if (tid == 0) sh->jumped[0] = sh->jumped[1] = sh->jumped[2] = 0;
  });
  int32_t round = 0;
  for (;; ++round) {
    const bool even = round % 2 == 0;
    const int32_t* up = even ? s.x0 : s.y1;
    const int32_t* thr = even ? s.x1 : s.area2;
    int32_t* up_next = even ? s.y1 : s.x0;
    int32_t* thr_next = even ? s.area2 : s.x1;
    block.run([&](int64_t tid, int64_t nt) {
      if (tid == 0) sh->jumped[(round + 1) % 3] = 0;  // its last reader finished before this round
      bool jumped = false;
      for (int32_t node = static_cast<int32_t>(tid); node <= HW; node += static_cast<int32_t>(nt)) {
        const int32_t mid = up[node], top = up[mid];
        up_next[node] = top;
        thr_next[node] = thr[node] > thr[mid] ? thr[node] : thr[mid];
        jumped = jumped || top != mid;
      }
      if (jumped) sh->jumped[round % 3] = 1;
    });
    if (!sh->jumped[round % 3]) break;
  }
  const bool even_result = round % 2 == 0;  // the last round wrote the odd buffers when round is even
  const int32_t* up = even_result ? s.y1 : s.x0;
  const int32_t* thr = even_result ? s.area2 : s.x1;
  block.run([&](int64_t tid, int64_t nt) {
    for (int32_t p = static_cast<int32_t>(tid); p < HW; p += static_cast<int32_t>(nt)) {
      s.reach[p] = static_cast<uint8_t>(up[p + 1] == 0 ? thr[p + 1] : kNever);
    }
  });
}

// Counting sort of the pixels by key into s.order, with sh->start[v] the first index of key v.
template <typename Block>
RCAM_LABELS_HD void sort_pixels(Block& block, const uint8_t* key, int32_t HW, const Scratch& s, Shared* sh) {
  block.run([&](int64_t tid, int64_t nt) {
    for (int32_t v = static_cast<int32_t>(tid); v < kLevels; v += static_cast<int32_t>(nt)) sh->cursor[v] = 0;
  });
  block.run([&](int64_t tid, int64_t nt) {
    for (int32_t p = static_cast<int32_t>(tid); p < HW; p += static_cast<int32_t>(nt)) atomic_add_i32(sh->cursor + key[p], 1);
  });
  block.run([&](int64_t tid, int64_t) {
    if (tid != 0) return;
    int32_t total = 0;
    for (int32_t v = 0; v < kLevels; ++v) {
      sh->start[v] = total;
      total += sh->cursor[v];
      sh->cursor[v] = sh->start[v];
    }
    sh->start[kLevels] = total;
  });
  block.run([&](int64_t tid, int64_t nt) {
    for (int32_t p = static_cast<int32_t>(tid); p < HW; p += static_cast<int32_t>(nt)) {
      s.order[atomic_add_i32(sh->cursor + key[p], 1)] = p;
    }
  });
}

// One image: all-contour IoUs from the outer and hole sweeps; largest contours from the frame links
// and the filled sweep.
template <typename Block>
RCAM_LABELS_HD void sweep_image(Block& block, const Image& im, const Scratch& s, Shared* sh) {
  const int32_t HW = im.H * im.W;
  block.run([&](int64_t tid, int64_t nt) {
    for (int32_t v = static_cast<int32_t>(tid); v < kLevels; v += static_cast<int32_t>(nt)) {
      sh->holes[v] = 0;
      sh->wanted[v] = im.wanted[v];
    }
    if (tid != 0) return;
    sh->any_holes = 0;
    sh->n_wanted = 0;
    sh->top_wanted = -1;
    for (int32_t v = 0; v < kLevels - 1; ++v) {
      if (im.wanted[v]) {
        ++sh->n_wanted;
        sh->top_wanted = v;
      }
    }
  });
  sort_pixels(block, im.level, HW, s, sh);
  if (im.multi_contour) {
    run_sweep(block, im, im.level, s, sh, kOuterIoU);
    if (sh->any_holes) run_sweep(block, im, im.level, s, sh, kHoleIoU);
  } else {
    run_sweep(block, im, im.level, s, sh, kFrameLinks);
    reach_frame(block, im, s, sh);
    sort_pixels(block, s.reach, HW, s, sh);
    run_sweep(block, im, s.reach, s, sh, kFilledAreas);
  }
  // The sweeps' last steps read sh->wanted and sh->holes without a barrier after them (levels that
  // are skipped): no thread may start the next image, which rewrites them, before all are done.
  block.run([](int64_t, int64_t) {});
}

}  // namespace sweep
}  // namespace rcam
