// The CUDA level-job code (csrc/common/level_jobs.h) run with real concurrency on the host.
//
// The CPU emulation (csrc/cpu/level_jobs_emulated.cpp) runs the host branches of level_jobs.h, one
// "thread" after another: one legal interleaving, no lost atomic races, none of the device
// branches.  Here the *device* branches are compiled (with __CUDA_ARCH__ defined) against host
// versions of the CUDA intrinsics they use — atomicMin/atomicMax/atomicAdd as compare-and-swap
// loops and fetch-adds, with random yields between them so that threads interleave and races are
// lost and retried — and each phase of a job runs on T host threads with a barrier between phases,
// as a thread block runs them with __syncthreads().  Every job must give the same result on 1 and
// on many threads (the single-thread run is the emulation's schedule, which the Python tests hold
// to OpenCV).
//
// Build and run: c++ -std=c++20 -O2 -pthread -I csrc tests/native/level_jobs_threads.cpp -o lj && ./lj 300
// (tests/test_level_jobs_threads.py does it).  Prints "mismatches=M retries=R" and exits 1 on any
// mismatch.
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

namespace {
thread_local std::mt19937 yield_rng(12345);
std::atomic<long> lost_races{0};

inline void maybe_yield() {
  if ((yield_rng() & 15) == 0) std::this_thread::yield();
}

template <typename T, typename Better>
T compare_and_swap_loop(T* p, T v, Better better) {
  maybe_yield();
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (better(v, old) && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
    lost_races.fetch_add(1, std::memory_order_relaxed);  // another thread changed it first: retry
  }
  return old;
}
}  // namespace

// What the device branches of level_jobs.h call.
inline int atomicMin(int* p, int v) { return compare_and_swap_loop(p, v, [](int a, int b) { return a < b; }); }
inline int atomicMax(int* p, int v) { return compare_and_swap_loop(p, v, [](int a, int b) { return a > b; }); }
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  return compare_and_swap_loop(p, v, [](unsigned long long a, unsigned long long b) { return a > b; });
}
inline int atomicAdd(int* p, int v) {
  maybe_yield();
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline long long __double_as_longlong(double d) {
  long long b;
  std::memcpy(&b, &d, sizeof b);
  return b;
}
inline double __longlong_as_double(long long b) {
  double d;
  std::memcpy(&d, &b, sizeof d);
  return d;
}

#define __CUDA_ARCH__ 900  // the device branches, on the host (RCAM_JOB_HD stays `inline`)
#include "common/level_jobs.h"
#undef __CUDA_ARCH__

using namespace rcam::levels;

namespace {

JobResult run(const Job& job, int threads) {
  const int64_t HW = job.H * job.W;
  std::vector<int32_t> scratch(static_cast<size_t>(Scratch::ints_per_pixel * HW + 1));
  const Scratch s = Scratch::at(scratch.data(), HW);
  Reduction red{};
  JobResult result{};
  std::barrier sync(threads);
  auto block = [&](int tid) {  // one CUDA thread of the block
    yield_rng.seed(7919u * static_cast<unsigned>(tid) + 1);
    phase_init(job, s, &red, tid, threads);
    sync.arrive_and_wait();
    phase_union(job, s, tid, threads);
    sync.arrive_and_wait();
    phase_flatten(job, s, tid, threads);
    sync.arrive_and_wait();
    phase_stats(job, s, tid, threads);
    sync.arrive_and_wait();
    phase_holes_to_outer(job, s, &red, tid, threads);
    sync.arrive_and_wait();
    phase_candidates(job, s, &red, tid, threads);
    sync.arrive_and_wait();
    phase_largest(job, s, &red, tid, threads);
    sync.arrive_and_wait();
    if (tid == 0) result = finish(job, red);
  };
  std::vector<std::thread> others;
  for (int t = 1; t < threads; ++t) others.emplace_back(block, t);
  block(0);
  for (std::thread& t : others) t.join();
  return result;
}

bool same(const JobResult& a, const JobResult& b) {
  return a.iou == b.iou && a.needs_trace == b.needs_trace && std::memcmp(a.xywh, b.xywh, sizeof a.xywh) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  const int masks = argc > 1 ? std::atoi(argv[1]) : 300;
  std::mt19937 rng(7);
  int mismatches = 0;
  for (int m = 0; m < masks; ++m) {
    const int H = 1 + static_cast<int>(rng() % 90), W = 1 + static_cast<int>(rng() % 90);
    std::vector<uint8_t> level(static_cast<size_t>(H) * W);
    const int kind = m % 3;  // salt-and-pepper, every level, mostly foreground with holes
    for (uint8_t& v : level) {
      v = static_cast<uint8_t>(kind == 0 ? (rng() % 2) * 200 : kind == 1 ? rng() % 256 : (rng() % 5 ? 200 : 0));
    }
    const int64_t gt[8] = {int64_t(rng() % W), int64_t(rng() % H), W - 1, H - 1, 0, 0, W / 2, H / 2};
    for (int thr : {0, 100, 150}) {
      for (bool multi : {false, true}) {
        const Job job{level.data(), H, W, thr, gt, 2, multi};
        const JobResult one = run(job, 1);
        for (int threads : {5, 16}) {
          if (!same(one, run(job, threads))) {
            if (++mismatches <= 10) std::printf("MISMATCH mask=%d H=%d W=%d thr=%d multi=%d threads=%d\n", m, H, W, thr, multi, threads);
          }
        }
      }
    }
  }
  std::printf("mismatches=%d retries=%ld\n", mismatches, lost_races.load());
  return mismatches != 0;
}
