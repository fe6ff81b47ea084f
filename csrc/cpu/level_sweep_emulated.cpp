// Sequential emulation of the CUDA level-sweep kernel (see level_sweep_emulated.h).
#include "level_sweep_emulated.h"

#include <stdexcept>
#include <vector>

#include "../common/level_sweep.h"

namespace rcam {
namespace cpu {
namespace {

// A thread block whose threads run each phase one after another (one legal interleaving).
struct SequentialBlock {
  int64_t threads;
  template <typename Phase>
  void run(Phase&& phase) {
    for (int64_t t = 0; t < threads; ++t) phase(t, threads);
  }
};

}  // namespace

void emulate_level_sweep(const uint8_t* levels, int64_t N, int64_t H, int64_t W, const uint8_t* wanted,
                         const int64_t* gt_boxes, const int64_t* gt_offsets, bool multi_contour,
                         int64_t block_threads, double* iou_out, int64_t* xywh_out, int32_t* status_out) {
  if (N < 0 || H <= 0 || W <= 0 || H * W >= (int64_t{1} << 29) || block_threads < 1) {
    throw std::invalid_argument("rethinkcam_fast.emulate_level_sweep: bad sizes");
  }
  const int64_t HW = H * W;
  std::vector<int32_t> scratch(static_cast<size_t>(sweep::Scratch::ints(HW)));
  const sweep::Scratch s = sweep::Scratch::at(scratch.data(), HW);
  sweep::Shared shared{};
  SequentialBlock block{block_threads};
  for (int64_t n = 0; n < N; ++n) {
    const sweep::Image im{levels + n * HW, static_cast<int32_t>(H), static_cast<int32_t>(W),
                          wanted + n * sweep::kLevels, gt_boxes + 4 * gt_offsets[n], gt_offsets[n + 1] - gt_offsets[n],
                          multi_contour, iou_out + n * sweep::kLevels, xywh_out + 4 * n * sweep::kLevels,
                          status_out + n * sweep::kLevels};
    sweep::sweep_image(block, im, s, &shared);
  }
}

}  // namespace cpu
}  // namespace rcam
