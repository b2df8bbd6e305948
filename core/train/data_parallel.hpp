// The data-parallel gradient average (SPEC 7): every rank's gradients are
// summed over the ranks and divided by their number, in buckets that are
// sent while the backward pass is still computing the rest.
//
// Our own buckets rather than c10d's Reducer (the C++ engine of PyTorch's
// DDP): the Reducer's constructor and its bookkeeping (unused-parameter
// search, static graphs, comm hooks) follow Python's DistributedDataParallel
// and change between releases, while what is needed here is small:
// post-accumulate-grad hooks fill fixed buckets (parameters in reverse
// registration order, as DDP assigns them, the first up to 1 MiB and the
// others up to [run] bucket_cap_mb each),
// each bucket's all-reduce starts as soon as its last gradient is in, and
// buckets start in the same order on every rank (collectives must match).
// It also makes the time spent waiting for the all-reduce measurable on
// Gloo; on NCCL the wait is the GPU stream's, and the host returns at once.
//
// With gradient accumulation only the backward pass of the batch that
// updates the weights is armed: the earlier ones just accumulate locally.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "comm.hpp"
#include "deepcam/export.hpp"

namespace torch::nn {
class Module;
}

namespace deepcam {

class DEEPCAM_API GradientAllReduce {
 public:
  GradientAllReduce(Communicator& comm, std::vector<at::Tensor> parameters, std::int64_t bucket_cap_bytes);
  ~GradientAllReduce();
  GradientAllReduce(const GradientAllReduce&) = delete;
  GradientAllReduce& operator=(const GradientAllReduce&) = delete;

  // Arms the hooks: the gradients of the next backward pass are averaged.
  void arm();
  // After that backward pass: starts what has not started (parameters that
  // got no gradient count as zero), waits for every bucket and writes the
  // averages into the gradients. Returns the seconds the host spent waiting
  // (on NCCL only the time to queue the GPU's wait).
  double finish();

  std::size_t bucket_count() const { return buckets_.size(); }

 private:
  struct Bucket {
    std::vector<std::size_t> parameters;  // indices into parameters_
    std::vector<std::int64_t> offsets;
    at::Tensor flat;
    std::size_t pending = 0;              // gradients still to come
    std::unique_ptr<Communicator::Pending> work;
  };
  void ready(std::size_t parameter);
  // Copies parameter k's gradient (zeros when it has none) into its bucket.
  void fill(std::size_t parameter);
  void launch_ready_buckets();

  Communicator& comm_;
  std::vector<at::Tensor> parameters_;
  std::vector<Bucket> buckets_;
  std::vector<std::size_t> bucket_of_;  // per parameter
  std::vector<std::size_t> slot_of_;    // per parameter: its place in the bucket
  std::vector<bool> filled_;            // per parameter, this pass
  std::size_t next_launch_ = 0;
  bool armed_ = false;
  std::mutex mutex_;
};

// SPEC 7: replaces every BatchNorm running mean and variance of `module`
// (buffers named *running_mean, *running_var) by its mean over the group's
// ranks. The engine calls it after each training epoch.
DEEPCAM_API void average_batchnorm_statistics(torch::nn::Module& module, Group& group);

}  // namespace deepcam
