// The reader interface: delivers normalised batches of one split, sharded
// over ranks (SPEC 1.4, 2). A reader is built once per run and serves both
// splits; start_epoch() resets one split's iteration (and its shuffle).
// Besides batches it offers single samples by index, so that wrapping readers
// (prefetch, staging) can read the samples they need in parallel, in their
// own order, from the original files or from copies of them.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "deepcam/export.hpp"
#include "deepcam/group.hpp"

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
  // Ranks on this node and this rank's place among them (shuffle_mode
  // "node": ranks rank - local_rank .. rank - local_rank + local_size - 1
  // share a node). The defaults describe one rank per node.
  int local_rank = 0;
  int local_size = 1;
  std::string device = "cpu";         // [run] device: "cpu" or "cuda"
  // The ranks on this node (local_size of them, in local_rank order), for
  // work done once per node such as staging; nullptr on one rank.
  Group* node_group = nullptr;
  // [run] memory_format: "contiguous" or "channels_last" (plugin ABI 3).
  // With "channels_last" a reader should hand out batches whose data has
  // channels_last strides (memory laid out (B, H, W, C), as
  // data.contiguous(at::MemoryFormat::ChannelsLast) would give), so that
  // the engine's conversion to the model's format copies nothing; the
  // samples of a CAM5 file are (H, W, C) already, so the reader then
  // transposes nothing either. Any layout stays correct: the engine
  // converts what it gets.
  std::string memory_format = "contiguous";
  // The splits this run reads (plugin ABI 6): training reads both;
  // --evaluate and --predict read validation only; --benchmark reads none
  // (it asks only for sample_shape()). A reader that prepares samples ahead
  // (staging, reading ahead) prepares only these.
  std::vector<Split> splits = {Split::Train, Split::Validation};
  // How many validation samples the run reads, the first in this reader's
  // order (plugin ABI 11): N for `--predict --samples N`, which writes the
  // predictions of the first N; 0 for all. A reader that prepares samples
  // ahead (staging, reading ahead) prepares only these, and may end the
  // split after them (local_samples(Validation) then says how many).
  std::int64_t validation_samples = 0;
};

struct Batch {
  // On the CPU: the engine moves batches to the device itself, without
  // waiting for the copy (non_blocking). From pinned memory that copy may
  // still be reading after the engine has let go of the tensors, so a
  // reader never writes again into pinned memory it handed out; pageable
  // memory (at::empty's) may be refilled once the engine has let go of it
  // (its storage's use_count is 1), as the SDK's FileReader does.
  at::Tensor data;    // (B, C, H, W) float32, normalised; strides: see ReaderContext::memory_format
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

  // Samples of the split over all ranks; sample i is the i-th in name order.
  virtual std::int64_t sample_count(Split split) const = 0;
  // The files that hold sample i (one .h5 file; or data-X.npy and label-X.npy).
  virtual std::vector<std::string> sample_files(Split split, std::int64_t index) const = 0;
  // The shape of one normalised sample: {C, H, W}.
  virtual std::vector<std::int64_t> sample_shape() const = 0;
  // Reads the sample held by `files` (those of sample_files(), or copies of them with
  // the same file names in another directory), channels selected and normalised,
  // into data (C*H*W float32, C-order) and labels (H*W int64). Thread-safe.
  virtual void read_sample(const std::vector<std::string>& files, float* data,
                           std::int64_t* labels) const = 0;
};

}  // namespace deepcam
