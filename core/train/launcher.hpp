// deepcam-host --nproc N: starts N ranks of this program on this machine, as
// `torchrun --nproc_per_node N` does: each child gets RANK, WORLD_SIZE,
// LOCAL_RANK, LOCAL_WORLD_SIZE, and MASTER_ADDR / MASTER_PORT (a free port
// on 127.0.0.1 unless they are set already). Every line a child prints is
// prefixed with "[rank R] ". When a rank fails, the others get a grace
// period to end by themselves (they usually fail the same way), then are
// ended; the exit status is the first failing rank's, and the launcher
// names it.
#pragma once

#include "deepcam/export.hpp"

#include <string>
#include <vector>

namespace deepcam {

// `args`: the arguments for every child (without --nproc). Returns the exit
// status for the launcher.
DEEPCAM_API int launch_local_ranks(int nproc, const std::vector<std::string>& args);

}  // namespace deepcam
