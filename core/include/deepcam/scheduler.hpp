// The learning-rate schedule: the LR of every optimizer step (SPEC 6), as a
// function of the step, so that resuming needs only the step count.
#pragma once

#include <cstdint>

#include "deepcam/export.hpp"

namespace deepcam {

class MlperfLog;

struct SchedulerContext {
  double base_lr;  // the optimizer's configured learning rate
};

class DEEPCAM_API Scheduler {
 public:
  virtual ~Scheduler();
  // The LR used by optimizer step `step` (0, 1, ...).
  virtual double lr_at(std::int64_t step) = 0;
  // The scheduler_* keys of SPEC 6.4.
  virtual void log_hyperparameters(MlperfLog& log) const = 0;
};

}  // namespace deepcam
