// CUDA kernels for TAP: thresholded average pooling (forward and backward).
//
// Semantics (per (n, c) row of x, logical shape [N, C, S], S = H*W) -- identical to the CPU code:
//   m     = max_s x[s]                      NaN-propagating (like torch.max)
//   thr   = round_to_dtype(acc(m) * acc(tau))
//   kept  = x[s] > thr                      strict; NaN compares false; a NaN thr keeps nothing
//   count = #{s : kept(s) && x[s] > 0}
//   inv   = 1 / max(count, 1)
//   out   = (sum_{kept} x[s]) * inv         accumulated in acc_t (double for f64, float otherwise)
//   backward: grad_in[s] = kept(s) ? grad_out * inv : 0   (in x's dtype, round to nearest even)
//
// Kernels:
//   * tap_fwd_rows   (stride_s == 1, NCHW): a warp per (n, c) row (a whole block per row for
//     long rows); the threads stride over s so loads are coalesced, with 16-byte vector loads when
//     every row start is 16-byte aligned.  Rows that fit (kGroup * kRowCache items) are held in
//     registers between the two passes, so x is read from memory once.
//   * tap_fwd_tiles  (channels_last, or any other strides): a 32 x 32 block per (image, 32
//     consecutive channels); threadIdx.x runs along c (coalesced for stride_c == 1), threadIdx.y
//     picks an interleaved slice of s; slices are combined through shared memory.
//   * tap_bwd        elementwise grid-stride loop in the memory order of x; thr/inv are read per
//     element (they are tiny and stay cached).
// All reductions run in a fixed order for a given launch configuration, so results are
// deterministic; no atomics are used.  Do not compile with --use_fast_math: the NaN/inf handling
// and the rounding of the threshold rely on IEEE semantics.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common/dtype.h"
#include "tap_cuda.h"

namespace rcam {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

// Row kernels: 256 threads per block; a row is handled by a group of kGroup threads (one warp, or
// the whole block for long rows).  Each thread can keep kRowCache (warp per row) or
// kRowCacheBlock (block per row) items of its row in registers: with 16-byte items that is up to
// 256 * 16 * 16 B = 64 KiB per row, e.g. a 112 x 112 float32 map.
constexpr int kRowThreads = 256;
constexpr int kRowCache = 8;
constexpr int kRowCacheBlock = 16;
// Tile kernel: 32 channels x 32 s-slices (1024 threads); each thread can keep kTileCache values
// of its (channel, slice) in registers.
constexpr int kTileC = 32;
constexpr int kTileS = 32;
constexpr int kTileCache = 8;
// Backward kernel.
constexpr int kBwdThreads = 256;
// Grid caps (all kernels use grid-stride loops, so any cap is correct).
constexpr int64_t kMaxBlocks = 1 << 20;
constexpr int64_t kMaxBwdBlocks = 1 << 16;

// ------------------------------------------------------------------------------------------------
// Small device helpers
// ------------------------------------------------------------------------------------------------
template <typename A>
__device__ __forceinline__ A neg_infinity();
template <>
__device__ __forceinline__ float neg_infinity<float>() {
  return __int_as_float(static_cast<int>(0xff800000u));
}
template <>
__device__ __forceinline__ double neg_infinity<double>() {
  return __longlong_as_double(static_cast<long long>(0xfff0000000000000ull));
}

struct MaxRed {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const {
    return nan_max(a, b);  // NaN-propagating
  }
};
struct SumRed {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const {
    return a + b;
  }
};

// All-reduce over a group of kGroup threads: one warp (kGroup == 32) or the whole block
// (kGroup == blockDim.x, a multiple of 32; `sh` then needs kGroup / 32 entries, and every thread
// of the block must make the call).  Every thread of the group gets a bit-identical result: the
// xor butterfly leaves the same value in all lanes for commutative operations, the warp result is
// taken from lane 0 anyway (max(+0, -0) could otherwise differ between lanes), and the per-warp
// partials are combined in a fixed order.
template <int kGroup, typename V, typename Op>
__device__ __forceinline__ V group_allreduce(V v, V* sh, Op op) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, off));
  v = __shfl_sync(kFullMask, v, 0);
  if constexpr (kGroup > kWarp) {
    const int warp = static_cast<int>(threadIdx.x) / kWarp;
    if ((threadIdx.x & (kWarp - 1)) == 0) sh[warp] = v;
    __syncthreads();
    v = sh[0];
#pragma unroll
    for (int w = 1; w < kGroup / kWarp; ++w) v = op(v, sh[w]);
    __syncthreads();  // `sh` may be reused by the next reduction
  } else {
    (void)sh;
  }
  return v;
}

// One "item" of a row as loaded by a thread: a single element (kVec = false, any element
// stride) or a 16-byte vector of 16 / sizeof(T) consecutive elements (kVec = true, stride 1,
// 16-byte aligned).
template <typename T, bool kVec>
struct RowItem;

template <typename T>
struct RowItem<T, false> {
  static constexpr int kElems = 1;
  using raw = T;
  static __device__ __forceinline__ raw load(const T* __restrict__ row, int64_t i, int64_t ss) {
    return row[i * ss];
  }
  template <typename F>
  static __device__ __forceinline__ void for_each(const raw& r, F& f) {
    f(to_acc(r));
  }
};

template <typename T>
union Vec16 {
  uint4 u;
  T e[16 / sizeof(T)];
};

template <typename T>
struct RowItem<T, true> {
  static constexpr int kElems = static_cast<int>(16 / sizeof(T));
  using raw = Vec16<T>;
  static __device__ __forceinline__ raw load(const T* __restrict__ row, int64_t i, int64_t) {
    raw r;
    r.u = __ldg(reinterpret_cast<const uint4*>(row) + i);
    return r;
  }
  template <typename F>
  static __device__ __forceinline__ void for_each(const raw& r, F& f) {
#pragma unroll
    for (int j = 0; j < kElems; ++j) f(to_acc(r.e[j]));
  }
};

// Per-thread state of the two passes.
template <typename A>
struct MaxOp {
  A m;
  __device__ __forceinline__ void operator()(A v) { m = nan_max(m, v); }
};

template <typename A>
struct SumOp {
  A thr;
  A sum;
  unsigned cnt;
  __device__ __forceinline__ void operator()(A v) {
    const bool k = v > thr;  // false for a NaN v and for a NaN thr
    sum += k ? v : A(0);
    cnt += static_cast<unsigned>(k && v > A(0));
  }
};

// ------------------------------------------------------------------------------------------------
// Forward, row kernel (stride_s == 1 or S == 1): a group of kGroup threads per (n, c) row, the
// threads striding over the row so that loads are coalesced.
//   kGroup: 32 (a warp per row, 8 rows per block) or kRowThreads (a block per row, for long rows:
//           more threads per row and fewer rows in flight, so a second pass hits L2)
//   kVec:   16-byte loads (the host guarantees stride_s == 1 and 16-byte aligned row starts)
//   kCache: > 0: the host guarantees S / kElems <= kGroup * kCache, and the row stays in
//           registers between the passes (x is read once); 0: the row is read twice
// ------------------------------------------------------------------------------------------------
template <typename T, bool kVec, int kCache, int kGroup>
__global__ void __launch_bounds__(kRowThreads)
    tap_fwd_rows(const T* __restrict__ x, acc_t<T>* __restrict__ out, acc_t<T>* __restrict__ thr_out,
                 acc_t<T>* __restrict__ inv_out, int64_t rows, int64_t C, int S, int64_t sn,
                 int64_t sc, int64_t ss, acc_t<T> tau) {
  static_assert(kGroup == kWarp || kGroup == kRowThreads, "a row is one warp or one block");
  using A = acc_t<T>;
  using Item = RowItem<T, kVec>;
  constexpr int E = Item::kElems;
  constexpr int kGroupsPerBlock = kRowThreads / kGroup;
  constexpr int kShared = kGroup > kWarp ? kGroup / kWarp : 1;
  __shared__ A sh_a[kShared];
  __shared__ unsigned sh_u[kShared];

  const int lane = static_cast<int>(threadIdx.x) % kGroup;  // index within the group
  const int nitems = S / E;                                 // whole items per row
  const int tail_begin = nitems * E;  // kVec: fewer than E <= 8 leftover elements; else == S

  const int64_t group0 =
      static_cast<int64_t>(blockIdx.x) * kGroupsPerBlock + static_cast<int>(threadIdx.x) / kGroup;
  const int64_t ngroups = static_cast<int64_t>(gridDim.x) * kGroupsPerBlock;

  // `row` is uniform across the group, so all its threads reach the reductions together (for
  // kGroup == block the loop is block-uniform, as __syncthreads requires).
  for (int64_t row = group0; row < rows; row += ngroups) {
    const int64_t n = row / C;
    const int64_t c = row - n * C;
    const T* __restrict__ xr = x + n * sn + c * sc;

    // Leftover elements after the last whole vector: at most one per thread.
    const int ts = tail_begin + lane;
    const bool has_tail = kVec && ts < S;
    const A tail_v = has_tail ? to_acc(xr[ts]) : A(0);

    MaxOp<A> mop{neg_infinity<A>()};
    SumOp<A> sop{A(0), A(0), 0u};

    if constexpr (kCache > 0) {
      typename Item::raw cache[kCache];
#pragma unroll
      for (int k = 0; k < kCache; ++k) {
        const int i = lane + kGroup * k;
        if (i < nitems) {
          cache[k] = Item::load(xr, i, ss);
          Item::for_each(cache[k], mop);
        }
      }
      if (has_tail) mop(tail_v);
      sop.thr = tap_threshold<T>(group_allreduce<kGroup>(mop.m, sh_a, MaxRed{}), tau);
#pragma unroll
      for (int k = 0; k < kCache; ++k) {
        const int i = lane + kGroup * k;
        if (i < nitems) Item::for_each(cache[k], sop);
      }
      if (has_tail) sop(tail_v);
    } else {
      for (int i = lane; i < nitems; i += kGroup) Item::for_each(Item::load(xr, i, ss), mop);
      if (has_tail) mop(tail_v);
      sop.thr = tap_threshold<T>(group_allreduce<kGroup>(mop.m, sh_a, MaxRed{}), tau);
      for (int i = lane; i < nitems; i += kGroup) Item::for_each(Item::load(xr, i, ss), sop);
      if (has_tail) sop(tail_v);
    }

    const A sum = group_allreduce<kGroup>(sop.sum, sh_a, SumRed{});
    const unsigned cnt = group_allreduce<kGroup>(sop.cnt, sh_u, SumRed{});
    if (lane == 0) {
      const A inv = A(1) / static_cast<A>(cnt > 0u ? cnt : 1u);
      out[row] = sum * inv;
      thr_out[row] = sop.thr;
      inv_out[row] = inv;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Forward, tile kernel (channels_last, or any strides with stride_s != 1).
// Block (kTileC, kTileS) = (32, 32): channel c = blockIdx.x * 32 + threadIdx.x; thread row ty
// handles the slice s = ty, ty + 32, ...  With stride_c == 1 each warp (fixed ty) reads 32
// consecutive channels of one s: coalesced.
//   kCache > 0: the host guarantees S <= kTileS * kCache; each thread keeps its slice in
//               registers between the passes (x is read once).
//   kCache = 0: the slice is read twice.  A block's slab is 32 * S elements and at most two
//               blocks are resident per SM, so for moderate S the second read hits L2.
// Grid: (ceil(C / 32), min(N, 65535)); images are visited with a grid-stride loop over y.
// ------------------------------------------------------------------------------------------------
template <typename T, int kCache>
__global__ void __launch_bounds__(kTileC* kTileS)
    tap_fwd_tiles(const T* __restrict__ x, acc_t<T>* __restrict__ out,
                  acc_t<T>* __restrict__ thr_out, acc_t<T>* __restrict__ inv_out, int64_t N,
                  int64_t C, int64_t S, int64_t sn, int64_t sc, int64_t ss, acc_t<T> tau) {
  static_assert(kTileC == kWarp && kTileS == kWarp, "the reductions below assume 32 x 32");
  using A = acc_t<T>;
  // [slice][channel], padded so that the transposed reads below are bank-conflict free.
  __shared__ A sh_val[kTileS][kTileC + 1];
  __shared__ unsigned sh_cnt[kTileS][kTileC + 1];
  __shared__ A sh_thr[kTileC];

  const int tx = static_cast<int>(threadIdx.x);  // channel within the tile; also the lane
  const int ty = static_cast<int>(threadIdx.y);  // slice; also the warp index
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTileC + tx;
  const bool valid = c < C;

  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const T* __restrict__ xc = x + n * sn + (valid ? c : 0) * sc;

    // Pass 1: per-slice max.
    MaxOp<A> mop{neg_infinity<A>()};
    T cache[kCache > 0 ? kCache : 1];
    if constexpr (kCache > 0) {
#pragma unroll
      for (int k = 0; k < kCache; ++k) {
        const int64_t s = ty + static_cast<int64_t>(kTileS) * k;
        if (valid && s < S) {
          cache[k] = xc[s * ss];
          mop(to_acc(cache[k]));
        }
      }
    } else {
      (void)cache;
      if (valid) {
#pragma unroll 4
        for (int64_t s = ty; s < S; s += kTileS) mop(to_acc(xc[s * ss]));
      }
    }
    // Warp w combines the 32 slices of channel w (lane l reads slice l): transposed through
    // shared memory, then a butterfly.  Fixed order, so the result is deterministic.
    sh_val[ty][tx] = mop.m;
    __syncthreads();
    {
      A m = sh_val[tx][ty];
#pragma unroll
      for (int off = kWarp / 2; off > 0; off >>= 1) {
        m = nan_max(m, __shfl_xor_sync(kFullMask, m, off));
      }
      if (tx == 0) sh_thr[ty] = tap_threshold<T>(m, tau);
    }
    __syncthreads();

    // Pass 2: per-slice masked sum and count.
    SumOp<A> sop{sh_thr[tx], A(0), 0u};
    if constexpr (kCache > 0) {
#pragma unroll
      for (int k = 0; k < kCache; ++k) {
        const int64_t s = ty + static_cast<int64_t>(kTileS) * k;
        if (valid && s < S) sop(to_acc(cache[k]));
      }
    } else {
      if (valid) {
#pragma unroll 4
        for (int64_t s = ty; s < S; s += kTileS) sop(to_acc(xc[s * ss]));
      }
    }
    sh_val[ty][tx] = sop.sum;
    sh_cnt[ty][tx] = sop.cnt;
    __syncthreads();
    {
      A sum = sh_val[tx][ty];
      unsigned cnt = sh_cnt[tx][ty];
#pragma unroll
      for (int off = kWarp / 2; off > 0; off >>= 1) {
        sum += __shfl_xor_sync(kFullMask, sum, off);
        cnt += __shfl_xor_sync(kFullMask, cnt, off);
      }
      const int64_t co = static_cast<int64_t>(blockIdx.x) * kTileC + ty;  // channel of warp ty
      if (tx == 0 && co < C) {
        const A inv = A(1) / static_cast<A>(cnt > 0u ? cnt : 1u);
        const int64_t o = n * C + co;
        out[o] = sum * inv;
        thr_out[o] = sh_thr[ty];
        inv_out[o] = inv;
      }
    }
    __syncthreads();  // shared memory is reused by the next image
  }
}

// ------------------------------------------------------------------------------------------------
// Backward: elementwise.
// ------------------------------------------------------------------------------------------------

// Unsigned division by a runtime-invariant divisor d (1 <= d < 2^31) for dividends n < 2^31,
// by multiply-high and shift (round-up method of Granlund & Montgomery):
//   l = ceil(log2 d),  magic = floor(2^32 * (2^l - d) / d) + 1,  q = (mulhi(n, magic) + n) >> l.
// (magic < 2^32, so mulhi(n, magic) < n and the sum fits in 32 bits for n < 2^31.)
struct FastDivU32 {
  uint32_t d;
  uint32_t magic;
  uint32_t shift;
  static FastDivU32 make(uint32_t d) {
    uint32_t l = 0;
    while ((uint64_t{1} << l) < d) ++l;
    const uint64_t magic = ((uint64_t{1} << 32) * ((uint64_t{1} << l) - d)) / d + 1;
    return FastDivU32{d, static_cast<uint32_t>(magic), l};
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const {
    return (__umulhi(n, magic) + n) >> shift;
  }
  __device__ __forceinline__ uint32_t mod(uint32_t n, uint32_t q) const { return n - q * d; }
};

// Plain 64-bit division for huge tensors.
struct DivU64 {
  uint64_t d;
  static DivU64 make(uint64_t d) { return DivU64{d}; }
  __device__ __forceinline__ uint64_t div(uint64_t n) const { return n / d; }
  __device__ __forceinline__ uint64_t mod(uint64_t n, uint64_t q) const { return n - q * d; }
};

// kChannelsLast: the flat index runs over (n, s, c) with c fastest, else over (n, c, s) with s
// fastest -- chosen to match x's memory order, so that the reads of x and the writes of grad_in
// (normally the same layout) are coalesced.
template <typename T, bool kChannelsLast, typename Idx, typename Div>
__global__ void __launch_bounds__(kBwdThreads)
    tap_bwd(const acc_t<T>* __restrict__ grad_out, const T* __restrict__ x,
            const acc_t<T>* __restrict__ thr, const acc_t<T>* __restrict__ inv,
            T* __restrict__ grad_in, Idx total, Div div_c, Div div_s, int64_t xsn, int64_t xsc,
            int64_t xss, int64_t gsn, int64_t gsc, int64_t gss) {
  using A = acc_t<T>;
  const Idx step = static_cast<Idx>(gridDim.x) * blockDim.x;
  for (Idx i = static_cast<Idx>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    Idx n, c, s;
    if constexpr (kChannelsLast) {
      const Idx t = div_c.div(i);  // i = t * C + c,  t = n * S + s
      c = div_c.mod(i, t);
      n = div_s.div(t);
      s = div_s.mod(t, n);
    } else {
      const Idx t = div_s.div(i);  // i = t * S + s,  t = n * C + c
      s = div_s.mod(i, t);
      n = div_c.div(t);
      c = div_c.mod(t, n);
    }
    const int64_t ni = static_cast<int64_t>(n);
    const int64_t ci = static_cast<int64_t>(c);
    const int64_t si = static_cast<int64_t>(s);
    const int64_t row = ni * static_cast<int64_t>(div_c.d) + ci;
    const A v = to_acc(x[ni * xsn + ci * xsc + si * xss]);
    const A g = grad_out[row] * inv[row];
    grad_in[ni * gsn + ci * gsc + si * gss] = from_acc<T>(v > thr[row] ? g : A(0));
  }
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("rethinkcam_fast._C_cuda.") + what +
                             ": CUDA error: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

template <typename T, bool kVec>
void launch_forward_rows(const T* x, acc_t<T>* out, acc_t<T>* thr, acc_t<T>* inv, int64_t rows,
                         int64_t C, int S, int64_t sn, int64_t sc, int64_t ss, acc_t<T> tau,
                         cudaStream_t stream) {
  constexpr int64_t E = kVec ? 16 / sizeof(T) : 1;
  const int64_t items = S / E;
  if (items <= int64_t{kWarp} * kRowCache) {
    // Short rows: a warp per row, 8 rows per block, row cached in registers.
    constexpr int64_t kRowsPerBlock = kRowThreads / kWarp;
    const unsigned blocks = static_cast<unsigned>(
        std::min<int64_t>((rows + kRowsPerBlock - 1) / kRowsPerBlock, kMaxBlocks));
    tap_fwd_rows<T, kVec, kRowCache, kWarp>
        <<<blocks, kRowThreads, 0, stream>>>(x, out, thr, inv, rows, C, S, sn, sc, ss, tau);
  } else {
    // Long rows: a block per row, cached in registers when it fits.
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(rows, kMaxBlocks));
    if (items <= int64_t{kRowThreads} * kRowCacheBlock) {
      tap_fwd_rows<T, kVec, kRowCacheBlock, kRowThreads>
          <<<blocks, kRowThreads, 0, stream>>>(x, out, thr, inv, rows, C, S, sn, sc, ss, tau);
    } else {
      tap_fwd_rows<T, kVec, 0, kRowThreads>
          <<<blocks, kRowThreads, 0, stream>>>(x, out, thr, inv, rows, C, S, sn, sc, ss, tau);
    }
  }
}

template <typename T>
void launch_forward(const T* x, acc_t<T>* out, acc_t<T>* thr, acc_t<T>* inv, int64_t N, int64_t C,
                    int64_t S, int64_t sn, int64_t sc, int64_t ss, double tau_d,
                    cudaStream_t stream) {
  using A = acc_t<T>;
  const A tau = static_cast<A>(tau_d);
  const int64_t rows = N * C;

  if (ss == 1 || S == 1) {
    // NCHW-like rows.  16-byte loads when every row start is 16-byte aligned.
    constexpr int64_t E = 16 / sizeof(T);
    constexpr int64_t kBytes = static_cast<int64_t>(sizeof(T));
    const bool vec = ss == 1 && S >= E && (reinterpret_cast<std::uintptr_t>(x) % 16 == 0) &&
                     (N == 1 || (sn * kBytes) % 16 == 0) && (C == 1 || (sc * kBytes) % 16 == 0);
    const int Si = static_cast<int>(S);
    if (vec) {
      launch_forward_rows<T, true>(x, out, thr, inv, rows, C, Si, sn, sc, ss, tau, stream);
    } else {
      launch_forward_rows<T, false>(x, out, thr, inv, rows, C, Si, sn, sc, ss, tau, stream);
    }
  } else {
    // channels_last (stride_c == 1) or other strides: channel tiles.
    const dim3 block(kTileC, kTileS);
    const dim3 grid(static_cast<unsigned>((C + kTileC - 1) / kTileC),
                    static_cast<unsigned>(std::min<int64_t>(N, 65535)));
    if (S <= int64_t{kTileS} * kTileCache) {
      tap_fwd_tiles<T, kTileCache>
          <<<grid, block, 0, stream>>>(x, out, thr, inv, N, C, S, sn, sc, ss, tau);
    } else {
      tap_fwd_tiles<T, 0><<<grid, block, 0, stream>>>(x, out, thr, inv, N, C, S, sn, sc, ss, tau);
    }
  }
}

template <typename T>
void launch_backward(const acc_t<T>* gout, const T* x, const acc_t<T>* thr, const acc_t<T>* inv,
                     T* gin, int64_t N, int64_t C, int64_t S, int64_t xsn, int64_t xsc,
                     int64_t xss, int64_t gsn, int64_t gsc, int64_t gss, cudaStream_t stream) {
  const int64_t total = N * C * S;
  const bool channels_last = S > 1 && xsc == 1 && xss != 1;
  const unsigned blocks = static_cast<unsigned>(
      std::min<int64_t>((total + kBwdThreads - 1) / kBwdThreads, kMaxBwdBlocks));
  // 32-bit indexing with fast division when total < 2^31 (then i + grid size < 2^32 as well).
  if (total <= INT32_MAX) {
    const FastDivU32 dc = FastDivU32::make(static_cast<uint32_t>(C));
    const FastDivU32 ds = FastDivU32::make(static_cast<uint32_t>(S));
    const uint32_t t = static_cast<uint32_t>(total);
    if (channels_last) {
      tap_bwd<T, true, uint32_t, FastDivU32><<<blocks, kBwdThreads, 0, stream>>>(
          gout, x, thr, inv, gin, t, dc, ds, xsn, xsc, xss, gsn, gsc, gss);
    } else {
      tap_bwd<T, false, uint32_t, FastDivU32><<<blocks, kBwdThreads, 0, stream>>>(
          gout, x, thr, inv, gin, t, dc, ds, xsn, xsc, xss, gsn, gsc, gss);
    }
  } else {
    const DivU64 dc = DivU64::make(static_cast<uint64_t>(C));
    const DivU64 ds = DivU64::make(static_cast<uint64_t>(S));
    const uint64_t t = static_cast<uint64_t>(total);
    if (channels_last) {
      tap_bwd<T, true, uint64_t, DivU64><<<blocks, kBwdThreads, 0, stream>>>(
          gout, x, thr, inv, gin, t, dc, ds, xsn, xsc, xss, gsn, gsc, gss);
    } else {
      tap_bwd<T, false, uint64_t, DivU64><<<blocks, kBwdThreads, 0, stream>>>(
          gout, x, thr, inv, gin, t, dc, ds, xsn, xsc, xss, gsn, gsc, gss);
    }
  }
}

}  // namespace

void tap_forward(const void* x, void* out, void* thr, void* inv, int64_t N, int64_t C, int64_t S,
                 int64_t stride_n, int64_t stride_c, int64_t stride_s, double tau, int dtype,
                 std::uintptr_t stream) {
  check_dtype(dtype);
  check_sizes(N, C, S);
  if (N == 0 || C == 0) return;
  if (S > INT32_MAX) {
    throw std::invalid_argument("rethinkcam_fast._C_cuda.tap_forward: S = H*W must be < 2^31");
  }
  if (!x || !out || !thr || !inv) {
    throw std::invalid_argument("rethinkcam_fast._C_cuda.tap_forward: null pointer");
  }
  // S == 0 is rejected by the Python layer; should it happen, the kernels' loops are simply empty
  // (out = 0, inv = 1, thr = round(-inf * tau)).
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    launch_forward<T>(static_cast<const T*>(x), static_cast<A*>(out), static_cast<A*>(thr),
                      static_cast<A*>(inv), N, C, S, stride_n, stride_c, stride_s, tau, st);
  });
  check_launch("tap_forward");
}

void tap_backward(const void* grad_out, const void* x, const void* thr, const void* inv,
                  void* grad_in, int64_t N, int64_t C, int64_t S, int64_t x_stride_n,
                  int64_t x_stride_c, int64_t x_stride_s, int64_t g_stride_n, int64_t g_stride_c,
                  int64_t g_stride_s, int dtype, std::uintptr_t stream) {
  check_dtype(dtype);
  check_sizes(N, C, S);
  if (N == 0 || C == 0 || S == 0) return;
  if (!grad_out || !x || !thr || !inv || !grad_in) {
    throw std::invalid_argument("rethinkcam_fast._C_cuda.tap_backward: null pointer");
  }
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    launch_backward<T>(static_cast<const A*>(grad_out), static_cast<const T*>(x),
                       static_cast<const A*>(thr), static_cast<const A*>(inv),
                       static_cast<T*>(grad_in), N, C, S, x_stride_n, x_stride_c, x_stride_s,
                       g_stride_n, g_stride_c, g_stride_s, st);
  });
  check_launch("tap_backward");
}

}  // namespace cuda
}  // namespace rcam
