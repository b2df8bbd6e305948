#include "closed_division.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <string>
#include <vector>

namespace deepcam {

namespace {

// The reference network's input: the 16 channels of the CAM5 data set.
constexpr std::int64_t kInputChannels = 16;

}  // namespace

std::vector<std::string> closed_division_gaps(const RunConfig& cfg, std::int64_t train_samples,
                                              std::int64_t eval_samples) {
  std::vector<std::string> gaps;
  const PluginChoice& model = cfg.model;
  if (model.name != "deeplabv3plus") {
    gaps.push_back(fmt::format("{}: model \"{}\" (closed: deeplabv3plus, the reference network)",
                               model.params.where(), model.name));
  } else {
    if (model.params.number("width") != 1.0) {
      gaps.push_back(fmt::format("{} (closed: 1.0, the reference network's channel counts)",
                                 model.params.setting("width")));
    }
    if (model.params.integer("middle_blocks") != 16) {
      gaps.push_back(fmt::format("{} (closed: 16, the reference network's depth)",
                                 model.params.setting("middle_blocks")));
    }
    if (model.params.integer("output_stride") != 16) {
      gaps.push_back(fmt::format("{} (closed: 16, the reference network's encoder)",
                                 model.params.setting("output_stride")));
    }
  }
  const std::vector<std::int64_t>& channels = cfg.data.integers("channels");
  bool all_channels = static_cast<std::int64_t>(channels.size()) == kInputChannels;
  for (std::size_t i = 0; all_channels && i < channels.size(); ++i) {
    all_channels = channels[i] == static_cast<std::int64_t>(i);
  }
  if (!all_channels) {
    gaps.push_back(fmt::format("{} selects {} channels (closed: all 16, in order)", cfg.data.where("channels"),
                               channels.size()));
  }
  const std::vector<std::string> optimizers = {"adam", "adamw", "lamb"};
  const PluginChoice& opt = cfg.optimizer;
  if (std::find(optimizers.begin(), optimizers.end(), opt.name) == optimizers.end()) {
    gaps.push_back(fmt::format("{}: optimizer \"{}\" (closed: lamb, adam or adamw)", opt.params.where(), opt.name));
  } else if (opt.name == "lamb" && opt.params.number("max_grad_norm") != 1.0) {
    gaps.push_back(fmt::format("{} (closed: 1.0)", opt.params.setting("max_grad_norm")));
  }
  const PluginChoice& sched = cfg.scheduler;
  if (sched.name != "multistep" && sched.name != "cosine_annealing") {
    gaps.push_back(fmt::format("{}: scheduler \"{}\" (closed: multistep or cosine_annealing)", sched.params.where(),
                               sched.name));
  }
  if (cfg.run.number("target_iou") != kBenchmarkTargetIou) {
    gaps.push_back(fmt::format("{} (closed: {})", cfg.run.setting("target_iou"), kBenchmarkTargetIou));
  }
  if (train_samples != kClosedTrainSamples || eval_samples != kClosedEvalSamples) {
    gaps.push_back(fmt::format("{}: {} training and {} validation samples (closed: the full data set, {} and {})",
                               cfg.data.where("root"), train_samples, eval_samples, kClosedTrainSamples,
                               kClosedEvalSamples));
  }
  return gaps;
}

}  // namespace deepcam
