#include "deepcam/worker_pool.hpp"

#include <utility>

namespace deepcam {

WorkerPool::WorkerPool(int threads) {
  try {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this, i] { work(static_cast<std::size_t>(i)); });
  } catch (...) {
    // The threads already started must be joined before the members go,
    // or their destructors terminate the process.
    stop_all();
    throw;
  }
}

WorkerPool::~WorkerPool() { stop_all(); }

void WorkerPool::stop_all() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& thread : threads_) thread.join();
}

void WorkerPool::run(std::size_t count, const Job& job) {
  std::unique_lock<std::mutex> lock(mutex_);
  job_ = &job;
  count_ = count;
  next_ = 0;
  error_ = nullptr;
  ++generation_;
  wake_.notify_all();
  done_.wait(lock, [this] { return (next_ >= count_ || error_) && active_ == 0; });
  job_ = nullptr;
  count_ = next_ = 0;
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

// Workers sleep until run() starts a new generation, then take items one at a
// time until none is left or one has failed.
void WorkerPool::work(std::size_t worker) {
  std::uint64_t seen = 0;
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
    if (stop_) return;
    seen = generation_;
    ++active_;
    while (next_ < count_ && !error_) {
      const std::size_t item = next_++;
      const Job* job = job_;
      lock.unlock();
      std::exception_ptr failure;
      try {
        (*job)(item, worker);
      } catch (...) {
        failure = std::current_exception();
      }
      lock.lock();
      if (failure && !error_) error_ = failure;
    }
    if (--active_ == 0) done_.notify_all();
  }
}

}  // namespace deepcam
