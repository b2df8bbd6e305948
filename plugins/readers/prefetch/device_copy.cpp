#include "device_copy.hpp"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sub.h>
#include <fmt/format.h>

#include <vector>

#include "deepcam/error.hpp"
#include "deepcam_build_config.h"

#if DEEPCAM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#endif

namespace deepcam::readers {

#if DEEPCAM_WITH_CUDA
struct DeviceCopier::Impl {
  c10::DeviceIndex index;
  c10::cuda::CUDAStream side;
  struct Slot {
    at::cuda::CUDAEvent copied;  // recorded on `side` after the slot's copy
    at::Tensor data, labels;     // on the GPU
  };
  std::vector<Slot> slots;
  at::Tensor shift, scale;  // (C) on the GPU; undefined: batches come normalised
  bool channels_last = false;  // normalised batches stay (B, H, W, C) in memory
  Impl(c10::DeviceIndex i, int n)
      : index(i), side(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, i)), slots(static_cast<std::size_t>(n)) {}
};
#else
struct DeviceCopier::Impl {};
#endif

at::Tensor normalise_batch(const at::Tensor& raw_bhwc, const at::Tensor& shift, const at::Tensor& scale,
                           bool channels_last) {
  // Broadcast over the last dimension, the channels; subtract, then
  // multiply, as two kernels (see the header): scale * (x - shift).
  const at::Tensor normalised = at::mul(scale, at::sub(raw_bhwc, shift));
  const at::Tensor bchw = normalised.permute({0, 3, 1, 2});
  return channels_last ? bchw : bchw.contiguous();
}

DeviceCopier::DeviceCopier(const std::string& device, int local_rank, int slots, const std::string& where) {
  if (device != "cuda") return;
#if DEEPCAM_WITH_CUDA
  const int count = at::cuda::device_count();
  if (count == 0) throw Error(fmt::format("{}: [run] device = \"cuda\" but no CUDA device is available", where));
  impl_ = std::make_unique<Impl>(static_cast<c10::DeviceIndex>(local_rank % count), slots);
#else
  (void)local_rank;
  (void)slots;
  throw Error(fmt::format("{}: [run] device = \"cuda\" but this plugin was built without CUDA", where));
#endif
}

DeviceCopier::~DeviceCopier() = default;

void DeviceCopier::normalise_on_device(const std::vector<float>& shift, const std::vector<float>& scale,
                                       bool channels_last) {
#if DEEPCAM_WITH_CUDA
  if (!impl_) return;
  impl_->channels_last = channels_last;
  const c10::cuda::CUDAGuard device_guard(impl_->index);
  const at::Device gpu(at::kCUDA, impl_->index);
  const auto count = static_cast<std::int64_t>(shift.size());
  // A blocking copy from the vectors (from_blob only borrows them): done
  // when to() returns, before any batch is issued on the side stream.
  impl_->shift = at::from_blob(const_cast<float*>(shift.data()), {count}, at::kFloat).to(gpu);
  impl_->scale = at::from_blob(const_cast<float*>(scale.data()), {count}, at::kFloat).to(gpu);
  // Read on the side stream: their memory is not reused before it is done.
  impl_->shift.record_stream(impl_->side);
  impl_->scale.record_stream(impl_->side);
#else
  (void)shift;
  (void)scale;
  (void)channels_last;
#endif
}

bool DeviceCopier::normalises() const {
#if DEEPCAM_WITH_CUDA
  return impl_ && impl_->shift.defined();
#else
  return false;
#endif
}

at::Tensor DeviceCopier::host_buffer(at::IntArrayRef sizes, at::ScalarType type) const {
  return at::empty(sizes, at::TensorOptions().dtype(type).pinned_memory(active()));
}

void DeviceCopier::wait_reusable(int slot) {
#if DEEPCAM_WITH_CUDA
  if (!impl_) return;
  // This rank's GPU current in this thread too: a CUDA call from a thread
  // with none would start a context on GPU 0, in every rank's process.
  const c10::cuda::CUDAGuard device_guard(impl_->index);
  impl_->slots[static_cast<std::size_t>(slot)].copied.synchronize();
#else
  (void)slot;
#endif
}

void DeviceCopier::issue(int slot, const at::Tensor& data, const at::Tensor& labels) {
#if DEEPCAM_WITH_CUDA
  if (!impl_) return;
  auto& s = impl_->slots[static_cast<std::size_t>(slot)];
  const c10::cuda::CUDAGuard device_guard(impl_->index);
  const c10::cuda::CUDAStreamGuard stream_guard(impl_->side);
  const at::Device gpu(at::kCUDA, impl_->index);
  // Pinned source and non_blocking: an asynchronous copy on the side stream;
  // a raw batch is then normalised on the same stream, in order after it.
  s.data = impl_->shift.defined() ? normalise_batch(data.to(gpu, /*non_blocking=*/true), impl_->shift, impl_->scale,
                                                   impl_->channels_last)
                                  : data.to(gpu, /*non_blocking=*/true);
  s.labels = labels.to(gpu, /*non_blocking=*/true);
  // After the normalisation too: hand_over() orders the training stream
  // after it, and the host buffer is refilled only once the copy is done.
  s.copied.record(impl_->side);
#else
  (void)slot;
  (void)data;
  (void)labels;
#endif
}

void DeviceCopier::hand_over(int slot, at::Tensor& data, at::Tensor& labels) {
#if DEEPCAM_WITH_CUDA
  if (!impl_) return;
  auto& s = impl_->slots[static_cast<std::size_t>(slot)];
  const c10::cuda::CUDAGuard device_guard(impl_->index);
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(impl_->index);
  s.copied.block(current);
  // The tensors were allocated on the side stream; used on the current one,
  // their memory must not be reused before that stream is done with them.
  s.data.record_stream(current);
  s.labels.record_stream(current);
  data = std::move(s.data);
  labels = std::move(s.labels);
#else
  (void)slot;
  (void)data;
  (void)labels;
#endif
}

}  // namespace deepcam::readers
