#include "verify.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <map>
#include <new>
#include <set>
#include <string>
#include <system_error>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "convert.hpp"
#include "deepcam/data_set.hpp"
#include "deepcam/error.hpp"
#include "deepcam/h5.hpp"
#include "deepcam/npy.hpp"
#include "parallel.hpp"
#include "std_streams.hpp"
#include "temporary_files.hpp"

namespace deepcam::data {
namespace fs = std::filesystem;

namespace {

enum class Format { H5, Npy };

struct Item {
  std::string split;
  Format format = Format::H5;
  fs::path data, label;        // H5: data is the sample file
};

struct Result {
  std::vector<std::string> problems;
  std::string shapes;          // what must agree across files, when both could be read
  std::string signature;       // the shapes with the dtypes, for messages
  std::int64_t channels = -1;
  // A training sample's values per channel outside stats.h5's range
  // (count_outside), and its values per channel.
  std::vector<std::uint64_t> outside;
  std::uint64_t per_channel = 0;
};

// Per channel, how many of a training sample's values lie outside stats.h5's
// [minval, maxval]: normalised, outside [0, 1] by more than float32's
// rounding. stats.h5 holds the training files' minimum and maximum: a few
// values outside may come from a stats.h5 made from part of them, many show
// one of another data set, or of another channel order.
void count_outside(const Item& item, const std::vector<float>& data, const std::vector<ChannelScale>& scales,
                   Result& r) {
  const std::size_t channels = scales.size();
  if (item.split != kDataSplits[0] || channels == 0 || static_cast<std::int64_t>(channels) != r.channels) return;
  constexpr float kRounding = 1e-3f;
  r.outside.assign(channels, 0);
  r.per_channel = data.size() / channels;
  for (std::size_t k = 0; k < data.size(); ++k) {
    const ChannelScale& s = scales[k % channels];
    const float n = s.scale * (data[k] - s.shift);
    r.outside[k % channels] += n < -kRounding || n > 1.0f + kRounding;
  }
}

// A problem for each channel where more than 1% of the training files'
// values lie outside stats.h5's range (count_outside).
std::vector<std::string> range_problems(const fs::path& root, const std::vector<Result>& results) {
  std::vector<std::uint64_t> outside;
  std::uint64_t values = 0;
  for (const Result& r : results) {
    if (r.outside.empty()) continue;
    if (outside.empty()) outside.assign(r.outside.size(), 0);
    if (r.outside.size() != outside.size()) continue;
    for (std::size_t c = 0; c < outside.size(); ++c) outside[c] += r.outside[c];
    values += r.per_channel;
  }
  std::vector<std::string> problems;
  for (std::size_t c = 0; c < outside.size(); ++c) {
    const double share = static_cast<double>(outside[c]) / static_cast<double>(values);
    if (share <= 0.01) continue;
    problems.push_back(fmt::format("{}: channel {}: {:.1f}% of the training files' values lie outside its [minval, "
                                   "maxval], which holds their minimum and maximum: these are not their statistics "
                                   "(another data set's, or in another channel order); recompute them with "
                                   "deepcam-data stats {}",
                                   (root / "stats.h5").string(), c, 100.0 * share, root.string()));
  }
  return problems;
}

// Only the shapes must agree (a batch stacks the samples): the readers
// convert each file's stored types, and convert keeps each sample's label
// dtype, so samples that differ only in dtype are a set training reads.
void describe(Result& r, const std::vector<std::int64_t>& data_shape, npy::DType data_dtype,
              const std::vector<std::int64_t>& label_shape, npy::DType label_dtype) {
  r.shapes = fmt::format("data {}, labels {}", shape_text(data_shape), shape_text(label_shape));
  r.signature = fmt::format("data {} {}, labels {} {}", shape_text(data_shape), npy::to_string(data_dtype),
                            shape_text(label_shape), npy::to_string(label_dtype));
}

Result check_h5(const Item& item, const std::vector<ChannelScale>& scales) {
  Result r;
  const std::string path = item.data.string();
  try {
    const H5Sample sample(item.data);
    describe(r, sample.data_shape(), sample.data_dtype(), sample.label_shape(), sample.label_dtype());
    r.channels = sample.data_shape()[2];
    std::vector<float> data;
    sample.read_data(data);
    if (const std::string bad = non_finite(data, sample.data_shape(), scales, sample.data_dtype()); !bad.empty())
      r.problems.push_back(fmt::format("{}: dataset climate/data: {}", path, bad));
    count_outside(item, data, scales, r);
    std::vector<unsigned char> raw;
    sample.read_labels(raw);
    if (const std::string bad = bad_labels(sample, raw); !bad.empty())
      r.problems.push_back(fmt::format("{}: dataset climate/labels_0: {}", path, bad));
  } catch (const Error& e) {
    r.problems.push_back(e.what());
  } catch (const std::bad_alloc&) {
    // The file's problem, in its line: the report of the others goes on.
    r.problems.push_back(fmt::format("{}: out of memory reading it; run with fewer --threads", path));
  }
  return r;
}

Result check_npy(const Item& item, const std::vector<ChannelScale>& scales) {
  Result r;
  npy::Header dh, lh;
  bool data_ok = false, label_ok = false;
  {
    try {
      dh = npy::read_header(item.data.string());
      if (const std::string bools = npy::bool_sample_problem(dh); !bools.empty())
        throw Error(fmt::format("{}: {}", item.data.string(), bools));
      const std::vector<unsigned char> bytes = read_npy_data(item.data, dh);
      if (dh.shape.size() != 3)
        throw Error(fmt::format("{}: expected shape (height, width, channels), found {}", item.data.string(),
                                shape_text(dh.shape)));
      data_ok = true;
      r.channels = dh.shape[2];
      std::vector<float> data(static_cast<std::size_t>(dh.count()));
      npy::convert(item.data.string(), dh, bytes.data(), data.data(), dh.count());
      if (const std::string bad = non_finite(data, dh.shape, scales, dh.dtype); !bad.empty())
        r.problems.push_back(fmt::format("{}: {}", item.data.string(), bad));
      count_outside(item, data, scales, r);
    } catch (const Error& e) {
      r.problems.push_back(e.what());
    } catch (const std::bad_alloc&) {
      r.problems.push_back(fmt::format("{}: out of memory reading it; run with fewer --threads", item.data.string()));
    }
  }
  {
    try {
      lh = npy::read_header(item.label.string());
      if (const std::string bools = npy::bool_sample_problem(lh); !bools.empty())
        throw Error(fmt::format("{}: {}", item.label.string(), bools));
      const std::vector<unsigned char> bytes = read_npy_data(item.label, lh);
      if (lh.shape.size() != 2)
        throw Error(fmt::format("{}: expected shape (height, width), found {}", item.label.string(),
                                shape_text(lh.shape)));
      if (data_ok && (lh.shape[0] != dh.shape[0] || lh.shape[1] != dh.shape[1]))
        throw Error(fmt::format("{}: has shape {}, but {} is {}: the labels must be (height, width) of the data",
                                item.label.string(), shape_text(lh.shape), item.data.filename().string(),
                                shape_text(dh.shape)));
      label_ok = true;
      std::vector<std::int64_t> labels(static_cast<std::size_t>(lh.count()));
      npy::convert(item.label.string(), lh, bytes.data(), labels.data(), lh.count());
      if (const std::string bad = bad_labels(labels, lh.shape); !bad.empty())
        r.problems.push_back(fmt::format("{}: {}", item.label.string(), bad));
    } catch (const Error& e) {
      r.problems.push_back(e.what());
    } catch (const std::bad_alloc&) {
      r.problems.push_back(fmt::format("{}: out of memory reading it; run with fewer --threads", item.label.string()));
    }
  }
  if (data_ok && label_ok) describe(r, dh.shape, dh.dtype, lh.shape, lh.dtype);
  return r;
}

// "1 problem", "2 problems"
std::string count_of(std::size_t n, const char* word) {
  return fmt::format("{} {}{}", n, word, n == 1 ? "" : "s");
}

}  // namespace

std::vector<std::string> stats_problems(const fs::path& root, std::int64_t channels,
                                        std::vector<ChannelScale>* scales) {
  const fs::path path = root / "stats.h5";
  if (const std::string problem = stats_file_problem(root.string()); !problem.empty())
    return {fmt::format("{}; make it with deepcam-data stats {} (or copy the original)", problem, root.string())};
  std::vector<std::string> problems;
  try {
    const h5::File file = h5::File::open(path.string());
    std::vector<double> range[2];  // minval, maxval, when their shapes are right
    std::size_t float_bytes[2] = {};  // their stored types, as the readers see them (0: integers)
    if (!file.has("climate/count")) {
      problems.push_back(fmt::format("{}: dataset climate/count is missing", path.string()));
    } else if (const h5::Shape shape = file.shape("climate/count");
               std::any_of(shape.begin(), shape.end(), [](std::uint64_t d) { return d != 1; })) {
      problems.push_back(fmt::format("{}: dataset climate/count has shape ({}), expected one value (the pixels "
                                     "the statistics are over)",
                                     path.string(), fmt::join(shape, ", ")));
    } else {
      double count = 0.0;
      file.read("climate/count", &count, 1);
      if (!(count > 0.0) || !std::isfinite(count))
        problems.push_back(fmt::format("{}: dataset climate/count is {}, expected the number of pixels the "
                                       "statistics are over (above 0)",
                                       path.string(), count));
    }
    std::vector<double> moments[2];  // mean, sqmean, when their shapes are right
    for (const char* name : {"climate/mean", "climate/sqmean", "climate/minval", "climate/maxval"}) {
      if (!file.has(name)) {
        problems.push_back(fmt::format("{}: dataset {} is missing", path.string(), name));
        continue;
      }
      const h5::Shape shape = file.shape(name);
      if (shape.size() != 1)
        problems.push_back(fmt::format("{}: dataset {} has shape ({}), expected one value per channel",
                                       path.string(), name, fmt::join(shape, ", ")));
      else if (channels >= 0 && shape[0] != static_cast<std::uint64_t>(channels))
        problems.push_back(fmt::format("{}: dataset {} has {} values, but the samples have {} channels",
                                       path.string(), name, shape[0], channels));
      else if (std::string(name) == "climate/mean" || std::string(name) == "climate/sqmean") {
        std::vector<double>& values = moments[std::string(name) == "climate/sqmean"];
        values.resize(shape[0]);
        file.read(name, values.data(), values.size());
        const auto bad = std::find_if(values.begin(), values.end(), [](double v) { return !std::isfinite(v); });
        if (bad != values.end()) {
          problems.push_back(fmt::format("{}: dataset {}: channel {} is {}, expected a finite value",
                                         path.string(), name, bad - values.begin(), *bad));
          values.clear();
        }
      } else if (std::string(name) == "climate/minval" || std::string(name) == "climate/maxval") {
        const bool max = std::string(name) == "climate/maxval";
        const h5::StoredType type = file.stored_type(name);
        if (type.kind != h5::StoredType::Kind::Float && type.kind != h5::StoredType::Kind::Integer) {
          problems.push_back(fmt::format("{}: dataset {} is not stored as numbers (integers or floats)",
                                         path.string(), name));
          continue;
        }
        float_bytes[max] = type.kind == h5::StoredType::Kind::Float ? type.size : 0;
        range[max].resize(shape[0]);
        file.read(name, range[max].data(), range[max].size());
      }
    }
    // A mean of squares below the squared mean is a negative variance, beyond
    // what rounding the two (float32 ones too) makes of a constant channel.
    if (!moments[0].empty() && moments[0].size() == moments[1].size())
      for (std::size_t c = 0; c < moments[0].size(); ++c) {
        const double mean = moments[0][c], sqmean = moments[1][c];
        if (sqmean - mean * mean < -1e-5 * std::max(std::abs(sqmean), mean * mean)) {
          problems.push_back(fmt::format("{}: channel {}: sqmean {} is below mean squared {} (a negative "
                                         "variance): these are no statistics of data",
                                         path.string(), c, sqmean, mean * mean));
        }
      }
    // Training's rule (deepcam/data_set.hpp) on every channel: verify has no
    // run file to say which are selected.
    const std::size_t arithmetic = stats_arithmetic_bytes(float_bytes[0], float_bytes[1]);
    std::vector<ChannelScale> found;
    if (!range[0].empty() && range[0].size() == range[1].size())
      for (std::size_t c = 0; c < range[0].size(); ++c)
        if (std::string p = stats_range_problem(path.string(), static_cast<std::int64_t>(c), range[0][c],
                                                range[1][c], arithmetic, &found.emplace_back());
            !p.empty())
          problems.push_back(p + " (training refuses it when the channel is selected)");
    if (scales && problems.empty()) *scales = std::move(found);
  } catch (const Error& e) {
    problems.push_back(e.what());
  }
  return problems;
}

void run_verify(const VerifyOptions& o) {
  const auto start = std::chrono::steady_clock::now();
  std::error_code ec;
  if (const std::string problem = directory_problem(o.root.string()); !problem.empty())
    throw Error(fmt::format("{}: {}; verify checks a data set root (train/, validation/, stats.h5)",
                            o.root.string(), problem));

  std::vector<Item> items;
  std::vector<std::string> split_notes;
  // Problems of the layout, each naming one path: training's rule on the
  // root (deepcam/data_set.hpp) and the entries the listing refuses.
  std::vector<std::string> layout;
  std::vector<fs::path> dirs, leftovers;
  for (const char* split : kDataSplits)
    if (std::string problem = split_folder_problem(o.root.string(), split); !problem.empty())
      layout.push_back(std::move(problem));
  for (fs::directory_iterator it(o.root, ec), end; !ec && it != end; it.increment(ec))
    if (it->path().filename().string()[0] != '.' && it->is_directory(ec)) dirs.push_back(it->path());
  if (ec) throw Error(fmt::format("{}: cannot list the directory: {}", o.root.string(), ec.message()));
  std::sort(dirs.begin(), dirs.end());
  bool any_listed = false;  // an entry named like a sample, refused or not
  for (const fs::path& dir : dirs) {
    const std::string split = dir.filename().string();
    std::vector<std::string> listed;
    // Every *.h5, as the hdf5 reader reads them (data-X.h5 is SPEC 1.2's
    // name; the reader, as the reference, takes any).
    const auto h5_files = list_sample_files(dir.string(), "", ".h5", &listed);
    for (const std::string& f : h5_files) items.push_back({split, Format::H5, f, {}});
    // The numpy form: data-X.npy with label-X.npy, paired by X; an unpaired
    // file is a problem, as in training.
    const NpySplit npy = list_npy_split(dir.string(), &listed);
    for (std::size_t k = 0; k < npy.data.size(); ++k)
      items.push_back({split, Format::Npy, npy.data[k], npy.labels[k]});
    any_listed = any_listed || !listed.empty();
    const bool training_split = split == kDataSplits[0] || split == kDataSplits[1];
    if (training_split && h5_files.empty() && npy.data.empty())
      listed.push_back(empty_split_problem(dir.string(), split, "samples (*.h5, or data-*.npy with "
                                                                 "label-*.npy)"));
    layout.insert(layout.end(), listed.begin(), listed.end());
    // Temporaries outlive only a writer killed mid-file; they waste space
    // and nothing else removes them (convert cannot: another rank may be
    // writing it right now).
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
      if (temporary_files::writer(it->path().filename().string())) leftovers.push_back(it->path());
    }
    std::vector<std::string> parts;
    if (!h5_files.empty()) parts.push_back(fmt::format("{} h5 samples", h5_files.size()));
    if (!npy.data.empty()) parts.push_back(fmt::format("{} npy samples", npy.data.size()));
    if (!parts.empty()) split_notes.push_back(fmt::format("{}: {}", split, fmt::join(parts, " and ")));
  }
  // stats.h5's temporaries lie in the root (stats writes it there).
  for (fs::directory_iterator it(o.root, ec), end; !ec && it != end; it.increment(ec))
    if (temporary_files::writer(it->path().filename().string())) leftovers.push_back(it->path());
  if (items.empty() && !any_listed)
    throw Error(fmt::format("{}: no folder in it holds samples (*.h5, or data-*.npy and label-*.npy)",
                            o.root.string()));

  // stats.h5's normalisation, to find the finite values training refuses
  // (they overflow once normalised); its problems are reported below.
  std::vector<ChannelScale> scales;
  stats_problems(o.root, -1, &scales);
  std::vector<Result> results(items.size());
  Progress progress("verify", items.size(), "samples", o.progress);
  parallel_for(items.size(), o.threads, [&](std::size_t k) {
    results[k] = items[k].format == Format::H5 ? check_h5(items[k], scales) : check_npy(items[k], scales);
    progress.advance();
  });

  // Agreement within each format: the most common shapes are the norm.
  std::int64_t channels = -1;
  for (const Format format : {Format::H5, Format::Npy}) {
    std::map<std::string, std::size_t> seen;
    std::map<std::string, std::string> example;  // the first signature of each shapes
    for (std::size_t k = 0; k < items.size(); ++k)
      if (items[k].format == format && !results[k].shapes.empty()) {
        ++seen[results[k].shapes];
        example.emplace(results[k].shapes, results[k].signature);
      }
    if (seen.empty()) continue;
    const auto norm = std::max_element(seen.begin(), seen.end(),
                                       [](const auto& a, const auto& b) { return a.second < b.second; });
    for (std::size_t k = 0; k < items.size(); ++k) {
      if (items[k].format != format || results[k].shapes.empty() || results[k].shapes == norm->first) continue;
      results[k].problems.push_back(fmt::format("{}: {} differs from the {} other {} samples' {}",
                                                items[k].data.string(), results[k].signature, norm->second,
                                                format == Format::H5 ? "h5" : "npy", example[norm->first]));
    }
    for (std::size_t k = 0; k < items.size(); ++k)
      if (channels < 0 && items[k].format == format && results[k].shapes == norm->first)
        channels = results[k].channels;
  }

  std::size_t problems = 0, bad_files = 0;
  for (std::size_t k = 0; k < items.size(); ++k) {
    if (results[k].problems.empty()) continue;
    ++bad_files;
    for (const std::string& p : results[k].problems) {
      deepcam::oprint("{}\n", deepcam::shown(p, /*one_line=*/true));
      ++problems;
    }
  }
  for (const std::string& p : layout) {
    deepcam::oprint("{}\n", deepcam::shown(p, /*one_line=*/true));
    ++problems;
    ++bad_files;
  }
  std::sort(leftovers.begin(), leftovers.end());
  for (const fs::path& p : leftovers) {
    deepcam::oprint("{}: a temporary file left by an interrupted write; delete it once no writer runs\n",
                    deepcam::shown(p.string(), /*one_line=*/true));
    ++problems;
    ++bad_files;
  }
  std::vector<std::string> stats = stats_problems(o.root, channels);
  if (stats.empty()) stats = range_problems(o.root, results);
  for (const std::string& p : stats) deepcam::oprint("{}\n", deepcam::shown(p, /*one_line=*/true));
  problems += stats.size();
  bad_files += stats.empty() ? 0 : 1;

  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  deepcam::oprint("verify: {}: {}; {} in {:.1f} s: {}\n", o.root.string(), fmt::join(split_notes, ", "),
                  channels >= 0 ? fmt::format("{} channels", channels) : std::string("no readable sample"), seconds,
                  problems ? fmt::format("{} in {}", count_of(problems, "problem"), count_of(bad_files, "file"))
                           : std::string("no problems"));
  deepcam::flush_stdout();
  // The list went to stdout; one that could not be written there (a full
  // disk under a redirect) is not "above".
  if (problems)
    throw Error(fmt::format("verify: {}: {} in {} ({})", o.root.string(), count_of(problems, "problem"),
                            count_of(bad_files, "file"),
                            std::ferror(stdout) ? "their list did not reach standard output" : "listed above"));
}

}  // namespace deepcam::data
