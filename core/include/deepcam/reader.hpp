// The reader interface: delivers normalised batches of one split, sharded
// over ranks (SPEC 1.4, 2). A reader is built once per run and serves both
// splits; start_epoch() resets one split's iteration (and its shuffle).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "deepcam/export.hpp"

namespace deepcam {

class MlperfLog;

enum class Split { Train, Validation };

DEEPCAM_API const char* to_string(Split split);

struct ReaderContext {
  std::string data_root;              // holds train/, validation/, stats.h5
  std::vector<std::int64_t> channels; // selected input channels, in order
  std::int64_t train_batch_size;      // local, per rank
  std::int64_t validation_batch_size; // local, per rank
  int rank;
  int world_size;
  std::uint64_t seed;
  MlperfLog* log;                     // for staging_start / staging_stop
};

struct Batch {
  at::Tensor data;    // (B, C, H, W) float32, normalised, on the CPU
  at::Tensor labels;  // (B, H, W) int64
};

class DEEPCAM_API Reader {
 public:
  virtual ~Reader();
  // Samples over all ranks, as MLPerf logs them (train_samples, eval_samples).
  virtual std::int64_t global_samples(Split split) const = 0;
  // Samples this rank reads in one epoch of the split.
  virtual std::int64_t local_samples(Split split) const = 0;
  // Begins the split's epoch `epoch` (counted from 0): the training order is
  // drawn from (seed, epoch).
  virtual void start_epoch(Split split, std::int64_t epoch) = 0;
  // Fills the next batch of the split begun last; false at the end. The
  // last batch may be smaller.
  virtual bool next(Batch& batch) = 0;
};

}  // namespace deepcam
