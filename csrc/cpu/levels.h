// uint8 levels of min-max normalised maps: trunc(255 * x), the reference's np.uint8(255 * cam).
#pragma once

#include <cstdint>

namespace rcam {
namespace cpu {

// out[k] <- trunc(255 * x[k]) computed in the dtype's accumulation type (float32; float64 for
// float64 maps), like torch's (x.float() * 255).to(torch.uint8).  Values are expected in [0, 1];
// anything else is clamped to 0..255 (NaN -> 0) instead of being undefined.  x: `count` contiguous
// elements of dtype (0=f32, 1=f64, 2=f16, 3=bf16).
//
// With `bad` (and per_image > 0), the same pass also validates: bad[i] <- 1 when image i (elements
// [i * per_image, (i + 1) * per_image)) holds a NaN or a value outside [0, 1], else 0; bad has
// ceil(count / per_image) entries.  Saves the separate validation pass over the maps.
void uint8_levels(const void* x, int dtype, int64_t count, uint8_t* out, int num_threads, int64_t per_image = 0,
                  uint8_t* bad = nullptr);

// hist: int64 [N, 256] <- per map of x [N, per_image], the counts of its uint8 levels (as
// uint8_levels computes them; the levels themselves are never written out).  With `bad` (uint8 [N]),
// also validates in the same pass: bad[n] <- 1 when map n holds a NaN or a value outside [0, 1].
// Maps are handed to threads one at a time.
void level_histograms(const void* x, int dtype, int64_t N, int64_t per_image, int64_t* hist, int num_threads,
                      uint8_t* bad);

// One image's worth, for callers that consume levels image by image while they are in cache:
// out[0, count) <- levels of x[offset, offset + count); returns whether (with `check`) any of those
// values is NaN or outside [0, 1].  Single-threaded.
bool convert_levels(const void* x, int dtype, int64_t offset, int64_t count, uint8_t* out, bool check);

}  // namespace cpu
}  // namespace rcam
