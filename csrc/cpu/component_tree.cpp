// All thresholds of a uint8 map in one pass (DESIGN.md §3): the contour boxes and contour areas of
// findContours(level > thr, RETR_TREE) for every wanted thr, without one mask per threshold.
//
// What OpenCV returns for a mask, in terms of connected components (foreground 8-connected,
// background 4-connected, the image surrounded by a background frame):
//   * one outer border per foreground component C; its boundingRect is C's bounding box;
//   * one hole border per background component H that does not reach the frame (a hole); it runs
//     through the foreground pixels 4-adjacent to H, so its boundingRect is H's box grown by one
//     pixel on every side (the four pixels next to H's extreme pixels are such pixels).
// contourArea is the area of the polygon through the traced pixel centres.  Cut the plane into
// the unit cells between four pixel centres: the polygon of the foreground covers, per cell, the
// full cell when the cell's four pixels are foreground, half of it (a triangle) when three are,
// nothing otherwise; a hole's polygon covers the rest of the cells its pixels touch, split between
// the background components present (one pixel alone or two diagonal pixels: half a cell each;
// two adjacent, three or four pixels: the whole cell).  So, in units of half a cell,
//     area2(outer border of C) = fg_area2(C) + sum of area2(H) over the holes H of C,
//     area2(hole border of H)  = bg_area2(H),
// where fg_area2 / bg_area2 sum the per-cell shares of the component's own pixels.  Both sums
// change only in the four cells around a pixel when it joins a component, by an amount fixed by
// its 8 neighbours (a lookup table below), and add up when components merge.
//
// Components only merge as pixels are added, so union-find sweeps over the pixels in level order
// (a counting sort) give every threshold (union by size, path halving, branch-free neighbour lists):
//   1. foreground, thr falling: a pixel joins at thr = its level - 1.  At each wanted thr every live
//      root is an outer border; the component count and the Euler number (bit quads) give the
//      number of holes, and a level without holes is complete.
//   2. only if some wanted level has holes — background, thr rising up to the highest such level:
//      a pixel joins at thr = its level; at those levels the live roots other than the frame's are
//      the holes: record box, area2 and an anchor, the pixel above the hole's first pixel in raster
//      order.  That pixel is foreground and belongs to the component the hole lies in (a component
//      inside the hole would have hole pixels above it, earlier in raster order).  Each hole adds
//      its area to that component's outer border, found through the foreground link tree: every
//      union of sweep 1 stamped with its threshold (a link made at thr exists at each thr' <= thr).
// The frame is a background component that is never a hole (all frame pixels share root 0).
//
// Nesting: a hole's polygon encloses not only the hole's own cells but everything inside it, so
// when a foreground component lies inside a hole, that hole's area (and the outer areas above it)
// is larger than bg_area2 says.  Such a component is recognised by the pixel above its first pixel
// (background, as that pixel would otherwise be in the component): it belongs to a hole rather than
// to the frame's component, found through the background link tree (sweep 2's unions, stamped like
// sweep 1's; a link made at thr exists at each thr' >= thr).  Areas are exact for the other levels;
// a level with nesting is traced with the border follower for the largest contour (the all-contour
// IoUs need boxes only, which are exact either way).
//
// Largest contour: the one of maximum area, first in OpenCV's order on a tie.  That order is a
// property of the border tree this method does not rebuild, so a level whose maximum is shared by
// two or more contours is traced with the border follower (contours.cpp) instead.  Areas and boxes
// are exact integers, so "shared" is decided exactly.  Tests compare both modes with OpenCV.
#include "component_tree.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common/parallel_labels.h"
#include "contours.h"
#include "parallel.h"

namespace rcam {
namespace cpu {
namespace {

// A contour: inclusive pixel extents (image coordinates) and twice its contourArea.
struct Contour {
  int32_t x0, y0, x1, y1;
  int64_t area2;
};

// Per-root component record, dense in comps_ (see find()).  area2 <= 2 * H * W and size <= H * W fit int32 under kMaxPixels.
struct Component {
  uint16_t x0, y0, x1, y1;
  int32_t area2;  // fg_area2 or bg_area2
  int32_t size;   // pixels (union by size)
  int32_t first;  // smallest padded index, i.e. first pixel in raster order (background holes)
};

// Neighbour bits of a pixel: 0 NW, 1 N, 2 NE, 3 W, 4 E, 5 SW, 6 S, 7 SE.  The four cells around the
// pixel hold it, one diagonal neighbour and two edge neighbours (kCells).  When the pixel joins, a
// cell with k of its other three pixels already present changes share:
//   foreground (share 0, 0, 0, 1, 2 for 0..4 present): +1 when k >= 2;
//   background (the pixel's own component gains): +1 when k <= 1 (alone: half a cell; next to one
//   adjacent pixel: whole cell instead of that pixel's half; next to the diagonal one only: its own
//   half, the diagonal keeps its half), 0 when k >= 2 (the cell was and stays one component's whole).
// Every cell with a changed share has all its present pixels 8-adjacent (foreground) or, where the
// share changes, 4-connected through the cell (background) to the new pixel, so the whole change
// goes to the new pixel's root after its unions.
//
// euler4: the change of 4 * (Euler number of the 8-connected foreground) = Q1 - Q3 - 2 QD over the
// cells (Gray's bit quads: cells with one, three, or two diagonal foreground pixels).  The Euler
// number is components - holes, which tells the foreground sweep how many holes a level has.
struct DeltaTables {
  std::array<int8_t, 256> fg{}, bg{}, euler4{};
  // The neighbours to unite with, as bit numbers: foreground = the present edge neighbours, then
  // the present corners not 8-adjacent to a present edge neighbour (those are already in its
  // component); background = the present edge neighbours.  Branch-free lists for add_pixel.
  std::array<std::array<uint8_t, 8>, 256> fg_list{}, bg_list{};
  std::array<uint8_t, 256> fg_count{}, bg_count{};
  DeltaTables() {
    for (int bits = 0; bits < 256; ++bits) {
      auto has = [&](int k) { return ((bits >> k) & 1) != 0; };
      int nf = 0, nb = 0;
      for (int k : {1, 3, 4, 6}) {
        if (has(k)) {
          fg_list[static_cast<size_t>(bits)][static_cast<size_t>(nf++)] = static_cast<uint8_t>(k);
          bg_list[static_cast<size_t>(bits)][static_cast<size_t>(nb++)] = static_cast<uint8_t>(k);
        }
      }
      // corner -> its two edge neighbours: NW(0): N, W; NE(2): N, E; SW(5): W, S; SE(7): E, S
      static constexpr int kCorner[4][3] = {{0, 1, 3}, {2, 1, 4}, {5, 3, 6}, {7, 4, 6}};
      for (const auto& c : kCorner) {
        if (has(c[0]) && !has(c[1]) && !has(c[2])) {
          fg_list[static_cast<size_t>(bits)][static_cast<size_t>(nf++)] = static_cast<uint8_t>(c[0]);
        }
      }
      fg_count[static_cast<size_t>(bits)] = static_cast<uint8_t>(nf);
      bg_count[static_cast<size_t>(bits)] = static_cast<uint8_t>(nb);
    }
    // Each cell: the pixel's diagonal neighbour in it, then its two edge neighbours in it.
    static constexpr int kCells[4][3] = {{0, 1, 3}, {2, 1, 4}, {5, 3, 6}, {7, 4, 6}};
    auto quad = [](int self, int diag, int edge_a, int edge_b) {
      const int k = self + diag + edge_a + edge_b;
      const bool diagonal_pair = k == 2 && ((self && diag) || (edge_a && edge_b));
      return (k == 1) - (k == 3) - 2 * diagonal_pair;
    };
    for (int bits = 0; bits < 256; ++bits) {
      int f = 0, b = 0, e = 0;
      for (const auto& cell : kCells) {
        const int d = (bits >> cell[0]) & 1, ea = (bits >> cell[1]) & 1, eb = (bits >> cell[2]) & 1;
        const int k = d + ea + eb;
        f += k >= 2;
        b += k <= 1;
        e += quad(1, d, ea, eb) - quad(0, d, ea, eb);
      }
      fg[static_cast<size_t>(bits)] = static_cast<int8_t>(f);
      bg[static_cast<size_t>(bits)] = static_cast<int8_t>(b);
      euler4[static_cast<size_t>(bits)] = static_cast<int8_t>(e);
    }
  }
};
const DeltaTables kDelta;

constexpr int64_t kMaxSide = 65534;               // pixel coordinates are packed as 16-bit pairs
constexpr int64_t kMaxPixels = int64_t{1} << 29;  // areas (twice, in half cells) fit int32

// Both sweeps for images of one size; buffers are reused across images (one instance per thread).
//
// Order of work per image: the foreground sweep runs first and also keeps the component count and
// the Euler number, so it knows each wanted level's number of holes.  Levels without holes are
// complete at once (outer areas are the foreground areas).  Only when some wanted level has holes
// does the background sweep run (up to the highest such level); the outers of those levels were
// kept with their roots, and each hole finds its enclosing component at its level through the link
// tree: the foreground unions, union by size (depth O(log n)), each link stamped with the level it
// was made at (a link made at thr exists at every thr' <= thr).
class ComponentTrees {
 public:
  ComponentTrees(int64_t H, int64_t W)
      : H_(H),
        W_(W),
        S_(W + 2),
        size_((H + 2) * (W + 2)),
        on_(new uint8_t[static_cast<size_t>(size_)]),
        parent_(new int32_t[static_cast<size_t>(size_)]),
        link_(new int32_t[static_cast<size_t>(size_)]),
        link_level_(new uint8_t[static_cast<size_t>(size_)]),
        bg_link_(new int32_t[static_cast<size_t>(size_)]),
        bg_link_level_(new uint8_t[static_cast<size_t>(size_)]),
        slot_(new int32_t[static_cast<size_t>(size_)]),
        order_(new uint32_t[static_cast<size_t>(H * W)]) {
    roots_.reserve(static_cast<size_t>(H * W));
    comps_.reserve(1024);
    const int32_t S32 = static_cast<int32_t>(S_);
    const int32_t offsets[8] = {-S32 - 1, -S32, -S32 + 1, -1, 1, S32 - 1, S32, S32 + 1};
    std::copy(offsets, offsets + 8, offset_);
  }

  // Calls fn(thr, outers, holes, num_holes, exact_areas) once for every thr in [0, 255] with
  // wanted[thr] (in no particular order): the contours of (level > thr), outer borders with their full
  // contour area; exact_areas is false at a level where a component lies inside a hole (see above).
  template <typename F>
  void run(const uint8_t* level, const bool* wanted, const F& fn) {
    int lo = 256;
    for (int t = 255; t >= 0; --t) {
      if (wanted[t]) lo = t;
    }
    if (lo > 255) return;
    sort_pixels(level);
    foreground_sweep(wanted, lo, fn);
    if (pending_.empty()) return;
    bool with_holes[256] = {false};
    int hi = 0;
    for (const Pending& pl : pending_) {
      with_holes[pl.thr] = true;
      hi = std::max(hi, pl.thr);
    }
    background_sweep(with_holes, hi);
    for (const Pending& pl : pending_) finish_level(pl, fn);
  }

 private:
  struct Pending {
    int thr;
    int64_t holes;              // number of holes (from the Euler number)
    size_t begin, end;          // its outers in kept_ / kept_roots_ / kept_first_
  };

  // order_ <- the pixels as packed (y << 16 | x), by level; start_[v] .. start_[v + 1] hold level v.
  void sort_pixels(const uint8_t* level) {
    int64_t count[256] = {0};
    const int64_t HW = H_ * W_;
    for (int64_t k = 0; k < HW; ++k) ++count[level[k]];
    start_[0] = 0;
    for (int v = 0; v < 256; ++v) start_[v + 1] = start_[v] + count[v];
    int64_t at[256];
    std::memcpy(at, start_, sizeof(at));
    for (int64_t y = 0; y < H_; ++y) {
      const uint8_t* row = level + y * W_;
      for (int64_t x = 0; x < W_; ++x) {
        order_[static_cast<size_t>(at[row[x]]++)] = static_cast<uint32_t>((y << 16) | x);
      }
    }
  }

  // Union-find: parent_[p] >= 0 is p's parent pixel; a root holds ~(its record's index in comps_)
  // (negative), so the records of the few live components stay dense and in cache.
  int32_t find(int32_t p) const {
    int32_t* par = parent_.get();
    while (par[p] >= 0) {
      const int32_t up = par[p];
      if (par[up] >= 0) par[p] = par[up];  // path halving
      p = par[p];
    }
    return p;
  }

  Component& comp(int32_t root) { return comps_[static_cast<size_t>(~parent_[static_cast<size_t>(root)])]; }

  // Makes pixel p (packed x, y) a new one-pixel component.
  void new_component(int32_t p, uint16_t x, uint16_t y) {
    parent_[static_cast<size_t>(p)] = ~static_cast<int32_t>(comps_.size());
    comps_.push_back(Component{x, y, x, y, 0, 1, p});
    roots_.push_back(p);
  }

  // The link trees, one per sweep (never compressed): every union, and every pixel joining a root,
  // recorded with the threshold it happened at.  A foreground link made at thr exists at every
  // thr' <= thr (the threshold falls), a background one at every thr' >= thr (it rises).
  template <bool kForeground>
  void link(int32_t from, int32_t to, int thr) {
    (kForeground ? link_ : bg_link_)[static_cast<size_t>(from)] = to;
    (kForeground ? link_level_ : bg_link_level_)[static_cast<size_t>(from)] = static_cast<uint8_t>(thr);
  }

  // The root, at threshold thr, of the component holding pixel p (present at thr) in that sweep's
  // link tree; for the background, 0 is the frame's component.
  template <bool kForeground>
  int32_t root_at(int32_t p, int thr) const {
    const int32_t* to = (kForeground ? link_ : bg_link_).get();
    const uint8_t* made_at = (kForeground ? link_level_ : bg_link_level_).get();
    while (to[p] != p && (kForeground ? made_at[p] >= thr : made_at[p] <= thr)) p = to[p];
    return p;
  }

  // Unites root r with the component of q; returns the new root, the larger component's (union by
  // size), and records the link.
  template <bool kForeground>
  int32_t unite(int32_t r, int32_t q, int thr) {
    int32_t s = parent_[static_cast<size_t>(q)];
    if (s == r) return r;  // the common case: q hangs right under r
    s = s < 0 ? q : find(s);
    if (s == r) return r;
    const bool r_big = comp(r).size >= comp(s).size;
    const int32_t keep = r_big ? r : s, gone = r_big ? s : r;
    link<kForeground>(gone, keep, thr);
    if (kForeground) --components_;
    const Component b = comp(gone);
    parent_[static_cast<size_t>(gone)] = keep;
    Component& a = comp(keep);
    a.x0 = std::min(a.x0, b.x0);
    a.y0 = std::min(a.y0, b.y0);
    a.x1 = std::max(a.x1, b.x1);
    a.y1 = std::max(a.y1, b.y1);
    a.area2 += b.area2;
    a.size += b.size;
    a.first = std::min(a.first, b.first);
    return keep;
  }

  // Live roots, dropping the merged ones from roots_ (each component is listed once when born).
  void compact_roots() {
    size_t keep = 0;
    for (const int32_t r : roots_) {
      if (parent_[static_cast<size_t>(r)] < 0) roots_[keep++] = r;
    }
    roots_.resize(keep);
  }

  // Adds pixel p to the component of root r (p is not a root).
  void join(int32_t p, int32_t r, uint16_t x, uint16_t y) {
    parent_[static_cast<size_t>(p)] = r;
    Component& c = comp(r);
    c.x0 = std::min(c.x0, x);
    c.y0 = std::min(c.y0, y);
    c.x1 = std::max(c.x1, x);
    c.y1 = std::max(c.y1, y);
    c.size += 1;
    c.first = std::min(c.first, p);
  }

  // Adds the pixel at packed coordinates xy at threshold thr: unites it with its 8 neighbours
  // present (foreground) or its 4 edge neighbours (background) and updates its root's area.  A
  // pixel with a neighbour present joins that neighbour's component directly.
  template <bool kForeground>
  void add_pixel(uint32_t xy, int thr) {
    const uint16_t x = static_cast<uint16_t>(xy & 0xFFFF), y = static_cast<uint16_t>(xy >> 16);
    const int64_t S = S_;
    const int32_t p = static_cast<int32_t>((y + 1) * S + x + 1);
    const uint8_t* on = on_.get();
    const unsigned bits = on[p - S - 1] | (on[p - S] << 1) | (on[p - S + 1] << 2) |
                          (on[p - 1] << 3) | (on[p + 1] << 4) | (on[p + S - 1] << 5) |
                          (on[p + S] << 6) | (on[p + S + 1] << 7);
    on_[static_cast<size_t>(p)] = 1;
    if (kForeground) euler4_ += kDelta.euler4[bits];
    const uint8_t* list = kForeground ? kDelta.fg_list[bits].data() : kDelta.bg_list[bits].data();
    const int count = kForeground ? kDelta.fg_count[bits] : kDelta.bg_count[bits];
    int32_t nb[8];
    for (int k = 0; k < count; ++k) nb[k] = p + offset_[list[k]];
    int32_t r;
    if (count == 0) {
      new_component(p, x, y);
      r = p;
      link<kForeground>(p, p, thr);
      if (kForeground) ++components_;
    } else {
      r = find(nb[0]);
      join(p, r, x, y);
      link<kForeground>(p, r, thr);
      for (int k = 1; k < count; ++k) r = unite<kForeground>(r, nb[k], thr);
    }
    comp(r).area2 += kForeground ? kDelta.fg[bits] : kDelta.bg[bits];
  }

  // on_ <- 0 inside, `frame` on the frame; frame pixels all have root 0 (background only).
  void reset(uint8_t frame) {
    std::memset(on_.get(), 0, static_cast<size_t>(size_));
    roots_.clear();
    comps_.clear();
    if (frame == 0) return;
    // The frame's record: never a hole; its size keeps it the root of every union it takes part in.
    comps_.push_back(Component{0, 0, 0, 0, 0, std::numeric_limits<int32_t>::max() / 2, 0});
    const int64_t S = S_, H = H_;
    auto mark = [&](int64_t p) {
      on_[static_cast<size_t>(p)] = 1;
      parent_[static_cast<size_t>(p)] = 0;
      link<false>(static_cast<int32_t>(p), 0, 0);  // in the frame's component from the start
    };
    for (int64_t x = 0; x < S; ++x) {
      mark(x);
      mark((H + 1) * S + x);
    }
    for (int64_t y = 1; y <= H; ++y) {
      mark(y * S);
      mark(y * S + S - 1);
    }
    parent_[0] = ~0;  // root of the frame, record 0
  }

  static Contour as_contour(const Component& c, int64_t area2) {
    return Contour{c.x0, c.y0, c.x1, c.y1, area2};
  }

  // Foreground (level > thr) for thr = 255 .. lo.  Wanted levels without holes go to fn at once;
  // the others are kept in pending_ with their outers' roots.
  template <typename F>
  void foreground_sweep(const bool* wanted, int lo, const F& fn) {
    reset(0);
    components_ = 0;
    euler4_ = 0;
    pending_.clear();
    kept_.clear();
    kept_roots_.clear();
    kept_first_.clear();
    for (int thr = 255; thr >= lo; --thr) {
      if (thr < 255) {  // pixels of level thr + 1 join
        for (int64_t k = start_[thr + 1]; k < start_[thr + 2]; ++k) {
          add_pixel<true>(order_[static_cast<size_t>(k)], thr);
        }
      }
      if (!wanted[thr]) continue;
      compact_roots();
      const int64_t holes = components_ - euler4_ / 4;
      if (holes == 0) {
        outers_.clear();
        for (const int32_t r : roots_) {
          const Component& c = comp(r);
          outers_.push_back(as_contour(c, c.area2));
        }
        fn(thr, outers_, static_cast<const Contour*>(nullptr), int64_t{0}, true);
        continue;
      }
      Pending pl{thr, holes, kept_.size(), 0};
      for (const int32_t r : roots_) {
        const Component& c = comp(r);
        kept_.push_back(as_contour(c, c.area2));
        kept_roots_.push_back(r);
        kept_first_.push_back(c.first);
      }
      pl.end = kept_.size();
      pending_.push_back(pl);
    }
  }

  // Background (level <= thr) for thr = 0 .. hi; records the holes of each level in with_holes.
  void background_sweep(const bool* with_holes, int hi) {
    reset(1);
    holes_.clear();
    anchors_.clear();
    const int64_t S = S_;
    for (int thr = 0; thr <= hi; ++thr) {
      hole_begin_[thr] = static_cast<int64_t>(holes_.size());
      for (int64_t k = start_[thr]; k < start_[thr + 1]; ++k) {
        add_pixel<false>(order_[static_cast<size_t>(k)], thr);
      }
      if (with_holes[thr]) {
        compact_roots();  // the frame's root 0 is never listed: only holes remain
        for (const int32_t r : roots_) {
          const Component& c = comp(r);
          holes_.push_back(Contour{c.x0 - 1, c.y0 - 1, c.x1 + 1, c.y1 + 1, int64_t{c.area2}});
          anchors_.push_back(static_cast<int32_t>(c.first - S));
        }
      }
      hole_end_[thr] = static_cast<int64_t>(holes_.size());
    }
  }

  // A level with holes: each hole's area joins the outer border of the component it lies in.
  template <typename F>
  void finish_level(const Pending& pl, const F& fn) {
    const int thr = pl.thr;
    const int64_t num_holes = hole_end_[thr] - hole_begin_[thr];
    if (num_holes != pl.holes) {
      throw std::logic_error("rethinkcam_fast: component tree hole count disagrees with the Euler number");
    }
    for (size_t k = pl.begin; k < pl.end; ++k) slot_[static_cast<size_t>(kept_roots_[k])] = static_cast<int32_t>(k);
    const Contour* holes = holes_.data() + hole_begin_[thr];
    for (int64_t h = 0; h < num_holes; ++h) {
      const int32_t r = root_at<true>(anchors_[static_cast<size_t>(hole_begin_[thr] + h)], thr);
      kept_[static_cast<size_t>(slot_[static_cast<size_t>(r)])].area2 += holes[h].area2;
    }
    bool exact = true;  // no component inside a hole
    for (size_t k = pl.begin; k < pl.end && exact; ++k) {
      exact = root_at<false>(kept_first_[k] - static_cast<int32_t>(S_), thr) == 0;
    }
    outers_.assign(kept_.begin() + static_cast<std::ptrdiff_t>(pl.begin),
                   kept_.begin() + static_cast<std::ptrdiff_t>(pl.end));
    fn(thr, outers_, holes, num_holes, exact);
  }

  int64_t H_, W_, S_, size_;
  int32_t offset_[8];  // padded-index offsets of the neighbour bits
  std::unique_ptr<uint8_t[]> on_;
  std::unique_ptr<int32_t[]> parent_;
  std::unique_ptr<int32_t[]> link_;         // foreground link tree (sweep 1; see link())
  std::unique_ptr<uint8_t[]> link_level_;   // the threshold each link was made at
  std::unique_ptr<int32_t[]> bg_link_;      // background link tree (sweep 2)
  std::unique_ptr<uint8_t[]> bg_link_level_;
  std::vector<Component> comps_;  // records of the components born in this sweep
  std::unique_ptr<int32_t[]> slot_;         // root -> index in kept_ (per pending level)
  std::unique_ptr<uint32_t[]> order_;
  int64_t start_[258] = {0};
  int64_t hole_begin_[256] = {0}, hole_end_[256] = {0};
  int64_t components_ = 0, euler4_ = 0;
  std::vector<int32_t> roots_;
  std::vector<Contour> holes_;
  std::vector<int32_t> anchors_;
  std::vector<Contour> outers_;
  std::vector<Pending> pending_;
  std::vector<Contour> kept_;
  std::vector<int32_t> kept_roots_;
  std::vector<int32_t> kept_first_;  // first pixel (padded index) of each kept outer's component
};

// The largest contour of one level (outers and holes as the sweep gives them); false when two or
// more contours share the maximum area (the caller traces the level for OpenCV's order).
bool unique_largest(const std::vector<Contour>& outers, const Contour* holes, int64_t num_holes,
                    Contour* best) {
  int64_t best_a = -1, ties = 0;
  auto consider = [&](const Contour& c) {
    if (c.area2 > best_a) {
      best_a = c.area2;
      *best = c;
      ties = 1;
    } else if (c.area2 == best_a) {
      ++ties;
    }
  };
  for (const Contour& c : outers) consider(c);
  for (int64_t h = 0; h < num_holes; ++h) consider(holes[h]);
  return ties == 1;
}

void check_args(const char* name, int64_t N, int64_t H, int64_t W, int64_t T) {
  const std::string fn = std::string("rethinkcam_fast.") + name;
  if (N < 0 || H < 0 || W < 0 || T < 0) throw std::invalid_argument(fn + ": negative size");
  if (H > kMaxSide || W > kMaxSide || H * W > kMaxPixels) {
    throw std::invalid_argument(fn + ": maps larger than 65534 pixels on a side or 2^29 pixels are not supported");
  }
}

// Runs per_image(trees, finder, n) for every image, in parallel; the per-thread state is created
// once per thread.  Images are handed out one at a time from a shared counter: their cost varies a
// lot (an image with holes at the wanted levels pays a second sweep), so static chunks would leave
// threads idle.  Results do not depend on which thread takes which image.
template <typename F>
void for_each_image(int64_t N, int64_t H, int64_t W, int num_threads, const F& per_image) {
  const int64_t nthreads =
      std::min<int64_t>(effective_threads(N * std::max<int64_t>(H * W, 1) * 4, num_threads, 65536), N);
  std::atomic<int64_t> next{0};
  parallel_for(0, nthreads, static_cast<int>(nthreads), [&](int64_t, int64_t) {
    ComponentTrees trees(H, W);
    LargestContourFinder finder(H, W);
    for (int64_t n = next.fetch_add(1); n < N; n = next.fetch_add(1)) per_image(trees, finder, n);
  });
}

// The distinct wanted thresholds of one image's row.
void wanted_levels(const int64_t* row, int64_t T, bool* wanted) {
  std::fill(wanted, wanted + 256, false);
  for (int64_t t = 0; t < T; ++t) {
    if (row[t] < 0 || row[t] > 255) throw std::invalid_argument("rethinkcam_fast: thresholds must lie in 0..255");
    wanted[row[t]] = true;
  }
}

}  // namespace

namespace {

// The common frame of the exported functions: argument checks, then per_image(trees, finder, n,
// level, row, wanted) for every image in parallel, with row = its T thresholds and wanted = the
// set of distinct ones.
template <typename F>
void for_each_image_levels(const char* name, const uint8_t* levels, const int64_t* thresholds, int64_t N,
                           int64_t H, int64_t W, int64_t T, int num_threads, const F& per_image) {
  check_args(name, N, H, W, T);
  if (N == 0 || T == 0) return;
  if (H == 0 || W == 0) throw std::invalid_argument(std::string("rethinkcam_fast.") + name + ": empty maps");
  for_each_image(N, H, W, num_threads, [&](ComponentTrees& trees, LargestContourFinder& finder, int64_t n) {
    const int64_t* row = thresholds + n * T;
    bool wanted[256];
    wanted_levels(row, T, wanted);
    per_image(trees, finder, n, levels + n * H * W, row, wanted);
  });
}

}  // namespace

void threshold_box_ious(const uint8_t* levels, const int64_t* thresholds, int64_t N, int64_t H,
                        int64_t W, int64_t T, const int64_t* gt_boxes, const int64_t* gt_offsets,
                        bool multi_contour, double* out, int num_threads) {
  for_each_image_levels("threshold_box_ious", levels, thresholds, N, H, W, T, num_threads,
                        [&](ComponentTrees& trees, LargestContourFinder& finder, int64_t n, const uint8_t* level,
                            const int64_t* row, const bool* wanted) {
    const int64_t* gt = gt_boxes + 4 * gt_offsets[n];
    const int64_t num_gt = gt_offsets[n + 1] - gt_offsets[n];
    auto iou = [&](const Contour& c) { return labels::contour_iou(c.x0, c.y0, c.x1, c.y1, H, W, gt, num_gt); };
    double best_at[256];
    const double empty = labels::best_iou_against(0, 0, 0, 0, gt, num_gt);
    trees.run(level, wanted, [&](int thr, const std::vector<Contour>& outers, const Contour* holes,
                                 int64_t num_holes, bool exact_areas) {
      if (outers.empty()) {
        best_at[thr] = empty;
        return;
      }
      if (multi_contour) {
        double best = 0.0;
        for (const Contour& c : outers) best = std::max(best, iou(c));
        for (int64_t h = 0; h < num_holes; ++h) best = std::max(best, iou(holes[h]));
        best_at[thr] = best;
        return;
      }
      Contour c;
      if (exact_areas && unique_largest(outers, holes, num_holes, &c)) {
        best_at[thr] = iou(c);
      } else {
        int64_t b[4];
        finder.find(level, thr, b);
        best_at[thr] = labels::rect_iou(b, H, W, gt, num_gt);
      }
    });
    for (int64_t t = 0; t < T; ++t) out[n * T + t] = best_at[row[t]];
  });
}

void tree_largest_boxes(const uint8_t* levels, const int64_t* thresholds, int64_t* out, int64_t N,
                        int64_t H, int64_t W, int64_t T, int num_threads) {
  for_each_image_levels("tree_largest_boxes", levels, thresholds, N, H, W, T, num_threads,
                        [&](ComponentTrees& trees, LargestContourFinder& finder, int64_t n, const uint8_t* level,
                            const int64_t* row, const bool* wanted) {
    int64_t box_at[256][4];
    trees.run(level, wanted, [&](int thr, const std::vector<Contour>& outers, const Contour* holes,
                                 int64_t num_holes, bool exact_areas) {
      int64_t* b = box_at[thr];
      Contour c;
      if (outers.empty()) {
        b[0] = b[1] = b[2] = b[3] = 0;
      } else if (exact_areas && unique_largest(outers, holes, num_holes, &c)) {
        b[0] = c.x0;
        b[1] = c.y0;
        b[2] = int64_t{c.x1} - c.x0 + 1;
        b[3] = int64_t{c.y1} - c.y0 + 1;
      } else {
        finder.find(level, thr, b);
      }
    });
    for (int64_t t = 0; t < T; ++t) std::memcpy(out + 4 * (n * T + t), box_at[row[t]], 4 * sizeof(int64_t));
  });
}

}  // namespace cpu
}  // namespace rcam
