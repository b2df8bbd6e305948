// parallel_for, shared by deepcam-data synth, convert and verify.
//
// Not deepcam::WorkerPool: the tools run one loop per process, so threads
// that outlive it buy nothing, and a thread that cannot be started (a
// process limit) must leave fewer threads doing the work, not end the
// process (a WorkerPool whose constructor fails to start a thread calls
// std::terminate through its joinable threads).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <functional>
#include <mutex>
#include <sched.h>
#include <system_error>
#include <thread>
#include <vector>

#include "stop_signals.hpp"

namespace deepcam::data {

// The cores this process may run on: its CPU affinity mask (what Slurm's
// task binding, taskset or a cgroup's cpuset leave it), not the machine's
// count, which std::thread::hardware_concurrency gives.
inline int cores_allowed() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
  return static_cast<int>(std::max(std::thread::hardware_concurrency(), 1u));
}

// The threads a loop of n items runs on when `threads` are asked for (0:
// one per core it may run on, at most 16).
inline int threads_for(std::size_t n, int threads) {
  // Each thread holds a sample or two (up to 170 MB at full size): on a
  // many-core node one per core would cost memory for no faster I/O.
  if (threads <= 0) threads = std::min(cores_allowed(), 16);
  return static_cast<int>(std::max<std::size_t>(std::min<std::size_t>(threads, n), 1));
}

// Runs body(state, k) for k in [0, n) on threads_for(n, threads) threads, the
// calling one among them; each thread makes one State (default-constructed)
// and hands it to every body it runs, so a buffer is
// allocated once per thread and freed when the loop ends. body reports its
// own errors; an exception escaping it stops the handing out of further k and
// is rethrown after every thread has finished. So does a stop signal
// (stop_signals.hpp), checked before each k.
template <class State, class Body>
void parallel_for_each(std::size_t n, int threads, const Body& body) {
  threads = threads_for(n, threads);
  std::atomic<std::size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mutex;
  std::exception_ptr first_error;
  auto worker = [&] {
    try {
      State state;
      for (std::size_t k = next++; k < n && !failed; k = next++) {
        throw_if_stopped();
        body(state, k);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex);
      if (!first_error) first_error = std::current_exception();
      failed = true;
    }
  };
  std::vector<std::thread> pool;
  try {
    for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  } catch (const std::system_error&) {
    // Fewer threads than asked for do the same work.
  }
  worker();
  for (auto& t : pool) t.join();
  if (first_error) std::rethrow_exception(first_error);
}

// parallel_for_each without a per-thread state: body(k).
inline void parallel_for(std::size_t n, int threads, const std::function<void(std::size_t)>& body) {
  struct None {};
  parallel_for_each<None>(n, threads, [&](None&, std::size_t k) { body(k); });
}

}  // namespace deepcam::data
