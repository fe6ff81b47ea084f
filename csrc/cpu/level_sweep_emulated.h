// The GPU level-sweep kernel's code (csrc/common/level_sweep.h) run on the CPU, each phase thread by
// thread: the tests check the kernel's logic against OpenCV here, without a GPU.
#pragma once

#include <cstdint>

namespace rcam {
namespace cpu {

// levels: uint8 [N, H, W]; wanted: uint8 [N, 256] (1 where a threshold is wanted); per image n and
// wanted threshold t writes iou_out[n, t], xywh_out[n, t, 4] (largest mode) and status_out[n, t]
// (rcam::sweep::Status) exactly as the CUDA kernel does.  block_threads: the emulated block size.
void emulate_level_sweep(const uint8_t* levels, int64_t N, int64_t H, int64_t W, const uint8_t* wanted,
                         const int64_t* gt_boxes, const int64_t* gt_offsets, bool multi_contour,
                         int64_t block_threads, double* iou_out, int64_t* xywh_out, int32_t* status_out);

}  // namespace cpu
}  // namespace rcam
