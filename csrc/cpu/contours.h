// CPU border following (Suzuki & Abe 1985) on thresholded uint8 maps, reproducing
//
//   mask = (levels[n] > thresholds[n, t]).astype(np.uint8)
//   contours, hierarchy = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
//   boxes = [cv2.boundingRect(c) for c in contours];  areas = [cv2.contourArea(c) ...]
//
// including the order of `contours` (see contours.cpp), for every image n and threshold t.
// levels: uint8 [N, H, W] contiguous; thresholds: int64 [N, T] contiguous.  Jobs (n, t) are
// independent and run in parallel; results do not depend on num_threads.
#pragma once

#include <cstdint>
#include <vector>

namespace rcam {
namespace cpu {

// Per-contour results of contour_boxes, in cv2 order within each (n, t) and (n, t) blocks in
// row-major order.  The data is kept in per-thread chunks (consecutive job ranges) so that the
// caller can allocate the final arrays once the total is known and copy them with copy_to().
struct ContourBoxes {
  struct Chunk {
    std::vector<int64_t> boxes;    // (x, y, w, h) per contour
    std::vector<double> areas;     // cv2.contourArea
    std::vector<uint8_t> is_hole;  // 1 for hole borders
  };
  std::vector<int64_t> counts;  // [N * T] contours per (n, t)
  std::vector<Chunk> chunks;    // in job order
  int64_t total = 0;            // sum of counts

  // Copies the concatenated results into boxes [total, 4], areas [total], is_hole [total].
  void copy_to(int64_t* boxes, double* areas, uint8_t* is_hole) const;
};

// All contours of every (n, t) mask.
ContourBoxes contour_boxes(const uint8_t* levels, const int64_t* thresholds, int64_t N, int64_t H,
                           int64_t W, int64_t T, int num_threads);

// out: int64 [N, T, 4] <- (x, y, w, h) of the first contour of maximum area in cv2 order
// (max(contours, key=cv2.contourArea)), or (0, 0, 0, 0) when the mask is empty.
void contour_largest_boxes(const uint8_t* levels, const int64_t* thresholds, int64_t* out,
                           int64_t N, int64_t H, int64_t W, int64_t T, int num_threads);

// Traces single masks (level > thr) of one fixed size, reusing its buffers across calls: for callers
// that need the exact contour order only now and then (component_tree.cpp's tie-break).
// As contour_largest_boxes, from the float maps themselves: each image is converted to uint8 levels
// (trunc(255 * x), as uint8_levels) into a per-thread buffer and traced while it is in cache, so
// the levels of the batch are never written out.  maps: N * H * W contiguous values of dtype
// (0=f32, 1=f64, 2=f16, 3=bf16).  With `bad` (uint8 [N]), also validates: bad[n] <- 1 when map n
// holds a NaN or a value outside [0, 1] (its boxes are then meaningless), else 0.
void map_largest_boxes(const void* maps, int dtype, const int64_t* thresholds, int64_t* out, int64_t N,
                       int64_t H, int64_t W, int64_t T, int num_threads, uint8_t* bad);

class LargestContourFinder {
 public:
  LargestContourFinder(int64_t H, int64_t W);
  ~LargestContourFinder();
  LargestContourFinder(const LargestContourFinder&) = delete;
  LargestContourFinder& operator=(const LargestContourFinder&) = delete;
  // xywh <- the box of max(contours, key=cv2.contourArea), or (0, 0, 0, 0) for an empty mask.
  void find(const uint8_t* level, int64_t thr, int64_t xywh[4]);

 private:
  struct Impl;
  Impl* impl_;
};

}  // namespace cpu
}  // namespace rcam
