// A fixed set of threads that run the items of one batch, shared by the
// readers: the threads live as long as the pool, so that none is created per
// batch, and the first failure of a batch is rethrown to the caller.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "deepcam/export.hpp"

namespace deepcam {

class DEEPCAM_API WorkerPool {
 public:
  using Job = std::function<void(std::size_t item, std::size_t worker)>;

  explicit WorkerPool(int threads);
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  std::size_t size() const { return threads_.size(); }

  // Runs job(item, worker) for item = 0 .. count-1 and returns when every item
  // has run; after a failure the items not yet begun are skipped and the first
  // exception is rethrown here.
  void run(std::size_t count, const Job& job);

 private:
  void work(std::size_t worker);
  void stop_all();

  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const Job* job_ = nullptr;
  std::size_t count_ = 0;
  std::size_t next_ = 0;
  std::size_t active_ = 0;
  std::uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
  std::vector<std::thread> threads_;
};

}  // namespace deepcam
