#include "hdf5_reader.hpp"

#include <ATen/ops/empty.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <mutex>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

#include "deepcam/error.hpp"
#include "deepcam/h5.hpp"
#include "deepcam/sharding.hpp"
#include "deepcam/worker_pool.hpp"
#include "normalise.hpp"

namespace deepcam::readers {

namespace fs = std::filesystem;

namespace {

constexpr const char* kData = "climate/data";
constexpr const char* kLabels = "climate/labels_0";
constexpr const char* kMinval = "climate/minval";
constexpr const char* kMaxval = "climate/maxval";

// Asks the kernel to start reading a file into the page cache and returns at
// once; a failure is ignored here (the read itself reports it).
void read_ahead(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_WILLNEED);
  ::close(fd);
}

// Whether `mine`, the tensor of the batch handed out last, may be filled
// again: its only holders are this reader and `held` (the caller's Batch,
// which next() overwrites anyway), no view shares its storage, and it has
// the shape wanted. A fresh batch costs more than reading it: the kernel
// maps and zeroes each of its pages on first touch (85 MB per full-size
// sample), so reusing the buffers saves that whenever the caller has let go
// of the previous batch. After a failed next() the batch holds partial data.
bool reusable(const at::Tensor& mine, const at::Tensor& held, at::IntArrayRef sizes) {
  if (!mine.defined() || mine.sizes() != sizes) return false;
  const bool in_batch = held.defined() && held.unsafeGetTensorImpl() == mine.unsafeGetTensorImpl();
  return mine.use_count() == (in_batch ? 2 : 1) && mine.storage().use_count() == 1;
}

std::string shape_text(const h5::Shape& shape) {
  std::ostringstream out;
  out << '(';
  for (std::size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << (shape.size() == 1 ? ",)" : ")");
  return out.str();
}

// Every message must name the file; the h5 layer's do, anything else (an
// allocation failure, say) gets the file put in front.
std::string naming(const std::string& path, const std::string& message) {
  if (message.find(path) != std::string::npos) return message;
  return path + ": " + message;
}

void require_dataset(const h5::File& file, const char* dataset) {
  if (!file.has(dataset))
    throw Error(file.path() + ": no dataset " + dataset + " (a DeepCAM sample holds " + kData +
                " and " + kLabels + ")");
}

std::vector<std::string> list_split(const std::string& data_root, const char* split) {
  const fs::path dir = fs::path(data_root) / split;
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    throw Error(dir.string() + ": no such directory; the data root must hold train/, "
                "validation/ and stats.h5");
  std::vector<std::string> files;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() == ".h5" && entry.is_regular_file()) files.push_back(entry.path());
  }
  if (files.empty()) throw Error(dir.string() + ": no .h5 files in the " + split + " split");
  // Byte order of UTF-8 equals code-point order: the reference's sorted().
  std::sort(files.begin(), files.end());
  return files;
}

}  // namespace

Hdf5ReaderOptions Hdf5ReaderOptions::from(const Params& params) {
  Hdf5ReaderOptions options;
  options.threads = static_cast<int>(params.integer("threads"));
  options.check_finite = params.boolean("check_finite");
  return options;
}

struct Hdf5Reader::Impl {
  ReaderContext context;
  Hdf5ReaderOptions options;
  std::vector<std::string> train_files;
  std::vector<std::string> validation_files;
  std::string shape_source;  // the file that fixed H, W and the channel count
  std::uint64_t height = 0;
  std::uint64_t width = 0;
  std::uint64_t file_channels = 0;
  std::vector<float> shift;  // per selected channel
  std::vector<float> scale;

  bool started = false;
  at::Tensor last_data, last_labels;  // the batch handed out last, see reusable()
  Split split = Split::Train;
  std::vector<std::int64_t> order;
  std::size_t position = 0;

  // What one worker reuses from sample to sample.
  struct Scratch {
    std::vector<float> raw;            // the data as stored, (H, W, C)
    std::vector<std::int32_t> labels;  // int32 labels as stored
  };
  std::vector<Scratch> scratch;
  // Buffers of finished read_sample() calls, for the next ones: a fresh
  // buffer per call costs its page faults and zero fill (56 MB for a
  // full-size sample), about as much as decoding the sample.
  std::mutex spare_mutex;
  std::vector<Scratch> spare;
  std::unique_ptr<WorkerPool> pool;

  const std::vector<std::string>& files_of(Split s) const {
    return s == Split::Train ? train_files : validation_files;
  }

  void read_stats();
  void load(const std::string& path, float* data, std::int64_t* labels,
            Scratch& scratch) const;
  void normalise(const std::string& path, const float* raw, float* data) const;
};

void Hdf5Reader::Impl::read_stats() {
  const std::string path = (fs::path(context.data_root) / "stats.h5").string();
  std::error_code ec;
  if (!fs::is_regular_file(path, ec))
    throw Error(path + ": no such file; the data root must hold stats.h5 (deepcam-data stats "
                "writes it)");
  std::vector<double> minval(file_channels), maxval(file_channels);
  {
    h5::File file = h5::File::open(path);
    for (const char* dataset : {kMinval, kMaxval}) {
      if (!file.has(dataset)) throw Error(path + ": no dataset " + dataset);
      const h5::Shape shape = file.shape(dataset);
      if (shape != h5::Shape{file_channels})
        throw Error(path + ": " + dataset + " has shape " + shape_text(shape) + ", but " +
                    shape_source + " has " + std::to_string(file_channels) +
                    " channels; stats.h5 must hold one value per channel");
    }
    file.read(kMinval, minval.data(), minval.size());
    file.read(kMaxval, maxval.data(), maxval.size());
  }
  for (const std::int64_t c : context.channels) {
    const double lo = minval[c], hi = maxval[c];
    // The reference computes 1 / (max - min) in the statistics' precision and
    // applies scale * (x - min) in float32; doing the same keeps its values
    // bit for bit where the division form could differ in the last place.
    const double reciprocal = 1.0 / (hi - lo);
    if (!(hi > lo) || !std::isfinite(reciprocal))
      throw Error(path + ": channel " + std::to_string(c) + " has " + kMinval + " " +
                  std::to_string(lo) + " and " + kMaxval + " " + std::to_string(hi) +
                  "; max must exceed min to normalise");
    shift.push_back(static_cast<float>(lo));
    scale.push_back(static_cast<float>(reciprocal));
  }
}

void Hdf5Reader::Impl::load(const std::string& path, float* data, std::int64_t* labels,
                            Scratch& scratch) const {
  const std::size_t pixels = height * width;
  std::vector<float>& raw = scratch.raw;
  raw.resize(pixels * file_channels);
  bool widen = false;
  // HDF5 runs one call at a time (its thread-safe build holds a global lock;
  // the h5 layer serialises other builds), so of a sample only the
  // conversion to the batch layout below runs in parallel.
  {
    h5::File file = h5::File::open(path);
    require_dataset(file, kData);
    require_dataset(file, kLabels);
    const h5::Shape data_shape = file.shape(kData);
    if (data_shape != h5::Shape{height, width, file_channels})
      throw Error(path + ": " + kData + " has shape " + shape_text(data_shape) + ", expected " +
                  shape_text({height, width, file_channels}) + " (height, width, channel) as in " +
                  shape_source);
    const h5::Shape label_shape = file.shape(kLabels);
    if (label_shape != h5::Shape{height, width})
      throw Error(path + ": " + kLabels + " has shape " + shape_text(label_shape) + ", expected " +
                  shape_text({height, width}) + " as in " + shape_source);
    file.read(kData, raw.data(), raw.size());
    // int32 labels (the reference's) are read as they are and widened to
    // int64 below, outside HDF5's one-call-at-a-time lock, rather than by
    // HDF5's type conversion inside it; other types go through HDF5.
    const h5::StoredType stored = file.stored_type(kLabels);
    widen = stored.kind == h5::StoredType::Kind::Integer && stored.is_signed && stored.size == 4;
    if (widen) {
      scratch.labels.resize(pixels);
      file.read_stored(kLabels, scratch.labels.data(), pixels * sizeof(std::int32_t));
    } else {
      file.read(kLabels, labels, pixels);
    }
  }
  if (widen) std::copy(scratch.labels.begin(), scratch.labels.end(), labels);
  normalise(path, raw.data(), data);
}

void Hdf5Reader::Impl::normalise(const std::string& path, const float* raw, float* data) const {
  const std::size_t pixels = height * width;
  const std::size_t channels = context.channels.size();
  // normalise.hpp only says whether a NaN or infinity came out; the loop
  // below finds the first one to name it.
  const bool finite = detail::normalise_sample(raw, static_cast<std::int64_t>(pixels),
                                               static_cast<std::int64_t>(file_channels), context.channels, shift,
                                               scale, data);
  if (finite || !options.check_finite) return;
  for (std::size_t i = 0; i < channels * pixels; ++i) {
    if (std::isfinite(data[i])) continue;
    const std::size_t k = i / pixels, p = i % pixels;
    const float value = raw[p * file_channels + context.channels[k]];
    std::ostringstream message;
    message << path << ": " << kData << " at (" << p / width << ", " << p % width << ", "
            << context.channels[k] << ") holds " << value;
    if (std::isfinite(value)) message << ", which normalises to " << data[i];
    message << "; a sample with NaN or infinite values is refused (check_finite = false "
               "reads it anyway)";
    throw Error(message.str());
  }
}

Hdf5Reader::Hdf5Reader(const ReaderContext& context, const Hdf5ReaderOptions& options)
    : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  s.context = context;
  s.options = options;
  if (options.threads < 1) throw Error("hdf5 reader: threads must be at least 1");
  if (context.world_size < 1 || context.rank < 0 || context.rank >= context.world_size)
    throw Error("hdf5 reader: rank " + std::to_string(context.rank) + " outside world size " +
                std::to_string(context.world_size));
  if (context.train_batch_size < 1 || context.validation_batch_size < 1)
    throw Error("hdf5 reader: batch sizes must be at least 1 (train " +
                std::to_string(context.train_batch_size) + ", validation " +
                std::to_string(context.validation_batch_size) + ")");
  if (context.channels.empty()) throw Error("hdf5 reader: no input channels selected");

  s.train_files = list_split(context.data_root, "train");
  s.validation_files = list_split(context.data_root, "validation");
  if (static_cast<std::int64_t>(s.train_files.size()) < context.world_size)
    throw Error((fs::path(context.data_root) / "train").string() + ": " +
                std::to_string(s.train_files.size()) + " files for " +
                std::to_string(context.world_size) +
                " ranks; every rank needs at least one training sample");

  // Like the reference, the first training file fixes the sample shape; every
  // file read later is checked against it.
  s.shape_source = s.train_files.front();
  {
    h5::File file = h5::File::open(s.shape_source);
    require_dataset(file, kData);
    require_dataset(file, kLabels);
    const h5::Shape shape = file.shape(kData);
    if (shape.size() != 3 || shape[0] == 0 || shape[1] == 0 || shape[2] == 0)
      throw Error(s.shape_source + ": " + kData + " has shape " + shape_text(shape) +
                  ", expected (height, width, channel)");
    s.height = shape[0];
    s.width = shape[1];
    s.file_channels = shape[2];
  }
  for (const std::int64_t c : context.channels) {
    if (c < 0 || static_cast<std::uint64_t>(c) >= s.file_channels)
      throw Error("hdf5 reader: channel " + std::to_string(c) + " selected, but " +
                  s.shape_source + " has channels 0.." + std::to_string(s.file_channels - 1));
  }
  s.read_stats();

  s.pool = std::make_unique<WorkerPool>(options.threads);
  s.scratch.resize(s.pool->size());
}

Hdf5Reader::~Hdf5Reader() = default;

std::int64_t Hdf5Reader::global_samples(Split split) const {
  const auto n = static_cast<std::int64_t>(impl_->files_of(split).size());
  if (split == Split::Validation) return n;
  const std::int64_t p = impl_->context.world_size;
  return n / p * p;
}

std::int64_t Hdf5Reader::local_samples(Split split) const {
  const auto n = static_cast<std::int64_t>(impl_->files_of(split).size());
  const std::int64_t p = impl_->context.world_size;
  if (split == Split::Train) return n / p;
  return n / p + (impl_->context.rank < n % p ? 1 : 0);
}

void Hdf5Reader::start_epoch(Split split, std::int64_t epoch) {
  Impl& s = *impl_;
  const auto n = static_cast<std::int64_t>(s.files_of(split).size());
  s.order = split == Split::Train
                ? training_indices(n, s.context.rank, s.context.world_size, s.context.seed, epoch)
                : validation_indices(n, s.context.rank, s.context.world_size);
  s.split = split;
  s.position = 0;
  s.started = true;
}

bool Hdf5Reader::next(Batch& batch) {
  Impl& s = *impl_;
  if (!s.started) throw Error("hdf5 reader: next() called before start_epoch()");
  if (s.position >= s.order.size()) return false;
  const std::int64_t batch_size =
      s.split == Split::Train ? s.context.train_batch_size : s.context.validation_batch_size;
  const auto count = std::min<std::size_t>(static_cast<std::size_t>(batch_size),
                                           s.order.size() - s.position);
  const auto b = static_cast<std::int64_t>(count);
  const auto c = static_cast<std::int64_t>(s.context.channels.size());
  const auto h = static_cast<std::int64_t>(s.height), w = static_cast<std::int64_t>(s.width);
  at::Tensor data = reusable(s.last_data, batch.data, {b, c, h, w}) ? s.last_data : at::empty({b, c, h, w}, at::kFloat);
  at::Tensor labels = reusable(s.last_labels, batch.labels, {b, h, w}) ? s.last_labels : at::empty({b, h, w}, at::kLong);
  float* data_out = data.data_ptr<float>();
  std::int64_t* labels_out = labels.data_ptr<std::int64_t>();
  const std::vector<std::string>& files = s.files_of(s.split);
  const std::size_t first = s.position;

  // HDF5 reads one file at a time, each waiting for the disk when the page
  // cache is cold: have the kernel read the next batch's files in the
  // background while this one is read and decoded. (Reading ahead further,
  // or this batch's files too, measured no faster: the disk is busy then.)
  const std::size_t ahead_end = std::min(s.order.size(), first + count + static_cast<std::size_t>(batch_size));
  for (std::size_t i = first + count; i < ahead_end; ++i) read_ahead(files[s.order[i]]);

  s.pool->run(count, [&](std::size_t item, std::size_t worker) {
    const std::string& path = files[s.order[first + item]];
    try {
      s.load(path, data_out + item * c * h * w, labels_out + item * h * w, s.scratch[worker]);
    } catch (const std::exception& e) {
      // Whatever a worker meets reaches the caller as the one error type,
      // with the file named.
      throw Error(naming(path, e.what()));
    }
  });

  s.position += count;
  s.last_data = data;
  s.last_labels = labels;
  batch.data = std::move(data);
  batch.labels = std::move(labels);
  return true;
}

std::int64_t Hdf5Reader::sample_count(Split split) const {
  return static_cast<std::int64_t>(impl_->files_of(split).size());
}

std::vector<std::string> Hdf5Reader::sample_files(Split split, std::int64_t index) const {
  const std::vector<std::string>& files = impl_->files_of(split);
  if (index < 0 || index >= static_cast<std::int64_t>(files.size()))
    throw Error("hdf5 reader: sample " + std::to_string(index) + " of the " + to_string(split) +
                " split requested, but it has " + std::to_string(files.size()) + " samples");
  return {files[static_cast<std::size_t>(index)]};
}

std::vector<std::int64_t> Hdf5Reader::sample_shape() const {
  return {static_cast<std::int64_t>(impl_->context.channels.size()),
          static_cast<std::int64_t>(impl_->height), static_cast<std::int64_t>(impl_->width)};
}

void Hdf5Reader::read_sample(const std::vector<std::string>& files, float* data,
                             std::int64_t* labels) const {
  if (files.size() != 1)
    throw Error("hdf5 reader: read_sample() got " + std::to_string(files.size()) +
                " files; an HDF5 sample is one .h5 file");
  // A buffer per call keeps concurrent callers apart; it is taken from and
  // given back to the spares.
  Impl::Scratch scratch;
  {
    std::lock_guard<std::mutex> lock(impl_->spare_mutex);
    if (!impl_->spare.empty()) {
      scratch = std::move(impl_->spare.back());
      impl_->spare.pop_back();
    }
  }
  try {
    impl_->load(files.front(), data, labels, scratch);
  } catch (const std::exception& e) {
    throw Error(naming(files.front(), e.what()));
  }
  std::lock_guard<std::mutex> lock(impl_->spare_mutex);
  impl_->spare.push_back(std::move(scratch));
}

const std::vector<std::string>& Hdf5Reader::files(Split split) const {
  return impl_->files_of(split);
}

std::vector<std::string> Hdf5Reader::epoch_files() const {
  std::vector<std::string> out;
  for (const std::int64_t i : impl_->order) out.push_back(impl_->files_of(impl_->split)[i]);
  return out;
}

}  // namespace deepcam::readers
