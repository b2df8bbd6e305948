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
#include <system_error>
#include <thread>
#include <vector>

#include "stop_signals.hpp"

namespace deepcam::data {

// Runs body(state, k) for k in [0, n) on `threads` threads, the calling one
// among them (0: one per core, at most 16); each thread makes one State
// (default-constructed) and hands it to every body it runs, so a buffer is
// allocated once per thread and freed when the loop ends. body reports its
// own errors; an exception escaping it stops the handing out of further k and
// is rethrown after every thread has finished. So does a stop signal
// (stop_signals.hpp), checked before each k.
template <class State, class Body>
void parallel_for_each(std::size_t n, int threads, const Body& body) {
  // Each thread holds a sample or two (up to 170 MB at full size): on a
  // many-core node one per core would cost memory for no faster I/O.
  if (threads <= 0) threads = static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 16u));
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
    for (int t = 1; t < threads && static_cast<std::size_t>(t) < n; ++t) pool.emplace_back(worker);
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
