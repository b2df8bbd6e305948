// Unit tests of the rank detection (core/train/ranks.cpp): each launcher's
// variables, their order, and the errors for malformed or stale ones.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "deepcam/error.hpp"
#include "launcher.hpp"
#include "ranks.hpp"

namespace {

using Vars = std::map<std::string, std::string>;

deepcam::RankLayout detect(const Vars& vars) {
  return deepcam::detect_ranks([&](const char* name) -> const char* {
    const auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  });
}

std::string error_of(const Vars& vars) {
  try {
    detect(vars);
  } catch (const deepcam::Error& e) {
    return e.what();
  }
  return "(no error)";
}

void check(const deepcam::RankLayout& r, int rank, int size, int local_rank, int local_size, const char* source) {
  CHECK(r.rank == rank);
  CHECK(r.world_size == size);
  CHECK(r.local_rank == local_rank);
  CHECK(r.local_size == local_size);
  CHECK(r.source == source);
}

}  // namespace

TEST_CASE("no launcher: one rank") { check(detect({}), 0, 1, 0, 1, "none"); }

TEST_CASE("each launcher's variables") {
  check(detect({{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "2"}}), 3, 8, 1, 2,
        "torchrun");
  check(detect({{"OMPI_COMM_WORLD_RANK", "5"}, {"OMPI_COMM_WORLD_SIZE", "6"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "2"},
                {"OMPI_COMM_WORLD_LOCAL_SIZE", "3"}}),
        5, 6, 2, 3, "Open MPI");
  // SLURM_TASKS_PER_NODE lists every node; SLURM_NODEID picks this one.
  check(detect({{"SLURM_PROCID", "8"}, {"SLURM_NTASKS", "11"}, {"SLURM_LOCALID", "0"}, {"SLURM_STEP_NUM_TASKS", "11"},
                {"SLURM_TASKS_PER_NODE", "4(x2),3"}, {"SLURM_NODEID", "2"}}),
        8, 11, 0, 3, "Slurm");
  check(detect({{"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "11"}, {"SLURM_LOCALID", "1"}, {"SLURM_STEP_NUM_TASKS", "11"},
                {"SLURM_TASKS_PER_NODE", "4(x2),3"}, {"SLURM_NODEID", "0"}}),
        1, 11, 1, 4, "Slurm");
  check(detect({{"PMI_RANK", "2"}, {"PMI_SIZE", "4"}, {"MPI_LOCALRANKID", "0"}, {"MPI_LOCALNRANKS", "2"}}), 2, 4, 0,
        2, "PMI");
  // Without node-local values the Communicator derives them from host names.
  check(detect({{"PMI_RANK", "2"}, {"PMI_SIZE", "4"}}), 2, 4, -1, -1, "PMI");
}

TEST_CASE("nested launchers: the first source in the order decides") {
  // torchrun inside a Slurm allocation of 2 tasks: another world size, no conflict.
  check(detect({{"RANK", "5"}, {"WORLD_SIZE", "16"}, {"LOCAL_RANK", "5"}, {"LOCAL_WORLD_SIZE", "8"},
                {"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}}),
        5, 16, 5, 8, "torchrun");
  // mpirun inside an sbatch script: the batch step's Slurm variables stay behind.
  check(detect({{"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "4"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"}, {"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"}}),
        1, 4, 1, 4, "Open MPI");
  // srun with PMI: both say the same.
  check(detect({{"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "2"}, {"SLURM_STEP_NUM_TASKS", "2"}, {"PMI_RANK", "1"},
                {"PMI_SIZE", "2"}}),
        1, 2, -1, -1, "Slurm");
}

TEST_CASE("a batch script's own process is no rank of the job") {
  // sbatch --ntasks=4 running deepcam-host without srun: SLURM_PROCID=0 and the
  // job's SLURM_NTASKS, no step. It waited comm_timeout_s for ranks nobody starts.
  const std::string batch = error_of({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "4"}, {"SLURM_NODEID", "0"},
                                      {"SLURM_TASKS_PER_NODE", "4"}, {"SLURM_LOCALID", "0"}});
  CHECK_MESSAGE(batch.find("SLURM_PROCID=0 and SLURM_NTASKS=4 (Slurm), but no SLURM_STEP_NUM_TASKS: this process is "
                           "the batch script's own") != std::string::npos,
                batch);
  // A job of one task is one rank, step or not.
  check(detect({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"}}), 0, 1, -1, -1, "Slurm");
}

TEST_CASE("an allocation's shell is no rank of the job") {
  // salloc -n 2, then deepcam-host without srun: "SLURM_NTASKS=2 is set but SLURM_PROCID is not: Slurm sets both".
  const std::string shell = error_of({{"SLURM_NTASKS", "2"}, {"SLURM_NPROCS", "2"}, {"SLURM_TASKS_PER_NODE", "2"}});
  CHECK_MESSAGE(shell.find("SLURM_NTASKS=2 (Slurm), but no SLURM_PROCID or SLURM_STEP_NUM_TASKS: this process runs in "
                           "an allocation's shell (salloc)") != std::string::npos,
                shell);
  // One task, or torchrun started in the shell: the allocation is no launch.
  check(detect({{"SLURM_NTASKS", "1"}}), 0, 1, 0, 1, "none");
  check(detect({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "2"},
                {"SLURM_NTASKS", "4"}}),
        1, 2, 1, 2, "torchrun");
  // A step's task without its SLURM_PROCID is still a broken launch.
  CHECK(error_of({{"SLURM_NTASKS", "2"}, {"SLURM_STEP_NUM_TASKS", "2"}}).find("Slurm sets both") != std::string::npos);
}

TEST_CASE("an MPI launcher in a batch script of as many tasks: the launcher's variables, not the script's") {
  // sbatch -n 2, then mpirun -np 2 (or an MPICH/Intel MPI mpiexec): the script's SLURM_PROCID=0 gave rank 1
  // "different ranks ... unset the stale one", and PMI's rank 0 was told it was the batch script's own.
  const Vars script{{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"SLURM_NODEID", "0"},
                    {"SLURM_TASKS_PER_NODE", "2"}, {"SLURM_LOCALID", "0"}};
  Vars ompi = script;
  ompi.insert({{"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
               {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}});
  check(detect(ompi), 1, 2, 1, 2, "Open MPI");
  for (const char* rank : {"0", "1"}) {
    Vars pmi = script;
    pmi.insert({{"PMI_RANK", rank}, {"PMI_SIZE", "2"}, {"MPI_LOCALRANKID", rank}, {"MPI_LOCALNRANKS", "2"}});
    check(detect(pmi), std::atoi(rank), 2, std::atoi(rank), 2, "PMI");
  }
  // In an srun step the Slurm variables are current: a stale MPI rank beside them is still refused.
  Vars step = ompi;
  step.insert({"SLURM_STEP_NUM_TASKS", "2"});
  CHECK(error_of(step).find("unset the stale one") != std::string::npos);
}

TEST_CASE("torchrun inside a launch of the same size: torchrun's variables are current, not stale") {
  // An sbatch script of 2 tasks running torchrun --nproc_per_node 2: the batch step is Slurm's task 0.
  const Vars vars{{"RANK", "1"},         {"WORLD_SIZE", "2"},   {"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "2"},
                  {"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"TORCHELASTIC_RUN_ID", "none"}};
  check(detect(vars), 1, 2, 1, 2, "torchrun");
  Vars without = vars;
  without.erase("TORCHELASTIC_RUN_ID");  // RANK set by hand: one of the two is stale
  CHECK(error_of(without).find("unset the stale one") != std::string::npos);
}

TEST_CASE("the outer launchers' variables are every source's but torchrun's") {
  const std::vector<std::string> names = deepcam::outer_launcher_variables();
  for (const char* name : {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
                           "SLURM_LOCALID", "SLURM_TASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_NODEID",
                           "PMI_RANK", "MPI_LOCALNRANKS"}) {
    CHECK_MESSAGE(std::count(names.begin(), names.end(), name) == 1, name);
  }
  for (const char* name : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}) {
    CHECK_MESSAGE(std::count(names.begin(), names.end(), name) == 0, name);
  }
}

TEST_CASE("an MPI launcher's world beside another is refused, Slurm's batch variables are not") {
  // An exported RANK=0 WORLD_SIZE=1 under mpirun -np 2: each process trained alone.
  const std::string stale = error_of({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"OMPI_COMM_WORLD_RANK", "1"},
                                      {"OMPI_COMM_WORLD_SIZE", "2"}});
  CHECK_MESSAGE(stale.find("RANK=0 and WORLD_SIZE=1 (torchrun) and OMPI_COMM_WORLD_RANK=1 and OMPI_COMM_WORLD_SIZE=2 "
                           "(Open MPI) give this process worlds of 1 and 2 ranks; unset the stale one") !=
                    std::string::npos,
                stale);
  CHECK(error_of({{"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "2"}, {"PMI_RANK", "0"}, {"PMI_SIZE", "4"}})
            .find("unset the stale one") != std::string::npos);
  // mpirun -np 2 inside an sbatch script of 4 tasks: the batch step's Slurm variables stay behind.
  check(detect({{"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "2"}, {"SLURM_PROCID", "0"},
                {"SLURM_NTASKS", "4"}}),
        1, 2, -1, -1, "Open MPI");
  // An exported RANK=0 WORLD_SIZE=1 under srun -n 2: each task trained alone, into one output_dir.
  const std::string stale_under_srun =
      error_of({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "2"},
                {"SLURM_STEP_NUM_TASKS", "2"}});
  CHECK_MESSAGE(stale_under_srun.find("RANK=0 and WORLD_SIZE=1 (torchrun) and SLURM_PROCID=1 and SLURM_NTASKS=2 "
                                      "(Slurm) give this process worlds of 1 and 2 ranks; unset the stale one") !=
                    std::string::npos,
                stale_under_srun);
  // A launcher of the user's in each task of an srun step starts as many processes or more: its world stands.
  check(detect({{"RANK", "5"}, {"WORLD_SIZE", "8"}, {"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "2"},
                {"SLURM_STEP_NUM_TASKS", "2"}}),
        5, 8, -1, -1, "torchrun");
  // torchrun inside an MPI process: its own world wins.
  check(detect({{"RANK", "3"}, {"WORLD_SIZE", "4"}, {"TORCHELASTIC_RUN_ID", "x"}, {"OMPI_COMM_WORLD_RANK", "0"},
                {"OMPI_COMM_WORLD_SIZE", "1"}}),
        3, 4, -1, -1, "torchrun");
}

TEST_CASE("stale or malformed variables are errors naming them") {
  const std::string stale =
      error_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "2"}});
  CHECK(stale.find("RANK=0") != std::string::npos);
  CHECK(stale.find("SLURM_PROCID=1") != std::string::npos);
  const std::string half = error_of({{"RANK", "1"}});
  CHECK(half.find("RANK=1") != std::string::npos);
  CHECK(half.find("WORLD_SIZE") != std::string::npos);
  const std::string beyond = error_of({{"RANK", "2"}, {"WORLD_SIZE", "2"}});
  CHECK(beyond.find("RANK=2") != std::string::npos);
  CHECK(beyond.find("WORLD_SIZE=2") != std::string::npos);
  CHECK(error_of({{"OMPI_COMM_WORLD_RANK", "x"}, {"OMPI_COMM_WORLD_SIZE", "2"}}).find("OMPI_COMM_WORLD_RANK=\"x\"") !=
        std::string::npos);
  const std::string local =
      error_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "2"}, {"LOCAL_WORLD_SIZE", "2"}});
  CHECK(local.find("LOCAL_RANK=2") != std::string::npos);
  CHECK(error_of({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"SLURM_LOCALID", "0"},
                  {"SLURM_TASKS_PER_NODE", "2"}, {"SLURM_NODEID", "3"}})
            .find("SLURM_TASKS_PER_NODE") != std::string::npos);
}

TEST_CASE("Slurm's local size is the step's count on this node, not the count asked for") {
  // srun -n 3 --ntasks-per-node=2 on two nodes: 2 tasks on node 0, 1 on node 1, and
  // SLURM_NTASKS_PER_NODE=2 (the most per node that was asked for) on both.
  const Vars second_node{{"SLURM_PROCID", "2"},          {"SLURM_NTASKS", "3"},
                         {"SLURM_LOCALID", "0"},         {"SLURM_NODEID", "1"},
                         {"SLURM_NTASKS_PER_NODE", "2"}, {"SLURM_STEP_TASKS_PER_NODE", "2,1"},
                         {"SLURM_TASKS_PER_NODE", "2(x2)"}, {"SLURM_STEP_NUM_TASKS", "3"}};
  check(detect(second_node), 2, 3, 0, 1, "Slurm");
  // Without the step's list, the job's.
  Vars job = second_node;
  job.erase("SLURM_STEP_TASKS_PER_NODE");
  check(detect(job), 2, 3, 0, 2, "Slurm");
  // SLURM_NTASKS_PER_NODE alone says nothing of this node: the host names will.
  check(detect({{"SLURM_PROCID", "4"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "0"}, {"SLURM_NTASKS_PER_NODE", "4"},
                {"SLURM_STEP_NUM_TASKS", "8"}}),
        4, 8, -1, -1, "Slurm");
  Vars bad = second_node;
  bad["SLURM_STEP_TASKS_PER_NODE"] = "2,x";
  CHECK(error_of(bad).find("SLURM_STEP_TASKS_PER_NODE=\"2,x\"") != std::string::npos);
}

TEST_CASE("SLURM_TASKS_PER_NODE is read item by item, whole") {
  const auto on_node = [](const char* list, const char* node) {
    return Vars{{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"SLURM_LOCALID", "0"}, {"SLURM_STEP_NUM_TASKS", "2"},
                {"SLURM_TASKS_PER_NODE", list}, {"SLURM_NODEID", node}};
  };
  check(detect(on_node("2(x3),5,1(x2)", "3")), 0, 2, 0, 5, "Slurm");
  check(detect(on_node("2(x3),5,1(x2)", "5")), 0, 2, 0, 1, "Slurm");
  for (const char* bad : {"2abc", "2(x3", "2(x3)z", "(x3)", "2(x0)", "0", "-2", "+2", " 2", "2,", ",2", "", "2(3)",
                          "2(x)", "99999999999"}) {
    const std::string error = error_of(on_node(bad, "0"));
    CHECK_MESSAGE(error.find(std::string("SLURM_TASKS_PER_NODE=\"") + bad + "\"") != std::string::npos,
                  std::string(bad));
    CHECK_MESSAGE(error.find("cannot read") != std::string::npos, error);
  }
}

TEST_CASE("the launcher blames the lowest rank that failed on its own with a status other than 5") {
  using deepcam::rank_to_blame;
  // Rank 1 ended first, saying rank 0 refused the run (status 2 as rank 0's).
  CHECK(rank_to_blame({true, true}, {2, 2}, 1) == 0);
  // Rank 0 lost rank 2 (status 5) and ended first; rank 2 failed with 3.
  CHECK(rank_to_blame({true, false, true}, {5, 0, 3}, 0) == 2);
  // Only a rank that lost another failed on its own: it is named, its message names the one lost.
  CHECK(rank_to_blame({false, true, false}, {143, 5, 143}, 1) == 1);
  // A rank the launcher ended (not failed on its own) is never blamed.
  CHECK(rank_to_blame({false, true}, {2, 4}, 1) == 1);
}
