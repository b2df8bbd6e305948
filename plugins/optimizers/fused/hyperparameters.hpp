// The hyper-parameters the adam, adamw and lamb tables share (lr, betas,
// weight_decay), read and checked once for all three: what the schema's
// inclusive bounds cannot say (lr > 0, each beta < 1, two betas). Errors
// name params.where() and the key.
#pragma once

#include <cmath>

#include "deepcam/params.hpp"

namespace deepcam::fused {

struct Hyperparameters {
  double lr;
  double beta1;
  double beta2;
  double weight_decay;
};

// The ranges these values must be in, whether a run file or a saved
// state_dict gives them, each finite: lr (and LAMB's max_grad_norm) > 0,
// each beta in [0, 1), weight_decay >= 0; a saved lr may also be 0 (see
// StateDictReader::hyperparameters).
inline bool positive(double v) { return v > 0.0 && std::isfinite(v); }
inline bool beta_in_range(double beta) { return beta >= 0.0 && beta < 1.0; }
inline bool non_negative(double v) { return v >= 0.0 && std::isfinite(v); }

Hyperparameters read_hyperparameters(const Params& params);

}  // namespace deepcam::fused
