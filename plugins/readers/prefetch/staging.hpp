// Staging: copies of a rank's samples on node-local storage (a directory such
// as /dev/shm or a local NVMe mount), made before training so that epochs
// read from there instead of the shared file system (issue 3 section 4,
// SPEC 2.2, 8.2). Every copy is checked (size, and a checksum of the bytes
// read from the source against one of the bytes read back from the copy)
// and appears under its final name only once checked. The area and every
// copy in it are removed when the StagingArea goes: at the end of the run,
// after an error, and when the reader's construction throws half-way.
//
// Node-shared areas (shuffle_mode "node": the node's ranks read the same
// shard, so it is copied once per node). Node-rank 0 creates the directory
// (create_shared) and the others join it by name (join_shared). Every user,
// from creating or joining until it is destroyed, holds a shared flock on
// <dir>/.users; the kernel drops it when the process ends, whatever ends it.
// The rule for removing the directory:
//   - whoever removes it holds the exclusive lock, which is granted only
//     when no rank holds its shared one: no rank's reader still exists, so
//     no file is removed under a reader;
//   - node-rank 0 removes it: when its area goes it lets go of its shared
//     lock and waits (up to `grace`) for the exclusive one. At a normal end
//     the others let go within moments (every rank has passed the engine's
//     final barrier), as they do when staging fails (every rank fails
//     together) or when another rank fails (node-rank 0 only gets here once
//     it has learned of it);
//   - if the others still hold it after `grace`, node-rank 0 is failing on
//     its own while they run on, and they will only stop once it has exited
//     (they wait for it in a collective): it cannot wait for them without
//     holding the whole job until the communication timeout. It leaves the
//     marker <dir>/.orphaned and goes; the last rank to let go then removes
//     the directory instead (each checks for the marker after letting go).
//   - a rank that ends without unwinding (killed by a signal, or the
//     communication watchdog's _Exit) never removes anything. If node-rank
//     0 ends so, the last user removes the directory as if it had left the
//     marker: its process (the pid in the directory's name) is gone, and
//     the exclusive lock proves no rank holds the area. If every user ends
//     so, the directory stays and later runs staging there report it
//     (leftover_areas), as they do for a private area.
// A rank that gets the exclusive lock after another removed the directory
// sees that the lock file is gone (no links) and does nothing.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace deepcam::readers {

// 64-bit checksum of a byte range, continued from `state` (start with
// kChecksumSeed): word-wise FNV-1a, fast enough to run at copy speed.
constexpr std::uint64_t kChecksumSeed = 0xcbf29ce484222325ULL;
std::uint64_t checksum(const void* data, std::size_t size, std::uint64_t state = kChecksumSeed);

// Staging directories under `parent` whose run is no longer alive (the pid
// in their name is not a process): left by a run killed by a signal.
// Creating a StagingArea prints a warning for each (a private one only when
// asked: one rank of a node says it for the node).
std::vector<std::string> leftover_areas(const std::string& parent);

class StagingArea {
 public:
  // Creates a fresh directory <parent>/deepcam-stage-<pid>-<random>
  // (mkdtemp), so that runs sharing a node do not share copies. `where` names the setting
  // with its value for messages (Params::setting: "run.toml:5 [reader] stage_dir = \"/dev/shm\"").
  // `report_leftovers`: warn about the leftover_areas() of `parent`.
  StagingArea(const std::string& parent, const std::string& where, bool report_leftovers = true);
  ~StagingArea();
  StagingArea(const StagingArea&) = delete;
  StagingArea& operator=(const StagingArea&) = delete;

  // Node-rank 0 of a node-shared area: creates the directory as above and
  // holds the shared lock on <dir>/.users. Removes the directory when it
  // goes, after the other users (see the rule above; `grace`: how long it
  // waits for them).
  static std::unique_ptr<StagingArea> create_shared(const std::string& parent, const std::string& where,
                                                    std::chrono::milliseconds grace);
  // Another rank of the node: joins the directory `dir` that node-rank 0
  // created, holding the shared lock; removes it only if node-rank 0 has
  // left it to the last user. An error if it is already gone.
  static std::unique_ptr<StagingArea> join_shared(const std::string& dir, const std::string& where);

  const std::string& dir() const { return dir_; }

  // Where copy(source, subdir) puts its copy.
  std::string target(const std::string& source, const std::string& subdir) const;

  // Copies `source` to <dir>/<subdir>/<file name of source> and checks the
  // copy; returns the copy's path. Thread-safe for distinct files. A write
  // that fails (disk full, file size limit) throws an Error naming both
  // files, and the partial copy is removed first; so does a stop request
  // (SIGTERM, SIGINT: deepcam/stop_request.hpp), seen between 4 MiB chunks,
  // with StopRequested.
  std::string copy(const std::string& source, const std::string& subdir) const;

  // Copies every file of every group on `threads` threads; returns the
  // copies in the same shape. The first failure stops the others and is
  // rethrown; a stop request stops them all, and StopRequested says how many
  // groups were copied.
  std::vector<std::vector<std::string>> copy_all(const std::vector<std::vector<std::string>>& groups,
                                                 const std::string& subdir, int threads) const;

  // Bytes copied so far (all threads), for the staging rate in the log.
  std::uint64_t bytes() const;

 private:
  enum class Role { Private, SharedOwner, SharedMember };
  StagingArea(Role role, std::string dir, std::string where, int lock_fd, std::chrono::milliseconds grace);
  // Removes the directory, holding the exclusive lock, unless another user
  // removed it already.
  void remove_locked();

  Role role_ = Role::Private;
  std::string dir_;
  std::string where_;
  int lock_fd_ = -1;  // <dir>/.users, shared-locked: node-shared areas only
  std::chrono::milliseconds grace_{0};
  // The directory, held open from when it was made or joined: only that
  // one is removed at the end, never what was put at its path since.
  int dir_fd_ = -1;
  mutable std::atomic<std::uint64_t> bytes_{0};
};

}  // namespace deepcam::readers
