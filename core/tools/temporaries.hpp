// The temporary files deepcam-data's writers leave beside a target when
// they are killed mid-write (SIGKILL, a time limit): ".<name>.tmp<pid>"
// (write_atomically, the stats.h5 copy) or ".<name>.tmp<pid>-<n>"
// (npy::write). Hidden, so no listing takes them for samples; each can be
// as large as a sample, so a re-run that finishes the job removes them.
#pragma once

#include <signal.h>

#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <regex>
#include <string>
#include <system_error>
#include <vector>

#include <fmt/format.h>

namespace deepcam::data {

// Removes, from `dir` (not below it), the temporaries whose writing process
// is gone, saying so on stderr for each. Only for a writer that runs alone:
// another rank's process on another node has a pid this one cannot see, so
// a run of many ranks leaves them to `deepcam-data verify`, which lists them.
inline void remove_stale_temporaries(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  static const std::regex temporary(R"(\..+\.tmp([0-9]{1,9})(-[0-9]+)?)");
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    std::smatch m;
    if (!std::regex_match(name, m, temporary)) continue;
    const long pid = std::strtol(m[1].str().c_str(), nullptr, 10);
    if (::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM) continue;  // its writer still runs
    std::error_code rm;
    fs::remove(it->path(), rm);
    if (!rm) {
      fmt::print(stderr, "deepcam-data: removed {}, left by an interrupted earlier run (process {} is gone)\n",
                 it->path().string(), pid);
    }
  }
}

}  // namespace deepcam::data
