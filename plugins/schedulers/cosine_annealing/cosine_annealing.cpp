#include "cosine_annealing.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "deepcam/error.hpp"
#include "deepcam/mlperf_log.hpp"
#include "deepcam/warmup.hpp"

namespace deepcam::schedulers {

namespace {
constexpr double kPi = 3.141592653589793;  // Python's math.pi
}

CosineAnnealingOptions CosineAnnealingOptions::from(const Params& params) {
  CosineAnnealingOptions options;
  options.t_max = params.integer("t_max");
  if (options.t_max < 1) {
    throw Error(params.setting("t_max") + ": must be >= 1 (optimizer steps from the top of the cosine to its bottom)");
  }
  options.eta_min = params.number("eta_min");
  if (!(options.eta_min >= 0.0)) {
    throw Error(params.setting("eta_min") + ": must be >= 0");
  }
  const Warmup warmup = read_warmup(params);
  options.lr_warmup_steps = warmup.steps;
  options.lr_warmup_factor = warmup.factor;
  return options;
}

CosineAnnealing::CosineAnnealing(double base_lr, CosineAnnealingOptions options)
    : base_lr_(base_lr), options_(std::move(options)) {
  if (options_.t_max < 1) {
    throw Error("cosine_annealing scheduler: t_max = " + std::to_string(options_.t_max) + ": must be >= 1");
  }
  // The recursion starts from the LR the warmup ends with, or from L.
  lr_ = options_.lr_warmup_steps > 0 ? warmup_lr(base_lr_, warmup_setting(), options_.lr_warmup_steps - 1) : base_lr_;
  saved_.push_back(lr_);
}

// CosineAnnealingLR.get_lr of PyTorch 2.x, operand order included. At
// e = T_max + 1 (mod 2 T_max) the ratio below would divide by
// 1 + cos(pi) = 0, so PyTorch adds the increment instead.
double CosineAnnealing::next(std::int64_t e, double lr) const {
  const double t = static_cast<double>(options_.t_max);
  const double eta = options_.eta_min;
  if ((e - 1 - options_.t_max) % (2 * options_.t_max) == 0) {
    return lr + (base_lr_ - eta) * (1 - std::cos(kPi / t)) / 2;
  }
  return (1 + std::cos(kPi * static_cast<double>(e) / t)) / (1 + std::cos(kPi * static_cast<double>(e - 1) / t)) *
             (lr - eta) +
         eta;
}

double CosineAnnealing::lr_at(std::int64_t step) {
  if (step < 0) {
    throw Error("cosine_annealing scheduler: lr_at(" + std::to_string(step) + "): steps count from 0");
  }
  const std::int64_t warmup = options_.lr_warmup_steps;
  if (warmup > 0 && step < warmup) return warmup_lr(base_lr_, warmup_setting(), step);
  const std::int64_t e = step - warmup;
  // Restart from the nearest saved point at or below e when that is closer
  // than where the recursion stands (always, for an earlier step).
  const std::int64_t k = std::min<std::int64_t>(e / kEvery, static_cast<std::int64_t>(saved_.size()) - 1);
  if (e < e_ || k * kEvery > e_) {
    e_ = k * kEvery;
    lr_ = saved_[static_cast<std::size_t>(k)];
  }
  while (e_ < e) {
    ++e_;
    lr_ = next(e_, lr_);
    if (e_ % kEvery == 0 && e_ / kEvery == static_cast<std::int64_t>(saved_.size())) saved_.push_back(lr_);
  }
  return lr_;
}

void CosineAnnealing::log_hyperparameters(MlperfLog& log) const {
  log.event("scheduler_type", "cosine_annealing");
  log.event("scheduler_t_max", options_.t_max);
  log.event("scheduler_eta_min", options_.eta_min);
  log_warmup(log, warmup_setting());
}

}  // namespace deepcam::schedulers
