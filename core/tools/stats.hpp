// `deepcam-data stats DIR`: the per-channel statistics of SPEC 1.3 over all
// pixels of all files in DIR/train, written to DIR/stats.h5 (group climate:
// count, and mean, sqmean, minval, maxval per channel, float64).
// Also home of write_atomically, which every output of deepcam-data goes
// through so that a reader never sees a half-written file.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "deepcam/normalise.hpp"
#include "progress.hpp"

namespace deepcam::h5 {
class File;
}

namespace deepcam::data {

// The 16 input channels, in the order of the last axis of climate/data.
using deepcam::kChannelNames;

struct ChannelStats {
  std::int64_t count = 0;  // pixels per channel
  std::vector<double> mean, sqmean, minval, maxval;
};

// Fills `target` through `fill` under a hidden temporary name in the same
// directory and renames it into place when complete; on any error the
// temporary file is removed and the error propagates.
void write_atomically(const std::filesystem::path& target,
                      const std::function<void(h5::File&)>& fill);

// Removes from `dir` (not below it) the temporaries that writers killed
// mid-write left (temporary_files.hpp) and whose process is gone, saying so
// on stderr for each: each can be as large as a sample. Only for a writer
// that runs alone; a run of many ranks leaves them to `deepcam-data verify`,
// which lists them.
void remove_stale_temporaries(const std::filesystem::path& dir);

// The training files of a data set root: DIR/train/*.h5, sorted by name; in
// a set of the numpy form only (no .h5 there), its data-X.npy files, each
// with its label-X.npy.
std::vector<std::filesystem::path> training_files(const std::filesystem::path& root);

// Statistics over climate/data of the files (the array of a .npy file); throws deepcam::Error naming
// the file on unreadable input, a wrong shape, a NaN/Inf value or one beyond
// float32's range (named as the file stores it). Each file
// done advances `progress` when one is given.
ChannelStats compute_stats(const std::vector<std::filesystem::path>& files, Progress* progress = nullptr);

void write_stats(const std::filesystem::path& target, const ChannelStats& stats);

// The `stats` command: compute over root/train and write root/stats.h5,
// with progress lines on stderr (progress.hpp); then, with `summary` and
// not progress.quiet, the per-channel table. A stats.h5 that cannot be
// written (a folder or FIFO in its place, a root this user cannot write) is
// an error before any training file is read. The file is written even when
// training cannot normalise a channel with it (constant, or a range float32
// cannot hold), with a warning on stderr naming each such channel, quiet or
// not: a run may leave it out ([data] channels).
ChannelStats run_stats(const std::filesystem::path& root, const ProgressOptions& progress = {},
                       bool summary = true);

}  // namespace deepcam::data
