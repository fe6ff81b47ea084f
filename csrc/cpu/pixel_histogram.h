// PxAP's score histograms (wsolevaluation's MaskEvaluator): counts of pixel scores per bin, split by
// ground truth, with ignore regions left out.
#pragma once

#include <cstdint>

namespace rcam {
namespace cpu {

// counts[row * num_bins + i] += the pixels k with edges[i] <= x[k] < edges[i + 1] (np.histogram's
// rule: the last bin also takes x == edges[num_bins]; values outside the edges, and NaN, are not
// counted), where row = 1 for foreground[k], 0 for background, and a background pixel with ignore[k]
// is left out (foreground pixels are never ignored).  Scores are compared in float64, exactly.
//
// x: `count` contiguous values of dtype (0=f32, 1=f64, 2=f16, 3=bf16); foreground, ignore: `count`
// bytes (0/1, e.g. torch.bool), ignore may be null; edges: num_bins + 1 ascending float64; counts:
// int64 [2, num_bins], added to.  interval > 0 hints that edges[i] == fl(i * interval) for i <
// num_bins - 2 (np.arange's thresholds): the bin is then guessed from x / interval and settled by
// one exact comparison on each side (a binary search when that fails, or without a hint).
void pixel_histogram(const void* x, int dtype, int64_t count, const uint8_t* foreground, const uint8_t* ignore,
                     const double* edges, int64_t num_bins, double interval, int64_t* counts, int num_threads);

}  // namespace cpu
}  // namespace rcam
