// The entry point of libdeepcam_optimizer_sgd.so: the parameter schema and
// the factory of deepcam::optimizers::Sgd (see sgd.hpp).
#include <memory>

#include "deepcam/plugin.hpp"
#include "sgd.hpp"

namespace {

// The Nesterov condition (momentum > 0, dampening = 0) spans two keys and is
// checked by SgdOptions::from. dampening is unbounded, as in PyTorch.
const deepcam::ParamSpec kParams[] = {
    {"lr", deepcam::ParamType::Float, "1e-3", "learning rate (>= 0)", 0.0, deepcam::kUnbounded},
    {"momentum", deepcam::ParamType::Float, "0.0", "momentum factor (0: plain SGD)", 0.0, deepcam::kUnbounded},
    {"dampening", deepcam::ParamType::Float, "0.0",
     "dampening of the momentum, from the second step on: buf = momentum * buf + (1 - dampening) * grad"},
    {"weight_decay", deepcam::ParamType::Float, "0.0", "L2 penalty added to the gradient", 0.0, deepcam::kUnbounded},
    {"nesterov", deepcam::ParamType::Bool, "false",
     "Nesterov momentum (needs momentum > 0 and dampening = 0)"},
};

std::unique_ptr<deepcam::Optimizer> make(const deepcam::Params& params,
                                         const deepcam::OptimizerContext& context) {
  return std::make_unique<deepcam::optimizers::Sgd>(context.parameters,
                                                    deepcam::optimizers::SgdOptions::from(params));
}

}  // namespace

DEEPCAM_OPTIMIZER_PLUGIN("sgd", "1.0.0",
                         "SGD with momentum, dampening, Nesterov and weight decay (PyTorch torch.optim.SGD)",
                         kParams, make)
