// The entry point of libdeepcam_scheduler_cosine_annealing.so: the parameter
// schema and the factory of deepcam::schedulers::CosineAnnealing (see
// cosine_annealing.hpp).
#include <limits>
#include <memory>
#include <utility>

#include "cosine_annealing.hpp"
#include "deepcam/plugin.hpp"

namespace {

// The optimizers take the learning rate as float32 (as [optimizer] lr's bound).
constexpr double kFloat32Max = std::numeric_limits<float>::max();

// t_max has no default: the reference has none either, and any value is a
// choice tied to the run's length in steps.
const deepcam::ParamSpec kParams[] = {
    {"t_max", deepcam::ParamType::Int, nullptr,
     "optimizer steps (after warmup) from the start LR down to eta_min; the LR climbs back after", 1.0,
     deepcam::kUnbounded},
    {"eta_min", deepcam::ParamType::Float, "0.0",
     "the LR the cosine ends at (one above the start LR makes it rise, as in PyTorch)", 0.0, kFloat32Max},
    {"lr_warmup_steps", deepcam::ParamType::Int, "0", "linear warmup length in optimizer steps", 0.0,
     deepcam::kUnbounded},
    {"lr_warmup_factor", deepcam::ParamType::Float, "1.0",
     "warmup goes from L (or 0 when 1) towards L * factor", 1.0, deepcam::kUnbounded},
};

std::unique_ptr<deepcam::Scheduler> make(const deepcam::Params& params,
                                         const deepcam::SchedulerContext& context) {
  deepcam::schedulers::CosineAnnealingOptions options = deepcam::schedulers::CosineAnnealingOptions::from(params);
  deepcam::check_warmup_peak(params, context.base_lr);
  return std::make_unique<deepcam::schedulers::CosineAnnealing>(context.base_lr, std::move(options));
}

}  // namespace

DEEPCAM_SCHEDULER_PLUGIN("cosine_annealing", "1.0.0",
                         "cosine annealing (PyTorch's recursive CosineAnnealingLR) with optional linear "
                         "warmup (SPEC 6.2, 6.3)",
                         kParams, make)
