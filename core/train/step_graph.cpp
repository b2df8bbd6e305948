#include "step_graph.hpp"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <exception>
#include <string>

#include "deepcam/error.hpp"

namespace deepcam {

struct StepGraph::Impl {
  explicit Impl(const at::Device& device)
      : device(device), side(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index())) {}

  // Runs `work` with the side stream current, after what the caller's stream
  // queued so far (the batch copies), and makes the caller's stream wait for
  // it.
  void on_side_stream(const std::function<void()>& work) {
    const c10::cuda::CUDAGuard device_guard(device);
    const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(device.index());
    inputs_ready.record(caller);
    inputs_ready.block(side);
    {
      const c10::cuda::CUDAStreamGuard stream_guard(side);
      work();
    }
    step_done.record(side);
    step_done.block(caller);
  }

  at::Device device;
  c10::cuda::CUDAStream side;
  at::cuda::CUDAEvent inputs_ready, step_done;
  at::cuda::CUDAGraph graph;
  bool captured = false;
  at::Tensor input, labels;
};

StepGraph::StepGraph(const at::Device& device) : impl_(std::make_unique<Impl>(device)) {}

StepGraph::~StepGraph() = default;

void StepGraph::load(const at::Tensor& input, const at::Tensor& labels) {
  Impl& s = *impl_;
  if (!s.input.defined()) {
    s.input = at::empty_like(input, input.options().device(s.device), input.suggest_memory_format());
    s.labels = at::empty_like(labels, labels.options().device(s.device));
  }
  if (input.sizes() != s.input.sizes() || labels.sizes() != s.labels.sizes()) {
    throw Error("[run] cuda_graphs: a batch of shape " + c10::str(input.sizes()) + " after the captured step's " +
                c10::str(s.input.sizes()) + "; a captured step takes batches of one shape");
  }
  s.input.copy_(input, /*non_blocking=*/true);
  s.labels.copy_(labels, /*non_blocking=*/true);
}

const at::Tensor& StepGraph::input() const { return impl_->input; }

const at::Tensor& StepGraph::labels() const { return impl_->labels; }

void StepGraph::run_eager(const std::function<void()>& step) { impl_->on_side_stream(step); }

void StepGraph::capture(const std::function<void()>& step) {
  Impl& s = *impl_;
  // As torch.cuda.graph does before it captures: the eager steps' cached
  // blocks go back to the device, since the graph allocates from a pool of
  // its own, which cannot use them, and the eager step's memory plus the
  // graph's could exceed the GPU where either alone fits.
  c10::cuda::device_synchronize();
  c10::cuda::CUDACachingAllocator::emptyCache();
  s.on_side_stream([&] {
    // Thread-local: only this thread may not make unsafe CUDA calls while it
    // captures. The prefetch reader's threads go on copying batches (and
    // waiting for their copies) meanwhile; under the global mode those calls
    // would fail and spoil the capture.
    s.graph.capture_begin(/*pool=*/{0, 0}, cudaStreamCaptureModeThreadLocal);
    try {
      step();
    } catch (...) {
      // End the capture so that the error, not CUDA's complaint about an
      // open capture, is what the user reads.
      try {
        s.graph.capture_end();
      } catch (...) {
      }
      throw;
    }
    s.graph.capture_end();
    s.graph.replay();
  });
  s.captured = true;
}

bool StepGraph::captured() const { return impl_->captured; }

void StepGraph::replay() {
  Impl& s = *impl_;
  s.on_side_stream([&] { s.graph.replay(); });
}

}  // namespace deepcam
