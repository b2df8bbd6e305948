// The CUDA side of the prefetch ring: host buffers in pinned memory, and each
// finished batch copied to the GPU on a side stream as soon as it is complete,
// so that the copy overlaps the training step running on the main stream.
// The training stream waits for the copy (an event) only when it takes the
// batch, and a host buffer is refilled only after its copy has finished.
//
// What runs where, over a file reader (hdf5, npy: a deepcam::FileReader)
// once normalise_on_device() is called: the CPU workers only decode and
// select channels (FileReader::read_sample_selected, (H, W, C) per sample,
// as stored), and the side stream, after the copy, normalises and
// transposes the batch on the GPU (normalise_batch). Over any other source
// the source's read_sample() normalises on the CPU and the side stream only
// copies.
//
// Built without CUDA (DEEPCAM_WITH_CUDA 0), or with device "cpu", it is
// inactive: plain host buffers, batches handed over on the CPU.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace deepcam::readers {

// A batch of selected samples, raw (B, H, W, C) float32, normalised, as a
// (B, C, H, W) tensor on the tensors' device: out = scale[c] * (x -
// shift[c]) with shift and scale of shape (C). Two separate at:: ops, each
// rounding once in IEEE float32 on CPU and CUDA alike, so the result equals
// the file reader's CPU normalisation (normalise_sample) bit for bit; a
// fused multiply-add would round once for both and could differ in the
// last place. Contiguous, transposed on the device; with channels_last not
// transposed at all: a channels_last view of the (B, H, W, C) result. The
// GPU runs it; the tests run it on the CPU.
at::Tensor normalise_batch(const at::Tensor& raw_bhwc, const at::Tensor& shift, const at::Tensor& scale,
                           bool channels_last = false);

class DeviceCopier {
 public:
  // `device` is [run] device ("cpu" or "cuda"); the GPU is the rank's
  // place on its node mod the number of GPUs, as the engine picks it.
  // `slots` is the pool's size.
  DeviceCopier(const std::string& device, int local_rank, int slots, const std::string& where);
  ~DeviceCopier();
  DeviceCopier(const DeviceCopier&) = delete;
  DeviceCopier& operator=(const DeviceCopier&) = delete;

  bool active() const { return impl_ != nullptr; }

  // From now on issue() takes raw (B, H, W, C) batches and normalises them
  // on the GPU with these per-channel values (FileReader::shift, scale),
  // into channels_last batches when channels_last is set. Only when active,
  // before the first issue().
  void normalise_on_device(const std::vector<float>& shift, const std::vector<float>& scale,
                           bool channels_last);
  // Whether it does (normalise_on_device() was called).
  bool normalises() const;

  // A host buffer for a slot: pinned when active.
  at::Tensor host_buffer(at::IntArrayRef sizes, at::ScalarType type) const;

  // Blocks until the slot's last copy has finished reading its host buffers.
  void wait_reusable(int slot);

  // Issues the copy of a finished batch's host buffers on the side stream
  // (called by the worker that finished it): `data` is (B, C, H, W)
  // normalised, or, when normalises(), (B, H, W, C) raw, normalised after
  // the copy on the same stream.
  void issue(int slot, const at::Tensor& data, const at::Tensor& labels);

  // The slot's device tensors, ordered after their copy on the caller's
  // current stream.
  void hand_over(int slot, at::Tensor& data, at::Tensor& labels);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace deepcam::readers
