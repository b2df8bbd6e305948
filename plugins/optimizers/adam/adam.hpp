// Description
//   Adam with L2 weight decay (SPEC 5.1): PyTorch's torch.optim.Adam with
//   weight decay added to the gradient (not decoupled), amsgrad off. Written
//   as plain tensor code in the operation order of PyTorch's single-tensor
//   Adam, so that its updates equal PyTorch's to the last float32 bit, and
//   its state_dict() has PyTorch's layout so that checkpoints travel both ways.
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

namespace deepcam::optimizers {

struct AdamOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double weight_decay = 1e-6;

  // Checks what the schema cannot express (exclusive bounds, list length);
  // errors name params.where() and the key.
  static AdamOptions from(const Params& params);
};

class Adam final : public Optimizer {
 public:
  static constexpr double kEps = 1e-6;

  Adam(std::vector<at::Tensor> parameters, const AdamOptions& options);

  void step() override;
  void zero_grad() override;
  void set_lr(double lr) override { options_.lr = lr; }
  double lr() const override { return options_.lr; }
  void log_hyperparameters(MlperfLog& log) const override;
  c10::IValue state_dict() const override;
  void load_state_dict(const c10::IValue& state) override;

  const AdamOptions& options() const { return options_; }

 private:
  // PyTorch creates a parameter's state at its first update, so a parameter
  // that never had a gradient has no entry in state_dict(); `step` stays
  // undefined until then.
  struct ParamState {
    at::Tensor step;  // float32 scalar on the CPU, as PyTorch keeps it
    at::Tensor exp_avg;
    at::Tensor exp_avg_sq;
  };

  std::vector<at::Tensor> parameters_;
  std::vector<ParamState> state_;
  AdamOptions options_;
};

}  // namespace deepcam::optimizers
