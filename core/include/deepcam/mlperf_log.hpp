// MLPerf compliance logging (SPEC 8): one `:::MLLOG {...}` line per event,
// written by rank 0 only. Call sites are recorded in the metadata, as the
// reference's mllog does, through default arguments evaluated at the caller.
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "deepcam/export.hpp"
#include "deepcam/json.hpp"

namespace deepcam {

struct CallSite {
  const char* file;
  int line;
};

#define DEEPCAM_HERE ::deepcam::CallSite{__builtin_FILE(), __builtin_LINE()}

class DEEPCAM_API MlperfLog {
 public:
  using Metadata = std::vector<std::pair<std::string, Json>>;

  // Writes to `out` (not owned) when `enabled`; a disabled log (ranks other
  // than 0) still takes every call so that callers need no rank checks.
  // `name` (the file's path) is for messages. A line that cannot be written
  // (a full disk, the file-size limit) is cut off again, so that the file
  // stays a log of whole lines, and throws an Error naming the file; the
  // log takes no more lines after that.
  MlperfLog(std::FILE* out, bool enabled, std::string name = "");

  // Before run_start, the events are the run's settings (global_batch_size,
  // opt_name, ...), each logged once: a key logged a second time there (a
  // plugin's log_hyperparameters repeating one of the engine's) throws a
  // std::logic_error naming both call sites, on every rank.
  void event(const std::string& key, const Json& value, Metadata metadata = {},
             CallSite site = {__builtin_FILE(), __builtin_LINE()});
  void start(const std::string& key, const Json& value = Json(), Metadata metadata = {},
             CallSite site = {__builtin_FILE(), __builtin_LINE()});
  void end(const std::string& key, const Json& value = Json(), Metadata metadata = {},
           CallSite site = {__builtin_FILE(), __builtin_LINE()});

  // A run that fails mid-way closes what it had begun: each interval still
  // open (an epoch, an evaluation, ...) but run_start ends here, innermost
  // first, with its start's epoch_num, and `step_num` (the step the run
  // stopped at) where its start had one; the start's own when `step_num`
  // is null; and metadata status "aborted" (a save_stop without it would
  // read as a save done). Returns the epoch_num of the last epoch_start, or
  // a null Json before the first.
  Json close_open_intervals(const Json& step_num = Json(), CallSite site = {__builtin_FILE(), __builtin_LINE()});

  bool enabled() const { return enabled_; }
  // Also prints every line to `out` (stdout on rank 0, as the reference's
  // logger does); nullptr stops it.
  void echo_to(std::FILE* out) { echo_ = out; }

 private:
  void write(const char* event_type, const std::string& key, const Json& value,
             Metadata metadata, CallSite site);
  std::FILE* out_;
  bool enabled_;
  std::FILE* echo_ = nullptr;
  std::string name_;
  bool failed_ = false;
  std::vector<std::pair<std::string, Metadata>> open_;  // "<stem>_start" begun and not ended: stem, metadata
  bool running_ = false;                                 // run_start logged
  std::vector<std::pair<std::string, CallSite>> settings_;  // events before run_start: key, call site
  Json last_epoch_num_;
};

// "<path>: cannot write: <reason>", with what to do about a full disk or
// the file-size limit (ulimit -f): the message of every writer of the run's
// output (the log, config.toml, checkpoints).
DEEPCAM_API std::string write_error_text(const std::string& path, int err);
// Its cause alone: "No space left on device (the file system is full ...)".
DEEPCAM_API std::string write_error_cause(int err);

}  // namespace deepcam
