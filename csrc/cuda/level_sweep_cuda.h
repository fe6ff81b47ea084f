// CUDA level sweep: for each image, every wanted threshold in one pass of a thread block
// (csrc/common/level_sweep.h) — the best contour IoU against the GT boxes and the largest contour's
// box of mask = levels[n] > thr.  Host-callable launcher; enqueues on `stream` (a cudaStream_t as
// an integer) and throws std::runtime_error with the CUDA error string if the launch fails.  All
// pointers are device pointers.  scratch: int32 [grid, 9 * (H * W + 1)] (each of the grid's blocks
// works through images grid apart).
#pragma once

#include <cstdint>

namespace rcam {
namespace cuda {

void level_sweep(const uint8_t* levels, int64_t N, int64_t H, int64_t W, const uint8_t* wanted,
                 const int64_t* gt_boxes, const int64_t* gt_offsets, bool multi_contour, int32_t* scratch,
                 int64_t grid, int64_t block_threads, double* iou_out, int64_t* xywh_out, int32_t* status_out,
                 std::uintptr_t stream);

}  // namespace cuda
}  // namespace rcam
