#include "read_bench.hpp"

#include <sys/resource.h>

#include <fmt/format.h>
#include <torch/cuda.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <typeinfo>
#include <utility>
#include <variant>

#include "deepcam/build_reader.hpp"
#include "deepcam/config.hpp"
#include "deepcam/error.hpp"
#include "deepcam/json.hpp"
#include "deepcam/mlperf_log.hpp"
#include "deepcam_build_config.h"
#include "plugin_calls.hpp"
#include "std_streams.hpp"
#include "stop_signals.hpp"
#include "train_batches.hpp"

namespace deepcam::data {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

std::int64_t peak_rss_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<std::int64_t>(usage.ru_maxrss) * 1024;  // Linux reports KiB
}

// Bytes on disk of each sample of the split, in index order: the sizes of
// the files the reader (`choice`) names for it.
std::vector<std::int64_t> sample_bytes(const Reader& reader, Split split, const PluginChoice& choice) {
  const std::int64_t count = in_plugin(choice, [&] { return reader.sample_count(split); });
  if (count < 0) {
    throw std::logic_error(fmt::format("{}: the reader plugin '{}' says its {} split has {} samples in "
                                       "sample_count() (a bug in the plugin)",
                                       choice.plugin->path, choice.name, to_string(split), count));
  }
  std::vector<std::int64_t> bytes(static_cast<std::size_t>(count), 0);
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    const auto index = static_cast<std::int64_t>(i);
    for (const std::string& file : in_plugin(choice, [&] { return reader.sample_files(split, index); })) {
      std::error_code ec;
      const auto size = std::filesystem::file_size(file, ec);
      if (ec) {
        throw Error(fmt::format("{}: cannot read its size: {} (a file of {} sample {}, as the reader plugin '{}' ({}) "
                                "names it in sample_files(), whose files read measures)",
                                file, ec.message(), to_string(split), i, choice.name, choice.plugin->path));
      }
      bytes[i] += static_cast<std::int64_t>(size);
    }
  }
  return bytes;
}

struct Pass {
  std::int64_t batches = 0;  // the validation passes' included
  std::int64_t samples = 0;
  // Those of the validation passes after training epochs (--with-validation).
  std::int64_t validation_batches = 0;
  std::int64_t validation_samples = 0;
  double seconds = 0.0;
  double wait_seconds = 0.0;
  // The wait for each epoch's first batch (start_epoch and the first next()),
  // which no read-ahead can hide: a pipeline fills at the start of an epoch.
  double first_wait_seconds = 0.0;
};

// The batches of an epoch of the split that the engine reads: a training
// epoch drops the last incomplete batch (engine.cpp, as the reference's
// DataLoader); a validation pass reads them all (-1).
std::int64_t batches_read(const Reader& reader, Split split, std::int64_t train_batch_size) {
  return split == Split::Train ? whole_train_batches(reader.local_samples(Split::Train), train_batch_size) : -1;
}

// The reader under measure, with what its batches must be (the engine's
// checks: plugin_calls.hpp).
struct Measured {
  Reader& reader;
  const PluginChoice& choice;
  std::int64_t channels;
  std::vector<std::int64_t> shape;  // (C, H, W)
  std::int64_t train_batch_size;
  std::int64_t validation_batch_size;
};

// Reads one epoch of the split (begun as `epoch`) into `pass`, as the engine
// does: `batches` batches, or all of them if -1, each checked as the engine
// checks it (outside the time waited). After each batch the consumer holds
// the batch for `consume`.
void read_epoch(const Measured& m, Split split, std::int64_t epoch, std::int64_t batches, Clock::duration consume,
                Pass& pass) {
  Batch batch;
  Clock::time_point t0 = Clock::now();
  in_plugin(m.choice, [&] { m.reader.start_epoch(split, epoch); });
  const bool training = split == Split::Train;
  const std::int64_t batch_size = training ? m.train_batch_size : m.validation_batch_size;
  std::int64_t samples = 0;  // of this epoch
  for (std::int64_t done = 0; batches < 0 || done < batches; ++done) {
    const bool first = done == 0;
    // SIGINT or SIGTERM: the reader's destructor, on the way out, removes
    // what it staged.
    throw_if_stopped();
    const bool more = in_plugin(m.choice, [&] { return m.reader.next(batch); });
    const Clock::time_point t1 = Clock::now();
    pass.wait_seconds += seconds_between(t0, t1);
    if (first) pass.first_wait_seconds += seconds_between(t0, t1);
    if (!more) {
      // As the engine refuses them: a training epoch that ends before its
      // whole batches, or a validation pass of other than its samples.
      const std::int64_t local = m.reader.local_samples(split);
      if (training && done < batches) {
        throw std::logic_error(fmt::format("{}: the reader plugin '{}' ended training epoch {} after {} of the {} "
                                           "batches its local_samples ({}) make (a bug in the plugin)",
                                           m.choice.plugin->path, m.choice.name, epoch + 1, done, batches, local));
      }
      if (!training && samples != local) {
        throw std::logic_error(fmt::format("{}: the reader plugin '{}' handed out {} validation samples, and its "
                                           "local_samples says {} (a bug in the plugin)",
                                           m.choice.plugin->path, m.choice.name, samples, local));
      }
      break;
    }
    check_batch(m.choice, batch, split, done, m.channels, m.shape, batch_size, /*full=*/training);
    // As the engine: every batch's on the CPU, a pass's first on a device (a wait for it).
    if (batch.labels.device().is_cpu() || done == 0) check_classes(m.choice, batch.labels, split, done);
    samples += batch.data.size(0);
    ++pass.batches;
    pass.samples += batch.data.size(0);
    // Until a deadline rather than for a duration, so that oversleeping
    // one batch is not added to the next; in slices, so that a stop signal
    // ends a long one (--consume-ms allows an hour).
    for (const auto until = t1 + consume; Clock::now() < until;) {
      throw_if_stopped();
      std::this_thread::sleep_until(std::min(until, Clock::now() + std::chrono::milliseconds(100)));
    }
    t0 = Clock::now();
  }
}

// Reads `epochs` epochs of the split, starting at epoch index `first_epoch`,
// each followed by a validation pass if `with_validation` (as the engine
// validates after each training epoch, always as validation epoch 0); after
// each batch the consumer holds the batch for `consume_ms`.
Pass read_epochs(const Measured& m, Split split, std::int64_t first_epoch, int epochs, double consume_ms,
                 bool with_validation) {
  Pass pass;
  const auto consume =
      std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double, std::milli>(consume_ms));
  const Clock::time_point start = Clock::now();
  for (int e = 0; e < epochs; ++e) {
    read_epoch(m, split, first_epoch + e, batches_read(m.reader, split, m.train_batch_size), consume, pass);
    if (!with_validation) continue;
    const std::int64_t batches = pass.batches, samples = pass.samples;
    read_epoch(m, Split::Validation, 0, -1, consume, pass);
    pass.validation_batches += pass.batches - batches;
    pass.validation_samples += pass.samples - samples;
  }
  pass.seconds = seconds_between(start, Clock::now());
  return pass;
}

// Bytes read for `samples` reads of a split whose samples hold `bytes_of`:
// one rank reads every sample of the split once per epoch (the shuffle only
// changes the order), so the split's bytes per full epoch; a reader that
// reads fewer samples per epoch (drop_last leftovers) is counted by the mean
// bytes per sample.
std::int64_t bytes_read(const std::vector<std::int64_t>& bytes_of, std::int64_t samples) {
  std::int64_t split_bytes = 0;
  for (std::int64_t b : bytes_of) split_bytes += b;
  const auto count = static_cast<std::int64_t>(bytes_of.size());
  if (count == 0) return 0;
  return samples % count == 0 ? split_bytes * (samples / count)
                              : static_cast<std::int64_t>(static_cast<double>(split_bytes) / count * samples);
}

// Whether a reader factory's refusal is about the run file rather than the
// data: the plugins start such messages with where the setting came from
// (Params::where or setting: "run.toml:7 [reader.source] shuffle_mode",
// "--set reader.io=direct"), as deepcam-host says them with status 2.
bool names_a_setting(const std::string& message, const ReadBenchOptions& options) {
  if (message.rfind("--set ", 0) == 0) return true;
  for (const std::string& file : options.run_files) {
    if (message.size() > file.size() && message.compare(0, file.size(), file) == 0 &&
        (message[file.size()] == ':' || message[file.size()] == ' ')) {
      return true;
    }
  }
  return false;
}

}  // namespace

void run_read_bench(const ReadBenchOptions& options, PluginLoader& loader) {
  const RunConfig config = [&] {
    try {
      return load_config(options.run_files, options.overrides, loader);
    } catch (const PluginBug&) {
      throw;  // the plugin's mistake, not the run file's
    } catch (const StopRequested& e) {
      throw StoppedReadingRunFiles(e.signal(), e.what());  // a run file on a pipe
    } catch (const Error& e) {
      throw BadRunFile(e.what());
    }
  }();
  // The engine's refusal, in its words, before any reader is built: a
  // reader would fail in its own way (the prefetch reader blaming [reader],
  // as bad data) or read on as if for a GPU, where deepcam-host refuses the
  // run file.
  if (config.run.string("device") == "cuda" && !torch::cuda::is_available()) {
    throw BadRunFile(fmt::format("{}: no CUDA device is available{}", config.run.setting("device"),
                                 DEEPCAM_WITH_CUDA ? "" : " (this build has CUDA disabled)"));
  }
  const std::int64_t base_rss = peak_rss_bytes();

  // A disabled log: the staging events of a wrapping reader go nowhere.
  MlperfLog log(nullptr, false);
  const Clock::time_point build_start = Clock::now();
  const Plugged<Reader> reader = [&] {
    try {
      // The splits read reads, as the engine names its own: a staging reader
      // stages those only.
      ReaderContext context = reader_context(config, 0, 1, &log);
      context.splits = {options.split};
      if (options.with_validation) context.splits.push_back(Split::Validation);
      return build_reader(config, context);
    } catch (const Error& e) {
      if (typeid(e) == typeid(Error) && names_a_setting(e.what(), options)) throw BadRunFile(e.what());
      throw;
    }
  }();
  const double build_seconds = seconds_between(build_start, Clock::now());

  const Split split = options.split;
  // The counts go into what read reports: checked as the engine checks them.
  check_sample_counts(config.reader, *reader);
  const std::vector<std::int64_t> bytes_of = sample_bytes(*reader, split, config.reader);
  const std::vector<std::int64_t> validation_bytes_of =
      options.with_validation ? sample_bytes(*reader, Split::Validation, config.reader) : std::vector<std::int64_t>();
  for (const Split s : {split, Split::Validation}) {
    if (s == split || options.with_validation) {
      if (reader->local_samples(s) <= 0) {
        throw Error(fmt::format("{}: its {} split has no samples to read", config.data.setting("root"), to_string(s)));
      }
    }
  }
  const std::int64_t train_batch_size = config.run.integer("train_batch_size");
  if (split == Split::Train) {
    // The engine's refusal, in its words: an epoch would read no whole batch.
    const std::string refusal = train_batch_refusal(config, reader->local_samples(split),
                                                    reader->global_samples(split), 0, 1);
    if (!refusal.empty()) throw BadRunFile(refusal);
  }
  // The samples of an epoch of the split that the engine reads.
  const std::int64_t per_epoch = split == Split::Train
                                     ? batches_read(*reader, split, train_batch_size) * train_batch_size
                                     : reader->local_samples(split);

  const Measured measured{*reader,
                          config.reader,
                          static_cast<std::int64_t>(config.data.integers("channels").size()),
                          reader->sample_shape(),
                          train_batch_size,
                          config.run.integer("validation_batch_size")};
  double consume_ms = options.consume_ms;
  double read_ms_per_batch = 0.0;
  std::int64_t first_epoch = 0;
  if (options.consume_matched) {
    // The split's batches only: the consumer's step is that of a training
    // batch. The validation pass after it is not measured; it keeps the
    // calls in the engine's order.
    const Pass calibration = read_epochs(measured, split, 0, 1, 0.0, false);
    if (calibration.batches > 0) read_ms_per_batch = 1e3 * calibration.wait_seconds / calibration.batches;
    if (options.with_validation) {
      Pass unmeasured;
      read_epoch(measured, Split::Validation, 0, -1, Clock::duration::zero(), unmeasured);
    }
    consume_ms = read_ms_per_batch;
    first_epoch = 1;
  }
  const Pass pass = read_epochs(measured, split, first_epoch, options.epochs, consume_ms, options.with_validation);
  const std::int64_t bytes = bytes_read(bytes_of, pass.samples - pass.validation_samples) +
                             bytes_read(validation_bytes_of, pass.validation_samples);

  const PluginChoice& r = config.reader;
  std::string source;
  if (r.params.has("source")) {
    if (const auto* nested = std::get_if<std::shared_ptr<const NestedPlugin>>(&r.params.values().at("source")))
      source = (*nested)->name;
  }
  const double seconds = pass.seconds > 0 ? pass.seconds : 1e-9;
  const double steady_seconds = pass.seconds - pass.first_wait_seconds;
  const Json line = Json::object({
      {"reader", Json(r.name)},
      {"source", Json(source)},
      {"split", Json(to_string(split))},
      {"epochs", Json(options.epochs)},
      {"batch_size", Json(static_cast<long long>(config.run.integer(
                         split == Split::Train ? "train_batch_size" : "validation_batch_size")))},
      {"batches", Json(static_cast<long long>(pass.batches))},
      {"samples", Json(static_cast<long long>(pass.samples))},
      {"samples_per_epoch", Json(static_cast<long long>(per_epoch))},
      {"with_validation", Json(options.with_validation)},
      {"validation_batches", Json(static_cast<long long>(pass.validation_batches))},
      {"validation_samples", Json(static_cast<long long>(pass.validation_samples))},
      {"bytes", Json(static_cast<long long>(bytes))},
      {"seconds", Json(pass.seconds)},
      {"samples_per_s", Json(pass.samples / seconds)},
      {"gb_per_s", Json(bytes / seconds / 1e9)},
      {"wait_seconds", Json(pass.wait_seconds)},
      {"wait_fraction", Json(pass.wait_seconds / seconds)},
      {"first_wait_seconds", Json(pass.first_wait_seconds)},
      {"steady_wait_fraction", Json(steady_seconds > 0 ? (pass.wait_seconds - pass.first_wait_seconds) / steady_seconds
                                                       : 0.0)},
      {"consume_ms", Json(consume_ms)},
      {"wait_ms_per_batch", Json(pass.batches > 0 ? 1e3 * pass.wait_seconds / pass.batches : 0.0)},
      {"read_ms_per_batch", Json(read_ms_per_batch)},
      {"build_seconds", Json(build_seconds)},
      {"peak_rss_bytes", Json(static_cast<long long>(peak_rss_bytes()))},
      {"base_rss_bytes", Json(static_cast<long long>(base_rss))},
  });
  std::printf("%s\n", line.dump().c_str());
  deepcam::flush_stdout();
}

}  // namespace deepcam::data
