#include "stats.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <system_error>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "convert.hpp"
#include "deepcam/data_set.hpp"
#include "deepcam/error.hpp"
#include "deepcam/h5.hpp"
#include "deepcam/npy.hpp"
#include "deepcam/normalise.hpp"
#include "std_streams.hpp"
#include "stop_signals.hpp"
#include "temporary_files.hpp"

namespace deepcam::data {
namespace fs = std::filesystem;

namespace {

constexpr const char* kData = "climate/data";

std::string channel_label(std::size_t c, std::size_t channels) {
  if (channels == kChannelNames.size()) return fmt::format("channel {} ({})", c, kChannelNames[c]);
  return fmt::format("channel {}", c);
}

// The fast loop only sums; a non-finite sum sends us back to find the first
// bad value, so that the error can say where it is.
// `file` is the sample's HDF5 file, or null for a .npy file `path`.
[[noreturn]] void report_non_finite(const std::string& path, const h5::File* file, const std::vector<float>& data,
                                    const h5::Shape& shape) {
  const std::string where = file ? fmt::format("{}: dataset {}", path, kData) : path;
  const std::size_t channels = shape[2], width = shape[1];
  for (std::size_t k = 0; k < data.size(); ++k) {
    if (std::isfinite(data[k])) continue;
    const std::size_t c = k % channels, pixel = k / channels;
    const std::string at = fmt::format("at (row {}, column {}, {})", pixel / width, pixel % width,
                                       channel_label(c, channels));
    // HDF5's conversion to float32 turns a stored float64 beyond float32's
    // range into Inf: the message names the value the file holds.
    const h5::StoredType type = file ? file->stored_type(kData) : h5::StoredType{};
    if (file && std::isinf(data[k]) && type.kind == h5::StoredType::Kind::Float && type.size > sizeof(float)) {
      std::vector<double> stored(data.size());
      file->read(kData, stored.data(), stored.size());
      if (std::isfinite(stored[k]))
        throw Error(fmt::format("{}: {} {} is beyond float32's range (largest {}), the type statistics and "
                                "training read it in; statistics need values float32 holds",
                                where, stored[k], at, std::numeric_limits<float>::max()));
      // A wider float than double may hold a finite value that double cannot.
      if (type.size > sizeof(double))
        throw Error(fmt::format("{}: Inf, or a value beyond float64's range, {}; statistics need values "
                                "float32 holds",
                                where, at));
    }
    // A .npy file's wider floats become Inf in float32 as they do in training.
    const char* what = std::isnan(data[k]) ? "NaN" : file ? "Inf" : "Inf (or a value beyond float32's range)";
    throw Error(fmt::format("{}: {} {}; statistics need finite data", where, what, at));
  }
  // Only reached if a sum overflowed double, which finite float32 input cannot do.
  throw Error(fmt::format("{}: the sums overflow", where));
}

// What an entry in the way of stats.h5 is, for the message.
const char* kind_of(fs::file_type type) {
  switch (type) {
    case fs::file_type::directory: return "a directory";
    case fs::file_type::fifo: return "a FIFO";
    case fs::file_type::socket: return "a socket";
    case fs::file_type::block:
    case fs::file_type::character: return "a device";
    default: return "an entry of another kind";
  }
}

// Fails, before the pass over every training file (hours on a full set),
// where write_stats would fail only after it: stats.h5 is a folder or
// another entry a file cannot be renamed over, or the root is one this user
// cannot create files in. The probe is the hidden temporary write_atomically
// creates there, removed at once.
void check_writable(const fs::path& target) {
  std::error_code ec;
  const fs::file_status status = fs::status(target, ec);  // through a link, as the reader of stats.h5 opens it
  if (fs::exists(status) && !fs::is_regular_file(status))
    throw Error(fmt::format("{}: is {}, not a file; stats writes its statistics there: move it away",
                            target.string(), kind_of(status.type())));
  const fs::path probe = temporary_files::hidden_name(target);
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0)
    throw Error(fmt::format("{}: cannot write it here: cannot create {}: {}", target.string(),
                            probe.filename().string(), std::strerror(errno)));
  ::close(fd);
  fs::remove(probe, ec);
}

// One warning per channel training refuses to normalise with `stats`,
// which stays written: a run may leave such a channel out ([data]
// channels). Training's own checks decide: stats_range_problem on the range,
// as the readers and verify apply it to stats.h5 (computed in float64, the
// dtype write_stats stores), then the readers' kernel on maxval, which a
// range wider than float32 holds makes infinite, so that the samples holding
// it are refused.
void warn_of_refused_channels(const fs::path& target, const ChannelStats& stats) {
  const std::size_t channels = stats.minval.size();
  const std::size_t arithmetic = stats_arithmetic_bytes(sizeof(double), sizeof(double));
  for (std::size_t c = 0; c < channels; ++c) {
    ChannelScale scale;
    std::string problem = stats_range_problem(target.string(), static_cast<std::int64_t>(c), stats.minval[c],
                                              stats.maxval[c], arithmetic, &scale);
    const float top = static_cast<float>(stats.maxval[c]);
    float normalised = 0.0f;
    if (problem.empty() && !normalise_sample(&top, 1, 1, {0}, {scale.shift}, {scale.scale}, &normalised))
      problem = fmt::format("{}: channel {} has climate/minval {} and climate/maxval {}; maxval - minval "
                            "overflows float32, so maxval normalises to {} and the samples holding it cannot be "
                            "read",
                            target.string(), c, stats.minval[c], stats.maxval[c], normalised);
    if (!problem.empty())
      deepcam::eprint("deepcam-data: warning: {}; training refuses it unless {} is left out of [data] channels\n",
                      problem, channel_label(c, channels));
  }
}

}  // namespace

void write_atomically(const fs::path& target, const std::function<void(h5::File&)>& fill) {
  const fs::path temp = temporary_files::hidden_name(target);
  try {
    h5::File file = h5::File::create(temp.string());
    fill(file);
    file.close();
    std::error_code ec;
    fs::rename(temp, target, ec);
    if (ec) throw Error(fmt::format("{}: cannot rename {} into place: {}", target.string(),
                                    temp.filename().string(), ec.message()));
  } catch (const Error& e) {
    std::error_code ignored;
    fs::remove(temp, ignored);
    // Named as the file being written, not as its hidden temporary, which
    // is gone now.
    const std::string message = e.what();
    const std::string hidden = temp.string();
    if (message.rfind(hidden, 0) != 0) throw;  // as it is, whatever kind of Error it is
    throw Error(target.string() + message.substr(hidden.size()));
  } catch (...) {
    std::error_code ignored;
    fs::remove(temp, ignored);
    throw;
  }
}

void remove_stale_temporaries(const fs::path& dir) {
  for (const temporary_files::Stale& left : temporary_files::stale(dir)) {
    std::error_code rm;
    fs::remove(left.path, rm);
    if (!rm) {
      deepcam::eprint("deepcam-data: removed {}, left by an interrupted earlier run (process {} is gone)\n",
                      deepcam::shown(left.path.string(), /*one_line=*/true), left.writer);
    }
  }
}

std::vector<fs::path> training_files(const fs::path& root) {
  if (const std::string problem = directory_problem(root.string()); !problem.empty())
    throw Error(fmt::format("{}: {}; a data set root holds train/, validation/ and stats.h5", root.string(), problem));
  const fs::path dir = root / "train";
  if (const std::string problem = directory_problem(dir.string()); !problem.empty())
    throw Error(fmt::format("{}: {}; a data set root holds train/, validation/ and stats.h5", dir.string(), problem));
  // The readers' listing: an entry that is not a file is an error naming it.
  std::vector<fs::path> files;
  for (const std::string& file : list_sample_files(dir.string(), "", ".h5")) files.emplace_back(file);
  if (!files.empty()) return files;
  // A set in the numpy form only: its data files, paired as the npy reader
  // pairs them (a file without its pair is refused there, so here too).
  std::vector<std::string> problems;
  for (const std::string& file : list_npy_split(dir.string(), &problems).data) files.emplace_back(file);
  if (!problems.empty()) throw Error(problems.front());
  if (files.empty()) throw Error(fmt::format("{}: no training files (*.h5, or data-*.npy with label-*.npy) found",
                                             dir.string()));
  return files;
}

ChannelStats compute_stats(const std::vector<fs::path>& files, Progress* progress) {
  ChannelStats out;
  std::vector<double> sum, sqsum;
  std::vector<float> data;
  std::size_t channels = 0;
  h5::Shape first_shape;  // the first file's (H, W, C)
  for (const fs::path& path : files) {
    throw_if_stopped();
    const bool is_npy = path.extension() == ".npy";
    std::optional<h5::File> file;
    npy::Header header;
    h5::Shape shape;
    std::string where = path.string();
    if (is_npy) {
      header = npy::read_header(path.string());
      if (const std::string bools = npy::bool_sample_problem(header); !bools.empty())
        throw Error(fmt::format("{}: {}", path.string(), bools));
      shape.assign(header.shape.begin(), header.shape.end());
    } else {
      file.emplace(h5::File::open(path.string()));
      if (!file->has(kData))
        throw Error(fmt::format("{}: dataset {}: no such dataset; a sample holds climate/data and climate/labels_0",
                                path.string(), kData));
      shape = file->shape(kData);
      where = fmt::format("{}: dataset {}", path.string(), kData);
    }
    // The rule of convert and verify: a zero height or width would add no
    // pixel here, yet the readers refuse the file.
    if (const std::string problem = data_shape_problem(std::vector<std::int64_t>(shape.begin(), shape.end()));
        !problem.empty())
      throw Error(fmt::format("{}: {}", where, problem));
    if (channels == 0) {
      channels = shape[2];
      first_shape = shape;
      sum.assign(channels, 0.0);
      sqsum.assign(channels, 0.0);
      out.minval.assign(channels, std::numeric_limits<double>::infinity());
      out.maxval.assign(channels, -std::numeric_limits<double>::infinity());
    } else if (shape != first_shape) {
      // The readers refuse a set whose samples differ in shape: statistics
      // over one would describe data no run trains on.
      throw Error(fmt::format("{}: has shape ({}), but {} has ({}); the samples of a set share one "
                              "shape, as the readers require",
                              where, fmt::join(shape, ", "), files.front().string(), fmt::join(first_shape, ", ")));
    }
    const std::size_t pixels = shape[0] * shape[1];
    data.resize(pixels * channels);
    if (is_npy) {
      npy::convert(path.string(), header, read_npy_data(path, header).data(), data.data(), header.count());
    } else {
      file->read(kData, data.data(), data.size());
    }

    // Per-file partial sums keep the rounding error of a 56 MB sample small
    // before it is added to the totals.
    std::vector<double> fsum(channels, 0.0), fsq(channels, 0.0), fmin(channels, INFINITY), fmax(channels, -INFINITY);
    for (std::size_t p = 0; p < pixels; ++p) {
      const float* px = data.data() + p * channels;
      for (std::size_t c = 0; c < channels; ++c) {
        const double x = px[c];
        fsum[c] += x;
        fsq[c] += x * x;
        fmin[c] = std::min(fmin[c], x);
        fmax[c] = std::max(fmax[c], x);
      }
    }
    for (std::size_t c = 0; c < channels; ++c) {
      if (!std::isfinite(fsum[c]) || !std::isfinite(fsq[c]))
        report_non_finite(path.string(), file ? &*file : nullptr, data, shape);
      sum[c] += fsum[c];
      sqsum[c] += fsq[c];
      out.minval[c] = std::min(out.minval[c], fmin[c]);
      out.maxval[c] = std::max(out.maxval[c], fmax[c]);
    }
    out.count += static_cast<std::int64_t>(pixels);
    if (progress) progress->advance();
  }
  if (out.count == 0) throw Error("statistics: the training files hold no pixels");
  out.mean.resize(channels);
  out.sqmean.resize(channels);
  for (std::size_t c = 0; c < channels; ++c) {
    out.mean[c] = sum[c] / static_cast<double>(out.count);
    out.sqmean[c] = sqsum[c] / static_cast<double>(out.count);
  }
  return out;
}

void write_stats(const fs::path& target, const ChannelStats& stats) {
  write_atomically(target, [&](h5::File& file) {
    const h5::Shape per_channel{stats.mean.size()};
    file.write("climate/count", &stats.count, {});
    file.write("climate/mean", stats.mean.data(), per_channel);
    file.write("climate/sqmean", stats.sqmean.data(), per_channel);
    file.write("climate/minval", stats.minval.data(), per_channel);
    file.write("climate/maxval", stats.maxval.data(), per_channel);
  });
}

ChannelStats run_stats(const fs::path& root, const ProgressOptions& progress_options, bool summary) {
  const auto start = std::chrono::steady_clock::now();
  const std::vector<fs::path> files = training_files(root);
  remove_stale_temporaries(root);  // a stats.h5 of a stats or synth run that was killed
  const fs::path target = root / "stats.h5";
  check_writable(target);
  Progress progress("stats", files.size(), "files", progress_options);
  const ChannelStats stats = compute_stats(files, &progress);
  write_stats(target, stats);
  if (summary && !progress_options.quiet) {
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    deepcam::eprint("deepcam-data: statistics over {} training files ({} pixels each channel) in {:.1f} s\n",
                    files.size(), stats.count, seconds);
    deepcam::eprint("  {:<8} {:>13} {:>13} {:>13} {:>13}\n", "channel", "mean", "std", "min", "max");
    for (std::size_t c = 0; c < stats.mean.size(); ++c) {
      const double var = std::max(0.0, stats.sqmean[c] - stats.mean[c] * stats.mean[c]);
      const std::string name = stats.mean.size() == kChannelNames.size() ? kChannelNames[c] : fmt::format("{}", c);
      deepcam::eprint("  {:<8} {:>13.6g} {:>13.6g} {:>13.6g} {:>13.6g}\n", name, stats.mean[c], std::sqrt(var),
                      stats.minval[c], stats.maxval[c]);
    }
    deepcam::eprint("deepcam-data: wrote {}\n", target.string());
  }
  warn_of_refused_channels(target, stats);  // problems: printed under --quiet too
  return stats;
}

}  // namespace deepcam::data
