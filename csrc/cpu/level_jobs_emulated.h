// The GPU level-job kernel's code (csrc/common/level_jobs.h) run on the CPU, each phase thread by
// thread: the tests check the kernel's logic against OpenCV here, without a GPU.
#pragma once

#include <cstdint>

namespace rcam {
namespace cpu {

// jobs: int32 [J, 2] (image index, threshold); per job writes iou_out[j], xywh_out[j, 4] (largest
// mode) and needs_trace_out[j] exactly as the CUDA kernel does.  block_threads: the emulated block
// size (the strides of each phase).
void emulate_level_jobs(const uint8_t* levels, int64_t N, int64_t H, int64_t W, const int32_t* jobs,
                        int64_t J, const int64_t* gt_boxes, const int64_t* gt_offsets, bool multi_contour,
                        int64_t block_threads, double* iou_out, int64_t* xywh_out, int32_t* needs_trace_out);

}  // namespace cpu
}  // namespace rcam
