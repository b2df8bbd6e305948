// Staging: copies of a rank's samples on node-local storage (a directory such
// as /dev/shm or a local NVMe mount), made before training so that epochs
// read from there instead of the shared file system (issue 3 section 4,
// SPEC 2.2, 8.2). Every copy is checked (size, and a checksum of the bytes
// read from the source against one of the bytes read back from the copy)
// and appears under its final name only once checked. The area and every
// copy in it are removed when the StagingArea goes: at the end of the run,
// after an error, and when the reader's construction throws half-way.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

namespace deepcam::readers {

// 64-bit checksum of a byte range, continued from `state` (start with
// kChecksumSeed): word-wise FNV-1a, fast enough to run at copy speed.
constexpr std::uint64_t kChecksumSeed = 0xcbf29ce484222325ULL;
std::uint64_t checksum(const void* data, std::size_t size, std::uint64_t state = kChecksumSeed);

// Staging directories under `parent` whose run is no longer alive (the pid
// in their name is not a process): left by a run killed by a signal.
// Creating a StagingArea prints a warning for each.
std::vector<std::string> leftover_areas(const std::string& parent);

class StagingArea {
 public:
  // Creates a fresh directory <parent>/deepcam-stage-<pid>-<random>
  // (mkdtemp), so that runs sharing a node do not share copies. `where` names the setting
  // for messages ("run.toml [reader] stage_dir").
  StagingArea(const std::string& parent, const std::string& where);
  ~StagingArea();
  StagingArea(const StagingArea&) = delete;
  StagingArea& operator=(const StagingArea&) = delete;

  const std::string& dir() const { return dir_; }

  // Copies `source` to <dir>/<subdir>/<file name of source> and checks the
  // copy; returns the copy's path. Thread-safe for distinct files. A write
  // that fails (disk full, file size limit) throws an Error naming both
  // files, and the partial copy is removed first.
  std::string copy(const std::string& source, const std::string& subdir) const;

  // Copies every file of every group on `threads` threads; returns the
  // copies in the same shape. The first failure stops the others and is
  // rethrown.
  std::vector<std::vector<std::string>> copy_all(const std::vector<std::vector<std::string>>& groups,
                                                 const std::string& subdir, int threads) const;

  // Bytes copied so far (all threads), for the staging rate in the log.
  std::uint64_t bytes() const;

 private:
  std::string dir_;
  std::string where_;
  mutable std::atomic<std::uint64_t> bytes_{0};
};

}  // namespace deepcam::readers
