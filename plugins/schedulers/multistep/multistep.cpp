#include "multistep.hpp"

#include <cmath>
#include <map>
#include <string>
#include <utility>

#include "deepcam/error.hpp"
#include "deepcam/mlperf_log.hpp"
#include "deepcam/warmup.hpp"

namespace deepcam::schedulers {

MultistepOptions MultistepOptions::from(const Params& params) {
  MultistepOptions options;
  options.milestones = params.integers("milestones");
  for (std::int64_t milestone : options.milestones) {
    if (milestone < 0) {
      throw Error(params.where("milestones") + " contains " + std::to_string(milestone) +
                  ": milestones are optimizer steps, each >= 0");
    }
  }
  options.decay_rate = params.number("decay_rate");
  if (!(options.decay_rate > 0.0 && options.decay_rate <= 1.0)) {
    throw Error(params.setting("decay_rate") + ": must be in (0, 1]");
  }
  const Warmup warmup = read_warmup(params);
  options.lr_warmup_steps = warmup.steps;
  options.lr_warmup_factor = warmup.factor;
  return options;
}

Multistep::Multistep(double base_lr, MultistepOptions options)
    : base_lr_(base_lr), options_(std::move(options)) {
  std::map<std::int64_t, int> counts;
  for (std::int64_t milestone : options_.milestones) ++counts[milestone];
  decays_.assign(counts.begin(), counts.end());
}

double Multistep::lr_at(std::int64_t step) {
  if (step < 0) throw Error("multistep scheduler: lr_at(" + std::to_string(step) + "): steps count from 0");
  const std::int64_t warmup = options_.lr_warmup_steps;
  if (warmup > 0 && step < warmup) return warmup_lr(base_lr_, warmup_setting(), step);
  // After warmup, MultiStepLR starts from the last warmup LR and counts its
  // own steps from W + 1 (the reference steps it once on the handover).
  double lr = warmup > 0 ? warmup_lr(base_lr_, warmup_setting(), warmup - 1) : base_lr_;
  const std::int64_t decay_step = warmup > 0 ? step - warmup - 1 : step;
  for (const auto& [milestone, count] : decays_) {
    if (milestone > decay_step) break;
    lr = lr * std::pow(options_.decay_rate, count);
  }
  return lr;
}

void Multistep::log_hyperparameters(MlperfLog& log) const {
  std::vector<Json> milestones(options_.milestones.begin(), options_.milestones.end());
  log.event("scheduler_type", "multistep");
  log.event("scheduler_milestones", Json::list(std::move(milestones)));
  log.event("scheduler_decay_rate", options_.decay_rate);
  log_warmup(log, warmup_setting());
}

}  // namespace deepcam::schedulers
