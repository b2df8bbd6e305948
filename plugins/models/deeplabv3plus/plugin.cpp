// Entry point of libdeepcam_model_deeplabv3plus.so: the parameter schema and
// the factory the host calls after checking the [model] table against it.
#include "deepcam/plugin.hpp"

#include <memory>

#include "deeplabv3plus.hpp"

namespace {

// The schema states every bound as the host checks it; output_stride's two
// allowed values, which a range cannot say, are checked in
// DeepLabV3PlusOptions::from (with the bounds again, for code that builds the
// options itself).
const deepcam::ParamSpec kParams[] = {
    {"width", deepcam::ParamType::Float, "1.0",
     "factor on every internal channel count (rounded, at least 1); names and layers unchanged", 0.0, 1.0, nullptr,
     /*min_open=*/true},
    {"middle_blocks", deepcam::ParamType::Int, "16",
     "middle-flow blocks block4..block(3+n); the exit block is block(4+n)", 1.0, 16.0},
    {"output_stride", deepcam::ParamType::Int, "16",
     "encoder output stride: 16, or 8 for the dilated variant (input H, W multiples of it)", 8.0,
     16.0},
};

std::unique_ptr<deepcam::Model> make(const deepcam::Params& params,
                                     const deepcam::ModelContext& context) {
  return std::make_unique<deepcam::models::DeepLabV3Plus>(
      deepcam::models::DeepLabV3PlusOptions::from(params, context));
}

}  // namespace

DEEPCAM_MODEL_PLUGIN("deeplabv3plus", "1.0.0",
                     "DeepLabv3+ with a modified aligned-Xception encoder (reference layout)",
                     kParams, make)
