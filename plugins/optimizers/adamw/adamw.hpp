// Description
//   AdamW (SPEC 5.2): PyTorch's torch.optim.AdamW, Adam with decoupled
//   weight decay (p *= 1 - lr * wd before the Adam update), amsgrad off.
//   torch 2.11 implements AdamW as Adam with decoupled_weight_decay=True, and
//   so does this plugin: the class is optimizers/adam's Adam with that flag,
//   which keeps its bit-exact CPU path, its fused CUDA path and its
//   state_dict() layout (with "decoupled_weight_decay": True, as AdamW's).
//
// Usage
//   [optimizer]
//   name = "adamw"
//   lr = 0.001
//   betas = [0.9, 0.999]
//   weight_decay = 1e-2
//
// Parameters
//   Property     | Description                              | Required | Default
//   lr           | learning rate, > 0                       | no       | 1e-3
//   betas        | [beta1, beta2], each in [0, 1)           | no       | [0.9, 0.999]
//   weight_decay | decoupled decay: p *= 1 - lr * wd, >= 0  | no       | 1e-2
//   eps is not a parameter: SPEC 5 fixes it at 1e-6 for every optimizer.
//   The defaults are PyTorch's AdamW defaults (eps aside).
#pragma once

#include <utility>
#include <vector>

#include "adam.hpp"

namespace deepcam::optimizers {

// Options are AdamOptions (AdamOptions::from checks them); the constructor
// turns on the decoupled weight decay.
class AdamW final : public Adam {
 public:
  AdamW(std::vector<at::Tensor> parameters, AdamOptions options)
      : Adam(std::move(parameters), decoupled(options)) {}

 private:
  static AdamOptions decoupled(AdamOptions options) {
    options.decoupled_weight_decay = true;
    return options;
  }
};

}  // namespace deepcam::optimizers
