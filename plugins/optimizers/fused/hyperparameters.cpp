#include "hyperparameters.hpp"

#include <string>
#include <vector>

#include "deepcam/error.hpp"

namespace deepcam::fused {

Hyperparameters read_hyperparameters(const Params& params) {
  Hyperparameters h{};
  h.lr = params.number("lr");
  if (!positive(h.lr)) {
    throw Error(params.setting("lr") + ": must be > 0");
  }
  const std::vector<double>& betas = params.numbers("betas");
  if (betas.size() != 2) {
    throw Error(params.where("betas") + " has " + std::to_string(betas.size()) +
                " values: give two, e.g. betas = [0.9, 0.999]");
  }
  for (double beta : betas) {
    if (!beta_in_range(beta)) {
      throw Error(params.setting("betas") + ": each must be in [0, 1)");
    }
  }
  h.beta1 = betas[0];
  h.beta2 = betas[1];
  h.weight_decay = params.number("weight_decay");
  if (!non_negative(h.weight_decay)) {
    throw Error(params.setting("weight_decay") + ": must be >= 0");
  }
  return h;
}

}  // namespace deepcam::fused
