#include "convert.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <new>
#include <optional>
#include <set>
#include <system_error>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "deepcam/data_set.hpp"
#include "deepcam/error.hpp"
#include "parallel.hpp"
#include "stats.hpp"
#include "std_streams.hpp"
#include "temporary_files.hpp"
#include "verify.hpp"

namespace deepcam::data {
namespace fs = std::filesystem;

namespace {

constexpr const char* kData = "climate/data";
constexpr const char* kLabels = "climate/labels_0";
constexpr bool kHostBigEndian = __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__;

// ---------------------------------------------------------------------------
// HDF5, through deepcam::h5: the npy dtype a dataset keeps in the copy.

npy::DType stored_dtype(const h5::File& file, const char* name) {
  using Kind = h5::StoredType::Kind;
  const h5::StoredType t = file.stored_type(name);
  if (t.kind == Kind::Integer) {
    switch (t.size) {
      case 1: return t.is_signed ? npy::DType::Int8 : npy::DType::UInt8;
      case 2: return t.is_signed ? npy::DType::Int16 : npy::DType::UInt16;
      case 4: return t.is_signed ? npy::DType::Int32 : npy::DType::UInt32;
      case 8: return t.is_signed ? npy::DType::Int64 : npy::DType::UInt64;
      default: break;
    }
  } else if (t.kind == Kind::Float) {
    switch (t.size) {
      case 2: return npy::DType::Float16;
      case 4: return npy::DType::Float32;
      case 8: return npy::DType::Float64;
      default: break;
    }
  }
  const char* what = t.kind == Kind::Enum       ? "an enum (h5py stores bool arrays so)"
                     : t.kind == Kind::String   ? "strings"
                     : t.kind == Kind::Compound ? "a compound type"
                     : t.kind == Kind::Integer  ? "an integer of unusual size"
                     : t.kind == Kind::Float    ? "a float of unusual size"
                                                : "a non-numeric type";
  throw Error(fmt::format("{}: dataset {}: stored as {} ({} bytes); samples hold 1-, 2-, 4- or 8-byte "
                          "integers or 2-, 4- or 8-byte floats",
                          file.path(), name, what, t.size));
}

// The shape of one of the sample's two datasets; when it is missing, the
// message says what a sample holds.
std::vector<std::int64_t> sample_shape(const h5::File& file, const char* name) {
  h5::Shape shape;
  try {
    shape = file.shape(name);
  } catch (const Error& e) {
    if (file.has(name)) throw;
    throw Error(fmt::format("{}; a sample holds {} and {}", e.what(), kData, kLabels));
  }
  return std::vector<std::int64_t>(shape.begin(), shape.end());
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
    const char* step = std::getenv("SLURM_STEP_NUM_TASKS");
    const bool slurm_outside_a_step = std::strcmp(rank_name, "SLURM_PROCID") == 0 && (!step || !*step);
    // An allocation's shell (salloc): the job's task count, no task's rank.
    if (slurm_outside_a_step && !rank) {
      if (parse_env_int(size_name, size) == 1) continue;
      throw Error(fmt::format("environment: {}={} (Slurm), but no SLURM_PROCID or SLURM_STEP_NUM_TASKS: this process "
                              "runs in an allocation's shell (salloc), on the host it was started from, not as a "
                              "task of an srun step; start the ranks with srun (srun -n 1 for one process)",
                              size_name, size));
    }
    if (!rank || !size)
      throw Error(fmt::format("environment variable {} is set but {} is not; set both or neither",
                              rank ? rank_name : size_name, rank ? size_name : rank_name));
    Rank r{parse_env_int(rank_name, rank), parse_env_int(size_name, size),
           fmt::format("{}/{}", rank_name, size_name)};
    if (r.size < 1 || r.rank < 0 || r.rank >= r.size)
      throw Error(fmt::format("environment: {}={} and {}={}: the rank must be at least 0 and below the size",
                              rank_name, rank, size_name, size));
    // As deepcam-host: srun gives each task of a step SLURM_STEP_NUM_TASKS,
    // and a batch script's own process, which sbatch runs once, has none. It
    // would convert a share of the samples and leave the set without stats.h5.
    if (slurm_outside_a_step && r.size > 1)
      throw Error(fmt::format("environment: {}={} and {}={} (Slurm), but no SLURM_STEP_NUM_TASKS: this process is the "
                              "batch script's own, which sbatch runs once, not a task of an srun step; start the "
                              "ranks with srun, or unset SLURM_NTASKS to convert with one process",
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
  return "";  // its size: read_header refused a byte more or less
}

// The modification time convert gives both files of a pair: their source's.
// A pair with another was not written from this source (another set's
// sample under the same name, its stats.h5 removed; one converted before
// the source was written again), or was copied without its time: its values
// decide, as with --verify. nullopt when the file cannot be looked at.
std::optional<timespec> modified(const fs::path& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  return st.st_mtim;
}

// Whether `path` has the time `time` as utimensat gives it: to the
// nanosecond, or cut to what the file system keeps (whole seconds on a
// parallel file system, microseconds).
bool dated(const fs::path& path, const std::optional<timespec>& time) {
  const std::optional<timespec> own = modified(path);
  if (!own || !time || own->tv_sec != time->tv_sec) return false;
  return own->tv_nsec == time->tv_nsec || own->tv_nsec == 0 || own->tv_nsec == time->tv_nsec / 1000 * 1000;
}

// Gives `path` the source's time unless it has it; "" or why it could not
// (a read-only mount, a file of another user's). Not an error: a pair
// without it has its values compared the next time.
std::string stamp(const fs::path& path, const std::optional<timespec>& time) {
  if (dated(path, time)) return "";
  if (!time) return "its source's modification time cannot be read";
  const timespec times[2] = {{0, UTIME_OMIT}, *time};
  if (::utimensat(AT_FDCWD, path.c_str(), times, 0) != 0) return std::strerror(errno);
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
  const fs::path temp = temporary_files::hidden_name(to);
  fs::copy_file(from, temp, fs::copy_options::overwrite_existing, ec);
  if (!ec) fs::rename(temp, to, ec);
  if (ec) {
    std::error_code ignored;
    fs::remove(temp, ignored);
    throw Error(fmt::format("{}: cannot copy {} there: {}", to.string(), from.string(), ec.message()));
  }
}

// `path` as the file system resolves it (links, "..", a tail not made yet).
fs::path resolved(const fs::path& path) {
  std::error_code ec;
  fs::path out = fs::weakly_canonical(fs::absolute(path), ec);
  if (ec) out = fs::absolute(path).lexically_normal();
  if (!out.has_filename() && out.has_parent_path()) out = out.parent_path();  // a trailing '/'
  return out;
}

// Whether `inner` lies strictly below `outer` (both resolved).
bool is_below(const fs::path& inner, const fs::path& outer) {
  auto i = inner.begin();
  for (auto o = outer.begin(); o != outer.end(); ++o, ++i)
    if (i == inner.end() || *i != *o) return false;
  return i != inner.end();
}

}  // namespace

namespace {

// Whether two files hold the same bytes (false when either cannot be read).
bool same_bytes(const fs::path& a, const fs::path& b) {
  std::ifstream x(a, std::ios::binary), y(b, std::ios::binary);
  if (!x || !y) return false;
  std::vector<char> p(1 << 16), q(1 << 16);
  while (x && y) {
    x.read(p.data(), static_cast<std::streamsize>(p.size()));
    y.read(q.data(), static_cast<std::streamsize>(q.size()));
    if (x.gcount() != y.gcount() || std::memcmp(p.data(), q.data(), static_cast<std::size_t>(x.gcount())) != 0) {
      return false;
    }
  }
  return !x && !y && x.eof() && y.eof();
}

// An output that is not the source and holds another data set: HDF5
// samples of its own (the pairs would be written beside them, under their
// names), or a stats.h5 other than the source's (it would be replaced, and
// its set normalised with the source's statistics). Refused before
// anything is written.
void refuse_another_set_in(const ConvertOptions& o, const std::vector<std::string>& splits) {
  if (resolved(o.src) == resolved(o.dst)) return;  // in place: the pairs go beside the source's own files
  std::error_code ec;
  for (const std::string& split : splits) {
    for (fs::directory_iterator it(o.dst / split, ec), end; !ec && it != end; it.increment(ec)) {
      if (it->path().extension() != ".h5" || it->path().filename().string()[0] == '.') continue;
      throw Error(fmt::format("{}: an HDF5 sample in the output, which is not the source: {} holds a data set of "
                              "its own; convert into an empty folder, or give the source as the output to write "
                              "the pairs beside its HDF5 files",
                              it->path().string(), o.dst.string()));
    }
  }
  const fs::path stats = o.dst / "stats.h5";
  const fs::file_status status = fs::symlink_status(stats, ec);
  if (!fs::exists(status)) return;
  // Not opened unless a file: a FIFO there would block the open for good.
  if (!fs::is_regular_file(fs::status(stats, ec))) {
    throw Error(fmt::format("{}: not a file; convert writes the set's stats.h5 there: remove it, or convert into an "
                            "empty folder",
                            stats.string()));
  }
  // --verify compares every pair with the source and rewrites what differs:
  // the output becomes the source's numpy form (the source's stats computed
  // again, say), whatever it held.
  if (!o.verify && !same_bytes(stats, o.src / "stats.h5")) {
    throw Error(fmt::format("{}: differs from {}: the output holds another data set's statistics (they would be "
                            "replaced by this set's), or this set's from before they were "
                            "computed again; convert into an empty folder, or add --verify to compare every pair "
                            "with the source and rewrite what differs",
                            stats.string(), (o.src / "stats.h5").string()));
  }
}

}  // namespace

// ---------------------------------------------------------------------------

std::string convert_paths_problem(const fs::path& src, const fs::path& dst) {
  const fs::path s = resolved(src), d = resolved(dst);
  if (is_below(d, s))
    return fmt::format("convert: the output {} is inside the source {}: the splits and stats.h5 written there "
                       "would join the source set (a stats.h5 in {}/train is one more sample to the hdf5 reader); "
                       "give an output outside the source, or the source itself to write the pairs beside its "
                       "HDF5 files",
                       dst.string(), src.string(), src.string());
  // DST/<split> receives the pairs of SRC/<split>: a source at or below
  // such a folder would gain them.
  if (is_below(s, d)) {
    const fs::path split = *s.lexically_relative(d).begin();
    std::error_code ec;
    if (fs::is_directory(s / split, ec))
      return fmt::format("convert: the source {} is inside {}, where the output {} receives the pairs of the "
                         "source's {}/ split; give an output that does not hold the source",
                         src.string(), (dst / split).string(), dst.string(), split.string());
  }
  // DST/<split>, where the pairs of SRC/<split> go, resolved as DST is: a
  // link into the source would write them among its files.
  std::error_code ec;
  if (s == d || !fs::is_directory(s, ec)) return "";
  for (fs::directory_iterator it(s, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    std::error_code kind;
    if (name[0] == '.' || !it->is_directory(kind)) continue;
    const fs::path split = resolved(dst / name);
    if (split == s || is_below(split, s))
      return fmt::format("convert: the output {} is {}, inside the source {}: the pairs written there would join "
                         "the source set; give an output whose split folders lie outside the source",
                         (dst / name).string(), split.string(), src.string());
  }
  return "";
}

std::vector<unsigned char> read_npy_data(const fs::path& path, const npy::Header& header) {
  std::vector<unsigned char> bytes(header.data_bytes());
  std::ifstream in(path, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(header.data_offset));
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!in) throw Error(fmt::format("{}: cannot read the file", path.string()));
  return bytes;
}

H5Sample::H5Sample(const fs::path& path) : file_(h5::File::open(path.string())) {
  data_shape_ = sample_shape(file_, kData);
  label_shape_ = sample_shape(file_, kLabels);
  data_dtype_ = stored_dtype(file_, kData);
  label_dtype_ = stored_dtype(file_, kLabels);
  if (const std::string problem = data_shape_problem(data_shape_); !problem.empty())
    throw Error(fmt::format("{}: dataset {}: {}", path.string(), kData, problem));
  if (label_shape_ != std::vector<std::int64_t>{data_shape_[0], data_shape_[1]})
    throw Error(fmt::format("{}: dataset {} has shape {}, but {} is {}: the labels must be (height, width) "
                            "of the data",
                            path.string(), kLabels, shape_text(label_shape_), kData, shape_text(data_shape_)));
}

void H5Sample::read_data(std::vector<float>& out) const {
  out.resize(static_cast<std::size_t>(product(data_shape_)));
  file_.read(kData, out.data(), out.size());
}

void H5Sample::read_labels(std::vector<unsigned char>& out) const {
  out.resize(static_cast<std::size_t>(product(label_shape_)) * npy::item_size(label_dtype_));
  file_.read_stored(kLabels, out.data(), out.size());
}

std::string data_shape_problem(const std::vector<std::int64_t>& shape) {
  if (shape.size() != 3) return fmt::format("expected shape (height, width, channels), found {}", shape_text(shape));
  if (*std::min_element(shape.begin(), shape.end()) < 1)
    return fmt::format("has shape {}; height, width and channels must each be at least 1, as the readers require",
                       shape_text(shape));
  // A header may declare any size, and a chunked dataset holds it in a few
  // bytes of file: checked before the buffer is allocated.
  const double bytes = 4.0 * static_cast<double>(shape[0]) * static_cast<double>(shape[1]) *
                       static_cast<double>(shape[2]);
  const double memory =
      static_cast<double>(::sysconf(_SC_PHYS_PAGES)) * static_cast<double>(::sysconf(_SC_PAGESIZE));
  if (memory > 0 && bytes > memory)
    return fmt::format("has shape {}, {:.3g} GB as float32, more than this machine's memory ({:.3g} GB); a sample "
                       "is (height, width, channels), (768, 1152, 16) in SPEC 1.1",
                       shape_text(shape), bytes / 1e9, memory / 1e9);
  return "";
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  if (shape.size() == 1) return fmt::format("({},)", shape[0]);
  return fmt::format("({})", fmt::join(shape, ", "));
}

// "NaN at (row 3, column 7, channel 2)", or "" when every value is finite.
std::string non_finite(const std::vector<float>& data, const std::vector<std::int64_t>& shape,
                       const std::vector<ChannelScale>& scales, npy::DType stored) {
  const std::size_t channels = static_cast<std::size_t>(shape[2]), width = static_cast<std::size_t>(shape[1]);
  std::size_t bad = 0, first = 0;
  for (std::size_t k = 0; k < data.size(); ++k)
    if (!std::isfinite(data[k]) && bad++ == 0) first = k;
  if (bad) {
    const std::size_t pixel = first / channels;
    // Read as float32, as training reads it: a stored float64 beyond
    // float32's range has become Inf, and the file may hold either.
    const bool wide = stored == npy::DType::Float64;
    const char* what = std::isnan(data[first]) ? "NaN" : wide ? "Inf, or a float64 beyond float32's range," : "Inf";
    return fmt::format("{} at (row {}, column {}, channel {}){}; data must be finite{}", what, pixel / width,
                       pixel % width, first % channels,
                       bad > 1 ? fmt::format(" and {} more non-finite values", bad - 1) : "",
                       wide && !std::isnan(data[first]) ? " in float32, the type training reads it in" : "");
  }
  if (scales.size() != channels) return "";
  // Training's float32 arithmetic (deepcam/normalise.hpp): a finite value
  // far outside stats.h5's range can still overflow.
  float normalised = 0.0f;
  for (std::size_t k = 0; k < data.size(); ++k) {
    const ChannelScale& s = scales[k % channels];
    const float n = s.scale * (data[k] - s.shift);
    if (!std::isfinite(n) && bad++ == 0) {
      first = k;
      normalised = n;
    }
  }
  if (!bad) return "";
  const std::size_t pixel = first / channels;
  return fmt::format("{} at (row {}, column {}, channel {}) normalises to {} with stats.h5's range{}; data must be "
                     "finite once normalised",
                     data[first], pixel / width, pixel % width, first % channels, normalised,
                     bad > 1 ? fmt::format(" (and {} more such values)", bad - 1) : "");
}

// "value 3 at (row 1, column 5)", or "" when every label is a class.
std::string bad_labels(const std::vector<std::int64_t>& labels, const std::vector<std::int64_t>& shape) {
  const std::size_t width = static_cast<std::size_t>(shape[1]);
  std::size_t bad = 0, first = 0;
  for (std::size_t k = 0; k < labels.size(); ++k)
    if ((labels[k] < 0 || labels[k] > 2) && bad++ == 0) first = k;
  if (!bad) return "";
  return fmt::format("value {} at (row {}, column {}){}; the classes are 0, 1 and 2", labels[first], first / width,
                     first % width, bad > 1 ? fmt::format(" and {} more labels outside them", bad - 1) : "");
}

std::string bad_labels(const H5Sample& sample, const std::vector<unsigned char>& stored) {
  npy::Header h;  // the labels as read: stored type, this machine's order
  h.dtype = sample.label_dtype();
  h.big_endian = kHostBigEndian;
  h.shape = sample.label_shape();
  std::vector<std::int64_t> labels(static_cast<std::size_t>(h.count()));
  npy::convert(sample.path() + ": dataset climate/labels_0", h, stored.data(), labels.data(), h.count());
  return bad_labels(labels, h.shape);
}

namespace {

// A set training refuses is not carried into the numpy form: its rule on
// the root (deepcam/data_set.hpp) and verify's stats.h5 checks, before
// anything is written. Listing problems are the run's (reported per file).
// Returns stats.h5's normalisation of each channel.
std::vector<ChannelScale> refuse_what_training_refuses(const fs::path& src, const std::vector<std::string>& splits,
                                                       const std::map<std::string, std::vector<std::string>>& sources) {
  std::vector<std::string> problems;
  for (const char* split : kDataSplits) {
    if (std::string problem = split_folder_problem(src.string(), split); !problem.empty())
      problems.push_back(std::move(problem));
    else if (std::find(splits.begin(), splits.end(), split) == splits.end())
      problems.push_back(empty_split_problem((src / split).string(), split, "samples (*.h5)"));
  }
  // The channel count of the first sample that opens, for stats.h5's shapes.
  std::int64_t channels = -1;
  for (const auto& [split, files] : sources) {
    for (const std::string& file : files) {
      try {
        channels = H5Sample(file).data_shape()[2];
        break;
      } catch (const Error&) {
        // Reported when its turn comes.
      }
    }
    if (channels >= 0) break;
  }
  std::vector<ChannelScale> scales;
  for (std::string& problem : stats_problems(src, channels, &scales)) problems.push_back(std::move(problem));
  if (problems.empty()) return scales;
  if (problems.size() == 1) throw Error(problems[0] + "; nothing converted");
  for (const std::string& problem : problems)
    deepcam::eprint("deepcam-data: {}\n", deepcam::shown(problem, /*one_line=*/true));
  throw Error(fmt::format("convert: {}: {} problems (above) that training would refuse; nothing converted",
                          src.string(), problems.size()));
}

// The shape the readers take for every sample of the set (file_reader.cpp):
// its first training sample's, in name order; of the first that opens, or
// none when none does (each is reported when its turn comes).
struct SetShape {
  std::vector<std::int64_t> shape;
  std::string file;
};
SetShape set_shape(const std::map<std::string, std::vector<std::string>>& sources) {
  const auto train = sources.find("train");
  if (train == sources.end()) return {};
  for (const std::string& file : train->second) {
    try {
      return {H5Sample(file).data_shape(), file};
    } catch (const Error&) {
    }
  }
  return {};
}

}  // namespace

void run_convert(const ConvertOptions& o) {
  const auto start = std::chrono::steady_clock::now();
  const Rank rank = rank_from_environment();  // before anything is made
  std::error_code ec;
  if (const std::string problem = directory_problem(o.src.string()); !problem.empty())
    throw Error(fmt::format("{}: {}; convert reads a data set root holding train/, validation/ and stats.h5",
                            o.src.string(), problem));
  const fs::path src_stats = o.src / "stats.h5";
  if (const std::string problem = stats_file_problem(o.src.string()); !problem.empty())
    throw Error(fmt::format("{} (deepcam-data stats {} makes it)", problem, o.src.string()));

  // Splits are the folders of SRC that hold samples, whatever their names.
  // Entries named like samples that are not files are problems of the run
  // (reported below, counted as failed samples), not reasons to stop it.
  std::vector<std::string> splits, listing_problems;
  std::map<std::string, std::vector<std::string>> sources;
  for (fs::directory_iterator it(o.src, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name[0] == '.' || !it->is_directory(ec)) continue;
    std::vector<std::string> problems, files;
    // Every *.h5, as the hdf5 reader (and the reference) reads them: one
    // that SPEC 1.5's names cannot carry over is a problem, not left out,
    // or the two forms of the set would train on different samples.
    for (std::string& file : list_sample_files(it->path().string(), "", ".h5", &problems)) {
      if (fs::path(file).filename().string().rfind("data-", 0) == 0) {
        files.push_back(std::move(file));
      } else {
        problems.push_back(fmt::format("{}: a sample to the hdf5 reader (it reads every *.h5), but not named "
                                       "data-X.h5, after which its numpy pair is named (SPEC 1.5); rename it",
                                       file));
      }
    }
    if (files.empty() && problems.empty()) continue;
    splits.push_back(name);
    sources[name] = std::move(files);
    listing_problems.insert(listing_problems.end(), problems.begin(), problems.end());
  }
  if (ec) throw Error(fmt::format("{}: cannot list the directory: {}", o.src.string(), ec.message()));
  if (splits.empty()) {
    // A numpy set given as the source: its folders are there, with samples
    // convert does not read.
    bool numpy = false;
    for (const char* split : {"train", "validation"}) {
      std::vector<std::string> ignored;
      if (!list_npy_split((o.src / split).string(), &ignored).data.empty()) numpy = true;
    }
    if (numpy) {
      throw Error(fmt::format("{}: holds numpy samples (data-*.npy) and no HDF5 ones: it is a numpy set already; "
                              "convert reads a set of *.h5 files",
                              o.src.string()));
    }
    throw Error(fmt::format("{}: no folder in it holds samples (*.h5); expected train/ and validation/",
                            o.src.string()));
  }
  std::sort(splits.begin(), splits.end());
  std::sort(listing_problems.begin(), listing_problems.end());
  const std::vector<ChannelScale> scales = refuse_what_training_refuses(o.src, splits, sources);
  const SetShape common = set_shape(sources);

  if (const std::string problem = output_directory_problem(o.dst.string()); !problem.empty())
    throw Error(fmt::format("{}: {}; convert writes the numpy set into that folder", o.dst.string(), problem));
  refuse_another_set_in(o, splits);

  std::vector<Job> all;
  for (const std::string& split : splits) {
    const fs::path out = o.dst / split;
    fs::create_directories(out, ec);
    if (ec) throw Error(fmt::format("{}: cannot create the directory: {}", out.string(), ec.message()));
    for (const fs::path source : sources[split]) {
      const std::string stem = source.stem().string().substr(5);  // after "data-"
      all.push_back({split, source, out / ("data-" + stem + ".npy"), out / ("label-" + stem + ".npy")});
    }
  }
  // Pairs in DST that SRC has no sample for would join the set unseen (its
  // readers take every pair), as synth refuses foreign samples.
  std::set<fs::path> ours;
  for (const Job& job : all) ours.insert(job.data);
  for (const std::string& split : splits) {
    std::vector<std::string> ignored;  // verify's to report, not convert's
    for (const std::string& data : list_npy_split((o.dst / split).string(), &ignored).data) {
      if (ours.count(data)) continue;
      const std::string x = fs::path(data).stem().string().substr(5);  // after "data-"
      throw Error(fmt::format("{}: no {} for it, so the numpy set would hold a sample the source does not; "
                              "convert into an empty folder, or remove the pair",
                              data, (o.src / split / ("data-" + x + ".h5")).string()));
    }
  }
  if (rank.size == 1) {
    remove_stale_temporaries(o.dst);
    for (const std::string& split : splits) remove_stale_temporaries(o.dst / split);
  }
  std::vector<Job> jobs;
  for (std::size_t k = static_cast<std::size_t>(rank.rank); k < all.size(); k += static_cast<std::size_t>(rank.size))
    jobs.push_back(all[k]);
  const std::string who = rank.size > 1 ? fmt::format("rank {} of {} ({})", rank.rank, rank.size, rank.source) : "";
  if (rank.size > 1 && !o.progress.quiet)
    deepcam::eprint("deepcam-data: convert: {}: {} of the {} samples\n", who, jobs.size(), all.size());
  // Every rank names what it cannot convert; rank 0 counts it, once.
  for (const std::string& problem : listing_problems)
    deepcam::eprint("deepcam-data: {}\n", deepcam::shown(problem, /*one_line=*/true));
  const std::size_t unlisted = rank.rank == 0 ? listing_problems.size() : 0;

  std::vector<Outcome> outcomes(jobs.size(), Outcome::NotAttempted);
  std::atomic<bool> stop{false};
  std::mutex output;
  auto report = [&](const std::string& line) {
    std::lock_guard<std::mutex> lock(output);
    deepcam::eprint("deepcam-data: {}\n", deepcam::shown(line, /*one_line=*/true));
  };
  // Pairs that could not be given their source's time, and the first reason.
  std::size_t unstamped = 0;
  std::string unstamped_first;
  auto stamp_pair = [&](const Job& job, const std::optional<timespec>& time) {
    std::string why;
    for (const fs::path* path : {&job.data, &job.label})
      if (const std::string problem = stamp(*path, time); !problem.empty() && why.empty())
        why = path->string() + ": " + problem;
    if (why.empty()) return;
    std::lock_guard<std::mutex> lock(output);
    if (unstamped++ == 0) unstamped_first = why;
  };
  Progress progress(who.empty() ? "convert" : "convert: " + who, jobs.size(), "samples", o.progress);
  parallel_for(jobs.size(), o.threads, [&](std::size_t k) {
    if (stop) return;
    struct Advance {
      Progress& p;
      ~Advance() { p.advance(); }
    } advance{progress};
    const Job& job = jobs[k];
    std::vector<float> data;
    std::vector<unsigned char> labels;
    std::vector<char> buffer;
    std::string data_problem, label_problem;
    npy::Header data_header, label_header;
    std::vector<std::int64_t> data_shape, label_shape;
    npy::DType label_dtype{};
    std::optional<timespec> source_time;
    try {
      const H5Sample source(job.source);
      data_shape = source.data_shape();
      label_shape = source.label_shape();
      label_dtype = source.label_dtype();
      // Training refuses a sample of another shape than the set's, when it
      // reads it: not carried into the numpy form either.
      if (!common.shape.empty() && data_shape != common.shape) {
        throw Error(fmt::format("{}: dataset {} has shape {}, and the set's first training sample {} has {}: the "
                                "readers take that shape for every sample; not converted",
                                job.source.string(), kData, shape_text(data_shape), common.file,
                                shape_text(common.shape)));
      }
      source_time = modified(job.source);
      data_problem = header_problem(job.data, npy::DType::Float32, data_shape, data_header);
      label_problem = header_problem(job.label, label_dtype, label_shape, label_header);
      const bool both_dated = dated(job.data, source_time) && dated(job.label, source_time);
      if (data_problem.empty() && label_problem.empty() && both_dated && !o.verify) {
        outcomes[k] = Outcome::Kept;
        return;
      }
      source.read_data(data);
      source.read_labels(labels);
      if (o.verify || !both_dated) {
        if (data_problem.empty() && !same_values(job.data, data_header, data.data(), buffer))
          data_problem = "values differ from the source";
        if (label_problem.empty() && !same_values(job.label, label_header, labels.data(), buffer))
          label_problem = "values differ from the source";
        if (data_problem.empty() && label_problem.empty()) {
          stamp_pair(job, source_time);
          outcomes[k] = Outcome::Kept;
          return;
        }
      }
      // Values training would refuse are not carried into the numpy form.
      if (const std::string bad = non_finite(data, data_shape, scales, source.data_dtype()); !bad.empty())
        throw Error(fmt::format("{}: dataset {}: {}; not converted", job.source.string(), kData, bad));
      if (const std::string bad = bad_labels(source, labels); !bad.empty())
        throw Error(fmt::format("{}: dataset {}: {}; not converted", job.source.string(), kLabels, bad));
    } catch (const Error& e) {
      outcomes[k] = Outcome::Failed;
      report(e.what());
      return;
    } catch (const std::bad_alloc&) {
      // Shapes within the machine's memory may still not fit beside the
      // other threads' samples: this sample failed, not the run.
      outcomes[k] = Outcome::Failed;
      report(fmt::format("{}: out of memory reading it; run with fewer --threads", job.source.string()));
      return;
    }
    // A write that fails is the disk's problem, not the sample's: stop. A
    // data file this job wrote goes with a label file that could not be
    // written (a full disk): the readers and verify refuse a data file
    // without its label.
    bool wrote_data = false;
    try {
      if (!data_problem.empty()) {
        npy::write(job.data.string(), npy::DType::Float32, data_shape, data.data());
        wrote_data = true;
      }
      if (!label_problem.empty()) npy::write(job.label.string(), label_dtype, label_shape, labels.data());
    } catch (const Error& e) {
      outcomes[k] = Outcome::Failed;
      stop = true;
      std::error_code ec;
      const bool removed = wrote_data && fs::remove(job.data, ec);
      // A label being repaired was broken: it goes with the data file.
      if (removed && !label_problem.empty() && label_problem != "missing") fs::remove(job.label, ec);
      report(removed ? fmt::format("{} ({}, written before it, is removed: a pair is kept whole or not at all)",
                                   e.what(), job.data.filename().string())
                     : std::string(e.what()));
      return;
    }
    stamp_pair(job, source_time);
    const bool repaired = (data_problem != "missing" && !data_problem.empty()) ||
                          (label_problem != "missing" && !label_problem.empty());
    outcomes[k] = repaired ? Outcome::Repaired : Outcome::Converted;
    // A repaired pair says what was wrong with it; converted ones only
    // count (the progress lines and the summary).
    if (!repaired || o.progress.quiet) return;
    std::string why;
    for (const auto& [path, problem] : {std::pair{&job.data, &data_problem}, {&job.label, &label_problem}})
      if (!problem->empty() && *problem != "missing")
        why += fmt::format("; {} {}", path->filename().string(), *problem);
    std::lock_guard<std::mutex> lock(output);
    const std::string line = fmt::format("repaired {}/{}, {}{}", job.split, job.data.filename().string(),
                                         job.label.filename().string(), why);
    deepcam::eprint("deepcam-data: {}\n", deepcam::shown(line, /*one_line=*/true));
  });

  std::size_t count[5] = {};
  for (const Outcome out : outcomes) ++count[static_cast<int>(out)];
  const std::size_t kept = count[0], converted = count[1], repaired = count[2],
                    failed = count[3] + unlisted, skipped = count[4];
  // stats.h5 marks a whole set: copied once every pair of every rank is
  // there. Pairs appear under their final names only when whole, and
  // another rank's pair counts once it has its source's time (before, it
  // may be another set's that rank has not compared yet), so the last rank
  // to finish sees them all; a rank that failed or was killed leaves its
  // pairs missing or undated, and then no rank copies it. (Another rank's
  // entry that is not a file is this rank's listing problem too.) The look
  // stops at the first pair missing: a rank that ends early asks the file
  // system little.
  bool missing = false;
  if (failed == 0 && listing_problems.empty()) {
    for (std::size_t k = 0; k < all.size() && !missing; ++k) {
      const Job& job = all[k];
      const bool mine = k % static_cast<std::size_t>(rank.size) == static_cast<std::size_t>(rank.rank);
      const std::optional<timespec> time = mine ? std::nullopt : modified(job.source);
      missing = !fs::is_regular_file(job.data, ec) || !fs::is_regular_file(job.label, ec) ||
                (!mine && !(dated(job.data, time) && dated(job.label, time)));
    }
    if (!missing) copy_atomically(src_stats, o.dst / "stats.h5");
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const int threads = threads_for(jobs.size(), o.threads);
  if (!o.progress.quiet)
    deepcam::eprint(
        "deepcam-data: convert: {}{} samples in {} ({}) in {:.1f} s on {} thread{}: {} converted, {} repaired, "
        "{} already valid{}{}{}\n",
        who.empty() ? "" : who + ": ", jobs.size(), o.dst.string(), fmt::join(splits, ", "), seconds, threads,
        threads == 1 ? "" : "s", converted, repaired, kept,
        o.verify ? " (checked value by value)" : " (headers, sizes and times checked; values where a time differs)",
        failed ? fmt::format(", {} failed", failed) : "",
        missing ? "; other ranks' samples are not all there yet: the rank that finishes last copies stats.h5" : "");
  if (unstamped && !o.progress.quiet)
    deepcam::eprint("deepcam-data: convert: {} pair{} could not be given {} source's modification time (first: {}); "
                    "a later convert compares {} values with the source instead\n",
                    unstamped, unstamped == 1 ? "" : "s", unstamped == 1 ? "its" : "their",
                    deepcam::shown(unstamped_first, /*one_line=*/true), unstamped == 1 ? "its" : "their");
  if (failed)
    throw Error(fmt::format("convert: {} of {} samples failed{} (see above); fix the cause and run the same "
                            "command again: complete pairs are kept, and stats.h5 is copied once every sample is "
                            "converted",
                            failed, jobs.size() + unlisted,
                            skipped ? fmt::format(" and {} were not attempted after a failed write", skipped) : ""));
}

}  // namespace deepcam::data
