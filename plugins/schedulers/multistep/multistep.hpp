// Description
//   Step decay of the learning rate (SPEC 6.1, 6.3): the LR is multiplied by
//   decay_rate at each milestone, optionally after a linear warmup. It gives
//   the LR of the reference's GradualWarmupScheduler + MultiStepLR pair, to
//   the last bit: the decays are applied one after another, as PyTorch does,
//   not as a power.
//
//   Without warmup, step s uses L * r^k, k = the number of milestones <= s.
//   With W warmup steps, step s < W uses L * s / W (F = 1) or
//   L * ((F - 1) s / W + 1); from W on the LR stays at the value of step
//   W - 1, and is multiplied by r at s = m + W + 1 for each milestone m.
//
// Usage
//   [scheduler]
//   name = "multistep"
//   milestones = [8192, 16384]
//   decay_rate = 0.1
//   lr_warmup_steps = 400
//   lr_warmup_factor = 1.0
//
// Parameters
//   Property         | Description                                | Required | Default
//   milestones       | optimizer steps of the decays, each >= 0   | no       | []
//   decay_rate       | factor r applied at a milestone, in (0, 1] | no       | 0.1
//   lr_warmup_steps  | warmup length W in optimizer steps, >= 0   | no       | 0
//   lr_warmup_factor | F: warmup ends near L * F, >= 1            | no       | 1.0
//   The start LR L is the optimizer's lr.
#pragma once

#include <cstdint>
#include <vector>

#include "deepcam/params.hpp"
#include "deepcam/scheduler.hpp"
#include "deepcam/warmup.hpp"

namespace deepcam::schedulers {

struct MultistepOptions {
  std::vector<std::int64_t> milestones;
  double decay_rate = 0.1;
  std::int64_t lr_warmup_steps = 0;
  double lr_warmup_factor = 1.0;

  // Checks what the schema cannot express (decay_rate > 0); errors name
  // params.where() and the key.
  static MultistepOptions from(const Params& params);
};

class Multistep final : public Scheduler {
 public:
  Multistep(double base_lr, MultistepOptions options);

  double lr_at(std::int64_t step) override;
  void log_hyperparameters(MlperfLog& log) const override;

 private:
  Warmup warmup_setting() const { return {options_.lr_warmup_steps, options_.lr_warmup_factor}; }

  double base_lr_;
  MultistepOptions options_;
  // The distinct milestones, ascending, with how often each is listed:
  // PyTorch multiplies by r^count at a repeated milestone.
  std::vector<std::pair<std::int64_t, int>> decays_;
};

}  // namespace deepcam::schedulers
