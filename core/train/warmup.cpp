#include "deepcam/warmup.hpp"

#include <limits>
#include <string>

#include <fmt/format.h>

#include "deepcam/error.hpp"
#include "deepcam/mlperf_log.hpp"
#include "deepcam/params.hpp"

namespace deepcam {

Warmup read_warmup(const Params& params) {
  Warmup warmup;
  warmup.steps = params.integer("lr_warmup_steps");
  if (warmup.steps < 0) {
    throw Error(params.setting("lr_warmup_steps") + ": must be >= 0");
  }
  warmup.factor = params.number("lr_warmup_factor");
  if (!(warmup.factor >= 1.0)) {
    throw Error(params.setting("lr_warmup_factor") + ": must be >= 1");
  }
  // A factor without a warm-up would change nothing, yet the MLPerf log
  // would record it as the schedule's.
  if (warmup.steps == 0 && warmup.factor != 1.0) {
    throw Error(params.setting("lr_warmup_factor") +
                ": has no effect without a warm-up (lr_warmup_steps = 0); set lr_warmup_steps above 0, or "
                "leave lr_warmup_factor at 1");
  }
  return warmup;
}

void check_warmup_peak(const Params& params, double base_lr) {
  const double factor = params.number("lr_warmup_factor");
  if (!(base_lr * factor <= std::numeric_limits<float>::max())) {
    throw Error(fmt::format("{}: the warm-up would climb towards [optimizer] lr x lr_warmup_factor = {} x {}, "
                            "beyond float32's largest number {} (the optimizers take the rate as float32); lower "
                            "lr_warmup_factor or lr",
                            params.setting("lr_warmup_factor"), base_lr, factor,
                            static_cast<double>(std::numeric_limits<float>::max())));
  }
}

double warmup_lr(double base_lr, const Warmup& warmup, std::int64_t step) {
  const double s = static_cast<double>(step);
  const double slope = 1.0 / static_cast<double>(warmup.steps);
  if (warmup.factor == 1.0) return base_lr * (s * slope);
  return base_lr * ((warmup.factor - 1.0) * s * slope + 1.0);
}

void log_warmup(MlperfLog& log, const Warmup& warmup) {
  log.event("scheduler_lr_warmup_steps", warmup.steps);
  log.event("scheduler_lr_warmup_factor", warmup.factor);
}

}  // namespace deepcam
