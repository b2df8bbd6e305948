// `deepcam-data convert SRC DST [--threads N] [--verify]`: the numpy variant
// of a data set (SPEC 1.5). Every `SRC/<split>/data-X.h5` becomes
// `DST/<split>/data-X.npy` (climate/data as float32, (H, W, C)) and
// `DST/<split>/label-X.npy` (climate/labels_0 in its stored dtype, (H, W));
// SRC/stats.h5 is copied to DST/stats.h5 once every sample is converted.
//
// - Parallel over threads, and over ranks when started by mpirun or srun:
//   of all samples sorted by split and name, rank r of P takes every P-th
//   (the rank from OMPI_COMM_WORLD_RANK/SIZE, PMI_RANK/PMI_SIZE or
//   SLURM_PROCID/SLURM_NTASKS). Rank 0 copies stats.h5.
// - Resumable: a pair whose headers match the source's shapes and dtypes and
//   whose sizes are right is skipped; `--verify` also compares every value
//   with the source and converts a pair that differs again.
// - Every output goes through npy::write (a temporary name, then rename): an
//   interrupted or failed run leaves only complete files. A sample that
//   cannot be read, or an entry named like a sample that is not a file (a
//   FIFO, a directory, a link loop: deepcam/data_set.hpp's listing), is
//   reported and the others are still converted; a failed write (a full
//   disk) stops the run.
// - A set training refuses (train/ or validation/ missing or empty, a
//   stats.h5 verify refuses: deepcam/data_set.hpp's rule) is refused before
//   anything is written.
// - Progress lines on stderr (progress.hpp), a line per repaired pair, and
//   a summary; only errors with progress.quiet.
//
// This file also holds what verify shares with convert: reading a sample's
// HDF5 file with its stored types (parallel.hpp holds the thread loop).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "deepcam/data_set.hpp"
#include "deepcam/h5.hpp"
#include "deepcam/npy.hpp"
#include "progress.hpp"

namespace deepcam::data {

struct ConvertOptions {
  std::filesystem::path src, dst;
  int threads = 0;  // 0: one per core, at most 16
  bool verify = false;
  ProgressOptions progress;  // quiet also drops the repaired lines and the summary
};

void run_convert(const ConvertOptions& options);

// Why SRC and DST cannot be converted one into the other, or "": DST inside
// SRC (its splits and stats.h5 would join the source set), or SRC inside a
// split folder DST writes. DST == SRC is allowed (pairs beside the HDF5
// files). A bad command line: deepcam-data exits 2.
std::string convert_paths_problem(const std::filesystem::path& src, const std::filesystem::path& dst);

// One sample file of SPEC 1.1 opened for reading, with the types it stores:
// the .npy copy keeps the labels' dtype, and verify compares dtypes across
// files. Thread-safe with any HDF5 build (h5::File serialises calls when the
// library is not thread-safe).
class H5Sample {
 public:
  explicit H5Sample(const std::filesystem::path& path);  // opens; checks shapes (data_shape_problem) and (H, W)

  const std::string& path() const { return file_.path(); }
  const std::vector<std::int64_t>& data_shape() const { return data_shape_; }
  const std::vector<std::int64_t>& label_shape() const { return label_shape_; }
  npy::DType data_dtype() const { return data_dtype_; }    // as stored
  npy::DType label_dtype() const { return label_dtype_; }  // as stored

  // climate/data converted to float32 (HDF5's conversion), count = product of data_shape.
  void read_data(std::vector<float>& out) const;
  // climate/labels_0 in its stored dtype, in this machine's byte order.
  void read_labels(std::vector<unsigned char>& out) const;

 private:
  h5::File file_;
  std::vector<std::int64_t> data_shape_, label_shape_;
  npy::DType data_dtype_ = npy::DType::Float32, label_dtype_ = npy::DType::Int32;
};

// The data of a .npy file whose header npy::read_header gave (which checked
// the file's size first, so nothing is allocated for a header's lie), as
// stored: npy::convert turns it into values. verify and stats read with it.
std::vector<unsigned char> read_npy_data(const std::filesystem::path& path, const npy::Header& header);

// "(768, 1152, 16)"
std::string shape_text(const std::vector<std::int64_t>& shape);

// Why climate/data of `shape` cannot be a sample, or "": not (height,
// width, channels), a dimension below 1 (the readers refuse it), or more
// float32 values than this machine's memory holds. H5Sample and stats
// check it before allocating anything.
std::string data_shape_problem(const std::vector<std::int64_t>& shape);

// What training refuses in a sample's values (convert and verify say it):
// "NaN at (row 3, column 7, channel 2)" for data of shape (H, W, C), or ""
// when every value is finite and, where `scales` holds one per channel
// (stats.h5's, as training normalises), normalises to a finite float32;
// `stored` is the file's dtype: in a float64 file an Inf read as float32
// may be a finite value beyond float32's range, and the message says so.
std::string non_finite(const std::vector<float>& data, const std::vector<std::int64_t>& shape,
                       const std::vector<ChannelScale>& scales = {}, npy::DType stored = npy::DType::Float32);
// "value 3 at (row 1, column 5)" for labels of shape (H, W), or "" when every
// label is a class (0, 1 or 2).
std::string bad_labels(const std::vector<std::int64_t>& labels, const std::vector<std::int64_t>& shape);
// The same for labels as sample.read_labels gives them (its stored dtype).
std::string bad_labels(const H5Sample& sample, const std::vector<unsigned char>& stored);

}  // namespace deepcam::data
