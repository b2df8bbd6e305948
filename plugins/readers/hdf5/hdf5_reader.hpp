// Description
//   Reads the DeepCAM HDF5 data set as the MLCommons reference does (SPEC
//   sections 1 and 2): one sample per file `<split>/*.h5` (group `climate`,
//   datasets `data` (H, W, C) and `labels_0` (H, W)), channel selection,
//   min/max normalisation from `<data_root>/stats.h5`, transposition to
//   (C, H, W). Training files are shuffled globally every epoch and sharded
//   over ranks exactly like PyTorch's DistributedSampler(shuffle=True,
//   drop_last=True); validation files are split into contiguous blocks,
//   unshuffled, so that every file is read once over all ranks (the order
//   functions are core's, deepcam/sharding.hpp). The files of
//   one batch are read by a small pool of threads owned by the reader.
//
// Usage
//   [reader]
//   name = "hdf5"
//   threads = 8
//   check_finite = true
//
// Parameters
//   Property     | Description                                            | Required | Default
//   -------------|--------------------------------------------------------|----------|--------
//   threads      | files of a batch read in parallel (1..256)             | no       | 4
//   check_finite | refuse a sample holding NaN or Inf, naming the file    | no       | true
//
//   The data root, channels, batch sizes, rank, world size and seed come from
//   the host (ReaderContext), not from this table.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "deepcam/file_reader.hpp"
#include "deepcam/params.hpp"
#include "deepcam/reader.hpp"

namespace deepcam::readers {

struct Hdf5ReaderOptions {
  int threads = 4;
  bool check_finite = true;

  static Hdf5ReaderOptions from(const Params& params);
};

// A FileReader (deepcam/file_reader.hpp: iteration, sharding, stats.h5,
// batch buffers) over the .h5 format of hdf5_reader.cpp.
class Hdf5Reader final : public FileReader {
 public:
  // Lists both splits, reads stats.h5 and checks the first training file's
  // shapes; every problem is a deepcam::Error naming the file or directory.
  Hdf5Reader(const ReaderContext& context, const Hdf5ReaderOptions& options);
};

}  // namespace deepcam::readers
