// CUDA level sweep: for each image, every wanted threshold in one pass of a thread block
// (csrc/common/level_sweep.h) — the best contour IoU against the GT boxes and the largest contour's
// box of mask = levels[n] > thr.  Host-callable launcher; enqueues on `stream` (a cudaStream_t as
// an integer) and throws std::runtime_error with the CUDA error string if the launch fails.  All
// pointers are device pointers.  scratch: int32 [grid, rcam::sweep::Scratch::ints(H * W)] = [grid, 9 * (H * W + 1) +
// (H * W + 3) / 4] (each of the grid's blocks works through images grid apart).  variant: 2 = two blocks per SM
// (64 registers, a few spills), 1 = one block per SM (about 88 registers), 3 = one block per SM with
// the union-find parents in shared memory ((H*W + 1) int32; variant 1 when they do not fit).
#pragma once

#include <cstdint>

namespace rcam {
namespace cuda {

void level_sweep(const uint8_t* levels, int64_t N, int64_t H, int64_t W, const uint8_t* wanted,
                 const int64_t* gt_boxes, const int64_t* gt_offsets, bool multi_contour, int32_t* scratch,
                 int64_t grid, int64_t block_threads, int64_t variant, double* iou_out, int64_t* xywh_out,
                 int32_t* status_out, std::uintptr_t stream);

}  // namespace cuda
}  // namespace rcam
