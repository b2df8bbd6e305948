#include "hdf5_reader.hpp"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <utility>
#include <vector>

#include "deepcam/data_set.hpp"
#include "deepcam/error.hpp"
#include "deepcam/h5.hpp"
#include "deepcam/mapping_guard.hpp"
#include "deepcam/sharding.hpp"

namespace deepcam::readers {

namespace fs = std::filesystem;

namespace {

constexpr const char* kData = "climate/data";
constexpr const char* kLabels = "climate/labels_0";

std::string h5_shape_text(const h5::Shape& shape) {
  return deepcam::shape_text(std::vector<std::int64_t>(shape.begin(), shape.end()));
}

void require_dataset(const h5::File& file, const char* dataset) {
  if (!file.has(dataset))
    throw Error(file.path() + ": no dataset " + dataset + " (a DeepCAM sample holds " + kData +
                " and " + kLabels + ")");
}

// The label type the core decodes for a stored integer or float type; none
// for anything else.
std::optional<LabelType> label_type(const h5::StoredType& stored) {
  using Kind = h5::StoredType::Kind;
  if (stored.kind == Kind::Integer) {
    switch (stored.size) {
      case 1: return stored.is_signed ? LabelType::Int8 : LabelType::UInt8;
      case 2: return stored.is_signed ? LabelType::Int16 : LabelType::UInt16;
      case 4: return stored.is_signed ? LabelType::Int32 : LabelType::UInt32;
      case 8: return stored.is_signed ? LabelType::Int64 : LabelType::UInt64;
      default: return std::nullopt;
    }
  }
  if (stored.kind == Kind::Float) {
    switch (stored.size) {
      case 2: return LabelType::Float16;
      case 4: return LabelType::Float32;
      case 8: return LabelType::Float64;
      default: return std::nullopt;
    }
  }
  return std::nullopt;
}

std::size_t label_bytes(LabelType type) {
  switch (type) {
    case LabelType::Int8:
    case LabelType::UInt8: return 1;
    case LabelType::Int16:
    case LabelType::UInt16:
    case LabelType::Float16: return 2;
    case LabelType::Int32:
    case LabelType::UInt32:
    case LabelType::Float32: return 4;
    default: return 8;
  }
}

}  // namespace

Hdf5ReaderOptions Hdf5ReaderOptions::from(const Params& params) {
  Hdf5ReaderOptions options;
  options.threads = static_cast<int>(params.integer("threads"));
  options.check_finite = params.boolean("check_finite");
  return options;
}

namespace {

// The .h5 files: one per sample, group climate, datasets data (H, W, C) and
// labels_0 (H, W).
class Hdf5Format final : public FileFormat {
 public:
  std::vector<std::vector<std::string>> list_split(const std::string& dir,
                                                   const char* split) const override;
  std::unique_ptr<TrainingSharding> make_sharding(const std::string& train_dir,
                                                  const ShardingSetup& setup) const override {
    // The reference's only distribution: a global shuffle every epoch.
    if (setup.files < setup.world_size)
      throw Error(train_dir + ": " + std::to_string(setup.files) + " files for " +
                  std::to_string(setup.world_size) +
                  " ranks; every rank needs at least one training sample");
    return std::make_unique<TrainingSharding>(setup);
  }
  SampleShape read_shape(const std::string& path) const override {
    h5::File file = h5::File::open(path);
    require_dataset(file, kData);
    require_dataset(file, kLabels);
    const h5::Shape shape = file.shape(kData);
    if (shape.size() != 3 || shape[0] == 0 || shape[1] == 0 || shape[2] == 0)
      throw Error(path + ": " + kData + " has shape " + h5_shape_text(shape) +
                  ", expected (height, width, channel)");
    // Checked here, before stats.h5 is compared with the channels: data
    // stored (channel, height, width) was blamed on stats.h5.
    const h5::Shape labels = file.shape(kLabels);
    if (labels != h5::Shape{shape[0], shape[1]})
      throw Error(path + ": " + kLabels + " has shape " + h5_shape_text(labels) + ", but " + kData + " is " +
                  h5_shape_text(shape) + ": the labels must be (height, width) of the data, which is (height, "
                  "width, channel)");
    return {static_cast<std::int64_t>(shape[0]), static_cast<std::int64_t>(shape[1]),
            static_cast<std::int64_t>(shape[2])};
  }
  // One per worker: each worker has one file open at a time, so HDF5 keeps
  // room for as many open files as scratches were made (h5.hpp).
  std::unique_ptr<FileFormat::Scratch> make_scratch() const override {
    h5::keep_room_for_open_files(++scratches_);
    return std::make_unique<Scratch>();
  }
  void load(const FileReader& reader, const std::vector<std::string>& files, float* data,
            std::int64_t* labels, FileFormat::Scratch& scratch) const override;

 private:
  mutable std::atomic<int> scratches_{0};

  // What one worker reuses from sample to sample.
  struct Scratch : FileFormat::Scratch {
    std::vector<float> raw;              // the data as stored, (H, W, C)
    std::vector<std::uint64_t> labels;   // the labels as stored (8-byte aligned)
  };
};

std::vector<std::vector<std::string>> Hdf5Format::list_split(const std::string& dir,
                                                             const char* split) const {
  // The core's listing (deepcam/data_set.hpp), sorted, refuses entries that
  // are not files, as deepcam-data does.
  std::vector<std::string> files = list_sample_files(dir, "", ".h5");
  if (files.empty()) {
    const bool saw_npy = !list_sample_files(dir, "", ".npy").empty();
    throw Error(dir + ": no .h5 files in the " + split + " split" +
                (saw_npy ? " (it holds .npy files: read them with reader \"npy\")" : ""));
  }
  return {std::move(files)};
}

void Hdf5Format::load(const FileReader& reader, const std::vector<std::string>& files,
                      float* data, std::int64_t* labels, FileFormat::Scratch& base) const {
  Scratch& scratch = static_cast<Scratch&>(base);
  const std::string& path = files.front();
  const auto height = static_cast<std::uint64_t>(reader.shape().height);
  const auto width = static_cast<std::uint64_t>(reader.shape().width);
  const auto file_channels = static_cast<std::uint64_t>(reader.shape().channels);
  const std::size_t pixels = height * width;
  std::vector<float>& raw = scratch.raw;
  // float32 data in this machine's byte order, stored as one plain run of
  // bytes, is normalised straight from the page cache (a mapping of the
  // file); anything else is read into `raw` first.
  h5::MappedBytes mapped;
  std::size_t mapped_bytes = 0;
  const float* stored = nullptr;
  // HDF5 runs one call at a time (its thread-safe build holds a global lock;
  // the h5 layer serialises other builds). The h5 layer reads a contiguous,
  // unfiltered dataset (what deepcam-data synth and h5py's defaults write)
  // with pread outside that lock, HDF5 only saying where its bytes lie, so
  // the pool's threads read their samples in parallel. Chunked or
  // compressed files still go through HDF5, one call at a time.
  {
    h5::File file = h5::File::open(path);
    require_dataset(file, kData);
    require_dataset(file, kLabels);
    const h5::Shape data_shape = file.shape(kData);
    if (data_shape != h5::Shape{height, width, file_channels})
      throw Error(path + ": " + kData + " has shape " + h5_shape_text(data_shape) + ", expected " +
                  h5_shape_text({height, width, file_channels}) + " (height, width, channel) " +
                  reader.shape_reference(path));
    const h5::Shape label_shape = file.shape(kLabels);
    if (label_shape != h5::Shape{height, width})
      throw Error(path + ": " + kLabels + " has shape " + h5_shape_text(label_shape) + ", expected " +
                  h5_shape_text({height, width}) + " " + reader.shape_reference(path));
    const h5::StoredType data_type = file.stored_type(kData);
    if (data_type.kind == h5::StoredType::Kind::Float && data_type.size == sizeof(float)) {
      mapped_bytes = pixels * file_channels * sizeof(float);
      mapped = file.map_stored(kData, mapped_bytes);
    }
    if (mapped && reinterpret_cast<std::uintptr_t>(mapped.data()) % alignof(float) == 0) {
      stored = static_cast<const float*>(mapped.data());
    } else {
      raw.resize(pixels * file_channels);
      file.read(kData, raw.data(), raw.size());
      stored = raw.data();
    }
    // Labels are read as stored and converted to int64 by the reader, which
    // checks on the way that each is a class id: HDF5's own conversion would
    // truncate 0.5 to 0 and let 7 through. An integer or float type the
    // core decodes; anything else (an enum, say) is converted by HDF5 first.
    if (const auto type = label_type(file.stored_type(kLabels))) {
      scratch.labels.resize((pixels * label_bytes(*type) + 7) / 8);
      file.read_stored(kLabels, scratch.labels.data(), pixels * label_bytes(*type));
      reader.decode_labels(path, kLabels, scratch.labels.data(), *type, labels);
    } else {
      file.read(kLabels, labels, pixels);
      reader.decode_labels(path, kLabels, labels, LabelType::Int64, labels);
    }
  }
  // Read in place from the mapping, under the guard: a file that shrinks
  // meanwhile is an error naming it, not a SIGBUS (deepcam/mapping_guard.hpp).
  if (stored == mapped.data()) {
    read_mapping(path, static_cast<const unsigned char*>(mapped.data()), mapped_bytes,
                 [&] { reader.normalise(path, kData, stored, data); });
  } else {
    reader.normalise(path, kData, stored, data);
  }
}

}  // namespace

Hdf5Reader::Hdf5Reader(const ReaderContext& context, const Hdf5ReaderOptions& options)
    : FileReader(context,
                 {"hdf5 reader", 1, "an HDF5 sample is one .h5 file",
                  " (deepcam-data stats writes it)", false, options.threads, options.check_finite},
                 std::make_unique<Hdf5Format>()) {}

}  // namespace deepcam::readers
