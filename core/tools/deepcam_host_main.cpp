// deepcam-host: the thin main. Everything it does lives in the core library.
#include <c10/util/Exception.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <charconv>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "deepcam/config.hpp"
#include "deepcam/engine.hpp"
#include "deepcam/error.hpp"
#include "deepcam/json.hpp"
#include "deepcam/plugin_loader.hpp"
#include "deepcam/stop_request.hpp"
#include "deepcam/torch_pickle.hpp"
#include "command_line.hpp"
#include "launcher.hpp"
#include "plugin_calls.hpp"
#include "process_end.hpp"
#include "std_streams.hpp"

namespace {

const char* kUsage =
    "usage: deepcam-host [--nproc N] RUN.toml [MORE.toml]... [--set section.key=value]... [--evaluate CHECKPOINT | "
    "--benchmark STEPS]\n"
    "       deepcam-host RUN.toml... --predict CHECKPOINT --out DIR [--samples N]\n"
    "                    (each validation sample's predicted classes as DIR/sample-NNNNNN.npy, and a picture of\n"
    "                    predicted and true cyclones and rivers over TMQ as DIR/sample-NNNNNN.png)\n"
    "                    (several run files are merged left to right, then --set: configs/systems/*.toml)\n"
    "                    [--quiet]   (the MLPerf log's lines are echoed to stdout unless --quiet)\n"
    "       deepcam-host --list-plugins\n"
    "       deepcam-host --describe KIND/NAME   (e.g. optimizer/adam; or run, data, mlperf)\n"
    "       deepcam-host --describe KIND        (reader, model, optimizer, scheduler: the plugins of that kind)\n"
    "       deepcam-host --version\n";

// The value of an option that counts something (--benchmark STEPS, --nproc
// N, --samples N): a whole number in 1..most, digits only (no sign or
// spaces).
long long count_of(const std::string& option, const std::string& text, const char* what,
                   long long most = 1000000000) {
  long long n = 0;
  const char* last = text.data() + text.size();
  const auto [end, ec] = std::from_chars(text.data(), last, n);
  if (ec != std::errc() || end != last || n < 1 || n > most) {
    throw deepcam::Error(fmt::format("{} {}: expected a number of {} in 1..{}", option, text, what, most));
  }
  return n;
}

// `section` is the table the keys live in ("reader"), for naming nested tables.
void print_schema(const deepcam::ParamSchema& schema, const std::string& section) {
  if (schema.size == 0) deepcam::oprint("  (none)\n");
  for (const auto& s : schema) {
    if (s.type == deepcam::ParamType::Plugin) {
      // A nested table names another plugin, whose keys are that plugin's own.
      const std::string type = fmt::format("{} table", s.choices);
      deepcam::oprint("  {:<32} {:<12} default {}\n      {}\n      a table [{}.{}] with name = \"<{} plugin>\", "
                      "optional library, and that plugin's keys (deepcam-host --describe {}/NAME)\n",
                      s.key, type, s.default_toml ? s.default_toml : "(required)", s.doc, section, s.key, s.choices,
                      s.choices);
      continue;
    }
    std::string range;
    if (s.min <= s.max) range = "  range " + deepcam::range_text(s);
    if (s.choices) range = fmt::format("  one of {}", s.choices);
    deepcam::oprint("  {:<32} {:<12} default {}{}\n      {}\n", s.key, deepcam::to_string(s.type),
                    s.default_toml ? s.default_toml : "(required)", range, s.doc);
  }
}

int list_plugins(deepcam::PluginLoader& loader) {
  std::vector<std::string> problems;
  auto found = loader.discover(problems);
  // By kind and name; the files of one plugin stay in the order a run looks.
  std::stable_sort(found.begin(), found.end(), [](const deepcam::LoadedPlugin& a, const deepcam::LoadedPlugin& b) {
    return std::make_pair(a.descriptor->kind, std::string(a.descriptor->name)) <
           std::make_pair(b.descriptor->kind, std::string(b.descriptor->name));
  });
  for (const auto& p : found) {
    const auto& d = *p.descriptor;
    // A file a run would not load (deepcam::PluginLoader::discover) is marked.
    const std::string mark = p.not_used_because.empty() ? "" : "  (" + p.not_used_because + ")";
    deepcam::oprint("{:<10} {:<16} {:<8} {}\n           {}{}\n", deepcam::to_string(d.kind), d.name, d.version,
                    d.summary, p.path, mark);
  }
  for (const auto& e : problems) std::fprintf(stderr, "deepcam-host: skipped %s\n", e.c_str());
  if (found.empty()) {
    std::fprintf(stderr, "deepcam-host: no plugins found in %s (set DEEPCAM_PLUGIN_PATH)\n",
                 fmt::format("{}", fmt::join(loader.search_dirs(), ", ")).c_str());
    return 1;
  }
  return 0;
}

// --describe KIND: the plugins of one kind with their summaries.
int list_kind(deepcam::PluginLoader& loader, deepcam::PluginKind kind) {
  std::vector<std::string> problems;
  int n = 0;
  deepcam::oprint("{} plugins (deepcam-host --describe {}/NAME for one):\n", deepcam::to_string(kind),
                  deepcam::to_string(kind));
  for (const auto& p : loader.discover(problems, kind)) {
    if (p.descriptor->kind != kind) continue;
    const std::string mark = p.not_used_because.empty() ? "" : "  (" + p.not_used_because + ")";
    deepcam::oprint("  {:<16} {}{}\n", p.descriptor->name, p.descriptor->summary, mark);
    ++n;
  }
  for (const auto& e : problems) std::fprintf(stderr, "deepcam-host: skipped %s\n", e.c_str());
  if (n == 0) {
    std::fprintf(stderr, "deepcam-host: no %s plugins found in %s (set DEEPCAM_PLUGIN_PATH)\n",
                 deepcam::to_string(kind), fmt::format("{}", fmt::join(loader.search_dirs(), ", ")).c_str());
    return 1;
  }
  return 0;
}

int describe(deepcam::PluginLoader& loader, const std::string& what) {
  const deepcam::PluginKind kinds[] = {deepcam::PluginKind::Reader, deepcam::PluginKind::Model,
                                       deepcam::PluginKind::Optimizer, deepcam::PluginKind::Scheduler};
  const auto slash = what.find('/');
  if (slash == std::string::npos) {
    for (auto kind : kinds) {
      if (what == deepcam::to_string(kind)) return list_kind(loader, kind);
    }
    const deepcam::ParamSchema schema = deepcam::host_schema(what);  // throws for an unknown section
    deepcam::oprint("[{}] (deepcam-host)\n", what);
    print_schema(schema, what);
    return 0;
  }
  const std::string kind_name = what.substr(0, slash);
  const std::string name = what.substr(slash + 1);
  for (auto kind : kinds) {
    if (kind_name != deepcam::to_string(kind)) continue;
    if (name.empty()) {
      throw deepcam::Error(fmt::format("--describe {}: no plugin name after the '/'; deepcam-host --describe {} lists "
                                       "them",
                                       what, kind_name));
    }
    const auto& p = loader.load(kind, name);
    const auto& d = *p.descriptor;
    deepcam::oprint("{}/{} {}: {}\n  file: {}\n  built with LibTorch {}, C++11 ABI {}, CUDA {}, plugin ABI {}\n"
                    "parameters ([{}] table; also `name` and optional `library`):\n",
                    deepcam::to_string(d.kind), d.name, d.version, d.summary, p.path, d.torch_version,
                    d.cxx11_abi, *d.cuda_version ? d.cuda_version : "none", d.abi_version, deepcam::to_string(d.kind));
    print_schema(d.params, deepcam::to_string(d.kind));
    return 0;
  }
  throw deepcam::Error(fmt::format("--describe {}: unknown kind '{}'; kinds: reader, model, optimizer, scheduler",
                                   what, kind_name));
}

// The device's or the host's memory ran out: the run's size, not a bug of
// ours, so not an internal error. A run that had started has closed its
// log as aborted already.
int out_of_memory(const char* what) {
  std::fprintf(stderr,
               "deepcam-host: out of memory: %s\n  a smaller [run] train_batch_size or validation_batch_size (each "
               "per rank) needs less; on a GPU, so does precision = \"amp_bf16\"\n",
               what);
  return 2;
}

// A training, evaluation, benchmark or prediction line: its run files, its
// --set items in order, and its options. Throws Error for a bad line; the
// --nproc launcher checks its ranks' line here first, so that a bad one is
// said once, not once per rank.
struct RunLine {
  std::vector<std::string> files;
  std::vector<std::string> overrides;
  deepcam::EngineOptions options;
};

RunLine parse_run_line(const std::vector<std::string>& args) {
  RunLine line;
  std::set<std::string> given;  // the options that take one value, each at most once
  for (std::size_t i = 0; i < args.size(); ++i) {
    // --name value, or --name=value as with argparse.
    const std::size_t equals = args[i].rfind("--", 0) == 0 ? args[i].find('=') : std::string::npos;
    const std::string a = args[i].substr(0, equals);
    auto value = [&]() -> std::string {
      if (equals != std::string::npos) {
        if (equals + 1 == args[i].size()) throw deepcam::Error(fmt::format("{} needs a value\n{}", a, kUsage));
        return args[i].substr(equals + 1);
      }
      if (i + 1 >= args.size() || args[i + 1].empty()) {
        throw deepcam::Error(fmt::format("{} needs a value\n{}", a, kUsage));
      }
      // --out --quiet wrote into a folder named --quiet, and was not quiet.
      if (args[i + 1].rfind("--", 0) == 0) {
        throw deepcam::Error(fmt::format("{} needs a value, and {} is an option (a path that begins with '--' is "
                                         "written ./{})",
                                         a, args[i + 1], args[i + 1]));
      }
      return args[++i];
    };
    auto once = [&]() -> std::string {
      if (!given.insert(a).second) {
        throw deepcam::Error(fmt::format("{} is given twice; give it once", a));
      }
      return value();
    };
    if (a == "--set") line.overrides.push_back(value());
    else if (a == "--evaluate") line.options.evaluate_checkpoint = once();
    else if (a == "--predict") line.options.predict_checkpoint = once();
    else if (a == "--out") line.options.predict_out = once();
    else if (a == "--samples") line.options.predict_samples = count_of(a, once(), "samples");
    else if (a == "--quiet" && equals == std::string::npos) {
      if (!given.insert(a).second) throw deepcam::Error("--quiet is given twice; give it once");
      line.options.quiet = true;
    }
    else if (a == "--benchmark") line.options.benchmark_steps = count_of(a, once(), "steps");
    else if (a == "--quiet") throw deepcam::Error(fmt::format("--quiet takes no value (given: {})", args[i]));
    else if (a == "--nproc") throw deepcam::Error("--nproc comes first: deepcam-host --nproc N RUN.toml...");
    else if ((a == "--help" || a == "--version" || a == "--list-plugins") && equals != std::string::npos)
      throw deepcam::Error(fmt::format("{} takes no value (given: {})", a, args[i]));
    else if (a == "--help" || a == "-h" || a == "--version" || a == "--list-plugins" || a == "--describe") {
      throw deepcam::Error(fmt::format("{} comes alone, first: deepcam-host {}", a,
                                       a == "--describe" ? "--describe KIND/NAME" : a));
    } else if (!a.empty() && a[0] == '-') throw deepcam::Error(fmt::format("unknown option {}\n{}", args[i], kUsage));
    else line.files.push_back(args[i]);
  }
  if (line.files.empty()) throw deepcam::Error(fmt::format("no run file given\n{}", kUsage));
  const deepcam::EngineOptions& o = line.options;
  const int modes = !o.evaluate_checkpoint.empty() + (o.benchmark_steps > 0) + !o.predict_checkpoint.empty();
  if (modes > 1) throw deepcam::Error("--evaluate, --benchmark and --predict: give one of them");
  if (!o.predict_checkpoint.empty() && o.predict_out.empty()) {
    throw deepcam::Error(fmt::format("--predict needs --out DIR, the folder for its files\n{}", kUsage));
  }
  if (o.predict_checkpoint.empty() && (!o.predict_out.empty() || o.predict_samples > 0)) {
    throw deepcam::Error(fmt::format("--out and --samples go with --predict CHECKPOINT\n{}", kUsage));
  }
  return line;
}

// What --nproc's ranks would each refuse, refused once before they start:
// a run file on a pipe (one rank would read its text, the others nothing),
// and the run files, --set items and checkpoint that each would read.
void check_ranks_inputs(const RunLine& line, long long nproc, deepcam::PluginLoader& loader) {
  for (const std::string& file : line.files) {
    std::error_code ec;
    if (std::filesystem::is_fifo(std::filesystem::status(file, ec))) {
      throw deepcam::Error(fmt::format("{}: a pipe, which only one of the {} ranks could read (each reads the "
                                       "run files); with --nproc, give the run file as a file",
                                       file, nproc));
    }
  }
  const deepcam::RunConfig config = deepcam::load_config(line.files, line.overrides, loader);
  // --benchmark reads no checkpoint.
  const deepcam::EngineOptions& o = line.options;
  std::string checkpoint = o.evaluate_checkpoint, where = "--evaluate";
  if (!o.predict_checkpoint.empty()) {
    checkpoint = o.predict_checkpoint;
    where = "--predict";
  } else if (o.evaluate_checkpoint.empty() && o.benchmark_steps == 0) {
    checkpoint = config.run.string("resume");
    where = config.run.setting("resume");
  }
  if (!checkpoint.empty()) {
    try {
      deepcam::check_torch_save_file(checkpoint);
    } catch (const deepcam::Error& e) {
      throw deepcam::Error(fmt::format("{}: {}", where, e.what()));
    }
  }
}

// `result_on_stdout` is set for what prints its result there (--help,
// --version, --list-plugins, --describe, --evaluate, --benchmark): main
// checks that it got there. Training's echo of the log is no result: the
// log file has every line.
int run_host(int argc, char** argv, bool& result_on_stdout) {
  // A file that outgrows the file-size limit (ulimit -f) makes write() fail
  // with EFBIG, which the writers report as a clear error, instead of the
  // signal ending the process with half a file.
  std::signal(SIGXFSZ, SIG_IGN);
  // A reader of stdout or stderr that quits early (`| head`, a pager, a
  // `| tee` that Ctrl-C ended first) would end the run by SIGPIPE at its next
  // echoed line, before run_stop. Ignored, as Python ignores it under
  // PyTorch: the write fails, the run goes on, and the log file has every line.
  std::signal(SIGPIPE, SIG_IGN);
  // Before any thread starts, so that every later one (training, readers,
  // Gloo, NCCL, CUDA's) leaves SIGINT and SIGTERM to the thread made here.
  try {
    deepcam::take_stop_signals_on_own_thread();
  } catch (const deepcam::Error& e) {
    std::fprintf(stderr, "deepcam-host: %s\n", deepcam::shown(e.what(), false).c_str());
    return 3;
  }
  std::vector<std::string> args(argv + 1, argv + argc);
  const auto result_mode = [](const std::string& arg) {
    for (const char* mode : {"--help", "-h", "--version", "--list-plugins", "--describe", "--evaluate", "--benchmark"})
      if (arg == mode || arg.rfind(std::string(mode) + "=", 0) == 0) return true;
    return false;
  };
  result_on_stdout = std::any_of(args.begin(), args.end(), result_mode);
  // Outside the try block: plugin libraries stay loaded until the process
  // ends, so that an exception thrown by a plugin is handled while its code
  // is still there.
  deepcam::PluginLoader loader;
  try {
    if (args.empty()) {
      std::fputs(kUsage, stderr);
      return 2;
    }
    for (std::size_t k = 0; k < args.size(); ++k)
      if (const std::string problem = deepcam::control_character_word(args, k); !problem.empty())
        throw deepcam::Error(problem);
    // These print and end: anything after them would be ignored.
    for (const char* alone : {"--help", "-h", "--version", "--list-plugins"}) {
      if (args[0] == alone && args.size() > 1) {
        throw deepcam::Error(
            fmt::format("{} takes nothing after it (given: {})", alone, fmt::join(args.begin() + 1, args.end(), " ")));
      }
    }
    if (args[0] == "--help" || args[0] == "-h") {
      deepcam::oprint("{}", kUsage);
      return 0;
    }
    if (args[0] == "--version") {
      deepcam::oprint("deepcam-host {} (plugin ABI {}, LibTorch {}, CUDA {})\n", DEEPCAM_VERSION, DEEPCAM_PLUGIN_ABI,
                      DEEPCAM_TORCH_VERSION, DEEPCAM_WITH_CUDA ? DEEPCAM_CUDA_VERSION : "off");
      return 0;
    }
    if (args[0] == "--list-plugins") return list_plugins(loader);
    if (args[0] == "--describe" || args[0].rfind("--describe=", 0) == 0) {
      // --describe WHAT, or --describe=WHAT as every option's value.
      const bool joined = args[0] != "--describe";
      const std::size_t count = joined ? 1 : 2;
      if (args.size() < count || (joined ? args[0].size() == 11 : args[1].empty())) {
        throw deepcam::Error("--describe needs what to describe: KIND, KIND/NAME, run, data or mlperf");
      }
      if (args.size() > count) {
        throw deepcam::Error(
            fmt::format("--describe takes one thing to describe (given also: {})",
                        fmt::join(args.begin() + static_cast<std::ptrdiff_t>(count), args.end(), " ")));
      }
      return describe(loader, joined ? args[0].substr(11) : args[1]);
    }
    if (args[0] == "--nproc" || args[0].rfind("--nproc=", 0) == 0) {
      const bool joined = args[0] != "--nproc";
      if (!joined && args.size() < 2) throw deepcam::Error(fmt::format("--nproc needs a number\n{}", kUsage));
      const long long nproc = count_of("--nproc", joined ? args[0].substr(8) : args[1], "ranks", 4096);
      const std::vector<std::string> rest(args.begin() + (joined ? 1 : 2), args.end());
      // What prints and ends would print once per rank: refused here, once
      // (later in the line, parse_run_line refuses it as out of place).
      const std::string first = rest.empty() ? "" : rest[0].substr(0, rest[0].find('='));
      // Refused here, before any rank starts: each would say it runs under
      // a launcher already.
      if (std::find(rest.begin(), rest.end(), "--nproc") != rest.end() ||
          std::any_of(rest.begin(), rest.end(), [](const std::string& a) { return a.rfind("--nproc=", 0) == 0; })) {
        throw deepcam::Error("--nproc is given twice; give it once");
      }
      if (first == "--help" || first == "-h" || first == "--version" || first == "--list-plugins" ||
          first == "--describe") {
        throw deepcam::Error(fmt::format("{} comes alone, first, without --nproc: deepcam-host {}", first,
                                         first == "--describe" ? "--describe WHAT" : first));
      }
      // Each rank would say what is wrong with its line and its inputs.
      const RunLine line = parse_run_line(rest);
      check_ranks_inputs(line, nproc, loader);
      return deepcam::launch_local_ranks(static_cast<int>(nproc), rest);
    }
    const RunLine line = parse_run_line(args);
    return deepcam::run_engine(deepcam::load_config(line.files, line.overrides, loader), line.options);
  } catch (const deepcam::StopRequested& e) {
    // A plugin's work stopped by SIGTERM or SIGINT (a reader staging its
    // files); the engine says how far the run had come. The engine's own
    // stop between steps returns the status instead.
    if (e.signal() < 1 || e.signal() >= NSIG) {
      std::fprintf(stderr, "deepcam-host: internal error: a plugin stopped for signal %d, which is no signal: %s\n",
                   e.signal(), e.what());
      return 3;
    }
    std::fprintf(stderr, "deepcam-host: %s\n", deepcam::shown(e.what(), false).c_str());
    return 128 + e.signal();
  } catch (const deepcam::RankLost& e) {
    std::fprintf(stderr, "deepcam-host: %s\n", deepcam::shown(e.what(), false).c_str());
    return deepcam::kRankLostStatus;
  } catch (const deepcam::Error& e) {
    std::fprintf(stderr, "deepcam-host: %s\n", deepcam::shown(e.what(), false).c_str());
    return 2;
  } catch (const c10::OutOfMemoryError& e) {
    return out_of_memory(e.what_without_backtrace());
  } catch (const c10::Error& e) {
    // A failing ATen op or TORCH_CHECK: what() appends LibTorch's C++ backtrace.
    // LibTorch's CPU allocator says it is out of memory in a plain c10::Error.
    const char* what = e.what_without_backtrace();
    if (deepcam::cpu_out_of_memory(e)) return out_of_memory(what);
    std::fprintf(stderr, "deepcam-host: internal error: %s\n", deepcam::shown(what, false).c_str());
    return 3;
  } catch (const std::bad_alloc& e) {
    return out_of_memory(e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "deepcam-host: internal error: %s\n", deepcam::shown(e.what(), false).c_str());
    return 3;
  } catch (...) {
    // Plugin code may throw anything.
    std::fprintf(stderr, "deepcam-host: internal error: an exception that is not a std::exception\n");
    return 3;
  }
}

}  // namespace

// Every object of the run is gone when run_host returns (process_end.hpp).
int main(int argc, char** argv) {
  deepcam::occupy_closed_standard_fds();
  bool result_on_stdout = false;
  int status = run_host(argc, argv, result_on_stdout);
  // A result that did not reach stdout is no result (status 2, as for an
  // output file that cannot be written).
  if (result_on_stdout && !deepcam::stdout_written("deepcam-host") && status == 0) status = 2;
  deepcam::end_process(status);
}
