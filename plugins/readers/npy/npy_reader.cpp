#include "npy_reader.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <new>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "deepcam/data_set.hpp"
#include "deepcam/error.hpp"
#include "deepcam/mapping_guard.hpp"
#include "deepcam/npy.hpp"

namespace deepcam::readers {

namespace fs = std::filesystem;

namespace {

constexpr std::size_t kDirectAlignment = 4096;

std::string errno_text(int err) { return std::strerror(err); }

std::string direct_refused(const std::string& path, int err) {
  return path + ": the file system refuses O_DIRECT reads (" + errno_text(err) +
         "); set io = \"mmap\" in the [reader] table";
}

// A file opened read-only (with `flags` added, O_DIRECT say) and its size;
// closed when it goes.
class OpenFile {
 public:
  OpenFile(const std::string& path, int flags) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | flags);
    if (fd_ < 0) {
      const int err = errno;
      if (err == EINVAL && (flags & O_DIRECT) != 0) throw Error(direct_refused(path, err));
      throw Error(path + ": cannot open: " + errno_text(err));
    }
    struct stat st {};
    if (::fstat(fd_, &st) != 0) {
      const int err = errno;
      ::close(fd_);
      throw Error(path + ": cannot stat: " + errno_text(err));
    }
    size_ = static_cast<std::size_t>(st.st_size);
  }
  OpenFile(const OpenFile&) = delete;
  OpenFile& operator=(const OpenFile&) = delete;
  ~OpenFile() { ::close(fd_); }
  int fd() const { return fd_; }
  std::size_t size() const { return size_; }

 private:
  int fd_ = -1;
  std::size_t size_ = 0;
};

// A whole file, memory-mapped read-only. Its pages past the end of a file
// that shrinks after the size check raise SIGBUS: read it under
// read_mapping().
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) : file_(path, 0) {
    if (file_.size() == 0) return;
    void* p = ::mmap(nullptr, file_.size(), PROT_READ, MAP_PRIVATE, file_.fd(), 0);
    if (p == MAP_FAILED) throw Error(path + ": cannot map: " + errno_text(errno));
    data_ = static_cast<const unsigned char*>(p);
    // A sample is read once front to back: read ahead aggressively, and
    // start now rather than on the first fault.
    ::madvise(p, file_.size(), MADV_SEQUENTIAL);
    ::madvise(p, file_.size(), MADV_WILLNEED);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() {
    if (data_) ::munmap(const_cast<unsigned char*>(data_), file_.size());
  }
  const unsigned char* data() const { return data_; }
  std::size_t size() const { return file_.size(); }

 private:
  OpenFile file_;
  const unsigned char* data_ = nullptr;
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

// The most bytes an .npy file of `values` values can hold: 8 bytes a value
// (the widest dtype the readers take) and a header of up to 1 MiB.
std::size_t most_bytes(std::int64_t values) { return static_cast<std::size_t>(values) * 8 + (std::size_t{1} << 20); }

// A file larger than any sample of the set's shape (a damaged or foreign
// file; a sparse one of a terabyte) is refused by its size before a buffer
// as large as the file is allocated: that allocation failed as "out of
// memory", naming no file.
void refuse_larger(const std::string& path, std::size_t size, std::size_t most) {
  if (size <= most) return;
  throw Error(path + ": " + std::to_string(size) + " bytes, more than a sample of the set's shape holds in any dtype "
              "with its header (at most " + std::to_string(most) + "): a damaged file, or one of another data set");
}

// Reads a whole file with O_DIRECT: the length rounded up to 4096, from
// offset 0 (the data then sits at the header's offset in the buffer).
// Returns the file's size.
std::size_t read_direct(const std::string& path, AlignedBuffer& buffer, std::size_t most) {
  const OpenFile file(path, O_DIRECT);
  const int fd = file.fd();
  const std::size_t size = file.size();
  refuse_larger(path, size, most);
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

// Reads a whole file with buffered pread() calls into `buffer`, as large as
// the file (the kernel splits them into its read-ahead windows; one large
// call, as numpy.load makes, keeps the disk streaming where page faults on
// a mapping come a window at a time). Returns the bytes read: the file's
// size, or less if it shrank since fstat (the header check reports that).
std::size_t read_buffered(const std::string& path, AlignedBuffer& buffer, std::size_t most) {
  const OpenFile file(path, 0);
  const int fd = file.fd();
  const std::size_t size = file.size();
  refuse_larger(path, size, most);
  // The file is read once front to back: the largest read-ahead window.
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  unsigned char* out = buffer.reserve(std::max<std::size_t>(size, 1));
  std::size_t done = 0;
  while (done < size) {
    const ssize_t got = ::pread(fd, out + done, size - done, static_cast<off_t>(done));
    if (got < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      throw Error(path + ": read failed: " + errno_text(err));
    }
    if (got == 0) break;
    done += static_cast<std::size_t>(got);
  }
  return done;
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
  } else if (io == "pread") {
    options.io = NpyIo::Pread;
  } else {
    throw Error(params.setting("io") + ": use \"mmap\", \"pread\" or \"direct\"");
  }
  options.shuffle_mode = parse_shuffle_mode(params.string("shuffle_mode"), params.setting("shuffle_mode"));
  options.data_oversampling_factor = params.integer("data_oversampling_factor");
  options.check_finite = params.boolean("check_finite");
  options.where = params.where();
  return options;
}

namespace {

// The .npy pairs: data-X.npy (H, W, C) and label-X.npy (H, W) per sample.
class NpyFormat final : public FileFormat {
 public:
  explicit NpyFormat(const NpyReaderOptions& options) : options_(options) {}

  std::vector<std::vector<std::string>> list_split(const std::string& dir,
                                                   const char* split) const override;
  std::unique_ptr<TrainingSharding> make_sharding(const std::string& train_dir,
                                                  const ShardingSetup& setup) const override {
    ShardingSetup with_mode = setup;
    with_mode.mode = options_.shuffle_mode;
    with_mode.oversampling_factor = options_.data_oversampling_factor;
    try {
      return std::make_unique<TrainingSharding>(with_mode);
    } catch (const Error& e) {
      // The sharding names the setting; the table and the data are ours.
      throw Error(options_.where + ": " + e.what() + " (training data " + train_dir + ")");
    }
  }
  SampleShape read_shape(const std::string& path) const override {
    const npy::Header header = npy::read_header(path);
    if (const std::string bools = npy::bool_sample_problem(header); !bools.empty()) throw Error(path + ": " + bools);
    if (header.shape.size() != 3 || header.shape[0] < 1 || header.shape[1] < 1 ||
        header.shape[2] < 1)
      throw Error(path + ": holds an array of shape " + shape_text(header.shape) +
                  ", expected (height, width, channel)");
    // Its labels, checked here, before stats.h5 is compared with the
    // channels: data stored (channel, height, width) was blamed on stats.h5.
    const std::size_t slash = path.rfind('/') + 1;
    const std::string label = path.substr(0, slash) + "label-" + path.substr(slash + 5);  // "data-" X
    const npy::Header labels = npy::read_header(label);
    if (labels.shape != std::vector<std::int64_t>{header.shape[0], header.shape[1]})
      throw Error(label + ": holds an array of shape " + shape_text(labels.shape) + ", but " + path + " is " +
                  shape_text(header.shape) + ": the labels must be (height, width) of the data, which is "
                  "(height, width, channel)");
    return {header.shape[0], header.shape[1], header.shape[2]};
  }
  std::unique_ptr<FileFormat::Scratch> make_scratch() const override {
    return std::make_unique<Scratch>();
  }
  void load(const FileReader& reader, const std::vector<std::string>& files, float* data,
            std::int64_t* labels, FileFormat::Scratch& scratch) const override;
  // Memory-mapped and buffered reads go through the page cache, which the
  // kernel can fill ahead; O_DIRECT reads bypass it.
  bool reads_ahead() const override { return options_.io != NpyIo::Direct; }

 private:
  // What one worker reuses from sample to sample.
  struct Scratch : FileFormat::Scratch {
    std::vector<float> raw;  // converted data, (H, W, C) in C order
    AlignedBuffer file;      // io = "direct" or "pread": the file read last
  };

  void decode_data(const FileReader& reader, const std::string& path, const unsigned char* bytes,
                   std::size_t size, float* data, Scratch& scratch) const;
  void decode_labels(const FileReader& reader, const std::string& path,
                     const unsigned char* bytes, std::size_t size, std::int64_t* labels) const;

  NpyReaderOptions options_;
};

}  // namespace

std::vector<std::vector<std::string>> NpyFormat::list_split(const std::string& dir,
                                                            const char* split) const {
  // The core's listing and pairing (deepcam/data_set.hpp), as deepcam-data
  // verify uses them: entries that are not files and unpaired files are
  // errors naming them.
  NpySplit listed = list_npy_split(dir);
  if (listed.data.empty()) {
    const bool saw_h5 = !list_sample_files(dir, "", ".h5").empty();
    throw Error(dir + ": no data-*.npy files in the " + split + " split" +
                (saw_h5 ? " (it holds .h5 files: read them with reader \"hdf5\", or convert "
                          "them to .npy first)"
                        : ""));
  }
  return {std::move(listed.data), std::move(listed.labels)};
}

namespace {

// The label type the core decodes straight from the file's bytes; none for
// bool (any non-zero byte is True: npy::convert knows that).
std::optional<LabelType> label_type(npy::DType dtype) {
  switch (dtype) {
    case npy::DType::Int8: return LabelType::Int8;
    case npy::DType::Int16: return LabelType::Int16;
    case npy::DType::Int32: return LabelType::Int32;
    case npy::DType::Int64: return LabelType::Int64;
    case npy::DType::UInt8: return LabelType::UInt8;
    case npy::DType::UInt16: return LabelType::UInt16;
    case npy::DType::UInt32: return LabelType::UInt32;
    case npy::DType::UInt64: return LabelType::UInt64;
    case npy::DType::Float16: return LabelType::Float16;
    case npy::DType::Float32: return LabelType::Float32;
    case npy::DType::Float64: return LabelType::Float64;
    case npy::DType::Bool: return std::nullopt;
  }
  return std::nullopt;
}

npy::Header parse_checked(const std::string& path, const unsigned char* bytes, std::size_t size) {
  if (size == 0) throw Error(path + ": empty file; a .npy file starts with \\x93NUMPY");
  const npy::Header header = npy::parse_header(path, bytes, size);
  if (size < header.data_offset || size - header.data_offset < header.data_bytes())
    throw Error(path + ": header promises " + std::to_string(header.data_bytes()) +
                " bytes of data after offset " + std::to_string(header.data_offset) + " (a file of " +
                std::to_string(header.data_offset + header.data_bytes()) + " bytes), but the file has " +
                std::to_string(size) + " bytes; it is truncated");
  if (const std::string extra = npy::trailing_bytes_problem(header, size); !extra.empty())
    throw Error(path + ": " + extra);
  if (const std::string bools = npy::bool_sample_problem(header); !bools.empty()) throw Error(path + ": " + bools);
  return header;
}

}  // namespace

void NpyFormat::decode_data(const FileReader& reader, const std::string& path,
                            const unsigned char* bytes, std::size_t size, float* data,
                            Scratch& s) const {
  const std::int64_t height = reader.shape().height, width = reader.shape().width,
                     file_channels = reader.shape().channels;
  const npy::Header header = parse_checked(path, bytes, size);
  const std::vector<std::int64_t> expected{height, width, file_channels};
  if (header.shape != expected)
    throw Error(path + ": holds an array of shape " + shape_text(header.shape) + ", expected " +
                shape_text(expected) + " (height, width, channel) " + reader.shape_reference(path));
  const unsigned char* payload = bytes + header.data_offset;
  const std::int64_t count = height * width * file_channels;
  const float* raw;
  // Native C-order float32, as numpy writes it, is used in place (no copy).
  // Anything else goes through npy::convert, which also puts Fortran-order
  // arrays into C order, so `raw` is (H, W, C) in C order either way. Any
  // dtype npy::convert reads is taken, integers included: the hdf5 reader
  // converts integer data too, and deepcam-data verify passes what
  // npy::convert reads, so verify and training agree on a data set.
  if (header.dtype == npy::DType::Float32 && !header.big_endian && !header.fortran_order &&
      reinterpret_cast<std::uintptr_t>(payload) % alignof(float) == 0) {
    raw = reinterpret_cast<const float*>(payload);
  } else {
    s.raw.resize(static_cast<std::size_t>(count));
    npy::convert(path, header, payload, s.raw.data(), count);
    raw = s.raw.data();
  }
  // The one normalisation of every file reader, so that the same values
  // give the same batches as the hdf5 reader's bit for bit.
  reader.normalise(path, "data", raw, data);
}

void NpyFormat::decode_labels(const FileReader& reader, const std::string& path,
                              const unsigned char* bytes, std::size_t size,
                              std::int64_t* labels) const {
  const std::int64_t height = reader.shape().height, width = reader.shape().width;
  const npy::Header header = parse_checked(path, bytes, size);
  const std::vector<std::int64_t> expected{height, width};
  if (header.shape != expected)
    throw Error(path + ": holds an array of shape " + shape_text(header.shape) + ", expected " +
                shape_text(expected) + " (height, width) as the data of " + reader.shape_source());
  const unsigned char* payload = bytes + header.data_offset;
  const std::int64_t count = height * width;
  // C order in this machine's byte order, aligned for its type (what numpy
  // writes): converted and checked in one pass from the file's bytes.
  // Anything else (Fortran order, the other byte order, bool, a misaligned
  // payload) is converted by npy::convert first (which also refuses
  // non-integral floats), then checked in place.
  const auto type = label_type(header.dtype);
  if (type && !header.fortran_order && (!header.big_endian || npy::item_size(header.dtype) == 1) &&
      reinterpret_cast<std::uintptr_t>(payload) % npy::item_size(header.dtype) == 0) {
    reader.decode_labels(path, "labels", payload, *type, labels);
    return;
  }
  npy::convert(path, header, payload, labels, count);
  reader.decode_labels(path, "labels", labels, LabelType::Int64, labels);
}

void NpyFormat::load(const FileReader& reader, const std::vector<std::string>& files,
                     float* data, std::int64_t* labels, FileFormat::Scratch& base) const {
  Scratch& s = static_cast<Scratch&>(base);
  const std::string& data_path = files[0];
  const std::string& label_path = files[1];
  if (options_.io == NpyIo::Mmap) {
    // Decoded in place, under the guard: a file that shrinks meanwhile is
    // an error naming it, not a SIGBUS (mapping_guard.hpp).
    {
      const MappedFile file(data_path);
      read_mapping(data_path, file.data(), file.size(),
                   [&] { decode_data(reader, data_path, file.data(), file.size(), data, s); });
    }
    const MappedFile file(label_path);
    read_mapping(label_path, file.data(), file.size(),
                 [&] { decode_labels(reader, label_path, file.data(), file.size(), labels); });
    return;
  }
  const auto read = options_.io == NpyIo::Direct ? read_direct : read_buffered;
  const SampleShape& shape = reader.shape();
  const std::int64_t pixels = shape.height * shape.width;
  std::size_t size = read(data_path, s.file, most_bytes(pixels * shape.channels));
  decode_data(reader, data_path, s.file.data(), size, data, s);
  size = read(label_path, s.file, most_bytes(pixels));
  decode_labels(reader, label_path, s.file.data(), size, labels);
}

NpyReader::NpyReader(const ReaderContext& context, const NpyReaderOptions& options)
    : FileReader(context,
                 {"npy reader", 2, "an npy sample is data-X.npy and label-X.npy",
                  " beside train/ and validation/ (SPEC 1.5: it is copied from the HDF5 data set)",
                  true, options.threads, options.check_finite},
                 std::make_unique<NpyFormat>(options)) {}

}  // namespace deepcam::readers
