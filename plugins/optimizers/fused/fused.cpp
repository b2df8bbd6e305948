#include "fused.hpp"

#include <string>

#include "deepcam/error.hpp"

#if DEEPCAM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace deepcam::fused {

bool same_layout(const at::Tensor& param, const at::Tensor& other) {
  if (!other.defined() || other.device() != param.device() || other.scalar_type() != param.scalar_type() ||
      other.sizes() != param.sizes() || !other.is_non_overlapping_and_dense()) {
    return false;
  }
  // A dimension of size 1 is never stepped along, so its stride may differ
  // (autograd keeps such a gradient: a channels_last [O, I, 1, 1] weight's
  // gradient from a convolution's backward pass has strides of its own
  // there); every element still sits at the same offset in both.
  for (std::int64_t d = 0; d < param.dim(); ++d) {
    if (param.size(d) > 1 && other.stride(d) != param.stride(d)) return false;
  }
  return true;
}

bool applies(const std::vector<at::Tensor>& parameters) {
#if DEEPCAM_WITH_CUDA
  bool any = false;
  c10::Device device(c10::kCPU);
  for (const at::Tensor& param : parameters) {
    const at::Tensor& grad = param.grad();
    if (!grad.defined()) continue;
    if (!param.is_cuda() || param.scalar_type() != at::kFloat || !param.is_non_overlapping_and_dense()) {
      return false;
    }
    if (!same_layout(param, grad)) return false;
    if (any && param.device() != device) return false;
    device = param.device();
    any = true;
  }
  return any;
#else
  (void)parameters;
  return false;
#endif
}

#if DEEPCAM_WITH_CUDA
void on_stream_of(const at::Tensor& tensor, const std::function<void(void* stream)>& launches) {
  const c10::cuda::CUDAGuard guard(tensor.device());
  launches(c10::cuda::getCurrentCUDAStream(tensor.device().index()).stream());
}

void check(const char* error, const char* optimizer, const char* kernel) {
  if (error == nullptr) return;
  throw Error(std::string(optimizer) + " optimizer: the fused CUDA kernel " + kernel + " failed: " + error +
              " (run with the parameters on the CPU, run.device = \"cpu\", to use the plain tensor code)");
}
#endif

}  // namespace deepcam::fused
