// CUDA level jobs (see level_jobs_cuda.h and csrc/common/level_jobs.h): one thread block per
// (image, threshold) job at a time; the phases are strided over the block's threads with
// __syncthreads() between them; labels and statistics live in the block's global scratch slice
// (a 224 x 224 map needs 1.2 MB; 264 blocks on an H100 need 318 MB, more than L2 holds, so the
// labels travel through L2 to HBM), the reductions in shared memory.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../common/level_jobs.h"
#include "level_jobs_cuda.h"

namespace rcam {
namespace cuda {
namespace {

__global__ void level_jobs_kernel(const uint8_t* __restrict__ levels, int64_t H, int64_t W,
                                  const int32_t* __restrict__ jobs, int64_t J,
                                  const int64_t* __restrict__ gt_boxes, const int64_t* __restrict__ gt_offsets,
                                  bool multi_contour, int32_t* scratch, double* iou_out, int64_t* xywh_out,
                                  int32_t* needs_trace_out) {
  __shared__ levels::Reduction red;
  const int64_t HW = H * W;
  const levels::Scratch s =
      levels::Scratch::at(scratch + static_cast<int64_t>(blockIdx.x) * (levels::Scratch::ints_per_pixel * HW + 1), HW);
  const int64_t tid = threadIdx.x, nthreads = blockDim.x;
  for (int64_t j = blockIdx.x; j < J; j += gridDim.x) {
    const int64_t n = jobs[2 * j];
    const levels::Job job{levels + n * HW, H, W, jobs[2 * j + 1], gt_boxes + 4 * gt_offsets[n],
                          gt_offsets[n + 1] - gt_offsets[n], multi_contour};
    levels::phase_init(job, s, &red, tid, nthreads);
    __syncthreads();
    levels::phase_union(job, s, tid, nthreads);
    __syncthreads();
    levels::phase_flatten(job, s, tid, nthreads);
    __syncthreads();
    levels::phase_stats(job, s, tid, nthreads);
    __syncthreads();
    levels::phase_holes_to_outer(job, s, &red, tid, nthreads);
    __syncthreads();
    levels::phase_candidates(job, s, &red, tid, nthreads);
    __syncthreads();
    levels::phase_largest(job, s, &red, tid, nthreads);
    __syncthreads();
    if (tid == 0) {
      const levels::JobResult r = levels::finish(job, red);
      iou_out[j] = r.iou;
      for (int k = 0; k < 4; ++k) xywh_out[4 * j + k] = r.xywh[k];
      needs_trace_out[j] = r.needs_trace;
    }
    __syncthreads();  // the next job resets the reduction
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("rethinkcam_fast.") + what + ": " + cudaGetErrorString(err));
  }
}

}  // namespace

void level_jobs(const uint8_t* levels, int64_t N, int64_t H, int64_t W, const int32_t* jobs, int64_t J,
                const int64_t* gt_boxes, const int64_t* gt_offsets, bool multi_contour, int32_t* scratch,
                int64_t grid, int64_t block_threads, double* iou_out, int64_t* xywh_out,
                int32_t* needs_trace_out, std::uintptr_t stream) {
  if (N < 0 || H <= 0 || W <= 0 || J < 0 || grid < 1 || block_threads < 32 || block_threads > 1024) {
    throw std::invalid_argument("rethinkcam_fast.level_jobs: bad sizes");
  }
  if (J == 0) return;
  level_jobs_kernel<<<static_cast<unsigned>(grid), static_cast<unsigned>(block_threads), 0,
                      reinterpret_cast<cudaStream_t>(stream)>>>(levels, H, W, jobs, J, gt_boxes, gt_offsets,
                                                                 multi_contour, scratch, iou_out, xywh_out,
                                                                 needs_trace_out);
  check(cudaGetLastError(), "level_jobs");
}

}  // namespace cuda
}  // namespace rcam
