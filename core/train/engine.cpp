#include "deepcam/engine.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/cuda.h>
#include <torch/nn/module.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstring>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <functional>
#include <limits>
#include <fstream>
#include <map>
#include <numeric>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string_view>
#include <tuple>
#include <variant>

#include "amp.hpp"
#include "closed_division.hpp"
#include "comm.hpp"
#include "data_parallel.hpp"
#include "deepcam/build_reader.hpp"
#include "deepcam/checkpoint.hpp"
#include "deepcam/error.hpp"
#include "deepcam/loss.hpp"
#include "deepcam/mlperf_log.hpp"
#include "deepcam/normalise.hpp"
#include "deepcam/npy.hpp"
#include "deepcam/stop_request.hpp"
#include "deepcam/torch_pickle.hpp"
#include "picture.hpp"
#include "plugin_calls.hpp"
#include "ranks.hpp"
#include "temporary_files.hpp"
#include "train_batches.hpp"

#if DEEPCAM_WITH_CUDA
#include <ATen/autocast_mode.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "step_graph.hpp"
#endif

namespace fs = std::filesystem;

namespace deepcam {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

void synchronize_device() {
#if DEEPCAM_WITH_CUDA
  c10::cuda::getCurrentCUDAStream().synchronize();
#endif
}

// The measure of memory --benchmark reports: for a run on CUDA the caching
// allocator's peak since reset_peak_memory() (the device's own figure), for
// a run on the CPU the process's peak resident set (which the allocator
// cannot reset), also where a GPU is present.
void reset_peak_memory(const at::Device& device) {
#if DEEPCAM_WITH_CUDA
  if (device.is_cuda()) {
    c10::cuda::CUDACachingAllocator::resetPeakStats(c10::cuda::current_device());
  }
#endif
}

double peak_memory_mb(const at::Device& device) {
#if DEEPCAM_WITH_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device());
    return static_cast<double>(
               stats.allocated_bytes[static_cast<std::size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak) /
           (1024.0 * 1024.0);
  }
#endif
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;
}

// What an optimizer logs of itself (its opt_* lines): each key and the
// value's JSON text, read back from the lines it writes.
std::map<std::string, std::string> logged_hyperparameters(const Optimizer& optimizer) {
  char* text = nullptr;
  std::size_t size = 0;
  std::FILE* memory = ::open_memstream(&text, &size);
  if (!memory) throw Error(fmt::format("cannot hold the optimizer's log lines: {}", std::strerror(errno)));
  {
    MlperfLog capture(memory, true);
    optimizer.log_hyperparameters(capture);
  }
  std::fclose(memory);
  std::istringstream lines(std::string(text, size));
  std::free(text);
  // MlperfLog's own layout: ..."key": "K", "value": V, "metadata": {...}}
  static const std::regex entry(R"re("key": "([^"]*)", "value": (.*), "metadata": \{)re");
  std::map<std::string, std::string> values;
  for (std::string line; std::getline(lines, line);) {
    std::smatch m;
    if (std::regex_search(line, m, entry)) values[m[1].str()] = m[2].str();
  }
  return values;
}

// "<path>.<n>": the name under which the record of a run that a resume in
// its folder continues is kept.
fs::path numbered(const fs::path& path, int n) { return path.string() + fmt::format(".{}", n); }

// A fingerprint of a checkpoint file's contents: its size and a CRC-32 of
// its last MiB, which holds the zip archive's central directory (the CRC-32
// and size of every record), so that two files that differ anywhere differ
// here. 0 when it cannot be read (loading it has read it already).
std::uint64_t file_fingerprint(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return 0;
  const std::streamoff size = in.tellg();
  const std::streamoff tail = std::min<std::streamoff>(size, std::streamoff{1} << 20);
  std::vector<char> bytes(static_cast<std::size_t>(tail));
  in.seekg(size - tail);
  if (!in.read(bytes.data(), tail)) return 0;
  const auto crc = static_cast<std::uint64_t>(
      ::crc32_z(0L, reinterpret_cast<const Bytef*>(bytes.data()), static_cast<z_size_t>(bytes.size())));
  return (static_cast<std::uint64_t>(size) << 32) ^ crc;
}

// The run's record, config.toml and the MLPerf log. Until the run starts
// they are written under temporary names ("<name>.partial-<pid>"), so that a
// run that fails before it starts (bad input, a refused resume) leaves an
// earlier record in its folder as it was; keep() gives them their names. From
// then on the log is flushed line by line, so that `tail -F` follows a run
// and a run cut short (a time limit, kill -9) keeps a valid prefix. A run
// that continues an earlier one in its folder (a resume from one of its
// checkpoints) keeps that run's record under the next free number
// ("mlperf.log.1", "config.toml.1"); otherwise an earlier record (overwrite =
// true) is replaced. Only rank 0 has one.
class RunRecord {
 public:
  RunRecord(const fs::path& config_path, const fs::path& log_path, const std::string& resolved,
            const std::string& where, bool keeps_earlier)
      : config_path_(config_path), log_path_(log_path), keeps_earlier_(keeps_earlier) {
    // Messages name the files by their own names.
    const fs::path config = partial(config_path_);
    std::FILE* file = std::fopen(config.c_str(), "w");
    if (!file) throw Error(fmt::format("{}: cannot create: {}", config_path_.string(), std::strerror(errno)));
    const bool written = std::fputs(resolved.c_str(), file) >= 0 && std::fflush(file) == 0;
    const int e = errno;
    if (std::fclose(file) != 0 || !written) {
      std::remove(config.c_str());
      throw Error(write_error_text(config_path_.string(), written ? errno : e));
    }
    log_ = std::fopen(partial(log_path_).c_str(), "w");
    if (!log_) {
      const int e2 = errno;
      std::remove(config.c_str());
      throw Error(fmt::format("{}: cannot create {}: {}", where, log_path_.string(), std::strerror(e2)));
    }
  }
  RunRecord(const RunRecord&) = delete;
  RunRecord& operator=(const RunRecord&) = delete;
  ~RunRecord() {
    std::fclose(log_);
    if (kept_) return;
    std::remove(partial(log_path_).c_str());
    std::remove(partial(config_path_).c_str());
  }
  std::FILE* log() const { return log_; }

  void keep() {
    if (kept_) return;
    if (keeps_earlier_) keep_earlier();
    // The log's stream stays open across its rename.
    for (const fs::path& path : {config_path_, log_path_}) {
      std::error_code ec;
      fs::rename(partial(path), path, ec);
      if (ec) throw Error(fmt::format("{}: cannot rename {} to it: {}", path.string(), partial(path).string(),
                                      ec.message()));
    }
    kept_ = true;
  }

  // Throws if the kept log is no longer at its path (the output folder or
  // the file was removed, or replaced, while the run wrote it): the run
  // must not end as if its record were there.
  void check_still_there() const {
    struct stat open_file {}, at_path {};
    if (!kept_ || ::fstat(::fileno(log_), &open_file) != 0) return;
    if (::stat(log_path_.c_str(), &at_path) == 0 && at_path.st_dev == open_file.st_dev &&
        at_path.st_ino == open_file.st_ino) {
      return;
    }
    throw Error(fmt::format("{}: the MLPerf log was removed or replaced while the run wrote it: this run's record "
                            "is lost",
                            log_path_.string()));
  }

 private:
  static fs::path partial(const fs::path& path) {
    return path.string() + fmt::format(".partial-{}", ::getpid());
  }
  void keep_earlier() const {
    std::error_code ec;
    std::vector<fs::path> earlier;
    for (const fs::path& path : {config_path_, log_path_}) {
      if (fs::exists(path, ec)) earlier.push_back(path);
    }
    if (earlier.empty()) return;
    int n = 1;
    while (fs::exists(numbered(config_path_, n), ec) || fs::exists(numbered(log_path_, n), ec)) ++n;
    std::string kept;
    for (const fs::path& path : earlier) {
      fs::rename(path, numbered(path, n), ec);
      if (ec) throw Error(fmt::format("{}: cannot rename it to {}: {}", path.string(), numbered(path, n).string(),
                                      ec.message()));
      kept += (kept.empty() ? "" : " and ") + numbered(path, n).string();
    }
    std::fprintf(stderr, "deepcam-host: the record of the run this one continues is kept as %s\n", kept.c_str());
  }

  fs::path config_path_, log_path_;
  std::FILE* log_ = nullptr;
  bool keeps_earlier_ = false;
  bool kept_ = false;
};

// SIGTERM (a Slurm time limit) and SIGINT end a run cleanly: the handler
// only records the signal (deepcam/stop_request.hpp); training looks at it
// between steps, a reader staging its files between chunks of a copy. A
// signal the process was started ignoring (SIGINT in a shell script's
// background job) stays ignored, as Python leaves it, and as deepcam-data
// does.
extern "C" void record_stop_signal(int sig) { record_stop_request(sig); }

// --benchmark writes no file and prints its figures only at its end, so a
// stop needs no clean-up: SIGINT or SIGTERM says so and ends the process by
// the signal's default action (SA_RESETHAND), at once, on every rank. Ranks
// stopping at one step would have to agree on it, which every timed step
// would pay for.
extern "C" void end_benchmark(int sig) {
  static constexpr char kInterrupt[] =
      "deepcam-host: --benchmark stopped by SIGINT, before its figures; it writes no file\n";
  static constexpr char kTerminate[] =
      "deepcam-host: --benchmark stopped by SIGTERM, before its figures; it writes no file\n";
  // write and raise are async-signal-safe.
  if (sig == SIGINT) (void)!::write(STDERR_FILENO, kInterrupt, sizeof(kInterrupt) - 1);
  else (void)!::write(STDERR_FILENO, kTerminate, sizeof(kTerminate) - 1);
  ::raise(sig);  // delivered, by the default action, as the handler returns
}

// From here to the process's end: a signal that comes once the run is
// over, while the engine (a reader removing its staged copies) and the
// process are torn down, is recorded, not the end of the process with those
// copies left and the run's status lost.
void record_stop_signals_from_now() { catch_stop_signals(record_stop_signal); }

// " (sent to rank 1)" for a stop signal that came to `ranks` of `world`,
// where the launcher (--nproc, torchrun) ends every rank with the same
// status; "" on one rank.
std::string sent_to_text(const std::vector<int>& ranks, int world) {
  if (world == 1 || ranks.empty()) return "";
  if (static_cast<int>(ranks.size()) == world) return " (sent to every rank)";
  return fmt::format(" (sent to rank{} {})", ranks.size() > 1 ? "s" : "", fmt::join(ranks, ", "));
}

// A stop signal that came while the ranks met, to any rank, stops every
// rank here, with StopRequested, before anything is written (one small
// all-gather; a signal later is the engine's to look at).
void stop_if_any_rank_was_stopped(Communicator& comm) {
  const at::Tensor mine = at::full({1}, static_cast<std::int64_t>(stop_requested()), at::kLong);
  const at::Tensor all = comm.world().all_gather(mine).view({-1}).contiguous();
  const int signal = static_cast<int>(all.max().item<std::int64_t>());
  if (signal == 0) return;
  std::vector<int> sent_to;
  for (int r = 0; r < comm.size(); ++r) {
    if (all[r].item<std::int64_t>() != 0) sent_to.push_back(r);
  }
  throw StopRequested(signal, fmt::format("stopped by {}{} as the ranks met; the run had not started",
                                          strsignal(signal), sent_to_text(sent_to, comm.size())));
}

// A stop signal recorded before the run started ends it here, with
// StopRequested; `when` says where and what was left.
void stop_if_requested(const char* when) {
  if (const int signal = stop_requested()) {
    throw StopRequested(signal, fmt::format("stopped by {} {}", strsignal(signal), when));
  }
}

struct Components {
  Plugged<Reader> reader;
  Plugged<Model> model;
  Plugged<Optimizer> optimizer;
  Plugged<Scheduler> scheduler;
};

// A plugin's factory call: what fails in the plugin's code names its file.
template <typename F>
auto make(const PluginChoice& choice, F&& factory) {
  return build_plugged(*choice.plugin, std::forward<F>(factory));
}

struct Totals {
  double score_sum = 0.0;
  double loss_sum = 0.0;
  std::int64_t samples = 0;
  // --evaluate only: SIGTERM or SIGINT on any rank ended the scoring after
  // `batches_done` of rank 0's `batches`; the sums are then empty.
  int stop_signal = 0;
  std::int64_t batches_done = 0, batches = 0;
};

// Why the run's data may hold NaN or infinity, which makes a loss NaN as a
// too high learning rate does: the reader that reads the files (a wrapping
// reader's source, [reader.source]) has check_finite = false, as the
// built-in readers can be told, or has no such key (a plugin not known to
// check). Empty when that reader refuses such data.
std::string unchecked_data(const Params& reader, const std::string& name, const std::string& path) {
  const auto& values = reader.values();
  if (const auto check = values.find("check_finite"); check != values.end()) {
    const bool* on = std::get_if<bool>(&check->second);
    if (on && *on) return "";
    if (on) return reader.setting("check_finite");
  }
  if (const NestedPlugin* source = nested_source(reader)) {
    return unchecked_data(source->params, source->name, source->path);
  }
  return fmt::format("the reader plugin '{}' ({}) has no check_finite key", name, path);
}

// What stopped a diverged run: the first NaN or infinite training loss or
// gradient norm, or a NaN or infinite validation loss.
struct Divergence {
  std::int64_t step_num;  // as the log counts steps: batches trained, this one included
  std::int64_t epoch_num;
  const char* what;       // "loss", "gradient norm" or "validation loss"
  double value;
};

// Watches every training step for a NaN or infinite loss or gradient norm
// without reading anything back: on CUDA a read makes the host wait for the
// device, and the engine only waits once per logging interval. So the first
// bad step and its value are kept on the device (a few scalar kernels per
// step), and read where the engine reads the loss anyway. Keeping the first
// one matters: a NaN step is followed by optimizer updates that spread it to
// every weight, and the step that started it is the one worth naming.
// The batch count lives on the device too and every update is in place, so
// that a captured step (CUDA graphs) replays the watch as it ran.
class DivergenceWatch {
 public:
  // `batch`: the batches trained before the next one, counted from 0.
  void reset(const at::Device& device, std::int64_t batch) {
    first_ = at::full({}, -1, at::TensorOptions().dtype(at::kLong).device(device));
    value_ = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device));
    batch_ = at::full({}, batch, at::TensorOptions().dtype(at::kLong).device(device));
  }

  // The code of a bad value keeps what went wrong beside the batch.
  void loss(const at::Tensor& loss) { watch(loss.detach(), batch_ * 2); }

  // `found_inf` (float16 runs): the loss scaler's verdict; a step it skips
  // is not divergence.
  void gradients(const std::vector<at::Tensor>& parameters, const at::Tensor& found_inf = at::Tensor()) {
    std::vector<at::Tensor> grads;
    grads.reserve(parameters.size());
    for (const at::Tensor& p : parameters) {
      if (p.grad().defined()) grads.push_back(p.grad());
    }
    if (grads.empty()) return;
    // The global 2-norm, as torch.nn.utils.clip_grad_norm_ computes it.
    at::Tensor norm = at::stack(at::_foreach_norm(grads, 2)).norm();
    if (found_inf.defined()) norm = at::where(found_inf.squeeze().gt(0), at::zeros_like(norm), norm);
    watch(norm, batch_ * 2 + 1);
  }

  // The same check on a norm the optimizer computed itself (LAMB's).
  void gradient_norm(const at::Tensor& norm) { watch(norm, batch_ * 2 + 1); }

  // The batch is done: the next one is watched.
  void next_batch() { batch_.add_(1); }

  // The record as (code, value), -1 for none: two device-to-host copies.
  std::pair<double, double> record() const {
    return {static_cast<double>(first_.item<std::int64_t>()), value_.item<double>()};
  }

  static std::optional<Divergence> decode(double code, double value, std::int64_t epoch_num) {
    if (code < 0) return std::nullopt;
    const auto c = static_cast<std::int64_t>(code);
    return Divergence{c / 2 + 1, epoch_num, c % 2 == 0 ? "loss" : "gradient norm", value};
  }

 private:
  void watch(const at::Tensor& x, const at::Tensor& code) {
    const at::Tensor fresh = first_.lt(0).logical_and_(x.isfinite().logical_not_());
    value_.copy_(at::where(fresh, x.to(at::kDouble), value_));
    first_.copy_(at::where(fresh, code, first_));
  }

  at::Tensor first_;  // -1, or the code of the first bad step
  at::Tensor value_;  // the bad value of that step
  at::Tensor batch_;  // int64: the batch being trained, from 0
};

// What every rank knows after a logging point: the training loss and IoU of
// the last batch averaged over ranks (SPEC 4.3), and the first divergence
// any rank saw.
struct IntervalFigures {
  double loss;
  double iou;
  std::optional<Divergence> diverged;
  int stop_signal;  // SIGTERM or SIGINT on any rank, else 0
};

class Engine {
 public:
  // `seed_drawn`: the seed in `cfg` was drawn for seed = "auto" (with_drawn_seed).
  Engine(const RunConfig& cfg, bool seed_drawn, MlperfLog& log, Communicator& comm)
      : cfg_(cfg), seed_drawn_(seed_drawn), log_(log), comm_(comm), device_(at::kCPU) {}

  // Called once run_start is logged (the run's record is kept from then on).
  void on_run_start(std::function<void()> f) { on_run_start_ = std::move(f); }
  // Whether run_stop is in the log (a failure after it adds no second one).
  bool run_stopped() const { return run_stopped_; }
  // Batches trained so far (the log's step_num), the resumed ones included.
  std::int64_t steps_trained() const { return steps_trained_; }

  // `splits`: what the run reads (ReaderContext::splits); of validation,
  // the first `validation_samples` (0: all).
  void build(bool with_optimizer, const std::vector<Split>& splits, std::int64_t validation_samples = 0) {
    const Params& run = cfg_.run;
    // Only training captures its step (--evaluate and --predict do not).
    cuda_graphs_ = with_optimizer && run.boolean("cuda_graphs");
    if (cuda_graphs_) refuse_what_graphs_cannot_capture();
    if (run.string("device") == "cuda") {
      if (!torch::cuda::is_available()) {
        throw Error(fmt::format("{}: no CUDA device is available{}", run.setting("device"),
                                DEEPCAM_WITH_CUDA ? "" : " (this build has CUDA disabled)"));
      }
      device_ = at::Device(at::kCUDA, comm_.local_rank() % static_cast<int>(torch::cuda::device_count()));
#if DEEPCAM_WITH_CUDA
      // The rank's GPU current for everything that names none (streams,
      // the allocator's statistics, NCCL's set-up), as torch.cuda.set_device
      // in a PyTorch training script: no context on GPU 0 for the others.
      c10::cuda::set_device(device_.index());
      refuse_a_shared_gpu();
#endif
    }
    if (run.integer("threads") > 0) at::set_num_threads(static_cast<int>(run.integer("threads")));
    at::manual_seed(static_cast<std::uint64_t>(run.integer("seed")));
    if (device_.is_cuda()) {
      at::globalContext().setBenchmarkCuDNN(run.boolean("cudnn_benchmark"));
    } else if (comm_.rank() == 0 && !run.boolean("cudnn_benchmark")) {
      // Turned off (the default is on): a setting that changes nothing here.
      // An explicit true, as every rerun of an earlier run's config.toml
      // gives (it writes each default out), asks for what the default does.
      std::fprintf(stderr, "deepcam-host: note: %s does nothing on the CPU: it chooses cuDNN's convolution "
                   "algorithms on CUDA\n", run.setting("cudnn_benchmark").c_str());
    }
    precision_ = parse_precision(run.string("precision"));
#if DEEPCAM_WITH_CUDA
    // As torch.cuda.graph asks of autocast (cache_enabled=False): a weight's
    // cast is made again at each use in the graph; the values are the same.
    if (cuda_graphs_) at::autocast::set_autocast_cache_enabled(false);
#endif
    memory_format_ = run.string("memory_format") == "channels_last" ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous;
    // A run that stops below the benchmark's target ends in "success" by its
    // own target, yet its log fails the checker.
    if (with_optimizer && comm_.rank() == 0 && run.number("target_iou") < kBenchmarkTargetIou) {
      std::fprintf(stderr,
                   "deepcam-host: note: %s is below the benchmark's target IoU %g: reaching it ends the run in "
                   "\"success\", but the MLPerf checker fails such a log and deepcam-data package does not count "
                   "it\n",
                   run.setting("target_iou").c_str(), kBenchmarkTargetIou);
    }

    ReaderContext rc = reader_context(cfg_, comm_.rank(), comm_.size(), &log_);
    rc.local_rank = comm_.local_rank();
    rc.local_size = comm_.local_size();
    rc.node_group = comm_.size() > 1 ? &comm_.node() : nullptr;
    rc.splits = splits;
    rc.validation_samples = validation_samples;
    c_.reader = build_reader(cfg_, rc);
    if (comm_.size() > 1) require_same_samples(splits);
    sample_shape_ = c_.reader->sample_shape();

    bn_group_size_ = std::min<std::int64_t>(run.integer("batchnorm_group_size"), comm_.size());
    if (comm_.size() % bn_group_size_ != 0) {
      throw Error(fmt::format("{}: does not divide the {} ranks; use a divisor of {}",
                              run.setting("batchnorm_group_size"), comm_.size(), comm_.size()));
    }
    ModelContext mc{static_cast<std::int64_t>(rc.channels.size()), 3, comm_.rank(), comm_.size()};
    if (bn_group_size_ > 1) mc.batchnorm_group = &comm_.consecutive(static_cast<int>(bn_group_size_));
    c_.model = make(cfg_.model, [&](const PluginDescriptor& d) { return d.make_model(cfg_.model.params, mc); });
    c_.model->module().to(device_);
    if (memory_format_ == at::MemoryFormat::ChannelsLast) {
      // As module.to(memory_format=torch.channels_last): 4-d weights NHWC,
      // by Tensor.to, which gives a 1x1 kernel NHWC strides too. Its
      // contiguous ones already count as channels_last, so contiguous()
      // would keep them, and a convolution of NCHW input would run NCHW.
      at::NoGradGuard no_grad;
      for (at::Tensor& p : c_.model->module().parameters()) {
        if (p.dim() == 4) {
          p.set_data(p.data().to(p.options(), /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::ChannelsLast));
        }
      }
    }
    // Every rank starts from rank 0's weights (as DDP's constructor does).
    broadcast_model();
    if (!with_optimizer) return;
    parameters_ = c_.model->module().parameters();
    OptimizerContext oc{parameters_};
    c_.optimizer =
        make(cfg_.optimizer, [&](const PluginDescriptor& d) { return d.make_optimizer(cfg_.optimizer.params, oc); });
    // The schedule's base rate: NaN from the optimizer plugin would make
    // every rate the scheduler gives NaN, and the scheduler be blamed.
    const double base_lr = in_plugin(cfg_.optimizer, [&] { return c_.optimizer->lr(); });
    if (!(std::isfinite(base_lr) && base_lr >= 0.0)) {
      throw std::logic_error(fmt::format("{}: a bug in the plugin: the optimizer's lr(), the base rate of the "
                                         "schedule, is {} as built from {}",
                                         cfg_.optimizer.plugin->path, base_lr, cfg_.optimizer.params.where()));
    }
    SchedulerContext sc{base_lr};
    c_.scheduler =
        make(cfg_.scheduler, [&](const PluginDescriptor& d) { return d.make_scheduler(cfg_.scheduler.params, sc); });
    if (comm_.size() > 1) {
      const auto cap = static_cast<std::int64_t>(run.number("bucket_cap_mb") * 1024 * 1024);
      gradients_ = std::make_unique<GradientAllReduce>(comm_, parameters_, cap);
    }
    if (precision_ == Precision::AmpFp16) scaler_ = std::make_unique<GradScaler>(ScalerState{}, device_);
  }

  // [run] cuda_graphs: every setting a captured step cannot follow, one line
  // each, before anything is built. A captured step is one whole optimizer
  // step on this rank's GPU whose every changing value lives on the device;
  // on many ranks it includes the gradient all-reduce (NCCL kernels are
  // captured as any other).
  void refuse_what_graphs_cannot_capture() const {
    const Params& run = cfg_.run;
    std::vector<std::string> reasons;
    if (run.string("device") != "cuda") {
      reasons.push_back(fmt::format("{}: CUDA graphs need device = \"cuda\"", run.setting("device")));
    }
    // ProcessGroupNCCL's blocking wait polls each all-reduce from the host,
    // which a capture cannot hold (c10d reads any value but "0" as on).
    for (const char* name : {"TORCH_NCCL_BLOCKING_WAIT", "NCCL_BLOCKING_WAIT"}) {
      const char* value = std::getenv(name);
      if (comm_.size() > 1 && value != nullptr && *value != '\0' && std::string(value) != "0") {
        reasons.push_back(fmt::format("the environment sets {}={}: the NCCL all-reduce is then waited for on the "
                                      "host, which a captured step cannot do; unset it (comm_timeout_s and the "
                                      "heartbeat still catch a lost rank)",
                                      name, value));
      }
    }
    if (run.integer("gradient_accumulation_frequency") != 1) {
      reasons.push_back(fmt::format("{}: a captured step is one whole optimizer step; use 1",
                                    run.setting("gradient_accumulation_frequency")));
    }
    if (run.string("precision") == "amp_fp16") {
      reasons.push_back(fmt::format("{}: its loss scaler reads the device to decide whether to skip a step; use "
                                    "\"amp_bf16\" or \"fp32\"",
                                    run.setting("precision")));
    }
    if (reasons.empty()) return;
    std::string message = fmt::format("{}, but the training step of this run cannot be captured:",
                                      run.setting("cuda_graphs"));
    for (const std::string& reason : reasons) message += "\n  " + reason;
    throw Error(message + "\nchange those, or set cuda_graphs = false");
  }

#if DEEPCAM_WITH_CUDA
  // NCCL refuses two ranks on one GPU, but only in its first collective,
  // where the refusal would wait out [run] comm_timeout_s as a lost rank.
  // So the ranks compare their GPUs at start, by PCI address as NCCL does.
  void refuse_a_shared_gpu() const {
    if (comm_.size() == 1) return;
    int pci[3] = {};
    const cudaDeviceAttr attributes[3] = {cudaDevAttrPciDomainId, cudaDevAttrPciBusId, cudaDevAttrPciDeviceId};
    for (int i = 0; i < 3; ++i) C10_CUDA_CHECK(cudaDeviceGetAttribute(&pci[i], attributes[i], device_.index()));
    const at::Tensor all = comm_.world().all_gather(
        at::tensor({std::int64_t{pci[0]}, std::int64_t{pci[1]}, std::int64_t{pci[2]}}, at::kLong));
    const auto a = all.accessor<std::int64_t, 2>();
    std::map<std::tuple<std::string, std::int64_t, std::int64_t, std::int64_t>, int> first_on;
    for (int r = 0; r < comm_.size(); ++r) {
      const auto [first, fresh] = first_on.try_emplace({comm_.host(r), a[r][0], a[r][1], a[r][2]}, r);
      if (fresh) continue;
      throw Error(fmt::format("{}: ranks {} and {} on host {} would share one GPU (PCI {:04x}:{:02x}:{:02x}.0), "
                              "and NCCL needs a GPU of its own for each rank: start at most as many ranks on a "
                              "node as it has GPUs (--nproc, srun's --ntasks-per-node, torchrun's "
                              "--nproc-per-node), or give each rank its own (CUDA_VISIBLE_DEVICES)",
                              cfg_.run.setting("device"), first->second, r, comm_.host(r), a[r][0], a[r][1],
                              a[r][2]));
    }
  }
#endif

  // Every rank takes its share of one list of the data set's samples (SPEC
  // 2.2), built from what it sees under [data] root. A rank that sees
  // another set (a node-local copy of part of it, or of another version)
  // trained on part of the data without a word, read samples twice, or
  // stopped in a collective of another size than the others': each split's
  // sample count and a hash of its file names in order (not their folder,
  // which staging changes) are compared with rank 0's.
  void require_same_samples(const std::vector<Split>& splits) {
    // The sample shape (the first training file's, as the reader reads it)
    // and the normalisation (stats.h5: a few kB, fingerprinted whole): a
    // rank that sees another copy under the same names (an older one, or
    // one of other resolution) trained on it without a word.
    const std::vector<std::int64_t> shape = in_plugin(cfg_.reader, [&] { return c_.reader->sample_shape(); });
    const std::string stats = (fs::path(cfg_.data.string("root")) / "stats.h5").string();
    std::vector<std::int64_t> mine = {shape.size() == 3 ? shape[1] : -1, shape.size() == 3 ? shape[2] : -1,
                                      static_cast<std::int64_t>(file_fingerprint(stats))};
    constexpr std::size_t kHeader = 3;
    for (const Split s : splits) {
      const std::int64_t count = in_plugin(cfg_.reader, [&] { return c_.reader->sample_count(s); });
      std::uint64_t hash = 14695981039346656037ull;  // FNV-1a
      for (std::int64_t i = 0; i < count; ++i) {
        for (const std::string& file : in_plugin(cfg_.reader, [&] { return c_.reader->sample_files(s, i); })) {
          for (const char c : fs::path(file).filename().string() + '\n') {
            hash = (hash ^ static_cast<unsigned char>(c)) * 1099511628211ull;
          }
        }
      }
      mine.push_back(count);
      mine.push_back(static_cast<std::int64_t>(hash));
    }
    const at::Tensor all = comm_.world().all_gather(at::tensor(mine, at::kLong));
    const auto* v = all.data_ptr<std::int64_t>();
    const std::size_t n = mine.size();
    std::vector<std::string> differences;
    for (int r = 1; r < comm_.size() && differences.size() < 4; ++r) {
      const std::int64_t* theirs = v + static_cast<std::size_t>(r) * n;
      if (theirs[0] != v[0] || theirs[1] != v[1]) {
        differences.push_back(fmt::format("rank {} reads samples of {} x {} pixels, rank 0 of {} x {}", r, theirs[0],
                                          theirs[1], v[0], v[1]));
      }
      if (theirs[2] != v[2]) {
        differences.push_back(fmt::format("rank {} sees another {} than rank 0 (other statistics: every rank must "
                                          "normalise alike)",
                                          r, stats));
      }
      for (std::size_t k = 0; k < splits.size(); ++k) {
        const std::int64_t* first = v + kHeader + 2 * k;
        const std::int64_t* other = theirs + kHeader + 2 * k;
        if (other[0] != first[0]) {
          differences.push_back(fmt::format("rank {} sees {} {} samples, rank 0 {}", r, other[0],
                                            to_string(splits[k]), first[0]));
        } else if (other[1] != first[1]) {
          differences.push_back(fmt::format("rank {} sees as many {} samples as rank 0 ({}), but in other files",
                                            r, to_string(splits[k]), first[0]));
        }
      }
    }
    if (differences.empty()) return;
    throw Error(fmt::format("{}: the ranks do not see the same data set: {}; every rank takes its share of one list "
                            "of the whole set, so each must see all of it there (for node-local copies of each node's "
                            "or rank's share, the prefetch reader's stage_dir makes them, with shuffle_mode = "
                            "\"node\" or \"gpu\")",
                            cfg_.data.setting("root"), fmt::join(differences, "; ")));
  }

  // The checker would refuse a closed submission from this run: say so now,
  // naming each key, rather than after hours of training.
  void warn_if_not_closed() const {
    const std::vector<std::string> gaps = closed_division_gaps(
        cfg_, c_.reader->global_samples(Split::Train), c_.reader->global_samples(Split::Validation));
    if (gaps.empty()) return;
    std::fprintf(stderr, "deepcam-host: warning: %s sets division = \"closed\", but this run cannot be a closed "
                 "submission:\n", cfg_.mlperf.where("division").c_str());
    for (const std::string& gap : gaps) std::fprintf(stderr, "  %s\n", gap.c_str());
  }

  int train() {
    const Params& run = cfg_.run;
    const std::int64_t k = run.integer("gradient_accumulation_frequency");
    const std::int64_t batch = run.integer("train_batch_size");

    log_.event("global_batch_size", Json(batch * comm_.size()));
    log_.event("batchnorm_group_size", Json(bn_group_size_));
    log_.event("gradient_accumulation_frequency", Json(k));
    // The MLCommons reference logs its data-parallel workers, the ranks,
    // under this key (not data-loading threads).
    log_.event("num_workers", Json(comm_.size()));
    in_plugin(cfg_.optimizer, [&] { c_.optimizer->log_hyperparameters(log_); });
    const auto logged = logged_hyperparameters(*c_.optimizer);
    in_plugin(cfg_.scheduler, [&] { c_.scheduler->log_hyperparameters(log_); });
    // The log's sample counts come from the reader as they are: a count no
    // data set has would be a log the checker passes.
    check_sample_counts(cfg_.reader, *c_.reader);
    log_.event("train_samples", Json(c_.reader->global_samples(Split::Train)));
    log_.event("eval_samples", Json(c_.reader->global_samples(Split::Validation)));
    // The reference's DataLoader drops the last incomplete batch: with fewer
    // samples than one batch, an epoch would train nothing.
    if (const std::string refusal =
            train_batch_refusal(cfg_, c_.reader->local_samples(Split::Train),
                                c_.reader->global_samples(Split::Train), comm_.rank(), comm_.size());
        !refusal.empty()) {
      throw Error(refusal);
    }
    if (comm_.rank() == 0 && cfg_.mlperf.string("division") == "closed") warn_if_not_closed();

    std::int64_t step = 0;       // batches trained, as the reference counts them
    std::int64_t first_epoch = 0;
    if (run.string("resume").empty() && run.boolean("resume_weights_only") && comm_.rank() == 0) {
      std::fprintf(stderr, "deepcam-host: note: %s does nothing without [run] resume: training starts from fresh "
                   "weights\n", run.setting("resume_weights_only").c_str());
    }
    if (!run.string("resume").empty()) {
      const std::string& resume = run.string("resume");
      LoadOptions lo;
      lo.require_optimizer = true;
      lo.weights_only = run.boolean("resume_weights_only");
      lo.model = model_config();
      lo.optimizer_plugin = cfg_.optimizer.name;
      const double base_lr = in_plugin(cfg_.optimizer, [&] { return c_.optimizer->lr(); });
      // The optimizer's load_state_dict() is a call into its plugin.
      const CheckpointInfo info = in_plugin(
          cfg_.optimizer, [&] { return load_checkpoint(resume, c_.model->module(), c_.optimizer.object.get(), lo); });
      // The schedule sets the rate from the run file's at every step; the
      // checkpoint's (its last step's) is not used.
      in_plugin(cfg_.optimizer, [&] { c_.optimizer->set_lr(base_lr); });
      require_logged_hyperparameters(resume, logged);
      note_other_model_settings(resume, info);
      agree_on_resume(info, run.where("resume"), resume);
      if (info.epoch >= run.integer("max_epochs")) {
        throw Error(fmt::format("{}: the checkpoint is at epoch {}, and {}: nothing is left to train; raise "
                                "max_epochs to continue its run",
                                run.setting("resume"), info.epoch, run.setting("max_epochs")));
      }
      broadcast_model();
      if (scaler_ && info.scaler) scaler_ = std::make_unique<GradScaler>(*info.scaler, device_);
      step = info.step;
      first_epoch = info.epoch;
      restore_accumulation(resume, info, k, lo.weights_only);
      check_accumulation_frequency(resume, info, k, lo.weights_only);
      note_other_global_batch(resume, info);
      note_other_seed(resume, info);
      note_other_scaler_settings(resume, info);
      note_other_precision(resume, info);  // after restore_accumulation, which refuses some of these
      last_resumable_ = run.string("resume");
      if (comm_.rank() == 0) {
        std::fprintf(stderr, "deepcam-host: resumed from %s at epoch %lld, step %lld\n", run.string("resume").c_str(),
                     static_cast<long long>(first_epoch), static_cast<long long>(step));
      }
    }
    note_no_optimizer_step(step, first_epoch, k);
    comm_.world().barrier();
    log_.end("init_stop");
    comm_.world().barrier();
    log_.start("run_start");
    run_started_ = Clock::now();
    if (on_run_start_) on_run_start_();

    const std::int64_t max_epochs = run.integer("max_epochs");
    const std::int64_t every = run.integer("checkpoint_every");
    const double target = run.number("target_iou");
    bool reached = false;
    std::int64_t epoch = first_epoch;
    std::int64_t last_saved = -1;
    divergence_.reset(device_, step);
    steps_trained_ = step;
    while (epoch < max_epochs && !reached) {
      const std::int64_t epoch_num = epoch + 1;
      comm_.world().barrier();
      log_.start("epoch_start", Json(), {{"epoch_num", Json(epoch_num)}, {"step_num", Json(step)}});
      std::optional<Divergence> diverged;
      int stop_signal = 0;
      step = train_epoch(epoch, step, diverged, stop_signal);
      if (diverged) return stop_diverged(*diverged, step);
      if (stop_signal) return stop_signalled(stop_signal, epoch_num, step, /*in_epoch=*/true);
      average_batchnorm_statistics(c_.model->module(), comm_.world());
      const Totals v = validate(epoch_num, step);
      const double accuracy = v.score_sum / static_cast<double>(v.samples);
      // The last update of the epoch comes after the last check of its
      // losses; NaN weights it made show here first.
      const double eval_loss = v.loss_sum / static_cast<double>(v.samples);
      if (!std::isfinite(eval_loss)) return stop_diverged({step, epoch_num, "validation loss", eval_loss}, step);
      comm_.world().barrier();
      log_.end("epoch_stop", Json(), {{"epoch_num", Json(epoch_num)}, {"step_num", Json(step)}});
      ++epoch;
      if (accuracy >= target) {
        reached = true;
        log_.event("target_accuracy_reached", Json(target), {{"epoch_num", Json(epoch_num)}, {"step_num", Json(step)}});
      }
      if (every > 0 && epoch % every == 0 && !reached) {
        // Inside the timed region, so logged as the reference logs it.
        const MlperfLog::Metadata at = {{"epoch_num", Json(epoch)}, {"step_num", Json(step)}};
        log_.start("save_start", Json(), at);
        save(epoch, step);
        log_.end("save_stop", Json(), at);
        last_saved = epoch;
        // Rank 0 saves while the others wait here, not in the vote below: a
        // signal that reaches them meanwhile is in their vote, and the run
        // stops before the next epoch as it does for a signal to rank 0.
        comm_.world().barrier();
      }
      // A signal during the validation or the checkpoint: the epoch is whole
      // (and saved where due); the next does not start.
      if (!reached && epoch < max_epochs) {
        if (const int sig = agreed_stop_signal()) return stop_signalled(sig, epoch, step, /*in_epoch=*/false);
      }
    }
    comm_.world().barrier();
    log_.end("run_stop", Json(), {{"status", Json(reached ? "success" : "aborted")}, {"epoch_num", Json(epoch)}});
    run_stopped_ = true;
    const double time_to_train = seconds_since(run_started_);
    // After run_stop, outside the timed region, as the reference saves.
    if (every >= 0 && last_saved != epoch) save(epoch, step);
    if (comm_.rank() == 0) {
      if (const int sig = stop_requested()) {
        std::fprintf(stderr, "deepcam-host: %s came during the last epoch's validation or checkpoint: the run had "
                     "ended, and its outcome stands\n", strsignal(sig));
      }
      std::fprintf(stderr, "deepcam-host: %s after %lld epoch%s; time to train (run_start to run_stop) %.1f s\n",
                   reached ? "target reached" : "target NOT reached", static_cast<long long>(epoch),
                   epoch == 1 ? "" : "s", time_to_train);
      if (synced_steps_ > 0 && device_.is_cuda()) {
        // ProcessGroupNCCL's wait only makes the GPU's stream wait: the host
        // time around it says nothing of the all-reduce.
        std::fprintf(stderr,
                     "deepcam-host: gradient all-reduce over %d ranks through NCCL (%zu buckets): the GPU waits for "
                     "it on its own stream, not timed on the host\n",
                     comm_.size(), gradients_->bucket_count());
      } else if (synced_steps_ > 0) {
        std::fprintf(stderr,
                     "deepcam-host: gradient all-reduce over %d ranks: %.3f ms waited per optimizer step "
                     "(%lld steps, %zu buckets)\n",
                     comm_.size(), 1e3 * allreduce_wait_s_ / static_cast<double>(synced_steps_),
                     static_cast<long long>(synced_steps_), gradients_->bucket_count());
      }
    }
    return reached ? 0 : 1;
  }

  // --benchmark: `steps` training steps on one synthetic batch that stays on
  // the device (the reader only gives the sample shape), after warm-up; one
  // JSON line on rank 0. The step time includes waiting for the device.
  int benchmark(std::int64_t steps) {
    note_unused_resume("--benchmark times steps from the model's initial weights");
    const Params& run = cfg_.run;
    const std::int64_t k = run.integer("gradient_accumulation_frequency");
    const std::int64_t batch = run.integer("train_batch_size");
    const std::vector<std::int64_t>& shape = sample_shape_;  // (C, H, W)
    auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<std::uint64_t>(run.integer("seed")));
    const at::Tensor input =
        at::randn({batch, shape[0], shape[1], shape[2]}, gen).to(device_).contiguous(memory_format_);
    const at::Tensor labels = at::randint(0, 3, {batch, shape[1], shape[2]}, gen).to(device_);
    c_.model->module().train();
    divergence_.reset(device_, 0);
    at::Tensor logits, loss;
    double lr = 0;
    constexpr std::int64_t kWarmup = 5;
    std::vector<double> times;
    // The peak covers the warm-up too: a graphed step allocates only while
    // it is captured (from the graph's own pool), never when replayed, and
    // the first steps' cuDNN autotuning is part of what a run needs.
    reset_peak_memory(device_);
    for (std::int64_t s = 0; s < kWarmup + steps; ++s) {
      const auto t0 = Clock::now();
      train_step(input, labels, s, k, logits, loss, lr);
      if (device_.is_cuda()) synchronize_device();
      if (s >= kWarmup) times.push_back(seconds_since(t0));
    }
    // A benchmark of NaNs measures nothing: a diverged run, as in training.
    const auto [code, value] = divergence_.record();
    if (code >= 0) {
      if (comm_.rank() == 0) {
        std::fprintf(stderr,
                     "deepcam-host: --benchmark: training diverged on the synthetic batch at step %lld (%s), so "
                     "nothing was measured; lower [optimizer] lr\n",
                     static_cast<long long>(code) / 2 + 1, python_float_repr(value).c_str());
      }
      return kDivergedStatus;
    }
    const double total = std::accumulate(times.begin(), times.end(), 0.0);
    std::vector<double> sorted = times;
    std::sort(sorted.begin(), sorted.end());
    // Interpolated between the two nearest steps, as numpy.percentile's default.
    auto percentile = [&](double q) {
      const double at = q * static_cast<double>(sorted.size() - 1);
      const std::size_t below = static_cast<std::size_t>(at);
      const std::size_t above = std::min(below + 1, sorted.size() - 1);
      return sorted[below] + (at - static_cast<double>(below)) * (sorted[above] - sorted[below]);
    };
    comm_.world().barrier();
    // The figures are in: a signal from here on is recorded, not the end of
    // the process by end_benchmark, which would lose the line still in
    // stdout's buffer (flushed by the program's end) and call it "before its
    // figures".
    record_stop_signals_from_now();
    if (comm_.rank() == 0) {
      const Json line = Json::object({
          {"samples_per_s", Json(static_cast<double>(steps * batch * comm_.size()) / total)},
          {"step_ms_p50", Json(1e3 * percentile(0.5))},
          {"step_ms_p90", Json(1e3 * percentile(0.9))},
          {"peak_memory_mb", Json(peak_memory_mb(device_))},
          {"memory_measured", Json(device_.is_cuda() ? "device (CUDA caching allocator peak)" : "host (peak RSS)")},
          {"device", Json(device_.str())},
          {"precision", Json(run.string("precision"))},
          {"memory_format", Json(run.string("memory_format"))},
          {"cuda_graphs", Json(cuda_graphs_)},
          {"local_batch", Json(batch)},
          {"ranks", Json(comm_.size())},
          {"steps", Json(steps)},
          {"sample_shape", Json::list({Json(shape[0]), Json(shape[1]), Json(shape[2])})},
      });
      // Flushed by the program's end (stdout_written), which keeps the cause
      // of a failed write.
      std::printf("%s\n", line.dump().c_str());
    }
    return 0;
  }

  // --predict: the validation samples' predictions as .npy and pictures.
  // `before_writing` runs once, before the first file is written.
  int write_predictions(const std::string& checkpoint, const fs::path& out, std::int64_t max_samples,
                        const std::function<void()>& before_writing) {
    note_unused_resume("--predict reads " + checkpoint);
    // TMQ (integrated water vapour) is channel 0 of the CAM5 files, as in
    // the reference data set's variable list; the picture is drawn over it,
    // or over the first channel the model reads when it reads no TMQ (the
    // model, trained on those channels, cannot take another).
    const std::vector<std::int64_t>& channels = cfg_.data.integers("channels");
    const auto tmq = std::find(channels.begin(), channels.end(), 0);
    const std::int64_t background_at = tmq == channels.end() ? 0 : tmq - channels.begin();
    const std::int64_t background_channel = channels[static_cast<std::size_t>(background_at)];
    const std::string background_name = kChannelNames[static_cast<std::size_t>(background_channel)];
    if (tmq == channels.end() && comm_.rank() == 0) {
      std::fprintf(stderr,
                   "deepcam-host: note: %s selects no TMQ (channel 0): the pictures show channel %lld (%s), the "
                   "first it selects, in grey\n",
                   cfg_.data.setting("channels").c_str(), static_cast<long long>(background_channel),
                   background_name.c_str());
    }
    LoadOptions lo;
    lo.model = model_config();
    note_other_model_settings(checkpoint, load_checkpoint(checkpoint, c_.model->module(), nullptr, lo));
    std::error_code ec;
    fs::create_directories(out, ec);
    if (ec || !fs::is_directory(out, ec)) {
      throw Error(fmt::format("--out {}: cannot create the folder{}", out.string(), ec ? ": " + ec.message() : ""));
    }
    c_.model->module().eval();
    at::NoGradGuard no_grad;
    in_plugin(cfg_.reader, [&] { c_.reader->start_epoch(Split::Validation, 0); });
    Batch batch;
    std::int64_t written = 0, batches = 0;
    int stop_signal = 0;
    while ((max_samples == 0 || written < max_samples) && (stop_signal = stop_requested()) == 0 &&
           in_plugin(cfg_.reader, [&] { return c_.reader->next(batch); })) {
      check_batch(batch, Split::Validation, batches++, cfg_.run.integer("validation_batch_size"), /*full=*/false);
      const at::Tensor logits = forward(batch.data.to(device_).contiguous(memory_format_));
      const at::Tensor predicted = predict(logits).to(at::kCPU).contiguous();
      // A reader may hand its batches over on the device (prefetch on CUDA).
      const at::Tensor labels = batch.labels.to(at::kCPU).contiguous();
      for (std::int64_t i = 0; i < predicted.size(0) && (max_samples == 0 || written < max_samples); ++i) {
        // As --evaluate: non-finite logits (a diverged or damaged
        // checkpoint) predict nothing; their argmax would be class 0.
        if (!at::isfinite(logits[i]).all().item<bool>()) {
          std::fprintf(stderr,
                       "deepcam-host: --predict %s: the logits of validation sample %lld are not finite: this "
                       "checkpoint's weights give non-finite logits (a diverged or damaged checkpoint), so it "
                       "predicts nothing; wrote the predictions of the %lld samples before it to %s\n",
                       checkpoint.c_str(), static_cast<long long>(written), static_cast<long long>(written),
                       out.string().c_str());
          return kDivergedStatus;
        }
        if (written == 0) before_writing();
        const std::int64_t height = predicted.size(1), width = predicted.size(2);
        const fs::path stem = out / fmt::format("sample-{:06d}", written);
        npy::write(stem.string() + ".npy", npy::DType::UInt8, {height, width}, predicted[i].data_ptr<std::uint8_t>());
        const at::Tensor background = batch.data[i][background_at].to(at::kCPU).contiguous();
        try {
          write_png(stem.string() + ".png",
                    prediction_picture(background.data_ptr<float>(), predicted[i].data_ptr<std::uint8_t>(),
                                       labels[i].data_ptr<std::int64_t>(), height, width, background_name));
        } catch (const Error& e) {
          // A sample's two files or none (a full disk): its .npy goes too.
          std::error_code rm;
          fs::remove(stem.string() + ".npy", rm);
          throw Error(fmt::format("{} ({}.npy, written before it, is removed; the {} samples before it are in {})",
                                  e.what(), stem.filename().string(), written, out.string()));
        }
        ++written;
      }
    }
    if (stop_signal != 0) {
      std::fprintf(stderr, "deepcam-host: --predict stopped by %s: wrote the predictions of the first %lld validation "
                   "samples to %s\n", strsignal(stop_signal), static_cast<long long>(written), out.string().c_str());
      return 128 + stop_signal;
    }
    const std::string all_there_are =
        max_samples > written
            ? fmt::format(", all the validation split holds (--samples {} asked for more)", max_samples)
            : "";
    std::fprintf(stderr, "deepcam-host: wrote the predictions of %lld validation sample%s%s to %s\n",
                 static_cast<long long>(written), written == 1 ? "" : "s", all_there_are.c_str(),
                 out.string().c_str());
    return 0;
  }

  // A run whose batches, all its epochs together, are fewer than one
  // accumulation makes no optimizer step: its loss never changes. Legal (a
  // test of the input path), but surely not meant. `step` batches were
  // trained before `first_epoch` (a resume).
  void note_no_optimizer_step(std::int64_t step, std::int64_t first_epoch, std::int64_t k) const {
    if (comm_.rank() != 0) return;
    const std::int64_t per_epoch =
        whole_train_batches(c_.reader->local_samples(Split::Train), cfg_.run.integer("train_batch_size"));
    const std::int64_t epochs = cfg_.run.integer("max_epochs") - first_epoch;
    const std::int64_t batches = per_epoch * epochs + step % k;
    if (batches >= k) return;
    const std::string carried =
        step % k == 0 ? "" : fmt::format(", and {} the checkpoint had accumulated", step % k);
    std::fprintf(stderr,
                 "deepcam-host: note: %s is more than the %lld batches this run reads (%lld epoch%s of %lld%s): "
                 "it makes no optimizer step, and the weights stay as they are\n",
                 cfg_.run.setting("gradient_accumulation_frequency").c_str(), static_cast<long long>(batches),
                 static_cast<long long>(epochs), epochs == 1 ? "" : "s", static_cast<long long>(per_epoch),
                 carried.c_str());
  }

  // --evaluate, --predict and --benchmark resume no run: a resume setting
  // is named as unused, not dropped unseen.
  void note_unused_resume(const std::string& why) const {
    if (cfg_.run.string("resume").empty() || comm_.rank() != 0) return;
    std::fprintf(stderr, "deepcam-host: note: %s is not used: %s\n", cfg_.run.setting("resume").c_str(), why.c_str());
  }

  int evaluate(const std::string& checkpoint) {
    note_unused_resume("--evaluate scores " + checkpoint);
    LoadOptions lo;
    lo.model = model_config();
    const CheckpointInfo info = load_checkpoint(checkpoint, c_.model->module(), nullptr, lo);
    note_other_model_settings(checkpoint, info);
    agree_on_resume(info, "--evaluate " + checkpoint);
    broadcast_model();
    const Totals v = validate(info.epoch, info.step, fs::absolute(checkpoint).lexically_normal().string());
    if (v.stop_signal != 0) {
      if (comm_.rank() == 0) {
        std::fprintf(stderr,
                     "deepcam-host: --evaluate %s: stopped by %s%s after %lld of %lld validation batches on rank 0, "
                     "so it has no score\n",
                     checkpoint.c_str(), strsignal(v.stop_signal), stop_receivers().c_str(),
                     static_cast<long long>(v.batches_done),
                     static_cast<long long>(v.batches));
      }
      return 128 + v.stop_signal;
    }
    if (const int sig = stop_requested(); sig != 0 && comm_.rank() == 0) {
      std::fprintf(stderr, "deepcam-host: %s came after the validation had ended: its score stands\n", strsignal(sig));
    }
    const double loss = v.loss_sum / static_cast<double>(v.samples);
    if (!std::isfinite(loss)) {
      // Finite weights can still overflow the logits (a corrupt or diverged
      // checkpoint): the IoU of such logits is no score, so none is printed.
      if (comm_.rank() == 0) {
        std::fprintf(stderr,
                     "deepcam-host: --evaluate %s: the validation loss is %s: this checkpoint's weights give "
                     "non-finite logits (a diverged or damaged checkpoint), so it has no score\n",
                     checkpoint.c_str(), python_float_repr(loss).c_str());
      }
      return 4;
    }
    if (comm_.rank() == 0) {
      std::printf("eval_accuracy %s\neval_loss %s\n",
                  python_float_repr(v.score_sum / static_cast<double>(v.samples)).c_str(),
                  python_float_repr(loss).c_str());
    }
    return 0;
  }

 private:
  // The model under autocast ([run] precision); the logits in float32 for
  // the loss and the metric, as autocast runs cross entropy in float32.
  at::Tensor forward(const at::Tensor& input) {
    at::Tensor logits;
    {
      AutocastGuard autocast(device_.type(), precision_);
      logits = in_plugin(cfg_.model, [&] { return c_.model->forward(input); });
    }
    // The model interface: one logit per class and pixel (checked on the
    // sizes alone, which costs no wait on the device).
    if (!logits.defined() || logits.dim() != 4 || logits.size(0) != input.size(0) || logits.size(1) != kClasses ||
        logits.size(2) != input.size(2) || logits.size(3) != input.size(3) ||
        !at::isFloatingType(logits.scalar_type())) {
      throw std::logic_error(fmt::format(
          "{}: the model plugin '{}' returned logits {} for an input of shape [{}]; the model interface wants "
          "floating-point logits (B, {}, H, W) of the input's B, H and W (a bug in the plugin)",
          cfg_.model.plugin->path, cfg_.model.name, tensor_text(logits), fmt::join(input.sizes(), ", "), kClasses));
    }
    // In training, logits cut off from the parameters (.detach(), a no-grad
    // guard of the model's own) ended the run at backward as LibTorch's
    // "element 0 of tensors does not require grad", naming no plugin.
    if (at::GradMode::is_enabled() && !logits.requires_grad()) {
      throw std::logic_error(fmt::format("{}: the model plugin '{}' returned logits that do not require grad in "
                                         "training (detached from its parameters: a .detach(), a no-grad guard); "
                                         "backward needs them (a bug in the plugin)",
                                         cfg_.model.plugin->path, cfg_.model.name));
    }
    return logits.to(at::kFloat);
  }

  // The optimizer interface's gradient norm: undefined, or a 0-d
  // floating-point tensor on the run's device (checked on its metadata,
  // which costs no wait on the device). Anything else ended the run as
  // LibTorch's broadcast error, naming no plugin.
  void check_gradient_norm(const at::Tensor& norm) const {
    if (!norm.defined() || (norm.dim() == 0 && at::isFloatingType(norm.scalar_type()) && norm.device() == device_)) {
      return;
    }
    throw std::logic_error(fmt::format("{}: the optimizer plugin '{}' returned the gradient norm {} on {}; the "
                                       "optimizer interface wants an undefined tensor or a 0-d floating-point one "
                                       "on the run's device ({}) (a bug in the plugin)",
                                       cfg_.optimizer.plugin->path, cfg_.optimizer.name, tensor_text(norm),
                                       norm.device().str(), device_.str()));
  }

  // What a batch the reader handed out must be (plugin_calls.hpp), on its
  // sizes and dtypes and on its labels' values: ours check each file's.
  // Another label value reached the loss as LibTorch's "Target 7 is out of
  // bounds" on the CPU, and as a device-side assert, which ends the process,
  // on a GPU. The values are checked for every batch on the CPU, where a
  // pass over the labels is small beside the step, and for each pass's
  // first batch on a GPU, where it waits for the device: a reader that
  // encodes its classes otherwise is caught at its first batch.
  void check_batch(const Batch& batch, Split split, std::int64_t index, std::int64_t batch_size, bool full) const {
    const auto channels = static_cast<std::int64_t>(cfg_.data.integers("channels").size());
    deepcam::check_batch(cfg_.reader, batch, split, index, channels, sample_shape_, batch_size, full);
    if (device_.is_cpu() || index == 0) check_classes(cfg_.reader, batch.labels, split, index);
  }

  // A resume takes the optimizer's hyper-parameters from the checkpoint, as
  // PyTorch's load_state_dict does; the log (written before) has the run
  // file's. Where they differ the record would be false, so the resume is
  // refused, naming each value.
  void require_logged_hyperparameters(const std::string& path,
                                      const std::map<std::string, std::string>& logged) const {
    std::vector<std::string> differ;
    for (const auto& [key, value] : logged_hyperparameters(*c_.optimizer)) {
      const auto it = logged.find(key);
      if (it != logged.end() && it->second != value) {
        differ.push_back(fmt::format("{} is {} in the checkpoint, {} in the run", key, value, it->second));
      }
    }
    if (differ.empty()) return;
    throw Error(fmt::format("{}: {}: a resume continues with the checkpoint's optimizer settings (as PyTorch's "
                            "load_state_dict), while the run's log and config.toml record the run file's; set "
                            "those [optimizer] keys to the checkpoint's values, or resume_weights_only = true to "
                            "start the optimizer afresh with the run file's",
                            path, fmt::join(differ, "; ")));
  }

  // A checkpoint whose weights fit this model although the run that wrote it
  // had other [model] settings (output_stride): said, not refused.
  void note_other_model_settings(const std::string& path, const CheckpointInfo& info) const {
    if (comm_.rank() != 0 || info.other_model_settings.empty()) return;
    std::fprintf(stderr,
                 "deepcam-host: note: %s was written by a run with other [model] settings: %s; its weights fit this "
                 "model, which runs as configured\n",
                 path.c_str(), fmt::format("{}", fmt::join(info.other_model_settings, "; ")).c_str());
  }

  // Rank 0's parameters and buffers on every rank.
  void broadcast_model() {
    if (comm_.size() == 1) return;
    std::vector<at::Tensor> state;
    for (const auto& [name, tensor] : state_entries(c_.model->module())) state.push_back(tensor);
    comm_.broadcast_from_rank0(state);
  }

  // Every rank read the same checkpoint (a shared file system) and must
  // resume at the same step and epoch.
  // `where`: what named the file on this rank. `path`, for a resume: the
  // file, whose contents must be rank 0's too. Only the weights come from
  // rank 0; each rank keeps the optimizer state it read, so a node-local or
  // stale copy at the same path made the ranks' models drift apart without
  // a word.
  void agree_on_resume(const CheckpointInfo& info, const std::string& where, const std::string& path = "") {
    if (comm_.size() == 1) return;
    const std::uint64_t fingerprint = path.empty() ? 0 : file_fingerprint(path);
    const at::Tensor mine = at::tensor({info.step, info.epoch, static_cast<std::int64_t>(fingerprint >> 32),
                                        static_cast<std::int64_t>(fingerprint & 0xffffffffu)},
                                       at::kLong);
    const at::Tensor all = comm_.world().all_gather(mine);
    for (int r = 0; r < comm_.size(); ++r) {
      if (!all[r].slice(0, 0, 2).equal(all[0].slice(0, 0, 2))) {
        throw Error(fmt::format("{}: rank {} read step {} epoch {}, rank 0 step {} epoch {}; every rank must see the "
                                "same checkpoint file",
                                where, r, all[r][0].item<std::int64_t>(), all[r][1].item<std::int64_t>(),
                                all[0][0].item<std::int64_t>(), all[0][1].item<std::int64_t>()));
      }
      if (!all[r].equal(all[0])) {
        throw Error(fmt::format("{}: rank {} read a file whose contents differ from rank 0's at that path (both at "
                                "step {} epoch {}: a node-local or stale copy?); every rank must see the same "
                                "checkpoint file",
                                where, r, all[0][0].item<std::int64_t>(), all[0][1].item<std::int64_t>()));
      }
    }
  }

  // A diverged run stops at once: no validation of NaN weights, no
  // checkpoint of them. The log closes the epoch's interval at the step
  // training stopped (`step`, at or after the bad one), with status
  // "aborted" as an interval closed by a failure has it, and ends with
  // run_stop "aborted" (SPEC 8.2), so that it stays a well-formed log.
  // Every rank gets here at the same step: the decision was reduced over
  // ranks.
  int stop_diverged(const Divergence& d, std::int64_t step) {
    comm_.world().barrier();
    log_.end("epoch_stop", Json(),
             {{"epoch_num", Json(d.epoch_num)}, {"step_num", Json(step)}, {"status", Json("aborted")}});
    comm_.world().barrier();
    log_.end("run_stop", Json(), {{"status", Json("aborted")}, {"epoch_num", Json(d.epoch_num)}});
    run_stopped_ = true;
    if (comm_.rank() == 0) {
      // The schedule's keys that can raise the rate above lr (the warm-up's
      // factor, a cosine's floor), as the scheduler plugin has them.
      std::vector<std::string> raising;
      for (const char* key : {"lr_warmup_factor", "eta_min"}) {
        if (cfg_.scheduler.params.has(key)) raising.push_back(fmt::format("[scheduler] {}", key));
      }
      // Under amp_fp16 a forward pass beyond float16's range ends the same
      // way (BatchNorm's statistics go NaN), whatever the rate.
      const std::string fp16 =
          cfg_.run.string("precision") == "amp_fp16"
              ? fmt::format(". Under amp_fp16 ({}) activations beyond float16's largest value (65504) end a run so "
                            "too: amp_bf16 has float32's range",
                            cfg_.run.where("precision"))
              : "";
      // A NaN or infinity in the data makes the loss NaN too, when the
      // reader lets it through.
      const std::string unchecked = unchecked_data(cfg_.reader.params, cfg_.reader.name, cfg_.reader.plugin->path);
      const std::string data =
          std::string(d.what) != "gradient norm" && !unchecked.empty()
              ? fmt::format(". A NaN or infinity in the data ends a run so too, and nothing refuses it here: {}",
                            unchecked)
              : "";
      std::fprintf(stderr,
                   "deepcam-host: training diverged at step %lld (epoch %lld): the %s is %s. The run stops here "
                   "(run_stop status \"aborted\"; no checkpoint written); lower [optimizer] lr%s and run again%s%s\n",
                   static_cast<long long>(d.step_num), static_cast<long long>(d.epoch_num), d.what,
                   python_float_repr(d.value).c_str(),
                   raising.empty() ? ""
                                   : fmt::format(", or the schedule's {} if it raises the rate above lr",
                                                 fmt::join(raising, " or "))
                                         .c_str(),
                   fp16.c_str(), data.c_str());
    }
    return kDivergedStatus;
  }

  // Which checkpoint continues this run, for the message of a run stopped
  // mid-epoch: one saved in the middle of a gradient accumulation on many
  // ranks is refused by resume.
  std::string where_to_resume() const {
    if (last_saved_.empty()) {
      return last_resumable_.empty() ? "this run saved none"
                                     : fmt::format("resume from {}, which it resumed from", last_resumable_);
    }
    if (last_saved_ == last_resumable_) return "resume from the last one saved";
    const std::string why = fmt::format("saved in the middle of a gradient accumulation on {} ranks, which resume "
                                        "refuses", comm_.size());
    if (!last_resumable_.empty()) return fmt::format("resume from {}: the later ones were {}", last_resumable_, why);
    return fmt::format("none it saved can be resumed: each was {}; [run] resume_weights_only = true starts from "
                       "one's weights", why);
  }

  // SIGTERM or SIGINT: every rank stops at the same step (the decision
  // travels with the logging figures), closes the log as a diverged run
  // does, and writes no checkpoint for an epoch it stops in (the last one
  // saved stays). Between epochs (`in_epoch` false), `epoch_num` is the
  // epoch just ended.
  int stop_signalled(int sig, std::int64_t epoch_num, std::int64_t step, bool in_epoch) {
    if (in_epoch) {
      comm_.world().barrier();
      log_.end("epoch_stop", Json(),
               {{"epoch_num", Json(epoch_num)}, {"step_num", Json(step)}, {"status", Json("aborted")}});
    }
    comm_.world().barrier();
    log_.end("run_stop", Json(), {{"status", Json("aborted")}, {"epoch_num", Json(epoch_num)}});
    run_stopped_ = true;
    if (comm_.rank() == 0 && in_epoch) {
      std::fprintf(stderr,
                   "deepcam-host: stopped by %s%s at step %lld (epoch %lld): run_stop status \"aborted\"; no "
                   "checkpoint written for this epoch (%s)\n",
                   strsignal(sig), stop_receivers().c_str(), static_cast<long long>(step),
                   static_cast<long long>(epoch_num), where_to_resume().c_str());
    } else if (comm_.rank() == 0) {
      std::fprintf(stderr,
                   "deepcam-host: stopped by %s%s after epoch %lld (step %lld), before the next: run_stop status "
                   "\"aborted\"\n",
                   strsignal(sig), stop_receivers().c_str(), static_cast<long long>(epoch_num),
                   static_cast<long long>(step));
    }
    return 128 + sig;
  }

  // SIGTERM or SIGINT on any rank (one small all-gather), else 0.
  int agreed_stop_signal() {
    const at::Tensor mine = at::full({1}, static_cast<double>(stop_requested()), at::kDouble);
    return signal_of_ranks(comm_.world().all_gather(mine).view({-1}));
  }

  // The stop signal in the ranks' gathered requests (one per rank): the
  // largest, else 0. Which ranks it came to is kept for the stop message
  // (read only when there is one: this runs at every logging point).
  int signal_of_ranks(const at::Tensor& requests) {
    const int sig = static_cast<int>(requests.max().item<double>());
    if (sig != 0) {
      const at::Tensor each = requests.to(at::kCPU, at::kDouble).contiguous();
      const auto read = each.accessor<double, 1>();
      stop_ranks_.clear();
      for (int r = 0; r < comm_.size(); ++r) {
        if (read[r] != 0) stop_ranks_.push_back(r);
      }
    }
    return sig;
  }

  // Which ranks the stop signal came to (sent_to_text).
  std::string stop_receivers() const { return sent_to_text(stop_ranks_, comm_.size()); }

  // The figures of a logging point, over all ranks: one all-gather of five
  // numbers per rank, where the loss is read from the device anyway. A stop
  // signal travels with them, so that every rank stops at the same step.
  IntervalFigures interval_figures(std::int64_t epoch_num, const at::Tensor& logits, const at::Tensor& labels,
                                   const at::Tensor& loss) {
    at::NoGradGuard no_grad;
    const auto [code, value] = divergence_.record();
    const at::Tensor mine = at::tensor({loss.item<double>(), iou_score(logits, labels), code, value,
                                        static_cast<double>(stop_requested())},
                                       at::kDouble);
    const at::Tensor all = comm_.world().all_gather(mine);  // (P, 5)
    IntervalFigures f{all.select(1, 0).mean().item<double>(), all.select(1, 1).mean().item<double>(), std::nullopt,
                      signal_of_ranks(all.select(1, 4))};
    // The first bad step on any rank (codes order steps), so that every rank
    // stops at the same place with the same message.
    double first = -1, first_value = 0;
    for (int r = 0; r < comm_.size(); ++r) {
      const double c = all[r][2].item<double>();
      if (c >= 0 && (first < 0 || c < first)) {
        first = c;
        first_value = all[r][3].item<double>();
      }
    }
    f.diverged = DivergenceWatch::decode(first, first_value, epoch_num);
    return f;
  }

  // One batch: forward, loss, backward, and every k-th batch the gradient
  // The schedule's rate for optimizer step `update`: a finite number >= 0,
  // else the scheduler plugin is at fault (an internal error naming its file,
  // not a run that trains backwards or ends as "diverged").
  double scheduled_lr(std::int64_t update) {
    const double lr = in_plugin(cfg_.scheduler, [&] { return c_.scheduler->lr_at(update); });
    if (!(std::isfinite(lr) && lr >= 0.0)) {
      throw std::logic_error(fmt::format("{}: a bug in the plugin: the scheduler gave the learning rate {} for "
                                         "optimizer step {}",
                                         cfg_.scheduler.plugin->path, lr, update));
    }
    return lr;
  }

  // all-reduce, unscaling, the watch and the optimizer step with the
  // schedule's learning rate. `step` counts batches from 0. Reads nothing
  // back from the device but for a float16 skip decision.
  void train_step(const at::Tensor& input, const at::Tensor& labels, std::int64_t step, std::int64_t k,
                  at::Tensor& logits, at::Tensor& loss, double& current_lr) {
    const bool update = (step + 1) % k == 0;
    if (update) {
      // Written to the device here, outside any captured step, for the
      // optimizers that read it there.
      current_lr = scheduled_lr(step / k);
      in_plugin(cfg_.optimizer, [&] { c_.optimizer->set_lr(current_lr); });
    }
#if DEEPCAM_WITH_CUDA
    if (cuda_graphs_) {
      graphed_step(input, labels, logits, loss);
      return;
    }
#endif
    run_batch(input, labels, update, k, logits, loss);
    if (update) in_plugin(cfg_.optimizer, [&] { c_.optimizer->zero_grad(); });
  }

  // The device work of one batch (what a CUDA graph captures): forward, loss,
  // backward, the watch, and when `update`, the gradient all-reduce,
  // unscaling and the optimizer step.
  void run_batch(const at::Tensor& input, const at::Tensor& labels, bool update, std::int64_t k, at::Tensor& logits,
                 at::Tensor& loss) {
    // Only the backward pass of the batch that updates the weights is
    // all-reduced; the others accumulate on this rank.
    if (gradients_ && update) gradients_->arm();
    logits = forward(input);
    loss = weighted_cross_entropy(logits, labels) / static_cast<double>(k);
    (scaler_ ? scaler_->scale(loss) : loss).backward();
    divergence_.loss(loss);
    if (update) {
      if (gradients_) {
        allreduce_wait_s_ += gradients_->finish();
        ++synced_steps_;
      }
      // Unscaled before anything reads the gradients (LAMB's clipping, the
      // watch). The same on every rank: the gradients are all-reduced.
      const at::Tensor found_inf = scaler_ ? scaler_->unscale(parameters_) : at::Tensor();
      // Before the update: the accumulated gradient of these k batches. An
      // optimizer that computes the norm itself (LAMB) is asked for it
      // instead, once its first step has shown that it does.
      if (!optimizer_reports_norm_) divergence_.gradients(parameters_, found_inf);
      // As GradScaler.step: a step with non-finite gradients is skipped (its
      // decision reads the device, as PyTorch's does), and is not divergence.
      if (!scaler_ || found_inf.item<float>() == 0.0f) {
        in_plugin(cfg_.optimizer, [&] { c_.optimizer->step(); });
        const at::Tensor norm = in_plugin(cfg_.optimizer, [&] { return c_.optimizer->gradient_norm(); });
        check_gradient_norm(norm);
        if (norm.defined() && optimizer_reports_norm_) divergence_.gradient_norm(norm);
        optimizer_reports_norm_ = optimizer_reports_norm_ || norm.defined();
      }
      if (scaler_) scaler_->update(found_inf);
    }
    divergence_.next_batch();
  }

#if DEEPCAM_WITH_CUDA
  // [run] cuda_graphs (k = 1, no loss scaler: see
  // refuse_what_graphs_cannot_capture): kEagerSteps eager steps on the
  // graph's side stream (cuDNN's autotuning, the optimizer's state and
  // device scalars, the LAMB norm decision all happen there), then the
  // next step is captured with the gradients unset, so that backward
  // allocates them in the graph's memory and every replay overwrites them
  // (zero_grad is never called again). The schedule's learning rate went to
  // the device in train_step, before the step. On many ranks the eager
  // steps also create NCCL's communicator, and the capture takes in the
  // bucketed all-reduce (and SyncBN's collectives): every rank captures the
  // same sequence, and every replay runs it.
  void graphed_step(const at::Tensor& input, const at::Tensor& labels, at::Tensor& logits, at::Tensor& loss) {
    constexpr int kEagerSteps = 3;  // as PyTorch's whole-network capture example warms up
    if (!graph_) graph_ = std::make_unique<StepGraph>(device_);
    StepGraph& graph = *graph_;
    graph.load(input, labels);
    if (graph.captured()) {
      graph.replay();
      in_plugin(cfg_.optimizer, [&] { c_.optimizer->replayed(); });
      logits = graph_logits_;
      loss = graph_loss_;
      return;
    }
    if (graph_eager_steps_ < kEagerSteps) {
      graph.run_eager([&] {
        run_batch(graph.input(), graph.labels(), true, 1, logits, loss);
        in_plugin(cfg_.optimizer, [&] { c_.optimizer->zero_grad(); });
      });
      ++graph_eager_steps_;
      return;
    }
    const auto refuse_unless_capturable = [&] {
      if (in_plugin(cfg_.optimizer, [&] { return c_.optimizer->capturable(); })) return;
      throw Error(fmt::format("{}: the {} optimizer's step cannot be captured in a CUDA graph (it computes with "
                              "host numbers, or its parameters are not float32 CUDA tensors); set cuda_graphs = false",
                              cfg_.run.setting("cuda_graphs"), cfg_.optimizer.name));
    };
    refuse_unless_capturable();
    try {
      // The captured step() counts itself on the host as it is captured, and
      // capture() replays it once: no replayed() for this step.
      const LibTorchErrorsPass capture_names_its_failure;
      graph.capture([&] { run_batch(graph.input(), graph.labels(), true, 1, logits, loss); });
    } catch (const c10::Error& e) {
      throw Error(fmt::format("{}: capturing the training step in a CUDA graph failed ({}); a model, loss or "
                              "optimizer that waits for the device cannot be captured: set cuda_graphs = false",
                              cfg_.run.setting("cuda_graphs"), e.what_without_backtrace()));
    }
    // Also the captured step itself: one that left the device path would
    // have fixed its host numbers (the rate) into every replay.
    refuse_unless_capturable();
    graph_logits_ = logits;
    graph_loss_ = loss;
  }
#endif

  // Trains one epoch; stops early, with `diverged` set, at the first check
  // that finds a NaN or infinite loss or gradient norm.
  std::int64_t train_epoch(std::int64_t epoch, std::int64_t step, std::optional<Divergence>& diverged,
                           int& stop_signal) {
    const Params& run = cfg_.run;
    const std::int64_t k = run.integer("gradient_accumulation_frequency");
    const std::int64_t batch_size = run.integer("train_batch_size");
    const std::int64_t frequency = run.integer("logging_frequency");
    const std::int64_t epoch_num = epoch + 1;
    // The reference's DataLoader drops the last incomplete training batch.
    const std::int64_t batches = whole_train_batches(c_.reader->local_samples(Split::Train), batch_size);

    c_.model->module().train();
    in_plugin(cfg_.reader, [&] { c_.reader->start_epoch(Split::Train, epoch); });
    Batch batch;
    at::Tensor logits, labels, loss;
    double current_lr = scheduled_lr(step / k);
    const auto t0 = Clock::now();
    std::int64_t done = 0;
    while (done < batches && in_plugin(cfg_.reader, [&] { return c_.reader->next(batch); })) {
      check_batch(batch, Split::Train, done, batch_size, /*full=*/true);
      const at::Tensor input = batch.data.to(device_, /*non_blocking=*/true).contiguous(memory_format_);
      labels = batch.labels.to(device_, /*non_blocking=*/true);
      train_step(input, labels, step, k, logits, loss, current_lr);
      steps_trained_ = ++step;
      ++done;
      if (frequency > 0 && step % frequency == 0) {
        // The loss is read here anyway; reading the watch costs no extra wait.
        const IntervalFigures f = interval_figures(epoch_num, logits, labels, loss);
        if ((diverged = f.diverged)) return step;
        log_train(epoch_num, step, current_lr, f);
        progress(epoch_num, done, batches, batch_size, t0, f, k);
        last_progress_ = Clock::now();
        if ((stop_signal = f.stop_signal)) return step;
      } else if (comm_.size() == 1 && (stop_signal = stop_requested())) {
        // One rank stops at the next step; many ranks agree at logging points.
        return step;
      } else if (progress_due()) {
        // A long interval still shows signs of life: rank 0's own last batch
        // (read from the device at most once per progress_seconds).
        at::NoGradGuard no_grad;
        progress(epoch_num, done, batches, batch_size, t0,
                 IntervalFigures{loss.item<double>(), iou_score(logits, labels), std::nullopt, 0}, k);
      }
    }
    if (batches == 0) {
      throw Error(fmt::format("{}: no complete training batch of {} samples on this rank ({} samples)",
                              cfg_.data.string("root"), batch_size, c_.reader->local_samples(Split::Train)));
    }
    if (done < batches) {
      throw std::logic_error(fmt::format("{}: the reader plugin '{}' ended training epoch {} after {} of the {} "
                                         "batches its local_samples ({}) make (a bug in the plugin)",
                                         cfg_.reader.plugin->path, cfg_.reader.name, epoch_num, done, batches,
                                         c_.reader->local_samples(Split::Train)));
    }
    // Every step of the epoch is checked before its weights are validated:
    // a last step at a logging point was checked, and logged, there.
    if (frequency > 0 && step % frequency == 0) return step;
    const IntervalFigures f = interval_figures(epoch_num, logits, labels, loss);
    if ((diverged = f.diverged)) return step;
    log_train(epoch_num, step, current_lr, f);
    stop_signal = f.stop_signal;
    return step;
  }

  void log_train(std::int64_t epoch_num, std::int64_t step, double lr, const IntervalFigures& f) {
    const MlperfLog::Metadata md = {{"epoch_num", Json(epoch_num)}, {"step_num", Json(step)}};
    log_.event("learning_rate", Json(lr), md);
    log_.event("train_accuracy", Json(f.iou), md);
    // The reference logs the loss as scaled for accumulation.
    log_.event("train_loss", Json(f.loss), md);
  }

  // On rank 0, when [run] progress_seconds have passed since the last
  // progress line (0: never by time); counts the line as printed.
  bool progress_due() {
    const double every = cfg_.run.number("progress_seconds");
    if (comm_.rank() != 0 || every <= 0 || seconds_since(last_progress_) < every) return false;
    last_progress_ = Clock::now();
    return true;
  }

  void progress(std::int64_t epoch_num, std::int64_t done, std::int64_t batches, std::int64_t batch_size,
                Clock::time_point t0, const IntervalFigures& f, std::int64_t k) {
    if (comm_.rank() != 0) return;
    const double elapsed = seconds_since(t0);
    const double rate = static_cast<double>(done * batch_size * comm_.size()) / elapsed;
    const double left = elapsed / static_cast<double>(done) * static_cast<double>(batches - done);
    std::fprintf(stderr, "epoch %lld step %lld/%lld  loss %.4f  iou %.4f  %.2f samples/s  %02d:%02d left in epoch\n",
                 static_cast<long long>(epoch_num), static_cast<long long>(done), static_cast<long long>(batches),
                 f.loss * static_cast<double>(k), f.iou, rate, static_cast<int>(left) / 60,
                 static_cast<int>(left) % 60);
  }

  // SPEC 4.3 over all ranks. Each sample's score and loss are gathered from
  // every rank and summed in ascending order, so that the figures depend
  // only on the set of samples, not on how the ranks divided it: P ranks
  // give exactly one rank's figures.
  // `checkpoint`: the file --evaluate scores, named in eval_start's metadata.
  // With a `checkpoint` (--evaluate), SIGTERM or SIGINT ends the scoring
  // between batches; in training a signal waits for the epoch's end.
  Totals validate(std::int64_t epoch_num, std::int64_t step, const std::string& checkpoint = "") {
    const bool stoppable = !checkpoint.empty();
    const MlperfLog::Metadata md = {{"epoch_num", Json(epoch_num)}, {"step_num", Json(step)}};
    MlperfLog::Metadata start_md = md;
    if (!checkpoint.empty()) start_md.emplace_back("checkpoint", Json(checkpoint));
    log_.start("eval_start", Json(), start_md);
    c_.model->module().eval();
    at::NoGradGuard no_grad;
    in_plugin(cfg_.reader, [&] { c_.reader->start_epoch(Split::Validation, 0); });
    std::vector<at::Tensor> scores, losses;
    Batch batch;
    const std::int64_t vbatch = cfg_.run.integer("validation_batch_size");
    const std::int64_t vbatches = (c_.reader->local_samples(Split::Validation) + vbatch - 1) / vbatch;
    std::int64_t vdone = 0, vsamples = 0;
    while (!(stoppable && stop_requested() != 0) && in_plugin(cfg_.reader, [&] { return c_.reader->next(batch); })) {
      check_batch(batch, Split::Validation, vdone, vbatch, /*full=*/false);
      vsamples += batch.data.size(0);
      if (progress_due()) {
        std::fprintf(stderr, "epoch %lld validation: batch %lld/%lld on rank 0\n", static_cast<long long>(epoch_num),
                     static_cast<long long>(vdone), static_cast<long long>(vbatches));
      }
      ++vdone;
      const at::Tensor input = batch.data.to(device_).contiguous(memory_format_);
      const at::Tensor labels = batch.labels.to(device_);
      const at::Tensor logits = forward(input);
      scores.push_back(iou_per_sample(logits, labels).to(at::kCPU, at::kDouble));
      for (std::int64_t i = 0; i < input.size(0); ++i) {
        losses.push_back(
            weighted_cross_entropy(logits.narrow(0, i, 1), labels.narrow(0, i, 1)).to(at::kCPU, at::kDouble).view({1}));
      }
    }
    if (stoppable) {
      // Every rank takes part, whether it stopped or ran out of batches.
      if (const int sig = agreed_stop_signal()) {
        Totals stopped;
        stopped.stop_signal = sig;
        stopped.batches_done = vdone;
        stopped.batches = vbatches;
        return stopped;
      }
    }
    if (vsamples != c_.reader->local_samples(Split::Validation)) {
      throw std::logic_error(fmt::format("{}: the reader plugin '{}' handed out {} validation samples, and its "
                                         "local_samples says {} (a bug in the plugin)",
                                         cfg_.reader.plugin->path, cfg_.reader.name, vsamples,
                                         c_.reader->local_samples(Split::Validation)));
    }
    const at::Tensor mine = scores.empty() ? at::empty({0, 2}, at::kDouble)
                                           : at::stack({at::cat(scores), at::cat(losses)}, 1);  // (n, 2)
    const at::Tensor all = gather_rows(mine);
    Totals t;
    t.samples = all.size(0);
    if (t.samples == 0) throw Error(fmt::format("{}: no validation samples", cfg_.data.string("root")));
    t.score_sum = std::get<0>(all.select(1, 0).sort()).sum().item<double>();
    t.loss_sum = std::get<0>(all.select(1, 1).sort()).sum().item<double>();
    const double loss = t.loss_sum / static_cast<double>(t.samples);
    // The IoU of non-finite logits (their argmax) is no score: NaN in the
    // log, which no checker counts as reaching the target.
    const double accuracy = std::isfinite(loss) ? t.score_sum / static_cast<double>(t.samples)
                                                : std::numeric_limits<double>::quiet_NaN();
    log_.event("eval_accuracy", Json(accuracy), md);
    log_.event("eval_loss", Json(loss), md);
    log_.end("eval_stop", Json(), md);
    if (comm_.rank() == 0) {
      std::fprintf(stderr, "epoch %lld validation: iou %.4f  loss %.4f  (%lld samples)\n",
                   static_cast<long long>(epoch_num), accuracy, loss, static_cast<long long>(t.samples));
    }
    return t;
  }

  // Every rank's rows (n_r, w) of float64 together, in rank order.
  at::Tensor gather_rows(const at::Tensor& mine) {
    if (comm_.size() == 1) return mine;
    const at::Tensor counts = comm_.world().all_gather(at::tensor({mine.size(0)}, at::kLong));
    const std::int64_t most = counts.max().item<std::int64_t>();
    at::Tensor padded = at::zeros({most, mine.size(1)}, at::kDouble);
    padded.narrow(0, 0, mine.size(0)).copy_(mine);
    const at::Tensor all = comm_.world().all_gather(padded);  // (P, most, w)
    std::vector<at::Tensor> rows;
    for (int r = 0; r < comm_.size(); ++r) rows.push_back(all[r].narrow(0, 0, counts[r][0].item<std::int64_t>()));
    return at::cat(rows);
  }

  void save(std::int64_t epoch, std::int64_t step) {
    const std::int64_t k = cfg_.run.integer("gradient_accumulation_frequency");
    const bool partial = step % k != 0;
    if (comm_.rank() != 0) return;
    const std::string path =
        (fs::path(cfg_.run.string("output_dir")) / fmt::format("checkpoint-epoch{}.pt", epoch)).string();
    CheckpointInfo info;
    info.step = step;
    info.epoch = epoch;
    info.gradient_accumulation_frequency = k;
    info.world_size = comm_.size();
    info.train_batch_size = cfg_.run.integer("train_batch_size");
    info.seed = cfg_.run.integer("seed");
    if (scaler_) info.scaler = scaler_->state();
    if (partial && comm_.size() == 1) {
      // The gradient of the batches since the last optimizer step, which an
      // uninterrupted run carries into the next epoch.
      for (const auto& p : c_.model->module().named_parameters()) {
        if (p.value().grad().defined()) info.accumulated_gradients.emplace_back(p.key(), p.value().grad());
      }
      info.accumulated_batches = step % k;
    } else if (partial) {
      info.partial_accumulation_ranks = comm_.size();
    }
    // The optimizer's state_dict() is a call into its plugin.
    in_plugin(cfg_.optimizer, [&] {
      save_checkpoint(path, info, c_.model->module(), c_.optimizer.object.get(), model_config(), cfg_.optimizer.name);
    });
    std::fprintf(stderr, "deepcam-host: saved %s\n", path.c_str());
    last_saved_ = path;
    if (info.partial_accumulation_ranks == 0) last_resumable_ = path;
    if (info.partial_accumulation_ranks > 0) {
      std::fprintf(stderr,
                   "deepcam-host: note: %s was saved at step %lld, in the middle of a gradient accumulation "
                   "(gradient_accumulation_frequency = %lld) on %d ranks; their partial gradients are not in it, so "
                   "it cannot be resumed exactly (resume refuses it)\n",
                   path.c_str(), static_cast<long long>(step), static_cast<long long>(k), comm_.size());
    }
  }

  ModelConfig model_config() const {
    return ModelConfig{cfg_.model.name, &cfg_.model.params, cfg_.data.integers("channels"),
                       cfg_.data.where("channels")};
  }

  // A resume in another precision than the checkpoint's run trains on, as
  // a change of model settings does, and says what of the loss scaler goes.
  void note_other_precision(const std::string& path, const CheckpointInfo& info) const {
    if (comm_.rank() != 0 || info.scaler.has_value() == (scaler_ != nullptr)) return;
    const std::string key = cfg_.run.setting("precision");
    if (info.scaler) {
      std::fprintf(stderr,
                   "deepcam-host: note: %s was written by an amp_fp16 run; its loss scaler (scale %g) is not used, "
                   "as this run scales no loss (%s)\n",
                   path.c_str(), info.scaler->scale, key.c_str());
    } else {
      std::fprintf(stderr,
                   "deepcam-host: note: %s holds no loss scaler (its run was not amp_fp16); this run (%s) starts "
                   "one afresh at scale %g\n",
                   path.c_str(), key.c_str(), ScalerState{}.scale);
    }
  }

  // The schedule takes optimizer step `step / k`: a resume with another k
  // than the writer's would go on from another point of it (back into the
  // warm-up, or past milestones) while the optimizer's own step count goes
  // on from the steps it took. Refused, but for a weights-only resume, which
  // starts the optimizer afresh and is told where its schedule stands.
  void check_accumulation_frequency(const std::string& path, const CheckpointInfo& info, std::int64_t k,
                                    bool weights_only) {
    const std::int64_t theirs = info.gradient_accumulation_frequency;
    if (theirs == 0 || theirs == k || info.step == 0) return;
    const std::string key = cfg_.run.setting("gradient_accumulation_frequency");
    if (!weights_only) {
      throw Error(fmt::format("{}: written by a run with gradient_accumulation_frequency = {}, after {} optimizer "
                              "steps ({} batches); with {}, the learning-rate schedule would go on from optimizer "
                              "step {}. Resume with gradient_accumulation_frequency = {}, or set [run] "
                              "resume_weights_only = true to start from its weights with a fresh optimizer",
                              path, theirs, info.step / theirs, info.step, key, info.step / k, theirs));
    }
    if (comm_.rank() == 0) {
      std::fprintf(stderr,
                   "deepcam-host: note: %s was written by a run with gradient_accumulation_frequency = %lld, after "
                   "%lld optimizer steps; with %s, the schedule goes on from optimizer step %lld\n",
                   path.c_str(), static_cast<long long>(theirs), static_cast<long long>(info.step / theirs),
                   key.c_str(), static_cast<long long>(info.step / k));
    }
  }

  // Another number of ranks, or another batch per rank, trains on: the
  // global batch (and so each update) changes from the resumed run's, as
  // with PyTorch's DistributedDataParallel; said, not refused.
  void note_other_global_batch(const std::string& path, const CheckpointInfo& info) {
    if (comm_.rank() != 0) return;
    const std::int64_t batch = cfg_.run.integer("train_batch_size");
    const bool other_ranks = info.world_size > 0 && info.world_size != comm_.size();
    const bool other_batch = info.train_batch_size > 0 && info.train_batch_size != batch;
    if (!other_ranks && !other_batch) return;
    // What the file records of them (a file of an earlier version: the ranks alone).
    std::string theirs = info.world_size > 0 ? fmt::format("{} rank{}", info.world_size,
                                                           info.world_size == 1 ? "" : "s")
                                             : "ranks";
    if (info.train_batch_size > 0) theirs += fmt::format(" at a batch of {} each", info.train_batch_size);
    std::fprintf(stderr,
                 "deepcam-host: note: %s was written by a run of %s; this run has %d at a batch of %lld each (%s) "
                 "and trains on at a global batch of %lld sample%s\n",
                 path.c_str(), theirs.c_str(), comm_.size(), static_cast<long long>(batch),
                 cfg_.run.setting("train_batch_size").c_str(), static_cast<long long>(batch * comm_.size()),
                 batch * comm_.size() == 1 ? "" : "s");
  }

  // Another seed trains on, as PyTorch's training scripts would: the model
  // and the optimizer go on from the checkpoint, but each epoch's samples
  // are ordered by this run's seed, not by the one of the run it continues;
  // said, with the setting that continues that run exactly.
  void note_other_seed(const std::string& path, const CheckpointInfo& info) const {
    const std::int64_t seed = cfg_.run.integer("seed");
    if (comm_.rank() != 0 || info.seed == 0 || info.seed == seed) return;
    std::fprintf(stderr,
                 "deepcam-host: note: %s was written by a run of seed %lld; this run's seed is %lld (%s%s), which "
                 "orders its epochs' samples otherwise than that run's: set seed = %lld to continue it exactly\n",
                 path.c_str(), static_cast<long long>(info.seed), static_cast<long long>(seed),
                 cfg_.run.where("seed").c_str(), seed_drawn_ ? ": \"auto\", drawn from the clock" : "",
                 static_cast<long long>(info.seed));
  }

  // A loss scaler of other settings than a fresh one's goes on with them,
  // as torch.amp.GradScaler's load_state_dict takes them; said.
  void note_other_scaler_settings(const std::string& path, const CheckpointInfo& info) const {
    if (comm_.rank() != 0 || !info.scaler || !scaler_) return;
    const ScalerState fresh{};
    const ScalerState& s = *info.scaler;
    if (s.growth_factor == fresh.growth_factor && s.backoff_factor == fresh.backoff_factor &&
        s.growth_interval == fresh.growth_interval) {
      return;
    }
    std::fprintf(stderr,
                 "deepcam-host: note: %s holds a loss scaler with growth_factor %g, backoff_factor %g and "
                 "growth_interval %lld; the run goes on with them, as torch.amp.GradScaler's load_state_dict "
                 "does (a fresh scaler has %g, %g and %lld)\n",
                 path.c_str(), s.growth_factor, s.backoff_factor, static_cast<long long>(s.growth_interval),
                 fresh.growth_factor, fresh.backoff_factor, static_cast<long long>(fresh.growth_interval));
  }

  // A checkpoint taken where gradient_accumulation_frequency does not divide
  // the step holds the gradient accumulated since the last optimizer step;
  // it becomes the parameters' .grad, so that the next update sums the same
  // batches as an uninterrupted run.
  void restore_accumulation(const std::string& path, const CheckpointInfo& info, std::int64_t k, bool weights_only) {
    const std::string key = cfg_.run.setting("gradient_accumulation_frequency");
    if (info.partial_accumulation_ranks > 0 && !weights_only) {
      throw Error(
          fmt::format("{}: saved at step {} in the middle of a gradient accumulation by a run of {} ranks, whose "
                      "partial gradients are not in it; resuming would not continue that run exactly. Resume "
                      "from a checkpoint saved at a step the accumulation divides, or set [run] "
                      "resume_weights_only = true to start from its weights with a fresh optimizer",
                      path, info.step, info.partial_accumulation_ranks));
    }
    if (info.accumulated_gradients.empty()) {
      if (info.step % k != 0 && !weights_only && comm_.rank() == 0) {
        std::fprintf(stderr,
                     "deepcam-host: note: %s was saved at step %lld, which %s does not divide, and holds no "
                     "accumulated gradient (the run that wrote it accumulated over other batches, or it was not "
                     "written by deepcam-host); the first optimizer step after the resume "
                     "sums fewer batches than an uninterrupted run would\n",
                     path.c_str(), static_cast<long long>(info.step), key.c_str());
      }
      return;
    }
    if (info.world_size > 0 && info.world_size != comm_.size()) {
      throw Error(fmt::format("{}: holds a partial gradient ('accumulated_gradients') at step {}, the mean over {} "
                              "rank{}; this run's {} ranks would each add their batches to it, an update no "
                              "uninterrupted run makes. Resume on {} rank{}, or set [run] resume_weights_only = true "
                              "to start from its weights with a fresh optimizer",
                              path, info.step, info.world_size, info.world_size == 1 ? "" : "s", comm_.size(),
                              info.world_size, info.world_size == 1 ? "" : "s"));
    }
    if (const std::int64_t batch = cfg_.run.integer("train_batch_size");
        info.train_batch_size > 0 && info.train_batch_size != batch) {
      throw Error(fmt::format("{}: holds a partial gradient ('accumulated_gradients') at step {}, summed over "
                              "batches of {}; with {}, this run's next update would add batches of {} to it, an "
                              "update no uninterrupted run makes. Resume with train_batch_size = {}, or set [run] "
                              "resume_weights_only = true to start from its weights with a fresh optimizer",
                              path, info.step, info.train_batch_size, cfg_.run.setting("train_batch_size"), batch,
                              info.train_batch_size));
    }
    if (info.step % k == 0) {
      throw Error(fmt::format("{}: holds a partial gradient ('accumulated_gradients') at step {}, but {} divides that "
                              "step; resume with the gradient_accumulation_frequency of the run that wrote it",
                              path, info.step, key));
    }
    // The next update would add k - step % k batches to it: the sum of an
    // uninterrupted run only if it holds step % k.
    if (info.accumulated_batches > 0 && info.accumulated_batches != info.step % k) {
      throw Error(fmt::format("{}: holds a partial gradient ('accumulated_gradients') summing {} batch{} at step {}, "
                              "but with {}, this run's next update would take it for the sum of {}; resume with the "
                              "gradient_accumulation_frequency of the run that wrote it",
                              path, info.accumulated_batches, info.accumulated_batches == 1 ? "" : "es", info.step,
                              key, info.step % k));
    }
    // Under amp_fp16 the partial gradient is the scaled one, and may hold
    // an overflow that the next step skips; in another precision it is the
    // gradient itself, and must be finite.
    if (info.scaler.has_value() != (scaler_ != nullptr)) {
      throw Error(fmt::format("{}: holds a partial gradient ('accumulated_gradients') at step {} written {} loss "
                              "scaling, and this run's precision ({}) {} it; resume with the precision of the run "
                              "that wrote it",
                              path, info.step, info.scaler ? "with amp_fp16's" : "without",
                              cfg_.run.setting("precision"), scaler_ ? "scales" : "does not scale"));
    }
    for (const auto& [name, grad] : info.accumulated_gradients) {
      if (!scaler_ && !at::isfinite(grad).all().item<bool>()) {
        throw Error(fmt::format("{}: 'accumulated_gradients' entry '{}' holds NaN or infinite values", path, name));
      }
    }
    std::map<std::string, at::Tensor> params;
    for (const auto& p : c_.model->module().named_parameters()) params[p.key()] = p.value();
    at::NoGradGuard no_grad;
    for (const auto& [name, grad] : info.accumulated_gradients) {
      at::Tensor& param = params.at(name);
      param.mutable_grad() = at::empty_like(param, at::MemoryFormat::Preserve).copy_(grad);
    }
  }

  const RunConfig& cfg_;
  const bool seed_drawn_;
  MlperfLog& log_;
  Communicator& comm_;
  at::Device device_;
  Components c_;
  std::vector<std::int64_t> sample_shape_;  // the reader's, (C, H, W)
  std::vector<at::Tensor> parameters_;  // the model's, for the gradient norm
  DivergenceWatch divergence_;
  std::int64_t bn_group_size_ = 1;
  Precision precision_ = Precision::Fp32;
  at::MemoryFormat memory_format_ = at::MemoryFormat::Contiguous;
  bool optimizer_reports_norm_ = false;  // Optimizer::gradient_norm() gave one
  std::unique_ptr<GradScaler> scaler_;  // amp_fp16
  bool cuda_graphs_ = false;             // [run] cuda_graphs, for training
#if DEEPCAM_WITH_CUDA
  std::unique_ptr<StepGraph> graph_;
  int graph_eager_steps_ = 0;
  at::Tensor graph_logits_, graph_loss_;  // the captured step's outputs
#endif
  bool run_stopped_ = false;             // run_stop is in the log
  // Rank 0: the checkpoint this run saved last, and the last one a resume
  // takes (saved between accumulations, or the one it resumed from).
  std::string last_saved_, last_resumable_;
  std::vector<int> stop_ranks_;          // the ranks a stop signal came to
  std::int64_t steps_trained_ = 0;       // batches trained, as the log counts steps
  Clock::time_point run_started_{};
  Clock::time_point last_progress_ = Clock::now();
  std::function<void()> on_run_start_;
  std::unique_ptr<GradientAllReduce> gradients_;  // more than one rank
  double allreduce_wait_s_ = 0;
  std::int64_t synced_steps_ = 0;
};

}  // namespace

RankLost::~RankLost() = default;

namespace {

// seed = "auto": rank 0 draws a seed from the clock, as the reference's run
// scripts do, and every rank takes it; the resolved text then records the
// seed that was used, so that the run can be repeated.
RunConfig with_drawn_seed(const RunConfig& cfg, Communicator& comm) {
  const std::int64_t drawn =
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count() % 2147483647 + 1;
  const std::int64_t seed = comm.world().all_gather(at::tensor({drawn}, at::kLong))[0][0].item<std::int64_t>();
  RunConfig out = cfg;
  auto values = cfg.run.values();
  values["seed"] = seed;
  out.run = Params(cfg.run.where(), std::move(values), cfg.run.sources());
  const std::string line = "seed = \"auto\"\n";
  const auto at = out.resolved.find(line);
  if (at != std::string::npos) {
    out.resolved.replace(at, line.size(), fmt::format("seed = {}  # \"auto\": drawn from the clock\n", seed));
  }
  return out;
}

// The resolved configuration as "[section] key = value" lines, comments
// dropped, without the keys that may differ from rank to rank: output_dir
// (only rank 0 writes) and a plugin's library path (a node's own install).
std::map<std::string, std::string> run_defining_values(const std::string& resolved) {
  std::map<std::string, std::string> values;
  std::istringstream lines(resolved);
  std::string line, section;
  while (std::getline(lines, line)) {
    // Up to a '#' outside a string (the writer's strings are JSON's).
    bool quoted = false;
    std::size_t end = line.size();
    for (std::size_t i = 0; i < line.size(); ++i) {
      if (quoted && line[i] == '\\') ++i;
      else if (line[i] == '"') quoted = !quoted;
      else if (!quoted && line[i] == '#') {
        end = i;
        break;
      }
    }
    line.erase(end);
    line.erase(line.find_last_not_of(' ') + 1);  // all of it when it is only spaces
    if (line.empty()) continue;
    if (line.front() == '[') {
      section = line;
      continue;
    }
    const std::size_t eq = line.find(" = ");
    if (eq == std::string::npos) continue;
    const std::string key = line.substr(0, eq);
    if ((section == "[run]" && key == "output_dir") || key == "library") continue;
    values[section + " " + key] = line.substr(eq + 3);
  }
  return values;
}

// What the command line asks of the engine: ranks started with different
// ones would wait in collectives that the others never reach.
std::string command_mode(const EngineOptions& opts) {
  if (opts.benchmark_steps > 0) return fmt::format("--benchmark {}", opts.benchmark_steps);
  if (!opts.evaluate_checkpoint.empty()) return "--evaluate";
  if (!opts.predict_checkpoint.empty()) return "--predict";
  return "training";
}

// Every rank must run the configuration rank 0 runs: ranks started with
// other run files, --set items or modes would train replicas that drift
// apart, or fail later in a collective with no word on why. Refused on
// every rank, naming the first keys that differ. Compared before anything
// else is exchanged (as seed = "auto"'s draw), so that no other collective
// can meet a rank that is not in it.
// Every rank's `text`, in rank order: two all-gathers (the lengths, then
// the bytes padded to the longest).
std::vector<std::string> all_gather_text(Communicator& comm, const std::string& text) {
  const at::Tensor lengths =
      comm.world().all_gather(at::tensor({static_cast<std::int64_t>(text.size())}, at::kLong)).reshape({-1});
  const std::int64_t longest = lengths.max().item<std::int64_t>();
  if (longest == 0) return std::vector<std::string>(static_cast<std::size_t>(comm.size()));
  at::Tensor bytes = at::zeros({longest}, at::kByte);
  std::memcpy(bytes.data_ptr<std::uint8_t>(), text.data(), text.size());
  const at::Tensor all = comm.world().all_gather(bytes);
  std::vector<std::string> texts;
  for (int r = 0; r < comm.size(); ++r) {
    texts.emplace_back(reinterpret_cast<const char*>(all[r].data_ptr<std::uint8_t>()),
                       static_cast<std::size_t>(lengths[r].item<std::int64_t>()));
  }
  return texts;
}

void require_same_configuration(const RunConfig& cfg, const EngineOptions& opts, Communicator& comm) {
  if (comm.size() == 1) return;
  auto values = run_defining_values(cfg.resolved);
  values["[command line] mode"] = command_mode(opts);
  std::string mine;
  for (const auto& [key, value] : values) mine += key + " = " + value + "\n";
  const std::vector<std::string> texts = all_gather_text(comm, mine);
  const std::string& first = texts.front();
  std::vector<std::string> differences;
  auto parse = [](const std::string& text) {
    std::map<std::string, std::string> out;
    std::istringstream in(text);
    for (std::string l; std::getline(in, l);) {
      const std::size_t eq = l.find(" = ");
      out[l.substr(0, eq)] = l.substr(eq + 3);
    }
    return out;
  };
  const auto rank0 = parse(first);
  for (int r = 1; r < comm.size() && differences.size() < 4; ++r) {
    const std::string& text = texts[static_cast<std::size_t>(r)];
    if (text == first) continue;
    const auto other = parse(text);
    std::set<std::string> keys;
    for (const auto& kv : rank0) keys.insert(kv.first);
    for (const auto& kv : other) keys.insert(kv.first);
    for (const std::string& key : keys) {
      const auto a = rank0.find(key), b = other.find(key);
      const std::string there = b == other.end() ? "(none)" : b->second;
      const std::string here = a == rank0.end() ? "(none)" : a->second;
      if (there == here) continue;
      differences.push_back(fmt::format("rank {} has {} = {}, rank 0 {}", r, key, there, here));
      if (differences.size() >= 4) break;
    }
  }
  if (!differences.empty()) {
    throw Error(fmt::format("the ranks were started with different configurations: {}; start every rank with the "
                            "same run files, --set items and mode",
                            fmt::join(differences, "; ")));
  }
}

// An epoch's checkpoint in the output folder (checkpoint-epoch<N>.pt).
bool is_checkpoint_name(const std::string& name) {
  static const std::regex checkpoint(R"(checkpoint-epoch[0-9]+\.pt)");
  return std::regex_match(name, checkpoint);
}

// The resolved configuration beside the log: --evaluate in a training
// run's folder keeps that run's config.toml.
fs::path config_path(const fs::path& out_dir, bool evaluating) {
  return out_dir / (evaluating ? "evaluate-config.toml" : "config.toml");
}

// A folder's absolute path without a trailing separator ("out/" is out),
// with the links of the part that exists resolved; lexically when that
// fails.
fs::path folder_identity(const fs::path& folder) {
  fs::path path = fs::absolute(folder).lexically_normal();
  if (!path.has_filename() && path.has_relative_path()) path = path.parent_path();
  std::error_code ec;
  fs::path resolved = fs::weakly_canonical(path, ec);
  return ec ? path : resolved;
}

// The MLPerf log's name: [mlperf] log_file, relative to the output folder;
// --evaluate writes "evaluate-<name>" beside it.
fs::path log_path(const RunConfig& cfg, const fs::path& out_dir, bool evaluating) {
  const std::string& given = cfg.mlperf.string("log_file");
  const fs::path name(given);
  if (given.empty() || !name.has_filename()) {
    throw Error(fmt::format("{}: names no file", cfg.mlperf.setting("log_file")));
  }
  const fs::path file = evaluating ? name.parent_path() / ("evaluate-" + name.filename().string()) : name;
  const fs::path path = (out_dir / file).lexically_normal();
  // Not a name the run writes in its output folder, however the path gets
  // there (`../out/…`, an absolute path, a link): the log would be lost
  // under a checkpoint renamed over it, or the configuration's rename would
  // fail on the log.
  const std::string leaf = path.filename().string();
  if (leaf == "config.toml" || leaf == "evaluate-config.toml" || is_checkpoint_name(leaf)) {
    // An output folder that does not exist yet keeps the trailing '/' it
    // was given with ("out/"): that compared unequal to "out".
    if (folder_identity(path.parent_path()) == folder_identity(out_dir)) {
      throw Error(fmt::format("{}: {} is a name the run gives {} in its output folder; choose another",
                              cfg.mlperf.setting("log_file"), (out_dir / leaf).string(),
                              is_checkpoint_name(leaf) ? "a checkpoint" : "its resolved configuration"));
    }
  }
  return path;
}

// N of "checkpoint-epochN.pt" (saturated: the name's digits are not bounded).
std::int64_t checkpoint_epoch(const std::string& name) {
  constexpr std::size_t kPrefix = std::char_traits<char>::length("checkpoint-epoch");
  return std::strtoll(name.c_str() + kPrefix, nullptr, 10);
}

// A checkpoint or kept record of an earlier run, under [run] overwrite = true.
void remove_earlier_file(const RunConfig& cfg, const fs::path& path) {
  std::error_code rm;
  fs::remove(path, rm);
  if (rm) {
    throw Error(fmt::format("{}: cannot remove {}: {}", cfg.run.setting("overwrite"), path.string(), rm.message()));
  }
  const std::string name = path.filename().string();
  std::fprintf(stderr, "deepcam-host: [run] overwrite = true: removed %s, %s\n", path.string().c_str(),
               is_checkpoint_name(name)             ? "a checkpoint of the earlier run"
               : name.rfind("evaluate-", 0) == 0 ? "the record of an --evaluate of its checkpoints"
                                                 : "the record of the earlier run");
}

// Why no file can be made in the folder `dir` (the system's words), or ""
// when one can: a file that only this process can have made, removed at once.
std::string cannot_write_in(const fs::path& dir) {
  const fs::path probe = dir / fmt::format(".deepcam-write-test.tmp-{}", ::getpid());
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return std::strerror(errno);
  ::close(fd);
  ::unlink(probe.c_str());
  return "";
}

// --predict's --out, checked before the checkpoint is read: a folder that
// can be written, or one that can be made where the nearest existing
// folder above it can be written.
void check_predict_out(const fs::path& out) {
  std::error_code ec;
  fs::path existing = out;
  while (!existing.empty() && !fs::exists(fs::symlink_status(existing, ec)) && existing != existing.parent_path()) {
    existing = existing.parent_path();
  }
  if (existing.empty()) existing = ".";
  if (!fs::is_directory(existing, ec)) {
    throw Error(fmt::format("--out {}: cannot create the folder: {} is not a folder", out.string(),
                            existing.string()));
  }
  if (const std::string why = cannot_write_in(existing); !why.empty()) {
    throw Error(fmt::format("--out {}: cannot write in {}: {}", out.string(), existing.string(), why));
  }
}

// A --predict file: sample-<digits>.npy or .png.
bool is_prediction_name(const std::string& name) {
  const std::string stem = "sample-";
  if (name.size() <= stem.size() + 4 || name.compare(0, stem.size(), stem) != 0) return false;
  const std::string ext = name.substr(name.size() - 4);
  if (ext != ".npy" && ext != ".png") return false;
  const std::string digits = name.substr(stem.size(), name.size() - stem.size() - 4);
  return std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// An earlier --predict's files in `out` would mix with this one's (another
// checkpoint, fewer samples) with nothing to tell them apart: refused, or
// with [run] overwrite = true their names, to be removed before this run
// writes its first (remove_earlier_predictions).
std::vector<std::string> earlier_predictions(const RunConfig& cfg, const fs::path& out) {
  std::vector<std::string> earlier;
  std::error_code ec;
  for (fs::directory_iterator it(out, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (!is_prediction_name(name)) continue;
    // A folder under a prediction's name is no earlier prediction, and
    // overwrite would not remove it.
    std::error_code kind;
    if (!it->is_regular_file(kind) && !it->is_symlink(kind)) {
      throw Error(fmt::format("--out {}: {} is not a file, and a prediction would be written under its name; "
                              "remove it, or choose another --out",
                              out.string(), name));
    }
    earlier.push_back(name);
  }
  if (earlier.empty()) return earlier;
  std::sort(earlier.begin(), earlier.end());
  if (!cfg.run.boolean("overwrite")) {
    const std::string more = earlier.size() > 1 ? fmt::format(" and {} more", earlier.size() - 1) : "";
    throw Error(fmt::format("--out {}: holds the files of an earlier --predict ({}{}), which this one's would mix "
                            "with; choose another --out, or set [run] overwrite = true to remove them",
                            out.string(), earlier.front(), more));
  }
  return earlier;
}

void remove_earlier_predictions(const RunConfig& cfg, const fs::path& out, const std::vector<std::string>& earlier) {
  if (earlier.empty()) return;
  std::error_code ec;
  for (const std::string& name : earlier) {
    fs::remove(out / name, ec);
    if (ec) {
      throw Error(fmt::format("{}: cannot remove {}: {}", cfg.run.setting("overwrite"), (out / name).string(),
                              ec.message()));
    }
  }
  std::fprintf(stderr, "deepcam-host: [run] overwrite = true: removed the %zu files of an earlier --predict in %s\n",
               earlier.size(), out.string().c_str());
}

// What a run killed while writing leaves (temporary_files.hpp: a checkpoint,
// a --predict picture or .npy file, the run's record before run_start) is
// removed when its writer is gone; a live one may still be writing. Only the
// temporaries of names that `ours` accepts: the folder may be the user's.
void remove_stale_temporaries(const fs::path& dir, const std::function<bool(const std::string&)>& ours) {
  for (const temporary_files::Stale& left : temporary_files::stale(dir)) {
    if (!ours(left.target)) continue;
    const fs::path& p = left.path;
    std::error_code rm;
    fs::remove(p, rm);
    if (rm)
      throw Error(fmt::format("{}: left by a run that is gone, and cannot be removed: {}", p.string(), rm.message()));
    std::fprintf(stderr, "deepcam-host: removed %s, left by an earlier run that was stopped while writing it\n",
                 p.string().c_str());
  }
}

// Every name the run will write, checked before anything is trained: the
// output folder can be written, the log's folder exists, no checkpoint name
// is taken by a folder, and the record of an earlier run (its log,
// checkpoints) is not overwritten unless [run] overwrite = true or this run
// resumes from one of its checkpoints. True when it does: this run continues
// the one whose record is there. The earlier files that [run] overwrite =
// true replaces are added to `to_remove`, for the run to remove as it starts:
// one that fails before (a resume file, a plugin refused) leaves them.
bool check_outputs(const RunConfig& cfg, const fs::path& out_dir, const fs::path& log, bool evaluating,
                   std::vector<fs::path>& to_remove) {
  std::error_code ec;
  const std::string dir_key = cfg.run.where("output_dir");
  if (const std::string why = cannot_write_in(out_dir); !why.empty()) {
    throw Error(fmt::format("{}: cannot write in {}: {}", dir_key, out_dir.string(), why));
  }
  const fs::path log_dir = log.parent_path();
  if (!fs::is_directory(log_dir, ec)) {
    throw Error(fmt::format("{}: the folder {} of {} does not exist{}", cfg.mlperf.where("log_file"),
                            log_dir.string(), log.string(), fs::exists(log_dir, ec) ? " (it is a file)" : ""));
  }
  if (fs::is_directory(log, ec)) {
    throw Error(fmt::format("{}: {} is a folder", cfg.mlperf.where("log_file"), log.string()));
  }
  // The record is renamed over its files once run_start is logged: a device
  // or pipe there would be replaced by a regular file.
  const fs::path config_file = config_path(out_dir, evaluating);
  struct Output {
    fs::path path;
    std::string key, what, instead;
    std::string_view starts;  // how a run's file of that kind starts
  };
  const Output outputs[] = {{log, cfg.mlperf.where("log_file"), "MLPerf log", "name another file", ":::MLLOG"},
                            {config_file, dir_key, "resolved configuration", "choose another output_dir",
                             evaluating ? "# deepcam-host --evaluate " : "# resolved from "}};
  for (const Output& output : outputs) {
    const fs::file_status status = fs::status(output.path, ec);
    if (fs::exists(status) && !fs::is_regular_file(status)) {
      throw Error(fmt::format("{}: {} is {}, and the run would replace it with its {}; {}", output.key,
                              output.path.string(),
                              fs::is_directory(status) ? "a folder" : "not a regular file (a device, pipe or socket)",
                              output.what, output.instead));
    }
    // A file there that no run wrote (the run file itself, as config.toml
    // in its own folder; a log_file that names stats.h5 or a checkpoint) is
    // never replaced: [run] overwrite is for an earlier run's record.
    if (!fs::is_regular_file(status)) continue;
    std::string lead(output.starts.size(), '\0');
    std::ifstream in(output.path, std::ios::binary);
    in.read(lead.data(), static_cast<std::streamsize>(lead.size()));
    lead.resize(static_cast<std::size_t>(in.gcount()));
    if (!lead.empty() && lead != output.starts) {
      throw Error(fmt::format("{}: {} is a file that is no run's {} (it does not start with \"{}\"), and the run "
                              "would replace it with its own; {}",
                              output.key, output.path.string(), output.what, output.starts, output.instead));
    }
  }
  // An evaluation writes only its own record, which names the checkpoint it
  // scored; the next evaluation here replaces it.
  if (evaluating) return false;

  std::vector<std::string> earlier;
  const std::string& resume = cfg.run.string("resume");
  bool continues = false;
  std::string resumed;  // the name of the checkpoint resumed from, when it is in this folder
  for (fs::directory_iterator it(out_dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (!is_checkpoint_name(name)) continue;
    if (!it->is_regular_file(ec)) {
      throw Error(fmt::format("{}: {} is not a file, and this run writes its checkpoints under that name", dir_key,
                              it->path().string()));
    }
    earlier.push_back(name);
    if (!resume.empty() && fs::equivalent(it->path(), resume, ec)) {
      continues = true;
      resumed = name;
    }
  }
  std::sort(earlier.begin(), earlier.end());
  const bool overwrite = cfg.run.boolean("overwrite");
  if (continues) {
    // Checkpoints after the one resumed from are of the run being continued
    // past that point: this run would write its own over some of them and
    // leave the rest, two histories in one folder.
    std::vector<std::string> later;
    for (const std::string& name : earlier) {
      if (checkpoint_epoch(name) > checkpoint_epoch(resumed)) later.push_back(name);
    }
    std::sort(later.begin(), later.end(),
              [](const std::string& a, const std::string& b) { return checkpoint_epoch(a) < checkpoint_epoch(b); });
    if (!later.empty() && !overwrite) {
      throw Error(fmt::format("{}: {} holds checkpoints after {}, which this run resumes from ({}): they are of the "
                              "run it continues, and this run would write its own over them; resume from the last "
                              "one, choose another output_dir, or set [run] overwrite = true to remove them",
                              cfg.run.where("resume"), out_dir.string(), resumed, fmt::join(later, ", ")));
    }
    for (const std::string& name : later) to_remove.push_back(out_dir / name);
    return true;
  }
  if (overwrite) {
    // Replaced as a whole: no checkpoint or kept record of the earlier run
    // stays beside this run's log (the log and config.toml are replaced as
    // it starts).
    for (const std::string& name : earlier) to_remove.push_back(out_dir / name);
    // An --evaluate's record there scored one of them.
    for (const fs::path& path : {config_path(out_dir, true), log_path(cfg, out_dir, true)}) {
      if (fs::is_regular_file(path, ec)) to_remove.push_back(path);
    }
    for (int n = 1;; ++n) {
      const fs::path kept[] = {numbered(out_dir / "config.toml", n), numbered(log, n)};
      if (!fs::exists(kept[0], ec) && !fs::exists(kept[1], ec)) break;
      for (const fs::path& path : kept) {
        if (fs::exists(path, ec)) to_remove.push_back(path);
      }
    }
    return false;
  }
  if (fs::exists(log, ec)) earlier.insert(earlier.begin(), log.lexically_relative(out_dir).string());
  if (earlier.empty()) return false;
  throw Error(fmt::format("{}: {} holds the record of an earlier run ({}) that this run would overwrite; set [run] "
                          "overwrite = true to replace it, choose another output_dir, or resume from one of its "
                          "checkpoints",
                          dir_key, out_dir.string(), fmt::join(earlier, ", ")));
}

// Runs `checks` on rank 0 and shares its refusal (an Error) with every
// rank, so that all stop at once with its message.
void agree_on_rank0_refusal(Communicator& comm, const std::function<void()>& checks) {
  std::string refusal;
  std::exception_ptr error;
  if (comm.rank() == 0) {
    try {
      checks();
    } catch (const Error& e) {
      if (comm.size() == 1) throw;
      refusal = e.what();
      error = std::current_exception();
    }
  }
  if (comm.size() == 1) return;
  const std::string rank0 = all_gather_text(comm, refusal).front();
  if (rank0.empty()) return;
  if (error) std::rethrow_exception(error);
  throw Error(fmt::format("rank 0 refused the run: {}", rank0));
}

// Builds the engine's components. A plugin's work stopped by SIGTERM or
// SIGINT here (a reader staging its files) ends a run that never started:
// its record is removed as after a refusal. `checkpoint` (resume,
// --evaluate or --predict; "" for none) is read only after the build: a
// missing or foreign file is named before a reader stages for minutes.
// `where` names what gave `checkpoint` (the resume setting, --evaluate),
// for its refusal.
void build_or_stop(Engine& engine, bool with_optimizer, const std::vector<Split>& splits, const std::string& checkpoint,
                   const std::string& where, std::int64_t validation_samples = 0) {
  if (!checkpoint.empty()) {
    try {
      check_torch_save_file(checkpoint);
    } catch (const Error& e) {
      throw Error(fmt::format("{}: {}", where, e.what()));
    }
  }
  try {
    engine.build(with_optimizer, splits, validation_samples);
  } catch (const StopRequested& e) {
    throw StopRequested(e.signal(), fmt::format("{}; the run had not started: what it staged is removed, and it "
                                                "keeps no log or config.toml",
                                                e.what()));
  }
}

}  // namespace

int run_engine(const RunConfig& given, const EngineOptions& opts) {
  // The handlers installed below must not run on a thread that computes
  // (deepcam/stop_request.hpp says why).
  if (!stop_signals_on_own_thread()) {
    throw Error("run_engine: SIGINT and SIGTERM can reach the calling thread, and so the threads it starts; call "
                "deepcam::take_stop_signals_on_own_thread() (deepcam/stop_request.hpp) first in main(), before "
                "any other thread exists");
  }
  const RankLayout layout = detect_ranks();
  CommOptions co;
  co.rendezvous = given.run.string("rendezvous");
  co.rendezvous_setting = given.run.setting("rendezvous");
  co.timeout = std::chrono::milliseconds(static_cast<std::int64_t>(given.run.number("comm_timeout_s") * 1000));
  co.timeout_where = "[run] comm_timeout_s";
  co.cuda = given.run.string("device") == "cuda";
  // A stop signal while the ranks meet (the wait for the others can be
  // long) ends the rendezvous cleanly: the others stop too, and a file
  // store goes with the last rank, where the signal's default action left
  // it for the next run to trip on.
  record_stop_signals_from_now();
  Communicator comm(layout, co);
  stop_if_any_rank_was_stopped(comm);
  const bool rank0 = comm.rank() == 0;
  require_same_configuration(given, opts, comm);
  const bool seed_drawn = given.run.integer("seed") == kAutoSeed;
  const RunConfig cfg = seed_drawn ? with_drawn_seed(given, comm) : given;
  // The resolved configuration as it runs (a drawn seed in it), as config.toml holds it.
  if (rank0) std::fprintf(stderr, "%s\n", cfg.resolved.c_str());

  if (opts.benchmark_steps > 0) {
    // No log, no config, no checkpoint: the JSON line is the result.
    catch_stop_signals(end_benchmark, SA_RESETHAND);
    stop_if_requested("before --benchmark began; it writes no file");
    MlperfLog no_log(nullptr, false);
    Engine engine(cfg, seed_drawn, no_log, comm);
    engine.build(/*with_optimizer=*/true, /*splits=*/{});
    const int status = engine.benchmark(opts.benchmark_steps);
    comm.finish();
    return status;
  }

  if (!opts.predict_checkpoint.empty()) {
    // No log and no run record: the pictures and .npy files are the result.
    if (comm.size() > 1) {
      throw Error("--predict runs on one rank: start it without --nproc or a launcher's ranks");
    }
    check_predict_out(opts.predict_out);
    std::error_code ec;
    std::vector<std::string> earlier;
    if (fs::is_directory(opts.predict_out, ec)) {
      remove_stale_temporaries(opts.predict_out, is_prediction_name);
      earlier = earlier_predictions(cfg, opts.predict_out);
    }
    MlperfLog no_log(nullptr, false);
    record_stop_signals_from_now();
    Engine engine(cfg, seed_drawn, no_log, comm);
    build_or_stop(engine, /*with_optimizer=*/false, {Split::Validation}, opts.predict_checkpoint, "--predict",
                  opts.predict_samples);
    // The earlier files go only once this run has a prediction to write:
    // a checkpoint or setting refused leaves them as they were.
    const int status = engine.write_predictions(opts.predict_checkpoint, opts.predict_out, opts.predict_samples,
                                                [&] { remove_earlier_predictions(cfg, opts.predict_out, earlier); });
    comm.finish();
    return status;
  }

  // Only rank 0 writes files (SPEC 8.1).
  const fs::path out_dir = cfg.run.string("output_dir");
  const bool evaluating = !opts.evaluate_checkpoint.empty();
  const fs::path log_file = log_path(cfg, out_dir, evaluating);
  // A run that fails leaves no folder it made (out_dir and those above it
  // that did not exist) and no files in them.
  struct RemoveIfEmpty {
    std::vector<fs::path> made;  // out_dir first, then each missing folder above it
    ~RemoveIfEmpty() {
      for (const fs::path& dir : made) {
        std::error_code e;
        if (!fs::exists(dir, e)) continue;  // not made: creating it failed
        if (!fs::is_empty(dir, e) || e || !fs::remove(dir, e)) return;
      }
    }
  } cleanup;
  std::unique_ptr<RunRecord> record;
  std::vector<fs::path> earlier_files;  // removed as the run starts ([run] overwrite)
  // Rank 0's checks and its record: a refusal is every rank's at once (the
  // others would learn it as a lost store, after a backtrace of c10d's).
  agree_on_rank0_refusal(comm, [&] {
    std::error_code ec;
    const bool created = !fs::exists(out_dir, ec);
    if (!created && !fs::is_directory(out_dir, ec)) {
      throw Error(fmt::format("{}: {} exists and is not a folder", cfg.run.where("output_dir"), out_dir.string()));
    }
    if (created) {
      for (fs::path dir = fs::absolute(out_dir, ec).lexically_normal();
           dir.has_relative_path() && !fs::exists(dir, ec); dir = dir.parent_path()) {
        if (!dir.has_filename()) dir = dir.parent_path();  // "a/b/" names b
        cleanup.made.push_back(dir);
      }
    }
    fs::create_directories(out_dir, ec);
    if (ec) {
      throw Error(
          fmt::format("{}: cannot create {}: {}", cfg.run.where("output_dir"), out_dir.string(), ec.message()));
    }
    // The temporaries of this folder's run records and checkpoints, of a
    // training run or an evaluation.
    remove_stale_temporaries(out_dir, [&](const std::string& name) {
      for (const bool evaluation : {false, true}) {
        if (name == config_path(out_dir, evaluation).filename().string() ||
            name == log_path(cfg, out_dir, evaluation).filename().string()) {
          return true;
        }
      }
      return is_checkpoint_name(name);
    });
    const bool continues = check_outputs(cfg, out_dir, log_file, evaluating, earlier_files);
    const fs::path config_file = config_path(out_dir, evaluating);
    // The evaluation's record names the checkpoint it scored: its config's
    // [run] resume is the run file's, not that file.
    const std::string resolved =
        evaluating ? fmt::format("# deepcam-host --evaluate {}\n{}",
                                 toml_comment_text(fs::absolute(opts.evaluate_checkpoint).lexically_normal().string()),
                                 cfg.resolved)
                   : cfg.resolved;
    record = std::make_unique<RunRecord>(config_file, log_file, resolved, cfg.mlperf.where("log_file"), continues);
  });
  MlperfLog log(record ? record->log() : nullptr, rank0, log_file.string());
  // Every line also on stdout, as the reference's logger prints it.
  if (rank0 && !opts.quiet) log.echo_to(stdout);

  record_stop_signals_from_now();
  Engine engine(cfg, seed_drawn, log, comm);
  if (evaluating) {
    build_or_stop(engine, /*with_optimizer=*/false, {Split::Validation}, opts.evaluate_checkpoint, "--evaluate");
    const int status = engine.evaluate(opts.evaluate_checkpoint);
    comm.finish();
    if (record) {
      record->keep();
      record->check_still_there();
    }
    return status;
  }

  const auto t0 = Clock::now();
  engine.on_run_start([&] {
    for (const fs::path& path : earlier_files) remove_earlier_file(cfg, path);
    if (record) record->keep();
  });
  log.event("submission_benchmark", Json("deepcam"));
  log.event("submission_org", Json(cfg.mlperf.string("org")));
  log.event("submission_division", Json(cfg.mlperf.string("division")));
  log.event("submission_status", Json(cfg.mlperf.string("status")));
  log.event("submission_platform", Json(cfg.mlperf.string("platform")));
  comm.world().barrier();
  log.start("init_start");
  // What the job did before this process started, as its run file says:
  // no cache was dropped unless it says so.
  log.event("cache_clear", Json(cfg.mlperf.boolean("cache_clear")));
  log.event("seed", Json(cfg.run.integer("seed")));
  log.event("number_of_ranks", Json(comm.size()));
  log.event("number_of_nodes", Json(comm.nodes()));
  // One GPU per rank: the most ranks on one node.
  log.event("accelerators_per_node", Json(cfg.run.string("device") == "cuda" ? comm.max_local_size() : 0));
  build_or_stop(engine, /*with_optimizer=*/true, {Split::Train, Split::Validation}, cfg.run.string("resume"),
                cfg.run.setting("resume"));
  int status = 0;
  try {
    status = engine.train();
  } catch (const std::exception& e) {
    // Training began and failed (a lost rank, a file gone bad): the record
    // stays, closed as an aborted run, with no barrier (the others may be
    // gone): the epoch or evaluation it was in ends first, as when a signal
    // stops a run.
    if (!engine.run_stopped()) {
      const Json epoch_num = log.close_open_intervals(Json(engine.steps_trained()));
      MlperfLog::Metadata md = {{"status", Json("aborted")}};
      if (epoch_num.kind() != Json::Kind::Null) md.emplace_back("epoch_num", epoch_num);
      log.end("run_stop", Json(), md);
    }
    // A plugin's own stop, mid-run (the engine's is a status, not a throw).
    if (const auto* stop = dynamic_cast<const StopRequested*>(&e)) {
      throw StopRequested(stop->signal(), fmt::format("{}; the run stopped at step {}: run_stop status \"aborted\", "
                                                      "its log and config.toml are kept",
                                                      stop->what(), engine.steps_trained()));
    }
    throw;
  }
  comm.finish();
  if (record) record->check_still_there();
  if (rank0) {
    std::fprintf(stderr, "deepcam-host: wall time %.1f s; log %s\n", seconds_since(t0),
                 log_file.string().c_str());
  }
  return status;
}

}  // namespace deepcam
