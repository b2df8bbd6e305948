// Description
//   Cosine annealing of the learning rate (SPEC 6.2, 6.3), optionally after a
//   linear warmup: the LR of the reference's GradualWarmupScheduler +
//   torch.optim.lr_scheduler.CosineAnnealingLR pair, to the last bit.
//
//   PyTorch computes the cosine LR recursively, each step from the previous
//   LR, and keeps doing so past T_max (the LR then climbs back up, with
//   period 2 T_max). The closed form eta_min + (L - eta_min)(1 + cos(pi e /
//   T_max)) / 2 differs from it in the last bits, and after a warmup (which
//   hands over a start value other than L) it differs outright. So this class
//   runs the recursion itself and remembers where it is, which keeps lr_at a
//   function of the step alone, as resuming needs.
//
//   Without warmup, step s uses the recursion at e = s from L. With W warmup
//   steps, step s < W uses L * s / W (F = 1) or L * ((F - 1) s / W + 1); from
//   W on the recursion runs at e = s - W, starting from the LR of step W - 1
//   (unchanged at s = W), with L as its base LR.
//
// Usage
//   [scheduler]
//   name = "cosine_annealing"
//   t_max = 4000
//   eta_min = 0.0
//   lr_warmup_steps = 400
//   lr_warmup_factor = 1.0
//
// Parameters
//   Property         | Description                                   | Required | Default
//   t_max            | half period T_max in optimizer steps, >= 1    | yes      | -
//   eta_min          | the LR at the bottom of the cosine, >= 0      | no       | 0.0
//   lr_warmup_steps  | warmup length W in optimizer steps, >= 0      | no       | 0
//   lr_warmup_factor | F: warmup ends near L * F, >= 1               | no       | 1.0
//   The start LR L is the optimizer's lr.
#pragma once

#include <cstdint>
#include <vector>

#include "deepcam/params.hpp"
#include "deepcam/scheduler.hpp"
#include "deepcam/warmup.hpp"

namespace deepcam::schedulers {

struct CosineAnnealingOptions {
  std::int64_t t_max = 1;
  double eta_min = 0.0;
  std::int64_t lr_warmup_steps = 0;
  double lr_warmup_factor = 1.0;

  // Checks the bounds again (the options may come from elsewhere than the
  // schema); errors name params.where() and the key.
  static CosineAnnealingOptions from(const Params& params);
};

class CosineAnnealing final : public Scheduler {
 public:
  CosineAnnealing(double base_lr, CosineAnnealingOptions options);

  double lr_at(std::int64_t step) override;
  void log_hyperparameters(MlperfLog& log) const override;

 private:
  Warmup warmup_setting() const { return {options_.lr_warmup_steps, options_.lr_warmup_factor}; }
  // One step of PyTorch's recursion: the LR of cosine step e from that of e - 1.
  double next(std::int64_t e, double lr) const;

  double base_lr_;
  CosineAnnealingOptions options_;
  // Where the recursion stands: cosine step e_ (s - W) has LR lr_. Training
  // asks for steps in order, so each call costs one update at most.
  std::int64_t e_ = 0;
  double lr_ = 0.0;
  // The LR of every kEvery-th cosine step seen so far, so that an earlier
  // step (a second run of the same object, a test) restarts from the nearest
  // one below it instead of from 0, with memory of 8 bytes per kEvery steps.
  static constexpr std::int64_t kEvery = 1024;
  std::vector<double> saved_;
};

}  // namespace deepcam::schedulers
