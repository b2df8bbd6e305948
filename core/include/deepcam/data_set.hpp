// The layout of a data set root (SPEC 1) as the training readers and
// deepcam-data (convert, verify, stats) all see it: one listing of a split
// folder's sample files, one pairing of the numpy form's files, and one rule
// for what a root must hold before training reads a sample. Every reader and
// tool goes through these, so that what one refuses the others refuse too.
//
// Each function either throws deepcam::Error at the first problem (problems
// == nullptr: the readers' set-up) or appends one line per problem, naming
// the path, and carries on (verify and convert, which report every bad file).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "deepcam/export.hpp"

namespace deepcam {

// The entries of `dir` named PREFIX*EXTENSION (hidden entries, whose names
// begin with '.', left out), sorted by name (byte order: the reference's
// sorted()). Every such entry must be a regular file or a symbolic link to
// one; anything else (a directory, a FIFO, a socket, a device, a dangling
// link, a link loop), and a name holding a control character, is a problem
// naming it, and is left out of the list.
// Only stat() is used, never open(), so a FIFO cannot block the caller.
// A directory that cannot be listed is always thrown.
DEEPCAM_API std::vector<std::string> list_sample_files(const std::string& dir, const std::string& prefix,
                                                       const std::string& extension,
                                                       std::vector<std::string>* problems = nullptr);

// The numpy form of a split folder (SPEC 1.5): data-X.npy beside label-X.npy,
// paired by X, sorted by the data file's name. A data file without its label
// file, or a label file without its data file, is a problem naming it (and
// the pair is left out); so is any entry list_sample_files() refuses. In a
// folder that holds both forms (a convert in place), a data-X.h5 without
// its pair is a problem too: the numpy form is not yet the whole split.
struct NpySplit {
  std::vector<std::string> data;
  std::vector<std::string> labels;  // labels[k] belongs to data[k]
};
DEEPCAM_API NpySplit list_npy_split(const std::string& dir, std::vector<std::string>* problems = nullptr);

// The rule training applies to a data set root before it reads a sample,
// which deepcam-data verify applies too:
//  - ROOT/train and ROOT/validation are directories (split_folder_problem);
//  - each holds at least one sample (empty_split_problem);
//  - ROOT/stats.h5 is a regular file whose climate/minval and
//    climate/maxval normalise every channel used (stats_range_problem;
//    training checks the selected channels, verify and convert, which have
//    no run file, every channel).
// Each returns "" when the rule holds, else the complete message.
DEEPCAM_API extern const char* const kDataSplits[2];  // "train", "validation"
DEEPCAM_API std::string split_folder_problem(const std::string& root, const std::string& split);
// "" when `path` is a directory (or a link to one), else what it is: "no
// such directory", "a symbolic link loop", "a file, not a directory", ...
DEEPCAM_API std::string directory_problem(const std::string& path);
// "" when `path` is a directory (or a link to one) or names nothing yet (a
// folder a tool may make, with the folders on its way), else what it is, or
// what stands on its way: "a symbolic link to T that leads to nothing", "on
// its way, P is a file, not a directory", "a symbolic link loop", ...
DEEPCAM_API std::string output_directory_problem(const std::string& path);
// `what` says what a sample is here ("data-*.h5 files", ...).
DEEPCAM_API std::string empty_split_problem(const std::string& dir, const std::string& split,
                                            const std::string& what);
DEEPCAM_API std::string stats_file_problem(const std::string& root);

// SPEC 1.4's normalisation of one channel: shift = float32(min), scale =
// float32(1 / (max - min)) with the subtraction and division done in the
// dtype stats.h5 stores. `arithmetic_bytes` names that dtype (stats_arithmetic_bytes):
// 2 float16, 4 float32, 8 float64. stats_range_problem() is "" when both
// bounds are finite, max > min, the shift is finite and the scale a
// positive finite float32 (then `*scale`, if given, holds the channel's),
// else the message naming the cause: the channel would normalise to
// zeros, infinities or NaNs.
struct ChannelScale {
  float shift = 0.0f;
  float scale = 0.0f;
};
DEEPCAM_API std::string stats_range_problem(const std::string& stats_path, std::int64_t channel, double min,
                                            double max, std::size_t arithmetic_bytes, ChannelScale* scale = nullptr);
// The dtype NumPy computes 1 / (maxval - minval) in, from the two datasets'
// stored types (`float_bytes` 0 for an integer type, else the float's size):
// their promotion, integers going through float64.
DEEPCAM_API std::size_t stats_arithmetic_bytes(std::size_t minval_float_bytes, std::size_t maxval_float_bytes);

}  // namespace deepcam
