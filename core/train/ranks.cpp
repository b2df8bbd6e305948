#include "ranks.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <cstdlib>
#include <optional>
#include <vector>

#include "deepcam/error.hpp"

namespace deepcam {

namespace {

struct Source {
  const char* name;
  const char* rank;
  const char* size;
  const char* local_rank;
  const char* local_size;
};

const Source kSources[] = {
    {"torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"},
    {"Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"},
    // Slurm's local size is read from its per-node lists (slurm_tasks_on_node):
    // SLURM_NTASKS_PER_NODE is what was asked for, a most per node, not a count.
    {"Slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", nullptr},
    {"PMI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"},
};

std::optional<int> integer(const Environment& env, const char* name, int min) {
  const char* text = env(name);
  if (!text || !*text) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(text, &end, 10);
  if (errno != 0 || *end != '\0' || v < min || v > 1 << 30) {
    throw Error(fmt::format("environment variable {}=\"{}\": expected an integer >= {}", name, text, min));
  }
  return static_cast<int>(v);
}

// Reads a positive decimal count at text[at...], moving `at` past it; nothing
// else (no sign, no space) is a count.
std::optional<int> count_at(const std::string& text, std::size_t& at) {
  const std::size_t start = at;
  long v = 0;
  while (at < text.size() && text[at] >= '0' && text[at] <= '9' && at - start < 9) v = v * 10 + (text[at++] - '0');
  if (at == start || v < 1 || (at < text.size() && text[at] >= '0' && text[at] <= '9')) return std::nullopt;
  return static_cast<int>(v);
}

// The list of tasks per node that holds this task's node: srun's
// SLURM_STEP_TASKS_PER_NODE (this step's), else the job's SLURM_TASKS_PER_NODE.
const char* slurm_tasks_list(const Environment& env) {
  const char* step = env("SLURM_STEP_TASKS_PER_NODE");
  return step && *step ? "SLURM_STEP_TASKS_PER_NODE" : "SLURM_TASKS_PER_NODE";
}

// The list lists tasks per node in node order, runs compressed: "4(x2),3" is
// nodes 0 and 1 with 4 tasks each, node 2 with 3. The whole list is read:
// "2abc", "2(x3" or "2," is an error, not 2.
std::optional<int> slurm_tasks_on_node(const Environment& env) {
  const char* name = slurm_tasks_list(env);
  const char* text = env(name);
  const std::optional<int> node = integer(env, "SLURM_NODEID", 0);
  if (!text || !node) return std::nullopt;
  const std::string all = text;
  long long first_node = 0;  // of the current item
  std::optional<int> found;
  for (std::size_t s = 0; s <= all.size();) {
    std::size_t e = all.find(',', s);
    if (e == std::string::npos) e = all.size();
    const std::string item = all.substr(s, e - s);
    std::size_t at = 0;
    const std::optional<int> tasks = count_at(item, at);
    std::optional<int> repeat = 1;
    if (tasks && item.compare(at, 2, "(x") == 0) {
      at += 2;
      repeat = count_at(item, at);
      if (repeat && at < item.size() && item[at] == ')') ++at;
      else repeat = std::nullopt;
    }
    if (!tasks || !repeat || at != item.size()) {
      throw Error(fmt::format("environment variable {}=\"{}\": cannot read \"{}\" as a task count with an "
                              "optional repeat such as 4(x2)",
                              name, all, item));
    }
    if (!found && *node < first_node + *repeat) found = tasks;
    first_node += *repeat;
    s = e + 1;
  }
  if (found) return found;
  throw Error(fmt::format("environment variables {}=\"{}\" and SLURM_NODEID={}: no entry for node {}", name, all,
                          *node, *node));
}

std::string setting(const Environment& env, const char* name) { return fmt::format("{}={}", name, env(name)); }

}  // namespace

RankLayout detect_ranks(const Environment& env) {
  const bool inside_torchrun = env("TORCHELASTIC_RUN_ID") != nullptr;
  // Slurm's variables without SLURM_STEP_NUM_TASKS are the batch script's
  // (sbatch runs it once); under an MPI launcher started there (`sbatch -n
  // 2` then `mpirun -np 2`) the launcher's are this process's own.
  const char* step = env("SLURM_STEP_NUM_TASKS");
  const bool slurm_batch_script = !step || !*step;
  const bool under_mpi = integer(env, kSources[1].rank, 0) || integer(env, kSources[3].rank, 0);
  std::optional<RankLayout> chosen;
  for (const Source& s : kSources) {
    if (&s == &kSources[2] && slurm_batch_script && under_mpi) continue;
    const std::optional<int> rank = integer(env, s.rank, 0);
    const std::optional<int> size = integer(env, s.size, 1);
    if (!rank && !size) continue;
    // An allocation's shell (salloc) has the job's SLURM_NTASKS but no task
    // of a step's SLURM_PROCID: the allocation of a launcher started there
    // (torchrun), or of one task, is no launch; else, as for the batch
    // script's own process below, its ranks are ranks nobody starts.
    if (&s == &kSources[2] && !rank && slurm_batch_script) {
      if (chosen || *size == 1) continue;
      throw Error(fmt::format("environment variable {} (Slurm), but no SLURM_PROCID or SLURM_STEP_NUM_TASKS: this "
                              "process runs in an allocation's shell (salloc), on the host it was started from, not "
                              "as a task of an srun step; start the ranks with srun (one task per rank), or "
                              "srun -N 1 -n 1 deepcam-host --nproc N for N on one node of the allocation",
                              setting(env, s.size)));
    }
    if (!rank || !size) {
      throw Error(fmt::format("environment variable {} is set but {} is not: {} sets both",
                              rank ? setting(env, s.rank) : setting(env, s.size), rank ? s.size : s.rank, s.name));
    }
    if (*rank >= *size) {
      throw Error(fmt::format("environment variables {} and {}: the rank must be below the world size",
                              setting(env, s.rank), setting(env, s.size)));
    }
    if (chosen) {
      const bool nested = inside_torchrun && chosen->source == kSources[0].name;
      if (!nested && *size == chosen->world_size && *rank != chosen->rank) {
        throw Error(fmt::format("environment variables {} ({}) and {} ({}) give this process different ranks in a "
                                "world of {}; unset the stale one",
                                chosen->rank_variable, chosen->source, setting(env, s.rank), s.name, *size));
      }
      // An MPI launcher's variables are its processes' own: another world
      // beside them is stale (each process would train alone, all in one
      // output_dir). Slurm's may be the batch script's, under an mpirun or
      // a launcher of the user's inside the allocation, which starts as
      // many processes or more; but an srun step's, with fewer ranks in the
      // world than it has tasks, show that world stale (an exported
      // RANK=0 WORLD_SIZE=1 under srun -n 2).
      const bool slurm_step_larger = s.local_size == nullptr && !slurm_batch_script && *size > chosen->world_size;
      if (!nested && *size != chosen->world_size && (s.local_size != nullptr || slurm_step_larger)) {
        throw Error(fmt::format("environment variables {} and {} ({}) and {} and {} ({}) give this process worlds of "
                                "{} and {} ranks; unset the stale one",
                                chosen->rank_variable, chosen->size_variable, chosen->source, setting(env, s.rank),
                                setting(env, s.size), s.name, chosen->world_size, *size));
      }
      continue;
    }
    RankLayout r;
    r.rank = *rank;
    r.world_size = *size;
    r.source = s.name;
    r.rank_variable = setting(env, s.rank);
    r.size_variable = setting(env, s.size);
    const std::optional<int> local_rank = integer(env, s.local_rank, 0);
    const bool slurm = s.local_size == nullptr;
    const std::optional<int> local_size = slurm ? slurm_tasks_on_node(env) : integer(env, s.local_size, 1);
    if (local_rank && local_size) {
      if (*local_rank >= *local_size) {
        throw Error(fmt::format("environment variables {} and local size {}: the local rank must be below it",
                                setting(env, s.local_rank), *local_size));
      }
      r.local_rank = *local_rank;
      r.local_size = *local_size;
      r.local_variables = fmt::format("{} and {}", setting(env, s.local_rank),
                                      slurm ? fmt::format("{} (with SLURM_NODEID={})",
                                                          setting(env, slurm_tasks_list(env)), env("SLURM_NODEID"))
                                            : setting(env, s.local_size));
    }
    chosen = r;
  }
  // srun gives each task of a step SLURM_STEP_NUM_TASKS; sbatch runs the
  // script itself once, with SLURM_PROCID=0 and the job's SLURM_NTASKS, but
  // without it. Taken for rank 0 of the job, that process would wait
  // comm_timeout_s for ranks that nobody starts.
  if (chosen && chosen->source == kSources[2].name && chosen->world_size > 1) {
    if (slurm_batch_script) {
      throw Error(fmt::format("environment variables {} and {} (Slurm), but no SLURM_STEP_NUM_TASKS: this process is "
                              "the batch script's own, which sbatch runs once, not a task of an srun step; start "
                              "the ranks with srun (one task per rank), or with deepcam-host --nproc N on one node",
                              chosen->rank_variable, chosen->size_variable));
    }
  }
  if (chosen) return *chosen;
  RankLayout alone;
  alone.local_rank = 0;
  alone.local_size = 1;
  return alone;
}

std::vector<std::string> outer_launcher_variables() {
  std::vector<std::string> names{"SLURM_STEP_NUM_TASKS", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
                                 "SLURM_NODEID"};
  for (const Source& s : kSources) {
    if (&s == &kSources[0]) continue;  // torchrun's, which the nested launch sets
    for (const char* name : {s.rank, s.size, s.local_rank, s.local_size}) {
      if (name) names.emplace_back(name);
    }
  }
  return names;
}

RankLayout detect_ranks() {
  return detect_ranks([](const char* name) { return static_cast<const char*>(std::getenv(name)); });
}

}  // namespace deepcam
