#include "deepcam/file_reader.hpp"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <fmt/format.h>

#include <fcntl.h>
#include <sys/sysinfo.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <filesystem>
#include <new>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <system_error>
#include <utility>

#include "deepcam/data_set.hpp"
#include "deepcam/error.hpp"
#include "deepcam/h5.hpp"
#include "deepcam/normalise.hpp"
#include "deepcam/worker_pool.hpp"

namespace deepcam {

namespace fs = std::filesystem;

namespace {

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

// A few batch buffers of one kind (data or labels), handed out again once
// nobody else holds them, so that a warm step allocates nothing: a fresh
// buffer costs more than reading into it, the kernel mapping and zeroing
// each of its pages on first touch (63.7 MB per full-size sample).
//
// Each buffer is a tensor of `capacity` samples that only the pool holds;
// a batch is a view of it (narrowed to the batch's samples, and permuted
// for channels_last), which shares its storage. A buffer is free when its
// storage has no holder but the pool's tensor: every tensor that can reach
// its memory (the batch handed out, a view or alias of it the caller made,
// a tensor autograd saved from it) holds a reference to the storage, so a
// count of one means no such tensor is left, and the buffer may be filled
// again. Nothing is ever reused while the caller holds any of it: if every
// buffer is taken, a fresh one is made (and kept only while the pool has
// room).
class BufferPool {
 public:
  // A free buffer of at least `capacity` samples of `sample` shape, or a
  // fresh one.
  at::Tensor take(std::int64_t capacity, const std::vector<std::int64_t>& sample, at::ScalarType type) {
    std::vector<std::int64_t> sizes{capacity};
    sizes.insert(sizes.end(), sample.begin(), sample.end());
    for (at::Tensor& buffer : buffers_) {
      if (buffer.storage().use_count() != 1 || buffer.use_count() != 1) continue;
      if (buffer.size(0) >= capacity) return buffer;
      buffer = at::empty(sizes, type);  // free but too small: replaced
      return buffer;
    }
    at::Tensor fresh = at::empty(sizes, type);
    if (buffers_.size() < kBuffers) buffers_.push_back(fresh);
    return fresh;
  }

 private:
  // The engine holds at most the batch before the one it asks for (its
  // labels, for the metric); two more leave room for a caller keeping one.
  static constexpr std::size_t kBuffers = 4;
  std::vector<at::Tensor> buffers_;
};

// Every message must name a file of the sample; the format layers' do, one
// that names none gets the data file put in front.
// A LibTorch error (a format's ATen op) without its C++ backtrace.
std::string naming(const std::vector<std::string>& files, const std::exception& e) {
  const auto* torch_error = dynamic_cast<const c10::Error*>(&e);
  const std::string message = torch_error ? torch_error->what_without_backtrace() : e.what();
  for (const std::string& file : files)
    if (message.find(file) != std::string::npos) return message;
  return files.front() + ": " + message;
}

// What normalise() writes on this thread: read_sample()'s (C, H, W)
// normalised (the default), read_sample_hwc()'s (H, W, C) normalised (also
// next()'s samples when the run is channels_last), or
// read_sample_selected()'s (H, W, C) selected only. A per-call mode rather
// than a second load() in every format (FileFormat stays as it is);
// thread_local because these calls may run at the same time on other
// threads, and load() calls normalise() on the thread that called it (the
// FileFormat::load() contract).
enum class Output { ChannelsFirst, ChannelsLast, SelectOnly };
thread_local Output t_output = Output::ChannelsFirst;

class OutputMode {
 public:
  explicit OutputMode(Output mode) : before_(t_output) { t_output = mode; }
  ~OutputMode() { t_output = before_; }
  OutputMode(const OutputMode&) = delete;
  OutputMode& operator=(const OutputMode&) = delete;

 private:
  Output before_;
};

}  // namespace

FileFormat::Scratch::~Scratch() = default;

FileFormat::~FileFormat() = default;

struct FileReader::Impl {
  ReaderContext context;
  Format format;
  std::unique_ptr<FileFormat> file_format;  // lists and decodes the files
  std::vector<std::vector<std::string>> train;       // columns, see list_split()
  std::vector<std::vector<std::string>> validation;
  std::unique_ptr<TrainingSharding> sharding;
  std::string shape_source;
  SampleShape shape{};
  std::vector<float> shift;  // per selected channel
  std::vector<float> scale;

  bool started = false;
  bool channels_last = false;  // context.memory_format
  BufferPool data_pool, labels_pool;
  Split split = Split::Train;
  std::vector<std::int64_t> order;
  std::size_t position = 0;

  // Made at the first batch: a reader read only by single samples (behind
  // the prefetch reader, which has threads of its own) starts no threads.
  std::unique_ptr<WorkerPool> pool;
  std::vector<std::unique_ptr<FileFormat::Scratch>> scratch;  // one per worker
  // Scratch of finished read_sample() calls, for the next ones: fresh
  // buffers per call cost their page faults and zero fill (56 MB for a
  // full-size sample), about as much as decoding the sample.
  std::mutex spare_mutex;
  std::vector<std::unique_ptr<FileFormat::Scratch>> spare;

  const std::vector<std::vector<std::string>>& files_of(Split s) const {
    return s == Split::Train ? train : validation;
  }
  std::vector<std::string> sample(Split s, std::size_t index) const {
    std::vector<std::string> out;
    for (const auto& column : files_of(s)) out.push_back(column[index]);
    return out;
  }

  std::vector<std::vector<std::string>> list_split(const char* split) const {
    // The rule deepcam-data verify applies too (deepcam/data_set.hpp).
    if (const std::string problem = split_folder_problem(context.data_root, split); !problem.empty())
      throw Error(problem);
    std::vector<std::vector<std::string>> columns =
        file_format->list_split((fs::path(context.data_root) / split).string(), split);
    // The FileFormat contract: a column per file of a sample, each as long as
    // the first. Otherwise training read the first column alone, and a
    // reader behind prefetch refused every sample with a message that
    // contradicted itself.
    if (columns.size() != format.files_per_sample) {
      throw std::logic_error(fmt::format("{}: its format's list_split() gave {} column(s) for the {} split, but its "
                                         "Format says {} file(s) per sample (a bug in the plugin)",
                                         format.name, columns.size(), split, format.files_per_sample));
    }
    for (std::size_t k = 1; k < columns.size(); ++k) {
      if (columns[k].size() != columns[0].size()) {
        throw std::logic_error(fmt::format("{}: its format's list_split() gave the {} split a column {} of {} "
                                           "file(s) and a column 0 of {}; each must be as long as the first (a "
                                           "bug in the plugin)",
                                           format.name, split, k, columns[k].size(), columns[0].size()));
      }
    }
    return columns;
  }
  void read_stats();

  // What a batch of `samples` needs in the pools' buffers: selected
  // channels as float32, labels as int64. A long double, because a
  // header may declare a shape whose byte count no integer holds.
  long double batch_bytes(std::int64_t samples) const {
    const long double pixels = static_cast<long double>(shape.height) * static_cast<long double>(shape.width);
    const auto channels = static_cast<long double>(context.channels.size());
    return static_cast<long double>(samples) * pixels * (channels * sizeof(float) + sizeof(std::int64_t));
  }
  // The batch the buffers hold for a split: its batch size, though no
  // more than this rank's part of the split (as next() allocates).
  std::int64_t capacity(Split s) const {
    const std::int64_t batch_size = s == Split::Train ? context.train_batch_size : context.validation_batch_size;
    const std::int64_t n = static_cast<std::int64_t>(files_of(s).front().size());
    const std::int64_t local = s == Split::Train ? sharding->local_samples()
                                                 : n / context.world_size + (context.rank < n % context.world_size);
    return std::min<std::int64_t>(batch_size, local);
  }
  std::string batch_memory_message(Split s, std::int64_t samples, const std::string& cause) const {
    return fmt::format("{}: {} declares samples of shape {}, and a batch of {} samples of it needs {:.0f} bytes "
                       "({:.1f} GB); {}; check that file (the first training file fixes every sample's shape) "
                       "or lower [run] {}_batch_size",
                       format.name, shape_source, shape_text({shape.height, shape.width, shape.channels}), samples,
                       batch_bytes(samples), batch_bytes(samples) / 1e9L, cause, to_string(s));
  }
  void check_batch_memory() const;
};

// A batch no machine of this size can hold is refused here, before the run
// starts, rather than as an allocation failure at the first step. Memory is
// physical memory and swap: a batch is written whole, so overcommitting
// cannot help. (A smaller limit, a cgroup's say, shows as an allocation
// failure in next(), with the same message.)
void FileReader::Impl::check_batch_memory() const {
  struct sysinfo info {};
  if (::sysinfo(&info) != 0) return;
  const long double memory = (static_cast<long double>(info.totalram) + static_cast<long double>(info.totalswap)) *
                             static_cast<long double>(info.mem_unit);
  for (const Split split : {Split::Train, Split::Validation}) {
    const std::int64_t samples = capacity(split);
    if (batch_bytes(samples) > memory)
      throw Error(batch_memory_message(
          split, samples,
          fmt::format("this machine has {:.0f} bytes of memory and swap ({:.1f} GB)", memory, memory / 1e9L)));
  }
}

void FileReader::Impl::read_stats() {
  const std::string path = (fs::path(context.data_root) / "stats.h5").string();
  // The rule deepcam-data verify applies too (deepcam/data_set.hpp): a
  // directory or FIFO is called what it is, not missing.
  if (const std::string problem = stats_file_problem(context.data_root); !problem.empty())
    throw Error(problem + format.stats_hint);
  const auto channels = static_cast<std::uint64_t>(shape.channels);
  std::vector<double> minval(channels), maxval(channels);
  h5::StoredType types[2];
  {
    h5::File file = h5::File::open(path);
    int i = 0;
    for (const char* dataset : {kMinval, kMaxval}) {
      if (!file.has(dataset)) throw Error(path + ": no dataset " + dataset);
      const h5::Shape stored = file.shape(dataset);
      if (stored != h5::Shape{channels}) {
        const std::string found =
            format.stats_count_values
                ? std::to_string(stored.empty() ? 1 : stored[0]) + " values"
                : "shape " + shape_text(std::vector<std::int64_t>(stored.begin(), stored.end()));
        throw Error(path + ": " + dataset + " has " + found + ", but " + shape_source + " has " +
                    std::to_string(channels) + " channels; stats.h5 must hold one value per channel");
      }
      const h5::StoredType type = file.stored_type(dataset);
      if (type.kind != h5::StoredType::Kind::Float && type.kind != h5::StoredType::Kind::Integer)
        throw Error(path + ": " + dataset + " is not stored as numbers (integers or floats)");
      types[i++] = type;
    }
    // Every integer and float16/32/64 value is exact as a double.
    file.read(kMinval, minval.data(), minval.size());
    file.read(kMaxval, maxval.data(), maxval.size());
  }
  // SPEC 1.4, with verify's and convert's rule (deepcam/data_set.hpp): the
  // arithmetic dtype is NumPy's promotion of the two datasets' types.
  using Kind = h5::StoredType::Kind;
  auto float_bytes = [](const h5::StoredType& t) { return t.kind == Kind::Float ? t.size : std::size_t{0}; };
  const std::size_t arithmetic = stats_arithmetic_bytes(float_bytes(types[0]), float_bytes(types[1]));
  for (const std::int64_t c : context.channels) {
    ChannelScale channel;
    if (std::string problem = stats_range_problem(path, c, minval[c], maxval[c], arithmetic, &channel);
        !problem.empty())
      throw Error(problem);
    shift.push_back(channel.shift);
    scale.push_back(channel.scale);
  }
}

FileReader::FileReader(const ReaderContext& context, Format format,
                       std::unique_ptr<FileFormat> file_format)
    : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  s.context = context;
  s.format = std::move(format);
  s.file_format = std::move(file_format);
  const std::string& name = s.format.name;
  // The Format is the plugin's: a [reader] threads key of its schema is
  // bounded there, so a count out of range here is its code's.
  if (s.format.threads < 1) {
    throw std::logic_error(fmt::format("{}: its Format says {} worker threads; at least 1 (a bug in the plugin)", name,
                                       s.format.threads));
  }
  if (s.format.files_per_sample < 1) {
    throw std::logic_error(name + ": its Format says 0 files per sample; a sample is one file or more (a bug in the "
                                  "plugin)");
  }
  if (context.world_size < 1 || context.rank < 0 || context.rank >= context.world_size)
    throw Error(name + ": rank " + std::to_string(context.rank) + " outside world size " +
                std::to_string(context.world_size));
  if (context.train_batch_size < 1 || context.validation_batch_size < 1)
    throw Error(name + ": batch sizes must be at least 1 (train " +
                std::to_string(context.train_batch_size) + ", validation " +
                std::to_string(context.validation_batch_size) + ")");
  if (context.channels.empty()) throw Error(name + ": no input channels selected");
  if (context.memory_format != "contiguous" && context.memory_format != "channels_last")
    throw Error(name + ": memory format \"" + context.memory_format +
                "\" asked for; [run] memory_format is \"contiguous\" or \"channels_last\"");
  s.channels_last = context.memory_format == "channels_last";

  s.train = s.list_split("train");
  s.validation = s.list_split("validation");
  ShardingSetup setup;
  setup.files = static_cast<std::int64_t>(s.train.front().size());
  setup.rank = context.rank;
  setup.world_size = context.world_size;
  setup.local_rank = context.local_rank;
  setup.local_size = context.local_size;
  setup.seed = context.seed;
  s.sharding = s.file_format->make_sharding((fs::path(context.data_root) / "train").string(), setup);

  // Like the reference, the first training file fixes the sample shape; every
  // file read later is checked against it.
  s.shape_source = s.train.front().front();
  s.shape = s.file_format->read_shape(s.shape_source);
  for (const std::int64_t c : context.channels) {
    if (c < 0 || c >= s.shape.channels)
      throw Error(name + ": [data] channels selects channel " + std::to_string(c) + ", but " + s.shape_source +
                  " has channels 0.." + std::to_string(s.shape.channels - 1) +
                  " (the first training file fixes every sample's shape); [data] channels (all 16 unless "
                  "set) must name channels the data has");
  }
  s.check_batch_memory();
  s.read_stats();
}

FileReader::~FileReader() = default;

std::int64_t FileReader::global_samples(Split split) const {
  if (split == Split::Train) return impl_->sharding->global_samples();
  return sample_count(split);
}

std::int64_t FileReader::local_samples(Split split) const {
  if (split == Split::Train) return impl_->sharding->local_samples();
  const std::int64_t n = sample_count(split);
  const std::int64_t p = impl_->context.world_size;
  return n / p + (impl_->context.rank < n % p ? 1 : 0);
}

void FileReader::start_epoch(Split split, std::int64_t epoch) {
  Impl& s = *impl_;
  s.order = split == Split::Train
                ? s.sharding->order(epoch)
                : validation_indices(sample_count(split), s.context.rank, s.context.world_size);
  s.split = split;
  s.position = 0;
  s.started = true;
}

bool FileReader::next(Batch& batch) {
  Impl& s = *impl_;
  if (!s.started) throw Error(s.format.name + ": next() called before start_epoch()");
  if (s.position >= s.order.size()) return false;
  const std::int64_t batch_size =
      s.split == Split::Train ? s.context.train_batch_size : s.context.validation_batch_size;
  const auto count = std::min<std::size_t>(static_cast<std::size_t>(batch_size),
                                           s.order.size() - s.position);
  const auto b = static_cast<std::int64_t>(count);
  const auto c = static_cast<std::int64_t>(s.context.channels.size());
  const std::int64_t h = s.shape.height, w = s.shape.width;
  // The caller's previous batch is overwritten anyway: let go of it first,
  // so that its buffers count as free if the caller keeps no other
  // reference to them.
  batch = Batch{};
  // Buffers for a whole batch, reused by the next (the last, shorter one
  // too); no larger than this rank's part of the split, however large the
  // batch size that the run file allows.
  const auto capacity = std::min<std::int64_t>(batch_size, static_cast<std::int64_t>(s.order.size()));
  // channels_last: each sample (H, W, C) in its place, the batch a
  // (B, C, H, W) view with channels_last strides.
  at::Tensor data_buffer, labels_buffer;
  try {
    data_buffer = s.data_pool.take(
        capacity, s.channels_last ? std::vector<std::int64_t>{h, w, c} : std::vector<std::int64_t>{c, h, w},
        at::kFloat);
    labels_buffer = s.labels_pool.take(capacity, {h, w}, at::kLong);
  } catch (const c10::Error& e) {
    throw Error(
        s.batch_memory_message(s.split, capacity, fmt::format("allocating it failed: {}", e.what_without_backtrace())));
  } catch (const std::bad_alloc&) {
    throw Error(s.batch_memory_message(s.split, capacity, "allocating it failed (out of memory)"));
  }
  float* data_out = data_buffer.data_ptr<float>();
  std::int64_t* labels_out = labels_buffer.data_ptr<std::int64_t>();
  const std::size_t first = s.position;

  // Reads through the page cache wait for the disk when it is cold: have
  // the kernel read the next batch's files in the background while this one
  // is read and decoded. (Reading ahead further, or this batch's files too,
  // measured no faster: the disk is busy then.)
  if (s.file_format->reads_ahead()) {
    const std::size_t ahead_end = std::min(s.order.size(), first + count + static_cast<std::size_t>(batch_size));
    for (std::size_t i = first + count; i < ahead_end; ++i)
      for (const auto& column : s.files_of(s.split))
        read_ahead(column[static_cast<std::size_t>(s.order[i])]);
  }

  const Output layout = s.channels_last ? Output::ChannelsLast : Output::ChannelsFirst;
  if (!s.pool) {
    std::unique_ptr<WorkerPool> pool;
    try {
      pool = std::make_unique<WorkerPool>(s.format.threads);
    } catch (const std::system_error& e) {
      // The process's thread limit (ulimit -u, a container's pids limit):
      // the machine's, not a fault of the reader's code.
      throw Error(fmt::format("{}: cannot start {} worker threads: {}; give it fewer threads, or raise the "
                              "process limit (ulimit -u)",
                              s.format.name, s.format.threads, e.what()));
    }
    std::vector<std::unique_ptr<FileFormat::Scratch>> scratch;
    for (std::size_t i = 0; i < pool->size(); ++i) scratch.push_back(s.file_format->make_scratch());
    s.scratch = std::move(scratch);
    s.pool = std::move(pool);
  }
  s.pool->run(count, [&](std::size_t item, std::size_t worker) {
    const std::vector<std::string> files = s.sample(s.split, static_cast<std::size_t>(s.order[first + item]));
    try {
      const OutputMode mode(layout);
      s.file_format->load(*this, files, data_out + item * c * h * w, labels_out + item * h * w,
                          *s.scratch[worker]);
    } catch (const Error& e) {
      // A problem of the sample's files reaches the caller with a file
      // named; any other exception (a std::runtime_error, bad_alloc) passes
      // on as it is: a fault of the format's code, which the engine names
      // as the plugin's, or memory running out.
      throw Error(naming(files, e));
    } catch (const c10::Error& e) {
      throw Error(naming(files, e));
    }
  });

  s.position += count;
  batch.data = s.channels_last ? data_buffer.narrow(0, 0, b).permute({0, 3, 1, 2}) : data_buffer.narrow(0, 0, b);
  batch.labels = labels_buffer.narrow(0, 0, b);
  return true;
}

std::int64_t FileReader::sample_count(Split split) const {
  return static_cast<std::int64_t>(impl_->files_of(split).front().size());
}

std::vector<std::string> FileReader::sample_files(Split split, std::int64_t index) const {
  const std::int64_t n = sample_count(split);
  if (index < 0 || index >= n)
    throw Error(impl_->format.name + ": sample " + std::to_string(index) + " of the " +
                to_string(split) + " split requested, but it has " + std::to_string(n) + " samples");
  return impl_->sample(split, static_cast<std::size_t>(index));
}

std::vector<std::int64_t> FileReader::sample_shape() const {
  return {static_cast<std::int64_t>(impl_->context.channels.size()), impl_->shape.height,
          impl_->shape.width};
}

void FileReader::read_sample(const std::vector<std::string>& files, float* data,
                             std::int64_t* labels) const {
  read_one(files, data, labels);
}

void FileReader::read_sample_hwc(const std::vector<std::string>& files, float* data_hwc,
                                 std::int64_t* labels) const {
  const OutputMode mode(Output::ChannelsLast);
  read_one(files, data_hwc, labels);
}

void FileReader::read_sample_selected(const std::vector<std::string>& files, float* data_hwc,
                                      std::int64_t* labels) const {
  const OutputMode mode(Output::SelectOnly);
  read_one(files, data_hwc, labels);
}

bool FileReader::channels_last() const { return impl_->channels_last; }

const std::vector<float>& FileReader::shift() const { return impl_->shift; }

const std::vector<float>& FileReader::scale() const { return impl_->scale; }

void FileReader::read_one(const std::vector<std::string>& files, float* data,
                          std::int64_t* labels) const {
  Impl& s = *impl_;
  if (files.size() != s.format.files_per_sample)
    throw Error(s.format.name + ": read_sample() got " + std::to_string(files.size()) +
                " files; " + s.format.sample_is);
  // Scratch per call keeps concurrent callers apart; it is taken from and
  // given back to the spares.
  std::unique_ptr<FileFormat::Scratch> scratch;
  {
    std::lock_guard<std::mutex> lock(s.spare_mutex);
    if (!s.spare.empty()) {
      scratch = std::move(s.spare.back());
      s.spare.pop_back();
    }
  }
  try {
    if (!scratch) scratch = s.file_format->make_scratch();
    s.file_format->load(*this, files, data, labels, *scratch);
  } catch (const Error& e) {
    throw Error(naming(files, e));  // as in next()
  } catch (const c10::Error& e) {
    throw Error(naming(files, e));
  }
  std::lock_guard<std::mutex> lock(s.spare_mutex);
  s.spare.push_back(std::move(scratch));
}

const std::vector<std::string>& FileReader::files(Split split) const {
  return impl_->files_of(split).front();
}

std::vector<std::string> FileReader::epoch_files() const {
  std::vector<std::string> out;
  for (const std::int64_t i : impl_->order)
    out.push_back(files(impl_->split)[static_cast<std::size_t>(i)]);
  return out;
}

const TrainingSharding& FileReader::sharding() const { return *impl_->sharding; }

const ReaderContext& FileReader::context() const { return impl_->context; }

const std::string& FileReader::shape_source() const { return impl_->shape_source; }
std::string FileReader::shape_reference(const std::string& path) const {
  if (path == impl_->shape_source) return "as this file was when the run started: it changed since";
  return "as in " + impl_->shape_source;
}

const SampleShape& FileReader::shape() const { return impl_->shape; }

void FileReader::normalise(const std::string& path, const char* dataset, const float* raw,
                           float* data) const {
  const Impl& s = *impl_;
  const std::int64_t pixels = s.shape.height * s.shape.width;
  const std::int64_t file_channels = s.shape.channels;
  const std::vector<std::int64_t>& channels = s.context.channels;
  // Each only says whether a NaN or infinity came out (or would, once
  // normalised); the loop below finds the first one, in (C, H, W) order
  // whatever the layout, to name it.
  bool finite = true;
  switch (t_output) {
    case Output::ChannelsFirst:
      finite = normalise_sample(raw, pixels, file_channels, channels, s.shift, s.scale, data);
      break;
    case Output::ChannelsLast:
      finite = normalise_sample_hwc(raw, pixels, file_channels, channels, s.shift, s.scale, data);
      break;
    case Output::SelectOnly:
      finite = select_channels(raw, pixels, file_channels, channels, s.shift, s.scale, data);
      break;
  }
  if (finite || !s.format.check_finite) return;
  const auto count = static_cast<std::int64_t>(channels.size());
  for (std::int64_t i = 0; i < count * pixels; ++i) {
    const std::int64_t k = i / pixels, p = i % pixels;
    const float value = raw[p * file_channels + channels[k]];
    const float normalised = s.scale[k] * (value - s.shift[k]);
    if (std::isfinite(normalised)) continue;
    std::ostringstream message;
    message << path << ": " << dataset << " at (" << p / s.shape.width << ", "
            << p % s.shape.width << ", " << channels[k] << ") holds " << value;
    // The formats read wider types as float32, where a finite float64 beyond
    // its range has become infinite.
    if (std::isinf(value)) message << " (or a number beyond float32's range, which reads as " << value << ")";
    if (std::isfinite(value)) message << ", which normalises to " << normalised;
    message << "; a sample with NaN or infinite values is refused (check_finite = false "
               "reads it anyway)";
    throw Error(message.str());
  }
}

void FileReader::decode_labels(const std::string& path, const char* dataset, const void* stored,
                               LabelType type, std::int64_t* labels) const {
  const Impl& s = *impl_;
  const LabelCheck check = deepcam::decode_labels(stored, type, s.shape.height * s.shape.width, labels);
  if (check.bad < 0) return;
  // Integers exactly (a double prints 4294967297 as 4.29497e+09): decoding
  // stored each as int64, which a uint64 above its range wraps.
  std::string value;
  if (type == LabelType::UInt64)
    value = std::to_string(static_cast<std::uint64_t>(labels[check.bad]));
  else if (type != LabelType::Float16 && type != LabelType::Float32 && type != LabelType::Float64)
    value = std::to_string(labels[check.bad]);
  else
    value = fmt::format("{}", check.value);
  std::ostringstream message;
  message << path << ": " << dataset << " at (" << check.bad / s.shape.width << ", " << check.bad % s.shape.width
          << ") holds " << value;
  if (check.value != std::floor(check.value)) message << ", not a whole number";
  message << "; a label is a class id: 0 (background), 1 (tropical cyclone) or 2 (atmospheric river), "
          << "stored as " << to_string(type);
  throw Error(message.str());
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::ostringstream out;
  out << '(';
  for (std::size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << (shape.size() == 1 ? ",)" : ")");
  return out.str();
}

}  // namespace deepcam
