// deepcam-data: makes and inspects DeepCAM data sets (SPEC 1).
//
// Usage:
//   deepcam-data synth --out DIR [--train N] [--validation N] [--test N]
//                      [--height H] [--width W] [--seed S] [--threads T]
//   deepcam-data stats DIR
//   deepcam-data convert SRC DST [--threads N] [--verify]
//   deepcam-data verify ROOT [--threads N]
//   (synth, stats, convert, verify also take --quiet and --progress-seconds S)
//   deepcam-data read RUN.toml [MORE.toml]... [--set k=v]... [--split S] [--epochs N]
//                    [--consume-ms X | --consume-matched] [--with-validation]
//   deepcam-data package RUN_DIR... [--throughput INSTANCE_DIR...] --system NAME --out DIR [--system-desc FILE]
//
// Every error is one line `deepcam-data: <message>` on stderr and a non-zero
// exit status (2 for a bad command line or run file, 3 for a fault of a
// plugin's code, 1 otherwise); no
// partial file is left behind. An option given twice is a bad command line
// (options.hpp), but read's --set, which adds.
#include <signal.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <new>
#include <string>
#include <string_view>
#include <vector>

#include <c10/util/Exception.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "deepcam/error.hpp"
#include "deepcam/json.hpp"
#include "deepcam/plugin_loader.hpp"
#include "deepcam/stop_request.hpp"
#include "deepcam_build_config.h"
#include "command_line.hpp"
#include "convert.hpp"
#include "options.hpp"
#include "package.hpp"
#include "process_end.hpp"
#include "read_bench.hpp"
#include "stats.hpp"
#include "std_streams.hpp"
#include "stop_signals.hpp"
#include "synth.hpp"
#include "verify.hpp"

namespace {

constexpr const char* kUsage = R"(usage:
  deepcam-data synth --out DIR [options]   write a synthetic data set to DIR
  deepcam-data stats DIR [options]         (re)compute DIR/stats.h5 from DIR/train
  deepcam-data convert SRC DST [options]   write the numpy form of data set SRC to DST
  deepcam-data verify ROOT [options]       check every file of a data set (h5 or npy)
  deepcam-data read RUN.toml... [options]  time the run's reader alone (no model)
  deepcam-data package RUN_DIR... [--throughput INSTANCE_DIR...] --system NAME --out DIR
                                           an MLPerf HPC results package and its score
  deepcam-data --help | --version

synth writes DIR/train, DIR/validation (and DIR/test) with one HDF5 file per
sample (climate/data: height x width x 16 float32, climate/labels_0: height x
width int32; classes 0 background, 1 cyclone, 2 atmospheric river), named
data-YYYY-MM-DD-HH-1.h5, and DIR/stats.h5 over the training files. The same
seed gives the same files with any number of threads.

synth options:
  --out DIR          output directory (created if missing)      required
                     empty, or holding what a stopped synth of the same
                     command left (no stats.h5 yet), which it finishes
  --train N          training samples (>= 1)                    default 16
  --validation N     validation samples (>= 1)                  default 4
  --test N           test samples                               default 0
  --height H         sample height in pixels (>= 16)            default 768
  --width W          sample width in pixels (>= 16)             default 1152
  --seed S           random seed                                default 1
  --threads T        worker threads (>= 1)                      default 2

stats computes per channel count, mean, sqmean, minval and maxval over all
pixels of all DIR/train/*.h5 files (in a set of the numpy form only, its
data-X.npy files) and writes DIR/stats.h5 atomically. A
stats.h5 it cannot write (a folder in its place, a DIR it cannot create
files in) is an error before any file is read. A channel training cannot
normalise with the result (constant, or a range float32 cannot hold) is a
warning naming it; the file is still written, for runs that leave that
channel out of [data] channels.

synth, stats, convert and verify print progress on stderr while they work:
"done/total unit (N%), rate unit/s, time left", every 5 s when stderr is a
terminal and every 30 s when it is not (a log file), nothing for work done
within that time.
  --quiet            no progress and no summary: only problems and errors
                     (verify's report on stdout stays)
  --progress-seconds S   a progress line every S seconds (> 0) instead

convert writes, for each SRC/<split>/data-X.h5, DST/<split>/data-X.npy (the
float32 height x width x channels array) and DST/<split>/label-X.npy (the
labels, in the dtype the HDF5 file stores), standard .npy files that
numpy.load reads; SRC/stats.h5 is copied to DST once all samples are done.
A sample whose data is not finite or whose labels are not 0, 1 or 2, or
whose shape has a 0, does not fit in memory or differs from the first
training sample's, is named and not converted (training would refuse it);
a set training refuses (train/ or validation/ missing or empty, a stats.h5
verify refuses) is refused before anything is written. DST may be SRC: the pairs are then written beside the HDF5 files
(each reader reads its own form); DST inside SRC is refused.
Pairs already converted (headers and sizes matching the source, and the
source's modification time, which convert gives them; a pair with another
time has its values compared) are skipped, so an interrupted run is
finished by running it again. Started by mpirun or
srun, rank r of P converts every P-th sample (OMPI_COMM_WORLD_RANK/SIZE,
PMI_RANK/PMI_SIZE or SLURM_PROCID/SLURM_NTASKS).
  --threads N        samples converted at once (>= 1)  default: cores, at most 16
  --verify           also compare every value of existing pairs with the
                     source and convert those that differ again

verify checks a data set in either form (per split folder: data-X.h5, or
data-X.npy with label-X.npy): every file opens and holds just what its
header describes (not less, and no bytes after it), data is
(H, W, C) and finite, labels (H, W) in {0, 1, 2}, npy files pair up, shapes
agree across files (each file's dtypes are converted, as the readers do),
stats.h5 matches the channel count and holds statistics (count above 0,
finite mean and sqmean, no negative variance, and a [minval, maxval] that
leaves no more than 1% of a channel's training values outside); and it
refuses what training refuses: a missing or empty train/ or validation/, a
stats.h5 that cannot normalise a channel (maxval not above minval, or a
float32 shift or scale 1/(maxval - minval) that overflows). It prints one
line per problem and a summary, and exits non-zero if there is any.
  --threads N        files checked at once (>= 1)      default: cores, at most 16

Entries named like samples that are not files (a directory, a FIFO, a
socket, a dangling link or a link loop) are errors naming them, in every
command and in the training readers; none is ever opened.

read loads RUN.toml as deepcam-host does (several run files are merged left
to right, then --set; every plugin they name must be found:
DEEPCAM_PLUGIN_PATH; device = "cuda" needs a GPU), builds only its reader
(rank 0 of 1), reads the split for the epochs and prints one JSON line:
reader, source, split, epochs, batch_size, batches, samples, samples_per_epoch, bytes (on disk, of the files
read), seconds, samples_per_s, gb_per_s, wait_seconds (inside start_epoch and
next), wait_fraction, wait_ms_per_batch, first_wait_seconds (of each
epoch's first batch), steady_wait_fraction (without those), consume_ms,
read_ms_per_batch, build_seconds, peak_rss_bytes and base_rss_bytes (before the reader was
built), with_validation, validation_batches and validation_samples. A consumer
emulates the training step by sleeping after each batch.
  --set section.key=value   override a key of the run files (repeatable)
  --split S          train or validation                       default train
  --epochs N         epochs to read (>= 1)                     default 1
  --consume-ms X     the consumer holds each batch X ms        default 0
  --consume-matched  first read one epoch without a consumer, then use its
                     mean read time per batch as --consume-ms
  --with-validation  after each training epoch, read the validation split
                     (as validation epoch 0), as the engine does

package lays out a submission tree from the output folders of finished runs
(each holds mlperf.log and config.toml): DIR/results/NAME/strong/deepcam/
result_N.txt (the logs), DIR/systems/NAME.json (every field the checker
requires: from the logs, this machine and --system-desc), DIR/benchmarks/
deepcam/implementations/deepcam-host/run_files/NAME/result_N.toml (the run
files) and DIR/score.json; it prints each run's time to train (run_start to
run_stop) and the score as the MLPerf result summarizer computes it (olympic
mean in minutes; runs not ending in success at IoU 0.82 dropped, at most
one). Exit 1
when there is no score. Check it with
  python -m mlperf_logging.package_checker DIR hpc 3.0.0
  --throughput INSTANCE_DIR...
                       the run folders after it are the instances of a
                       throughput (weak scaling) measurement, beside the
                       time-to-solution runs before it: results/NAME/weak/
                       deepcam/result_N.txt; each must have reached the
                       target, with its own seed, all at one scale; the score
                       is the time from the first run_start to the last
                       run_stop (at least 5 instances)
  --system NAME        the system's name (letters, digits, _ - . +)   required
  --out DIR            the package folder; must not exist             required
  --system-desc FILE   a JSON object of system description fields (strings
                       or numbers) that replace or add to the generated ones;
                       strict JSON in UTF-8 (no key twice, no NaN or Infinity)
)";

struct UsageError {
  std::string message;
};

// An option of `command` given twice is a bad command line; `name` is the
// option without "=value".
void once(deepcam::data::OptionsSeen& seen, const std::string& name) {
  if (std::string problem = seen.again(name); !problem.empty()) throw UsageError{std::move(problem)};
}

// A flag (an option without a value) given as --flag=value.
void no_value(const std::string& command, const std::string& option) {
  if (const auto eq = option.find('='); eq != std::string::npos)
    throw UsageError{fmt::format("{}: {} takes no value", command, option.substr(0, eq))};
}

// The name of an option as given: "--out" of "--out=DIR".
std::string name_of(const std::string& option) { return option.substr(0, option.find('=')); }

// An option given last, with no value after it: one of `valued` (the
// command's options that take a value) missing its value, or an unknown one.
UsageError missing_value(const std::string& command, const std::string& option,
                         std::initializer_list<std::string_view> valued) {
  if (std::find(valued.begin(), valued.end(), option) != valued.end())
    return UsageError{fmt::format("{} needs a value", option)};
  return UsageError{fmt::format("{}: unknown option {}", command, option)};
}

long long parse_integer(const std::string& option, std::string_view text, long long lo, long long hi) {
  long long value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  // Digits past 64 bits are an integer out of range, not no integer.
  if (ec == std::errc::result_out_of_range && end == text.data() + text.size())
    throw UsageError{fmt::format("{} must be between {} and {}, got {}", option, lo, hi, text)};
  if (ec != std::errc() || end != text.data() + text.size() || text.empty())
    throw UsageError{fmt::format("{} expects an integer, got '{}'", option, text)};
  if (value < lo || value > hi)
    throw UsageError{fmt::format("{} must be between {} and {}, got {}", option, lo, hi, value)};
  return value;
}

// Digits with a point or an exponent: what strtod reads beside them (blanks
// before, a '+', hexadecimal as 0x10, "inf") is not taken for a number.
bool decimal_number(const std::string& value) {
  return !value.empty() && (std::isdigit(static_cast<unsigned char>(value[0])) || value[0] == '.') &&
         value.find_first_not_of("0123456789.eE+-") == std::string::npos;
}

// --progress-seconds: the interval between progress lines.
double parse_seconds(const std::string& option, const std::string& value) {
  char* end = nullptr;
  const double seconds = std::strtod(value.c_str(), &end);
  if (!decimal_number(value) || *end != '\0' || !(seconds > 0.0 && seconds <= 86400.0))
    throw UsageError{fmt::format("{} expects seconds above 0 and at most 86400, got '{}'", option, value)};
  return seconds;
}

deepcam::data::SynthOptions parse_synth(const std::vector<std::string>& args) {
  deepcam::data::SynthOptions o;
  deepcam::data::OptionsSeen seen("synth");
  bool have_out = false;
  constexpr long long kMaxCount = 10'000'000, kMaxSide = 16384;
  for (std::size_t k = 0; k < args.size(); ++k) {
    std::string option = args[k], value;
    if (option.rfind("--", 0) != 0)
      throw UsageError{fmt::format("synth: unexpected argument '{}'", option)};
    if (name_of(option) == "--quiet") {
      no_value("synth", option);
      once(seen, "--quiet");
      o.progress.quiet = true;
      continue;
    }
    if (const auto eq = option.find('='); eq != std::string::npos) {
      value = option.substr(eq + 1);
      option = option.substr(0, eq);
    } else {
      if (k + 1 >= args.size())
        throw missing_value("synth", option, {"--out", "--train", "--validation", "--test", "--height", "--width",
                                              "--seed", "--threads", "--progress-seconds"});
      value = args[++k];
    }
    once(seen, option);
    if (option == "--out") {
      if (value.empty()) throw UsageError{"--out needs a directory"};
      o.out = value;
      have_out = true;
    } else if (option == "--train") {
      o.train = static_cast<int>(parse_integer(option, value, 1, kMaxCount));
    } else if (option == "--validation") {
      // Training, verify and convert refuse a set without validation samples.
      o.validation = static_cast<int>(parse_integer(option, value, 1, kMaxCount));
    } else if (option == "--test") {
      o.test = static_cast<int>(parse_integer(option, value, 0, kMaxCount));
    } else if (option == "--height") {
      o.height = static_cast<int>(parse_integer(option, value, 16, kMaxSide));
    } else if (option == "--width") {
      o.width = static_cast<int>(parse_integer(option, value, 16, kMaxSide));
    } else if (option == "--seed") {
      o.seed = static_cast<std::uint64_t>(
          parse_integer(option, value, 0, std::numeric_limits<long long>::max()));
    } else if (option == "--threads") {
      o.threads = static_cast<int>(parse_integer(option, value, 1, 256));
    } else if (option == "--progress-seconds") {
      o.progress.seconds = parse_seconds(option, value);
    } else {
      throw UsageError{fmt::format("synth: unknown option {}", option)};
    }
  }
  if (!have_out) throw UsageError{"synth: --out DIR is required"};
  return o;
}

// The positional arguments and the options of stats, convert and verify.
struct ToolArgs {
  std::vector<std::string> positional;
  int threads = 0;
  bool verify = false;
  deepcam::data::ProgressOptions progress;
};

ToolArgs parse_tool(const std::string& command, const std::vector<std::string>& args, bool allow_threads,
                    bool allow_verify) {
  ToolArgs out;
  deepcam::data::OptionsSeen seen(command);
  for (std::size_t k = 0; k < args.size(); ++k) {
    std::string option = args[k], value;
    if (option.rfind("--", 0) != 0) {
      out.positional.push_back(option);
      continue;
    }
    if ((name_of(option) == "--verify" && allow_verify) || name_of(option) == "--quiet") {
      no_value(command, option);
      once(seen, option);
      (option == "--verify" ? out.verify : out.progress.quiet) = true;
      continue;
    }
    const bool takes_value = (option == "--threads" && allow_threads) || option == "--progress-seconds";
    if (const auto eq = option.find('='); eq != std::string::npos) {
      value = option.substr(eq + 1);
      option = option.substr(0, eq);
    } else if (takes_value) {
      if (k + 1 >= args.size()) throw UsageError{fmt::format("{} needs a value", option)};
      value = args[++k];
    }
    if (option == "--threads" || option == "--progress-seconds") once(seen, option);
    if (option == "--threads" && allow_threads) {
      out.threads = static_cast<int>(parse_integer(option, value, 1, 1024));
    } else if (option == "--progress-seconds") {
      out.progress.seconds = parse_seconds(option, value);
    } else {
      throw UsageError{fmt::format("{}: unknown option {}", command, option)};
    }
  }
  return out;
}

deepcam::data::ReadBenchOptions parse_read(const std::vector<std::string>& args) {
  deepcam::data::ReadBenchOptions o;
  deepcam::data::OptionsSeen seen("read");
  bool have_consume_ms = false;
  for (std::size_t k = 0; k < args.size(); ++k) {
    std::string option = args[k], value;
    if (option.rfind("--", 0) != 0) {
      o.run_files.push_back(option);
      continue;
    }
    if (name_of(option) == "--consume-matched" || name_of(option) == "--with-validation") {
      no_value("read", option);
      once(seen, option);
      (option == "--consume-matched" ? o.consume_matched : o.with_validation) = true;
      continue;
    }
    if (const auto eq = option.find('='); eq != std::string::npos && option != "--set") {
      // --set=k=v and --epochs=3; the first '=' ends the option's name.
      value = option.substr(eq + 1);
      option = option.substr(0, eq);
    } else {
      if (k + 1 >= args.size())
        throw missing_value("read", option, {"--set", "--split", "--epochs", "--consume-ms"});
      value = args[++k];
    }
    if (option != "--set") once(seen, option);  // --set is repeatable
    if (option == "--set") {
      o.overrides.push_back(value);
    } else if (option == "--split") {
      if (value == "train") o.split = deepcam::Split::Train;
      else if (value == "validation") o.split = deepcam::Split::Validation;
      else throw UsageError{fmt::format("--split expects train or validation, got '{}'", value)};
    } else if (option == "--epochs") {
      o.epochs = static_cast<int>(parse_integer(option, value, 1, 1'000'000));
    } else if (option == "--consume-ms") {
      char* end = nullptr;
      o.consume_ms = std::strtod(value.c_str(), &end);
      if (!decimal_number(value) || *end != '\0' || !(o.consume_ms >= 0.0 && o.consume_ms <= 3.6e6))
        throw UsageError{fmt::format("--consume-ms expects milliseconds between 0 and 3600000, got '{}'", value)};
      have_consume_ms = true;
    } else {
      throw UsageError{fmt::format("read: unknown option {}", option)};
    }
  }
  if (o.run_files.empty()) throw UsageError{"read: a run file (RUN.toml) is required"};
  if (have_consume_ms && o.consume_matched)
    throw UsageError{"read: --consume-ms and --consume-matched exclude each other"};
  if (o.with_validation && o.split != deepcam::Split::Train)
    throw UsageError{"read: --with-validation follows each training epoch with validation; use it with --split train"};
  return o;
}

// Whether `word` is an option that takes the next word as its value.
bool valued_option(const std::string& word) {
  static const char* const kValued[] = {"--out",    "--train",      "--validation",       "--test",   "--height",
                                        "--width",  "--seed",       "--threads",          "--set",    "--split",
                                        "--epochs", "--consume-ms", "--progress-seconds", "--system", "--system-desc"};
  return std::find(std::begin(kValued), std::end(kValued), word) != std::end(kValued);
}

int run(const std::vector<std::string>& args, deepcam::PluginLoader& loader) {
  if (args.empty()) throw UsageError{"no command given"};
  const std::string& command = args[0];
  if (command == "--version") {
    if (args.size() > 1) throw UsageError{"--version takes nothing after it"};
    deepcam::oprint("deepcam-data {} (LibTorch {})\n", DEEPCAM_VERSION, DEEPCAM_TORCH_VERSION);
    return 0;
  }
  const auto command_name = [](const std::string& word) {
    return word == "synth" || word == "stats" || word == "convert" || word == "verify" || word == "read" ||
           word == "package";
  };
  if (command == "--help" || command == "-h" || command == "help") {
    // `deepcam-data help convert`, as git's; the one help covers every command.
    if (args.size() > 2 || (args.size() == 2 && !command_name(args[1])))
      throw UsageError{fmt::format("{} takes nothing after it but a command (given: {})", command,
                                   fmt::join(args.begin() + 1, args.end(), " "))};
    deepcam::oprint("{}", kUsage);
    return 0;
  }
  const std::vector<std::string> rest(args.begin() + 1, args.end());
  const bool known = command_name(command);
  for (const auto& a : rest)
    if ((a == "--help" || a == "-h") && known) {
      deepcam::oprint("{}", kUsage);
      return 0;
    }
  // An empty word names nothing (an unset shell variable): as a folder it
  // was the current one (stats "" rewrote ./stats.h5).
  for (std::size_t k = 0; k < rest.size() && known; ++k) {
    const std::string after = k > 0 ? " (after " + rest[k - 1] + ")" : "";
    if (rest[k].empty())
      throw UsageError{fmt::format("{}: argument {}{} is empty; give what it stands for", command, k + 1, after)};
    // An option's value: another option there is a value left out (synth
    // --out --quiet made a folder named --quiet and was not quiet).
    if (k > 0 && rest[k].rfind("--", 0) == 0 && valued_option(rest[k - 1])) {
      throw UsageError{fmt::format("{}: {} needs a value, and {} is an option (a path that begins with '--' is "
                                   "written ./{})",
                                   command, rest[k - 1], rest[k], rest[k])};
    }
    if (const std::string problem = deepcam::control_character_word(rest, k); !problem.empty())
      throw UsageError{command + ": " + problem};
  }
  // The commands that write files stop between files, and read between
  // batches (its reader removes what it staged); verify writes nothing, and
  // ends at once as any program does.
  if (command == "synth" || command == "stats" || command == "convert" || command == "package" ||
      command == "read")
    deepcam::data::stop_on_signals();
  if (command == "synth") {
    deepcam::data::run_synth(parse_synth(rest));
  } else if (command == "stats") {
    const ToolArgs a = parse_tool(command, rest, false, false);
    if (a.positional.size() != 1) throw UsageError{"stats takes exactly one argument, the data set directory"};
    deepcam::data::run_stats(a.positional[0], a.progress);
  } else if (command == "convert") {
    const ToolArgs a = parse_tool(command, rest, true, true);
    if (a.positional.size() != 2)
      throw UsageError{"convert takes two arguments, the source data set and the output directory"};
    if (std::string problem = deepcam::data::convert_paths_problem(a.positional[0], a.positional[1]);
        !problem.empty())
      throw UsageError{problem};
    deepcam::data::run_convert({a.positional[0], a.positional[1], a.threads, a.verify, a.progress});
  } else if (command == "verify") {
    const ToolArgs a = parse_tool(command, rest, true, false);
    if (a.positional.size() != 1) throw UsageError{"verify takes one argument, the data set directory"};
    deepcam::data::run_verify({a.positional[0], a.threads, a.progress});
  } else if (command == "read") {
    deepcam::data::run_read_bench(parse_read(rest), loader);
  } else if (command == "package") {
    std::string bad;
    const deepcam::data::PackageOptions o = deepcam::data::parse_package_args(rest, bad);
    if (!bad.empty()) throw UsageError{bad};
    return deepcam::data::run_package(o);
  } else {
    throw UsageError{
        fmt::format("unknown command '{}' (commands: synth, stats, convert, verify, read, package)", command)};
  }
  return 0;
}

// Ends the process by `signal`, with its default action, so that a shell or
// a batch system sees it as killed by it.
int end_by_signal(int signal) {
  std::fflush(stderr);
  std::signal(signal, SIG_DFL);
  // Blocked in this thread (deepcam/stop_request.hpp): raise() is for it.
  sigset_t one;
  sigemptyset(&one);
  sigaddset(&one, signal);
  ::pthread_sigmask(SIG_UNBLOCK, &one, nullptr);
  std::raise(signal);
  return 128 + signal;
}

int run_data(int argc, char** argv) {
  // As in deepcam-host: a file that outgrows the file-size limit (ulimit -f)
  // makes write() fail with EFBIG, which the writers report, removing their
  // temporaries, instead of the signal ending the process with half a file.
  std::signal(SIGXFSZ, SIG_IGN);
  // As in deepcam-host: a reader of stdout or stderr that quits (`| head`, a
  // `| tee` that Ctrl-C ended) would end the work by SIGPIPE at its next
  // line, in the middle of a file (convert, synth), with its staged copies
  // left (read), or with status 141 for verify's verdict. Ignored: the
  // write fails, the work goes on and ends with its own status.
  std::signal(SIGPIPE, SIG_IGN);
  // As in deepcam-host: SIGINT and SIGTERM are taken on a thread of their
  // own (deepcam/stop_request.hpp says why).
  try {
    deepcam::take_stop_signals_on_own_thread();
  } catch (const deepcam::Error& e) {
    deepcam::eprint("deepcam-data: {}\n", deepcam::shown(e.what(), false));
    return 3;
  }
  // Outside the try block, as in deepcam-host: plugin libraries stay loaded
  // until the process ends, so that an exception thrown by a plugin is
  // handled while its code is still there.
  deepcam::PluginLoader loader;
  try {
    return run(std::vector<std::string>(argv + 1, argv + argc), loader);
  } catch (const deepcam::data::Stopped& stopped) {
    const char* signal = stopped.signal == SIGINT ? "SIGINT" : "SIGTERM";
    if (argc > 1 && std::string(argv[1]) == "read") {
      deepcam::eprint(
          "deepcam-data: read stopped by {}: nothing measured; the reader's staged copies are "
          "removed\n",
          signal);
    } else {
      deepcam::eprint(
          "deepcam-data: stopped by {}: the files finished before it are in place, no temporary "
          "is left; run the same command again to finish\n",
          signal);
    }
    return end_by_signal(stopped.signal);
  } catch (const deepcam::data::StoppedReadingRunFiles& stopped) {
    deepcam::eprint("deepcam-data: read: {}; nothing was read\n", deepcam::shown(stopped.what(), false));
    return end_by_signal(stopped.signal());
  } catch (const deepcam::StopRequested& stopped) {
    // read's reader, staging before the first batch.
    if (stopped.signal() < 1 || stopped.signal() >= NSIG) {
      deepcam::eprint("deepcam-data: internal error: a plugin stopped for signal {}, which is no signal: {}\n",
                      stopped.signal(), stopped.what());
      return 3;
    }
    deepcam::eprint("deepcam-data: read: {}; nothing measured; the reader's staged copies are removed\n",
                    stopped.what());
    return end_by_signal(stopped.signal());
  } catch (const UsageError& e) {
    deepcam::eprint("deepcam-data: {}; see deepcam-data --help\n", deepcam::shown(e.message, false));
    return 2;
  } catch (const deepcam::data::BadRunFile& e) {
    deepcam::eprint("deepcam-data: {}\n", deepcam::shown(e.what(), false));
    return 2;
  } catch (const deepcam::Error& e) {
    deepcam::eprint("deepcam-data: {}\n", deepcam::shown(e.what(), false));
  } catch (const std::bad_alloc&) {
    deepcam::eprint("deepcam-data: out of memory\n");
  } catch (const c10::Error& e) {
    // A failing ATen op or TORCH_CHECK: what() appends LibTorch's C++ backtrace.
    deepcam::eprint("deepcam-data: {}\n", deepcam::shown(e.what_without_backtrace(), false));
  } catch (const std::logic_error& e) {
    // A fault of a plugin's code (plugin_calls.hpp, a factory's failure,
    // named with its file) or of ours: status 3, as deepcam-host's.
    deepcam::eprint("deepcam-data: internal error: {}\n", deepcam::shown(e.what(), false));
    return 3;
  } catch (const std::exception& e) {
    deepcam::eprint("deepcam-data: {}\n", deepcam::shown(e.what(), false));
  } catch (...) {
    // A reader plugin's code may throw anything.
    deepcam::eprint("deepcam-data: internal error: an exception that is not a std::exception\n");
    return 3;
  }
  return 1;
}

}  // namespace

// Every object of the run is gone when run_data returns (process_end.hpp).
int main(int argc, char** argv) {
  deepcam::occupy_closed_standard_fds();
  int status = run_data(argc, argv);
  // What deepcam-data prints on stdout is a result (verify's report, read's
  // figures, package's score): lost, it is no success (status 2, as for an
  // output file that cannot be written).
  if (!deepcam::stdout_written("deepcam-data") && status < 2) status = 2;
  deepcam::end_process(status);
}
