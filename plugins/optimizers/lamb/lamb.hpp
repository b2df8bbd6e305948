// Description
//   LAMB (SPEC 5.3) as NVIDIA APEX FusedLAMB with its defaults, which the
//   MLCommons reference trains with: bias correction and gradient averaging
//   on, decoupled ("AdamW-mode") weight decay, global gradient clipping to
//   max_grad_norm. Per step: G = ||all gradients||; g /= max(1, G / max_grad_norm);
//   m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
//   u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd p;
//   p -= lr * (||p|| / ||u||) * u when wd != 0 and both norms are non-zero,
//   else p -= lr * u (norms per parameter tensor).
//   On the CPU, plain tensor code. On CUDA (float32 parameters), four fused
//   multi-tensor kernel launches (plugins/optimizers/fused); G, the step
//   count and lr stay on the device, so a step never waits for the GPU.
//   Both give the same numbers within float32 rounding.
//   state_dict() has the layout of APEX FusedLAMB's (a torch.optim.Optimizer):
//   exp_avg and exp_avg_sq per parameter, the step count in the group.
//
// Usage
//   [optimizer]
//   name = "lamb"
//   lr = 0.0055
//   betas = [0.9, 0.999]
//   weight_decay = 1e-2
//   max_grad_norm = 1.0
//
// Parameters
//   Property      | Description                                   | Required | Default
//   lr            | learning rate, > 0                            | no       | 1e-3
//   betas         | [beta1, beta2], each in [0, 1)                | no       | [0.9, 0.999]
//   weight_decay  | decoupled decay, inside the trust ratio, >= 0 | no       | 1e-2
//   max_grad_norm | clip the global gradient norm to this, > 0    | no       | 1.0
//   eps is not a parameter: SPEC 5 fixes it at 1e-6 for every optimizer.
//   bias_correction and grad_averaging are always on (the MLPerf closed
//   division requires them, and logs them as true).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "deepcam/optimizer.hpp"
#include "deepcam/params.hpp"
#include "deepcam_build_config.h"

namespace deepcam::optimizers {

struct LambOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double weight_decay = 1e-2;
  double max_grad_norm = 1.0;

  // Checks what the schema cannot express (exclusive bounds, list length);
  // errors name params.where() and the key.
  static LambOptions from(const Params& params);
};

class Lamb final : public Optimizer {
 public:
  static constexpr double kEps = 1e-6;

  Lamb(std::vector<at::Tensor> parameters, const LambOptions& options);

  void step() override;
  void zero_grad() override;
  // On the fused path the new lr is written to the device at once.
  void set_lr(double lr) override;
  double lr() const override { return options_.lr; }
  void log_hyperparameters(MlperfLog& log) const override;
  c10::IValue state_dict() const override;
  void load_state_dict(const c10::IValue& state) override;
  at::Tensor gradient_norm() const override { return gradient_norm_; }
  // The fused path reads lr and step from scalars_ and counts the step
  // there; the plain tensor code computes with host numbers.
  bool capturable() const override { return fused_last_; }
  void replayed() override;

  const LambOptions& options() const { return options_; }
  // Steps taken, as APEX counts them: every step() counts, with or without
  // gradients.
  std::int64_t steps() const { return step_; }

 private:
  void tensor_step(const std::vector<std::size_t>& with_grad);
#if DEEPCAM_WITH_CUDA
  void fused_step(const std::vector<std::size_t>& with_grad);
#endif

  // Created at a parameter's first update (undefined until then), as in
  // PyTorch, so a parameter that never had a gradient has no state entry.
  struct ParamState {
    at::Tensor exp_avg;
    at::Tensor exp_avg_sq;
  };

  std::vector<at::Tensor> parameters_;
  std::vector<ParamState> state_;
  LambOptions options_;
  std::int64_t step_ = 0;
  at::Tensor gradient_norm_;  // of the last step, before clipping

  // The fused path's device state: LambScalars (lr, step, grad_norm) as three
  // float64, and what the host last wrote there, so that a change of lr or a
  // loaded step is one asynchronous fill; and the per-chunk partial sums.
  at::Tensor scalars_;
  double scalars_lr_ = 0.0;
  std::int64_t scalars_step_ = -1;
  bool fused_last_ = false;  // whether the last step() took the fused path
  at::Tensor grad_partials_;
  at::Tensor update_partials_;
  at::Tensor param_partials_;
};

}  // namespace deepcam::optimizers
