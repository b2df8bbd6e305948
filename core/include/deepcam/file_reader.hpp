// What every reader of one-sample-per-file data sets (the hdf5 and npy
// plugins) does the same way, so that a format plugin only says how its
// files are listed and decoded. FileReader implements the whole Reader
// interface; a FileFormat, given to it by the plugin, answers its questions:
//   - list_split():    the split's samples, in name order, as columns of
//                      files (column 0 the data files, others beside them);
//   - make_sharding(): the training distribution (shuffle mode, checks);
//   - read_shape():    height, width and channels of the first training
//                      file, which every later file must match (as the
//                      reference does);
//   - make_scratch() and load(): one sample's files decoded and normalised
//                      into the batch, with buffers a worker thread reuses
//                      (or, in read_sample_selected(), only decoded and
//                      channel-selected: see normalise());
//   - reads_ahead():   whether the next batch's files are handed to the
//                      kernel's read-ahead (useless with O_DIRECT).
// FileReader checks the context, reads stats.h5 (per-channel min and max),
// runs the files of a batch on a WorkerPool, hands out batches from a small
// pool of buffers that are filled again once the caller has let go of them
// (a warm step allocates no batch memory), lays the batch out as the run's
// memory format asks (channels_last: no transposition at all), decodes and
// checks labels, and names a file in every error.
//
// An implementation helper in core, not part of the plugin interface
// (deepcam/reader.hpp): a plugin may build on it or implement Reader itself.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "deepcam/export.hpp"
#include "deepcam/normalise.hpp"
#include "deepcam/reader.hpp"
#include "deepcam/sharding.hpp"

namespace deepcam {

// "(2, 3)", "(16,)": a shape as NumPy and h5py print it, for messages.
DEEPCAM_API std::string shape_text(const std::vector<std::int64_t>& shape);

struct SampleShape {
  std::int64_t height;
  std::int64_t width;
  std::int64_t channels;  // in the file, before selection
};

class FileReader;

class DEEPCAM_API FileFormat {
 public:
  // Buffers one worker (or one read_sample() call) reuses from sample to
  // sample; each format derives its own.
  struct Scratch {
    virtual ~Scratch();
  };

  virtual ~FileFormat();

  // The samples in `dir` (<data_root>/<split>, a directory; split is
  // "train" or "validation"): column k holds file k of every sample, sorted
  // by the data file's name, every column as long as column 0.
  virtual std::vector<std::vector<std::string>> list_split(const std::string& dir,
                                                           const char* split) const = 0;
  // The training distribution over `setup.files` samples of `train_dir`
  // (setup filled in from the context); throws naming what to change.
  virtual std::unique_ptr<TrainingSharding> make_sharding(const std::string& train_dir,
                                                          const ShardingSetup& setup) const = 0;
  virtual SampleShape read_shape(const std::string& path) const = 0;
  virtual std::unique_ptr<Scratch> make_scratch() const = 0;
  // Reads the sample held by `files` into data (C*H*W, normalised with
  // reader.normalise()) and labels (H*W, with reader.decode_labels()),
  // checking it against reader.shape(). `data` must be written by
  // reader.normalise() only, as its last step: under read_sample_hwc(),
  // read_sample_selected() and a channels_last next() that call writes
  // (H, W, C) order instead, so the format needs no second code path.
  // Thread-safe; errors should name a file (FileReader puts files[0] in
  // front of a message that names none).
  virtual void load(const FileReader& reader, const std::vector<std::string>& files, float* data,
                    std::int64_t* labels, Scratch& scratch) const = 0;
  // Whether next() asks the kernel to read the next batch's files ahead.
  virtual bool reads_ahead() const { return true; }
};

class DEEPCAM_API FileReader : public Reader {
 public:
  // What differs between formats in FileReader's checks and messages.
  struct Format {
    std::string name;              // "hdf5 reader": begins messages naming no file
    std::size_t files_per_sample;  // columns of list_split()
    std::string sample_is;         // read_sample()'s hint: "an HDF5 sample is one .h5 file"
    std::string stats_hint;        // after "the data root must hold stats.h5"
    bool stats_count_values;       // stats shape named as "N values" (else "shape (N,)")
    int threads;                   // worker threads
    bool check_finite;             // refuse NaN and infinity
  };

  // Checks the context, lists both splits, builds the sharding, and reads
  // the first file's shape and stats.h5 (the worker threads start at the
  // first batch); every problem is a deepcam::Error naming the file,
  // directory or setting.
  FileReader(const ReaderContext& context, Format format, std::unique_ptr<FileFormat> file_format);
  ~FileReader() override;
  FileReader(const FileReader&) = delete;
  FileReader& operator=(const FileReader&) = delete;

  std::int64_t global_samples(Split split) const final;
  std::int64_t local_samples(Split split) const final;
  void start_epoch(Split split, std::int64_t epoch) final;
  bool next(Batch& batch) final;
  std::int64_t sample_count(Split split) const final;
  std::vector<std::string> sample_files(Split split, std::int64_t index) const final;
  std::vector<std::int64_t> sample_shape() const final;
  void read_sample(const std::vector<std::string>& files, float* data,
                   std::int64_t* labels) const final;

  // The same sample as read_sample() (same decoding, checks and messages,
  // NaN and infinity refused by the same rule), but with normalisation left
  // to the caller: data_hwc gets the selected channels, not normalised, in
  // the file's (H, W, C) order (H*W*C floats, C = context().channels.size()).
  // Then, in float32, read_sample()'s data equals bit for bit
  //   (scale() * (x - shift())).permute({2, 0, 1})
  // computed as two separate IEEE operations, subtract then multiply (two
  // at:: ops do that on CPU and CUDA alike; a fused multiply-add would not).
  // For a reader that normalises elsewhere (the prefetch reader, on the GPU).
  // Thread-safe, like read_sample().
  void read_sample_selected(const std::vector<std::string>& files, float* data_hwc,
                            std::int64_t* labels) const;
  // read_sample() in the file's (H, W, C) order: the same normalised values
  // bit for bit, not transposed (a channels_last batch's samples).
  // Thread-safe.
  void read_sample_hwc(const std::vector<std::string>& files, float* data_hwc, std::int64_t* labels) const;
  // Whether the context asked for channels_last batches (next() delivers
  // them so).
  bool channels_last() const;
  // Per selected channel, the min of stats.h5 and 1 / (max - min) computed
  // in the dtype stats.h5 stores (SPEC 1.4: float32 stats in float32
  // arithmetic, float64 in float64), both rounded to float32: what
  // normalisation subtracts and multiplies by, scale * (x - shift).
  const std::vector<float>& shift() const;
  const std::vector<float>& scale() const;

  // The split's data files (the first file of every sample), sorted by name.
  const std::vector<std::string>& files(Split split) const;
  // The data files the current epoch of the split begun last reads on this
  // rank, in reading order.
  std::vector<std::string> epoch_files() const;
  // The training distribution this reader follows.
  const TrainingSharding& sharding() const;

  // For FileFormat::load():
  const ReaderContext& context() const;
  const std::string& shape_source() const;  // the file that fixed the shape
  // Where the expected shape comes from, for a message about `path`: "as in
  // <shape_source()>", or, for that file itself, that it changed since.
  std::string shape_reference(const std::string& path) const;
  const SampleShape& shape() const;         // of shape_source()
  // normalise_sample() of raw ((H*W, C_file)) into data; with check_finite,
  // a NaN or infinity is refused naming `path`, `dataset` and the first
  // position holding one. Within read_sample_selected() (on its thread) it
  // writes select_channels() of raw instead, (H*W, C), refusing the same
  // samples with the same message.
  void normalise(const std::string& path, const char* dataset, const float* raw,
                 float* data) const;
  // deepcam::decode_labels() of H*W labels stored as `type` into `labels`
  // (`stored` may be `labels` for LabelType::Int64); a value that is not a
  // class id (0, 1, 2) is refused naming `path`, `dataset`, the position
  // and the value.
  void decode_labels(const std::string& path, const char* dataset, const void* stored, LabelType type,
                     std::int64_t* labels) const;

 private:
  void read_one(const std::vector<std::string>& files, float* data, std::int64_t* labels) const;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace deepcam
