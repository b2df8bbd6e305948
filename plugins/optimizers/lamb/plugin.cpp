// The entry point of libdeepcam_optimizer_lamb.so: the parameter schema and
// the factory of deepcam::optimizers::Lamb (see lamb.hpp).
#include <memory>

#include "deepcam/plugin.hpp"
#include "lamb.hpp"

namespace {

// Exclusive bounds (lr > 0, betas < 1, max_grad_norm > 0) and the length of
// betas are checked by LambOptions::from: the schema's bounds are inclusive.
const deepcam::ParamSpec kParams[] = {
    {"lr", deepcam::ParamType::Float, "1e-3", "learning rate (> 0)", 0.0, 1e9},
    {"betas", deepcam::ParamType::FloatList, "[0.9, 0.999]",
     "[beta1, beta2]: decay rates of the gradient's running mean and mean square, each in [0, 1)", 0.0, 1.0},
    {"weight_decay", deepcam::ParamType::Float, "1e-2",
     "decoupled weight decay, added to the update inside the layer-wise trust ratio", 0.0, 1e9},
    {"max_grad_norm", deepcam::ParamType::Float, "1.0",
     "gradients are scaled down when their global L2 norm exceeds this (> 0; closed division: 1.0)", 0.0, 1e9},
};

std::unique_ptr<deepcam::Optimizer> make(const deepcam::Params& params,
                                         const deepcam::OptimizerContext& context) {
  return std::make_unique<deepcam::optimizers::Lamb>(context.parameters,
                                                     deepcam::optimizers::LambOptions::from(params));
}

}  // namespace

DEEPCAM_OPTIMIZER_PLUGIN("lamb", "1.0.0", "LAMB as NVIDIA APEX FusedLAMB (layer-wise trust ratio, global clipping)",
                         kParams, make)
