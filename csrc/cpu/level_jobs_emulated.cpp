// Sequential emulation of the CUDA level-job kernel (see level_jobs_emulated.h).
#include "level_jobs_emulated.h"

#include <stdexcept>
#include <vector>

#include "../common/level_jobs.h"

namespace rcam {
namespace cpu {

void emulate_level_jobs(const uint8_t* levels, int64_t N, int64_t H, int64_t W, const int32_t* jobs,
                        int64_t J, const int64_t* gt_boxes, const int64_t* gt_offsets, bool multi_contour,
                        int64_t block_threads, double* iou_out, int64_t* xywh_out, int32_t* needs_trace_out) {
  if (N < 0 || H <= 0 || W <= 0 || J < 0 || block_threads < 1) {
    throw std::invalid_argument("rethinkcam_fast.emulate_level_jobs: bad sizes");
  }
  const int64_t HW = H * W;
  std::vector<int32_t> scratch(static_cast<size_t>(levels::Scratch::ints_per_pixel * HW + 1));
  const levels::Scratch s = levels::Scratch::at(scratch.data(), HW);
  levels::Reduction red{};
  const int64_t T = block_threads;
  for (int64_t j = 0; j < J; ++j) {
    const int64_t n = jobs[2 * j];
    if (n < 0 || n >= N) throw std::invalid_argument("rethinkcam_fast.emulate_level_jobs: image index out of range");
    const levels::Job job{levels + n * HW, H, W, jobs[2 * j + 1], gt_boxes + 4 * gt_offsets[n],
                          gt_offsets[n + 1] - gt_offsets[n], multi_contour};
    for (int64_t t = 0; t < T; ++t) levels::phase_init(job, s, &red, t, T);
    for (int64_t t = 0; t < T; ++t) levels::phase_union(job, s, t, T);
    for (int64_t t = 0; t < T; ++t) levels::phase_flatten(job, s, t, T);
    for (int64_t t = 0; t < T; ++t) levels::phase_stats(job, s, t, T);
    for (int64_t t = 0; t < T; ++t) levels::phase_holes_to_outer(job, s, &red, t, T);
    for (int64_t t = 0; t < T; ++t) levels::phase_candidates(job, s, &red, t, T);
    for (int64_t t = 0; t < T; ++t) levels::phase_largest(job, s, &red, t, T);
    const levels::JobResult r = levels::finish(job, red);
    iou_out[j] = r.iou;
    for (int k = 0; k < 4; ++k) xywh_out[4 * j + k] = r.xywh[k];
    needs_trace_out[j] = r.needs_trace;
  }
}

}  // namespace cpu
}  // namespace rcam
