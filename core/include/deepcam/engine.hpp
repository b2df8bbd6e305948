// The training engine (SPEC 7) with MLPerf logging (SPEC 8): builds the
// plugins a RunConfig names, trains until the target IoU or max_epochs, and
// writes the log, the resolved config and checkpoints under run.output_dir.
#pragma once

#include <string>

#include "deepcam/config.hpp"
#include "deepcam/export.hpp"

namespace deepcam {

struct EngineOptions {
  std::string evaluate_checkpoint;  // non-empty: only validate this checkpoint
  int rank = 0;
  int world_size = 1;
};

// The exit status of a run stopped by a NaN or infinite training loss or
// gradient norm: distinct from 1 (target not reached), 2 (bad input) and
// 3 (internal error), so that scripts can tell divergence apart.
constexpr int kDivergedStatus = 4;

// Returns the process exit status: 0 when the target was reached, 1 when
// max_epochs ended without reaching it, kDivergedStatus when training
// diverged (the MLPerf log then ends with run_stop status "aborted").
// Throws Error on bad input.
DEEPCAM_API int run_engine(const RunConfig& config, const EngineOptions& options);

}  // namespace deepcam
