// Description
//   Wraps another reader (named in a nested table, [reader.source]) and reads
//   ahead: `threads` worker threads read the samples of the next `depth`
//   batches into a ring of preallocated batch buffers while the training
//   step runs, so that the step does not wait on the file system while the
//   ring is full. The source reader supplies the samples (its sample_files /
//   read_sample: file format, channel selection, normalisation); this reader
//   decides the order, with the core's sharding (deepcam/sharding.hpp,
//   SPEC 2): shuffle_mode global, node or gpu and data_oversampling_factor.
//   Workers take the samples strictly in order and each batch has its own
//   slot, so the batches depend on the seed only, never on the number of
//   threads; in global mode they equal the source reader's own batches.
//
//   Across epochs: once every sample of the current epoch has been taken,
//   the workers go on to the epochs the engine begins next, whose order is
//   known in advance (the training order depends on (seed, epoch) only,
//   validation's on nothing): after training epoch e, the first `depth`
//   batches of validation and of training epoch e + 1; after validation,
//   those of the next training epoch. start_epoch() of one of them keeps
//   what was read, so the epoch's first batch does not wait; start_epoch()
//   of any other (a resume, an evaluation, a repeated or skipped epoch)
//   discards them, and reads still in flight for them are dropped as they
//   land. Either way next() returns exactly the batches of the plain reader
//   (the tests check every kind of call sequence), and a failed read ahead
//   is reported only if its epoch is begun, at its batch.
//
//   Memory: a pool of 2 * depth + 2 batch buffers, of the larger of the
//   training and validation batch sizes: the current epoch's depth + 2
//   (the batch handed out, the one before it, depth read ahead) and depth
//   more for the epochs read ahead, which never take the current epoch's.
//   That is depth buffers more than a ring without read-ahead across
//   epochs: a peak rise of depth x batch x (C*H*W*4 + H*W*8) bytes of host
//   memory (pinned on CUDA), and on CUDA as much GPU memory for their
//   copies. For the full-size DeepCAM sample (16 x 768 x 1152), batch 2 and
//   depth 4 that is 4 x 2 x 63.7 MB = 510 MB.
//
//   On CUDA ([run] device = "cuda") the ring is pinned host memory and each
//   batch is copied to the GPU on a side stream as soon as it is complete
//   (device_copy.hpp); next() hands out GPU tensors. What runs where: over a
//   file reader (hdf5, npy) the workers only decode and select channels
//   (FileReader::read_sample_selected) and the side stream normalises and
//   transposes each batch on the GPU after its copy, with the same float32
//   operations, so the batches equal the CPU path's bit for bit; over any
//   other source, and on the CPU, the source's read_sample() normalises on
//   the CPU.
//
//   With [run] memory_format = "channels_last" over a file reader, nothing
//   is transposed anywhere: the samples stay (H, W, C) in the ring
//   (normalised by FileReader::read_sample_hwc on the CPU, or after the
//   copy on the GPU) and next() hands out (B, C, H, W) channels_last views
//   of them. Over any other source the batches stay (B, C, H, W)
//   contiguous and the engine converts them.
//
//   Staging (stage_dir set): during construction the samples this rank may
//   ever read (its training shard in gpu mode, its node's in node mode,
//   everything in global mode; plus its validation samples) are copied into
//   a fresh directory under stage_dir, each copy checked, between MLPerf
//   staging_start and staging_stop; all reads then go to the copies, which
//   are removed when the reader goes (also after an error; a run killed by a
//   signal cannot, and the next one staging there warns about what it left).
//   A sample the source refuses is named by its original file, the copy
//   beside it: the copy is gone by the time the user reads the message.
//   In node mode with several ranks on the node (ReaderContext::node_group)
//   the node's shard is copied once per node: node-rank 0 creates the
//   directory and shares its name over the node group, the node's ranks
//   split the copying, wait for each other, and each reads from all of the
//   node's copies; node-rank 0 removes the directory once no rank of the
//   node uses it (the rule: staging.hpp). staging_stop then counts the
//   node's files and bytes. Otherwise (global and gpu mode, one rank on the
//   node) each rank makes its own copy.
//
// Usage
//   [reader]
//   name = "prefetch"
//   depth = 4
//   threads = 8
//   shuffle_mode = "node"
//   stage_dir = "/dev/shm"
//   [reader.source]
//   name = "npy"
//   io = "direct"
//
// Parameters
//   Property                 | Description                                          | Required | Default
//   -------------------------|------------------------------------------------------|----------|---------
//   source                   | table naming the source reader and its keys          | yes      |
//   depth                    | batches read ahead, also of the next epochs (1..1024)| no       | 4
//   threads                  | worker threads reading samples (1..256)              | no       | 4
//   shuffle_mode             | global, node or gpu (SPEC 2.1, 2.2)                  | no       | "global"
//   data_oversampling_factor | NVIDIA's oversampling, node/gpu modes (1..1024)      | no       | 1
//   stage_dir                | node-local directory to stage into; "" reads in place| no       | ""
//
//   The source's own shuffle settings, if it has any, are not used: this
//   reader asks it for single samples.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "deepcam/params.hpp"
#include "deepcam/reader.hpp"
#include "deepcam/sharding.hpp"

namespace deepcam::readers {

struct PrefetchOptions {
  int depth = 4;
  int threads = 4;
  ShuffleMode shuffle_mode = ShuffleMode::Global;
  std::int64_t oversampling_factor = 1;
  std::string stage_dir;  // empty: no staging
  std::string where;      // "run.toml [reader]", for messages
  // "run.toml:5 [reader] stage_dir = \"/dev/shm\"" (Params::setting), for messages.
  std::string stage_setting;
  // Node-shared staging: how long node-rank 0's reader, when it goes, waits
  // for the node's other ranks to let go of the directory before leaving its
  // removal to the last of them (staging.hpp). Not a run-file key.
  std::chrono::milliseconds stage_release_wait{10000};

  static PrefetchOptions from(const Params& params);
};

class PrefetchReader final : public Reader {
 public:
  // Takes the built source reader; `keep` holds whatever the source's code
  // needs to stay loaded (its plugin library) and is released after it.
  PrefetchReader(const ReaderContext& context, const PrefetchOptions& options, std::unique_ptr<Reader> source,
                 std::shared_ptr<const void> keep = nullptr);
  ~PrefetchReader() override;

  std::int64_t global_samples(Split split) const override;
  std::int64_t local_samples(Split split) const override;
  void start_epoch(Split split, std::int64_t epoch) override;
  // The batch stays valid until two more calls of next() or a start_epoch():
  // its buffer goes back to the pool then (or, if still referenced, is
  // replaced by a new one).
  bool next(Batch& batch) override;

  std::int64_t sample_count(Split split) const override;
  // The staged copies of the samples this rank staged, else the source's
  // files.
  std::vector<std::string> sample_files(Split split, std::int64_t index) const override;
  std::vector<std::int64_t> sample_shape() const override;
  // The source's read_sample(); its errors name staged copies by their
  // original files, as next()'s do.
  void read_sample(const std::vector<std::string>& files, float* data, std::int64_t* labels) const override;

  // Whether batches are normalised on the GPU: device "cuda" and a source
  // that is a deepcam::FileReader.
  bool normalises_on_device() const;
  // The staging directory ("" when not staging): with node-shared staging,
  // the same on all of the node's ranks.
  std::string staging_dir() const;
  // Files this rank copied while staging (with node-shared staging, its part
  // of the node's).
  std::int64_t files_copied() const;
  // Samples that this rank reads in the current epoch, in order (empty
  // before the first start_epoch()).
  const std::vector<std::int64_t>& epoch_order() const;

 private:
  void stop_workers();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace deepcam::readers
