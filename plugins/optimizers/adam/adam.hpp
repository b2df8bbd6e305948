// Description
//   Adam with L2 weight decay (SPEC 5.1): PyTorch's torch.optim.Adam with
//   weight decay added to the gradient (not decoupled), amsgrad off. Written
//   as plain tensor code in the operation order of PyTorch's single-tensor
//   Adam, so that its updates equal PyTorch's to the last float32 bit, and
//   its state_dict() has PyTorch's layout so that checkpoints travel both ways.
//   With decoupled_weight_decay (the adamw plugin) it is torch.optim.AdamW,
//   which in torch 2.11 is this same algorithm with p *= 1 - lr * wd.
//   On CUDA (float32 parameters) a step is two fused multi-tensor kernel
//   launches (plugins/optimizers/fused) instead of ten tensor operations
//   per parameter, with lr and the step counts read on the device; the
//   numbers equal the CPU path's within float32 rounding.
//
// Usage
//   [optimizer]
//   name = "adam"
//   lr = 0.001
//   betas = [0.9, 0.999]
//   weight_decay = 1e-6
//
// Parameters
//   Property     | Description                        | Required | Default
//   lr           | learning rate, > 0                 | no       | 1e-3
//   betas        | [beta1, beta2], each in [0, 1)     | no       | [0.9, 0.999]
//   weight_decay | L2 penalty added to the grad, >= 0 | no       | 1e-6
//   eps is not a parameter: SPEC 5 fixes it at 1e-6 for every optimizer.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "deepcam/optimizer.hpp"
#include "deepcam/params.hpp"
#include "deepcam_build_config.h"

namespace deepcam::optimizers {

struct AdamOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double weight_decay = 1e-6;
  bool decoupled_weight_decay = false;  // AdamW

  // Checks what the schema cannot express (exclusive bounds, list length);
  // errors name params.where() and the key.
  static AdamOptions from(const Params& params);
};

// Not final: AdamW (plugins/optimizers/adamw) is this class with decoupled
// weight decay.
class Adam : public Optimizer {
 public:
  static constexpr double kEps = 1e-6;

  Adam(std::vector<at::Tensor> parameters, const AdamOptions& options);

  void step() override;
  void zero_grad() override;
  // On the fused path the new lr is written to the device at once.
  void set_lr(double lr) override;
  double lr() const override { return options_.lr; }
  void log_hyperparameters(MlperfLog& log) const override;
  c10::IValue state_dict() const override;
  void load_state_dict(const c10::IValue& state) override;
  // Adam never needs the global norm.
  at::Tensor gradient_norm() const override { return at::Tensor(); }
  // The fused kernel reads lr from the device and counts each parameter's
  // step there; the plain tensor code reads the step back to the host.
  bool capturable() const override { return fused_last_; }
  // The steps are counted on the device only: nothing to advance here.
  void replayed() override {}

  const AdamOptions& options() const { return options_; }

 private:
#if DEEPCAM_WITH_CUDA
  void fused_step();
#endif

  // PyTorch creates a parameter's state at its first update, so a parameter
  // that never had a gradient has no entry in state_dict(); `step` stays
  // undefined until then.
  struct ParamState {
    // A float32 scalar, on the CPU as PyTorch keeps it, or on the
    // parameter's GPU, where the fused kernel counts it.
    at::Tensor step;
    at::Tensor exp_avg;
    at::Tensor exp_avg_sq;
  };

  std::vector<at::Tensor> parameters_;
  std::vector<ParamState> state_;
  AdamOptions options_;
  // The fused kernels read lr from here (a float64 scalar on the GPU), so a
  // new lr is an asynchronous fill, not a kernel argument.
  at::Tensor lr_on_device_;
  double lr_on_device_value_ = 0.0;
  bool fused_last_ = false;  // whether the last step() took the fused path
};

}  // namespace deepcam::optimizers
