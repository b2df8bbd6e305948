// Helpers of the optimizer plugins' tests that compare the fused CUDA kernels
// with the CPU path (test_adam.cpp, test_lamb.cpp).
#pragma once

#include <torch/cuda.h>

#include <c10/core/MemoryFormat.h>

#include <cstdint>
#include <vector>

namespace fused_test {

// The GPU cases are reported as skipped where no GPU is present.
inline bool no_gpu() { return !torch::cuda::is_available(); }

// A 4-d gradient as a convolution's backward pass allocates it under
// channels_last (at::empty with that format: for a [O, I, 1, 1] weight,
// strides that differ from the weight's along the dimensions of size 1).
inline c10::MemoryFormat backward_format(const std::vector<std::int64_t>& shape) {
  return shape.size() == 4 ? c10::MemoryFormat::ChannelsLast : c10::MemoryFormat::Contiguous;
}

}  // namespace fused_test
