// The names under which deepcam-host and deepcam-data write a file (or a
// folder) before renaming it into place, so that a reader never sees one
// half-written:
//   "<name>.tmp-<pid>"      a checkpoint (torch_pickle), a --predict picture
//   "<name>.partial-<pid>"  a run's config.toml and mlperf.log before run_start
//   ".<name>.tmp<pid>-<n>"  the rest: hidden_name (deepcam-data's HDF5 and
//                           .npy files, its package folder, --predict's .npy
//                           files); ".<name>.tmp<pid>" from earlier versions
// A writer killed mid-write (SIGKILL, a time limit) leaves its temporary; the
// pid in the name tells whether the writer is gone.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "deepcam/export.hpp"

namespace deepcam::temporary_files {

// A hidden name beside `target` for this process's next temporary of it:
// hidden and ending in neither .h5 nor .npy, so that no listing of samples
// takes it for one, and new at each call (threads may write the same target).
DEEPCAM_API std::filesystem::path hidden_name(const std::filesystem::path& target);

// The pid of the writer of a file named `filename` (no folder), when the name
// is one of the forms above.
DEEPCAM_API std::optional<long> writer(const std::string& filename);

// Whether process `pid` exists (one of another user counts).
DEEPCAM_API bool alive(long pid);

// The temporary files in `dir` (not below it, and not a folder such as a
// package's) whose writer is gone. Only for a writer that runs alone:
// another rank's process on another node has a pid this one cannot see.
// The caller removes those whose target it writes: a folder may hold files
// of other programs that look like temporaries.
struct Stale {
  std::filesystem::path path;
  long writer;         // its pid
  std::string target;  // the file name it would have been renamed to
};
DEEPCAM_API std::vector<Stale> stale(const std::filesystem::path& dir);

}  // namespace deepcam::temporary_files
