// The entry point of libdeepcam_optimizer_lamb.so: the parameter schema and
// the factory of deepcam::optimizers::Lamb (see lamb.hpp).
#include <limits>
#include <memory>

#include "deepcam/plugin.hpp"
#include "lamb.hpp"

namespace {

// The fused kernels take the learning rate and weight decay as float32: a
// larger value could not be converted (it failed as an internal error once
// training had begun).
constexpr double kFloat32Max = std::numeric_limits<float>::max();

// The schema states every bound as the host checks it (with the file and
// line, or the --set, that gave the value); LambOptions::from checks them
// again for code that builds the options itself, and checks what a schema
// cannot say: that betas has two values.
const deepcam::ParamSpec kParams[] = {
    {"lr", deepcam::ParamType::Float, "1e-3", "learning rate", 0.0, kFloat32Max, nullptr,
     /*min_open=*/true},
    {"betas", deepcam::ParamType::FloatList, "[0.9, 0.999]",
     "[beta1, beta2]: decay rates of the gradient's running mean and mean square, each in [0, 1)", 0.0, 1.0,
     nullptr, /*min_open=*/false, /*max_open=*/true},
    {"weight_decay", deepcam::ParamType::Float, "1e-2",
     "decoupled weight decay, added to the update inside the layer-wise trust ratio", 0.0, kFloat32Max},
    {"max_grad_norm", deepcam::ParamType::Float, "1.0",
     "gradients are scaled down when their global L2 norm exceeds this (closed division: 1.0)", 0.0,
     deepcam::kUnbounded, nullptr, /*min_open=*/true},
};

std::unique_ptr<deepcam::Optimizer> make(const deepcam::Params& params,
                                         const deepcam::OptimizerContext& context) {
  return std::make_unique<deepcam::optimizers::Lamb>(context.parameters,
                                                     deepcam::optimizers::LambOptions::from(params));
}

}  // namespace

DEEPCAM_OPTIMIZER_PLUGIN("lamb", "1.0.0", "LAMB as NVIDIA APEX FusedLAMB (layer-wise trust ratio, global clipping)",
                         kParams, make)
