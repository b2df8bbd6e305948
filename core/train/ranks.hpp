// Where this process stands among the ranks of a run: its rank, the world
// size, and its place on its node, read from the launcher's environment.
//
// Sources, in this order (the first one present decides; README "Many ranks"):
//   torchrun   RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE (also
//              deepcam-host --nproc)
//   Open MPI   OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE
//   Slurm      SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, and
//              SLURM_STEP_TASKS_PER_NODE or SLURM_TASKS_PER_NODE (with
//              SLURM_NODEID); SLURM_NTASKS_PER_NODE is no count
//   PMI        PMI_RANK, PMI_SIZE (MPICH, Intel MPI); MPI_LOCALRANKID and
//              MPI_LOCALNRANKS when the launcher sets them
// None of them: one rank. Launchers nest (torchrun or mpirun inside a Slurm
// allocation), so a later source may describe an outer launch with another
// world size; that is not a conflict. A later source with the same world
// size but another rank is: one of them is stale, and the error names both,
// unless torchrun set its own (TORCHELASTIC_RUN_ID: it is running inside
// the outer launch, so its variables are current). deepcam-host --nproc
// clears the outer launcher's variables in its ranks.
// Where the node-local values are missing they are derived from host names
// once the ranks have met (Communicator).
#pragma once

#include "deepcam/export.hpp"

#include <functional>
#include <string>
#include <vector>

namespace deepcam {

struct RankLayout {
  int rank = 0;
  int world_size = 1;
  int local_rank = -1;  // -1: not given by the launcher
  int local_size = -1;
  std::string source = "none";  // "torchrun", "Open MPI", "Slurm", "PMI" or "none"
  std::string rank_variable;    // e.g. "RANK=1", for messages
  std::string local_variables;  // e.g. "LOCAL_RANK=1 and LOCAL_WORLD_SIZE=2", where given
  std::string size_variable;    // e.g. "WORLD_SIZE=2", for messages
};

using Environment = std::function<const char*(const char*)>;

// Throws Error naming the variables on a malformed or conflicting value.
DEEPCAM_API RankLayout detect_ranks(const Environment& env);
DEEPCAM_API RankLayout detect_ranks();  // from the process environment

// The variables of the launchers other than torchrun's (Open MPI, Slurm,
// PMI) that place a process among ranks: what a nested launch that sets
// torchrun's own clears in its processes.
DEEPCAM_API std::vector<std::string> outer_launcher_variables();

}  // namespace deepcam
