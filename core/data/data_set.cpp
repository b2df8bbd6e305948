#include "deepcam/data_set.hpp"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>

#include <fmt/format.h>

#include "deepcam/error.hpp"
#include "deepcam/json.hpp"

namespace deepcam {

namespace {

std::string join(const std::string& dir, const std::string& name) {
  return !dir.empty() && dir.back() == '/' ? dir + name : dir + "/" + name;
}

// What a non-regular entry is, for the message.
const char* kind_of(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  return "not a regular file";
}

// "" when `path` is a regular file or a link to one, else why it is not a
// sample file. stat() follows links and opens nothing.
std::string entry_problem(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    if (err == ELOOP)
      return fmt::format("{}: a symbolic link loop, not a sample file; remove it or point it at the file", path);
    struct stat link {};
    if (err == ENOENT && ::lstat(path.c_str(), &link) == 0 && S_ISLNK(link.st_mode))
      return fmt::format("{}: a symbolic link to nothing (its target does not exist); remove it or point it at "
                         "the file",
                         path);
    return fmt::format("{}: cannot stat: {}", path, std::strerror(err));
  }
  if (S_ISREG(st.st_mode)) return "";
  return fmt::format("{}: is {}, named like a sample file; a sample is a regular file: move it out of the "
                     "split folder",
                     path, kind_of(st.st_mode));
}

void report(std::vector<std::string>* problems, std::string message) {
  if (!problems) throw Error(message);
  problems->push_back(std::move(message));
}

// Rounds a double to the nearest float16 value (ties to even), returned as
// a double: float16 arithmetic done in double and rounded once more gives
// the correctly rounded float16 result of one operation on float16
// operands (53 >= 2 * 11 + 2 bits), as NumPy's float16 arithmetic does.
double round_to_half(double x) {
  if (!std::isfinite(x) || x == 0.0) return x;
  const double a = std::fabs(x);
  if (a >= 65520.0) return std::copysign(INFINITY, x);  // beyond the largest half, after rounding
  int exponent;
  std::frexp(a, &exponent);  // a = m * 2^exponent, m in [0.5, 1)
  // Halves have 11 significant bits; subnormals below 2^-14 a fixed step of 2^-24.
  const int e = std::max(exponent, -13);
  const double step = std::ldexp(1.0, e - 11);
  return std::copysign(std::nearbyint(a / step) * step, x);
}

bool named_like(const std::string& name, const std::string& prefix, const std::string& extension) {
  return name.size() >= prefix.size() + extension.size() && name[0] != '.' &&
         name.compare(0, prefix.size(), prefix) == 0 &&
         name.compare(name.size() - extension.size(), extension.size(), extension) == 0;
}

}  // namespace

namespace {

// The names in `dir`, read once: a split folder of the full data set holds
// about 240,000 files, and on a parallel file system every rank's listing
// is a load on its metadata server.
std::vector<std::string> names_in(const std::string& dir) {
  // readdir rather than std::filesystem: its directory_entry caches a type
  // that a symlink loop makes throw, and it is asked for nothing but names.
  std::unique_ptr<DIR, int (*)(DIR*)> handle(::opendir(dir.c_str()), ::closedir);
  if (!handle) throw Error(fmt::format("{}: cannot list the directory: {}", dir, std::strerror(errno)));
  std::vector<std::string> names;
  errno = 0;
  while (const dirent* entry = ::readdir(handle.get())) {
    names.emplace_back(entry->d_name);
    errno = 0;
  }
  if (errno != 0) throw Error(fmt::format("{}: cannot list the directory: {}", dir, std::strerror(errno)));
  // Byte order of UTF-8 equals code-point order: the reference's sorted().
  std::sort(names.begin(), names.end());
  return names;
}

// list_sample_files() over `names` (names_in(dir)), also giving the paths it
// refused.
std::vector<std::string> scan(const std::string& dir, const std::vector<std::string>& names,
                              const std::string& prefix, const std::string& extension,
                              std::vector<std::string>* problems, std::vector<std::string>* refused) {
  std::vector<std::string> files;
  for (const std::string& name : names) {
    if (!named_like(name, prefix, extension)) continue;
    const std::string path = join(dir, name);
    // Refused: every message that names a sample would have to escape its
    // name (errors keep their own line breaks, so a newline in a name
    // splits one). Named here with each control character as \xNN.
    if (const std::string problem = control_character(name); !problem.empty()) {
      report(problems, fmt::format("{}: the sample file's name {}; rename it", shown(path, true), problem));
      if (refused) refused->push_back(path);
      continue;
    }
    if (std::string problem = entry_problem(path); !problem.empty()) {
      report(problems, std::move(problem));
      if (refused) refused->push_back(path);
      continue;
    }
    files.push_back(path);
  }
  return files;
}

}  // namespace

std::vector<std::string> list_sample_files(const std::string& dir, const std::string& prefix,
                                           const std::string& extension, std::vector<std::string>* problems) {
  return scan(dir, names_in(dir), prefix, extension, problems, nullptr);
}

NpySplit list_npy_split(const std::string& dir, std::vector<std::string>* problems) {
  // X -> (data path, label path); "" where that file is missing.
  // A file refused by the listing is reported there; its partner is not
  // reported a second time as unpaired.
  std::map<std::string, std::pair<std::string, std::string>> pairs;
  std::vector<std::string> refused;
  const std::vector<std::string> names = names_in(dir);
  for (const std::string& path : scan(dir, names, "data-", ".npy", problems, &refused))
    pairs[path.substr(path.rfind("/data-") + 6)].first = path;
  for (const std::string& path : scan(dir, names, "label-", ".npy", problems, &refused))
    pairs[path.substr(path.rfind("/label-") + 7)].second = path;
  std::vector<std::string> refused_x;
  for (const std::string& path : refused) {
    const std::string name = path.substr(path.rfind('/') + 1);
    refused_x.push_back(name.substr(name.rfind("data-", 0) == 0 ? 5 : 6));
  }
  NpySplit out;
  for (const auto& [x, files] : pairs) {
    if (std::find(refused_x.begin(), refused_x.end(), x) != refused_x.end()) continue;
    const std::string data = join(dir, "data-" + x), label = join(dir, "label-" + x);
    if (files.second.empty()) {
      report(problems, fmt::format("{}: no label file label-{} beside it ({}: no such file; SPEC 1.5: every "
                                   "data-X.npy comes with label-X.npy)",
                                   data, x, label));
      continue;
    }
    if (files.first.empty()) {
      report(problems, fmt::format("{}: no data file data-{} beside it ({}: no such file; SPEC 1.5: every "
                                   "label-X.npy comes with data-X.npy)",
                                   label, x, data));
      continue;
    }
    out.data.push_back(files.first);
    out.labels.push_back(files.second);
  }
  // Both forms in one folder: a convert in place (DST = SRC), whose numpy
  // form is the whole split only once every data-X.h5 has its pair. The
  // .h5 files' own listing problems are the hdf5 listing's to report.
  if (!out.data.empty()) {
    std::vector<std::string> reported_there;
    for (const std::string& h5 : scan(dir, names, "data-", ".h5", &reported_there, nullptr)) {
      const std::string name = h5.substr(h5.rfind('/') + 1);
      const std::string x = name.substr(5, name.size() - 5 - 3) + ".npy";  // "data-" X ".h5"
      if (pairs.count(x) == 0) {
        report(problems, fmt::format("{}: no numpy pair data-{} beside it, though the folder holds the numpy form "
                                     "of {} samples: a convert in place (DST = SRC) that did not finish, "
                                     "which the npy reader would read as a smaller set; run the convert again",
                                     h5, x, out.data.size()));
      }
    }
  }
  return out;
}

const char* const kDataSplits[2] = {"train", "validation"};

std::string directory_problem(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    if (S_ISDIR(st.st_mode)) return "";
    return S_ISREG(st.st_mode) ? "a file, not a directory" : fmt::format("{}, not a directory", kind_of(st.st_mode));
  }
  if (errno == ENOENT || errno == ENOTDIR) return "no such directory";
  if (errno == ELOOP) return "a symbolic link loop, not a directory";
  return std::strerror(errno);
}

std::string output_directory_problem(const std::string& path) {
  // lstat follows a link named with a trailing '/' ("out/").
  std::string link = path;
  while (link.size() > 1 && link.back() == '/') link.pop_back();
  // Each folder on the way, then `path` itself: one that names nothing yet
  // is made with what follows it. A link to nothing, or a file, on the way
  // made the folders fail with "File exists" or "Not a directory".
  for (std::size_t end = link.find('/', 1);; end = link.find('/', end + 1)) {
    const std::string prefix = link.substr(0, end);
    const bool last = end == std::string::npos;
    const std::string where = last ? "" : fmt::format("on its way, {} is ", shown(prefix, /*one_line=*/true));
    struct stat st {};
    if (::lstat(prefix.c_str(), &st) != 0) return errno == ENOENT ? "" : directory_problem(path);
    if (S_ISLNK(st.st_mode) && ::stat(prefix.c_str(), &st) != 0 && errno == ENOENT) {
      char target[4096];
      const ssize_t n = ::readlink(prefix.c_str(), target, sizeof target);
      return fmt::format("{}a symbolic link to {} that leads to nothing", where,
                         n > 0 ? shown(std::string(target, static_cast<std::size_t>(n)), /*one_line=*/true) : "?");
    }
    if (last) return directory_problem(path);
    if (::stat(prefix.c_str(), &st) == 0 && !S_ISDIR(st.st_mode)) {
      return fmt::format("{}{}, not a directory", where, S_ISREG(st.st_mode) ? "a file" : kind_of(st.st_mode));
    }
  }
}

std::string split_folder_problem(const std::string& root, const std::string& split) {
  const std::string dir = join(root, split);
  const std::string problem = directory_problem(dir);
  if (problem.empty()) return "";
  return fmt::format("{}: {}; the data root must hold train/, validation/ and stats.h5", dir, problem);
}

std::string empty_split_problem(const std::string& dir, const std::string& split, const std::string& what) {
  return fmt::format("{}: no {} in the {} split; training needs at least one sample in train/ and in "
                     "validation/",
                     dir, what, split);
}

std::string stats_file_problem(const std::string& root) {
  const std::string path = join(root, "stats.h5");
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    if (S_ISREG(st.st_mode)) return "";
    return fmt::format("{}: is {}, not a file; the data root must hold stats.h5", path, kind_of(st.st_mode));
  }
  if (errno == ELOOP) return fmt::format("{}: a symbolic link loop; the data root must hold stats.h5", path);
  return fmt::format("{}: no such file; the data root must hold stats.h5", path);
}

std::size_t stats_arithmetic_bytes(std::size_t minval_float_bytes, std::size_t maxval_float_bytes) {
  if (minval_float_bytes == 0 || maxval_float_bytes == 0) return 8;
  return std::max(minval_float_bytes, maxval_float_bytes);
}

std::string stats_range_problem(const std::string& stats_path, std::int64_t channel, double min, double max,
                                std::size_t arithmetic_bytes, ChannelScale* scale) {
  // The reference: NumPy's 1 / (hi - lo) on the stored arrays, rounded to
  // float32 once it is a tensor.
  const char* dtype = arithmetic_bytes == 4 ? "float32" : arithmetic_bytes == 2 ? "float16" : "float64";
  double difference, reciprocal;
  if (arithmetic_bytes == 4) {
    const float d = static_cast<float>(max) - static_cast<float>(min);
    difference = d;
    reciprocal = static_cast<double>(1.0f / d);
  } else if (arithmetic_bytes == 2) {
    difference = round_to_half(max - min);
    reciprocal = round_to_half(1.0 / difference);
  } else {
    difference = max - min;
    reciprocal = 1.0 / difference;
  }
  const auto shift_f = static_cast<float>(min);
  const auto scale_f = static_cast<float>(reciprocal);
  std::string cause;
  if (!std::isfinite(min) || !std::isfinite(max) || !(max > min))
    cause = "both must be finite and max must exceed min";
  else if (!std::isfinite(shift_f))
    cause = fmt::format("climate/minval {} is beyond float32's range, and the shift float32(minval) must be "
                        "finite",
                        min);
  else if (!std::isfinite(difference))
    cause = fmt::format("maxval - minval overflows {} (the dtype stats.h5 stores), so the scale 1/(maxval - "
                        "minval) is 0",
                        dtype);
  else if (!std::isfinite(scale_f))
    cause = fmt::format("the scale 1/(maxval - minval) overflows {} (maxval - minval is {} in {}); the range "
                        "must be wider",
                        arithmetic_bytes == 2 && !std::isfinite(reciprocal) ? "float16" : "float32", difference,
                        dtype);
  else if (!(scale_f > 0.0f))
    cause = fmt::format("the scale 1/(maxval - minval) = {} underflows float32 to 0; the range must be narrower",
                        reciprocal);
  if (!cause.empty())
    return fmt::format("{}: channel {} has climate/minval {} and climate/maxval {}; {} to normalise", stats_path,
                       channel, min, max, cause);
  if (scale) *scale = {shift_f, scale_f};
  return "";
}

}  // namespace deepcam
