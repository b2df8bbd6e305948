// The entry point of libdeepcam_optimizer_adamw.so: the parameter schema and
// the factory of deepcam::optimizers::AdamW (see adamw.hpp).
#include <memory>

#include "adamw.hpp"
#include "deepcam/plugin.hpp"

namespace {

// Exclusive bounds (lr > 0, betas < 1) and the length of betas are checked by
// AdamOptions::from: the schema's bounds are inclusive.
const deepcam::ParamSpec kParams[] = {
    {"lr", deepcam::ParamType::Float, "1e-3", "learning rate (> 0)", 0.0, 1e9},
    {"betas", deepcam::ParamType::FloatList, "[0.9, 0.999]",
     "[beta1, beta2]: decay rates of the gradient's running mean and mean square, each in [0, 1)",
     0.0, 1.0},
    {"weight_decay", deepcam::ParamType::Float, "1e-2",
     "decoupled weight decay: each step multiplies the parameters by 1 - lr * weight_decay", 0.0, 1e9},
};

std::unique_ptr<deepcam::Optimizer> make(const deepcam::Params& params,
                                         const deepcam::OptimizerContext& context) {
  return std::make_unique<deepcam::optimizers::AdamW>(context.parameters,
                                                      deepcam::optimizers::AdamOptions::from(params));
}

}  // namespace

DEEPCAM_OPTIMIZER_PLUGIN("adamw", "1.0.0", "AdamW: Adam with decoupled weight decay (PyTorch torch.optim.AdamW)",
                         kParams, make)
