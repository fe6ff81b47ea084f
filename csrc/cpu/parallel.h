// A tiny std::thread based parallel_for for the CPU kernels.
//
// OpenMP is deliberately not used: torch ships its own libgomp and mixing OpenMP runtimes in one
// process is a well-known source of crashes and oversubscription.  The work here is a few large,
// evenly sized loops per call, so static chunking over short-lived threads is enough.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace rcam {
namespace cpu {

// Number of threads worth using for `work` units of work (roughly: elements touched), capped by
// the caller's request.  num_threads <= 0 means "all hardware threads".
inline int effective_threads(int64_t work, int num_threads, int64_t min_work_per_thread = 131072) {
  if (num_threads <= 0) {
    num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }
  const int64_t by_work = std::max<int64_t>(1, work / std::max<int64_t>(1, min_work_per_thread));
  return static_cast<int>(std::min<int64_t>(num_threads, by_work));
}

// Calls fn(chunk_begin, chunk_end) over a static partition of [begin, end) into at most
// num_threads contiguous chunks.  Runs inline when num_threads <= 1 or there is a single item.
// The calling thread processes the first chunk itself.  Results never depend on the number of
// threads as long as fn's work on an item does not depend on the chunk boundaries.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int num_threads, const F& fn) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t nt = std::min<int64_t>(std::max(num_threads, 1), n);
  if (nt <= 1) {
    fn(begin, end);
    return;
  }
  const int64_t base = n / nt;
  const int64_t extra = n % nt;
  auto chunk_begin = [&](int64_t t) { return begin + t * base + std::min(t, extra); };

  std::vector<std::thread> workers;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(nt));
  workers.reserve(static_cast<size_t>(nt - 1));
  int64_t t = 1;
  try {
    for (; t < nt; ++t) {
      const int64_t b = chunk_begin(t), e = chunk_begin(t + 1);
      workers.emplace_back([&fn, &errors, t, b, e]() {
        try {
          fn(b, e);
        } catch (...) {
          errors[static_cast<size_t>(t)] = std::current_exception();
        }
      });
    }
  } catch (...) {
    // Could not start a thread (resource limits): do the remaining chunks on this thread.
    for (int64_t r = t; r < nt; ++r) {
      try {
        fn(chunk_begin(r), chunk_begin(r + 1));
      } catch (...) {
        errors[static_cast<size_t>(r)] = std::current_exception();
      }
    }
  }
  try {
    fn(chunk_begin(0), chunk_begin(1));
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& w : workers) w.join();
  for (auto& err : errors) {
    if (err) std::rethrow_exception(err);
  }
}

}  // namespace cpu
}  // namespace rcam
