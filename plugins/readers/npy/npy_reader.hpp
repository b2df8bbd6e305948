// Description
//   Reads the numpy variant of the DeepCAM data set (SPEC 1.5): per sample
//   `<split>/data-X.npy` (height, width, channel) and `<split>/label-X.npy`
//   (height, width), data and labels of any integer, bool or float dtype
//   (data converted to float32, as the hdf5 reader converts it), either byte order, C or Fortran order, format 1.0, 2.0 or
//   3.0, with `<data_root>/stats.h5` beside the splits. Channel selection,
//   min/max normalisation and transposition to (C, H, W) are those of the
//   hdf5 reader (SPEC 1.4): the same data gives the same batches bit for bit.
//   Training samples are distributed by shuffle_mode (SPEC 2.1, 2.2; see
//   deepcam/sharding.hpp): the reference's global shuffle, or per-node or
//   per-rank shards permuted within, with NVIDIA's data_oversampling_factor.
//   Validation is split into contiguous blocks (SPEC 2.3). The files of one
//   batch are read by a pool of threads owned by the reader, in one of three
//   io modes:
//     - "mmap" (default): each file is memory-mapped and decoded in place.
//       Best when the data set fits in the page cache (warm: nothing is
//       copied); cold, the page faults reach only about 70 % of the disk's
//       speed (docs/benchmarks.md). A file that shrinks while it is read
//       (rewritten in place) is an error naming it, not a SIGBUS
//       (mapping_guard.hpp).
//     - "pread": each file is read whole with buffered pread() into a buffer
//       the worker reuses, then decoded. For a cold page cache on a local
//       disk: large read() calls, as numpy.load makes, reach the disk's
//       speed; warm, it costs one extra copy of each file.
//     - "direct": O_DIRECT reads into 4 KiB-aligned buffers, no page cache.
//       For parallel file systems where a sample is read once per epoch and
//       caching it only evicts others; on a local disk O_DIRECT is usually
//       slower than the page cache.
//   With mmap and pread the kernel is asked to read the next batch's files
//   ahead while this batch is decoded (posix_fadvise WILLNEED).
//
// Usage
//   [reader]
//   name = "npy"
//   threads = 8
//   io = "mmap"
//   shuffle_mode = "global"
//   data_oversampling_factor = 1
//   check_finite = true
//
// Parameters
//   Property                 | Description                                         | Required | Default
//   -------------------------|-----------------------------------------------------|----------|---------
//   threads                  | files of a batch read in parallel (1..256)          | no       | 4
//   io                       | "mmap", "pread" (cold cache) or "direct" (O_DIRECT) | no       | "mmap"
//   shuffle_mode             | "global" (reference), "node" or "gpu" (SPEC 2.2)    | no       | "global"
//   data_oversampling_factor | shards per rank cycled over epochs (node, gpu only) | no       | 1
//   check_finite             | refuse a sample holding NaN or Inf, naming the file | no       | true
//
//   The data root, channels, batch sizes, rank, local rank and size, world
//   size and seed come from the host (ReaderContext), not from this table.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "deepcam/file_reader.hpp"
#include "deepcam/params.hpp"
#include "deepcam/reader.hpp"
#include "deepcam/sharding.hpp"

namespace deepcam::readers {

enum class NpyIo { Mmap, Direct, Pread };

struct NpyReaderOptions {
  int threads = 4;
  NpyIo io = NpyIo::Mmap;
  ShuffleMode shuffle_mode = ShuffleMode::Global;
  std::int64_t data_oversampling_factor = 1;
  bool check_finite = true;
  std::string where = "[reader]";  // "run.toml [reader]", for messages

  static NpyReaderOptions from(const Params& params);
};

// A FileReader (deepcam/file_reader.hpp: iteration, sharding, stats.h5,
// batch buffers) over the .npy pairs of npy_reader.cpp: its sample_files()
// are {data-X.npy, label-X.npy}, and so are the files read_sample() takes.
class NpyReader final : public FileReader {
 public:
  // Lists both splits (every data file needs its label file), reads
  // stats.h5 and the first training file's header; every problem is a
  // deepcam::Error naming the file, directory or setting.
  NpyReader(const ReaderContext& context, const NpyReaderOptions& options);
};

}  // namespace deepcam::readers
