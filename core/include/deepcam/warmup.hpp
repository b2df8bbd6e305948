// The linear learning-rate warmup in front of every schedule (SPEC 6.3), as
// the reference's GradualWarmupScheduler computes it: one definition for all
// scheduler plugins, so that a warmup means the same whatever follows it.
#pragma once

#include <cstdint>

#include "deepcam/export.hpp"

namespace deepcam {

class MlperfLog;
class Params;

struct Warmup {
  std::int64_t steps = 0;  // W; 0: no warmup
  double factor = 1.0;     // F
};

// Reads `lr_warmup_steps` (>= 0) and `lr_warmup_factor` (>= 1) from a
// scheduler's table; errors name params.where() and the key.
DEEPCAM_API Warmup read_warmup(const Params& params);

// Refuses a warm-up whose top, the optimizer's rate times lr_warmup_factor,
// is beyond float32's range, where the optimizers take the rate: each key
// within its own bounds, their product could still overflow once training
// has begun. The error names params.where("lr_warmup_factor") and the rate.
DEEPCAM_API void check_warmup_peak(const Params& params, double base_lr);

// The LR of optimizer step `step` < W from the start LR L: L * s / W when
// F = 1 (the first step uses LR 0), else L * ((F - 1) s / W + 1), computed
// as the reference computes it (s times the slope 1 / W, in its operand
// order), so that the values are its values to the bit.
// A schedule goes on from warmup_lr(L, w, W - 1), never reaching L * F.
DEEPCAM_API double warmup_lr(double base_lr, const Warmup& warmup, std::int64_t step);

// scheduler_lr_warmup_steps and scheduler_lr_warmup_factor (SPEC 6.4).
DEEPCAM_API void log_warmup(MlperfLog& log, const Warmup& warmup);

}  // namespace deepcam
