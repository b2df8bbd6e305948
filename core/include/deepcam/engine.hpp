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

// Returns the process exit status: 0 when the run ended as configured
// (target reached or max_epochs done), 1 otherwise. Throws Error on bad input.
DEEPCAM_API int run_engine(const RunConfig& config, const EngineOptions& options);

}  // namespace deepcam
