// `deepcam-data package RUN_DIR... [--throughput INSTANCE_DIR...] --system NAME --out DIR [--system-desc FILE]`:
// an MLPerf HPC submission tree from finished runs, in the layout that
// mlperf_logging.package_checker and result_summarizer read (usage hpc,
// ruleset 3.0.0):
//
//   DIR/results/NAME/strong/deepcam/result_N.txt   run N's MLPerf log, N = 0, 1, ...
//   DIR/systems/NAME.json                          the system description
//   DIR/benchmarks/deepcam/implementations/deepcam-host/run_files/NAME/result_N.toml
//                                                  the resolved run file of run N
//   DIR/score.json                                 the time to train of each run, the score
//
// and with --throughput, the instances of the throughput measurement (MLPerf
// HPC's weak scaling), which the rules allow only beside the time-to-solution
// runs:
//
//   DIR/results/NAME/weak/deepcam/result_N.txt     instance N's MLPerf log
//   DIR/benchmarks/.../run_files/NAME/weak/result_N.toml
//
// Every instance must have reached the target, with a seed of its own, and
// all at one scale (number_of_nodes x accelerators_per_node, nodes where
// there are no accelerators); the throughput score (the result summarizer's)
// is the number of instances, that scale and the time to train all: the
// first run_start to the last run_stop. It needs at least 5 instances.
//
// The HPC checker wants the strong/ (or weak/) level between the system and
// the benchmark. The score is the result summarizer's: each run's time to
// train is run_stop minus run_start in minutes; runs that did not converge
// (run_stop status other than "success", or no eval_accuracy of at least the
// benchmark's 0.82: a run stopped at a lower target of its own fails the
// checker) are dropped (at most one may be); the olympic mean drops the
// fastest and the slowest of the rest (only the fastest when one was dropped).
//
// systems/NAME.json holds every field the system description checker
// requires: submitter, division, status and the node and accelerator counts
// from the logs (every run must agree; the instances on submitter, division
// and status), the host fields from this machine
// (/proc/cpuinfo, /proc/meminfo, /etc/os-release), and what --system-desc
// FILE (a JSON object of strings and numbers) gives, which wins. The tree is
// written under a temporary name beside DIR and renamed; DIR must not exist
// ("pkg/" is pkg; a DIR ending in "." or ".." is a bad command line).
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace deepcam::data {

struct PackageOptions {
  std::vector<std::filesystem::path> runs;             // the time-to-solution runs
  std::vector<std::filesystem::path> throughput_runs;  // the instances after --throughput
  std::string system;
  std::filesystem::path out;
  std::filesystem::path system_desc;  // empty: none
};

// Parses the arguments after `package`; a usage problem is returned in `error`.
PackageOptions parse_package_args(const std::vector<std::string>& args, std::string& error);

// Writes the tree and prints each run's time to train and the score. Throws
// deepcam::Error on a missing or malformed log, runs that disagree, an
// instance that did not converge or repeats a seed, or a package that could
// not be written; returns 1 (after writing the package) when more than one
// run did not converge, so that there is no score, or when there are fewer
// than 5 throughput instances.
int run_package(const PackageOptions& options);

}  // namespace deepcam::data
