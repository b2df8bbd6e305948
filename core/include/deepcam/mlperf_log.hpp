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
  MlperfLog(std::FILE* out, bool enabled);

  void event(const std::string& key, const Json& value, Metadata metadata = {},
             CallSite site = {__builtin_FILE(), __builtin_LINE()});
  void start(const std::string& key, const Json& value = Json(), Metadata metadata = {},
             CallSite site = {__builtin_FILE(), __builtin_LINE()});
  void end(const std::string& key, const Json& value = Json(), Metadata metadata = {},
           CallSite site = {__builtin_FILE(), __builtin_LINE()});

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
};

}  // namespace deepcam
