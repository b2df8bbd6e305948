// deepcam-host --nproc N: starts N ranks of this program on this machine, as
// `torchrun --nproc_per_node N` does: each child gets RANK, WORLD_SIZE,
// LOCAL_RANK, LOCAL_WORLD_SIZE, and MASTER_ADDR / MASTER_PORT (a free port
// on 127.0.0.1 unless they are set already). Every line a child prints is
// prefixed with "[rank R] ". When a rank fails, the others get a grace
// period to end by themselves (they usually fail the same way), then are
// ended; the exit status is that of the rank to blame (rank_to_blame), and
// the launcher names it.
#pragma once

#include "deepcam/export.hpp"

#include <string>
#include <vector>

namespace deepcam {

// `args`: the arguments for every child (without --nproc). Returns the exit
// status for the launcher.
DEEPCAM_API int launch_local_ranks(int nproc, const std::vector<std::string>& args);

// The rank the launcher names when ranks failed: `failed[r]`, rank r failed
// on its own (before the launcher ended the others) with exit status
// `codes[r]`; `first_reaped`, the failed rank seen first. Not simply the
// first: a rank that lost another (status 5) or that ends because rank 0
// refused the run may end before the cause. The lowest failed rank whose
// status is not 5, else `first_reaped`, whose message names the rank lost.
DEEPCAM_API int rank_to_blame(const std::vector<bool>& failed, const std::vector<int>& codes, int first_reaped);

}  // namespace deepcam
