// What keeps a run from being a closed-division DeepCAM submission (MLPerf
// HPC rules, as the official checker's closed_deepcam*.yaml enforce them and
// as the reference model is defined): checked at the start of a run whose
// [mlperf] division is "closed", so that a user learns it before hours of
// training rather than from the checker afterwards.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "deepcam/config.hpp"

namespace deepcam {

// The benchmark's quality target, in both divisions: the checker wants an
// eval_accuracy of at least this (open_deepcam.yaml and closed_deepcam.yaml).
inline constexpr double kBenchmarkTargetIou = 0.82;

// The full CAM5 data set, which the closed division's checker wants as the
// logged train_samples and eval_samples (closed_deepcam.yaml).
inline constexpr std::int64_t kClosedTrainSamples = 121266;
inline constexpr std::int64_t kClosedEvalSamples = 15158;

// One line per departure, each naming the key and its closed value, e.g.
// "run.toml:12 [model] width = 0.25 (closed: 1.0, the reference network)".
// Empty for a run that may be closed.
std::vector<std::string> closed_division_gaps(const RunConfig& cfg, std::int64_t train_samples,
                                              std::int64_t eval_samples);

}  // namespace deepcam
