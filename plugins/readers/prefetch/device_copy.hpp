// The CUDA side of the prefetch ring: host buffers in pinned memory, and each
// finished batch copied to the GPU on a side stream as soon as it is complete,
// so that the copy overlaps the training step running on the main stream.
// The training stream waits for the copy (an event) only when it takes the
// batch, and a host buffer is refilled only after its copy has finished.
//
// Normalisation stays on the CPU, in the source reader's read_sample: doing
// it on the GPU would need a raw (unnormalised) sample path in the Reader
// interface, which it does not have.
//
// Built without CUDA (DEEPCAM_WITH_CUDA 0), or with device "cpu", it is
// inactive: plain host buffers, batches handed over on the CPU.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>

namespace deepcam::readers {

class DeviceCopier {
 public:
  // `device` is [run] device ("cpu" or "cuda"); the GPU is rank mod the
  // number of GPUs, as the engine picks it. `slots` is the pool's size.
  DeviceCopier(const std::string& device, int rank, int slots, const std::string& where);
  ~DeviceCopier();
  DeviceCopier(const DeviceCopier&) = delete;
  DeviceCopier& operator=(const DeviceCopier&) = delete;

  bool active() const { return impl_ != nullptr; }

  // A host buffer for a slot: pinned when active.
  at::Tensor host_buffer(at::IntArrayRef sizes, at::ScalarType type) const;

  // Blocks until the slot's last copy has finished reading its host buffers.
  void wait_reusable(int slot);

  // Issues the copy of a finished batch's host buffers on the side stream
  // (called by the worker that finished it).
  void issue(int slot, const at::Tensor& data, const at::Tensor& labels);

  // The slot's device tensors, ordered after their copy on the caller's
  // current stream.
  void hand_over(int slot, at::Tensor& data, at::Tensor& labels);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace deepcam::readers
