// Every threshold of a uint8 map in one pass: the contours OpenCV's findContours(RETR_TREE) would
// give for each mask (level > thr), read off two union-find sweeps (component trees) instead of one
// border-following run per threshold.  See component_tree.cpp for the method and its exactness.
#pragma once

#include <cstdint>

namespace rcam {
namespace cpu {

// out: float64 [N, T] <- for mask = levels[n] > thresholds[n, t], the best IoU between its contour
// boxes and the ground-truth boxes gt_boxes[gt_offsets[n] .. gt_offsets[n + 1]) (int64 [G, 4],
// x0, y0, x1, y1 inclusive), exactly as wsolevaluation computes it: contour boxes in its
// convention [x, y, min(x + w, W - 1), min(y + h, H - 1)], every contour (holes included) when
// multi_contour, else only max(contours, key=cv2.contourArea); an empty mask scores the box
// [0, 0, 0, 0]; IoU with inclusive "+1" areas, 0 when the union is not positive.
// levels: uint8 [N, H, W]; thresholds: int64 [N, T] in 0..255; all contiguous.  Parallel over
// images; results do not depend on num_threads.
void threshold_box_ious(const uint8_t* levels, const int64_t* thresholds, int64_t N, int64_t H,
                        int64_t W, int64_t T, const int64_t* gt_boxes, const int64_t* gt_offsets,
                        bool multi_contour, double* out, int num_threads);

// out: int64 [N, T, 4] <- (x, y, w, h) of max(contours, key=cv2.contourArea) of
// mask = levels[n] > thresholds[n, t] (cv2.boundingRect), or (0, 0, 0, 0) for an empty mask; the
// same result as contour_largest_boxes, from the component trees.
void tree_largest_boxes(const uint8_t* levels, const int64_t* thresholds, int64_t* out, int64_t N,
                        int64_t H, int64_t W, int64_t T, int num_threads);

}  // namespace cpu
}  // namespace rcam
