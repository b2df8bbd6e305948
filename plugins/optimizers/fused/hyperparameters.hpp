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

// A scalar derived from the learning rate (Adam's step size, lr x the
// warmup factor, 1 - lr x weight_decay) as an update of float32 parameters
// takes it: rounded to float32 as IEEE 754 (and the CUDA kernels) round, so
// that beyond float32's range it is an infinity. The update then makes the
// weights infinite or NaN, and the divergence watch stops the run naming
// the lr and the warmup. LibTorch refuses such a scalar as an internal
// error ("cannot be converted to type float without overflow").
inline double float32_scalar(double x) {
  constexpr double kMax = 0x1.fffffep127;       // float32's largest value
  constexpr double kOverflow = 0x1.ffffffp127;  // halfway from kMax to 2^128, the first that rounds up to infinity
  if (std::abs(x) >= kOverflow) return std::copysign(HUGE_VAL, x);
  if (std::abs(x) > kMax) return std::copysign(kMax, x);
  return x;
}

}  // namespace deepcam::fused
