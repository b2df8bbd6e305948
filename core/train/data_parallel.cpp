#include "data_parallel.hpp"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/nn/module.h>

#include <chrono>

#include "text.hpp"

namespace deepcam {

namespace {

class ReadyHook final : public torch::autograd::PostAccumulateGradHook {
 public:
  ReadyHook(std::function<void()> f) : f_(std::move(f)) {}
  void operator()(const torch::autograd::Variable&) override { f_(); }

 private:
  std::function<void()> f_;
};

}  // namespace

GradientAllReduce::GradientAllReduce(Communicator& comm, std::vector<at::Tensor> parameters,
                                     std::int64_t bucket_cap_bytes)
    : comm_(comm), parameters_(std::move(parameters)) {
  bucket_of_.resize(parameters_.size());
  slot_of_.resize(parameters_.size());
  filled_.assign(parameters_.size(), false);
  // Reverse registration order: the last layers' gradients come first. As
  // in DDP, the first bucket holds at most 1 MiB, so that an exchange starts
  // early in the backward pass however large bucket_cap_mb is.
  constexpr std::int64_t kFirstBucketBytes = 1024 * 1024;
  std::int64_t bytes = 0;
  for (std::size_t k = parameters_.size(); k-- > 0;) {
    const at::Tensor& p = parameters_[k];
    if (!p.requires_grad()) continue;
    const std::int64_t size = p.numel() * static_cast<std::int64_t>(p.element_size());
    const std::int64_t cap = buckets_.size() == 1 ? std::min(kFirstBucketBytes, bucket_cap_bytes) : bucket_cap_bytes;
    const bool fits = !buckets_.empty() && bytes + size <= cap &&
                      buckets_.back().flat.scalar_type() == p.scalar_type() &&
                      buckets_.back().flat.device() == p.device();
    if (!fits) {
      buckets_.emplace_back();
      buckets_.back().flat = at::empty({0}, p.options());
      bytes = 0;
    }
    Bucket& b = buckets_.back();
    b.offsets.push_back(b.flat.numel());
    b.parameters.push_back(k);
    b.flat = at::empty({b.flat.numel() + p.numel()}, p.options().requires_grad(false));
    bytes += size;
    bucket_of_[k] = buckets_.size() - 1;
    slot_of_[k] = b.parameters.size() - 1;
  }
  for (std::size_t k = 0; k < parameters_.size(); ++k) {
    if (!parameters_[k].requires_grad()) continue;
    torch::autograd::impl::set_post_acc_grad_hooks(parameters_[k],
                                                   std::make_unique<ReadyHook>([this, k] { ready(k); }));
  }
}

GradientAllReduce::~GradientAllReduce() {
  for (const at::Tensor& p : parameters_) {
    if (p.requires_grad()) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
  }
}

void GradientAllReduce::arm() {
  std::lock_guard<std::mutex> lock(mutex_);
  armed_ = true;
  next_launch_ = 0;
  std::fill(filled_.begin(), filled_.end(), false);
  for (Bucket& b : buckets_) {
    b.pending = b.parameters.size();
    b.work.reset();
  }
}

// Called by autograd once a parameter's gradient is complete for this pass.
void GradientAllReduce::ready(std::size_t k) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!armed_ || filled_[k]) return;
  fill(k);
  launch_ready_buckets();
}

void GradientAllReduce::fill(std::size_t k) {
  filled_[k] = true;
  Bucket& b = buckets_[bucket_of_[k]];
  const at::Tensor& p = parameters_[k];
  at::Tensor dst = b.flat.narrow(0, b.offsets[slot_of_[k]], p.numel());
  if (p.grad().defined()) dst.copy_(p.grad().reshape({-1}));
  else dst.zero_();
  --b.pending;
}

// Buckets start strictly in index order, so every rank issues the same
// sequence of collectives whatever order its hooks fired in.
void GradientAllReduce::launch_ready_buckets() {
  const double world = static_cast<double>(comm_.size());
  while (next_launch_ < buckets_.size() && buckets_[next_launch_].pending == 0) {
    Bucket& b = buckets_[next_launch_++];
    // Divided first, then summed, as DDP does.
    b.flat.div_(world);
    b.work = comm_.all_reduce_sum_async(b.flat);
  }
}

double GradientAllReduce::finish() {
  std::unique_lock<std::mutex> lock(mutex_);
  // Parameters the pass did not reach contribute zeros.
  for (std::size_t k = 0; k < parameters_.size(); ++k) {
    if (parameters_[k].requires_grad() && !filled_[k]) fill(k);
  }
  launch_ready_buckets();
  armed_ = false;
  lock.unlock();
  const auto t0 = std::chrono::steady_clock::now();
  for (Bucket& b : buckets_) b.work->wait();
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (Bucket& b : buckets_) {
    for (std::size_t slot = 0; slot < b.parameters.size(); ++slot) {
      at::Tensor p = parameters_[b.parameters[slot]];
      const at::Tensor avg = b.flat.narrow(0, b.offsets[slot], p.numel()).view(p.sizes());
      if (p.grad().defined()) p.mutable_grad().copy_(avg);
      else p.mutable_grad() = at::empty_like(p, at::MemoryFormat::Preserve).copy_(avg);  // in the parameter's layout, as autograd's
    }
  }
  return waited;
}

void average_batchnorm_statistics(torch::nn::Module& module, Group& group) {
  if (group.size() == 1) return;
  std::vector<at::Tensor> stats;
  for (const auto& item : module.named_buffers(/*recurse=*/true)) {
    const std::string& name = item.key();
    if (ends_with(name, "running_mean") || ends_with(name, "running_var")) stats.push_back(item.value());
  }
  if (stats.empty()) return;
  std::vector<at::Tensor> parts;
  for (const at::Tensor& t : stats) parts.push_back(t.reshape({-1}));
  at::Tensor flat = at::cat(parts);
  group.all_reduce_sum(flat);
  flat.div_(static_cast<double>(group.size()));
  at::NoGradGuard no_grad;
  std::int64_t offset = 0;
  for (at::Tensor& t : stats) {
    t.copy_(flat.narrow(0, offset, t.numel()).view(t.sizes()));
    offset += t.numel();
  }
}

}  // namespace deepcam
