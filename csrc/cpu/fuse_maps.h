// CPU kernel for fuse_maps (rethinkcam_fast/ops/fuse_maps.py): upsample each layer's map to
// (H, W) bilinearly (PyTorch's align_corners=False), min-max normalise it per image (a constant or
// non-finite source map contributes zeros), fuse the layers by sum or max, and min-max normalise
// the fused map.
//
// maps[l]: contiguous float32 [N, heights[l], widths[l]]; out: float32 [N, H, W];
// degenerate: uint8 [N], 1 where the final map was constant or non-finite (returned as zeros).
#pragma once

#include <cstdint>

namespace rcam {
namespace cpu {

void fuse_maps(const float* const* maps, const int64_t* heights, const int64_t* widths, int64_t L, int64_t N,
               int64_t H, int64_t W, bool fuse_max, float* out, uint8_t* degenerate, int num_threads);

}  // namespace cpu
}  // namespace rcam
