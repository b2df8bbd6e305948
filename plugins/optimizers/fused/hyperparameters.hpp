// The hyper-parameters the adam, adamw and lamb tables share (lr, betas,
// weight_decay), read and checked once for all three: what the schema's
// inclusive bounds cannot say (lr > 0, each beta < 1, two betas). Errors
// name params.where() and the key.
#pragma once

#include "deepcam/params.hpp"

namespace deepcam::fused {

struct Hyperparameters {
  double lr;
  double beta1;
  double beta2;
  double weight_decay;
};

Hyperparameters read_hyperparameters(const Params& params);

}  // namespace deepcam::fused
