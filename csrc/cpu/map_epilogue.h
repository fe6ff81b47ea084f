// CPU kernels of the differentiable CAM epilogue (rethinkcam_fast/ops/map_epilogue.py): the forward
// and the backward of map_epilogue_reference, for float32 and float64 maps.
//
// maps[l]: contiguous [N, heights[l], widths[l]] of the dtype (0 = float32, 1 = float64); out, grad:
// contiguous [N, H, W] of that dtype; degenerate: uint8 [N]; grad_maps[l]: contiguous like maps[l],
// written whole. normalize = false takes one map (the upsampled raw map and its adjoint).
#pragma once

#include <cstdint>

namespace rcam {
namespace cpu {

void map_epilogue_forward(const void* const* maps, const int64_t* heights, const int64_t* widths, int64_t L,
                          int64_t N, int64_t H, int64_t W, bool fuse_max, bool normalize, void* out,
                          uint8_t* degenerate, int dtype, int num_threads);

void map_epilogue_backward(const void* grad, const void* const* maps, const int64_t* heights, const int64_t* widths,
                           int64_t L, int64_t N, int64_t H, int64_t W, bool fuse_max, bool normalize,
                           void* const* grad_maps, int dtype, int num_threads);

}  // namespace cpu
}  // namespace rcam
