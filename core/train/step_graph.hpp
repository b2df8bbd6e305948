// [run] cuda_graphs: the training step captured once in a CUDA graph and
// replayed, as PyTorch's whole-network capture (torch.cuda.graph) does it.
// The batch is copied into static buffers on the caller's stream; the
// eager warm-up steps, the capture and every replay run on a side stream
// that waits for those copies, and the caller's stream waits for the step
// before it reads anything the step wrote (the loss, the weights).
//
// What the graph replays must read every value that changes from one step
// to the next from device memory: the batch (the static buffers), the
// learning rate and step counts (the optimizer's, see
// Optimizer::capturable) and the divergence watch's batch count. The
// engine decides which runs may be captured; this class only captures.
// Built with CUDA only (exported for tests/probes/data_parallel_probe.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>

#include "deepcam/export.hpp"

namespace deepcam {

class DEEPCAM_API StepGraph {
 public:
  // `device`: the CUDA device the model trains on.
  explicit StepGraph(const at::Device& device);
  ~StepGraph();
  StepGraph(const StepGraph&) = delete;
  StepGraph& operator=(const StepGraph&) = delete;

  // The batch into the static buffers, on the current stream (allocated at
  // the first batch with its shape, dtype and memory format; a batch of
  // another shape is an error).
  void load(const at::Tensor& input, const at::Tensor& labels);
  const at::Tensor& input() const;
  const at::Tensor& labels() const;

  // `step` run eagerly on the side stream (the warm-up before capture).
  void run_eager(const std::function<void()>& step);
  // `step` captured on the side stream, then replayed once: the captured
  // step's work is done when capture() returns (queued, as any step).
  void capture(const std::function<void()>& step);
  bool captured() const;
  // The captured step again, on the batch load() put in the buffers.
  void replay();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace deepcam
