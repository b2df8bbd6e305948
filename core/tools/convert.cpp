#include "convert.hpp"

#include <hdf5.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <mutex>
#include <system_error>
#include <thread>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "deepcam/error.hpp"

namespace deepcam::data {
namespace fs = std::filesystem;

namespace {

constexpr const char* kData = "climate/data";
constexpr const char* kLabels = "climate/labels_0";

// ---------------------------------------------------------------------------
// HDF5. deepcam::h5 reads every dataset converted to the type the caller
// asks for; the converter needs the labels' stored type, so it reads the
// files through the C API itself, with the same conventions as core/src/h5.cpp:
// a silenced error stack turned into the cause of the message, and one
// global mutex when the library is not thread-safe.

class Hdf5Guard {
 public:
  Hdf5Guard() {
    static const bool threadsafe = [] {
      hbool_t safe = false;
      return H5is_library_threadsafe(&safe) >= 0 && safe;
    }();
    static std::mutex mutex;
    if (!threadsafe) lock_ = std::unique_lock<std::mutex>(mutex);
    thread_local bool silenced = false;
    if (!silenced) {
      H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
      silenced = true;
    }
  }

 private:
  std::unique_lock<std::mutex> lock_;
};

herr_t keep_innermost(unsigned n, const H5E_error2_t* err, void* data) {
  if (n == 0 && err->desc) *static_cast<std::string*>(data) = err->desc;
  return 0;
}

[[noreturn]] void fail(const std::string& path, const std::string& dataset, const std::string& what) {
  std::string cause;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, keep_innermost, &cause);
  H5Eclear2(H5E_DEFAULT);
  for (char& c : cause)
    if (c == '\n' || c == '\r') c = ' ';
  std::string message = dataset.empty() ? fmt::format("{}: {}", path, what)
                                        : fmt::format("{}: dataset {}: {}", path, dataset, what);
  if (!cause.empty()) message += fmt::format(" (HDF5: {})", cause);
  throw Error(message);
}

class Id {
 public:
  Id(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  Id(Id&& other) noexcept : id_(other.id_), close_(other.close_) { other.id_ = -1; }
  Id(const Id&) = delete;
  Id& operator=(const Id&) = delete;
  Id& operator=(Id&&) = delete;
  ~Id() {
    if (id_ >= 0) close_(id_);
  }
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }

 private:
  hid_t id_;
  herr_t (*close_)(hid_t);
};

Id open_dataset(hid_t file, const std::string& path, const char* name) {
  // H5Lexists answers only for the last component, so ask for the group first.
  if (H5Lexists(file, "climate", H5P_DEFAULT) <= 0 || H5Lexists(file, name, H5P_DEFAULT) <= 0) {
    H5Eclear2(H5E_DEFAULT);
    throw Error(fmt::format("{}: dataset {}: no such dataset; a sample holds {} and {}", path, name, kData,
                            kLabels));
  }
  Id dataset(H5Dopen2(file, name, H5P_DEFAULT), H5Dclose);
  if (!dataset.valid()) fail(path, name, "cannot open");
  return dataset;
}

std::vector<std::int64_t> dataset_shape(hid_t dataset, const std::string& path, const char* name) {
  Id space(H5Dget_space(dataset), H5Sclose);
  const int rank = space.valid() ? H5Sget_simple_extent_ndims(space.get()) : -1;
  if (rank < 0) fail(path, name, "cannot read its dataspace");
  std::vector<hsize_t> dims(static_cast<std::size_t>(rank));
  if (rank > 0 && H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr) < 0)
    fail(path, name, "cannot read its dimensions");
  return std::vector<std::int64_t>(dims.begin(), dims.end());
}

npy::DType stored_dtype(hid_t dataset, const std::string& path, const char* name) {
  Id type(H5Dget_type(dataset), H5Tclose);
  if (!type.valid()) fail(path, name, "cannot read its type");
  const H5T_class_t type_class = H5Tget_class(type.get());
  const std::size_t size = H5Tget_size(type.get());
  if (type_class == H5T_INTEGER) {
    const bool is_signed = H5Tget_sign(type.get()) == H5T_SGN_2;
    switch (size) {
      case 1: return is_signed ? npy::DType::Int8 : npy::DType::UInt8;
      case 2: return is_signed ? npy::DType::Int16 : npy::DType::UInt16;
      case 4: return is_signed ? npy::DType::Int32 : npy::DType::UInt32;
      case 8: return is_signed ? npy::DType::Int64 : npy::DType::UInt64;
      default: break;
    }
  } else if (type_class == H5T_FLOAT) {
    switch (size) {
      case 2: return npy::DType::Float16;
      case 4: return npy::DType::Float32;
      case 8: return npy::DType::Float64;
      default: break;
    }
  }
  const char* what = type_class == H5T_ENUM     ? "an enum (h5py stores bool arrays so)"
                     : type_class == H5T_STRING ? "strings"
                     : type_class == H5T_COMPOUND ? "a compound type"
                     : type_class == H5T_INTEGER  ? "an integer of unusual size"
                     : type_class == H5T_FLOAT    ? "a float of unusual size"
                                                  : "a non-numeric type";
  throw Error(fmt::format("{}: dataset {}: stored as {} ({} bytes); samples hold 1-, 2-, 4- or 8-byte "
                          "integers or 2-, 4- or 8-byte floats",
                          path, name, what, size));
}

std::int64_t product(const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

// ---------------------------------------------------------------------------

struct Rank {
  int rank = 0, size = 1;
  std::string source;  // the variables it came from, for the log
};

int parse_env_int(const char* name, const char* text) {
  int value = 0;
  const char* end = text + std::strlen(text);
  const auto [p, ec] = std::from_chars(text, end, value);
  if (ec != std::errc() || p != end || p == text)
    throw Error(fmt::format("environment variable {}='{}' is not an integer; unset it or fix the launcher",
                            name, text));
  return value;
}

Rank rank_from_environment() {
  constexpr std::pair<const char*, const char*> kLaunchers[] = {
      {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"}, {"PMI_RANK", "PMI_SIZE"}, {"SLURM_PROCID", "SLURM_NTASKS"}};
  for (const auto& [rank_name, size_name] : kLaunchers) {
    const char* rank = std::getenv(rank_name);
    const char* size = std::getenv(size_name);
    if (!rank && !size) continue;
    if (!rank || !size)
      throw Error(fmt::format("environment variable {} is set but {} is not; set both or neither",
                              rank ? rank_name : size_name, rank ? size_name : rank_name));
    Rank r{parse_env_int(rank_name, rank), parse_env_int(size_name, size),
           fmt::format("{}/{}", rank_name, size_name)};
    if (r.size < 1 || r.rank < 0 || r.rank >= r.size)
      throw Error(fmt::format("environment: {}={} and {}={}: the rank must be at least 0 and below the size",
                              rank_name, rank, size_name, size));
    return r;
  }
  return Rank{};
}

struct Job {
  std::string split;
  fs::path source;
  fs::path data, label;  // targets
};

enum class Outcome { Kept, Converted, Repaired, Failed, NotAttempted };

// Why an existing file is not a complete copy of an array of `dtype` and
// `shape`, or "" when its header and size are right.
std::string header_problem(const fs::path& path, npy::DType dtype, const std::vector<std::int64_t>& shape,
                           npy::Header& header) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return "missing";
  try {
    header = npy::read_header(path.string());
  } catch (const Error& e) {
    return e.what();
  }
  if (header.dtype != dtype || header.big_endian)
    return fmt::format("holds {}{}, the source {}", header.big_endian ? "big-endian " : "",
                       npy::to_string(header.dtype), npy::to_string(dtype));
  if (header.fortran_order && shape.size() >= 2) return "is in Fortran order";
  if (header.shape != shape)
    return fmt::format("has shape {}, the source {}", shape_text(header.shape), shape_text(shape));
  const auto size = fs::file_size(path, ec);
  if (ec) return fmt::format("cannot read its size: {}", ec.message());
  if (size != header.data_offset + header.data_bytes())
    return fmt::format("has {} bytes, {} expected", size, header.data_offset + header.data_bytes());
  return "";
}

// True when the file's data equals `expected` byte for byte.
bool same_values(const fs::path& path, const npy::Header& header, const void* expected, std::vector<char>& buffer) {
  std::ifstream in(path, std::ios::binary);
  buffer.resize(header.data_bytes());
  in.seekg(static_cast<std::streamoff>(header.data_offset));
  in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
  if (!in && !buffer.empty())
    throw Error(fmt::format("{}: cannot read its data back for --verify", path.string()));
  return std::memcmp(buffer.data(), expected, buffer.size()) == 0;
}

void copy_atomically(const fs::path& from, const fs::path& to) {
  std::error_code ec;
  if (fs::exists(to, ec) && fs::equivalent(from, to, ec)) return;  // converting in place
  const fs::path temp = to.parent_path() / fmt::format(".{}.tmp{}", to.filename().string(), ::getpid());
  fs::copy_file(from, temp, fs::copy_options::overwrite_existing, ec);
  if (!ec) fs::rename(temp, to, ec);
  if (ec) {
    std::error_code ignored;
    fs::remove(temp, ignored);
    throw Error(fmt::format("{}: cannot copy {} there: {}", to.string(), from.string(), ec.message()));
  }
}

}  // namespace

// ---------------------------------------------------------------------------

H5Sample::H5Sample(const fs::path& path) : path_(path.string()) {
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);
  if (!fs::exists(status)) throw Error(fmt::format("{}: no such file", path_));
  if (fs::is_directory(status)) throw Error(fmt::format("{}: is a directory, not an HDF5 file", path_));
  if (::access(path_.c_str(), R_OK) != 0)
    throw Error(fmt::format("{}: cannot open: {}", path_, std::strerror(errno)));
  Hdf5Guard guard;
  const htri_t is_hdf5 = H5Fis_hdf5(path_.c_str());
  if (is_hdf5 == 0) {
    H5Eclear2(H5E_DEFAULT);
    throw Error(fmt::format("{}: not an HDF5 file (no HDF5 signature found)", path_));
  }
  if (is_hdf5 < 0) fail(path_, "", "cannot read the file");
  file_ = H5Fopen(path_.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (file_ < 0) fail(path_, "", "cannot open the HDF5 file (truncated or damaged?)");
  try {
    Id data = open_dataset(file_, path_, kData);
    Id labels = open_dataset(file_, path_, kLabels);
    data_shape_ = dataset_shape(data.get(), path_, kData);
    label_shape_ = dataset_shape(labels.get(), path_, kLabels);
    data_dtype_ = stored_dtype(data.get(), path_, kData);
    label_dtype_ = stored_dtype(labels.get(), path_, kLabels);
    if (data_shape_.size() != 3)
      throw Error(fmt::format("{}: dataset {}: expected shape (height, width, channels), found {}", path_, kData,
                              shape_text(data_shape_)));
    if (label_shape_ != std::vector<std::int64_t>{data_shape_[0], data_shape_[1]})
      throw Error(fmt::format("{}: dataset {} has shape {}, but {} is {}: the labels must be (height, width) "
                              "of the data",
                              path_, kLabels, shape_text(label_shape_), kData, shape_text(data_shape_)));
  } catch (...) {
    H5Fclose(file_);
    throw;
  }
}

H5Sample::~H5Sample() {
  Hdf5Guard guard;
  H5Fclose(file_);
  H5Eclear2(H5E_DEFAULT);
}

void H5Sample::read_data(std::vector<float>& out) const {
  out.resize(static_cast<std::size_t>(product(data_shape_)));
  Hdf5Guard guard;
  Id data = open_dataset(file_, path_, kData);
  if (!out.empty() && H5Dread(data.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()) < 0)
    fail(path_, kData, "cannot read as float32 (damaged or truncated file?)");
}

void H5Sample::read_labels(std::vector<unsigned char>& out) const {
  out.resize(static_cast<std::size_t>(product(label_shape_)) * npy::item_size(label_dtype_));
  Hdf5Guard guard;
  Id labels = open_dataset(file_, path_, kLabels);
  // The memory type is the stored type in this machine's byte order, so the
  // values arrive unchanged; float16 has no native HDF5 type, hence the copy.
  Id stored(H5Dget_type(labels.get()), H5Tclose);
  Id memory(H5Tcopy(stored.get()), H5Tclose);
  if (!memory.valid() ||
      H5Tset_order(memory.get(), __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__ ? H5T_ORDER_BE : H5T_ORDER_LE) < 0)
    fail(path_, kLabels, "cannot set up its memory type");
  if (!out.empty() && H5Dread(labels.get(), memory.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()) < 0)
    fail(path_, kLabels, "cannot read (damaged or truncated file?)");
}

std::vector<fs::path> sample_files(const fs::path& dir, const std::string& prefix, const std::string& extension) {
  std::vector<fs::path> out;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.rfind(prefix, 0) == 0 && it->path().extension() == extension) out.push_back(it->path());
  }
  if (ec) throw Error(fmt::format("{}: cannot list the directory: {}", dir.string(), ec.message()));
  std::sort(out.begin(), out.end());
  return out;
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  if (shape.size() == 1) return fmt::format("({},)", shape[0]);
  return fmt::format("({})", fmt::join(shape, ", "));
}

void parallel_for(std::size_t n, int threads, const std::function<void(std::size_t)>& body) {
  // Each thread holds a sample or two (up to 170 MB at full size): on a
  // many-core node one per core would cost memory for no faster I/O.
  if (threads <= 0) threads = static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 16u));
  std::atomic<std::size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mutex;
  std::exception_ptr first_error;
  auto worker = [&] {
    try {
      for (std::size_t k = next++; k < n && !failed; k = next++) body(k);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex);
      if (!first_error) first_error = std::current_exception();
      failed = true;
    }
  };
  std::vector<std::thread> pool;
  try {
    for (int t = 1; t < threads && static_cast<std::size_t>(t) < n; ++t) pool.emplace_back(worker);
  } catch (const std::system_error&) {
    // Fewer threads than asked for do the same work.
  }
  worker();
  for (auto& t : pool) t.join();
  if (first_error) std::rethrow_exception(first_error);
}

void run_convert(const ConvertOptions& o) {
  const auto start = std::chrono::steady_clock::now();
  std::error_code ec;
  if (!fs::is_directory(o.src, ec))
    throw Error(fmt::format("{}: no such directory; convert reads a data set root holding train/, validation/ "
                            "and stats.h5",
                            o.src.string()));
  const fs::path src_stats = o.src / "stats.h5";
  if (!fs::is_regular_file(src_stats, ec))
    throw Error(fmt::format("{}: no such file; a data set root holds stats.h5 (deepcam-data stats {} makes it)",
                            src_stats.string(), o.src.string()));

  // Splits are the folders of SRC that hold samples, whatever their names.
  std::vector<std::string> splits;
  for (fs::directory_iterator it(o.src, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name[0] != '.' && it->is_directory(ec) && !sample_files(it->path(), "data-", ".h5").empty())
      splits.push_back(name);
  }
  if (ec) throw Error(fmt::format("{}: cannot list the directory: {}", o.src.string(), ec.message()));
  if (splits.empty())
    throw Error(fmt::format("{}: no folder in it holds samples (data-*.h5); expected train/ and validation/",
                            o.src.string()));
  std::sort(splits.begin(), splits.end());

  std::vector<Job> all;
  for (const std::string& split : splits) {
    const fs::path out = o.dst / split;
    fs::create_directories(out, ec);
    if (ec) throw Error(fmt::format("{}: cannot create the directory: {}", out.string(), ec.message()));
    for (const fs::path& source : sample_files(o.src / split, "data-", ".h5")) {
      const std::string stem = source.stem().string().substr(5);  // after "data-"
      all.push_back({split, source, out / ("data-" + stem + ".npy"), out / ("label-" + stem + ".npy")});
    }
  }
  const Rank rank = rank_from_environment();
  std::vector<Job> jobs;
  for (std::size_t k = static_cast<std::size_t>(rank.rank); k < all.size(); k += static_cast<std::size_t>(rank.size))
    jobs.push_back(all[k]);
  const std::string who = rank.size > 1 ? fmt::format("rank {} of {} ({})", rank.rank, rank.size, rank.source) : "";
  if (rank.size > 1)
    fmt::print(stderr, "deepcam-data: convert: {}: {} of the {} samples\n", who, jobs.size(), all.size());

  std::vector<Outcome> outcomes(jobs.size(), Outcome::NotAttempted);
  std::atomic<bool> stop{false};
  std::mutex output;
  auto report = [&](const std::string& line) {
    std::lock_guard<std::mutex> lock(output);
    fmt::print(stderr, "deepcam-data: {}\n", line);
  };
  parallel_for(jobs.size(), o.threads, [&](std::size_t k) {
    if (stop) return;
    const Job& job = jobs[k];
    std::vector<float> data;
    std::vector<unsigned char> labels;
    std::vector<char> buffer;
    std::string data_problem, label_problem;
    npy::Header data_header, label_header;
    std::vector<std::int64_t> data_shape, label_shape;
    npy::DType label_dtype{};
    try {
      const H5Sample source(job.source);
      data_shape = source.data_shape();
      label_shape = source.label_shape();
      label_dtype = source.label_dtype();
      data_problem = header_problem(job.data, npy::DType::Float32, data_shape, data_header);
      label_problem = header_problem(job.label, label_dtype, label_shape, label_header);
      if (data_problem.empty() && label_problem.empty() && !o.verify) {
        outcomes[k] = Outcome::Kept;
        return;
      }
      source.read_data(data);
      source.read_labels(labels);
      if (o.verify) {
        if (data_problem.empty() && !same_values(job.data, data_header, data.data(), buffer))
          data_problem = "values differ from the source";
        if (label_problem.empty() && !same_values(job.label, label_header, labels.data(), buffer))
          label_problem = "values differ from the source";
        if (data_problem.empty() && label_problem.empty()) {
          outcomes[k] = Outcome::Kept;
          return;
        }
      }
    } catch (const Error& e) {
      outcomes[k] = Outcome::Failed;
      report(e.what());
      return;
    }
    // A write that fails is the disk's problem, not the sample's: stop.
    try {
      if (!data_problem.empty()) npy::write(job.data.string(), npy::DType::Float32, data_shape, data.data());
      if (!label_problem.empty()) npy::write(job.label.string(), label_dtype, label_shape, labels.data());
    } catch (const Error& e) {
      outcomes[k] = Outcome::Failed;
      stop = true;
      report(e.what());
      return;
    }
    const bool repaired = (data_problem != "missing" && !data_problem.empty()) ||
                          (label_problem != "missing" && !label_problem.empty());
    outcomes[k] = repaired ? Outcome::Repaired : Outcome::Converted;
    std::string why;
    for (const auto& [path, problem] : {std::pair{&job.data, &data_problem}, {&job.label, &label_problem}})
      if (!problem->empty() && *problem != "missing")
        why += fmt::format("; {} {}", path->filename().string(), *problem);
    std::lock_guard<std::mutex> lock(output);
    fmt::print(stderr, "deepcam-data: {} {}/{}, {}{}\n", repaired ? "repaired" : "converted", job.split,
               job.data.filename().string(), job.label.filename().string(), why);
  });

  std::size_t count[5] = {};
  for (const Outcome out : outcomes) ++count[static_cast<int>(out)];
  const std::size_t kept = count[0], converted = count[1], repaired = count[2], failed = count[3],
                    skipped = count[4];
  if (failed == 0 && rank.rank == 0) copy_atomically(src_stats, o.dst / "stats.h5");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fmt::print(stderr,
             "deepcam-data: convert: {}{} samples in {} ({}) in {:.1f} s: {} converted, {} repaired, {} already "
             "valid{}{}\n",
             who.empty() ? "" : who + ": ", jobs.size(), o.dst.string(), fmt::join(splits, ", "), seconds,
             converted, repaired, kept, o.verify ? " (checked value by value)" : " (headers and sizes checked)",
             failed ? fmt::format(", {} failed", failed) : "");
  if (failed)
    throw Error(fmt::format("convert: {} of {} samples failed{} (see above); fix the cause and run the same "
                            "command again: complete pairs are kept{}",
                            failed, jobs.size(),
                            skipped ? fmt::format(" and {} were not attempted after a failed write", skipped) : "",
                            rank.rank == 0 ? ", and stats.h5 is copied once all succeed" : ""));
}

}  // namespace deepcam::data
