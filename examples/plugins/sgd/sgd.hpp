// Description
//   SGD with momentum, dampening, Nesterov momentum and L2 weight decay:
//   PyTorch's torch.optim.SGD (maximize off). Written as plain tensor code in
//   the operation order of PyTorch's single-tensor SGD, so that its updates
//   equal PyTorch's bit for bit, and its state_dict() has PyTorch's layout
//   (state[i]["momentum_buffer"]) so that checkpoints travel both ways.
//   An example of a plugin built outside the deepcam-host tree against the
//   installed SDK (pkg-config deepcam-plugin); see ../README.md.
//
// Usage
//   [optimizer]
//   name = "sgd"
//   library = "/path/to/libdeepcam_optimizer_sgd.so"   # or DEEPCAM_PLUGIN_PATH
//   lr = 0.01
//   momentum = 0.9
//   nesterov = true
//   weight_decay = 1e-4
//
// Parameters
//   Property     | Description                                   | Required | Default
//   lr           | learning rate, >= 0                           | no       | 1e-3
//   momentum     | momentum factor, >= 0 (0: plain SGD)          | no       | 0
//   dampening    | dampening of the momentum, applied from the   | no       | 0
//                | second step on (PyTorch does not bound it)    |          |
//   weight_decay | L2 penalty added to the grad, >= 0            | no       | 0
//   nesterov     | Nesterov momentum; needs momentum > 0 and     | no       | false
//                | dampening = 0                                 |          |
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <vector>

#include "deepcam/optimizer.hpp"
#include "deepcam/params.hpp"

namespace deepcam::optimizers {

struct SgdOptions {
  double lr = 1e-3;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;

  // Checks what the schema cannot express (the Nesterov condition) with
  // PyTorch's rules; errors name params.where(key): the file, line and key.
  static SgdOptions from(const Params& params);
  // The same checks on options from elsewhere (a loaded state_dict);
  // `where(key)` starts the message about that key.
  void check(const std::function<std::string(const std::string& key)>& where) const;
};

class Sgd final : public Optimizer {
 public:
  Sgd(std::vector<at::Tensor> parameters, const SgdOptions& options);

  void step() override;
  void zero_grad() override;
  void set_lr(double lr) override { options_.lr = lr; }
  double lr() const override { return options_.lr; }
  void log_hyperparameters(MlperfLog& log) const override;
  c10::IValue state_dict() const override;
  void load_state_dict(const c10::IValue& state) override;
  // SGD never needs the global norm: the engine computes it for its watch.
  at::Tensor gradient_norm() const override { return at::Tensor(); }
  // Plain tensor code with host scalars: not for CUDA graphs.
  bool capturable() const override { return false; }
  void replayed() override {}

  const SgdOptions& options() const { return options_; }

 private:
  std::vector<at::Tensor> parameters_;
  // PyTorch creates a parameter's buffer at its first update with momentum,
  // from that step's gradient; undefined until then, and then absent from
  // state_dict().
  std::vector<at::Tensor> momentum_buffers_;
  SgdOptions options_;
};

}  // namespace deepcam::optimizers
