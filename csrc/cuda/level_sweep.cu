// CUDA level sweep (see level_sweep_cuda.h and csrc/common/level_sweep.h): one thread block per
// image at a time; every phase runs on all the block's threads with __syncthreads() after it; the
// union-find and the statistics live in the block's global scratch slice (1.8 MB for 224 x 224),
// the counting sort's bins and the reductions in shared memory.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../common/level_sweep.h"
#include "level_sweep_cuda.h"

namespace rcam {
namespace cuda {
namespace {

struct ThreadBlock {
  template <typename Phase>
  __device__ __forceinline__ void run(Phase&& phase) {
    phase(static_cast<int64_t>(threadIdx.x), static_cast<int64_t>(blockDim.x));
    __syncthreads();
  }
};

// 512 threads.  Three builds, picked by the launcher (level_sweep.py): two blocks per SM cap the
// registers at 64 (with a few spills); one block per SM lets the kernel take the ~88 it wants; and
// one block per SM with the union-find parents in shared memory (dynamic, (H*W + 1) int32: up to
// ~57,000 pixels, a 224 x 224 map included), where every find and link of the batches' unions is a
// shared-memory access instead of an L2 round trip.
constexpr int kMaxThreads = 512;

template <int kMinBlocks, bool kSharedParents>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks) level_sweep_kernel(const uint8_t* __restrict__ levels, int64_t N, int32_t H, int32_t W,
                                   const uint8_t* __restrict__ wanted, const int64_t* __restrict__ gt_boxes,
                                   const int64_t* __restrict__ gt_offsets, bool multi_contour, int32_t* scratch,
                                   double* iou_out, int64_t* xywh_out, int32_t* status_out) {
  extern __shared__ int32_t shared_parents[];
  __shared__ sweep::Shared shared;
  const int64_t HW = static_cast<int64_t>(H) * W;
  sweep::Scratch s = sweep::Scratch::at(scratch + static_cast<int64_t>(blockIdx.x) * sweep::Scratch::ints(HW), HW);
  if (kSharedParents) s.parent = shared_parents;  // (the global slice's parent array stays unused)
  ThreadBlock block;
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const sweep::Image im{levels + n * HW, H, W, wanted + n * sweep::kLevels, gt_boxes + 4 * gt_offsets[n],
                          gt_offsets[n + 1] - gt_offsets[n], multi_contour, iou_out + n * sweep::kLevels,
                          xywh_out + 4 * n * sweep::kLevels, status_out + n * sweep::kLevels};
    sweep::sweep_image(block, im, s, &shared);  // ends with a barrier after its last read of `shared`
  }
}

}  // namespace

void level_sweep(const uint8_t* levels, int64_t N, int64_t H, int64_t W, const uint8_t* wanted,
                 const int64_t* gt_boxes, const int64_t* gt_offsets, bool multi_contour, int32_t* scratch,
                 int64_t grid, int64_t block_threads, int64_t variant, double* iou_out, int64_t* xywh_out,
                 int32_t* status_out, std::uintptr_t stream) {
  if (N < 0 || H <= 0 || W <= 0 || H * W >= (int64_t{1} << 29) || grid < 1 || block_threads < 32 ||
      block_threads > kMaxThreads || variant < 1 || variant > 3) {
    throw std::invalid_argument("rethinkcam_fast.level_sweep: bad sizes or variant");
  }
  if (N == 0) return;
  const dim3 blocks(static_cast<unsigned>(grid)), threads(static_cast<unsigned>(block_threads));
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const int32_t h = static_cast<int32_t>(H), w = static_cast<int32_t>(W);
  if (variant == 3) {  // parents in shared memory when they fit beside the static state, else variant 1
    const size_t bytes = static_cast<size_t>(H * W + 1) * sizeof(int32_t);
    int device = 0, optin = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (bytes + sizeof(sweep::Shared) <= static_cast<size_t>(optin) &&
        cudaFuncSetAttribute(level_sweep_kernel<1, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(bytes)) == cudaSuccess) {
      level_sweep_kernel<1, true><<<blocks, threads, bytes, cuda_stream>>>(
          levels, N, h, w, wanted, gt_boxes, gt_offsets, multi_contour, scratch, iou_out, xywh_out, status_out);
    } else {
      cudaGetLastError();  // a refused attribute is not this launch's error
      variant = 1;
    }
  }
  if (variant == 1) {
    level_sweep_kernel<1, false><<<blocks, threads, 0, cuda_stream>>>(levels, N, h, w, wanted, gt_boxes, gt_offsets,
                                                                      multi_contour, scratch, iou_out, xywh_out,
                                                                      status_out);
  } else if (variant == 2) {
    level_sweep_kernel<2, false><<<blocks, threads, 0, cuda_stream>>>(levels, N, h, w, wanted, gt_boxes, gt_offsets,
                                                                      multi_contour, scratch, iou_out, xywh_out,
                                                                      status_out);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("rethinkcam_fast.level_sweep: ") + cudaGetErrorString(err));
  }
}

}  // namespace cuda
}  // namespace rcam
