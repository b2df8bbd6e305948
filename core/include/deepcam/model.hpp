// The model interface: a LibTorch module whose state-dict names are the
// checkpoint's names, plus its forward function.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "deepcam/export.hpp"
#include "deepcam/group.hpp"

namespace torch::nn {
class Module;
}

namespace deepcam {

struct ModelContext {
  std::int64_t in_channels;
  std::int64_t n_classes;
  int rank;
  int world_size;
  // [run] batchnorm_group_size > 1: the ranks whose BatchNorm statistics are
  // shared (deepcam/sync_batch_norm.hpp); nullptr when each rank keeps its own.
  Group* batchnorm_group = nullptr;
};

class DEEPCAM_API Model {
 public:
  virtual ~Model();
  // The module tree: parameters, buffers, train/eval mode and device moves go
  // through it; its registration order is the state dict's order.
  virtual torch::nn::Module& module() = 0;
  // (B, in_channels, H, W) -> logits (B, n_classes, H, W).
  virtual at::Tensor forward(const at::Tensor& input) = 0;
};

}  // namespace deepcam
