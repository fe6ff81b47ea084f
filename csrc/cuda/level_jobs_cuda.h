// CUDA level jobs: for each (image, threshold) job, the largest contour's box and the best IoU of
// the contour boxes against the GT boxes of mask = levels[n] > thr (csrc/common/level_jobs.h).
// Host-callable launcher; enqueues on `stream` (a cudaStream_t as an integer) and throws
// std::runtime_error with the CUDA error string if the launch fails.  All pointers are device
// pointers.  scratch: int32 [grid, 6 * H * W + 1] (grid = the number of blocks, each block works
// through jobs grid apart).
#pragma once

#include <cstdint>

namespace rcam {
namespace cuda {

void level_jobs(const uint8_t* levels, int64_t N, int64_t H, int64_t W, const int32_t* jobs, int64_t J,
                const int64_t* gt_boxes, const int64_t* gt_offsets, bool multi_contour, int32_t* scratch,
                int64_t grid, int64_t block_threads, double* iou_out, int64_t* xywh_out,
                int32_t* needs_trace_out, std::uintptr_t stream);

}  // namespace cuda
}  // namespace rcam
