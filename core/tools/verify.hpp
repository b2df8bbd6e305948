// `deepcam-data verify ROOT [--threads N]`: checks a data set in either
// format before a long run finds its bad file hours in. Each folder of ROOT
// that holds samples is a split, in HDF5 (data-X.h5) or numpy form
// (data-X.npy with label-X.npy), detected per folder (a folder holding both,
// as convert in place leaves it, is checked in both). Checked:
// - every file opens and is complete (HDF5 readable, .npy header valid and
//   the data all there);
// - data is (H, W, C), labels (H, W) of the same H and W;
// - every data value is finite and every label is 0, 1 or 2;
// - training's rule on the root (deepcam/data_set.hpp): train/ and
//   validation/ exist and hold samples, stats.h5 normalises every channel
//   (max > min, and a shift and scale float32 holds);
// - every entry named like a sample is a file (not a FIFO, a directory, a
//   link loop: the readers' listing), each data-X.npy has its label-X.npy
//   and the other way round;
// - shapes agree across the files of a format (the most common are taken
//   as right, the others are reported); dtypes may differ from file to
//   file, as the readers convert each file's own;
// - ROOT/stats.h5 exists and holds count and, per channel, mean, sqmean,
//   minval and maxval for the samples' channel count;
// - no temporary file of an interrupted write (core/data/temporary_files.hpp,
//   left when a writer was killed) lies in a split folder.
// One line per problem (naming the file), then a summary; an exception
// (non-zero exit) when anything is wrong. Files are checked in parallel.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "deepcam/data_set.hpp"
#include "progress.hpp"

namespace deepcam::data {

struct VerifyOptions {
  std::filesystem::path root;
  int threads = 0;  // 0: one per core, at most 16
  ProgressOptions progress;  // progress lines on stderr; the report on stdout stays
};

// Prints the problems and the summary to stdout; throws deepcam::Error
// (counting the problems) when there is any.
void run_verify(const VerifyOptions& options);

// The stats.h5 checks of verify, one line per problem naming the file (none:
// training can normalise with it), on every channel; `channels` is the
// samples' channel count (-1: unknown). convert applies them too before it
// copies the file. With none, `scales` (if given) receives each channel's
// normalisation, as training computes it.
std::vector<std::string> stats_problems(const std::filesystem::path& root, std::int64_t channels,
                                        std::vector<ChannelScale>* scales = nullptr);

}  // namespace deepcam::data
