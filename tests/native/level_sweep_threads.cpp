// The CUDA level-sweep code (csrc/common/level_sweep.h) run with real concurrency on the host.
//
// The CPU emulation (csrc/cpu/level_sweep_emulated.cpp) runs the host branches of the sweep, one
// "thread" after another: one legal interleaving, no lost atomic races, none of the device
// branches.  Here the *device* branches are compiled (with __CUDA_ARCH__ defined) against host
// versions of the CUDA intrinsics they use — atomicMin/atomicMax/atomicAdd as compare-and-swap
// loops and fetch-adds, with random yields between them so that threads interleave and races are
// lost and retried — and T host threads run the whole driver, each phase followed by a
// std::barrier, as a thread block runs it with __syncthreads().  Every image must give the same
// results on 1 and on many threads (the single-thread run is the emulation's schedule, which the
// Python tests hold to OpenCV).
//
// Build and run: c++ -std=c++20 -O2 -pthread -I csrc tests/native/level_sweep_threads.cpp -o ls && ./ls 100
// (tests/test_level_sweep_threads.py does it).  Prints "mismatches=M retries=R" and exits 1 on any
// mismatch.
#include <algorithm>
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

// What the device branches of parallel_labels.h and level_sweep.h call.
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

#define __CUDA_ARCH__ 900  // the device branches, on the host (RCAM_LABELS_HD stays `inline`)
#include "common/level_sweep.h"
#undef __CUDA_ARCH__

using namespace rcam::sweep;

namespace {

// One thread of a block: runs a phase, then waits for the others.
struct HostThread {
  int64_t tid, threads;
  std::barrier<>* sync;
  template <typename Phase>
  void run(Phase&& phase) {
    phase(tid, threads);
    sync->arrive_and_wait();
  }
};

struct Results {
  std::vector<double> iou;
  std::vector<int64_t> xywh;
  std::vector<int32_t> status;
  bool operator==(const Results& o) const { return iou == o.iou && xywh == o.xywh && status == o.status; }
};

struct Map {
  std::vector<uint8_t> level, wanted;
  int64_t gt[8];
};

// The maps one after another through one block's shared state and scratch, as a CUDA block works
// through the images of a launch (consecutive images with different thresholds included).
std::vector<Results> run(const std::vector<Map>& maps, int H, int W, bool multi, int threads) {
  const int64_t HW = int64_t{H} * W;
  std::vector<int32_t> scratch(static_cast<size_t>(Scratch::ints(HW)));
  const Scratch s = Scratch::at(scratch.data(), HW);
  Shared shared{};
  std::vector<Results> out(maps.size());
  std::vector<Image> images;
  for (size_t i = 0; i < maps.size(); ++i) {
    out[i] = Results{std::vector<double>(kLevels), std::vector<int64_t>(4 * kLevels), std::vector<int32_t>(kLevels)};
    images.push_back(Image{maps[i].level.data(), H, W, maps[i].wanted.data(), maps[i].gt, 2, multi, out[i].iou.data(),
                           out[i].xywh.data(), out[i].status.data()});
  }
  std::barrier<> sync(threads);
  auto block = [&](int tid) {  // one CUDA thread of the block
    yield_rng.seed(7919u * static_cast<unsigned>(tid) + 1);
    HostThread self{tid, threads, &sync};
    for (const Image& im : images) sweep_image(self, im, s, &shared);
  };
  std::vector<std::thread> others;
  for (int t = 1; t < threads; ++t) others.emplace_back(block, t);
  block(0);
  for (std::thread& t : others) t.join();
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 100;
  std::mt19937 rng(7);
  int mismatches = 0;
  for (int m = 0; m < rounds; ++m) {
    const int H = 1 + static_cast<int>(rng() % 60), W = 1 + static_cast<int>(rng() % 60);
    std::vector<Map> maps(3);
    for (size_t i = 0; i < maps.size(); ++i) {
      Map& map = maps[i];
      map.level.resize(static_cast<size_t>(H) * W);
      const int kind = (m + static_cast<int>(i)) % 4;  // salt-and-pepper, every level, holes, few levels
      for (uint8_t& v : map.level) {
        v = static_cast<uint8_t>(kind == 0   ? (rng() % 2) * 200
                                 : kind == 1 ? rng() % 256
                                 : kind == 2 ? (rng() % 5 ? 200 : 0)
                                             : (rng() % 4) * 60);
      }
      // Different thresholds per map: a high one only, a low one only (the next map of a block then
      // wants a level its predecessor's sweep skipped), and a mixed set.
      map.wanted.assign(kLevels, 0);
      if (i == 0) {
        map.wanted[200] = 1;
      } else if (i == 1) {
        map.wanted[10] = 1;
      } else {
        for (int thr : {0, 100, 150, 254}) map.wanted[static_cast<size_t>(thr)] = 1;
        for (int k = 0; k < 12; ++k) map.wanted[rng() % kLevels] = 1;
      }
      const int64_t gt[8] = {int64_t(rng() % W), int64_t(rng() % H), W - 1, H - 1, 0, 0, W / 2, H / 2};
      std::copy(gt, gt + 8, map.gt);
    }
    for (bool multi : {false, true}) {
      const std::vector<Results> one = run(maps, H, W, multi, 1);
      for (int threads : {5, 16, 33}) {
        if (!(one == run(maps, H, W, multi, threads))) {
          if (++mismatches <= 10) std::printf("MISMATCH round=%d H=%d W=%d multi=%d threads=%d\n", m, H, W, multi, threads);
        }
      }
    }
  }
  std::printf("mismatches=%d retries=%ld\n", mismatches, lost_races.load());
  return mismatches != 0;
}
