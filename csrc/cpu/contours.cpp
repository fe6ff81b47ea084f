// Border following on binary masks (S. Suzuki and K. Abe, "Topological structural analysis of
// digitized binary images by border following", CVGIP 30, 1985), with 8-connected foreground,
// written from the paper.  Produces the same contours, in the same order, as OpenCV's
// findContours(mask, RETR_TREE, CHAIN_APPROX_SIMPLE) and the bounding box / contourArea of each.
//
// Per (image, threshold) job:
//   * f = the paper's label image with a 1-pixel zero frame (pixels outside the image are 0):
//     f = (level > threshold) inside.  It lives in per-thread buffers reused across jobs; the
//     frame is written once and never touched again (border following only relabels nonzero
//     pixels).  See Tracer for its storage (uint8 state + int32 labels).
//   * Raster scan, rows top to bottom, columns left to right; LNBD starts at the frame (a hole
//     border, NBD = 1) on every row.  At a pixel with f(i,j) = 1 and f(i,j-1) = 0 an outer border
//     starts; otherwise at f(i,j) >= 1 and f(i,j+1) = 0 a hole border starts (LNBD <- f(i,j)
//     first when f(i,j) > 1).  NBD += 1 and the parent is
//         new outer, LNBD outer -> parent(LNBD)      new outer, LNBD hole -> LNBD
//         new hole,  LNBD outer -> LNBD              new hole,  LNBD hole -> parent(LNBD)
//     The border is followed (steps 3.1-3.5 of the paper) marking its pixels NBD, or -NBD where the
//     right neighbour is a 0-pixel examined during the search.  Afterwards, any f(i,j) != 0, 1
//     sets LNBD <- |f(i,j)|.
//   * The contour's points are the pixels visited by the follower, in order (x = col, y = row);
//     CHAIN_APPROX_SIMPLE only drops the middle points of straight runs, which changes neither
//     the bounding box nor the polygon area, so both are accumulated while following:
//     area = |shoelace sum| / 2, computed exactly in int64 (a move by (dx, dy) from (x, y) adds
//     x*dy - y*dx).  An isolated pixel is a 1-point contour: box (x, y, 1, 1), area 0.
//
// Output order (what OpenCV 5.0 returns for RETR_TREE; checked against cv2 on random, smooth and
// adversarial masks): a depth-first pre-order walk of the border tree in which the children of a
// border -- and the top-level borders, the children of the frame -- come in reverse order of
// discovery (the last one found first), each border immediately followed by its subtree.  The
// tree is stored as "first child = most recently discovered child, next sibling = the child
// discovered before it", so the walk needs no sorting and no stack.
//
// Shortcuts (exact, not heuristics): a mask with no pixel above the threshold has no contour; a
// mask with every pixel above it has one outer border, the image rectangle, box (0, 0, W, H) and
// area (W - 1) * (H - 1).  Both are detected from the image's min / max level.
#include "contours.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "levels.h"
#include "parallel.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace rcam {
namespace cpu {
namespace {

struct Border {
  int32_t parent;        // index of the parent border (0 = the frame)
  int32_t first_child;   // most recently discovered child, -1 if none
  int32_t next_sibling;  // child of the same parent discovered just before this one, -1 if none
  int32_t hole;          // 1 for a hole border (the frame counts as one)
  int32_t x0, y0, x1, y1;  // inclusive bounding box, image coordinates
  int64_t area2;           // twice the signed polygon area
};

// Neighbour directions, counterclockwise as displayed (rows grow downwards):
// 0 right, 1 up-right, 2 up, 3 up-left, 4 left, 5 down-left, 6 down, 7 down-right.
constexpr int kDx[8] = {1, 1, 0, -1, -1, -1, 0, 1};
constexpr int kDy[8] = {0, -1, -1, -1, 0, 1, 1, 1};

// Bit c of the result: bit 0 of p[c] differs from bit 0 of p[c - 1], for c = 0 .. kBlock - 1.
#if defined(__SSE2__)
constexpr int64_t kBlock = 32;
inline uint64_t transitions(const uint8_t* p) {
  const __m128i one = _mm_set1_epi8(1);
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i al = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p - 1));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
  const __m128i bl = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 15));
  // (x & 1) << 7 moves bit 0 of every byte to its sign bit (16-bit shift: nothing crosses bytes).
  const __m128i ta = _mm_slli_epi16(_mm_and_si128(_mm_xor_si128(a, al), one), 7);
  const __m128i tb = _mm_slli_epi16(_mm_and_si128(_mm_xor_si128(b, bl), one), 7);
  return static_cast<uint64_t>(static_cast<uint32_t>(_mm_movemask_epi8(ta))) |
         (static_cast<uint64_t>(static_cast<uint32_t>(_mm_movemask_epi8(tb))) << 16);
}
#elif defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
// Portable SWAR fallback.
constexpr int64_t kBlock = 8;
inline uint64_t transitions(const uint8_t* p) {
  uint64_t v, l;
  std::memcpy(&v, p, 8);
  std::memcpy(&l, p - 1, 8);
  const uint64_t t = (v ^ l) & 0x0101010101010101ull;
  // Gather the low bit of byte c (bit 8c, little-endian load) into bit c: the product puts it at
  // bit 56 + c, and no two partial products overlap.
  return (t * 0x0102040810204080ull) >> 56;
}
#else
constexpr int64_t kBlock = 8;
inline uint64_t transitions(const uint8_t* p) {
  uint64_t bits = 0;
  for (int c = 0; c < 8; ++c) bits |= static_cast<uint64_t>((p[c] ^ p[c - 1]) & 1) << c;
  return bits;
}
#endif

// Traces every border of one mask at a time; one per thread, reused across jobs of the same size.
//
// The label image f of the paper is stored in two parts, so that the per-job work is a uint8 fill
// and a uint8 scan rather than an int32 one:
//   state[p]: 0 = 0-pixel, 1 = unlabelled 1-pixel (f = 1), 3 = labelled f = +lab[p],
//             5 = labelled f = -lab[p].  Bit 0 is "nonzero", which border following never changes.
//   lab[p]:   int32 NBD, meaningful only where state > 1 (never needs clearing).
// Both are (H + 2) x (W + 2) with a zero frame in state (written once, never relabelled: border
// following only touches nonzero pixels).
//
// Raster scan without visiting every pixel: a border can only start at a pixel whose left or right
// neighbour has the other zero-ness, so each row is scanned kBlock pixels at a time for such
// transitions (bit 0 of state, which tracing never changes), and only those pixels are examined.
// LNBD is needed only when a border starts; it is found then by walking left to the nearest
// labelled pixel of the row (or the frame).  That is the value the paper's running LNBD holds:
// pixels between the previous border start of the row and this one were labelled before the scan
// passed them (by the traces of earlier rows or of that previous start), and the previous start
// pixel itself is always labelled by its own trace, so the walk never goes past it and the walks
// of one row cover it at most once.
class Tracer {
 public:
  Tracer(int64_t H, int64_t W)
      : H_(H),
        W_(W),
        S_(W + 2),
        // + kBlock: the row-scan loads may read up to kBlock bytes past the last frame row.
        state_(new uint8_t[static_cast<size_t>((H + 2) * (W + 2) + kBlock)]),
        lab_(new int32_t[static_cast<size_t>((H + 2) * (W + 2))]) {
    // Only the frame (and the padding) of state needs zeroing: fill() writes the interior of
    // every row and lab is read only where state says labelled.
    uint8_t* st = state_.get();
    std::memset(st, 0, static_cast<size_t>(S_ + 1));
    for (int64_t i = 1; i <= H; ++i) {
      st[i * S_ + W + 1] = 0;
      st[(i + 1) * S_] = 0;
    }
    std::memset(st + (H + 1) * S_, 0, static_cast<size_t>(S_ + kBlock));
    for (int d = 0; d < 16; ++d) off_[d] = kDy[d & 7] * S_ + kDx[d & 7];
    borders_.reserve(64);
  }

  // Finds all borders of (level > thr).  level: [H, W] uint8.
  void run(const uint8_t* level, int64_t thr) {
    fill(level, thr);
    borders_.clear();
    // The frame: a hole border, the root of the tree.
    borders_.push_back(Border{-1, -1, -1, 1, 0, 0, 0, 0, 0});
    const int64_t H = H_, W = W_, S = S_;
    uint8_t* st = state_.get();
    for (int64_t i = 1; i <= H; ++i) {
      uint8_t* row = st + i * S;
      // Transition at column k: nonzero(k) != nonzero(k - 1), for k = 1 .. W + 1 (the right frame).
      for (int64_t kb = 1; kb <= W + 1; kb += kBlock) {
        uint64_t t = transitions(row + kb);
        if (t == 0) continue;
        const int64_t left = W + 2 - kb;  // columns kb .. W + 1 belong to this row
        if (left < kBlock) t &= (uint64_t{1} << left) - 1;
        while (t != 0) {
          const int64_t k = kb + __builtin_ctzll(t);
          t &= t - 1;
          // Pixel k - 1 or k is the one nonzero side of the transition.  A one-pixel run has
          // transitions on both sides; it is visited once, from the left one.  (k >= 2 in the
          // second branch: column 0 is frame, so row[1] == 0 has no transition at k = 1.)
          if (row[k] & 1) {
            visit(i, row, k);      // left end of a run of 1-pixels
          } else if (row[k - 2] & 1) {
            visit(i, row, k - 1);  // right end of a run longer than one pixel
          }
        }
      }
    }
  }

  // Calls fn(border) for every border in cv2 order.
  template <typename F>
  void visit_in_order(const F& fn) const {
    const Border* b = borders_.data();
    int32_t k = b[0].first_child;
    while (k > 0) {
      fn(b[k]);
      if (b[k].first_child > 0) {
        k = b[k].first_child;
        continue;
      }
      while (k > 0 && b[k].next_sibling < 0) k = b[k].parent;
      if (k <= 0) break;
      k = b[k].next_sibling;
    }
  }

  int64_t num_borders() const { return static_cast<int64_t>(borders_.size()) - 1; }

 private:
  // Steps (1) and (2) of the paper at the nonzero pixel (i, j) (row = its row in state): starts
  // and follows a border when one starts there.
  void visit(int64_t i, uint8_t* row, int64_t j) {
    const uint8_t s = row[j];
    bool hole;
    int32_t lnbd;
    if (s == 1 && row[j - 1] == 0) {
      hole = false;
      lnbd = last_label(i, row, j);
    } else if (s <= 3 && row[j + 1] == 0) {
      hole = true;
      lnbd = s == 3 ? lab_[static_cast<size_t>(i * S_ + j)] : last_label(i, row, j);
    } else {
      return;
    }
    const int32_t nbd = static_cast<int32_t>(borders_.size()) + 1;
    const Border& last = borders_[static_cast<size_t>(lnbd - 1)];
    int32_t parent = (last.hole != 0) == hole ? last.parent : lnbd - 1;
    if (parent < 0) parent = 0;  // (cannot happen for a hole below the frame; be safe)
    follow(i * S_ + j, hole, nbd);
    Border& b = borders_.back();
    b.parent = parent;
    Border& pb = borders_[static_cast<size_t>(parent)];
    b.next_sibling = pb.first_child;
    pb.first_child = nbd - 1;
  }

  // LNBD at (i, j): |f| of the nearest labelled pixel left of j in row i, 1 (the frame) if none.
  int32_t last_label(int64_t i, const uint8_t* row, int64_t j) const {
    for (int64_t c = j - 1; c >= 1; --c) {
      if (row[c] > 1) return lab_[static_cast<size_t>(i * S_ + c)];
    }
    return 1;
  }

  void fill(const uint8_t* level, int64_t thr) {
    uint8_t* st = state_.get();
    if (thr < 0 || thr >= 255) {
      const uint8_t v = thr < 0 ? 1 : 0;
      for (int64_t i = 0; i < H_; ++i) std::memset(st + (i + 1) * S_ + 1, v, W_);
      return;
    }
    // Locals (not members) in the loop: stores through a uint8_t* may alias *this, which would
    // keep the compiler from vectorising.
    const uint8_t t = static_cast<uint8_t>(thr);
    const int64_t H = H_, W = W_, S = S_;
    for (int64_t i = 0; i < H; ++i) {
      const uint8_t* src = level + i * W;
      uint8_t* dst = st + (i + 1) * S + 1;
      for (int64_t j = 0; j < W; ++j) dst[j] = static_cast<uint8_t>(src[j] > t);
    }
  }

  // Follows the border starting at pixel index p0 (an outer border when !hole) and appends it.
  void follow(int64_t p0, bool hole, int32_t nbd) {
    uint8_t* st = state_.get();
    int32_t* lab = lab_.get();
    const int32_t x0 = static_cast<int32_t>(p0 % S_), y0 = static_cast<int32_t>(p0 / S_);
    Border b{0, -1, -1, hole ? 1 : 0, x0, y0, x0, y0, 0};
    // 3.1: clockwise around p0 from the 0-pixel that started the border, find a nonzero pixel.
    const int d0 = hole ? 0 : 4;
    int d1 = -1;
    for (int k = 0; k < 8; ++k) {
      const int d = (d0 - k) & 7;
      if (st[p0 + off_[d]] != 0) {
        d1 = d;
        break;
      }
    }
    if (d1 < 0) {  // isolated pixel
      st[p0] = 5;
      lab[p0] = nbd;
      finish(b);
      return;
    }
    const int64_t p1 = p0 + off_[d1];
    // 3.2 - 3.5
    int64_t p3 = p0;
    int32_t x = x0, y = y0;
    int dprev = d1;  // direction from p3 to p2 (the previous border pixel)
    int64_t area2 = 0;
    int32_t bx0 = x0, by0 = y0, bx1 = x0, by1 = y0;
    for (;;) {
      // 3.3: counterclockwise from the neighbour after p2, find the first nonzero pixel p4.
      int d = dprev + 1;
      while (st[p3 + off_[d]] == 0) ++d;
      // d is in (dprev, dprev + 8]; the right neighbour (direction 0 == 8) was examined and found
      // 0 exactly when the search went past it, i.e. d > 8 (dprev + 1 <= 8 always).
      // 3.4
      if (d > 8) {
        st[p3] = 5;
        lab[p3] = nbd;
      } else if (st[p3] == 1) {
        st[p3] = 3;
        lab[p3] = nbd;
      }
      const int dd = d & 7;
      area2 += static_cast<int64_t>(x) * kDy[dd] - static_cast<int64_t>(y) * kDx[dd];
      const int64_t p4 = p3 + off_[dd];
      // 3.5
      if (p4 == p0 && p3 == p1) break;
      x += kDx[dd];
      y += kDy[dd];
      bx0 = std::min(bx0, x);
      bx1 = std::max(bx1, x);
      by0 = std::min(by0, y);
      by1 = std::max(by1, y);
      dprev = (dd + 4) & 7;
      p3 = p4;
    }
    b.x0 = bx0;
    b.y0 = by0;
    b.x1 = bx1;
    b.y1 = by1;
    b.area2 = area2;
    finish(b);
  }

  void finish(Border& b) {
    // Padded -> image coordinates.
    b.x0 -= 1;
    b.x1 -= 1;
    b.y0 -= 1;
    b.y1 -= 1;
    borders_.push_back(b);
  }

  int64_t H_, W_, S_;
  int64_t off_[16];
  std::unique_ptr<uint8_t[]> state_;
  std::unique_ptr<int32_t[]> lab_;
  std::vector<Border> borders_;
};

void check_args(const char* name, const void* levels, const void* thresholds, const void* out,
                bool need_out, int64_t N, int64_t H, int64_t W, int64_t T) {
  const std::string fn = std::string("rethinkcam_fast.") + name;
  if (N < 0 || H < 0 || W < 0 || T < 0) {
    throw std::invalid_argument(fn + ": negative size (N=" + std::to_string(N) + ", H=" +
                                std::to_string(H) + ", W=" + std::to_string(W) +
                                ", T=" + std::to_string(T) + ")");
  }
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (H > 0 && W > 0 && (H > kMax / 4 || W > kMax / 4 || (H + 2) > (kMax - 16) / (W + 2))) {
    throw std::invalid_argument(fn + ": image too large (H=" + std::to_string(H) +
                                ", W=" + std::to_string(W) + ")");
  }
  if (T > 0 && N > std::numeric_limits<int64_t>::max() / T) {
    throw std::invalid_argument(fn + ": N * T overflows");
  }
  const int64_t jobs = N * T;
  if (jobs > 0 && need_out && out == nullptr) throw std::invalid_argument(fn + ": null pointer");
  if (jobs > 0 && H > 0 && W > 0 && (levels == nullptr || thresholds == nullptr)) {
    throw std::invalid_argument(fn + ": null pointer");
  }
}

// Smallest and largest level (a plain loop: the compiler vectorises the uint8 min/max reductions,
// std::minmax_element it does not).
void level_range(const uint8_t* level, int64_t n, int* lo, int* hi) {
  uint8_t mn = 255, mx = 0;
  for (int64_t k = 0; k < n; ++k) {
    mn = std::min(mn, level[k]);
    mx = std::max(mx, level[k]);
  }
  *lo = mn;
  *hi = mx;
}

// What a threshold makes of an image whose levels span [lo, hi]: 0 = an empty mask (no contour),
// 1 = a full mask (one border, the image rectangle), 2 = a mask to trace.
inline int mask_kind(int64_t thr, int lo, int hi) { return thr >= hi ? 0 : thr < lo ? 1 : 2; }

// Runs job_fn(tracer_or_null, job, kind) for the jobs [b, e) of one chunk, in order.
// kind: 0 = empty mask, 1 = full mask, 2 = traced (tracer holds the borders).
template <typename F>
void run_jobs(const uint8_t* levels, const int64_t* thresholds, int64_t H, int64_t W, int64_t T,
              int64_t b, int64_t e, const F& job_fn) {
  const int64_t HW = H * W;
  if (HW == 0) {
    for (int64_t job = b; job < e; ++job) job_fn(static_cast<Tracer*>(nullptr), job, 0);
    return;
  }
  Tracer* tracer = nullptr;
  std::unique_ptr<Tracer> storage;  // created on the first traced job
  int64_t cached_n = -1;
  int lo = 0, hi = 0;
  for (int64_t job = b; job < e; ++job) {
    const int64_t n = job / T;
    const uint8_t* level = levels + n * HW;
    if (n != cached_n) {
      level_range(level, HW, &lo, &hi);
      cached_n = n;
    }
    const int64_t thr = thresholds[job];
    const int kind = mask_kind(thr, lo, hi);
    if (kind != 2) {
      job_fn(static_cast<Tracer*>(nullptr), job, kind);
    } else {
      if (tracer == nullptr) {
        storage.reset(new Tracer(H, W));
        tracer = storage.get();
      }
      tracer->run(level, thr);
      job_fn(tracer, job, 2);
    }
  }
}

int chunk_count(int64_t jobs, int64_t HW, int num_threads) {
  const int64_t work = jobs * std::max<int64_t>(HW, 1);
  return static_cast<int>(std::min<int64_t>(effective_threads(work, num_threads, 65536),
                                            std::max<int64_t>(jobs, 1)));
}

inline int64_t chunk_begin(int64_t jobs, int64_t nchunks, int64_t c) {
  const int64_t base = jobs / nchunks, extra = jobs % nchunks;
  return c * base + std::min(c, extra);
}

}  // namespace

void ContourBoxes::copy_to(int64_t* boxes, double* areas, uint8_t* is_hole) const {
  int64_t at = 0;
  for (const Chunk& c : chunks) {
    const size_t k = c.areas.size();
    if (k == 0) continue;
    std::memcpy(boxes + 4 * at, c.boxes.data(), 4 * k * sizeof(int64_t));
    std::memcpy(areas + at, c.areas.data(), k * sizeof(double));
    std::memcpy(is_hole + at, c.is_hole.data(), k * sizeof(uint8_t));
    at += static_cast<int64_t>(k);
  }
}

ContourBoxes contour_boxes(const uint8_t* levels, const int64_t* thresholds, int64_t N, int64_t H,
                           int64_t W, int64_t T, int num_threads) {
  check_args("contour_boxes", levels, thresholds, nullptr, false, N, H, W, T);
  ContourBoxes res;
  const int64_t jobs = N * T;
  res.counts.assign(static_cast<size_t>(jobs), 0);
  if (jobs == 0) return res;
  const int nchunks = chunk_count(jobs, H * W, num_threads);
  res.chunks.resize(static_cast<size_t>(nchunks));
  parallel_for(0, nchunks, nchunks, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      ContourBoxes::Chunk& out = res.chunks[static_cast<size_t>(c)];
      run_jobs(levels, thresholds, H, W, T, chunk_begin(jobs, nchunks, c),
               chunk_begin(jobs, nchunks, c + 1), [&](Tracer* tr, int64_t job, int kind) {
                 int64_t count = 0;
                 if (kind == 1) {
                   out.boxes.insert(out.boxes.end(), {0, 0, W, H});
                   out.areas.push_back(static_cast<double>((W - 1) * (H - 1)));
                   out.is_hole.push_back(0);
                   count = 1;
                 } else if (kind == 2) {
                   tr->visit_in_order([&](const Border& b) {
                     out.boxes.insert(out.boxes.end(),
                                      {b.x0, b.y0, int64_t{b.x1} - b.x0 + 1,
                                       int64_t{b.y1} - b.y0 + 1});
                     out.areas.push_back(static_cast<double>(std::llabs(b.area2)) * 0.5);
                     out.is_hole.push_back(static_cast<uint8_t>(b.hole));
                   });
                   count = tr->num_borders();
                 }
                 res.counts[static_cast<size_t>(job)] = count;
               });
    }
  });
  for (int64_t c : res.counts) res.total += c;
  return res;
}

namespace {

// (x, y, w, h) of the first contour of maximum area in cv2 order (strict >, like Python's max();
// twice the area in int64 is exact, as cv2's double areas are), from a tracer that ran.
void largest_traced(const Tracer& tr, int64_t* o) {
  const Border* best = nullptr;
  int64_t best_a = -1;
  tr.visit_in_order([&](const Border& b) {
    const int64_t a = std::llabs(b.area2);
    if (a > best_a) {
      best_a = a;
      best = &b;
    }
  });
  if (best == nullptr) {  // (a nonempty mask always has a border)
    o[0] = o[1] = o[2] = o[3] = 0;
    return;
  }
  o[0] = best->x0;
  o[1] = best->y0;
  o[2] = int64_t{best->x1} - best->x0 + 1;
  o[3] = int64_t{best->y1} - best->y0 + 1;
}

// (x, y, w, h) of the largest contour of a job of mask_kind `kind` (the tracer ran for kind 2), or
// (0, 0, 0, 0) for an empty mask.
void largest_box(const Tracer* tr, int kind, int64_t H, int64_t W, int64_t* o) {
  if (kind == 0) {
    o[0] = o[1] = o[2] = o[3] = 0;
  } else if (kind == 1) {
    o[0] = o[1] = 0;
    o[2] = W;
    o[3] = H;
  } else {
    largest_traced(*tr, o);
  }
}

}  // namespace

struct LargestContourFinder::Impl {
  Impl(int64_t H, int64_t W) : tracer(H, W), H(H), W(W) {}
  Tracer tracer;
  int64_t H, W;
};

LargestContourFinder::LargestContourFinder(int64_t H, int64_t W) : impl_(new Impl(H, W)) {}
LargestContourFinder::~LargestContourFinder() { delete impl_; }

void LargestContourFinder::find(const uint8_t* level, int64_t thr, int64_t xywh[4]) {
  int lo = 0, hi = 0;
  level_range(level, impl_->H * impl_->W, &lo, &hi);
  const int kind = mask_kind(thr, lo, hi);
  if (kind == 2) impl_->tracer.run(level, thr);
  largest_box(&impl_->tracer, kind, impl_->H, impl_->W, xywh);
}

void contour_largest_boxes(const uint8_t* levels, const int64_t* thresholds, int64_t* out,
                           int64_t N, int64_t H, int64_t W, int64_t T, int num_threads) {
  check_args("contour_largest_boxes", levels, thresholds, out, true, N, H, W, T);
  const int64_t jobs = N * T;
  if (jobs == 0) return;
  const int nchunks = chunk_count(jobs, H * W, num_threads);
  parallel_for(0, nchunks, nchunks, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      run_jobs(levels, thresholds, H, W, T, chunk_begin(jobs, nchunks, c),
               chunk_begin(jobs, nchunks, c + 1), [&](Tracer* tr, int64_t job, int kind) { largest_box(tr, kind, H, W, out + 4 * job); });
    }
  });
}

void map_largest_boxes(const void* maps, int dtype, const int64_t* thresholds, int64_t* out, int64_t N,
                       int64_t H, int64_t W, int64_t T, int num_threads, uint8_t* bad) {
  check_args("map_largest_boxes", maps, thresholds, out, true, N, H, W, T);
  if (N == 0) return;
  const int64_t HW = H * W;
  if (HW == 0 || T == 0) {
    std::fill(out, out + 4 * N * T, int64_t{0});
    if (bad != nullptr) std::fill(bad, bad + N, uint8_t{0});
    return;
  }
  const int threads = static_cast<int>(std::min<int64_t>(effective_threads(N * HW, num_threads, 65536), N));
  std::atomic<int64_t> next{0};  // images handed out one at a time: their tracing cost varies
  parallel_for(0, threads, threads, [&](int64_t, int64_t) {
    std::unique_ptr<uint8_t[]> level(new uint8_t[static_cast<size_t>(HW)]);
    LargestContourFinder finder(H, W);
    for (int64_t n; (n = next.fetch_add(1, std::memory_order_relaxed)) < N;) {
      const bool outside = convert_levels(maps, dtype, n * HW, HW, level.get(), bad != nullptr);
      if (bad != nullptr) bad[n] = outside ? 1 : 0;
      for (int64_t t = 0; t < T; ++t) finder.find(level.get(), thresholds[n * T + t], out + 4 * (n * T + t));
    }
  });
}

}  // namespace cpu
}  // namespace rcam
