#include "npy_reader.hpp"

#include <ATen/ops/empty.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <condition_variable>
#include <cstdlib>
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
#include "deepcam/npy.hpp"
#include "deepcam/worker_pool.hpp"
#include "../hdf5/normalise.hpp"

namespace deepcam::readers {

namespace fs = std::filesystem;

namespace {

constexpr const char* kMinval = "climate/minval";
constexpr const char* kMaxval = "climate/maxval";
constexpr std::size_t kDirectAlignment = 4096;

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

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::ostringstream out;
  out << '(';
  for (std::size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << (shape.size() == 1 ? ",)" : ")");
  return out.str();
}

// Every message must name a file of the sample; the npy layer's do, anything
// else (an allocation failure, say) gets the data file put in front.
std::string naming(const std::string& data, const std::string& label, const std::string& message) {
  if (message.find(data) != std::string::npos || message.find(label) != std::string::npos)
    return message;
  return data + ": " + message;
}

std::string errno_text(int err) { return std::strerror(err); }

struct SplitFiles {
  std::vector<std::string> data;
  std::vector<std::string> labels;
};

// Asks the kernel to start reading a file into the page cache and returns at
// once; a failure is ignored here (the read itself reports it).
void read_ahead(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_WILLNEED);
  ::close(fd);
}

// data-X.npy files of the split in name order, each with its label-X.npy.
SplitFiles list_split(const std::string& data_root, const char* split) {
  const fs::path dir = fs::path(data_root) / split;
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    throw Error(dir.string() + ": no such directory; the data root must hold train/, "
                "validation/ and stats.h5");
  SplitFiles out;
  bool saw_h5 = false;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (entry.path().extension() == ".h5") saw_h5 = true;
    if (name.rfind("data-", 0) == 0 && entry.path().extension() == ".npy" && entry.is_regular_file())
      out.data.push_back(entry.path().string());
  }
  if (out.data.empty())
    throw Error(dir.string() + ": no data-*.npy files in the " + split + " split" +
                (saw_h5 ? " (it holds .h5 files: read them with reader \"hdf5\", or convert "
                          "them to .npy first)"
                        : ""));
  // Byte order of UTF-8 equals code-point order: the reference's sorted().
  std::sort(out.data.begin(), out.data.end());
  for (const std::string& data : out.data) {
    const fs::path path(data);
    const fs::path label = path.parent_path() / ("label-" + path.filename().string().substr(5));
    if (!fs::is_regular_file(label, ec))
      throw Error(label.string() + ": no such file; " + data + " needs its labels beside it "
                  "(SPEC 1.5: every data-X.npy comes with label-X.npy)");
    out.labels.push_back(label.string());
  }
  return out;
}

// A whole file, memory-mapped read-only.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw Error(path + ": cannot open: " + errno_text(errno));
    struct stat st {};
    if (::fstat(fd_, &st) != 0) throw Error(path + ": cannot stat: " + errno_text(errno));
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ == 0) return;
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
    if (p == MAP_FAILED) throw Error(path + ": cannot map: " + errno_text(errno));
    data_ = static_cast<const unsigned char*>(p);
    // A sample is read once front to back: read ahead aggressively, and
    // start now rather than on the first fault.
    ::madvise(p, size_, MADV_SEQUENTIAL);
    ::madvise(p, size_, MADV_WILLNEED);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() {
    if (data_) ::munmap(const_cast<unsigned char*>(data_), size_);
    if (fd_ >= 0) ::close(fd_);
  }
  const unsigned char* data() const { return data_; }
  std::size_t size() const { return size_; }

 private:
  std::string path_;
  int fd_ = -1;
  const unsigned char* data_ = nullptr;
  std::size_t size_ = 0;
};

// A 4 KiB-aligned buffer that grows and is reused, as O_DIRECT requires of
// the memory, the file offset and the length of every read.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  AlignedBuffer(AlignedBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), capacity_(std::exchange(other.capacity_, 0)) {}
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept {
    if (this != &other) {
      std::free(data_);
      data_ = std::exchange(other.data_, nullptr);
      capacity_ = std::exchange(other.capacity_, 0);
    }
    return *this;
  }
  ~AlignedBuffer() { std::free(data_); }

  unsigned char* data() const { return data_; }

  unsigned char* reserve(std::size_t bytes) {
    if (bytes <= capacity_) return data_;
    void* p = nullptr;
    if (::posix_memalign(&p, kDirectAlignment, bytes) != 0) throw std::bad_alloc();
    std::free(data_);
    data_ = static_cast<unsigned char*>(p);
    capacity_ = bytes;
    return data_;
  }

 private:
  unsigned char* data_ = nullptr;
  std::size_t capacity_ = 0;
};

std::string direct_refused(const std::string& path, int err) {
  return path + ": the file system refuses O_DIRECT reads (" + errno_text(err) +
         "); set io = \"mmap\" in the [reader] table";
}

// Reads a whole file with O_DIRECT: the length rounded up to 4096, from
// offset 0 (the data then sits at the header's offset in the buffer).
// Returns the file's size.
std::size_t read_direct(const std::string& path, AlignedBuffer& buffer) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    if (err == EINVAL) throw Error(direct_refused(path, err));
    throw Error(path + ": cannot open: " + errno_text(err));
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw Error(path + ": cannot stat: " + errno_text(errno));
  const auto size = static_cast<std::size_t>(st.st_size);
  const std::size_t rounded = (size + kDirectAlignment - 1) / kDirectAlignment * kDirectAlignment;
  unsigned char* out = buffer.reserve(std::max(rounded, kDirectAlignment));
  std::size_t done = 0;
  while (done < size) {
    const ssize_t got = ::pread(fd, out + done, rounded - done, static_cast<off_t>(done));
    if (got < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      if (err == EINVAL) throw Error(direct_refused(path, err));
      throw Error(path + ": read failed: " + errno_text(err));
    }
    if (got == 0) break;  // shrank since fstat: the size check below reports it
    done += static_cast<std::size_t>(got);
    // A short read that is not at the end leaves `done` unaligned, and the
    // next O_DIRECT read would be refused; file systems that honour
    // O_DIRECT only return short reads at the end of the file.
    if (done % kDirectAlignment != 0) break;
  }
  return std::min(done, size);
}

}  // namespace

NpyReaderOptions NpyReaderOptions::from(const Params& params) {
  NpyReaderOptions options;
  options.threads = static_cast<int>(params.integer("threads"));
  const std::string& io = params.string("io");
  if (io == "mmap") {
    options.io = NpyIo::Mmap;
  } else if (io == "direct") {
    options.io = NpyIo::Direct;
  } else {
    throw Error(params.where() + " io = \"" + io + "\": use \"mmap\" or \"direct\"");
  }
  options.shuffle_mode =
      parse_shuffle_mode(params.string("shuffle_mode"), params.where() + " shuffle_mode");
  options.data_oversampling_factor = params.integer("data_oversampling_factor");
  options.check_finite = params.boolean("check_finite");
  options.where = params.where();
  return options;
}

struct NpyReader::Impl {
  ReaderContext context;
  NpyReaderOptions options;
  SplitFiles train;
  SplitFiles validation;
  std::unique_ptr<TrainingSharding> sharding;
  std::string shape_source;  // the file that fixed H, W and the channel count
  std::int64_t height = 0;
  std::int64_t width = 0;
  std::int64_t file_channels = 0;
  std::vector<float> shift;  // per selected channel
  std::vector<float> scale;

  bool started = false;
  at::Tensor last_data, last_labels;  // the batch handed out last, see reusable()
  Split split = Split::Train;
  std::vector<std::int64_t> order;
  std::size_t position = 0;

  // What one worker reuses from sample to sample.
  struct Scratch {
    std::vector<float> raw;  // converted data, (H, W, C) in C order
    AlignedBuffer direct;    // io = "direct"
  };
  std::vector<Scratch> scratch;
  std::unique_ptr<WorkerPool> pool;
  // Scratch of finished read_sample() calls, for the next ones: fresh
  // buffers per call cost their page faults (56 MB for a full-size sample
  // with io = "direct"), about as much as decoding the sample.
  std::mutex spare_mutex;
  std::vector<Scratch> spare;

  const SplitFiles& files_of(Split s) const { return s == Split::Train ? train : validation; }

  void read_stats();
  void read(const std::string& data_path, const std::string& label_path, float* data,
            std::int64_t* labels, Scratch& scratch) const;
  void decode_data(const std::string& path, const unsigned char* bytes, std::size_t size,
                   float* data, Scratch& scratch) const;
  void decode_labels(const std::string& path, const unsigned char* bytes, std::size_t size,
                     std::int64_t* labels) const;
};

void NpyReader::Impl::read_stats() {
  const std::string path = (fs::path(context.data_root) / "stats.h5").string();
  std::error_code ec;
  if (!fs::is_regular_file(path, ec))
    throw Error(path + ": no such file; the data root must hold stats.h5 beside train/ and "
                "validation/ (SPEC 1.5: it is copied from the HDF5 data set)");
  const auto channels = static_cast<std::uint64_t>(file_channels);
  std::vector<double> minval(channels), maxval(channels);
  {
    h5::File file = h5::File::open(path);
    for (const char* dataset : {kMinval, kMaxval}) {
      if (!file.has(dataset)) throw Error(path + ": no dataset " + dataset);
      const h5::Shape shape = file.shape(dataset);
      if (shape != h5::Shape{channels})
        throw Error(path + ": " + dataset + " has " + std::to_string(shape.empty() ? 1 : shape[0]) +
                    " values, but " + shape_source + " has " + std::to_string(channels) +
                    " channels; stats.h5 must hold one value per channel");
    }
    file.read(kMinval, minval.data(), minval.size());
    file.read(kMaxval, maxval.data(), maxval.size());
  }
  for (const std::int64_t c : context.channels) {
    const double lo = minval[c], hi = maxval[c];
    // As in the hdf5 reader and the reference: 1 / (max - min) in the
    // statistics' precision, then scale * (x - min) in float32.
    const double reciprocal = 1.0 / (hi - lo);
    if (!(hi > lo) || !std::isfinite(reciprocal))
      throw Error(path + ": channel " + std::to_string(c) + " has " + kMinval + " " +
                  std::to_string(lo) + " and " + kMaxval + " " + std::to_string(hi) +
                  "; max must exceed min to normalise");
    shift.push_back(static_cast<float>(lo));
    scale.push_back(static_cast<float>(reciprocal));
  }
}

namespace {

npy::Header parse_checked(const std::string& path, const unsigned char* bytes, std::size_t size) {
  if (size == 0) throw Error(path + ": empty file; a .npy file starts with \\x93NUMPY");
  const npy::Header header = npy::parse_header(path, bytes, size);
  if (size < header.data_offset || size - header.data_offset < header.data_bytes())
    throw Error(path + ": header promises " + std::to_string(header.data_bytes()) +
                " bytes of data after offset " + std::to_string(header.data_offset) +
                ", but the file has " + std::to_string(size) + " bytes; it is truncated");
  return header;
}

}  // namespace

void NpyReader::Impl::decode_data(const std::string& path, const unsigned char* bytes,
                                  std::size_t size, float* data, Scratch& s) const {
  const npy::Header header = parse_checked(path, bytes, size);
  const std::vector<std::int64_t> expected{height, width, file_channels};
  if (header.shape != expected)
    throw Error(path + ": holds an array of shape " + shape_text(header.shape) + ", expected " +
                shape_text(expected) + " (height, width, channel) as in " + shape_source);
  if (header.dtype != npy::DType::Float16 && header.dtype != npy::DType::Float32 &&
      header.dtype != npy::DType::Float64)
    throw Error(path + ": data of dtype " + npy::to_string(header.dtype) +
                "; DeepCAM input fields are float16, float32 or float64");
  const unsigned char* payload = bytes + header.data_offset;
  const std::int64_t count = height * width * file_channels;
  const float* raw;
  // Native C-order float32, as numpy writes it, is used in place (no copy).
  // Anything else goes through npy::convert, which also puts Fortran-order
  // arrays into C order, so `raw` is (H, W, C) in C order either way.
  if (header.dtype == npy::DType::Float32 && !header.big_endian && !header.fortran_order &&
      reinterpret_cast<std::uintptr_t>(payload) % alignof(float) == 0) {
    raw = reinterpret_cast<const float*>(payload);
  } else {
    s.raw.resize(static_cast<std::size_t>(count));
    npy::convert(path, header, payload, s.raw.data(), count);
    raw = s.raw.data();
  }
  const std::int64_t pixels = height * width;
  const auto channels = static_cast<std::int64_t>(context.channels.size());
  // The hdf5 reader's kernel, so that both readers give the same values bit
  // for bit; it only says whether a NaN or infinity came out, the loop below
  // finds the first one to name it.
  const bool finite = detail::normalise_sample(raw, pixels, file_channels, context.channels, shift, scale, data);
  if (finite || !options.check_finite) return;
  for (std::int64_t i = 0; i < channels * pixels; ++i) {
    if (std::isfinite(data[i])) continue;
    const std::int64_t k = i / pixels, p = i % pixels, h = p / width, w = p % width;
    const float value = raw[p * file_channels + context.channels[k]];
    std::ostringstream message;
    message << path << ": data at (" << h << ", " << w << ", " << context.channels[k]
            << ") holds " << value;
    if (std::isfinite(value)) message << ", which normalises to " << data[i];
    message << "; a sample with NaN or infinite values is refused (check_finite = false "
               "reads it anyway)";
    throw Error(message.str());
  }
}

void NpyReader::Impl::decode_labels(const std::string& path, const unsigned char* bytes,
                                    std::size_t size, std::int64_t* labels) const {
  const npy::Header header = parse_checked(path, bytes, size);
  const std::vector<std::int64_t> expected{height, width};
  if (header.shape != expected)
    throw Error(path + ": holds an array of shape " + shape_text(header.shape) + ", expected " +
                shape_text(expected) + " (height, width) as the data of " + shape_source);
  // npy::convert reorders Fortran-order labels into C order.
  npy::convert(path, header, bytes + header.data_offset, labels, height * width);
}

void NpyReader::Impl::read(const std::string& data_path, const std::string& label_path,
                           float* data, std::int64_t* labels, Scratch& s) const {
  if (options.io == NpyIo::Mmap) {
    {
      const MappedFile file(data_path);
      decode_data(data_path, file.data(), file.size(), data, s);
    }
    const MappedFile file(label_path);
    decode_labels(label_path, file.data(), file.size(), labels);
    return;
  }
  std::size_t size = read_direct(data_path, s.direct);
  decode_data(data_path, s.direct.data(), size, data, s);
  size = read_direct(label_path, s.direct);
  decode_labels(label_path, s.direct.data(), size, labels);
}

NpyReader::NpyReader(const ReaderContext& context, const NpyReaderOptions& options)
    : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  s.context = context;
  s.options = options;
  if (options.threads < 1) throw Error("npy reader: threads must be at least 1");
  if (context.world_size < 1 || context.rank < 0 || context.rank >= context.world_size)
    throw Error("npy reader: rank " + std::to_string(context.rank) + " outside world size " +
                std::to_string(context.world_size));
  if (context.train_batch_size < 1 || context.validation_batch_size < 1)
    throw Error("npy reader: batch sizes must be at least 1 (train " +
                std::to_string(context.train_batch_size) + ", validation " +
                std::to_string(context.validation_batch_size) + ")");
  if (context.channels.empty()) throw Error("npy reader: no input channels selected");

  s.train = list_split(context.data_root, "train");
  s.validation = list_split(context.data_root, "validation");
  ShardingSetup setup;
  setup.files = static_cast<std::int64_t>(s.train.data.size());
  setup.rank = context.rank;
  setup.world_size = context.world_size;
  setup.local_rank = context.local_rank;
  setup.local_size = context.local_size;
  setup.seed = context.seed;
  setup.mode = options.shuffle_mode;
  setup.oversampling_factor = options.data_oversampling_factor;
  try {
    s.sharding = std::make_unique<TrainingSharding>(setup);
  } catch (const Error& e) {
    // The sharding names the setting; the table and the data are ours.
    throw Error(options.where + ": " + e.what() + " (training data " +
                (fs::path(context.data_root) / "train").string() + ")");
  }

  // Like the reference, the first training file fixes the sample shape; every
  // file read later is checked against it.
  s.shape_source = s.train.data.front();
  const npy::Header header = npy::read_header(s.shape_source);
  if (header.shape.size() != 3 || header.shape[0] < 1 || header.shape[1] < 1 ||
      header.shape[2] < 1)
    throw Error(s.shape_source + ": holds an array of shape " + shape_text(header.shape) +
                ", expected (height, width, channel)");
  s.height = header.shape[0];
  s.width = header.shape[1];
  s.file_channels = header.shape[2];
  for (const std::int64_t c : context.channels) {
    if (c < 0 || c >= s.file_channels)
      throw Error("npy reader: channel " + std::to_string(c) + " selected, but " +
                  s.shape_source + " has channels 0.." + std::to_string(s.file_channels - 1));
  }
  s.read_stats();

  s.pool = std::make_unique<WorkerPool>(options.threads);
  s.scratch.resize(s.pool->size());
}

NpyReader::~NpyReader() = default;

std::int64_t NpyReader::global_samples(Split split) const {
  if (split == Split::Train) return impl_->sharding->global_samples();
  return static_cast<std::int64_t>(impl_->validation.data.size());
}

std::int64_t NpyReader::local_samples(Split split) const {
  if (split == Split::Train) return impl_->sharding->local_samples();
  const auto n = static_cast<std::int64_t>(impl_->validation.data.size());
  const std::int64_t p = impl_->context.world_size;
  return n / p + (impl_->context.rank < n % p ? 1 : 0);
}

void NpyReader::start_epoch(Split split, std::int64_t epoch) {
  Impl& s = *impl_;
  s.order = split == Split::Train
                ? s.sharding->order(epoch)
                : validation_indices(static_cast<std::int64_t>(s.validation.data.size()),
                                     s.context.rank, s.context.world_size);
  s.split = split;
  s.position = 0;
  s.started = true;
}

bool NpyReader::next(Batch& batch) {
  Impl& s = *impl_;
  if (!s.started) throw Error("npy reader: next() called before start_epoch()");
  if (s.position >= s.order.size()) return false;
  const std::int64_t batch_size =
      s.split == Split::Train ? s.context.train_batch_size : s.context.validation_batch_size;
  const auto count = std::min<std::size_t>(static_cast<std::size_t>(batch_size),
                                           s.order.size() - s.position);
  const auto b = static_cast<std::int64_t>(count);
  const auto c = static_cast<std::int64_t>(s.context.channels.size());
  const std::int64_t h = s.height, w = s.width;
  at::Tensor data = reusable(s.last_data, batch.data, {b, c, h, w}) ? s.last_data : at::empty({b, c, h, w}, at::kFloat);
  at::Tensor labels = reusable(s.last_labels, batch.labels, {b, h, w}) ? s.last_labels : at::empty({b, h, w}, at::kLong);
  float* data_out = data.data_ptr<float>();
  std::int64_t* labels_out = labels.data_ptr<std::int64_t>();
  const SplitFiles& files = s.files_of(s.split);
  const std::size_t first = s.position;

  // Memory-mapped reads go through the page cache: have the kernel read the
  // next batch's files while this one is decoded, so that a cold cache
  // keeps the disk busy rather than idle between batches.
  if (s.options.io == NpyIo::Mmap) {
    const std::size_t ahead_end = std::min(s.order.size(), first + count + static_cast<std::size_t>(batch_size));
    for (std::size_t i = first + count; i < ahead_end; ++i) {
      const auto index = static_cast<std::size_t>(s.order[i]);
      read_ahead(files.data[index]);
      read_ahead(files.labels[index]);
    }
  }

  s.pool->run(count, [&](std::size_t item, std::size_t worker) {
    const auto index = static_cast<std::size_t>(s.order[first + item]);
    try {
      s.read(files.data[index], files.labels[index], data_out + item * c * h * w,
             labels_out + item * h * w, s.scratch[worker]);
    } catch (const std::exception& e) {
      // Whatever a worker meets reaches the caller as the one error type,
      // with a file named.
      throw Error(naming(files.data[index], files.labels[index], e.what()));
    }
  });

  s.position += count;
  s.last_data = data;
  s.last_labels = labels;
  batch.data = std::move(data);
  batch.labels = std::move(labels);
  return true;
}

std::int64_t NpyReader::sample_count(Split split) const {
  return static_cast<std::int64_t>(impl_->files_of(split).data.size());
}

std::vector<std::string> NpyReader::sample_files(Split split, std::int64_t index) const {
  const SplitFiles& files = impl_->files_of(split);
  if (index < 0 || index >= static_cast<std::int64_t>(files.data.size()))
    throw Error("npy reader: sample " + std::to_string(index) + " of the " + to_string(split) +
                " split requested, but it has " + std::to_string(files.data.size()) + " samples");
  const auto i = static_cast<std::size_t>(index);
  return {files.data[i], files.labels[i]};
}

std::vector<std::int64_t> NpyReader::sample_shape() const {
  return {static_cast<std::int64_t>(impl_->context.channels.size()), impl_->height, impl_->width};
}

void NpyReader::read_sample(const std::vector<std::string>& files, float* data,
                            std::int64_t* labels) const {
  if (files.size() != 2)
    throw Error("npy reader: read_sample() got " + std::to_string(files.size()) +
                " files; an npy sample is data-X.npy and label-X.npy");
  // Scratch per call keeps concurrent callers apart; it is taken from and
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
    impl_->read(files[0], files[1], data, labels, scratch);
  } catch (const std::exception& e) {
    throw Error(naming(files[0], files[1], e.what()));
  }
  std::lock_guard<std::mutex> lock(impl_->spare_mutex);
  impl_->spare.push_back(std::move(scratch));
}

const TrainingSharding& NpyReader::sharding() const { return *impl_->sharding; }

std::vector<std::string> NpyReader::epoch_files() const {
  std::vector<std::string> out;
  for (const std::int64_t i : impl_->order)
    out.push_back(impl_->files_of(impl_->split).data[static_cast<std::size_t>(i)]);
  return out;
}

}  // namespace deepcam::readers
