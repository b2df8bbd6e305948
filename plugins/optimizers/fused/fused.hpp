// The LibTorch side of the fused optimizer kernels, shared by the adam,
// adamw and lamb plugins: when the fused path applies, and how to launch on
// the tensors' device and stream. The kernels themselves and their tables
// are in multi_tensor.hpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <vector>

#include "deepcam_build_config.h"
#include "multi_tensor.hpp"

namespace deepcam::fused {

// True when this build has CUDA and every parameter with a gradient is a
// float32 CUDA tensor on one device, laid out densely, with its gradient in
// the same layout: the kernels walk raw memory. Otherwise the optimizers run
// their plain tensor code, which works on any device and dtype.
bool applies(const std::vector<at::Tensor>& parameters);

// Whether `other` (a gradient, a moment) has the parameter's device, dtype,
// sizes and layout: dense, and every element at the same offset from its
// start, so that the kernels can walk both in step (strides along
// dimensions of size 1 do not count).
bool same_layout(const at::Tensor& param, const at::Tensor& other);

#if DEEPCAM_WITH_CUDA
// Runs `launches` with the tensor's device current, passing its current
// CUDA stream (a cudaStream_t), so that the kernels queue behind the
// backward pass that wrote the gradients.
void on_stream_of(const at::Tensor& tensor, const std::function<void(void* stream)>& launches);

// Throws deepcam::Error naming the optimizer and the kernel when a launcher
// reported a CUDA error.
void check(const char* error, const char* optimizer, const char* kernel);
#endif

}  // namespace deepcam::fused
