// The entry point of libdeepcam_scheduler_multistep.so: the parameter schema
// and the factory of deepcam::schedulers::Multistep (see multistep.hpp).
#include <memory>
#include <utility>

#include "deepcam/plugin.hpp"
#include "multistep.hpp"

namespace {

// The schema states every bound as the host checks it; MultistepOptions::from
// checks them again for code that builds the options itself.
const deepcam::ParamSpec kParams[] = {
    {"milestones", deepcam::ParamType::IntList, "[]",
     "optimizer steps at which the LR is multiplied by decay_rate (after warmup: + W + 1)", 0.0,
     deepcam::kUnbounded},
    {"decay_rate", deepcam::ParamType::Float, "0.1", "factor applied at each milestone", 0.0, 1.0,
     nullptr, /*min_open=*/true},
    {"lr_warmup_steps", deepcam::ParamType::Int, "0", "linear warmup length in optimizer steps", 0.0,
     deepcam::kUnbounded},
    {"lr_warmup_factor", deepcam::ParamType::Float, "1.0",
     "warmup goes from L (or 0 when 1) towards L * factor", 1.0, deepcam::kUnbounded},
};

std::unique_ptr<deepcam::Scheduler> make(const deepcam::Params& params,
                                         const deepcam::SchedulerContext& context) {
  deepcam::schedulers::MultistepOptions options = deepcam::schedulers::MultistepOptions::from(params);
  deepcam::check_warmup_peak(params, context.base_lr);
  return std::make_unique<deepcam::schedulers::Multistep>(context.base_lr, std::move(options));
}

}  // namespace

DEEPCAM_SCHEDULER_PLUGIN("multistep", "1.0.0",
                         "step decay at milestones with optional linear warmup (SPEC 6.1, 6.3)",
                         kParams, make)
