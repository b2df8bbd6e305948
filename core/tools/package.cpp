#include "package.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <toml++/toml.h>

#include "closed_division.hpp"
#include "deepcam/error.hpp"
#include "deepcam/json.hpp"
#include "deepcam/mlperf_log.hpp"
#include "deepcam_build_config.h"
#include "options.hpp"
#include "std_streams.hpp"
#include "stop_signals.hpp"
#include "temporary_files.hpp"

namespace deepcam::data {
namespace {

namespace fs = std::filesystem;

constexpr const char* kBenchmark = "deepcam";
constexpr const char* kMarker = ":::MLLOG ";

// ---- a JSON value: what the MLPerf log lines and a system description hold

struct Value {
  enum class Kind { Null, Bool, Number, String, Array, Object };
  Kind kind = Kind::Null;
  bool boolean = false;
  double number = 0.0;
  std::string text;  // a string's value, or a number as written
  std::vector<Value> items;
  std::vector<std::pair<std::string, Value>> members;

  const Value* find(std::string_view key) const {
    for (const auto& [k, v] : members)
      if (k == key) return &v;
    return nullptr;
  }
  static Value boolean_of(bool b) {
    Value v;
    v.kind = Kind::Bool;
    v.boolean = b;
    return v;
  }
  static Value string(std::string s) {
    Value v;
    v.kind = Kind::String;
    v.text = std::move(s);
    return v;
  }
};

// A JSON string as the MLPerf log writes its strings (Python's json.dumps).
std::string quoted(const std::string& s) { return Json(s).dump(); }

// The MLPerf log is Python's json.dumps output, which writes NaN and
// Infinity as bare words: read as numbers there. A system description is
// JSON proper (Strict): those words, a number beyond a double, a key given
// twice (which the checker's json.load would silently take the last of), a
// lone UTF-16 surrogate and anything else outside the JSON grammar are errors.
class Parser {
 public:
  static constexpr int kMostDepth = 256;
  enum class Mode { PythonLog, Strict };
  explicit Parser(std::string_view text, Mode mode = Mode::PythonLog) : s_(text), strict_(mode == Mode::Strict) {}

  Value document() {
    Value v = value();
    space();
    if (pos_ != s_.size()) fail("unexpected text after the value");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const { fail_at(what, pos_); }
  [[noreturn]] void fail_at(const std::string& what, std::size_t at) const {
    throw Error(fmt::format("{} at character {}", what, at + 1));
  }
  void space() {
    while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_;
  }
  bool eat(char c) {
    space();
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  void expect(char c) {
    if (!eat(c)) fail(fmt::format("expected '{}'", c));
  }
  bool word(std::string_view w) {
    if (s_.substr(pos_, w.size()) != w) return false;
    pos_ += w.size();
    return true;
  }

  Value value() {
    space();
    if (pos_ >= s_.size()) fail("unexpected end");
    Value v;
    const char c = s_[pos_];
    // Each level of nesting is a level of recursion: bounded, so that a
    // hostile file is an error, not a stack overflow.
    struct Level {
      int& depth;
      explicit Level(int& d) : depth(++d) {}
      ~Level() { --depth; }
    } level(depth_);
    if (depth_ > kMostDepth) fail(fmt::format("arrays and objects nest deeper than {} levels", kMostDepth));
    if (c == '{') {
      ++pos_;
      v.kind = Value::Kind::Object;
      if (eat('}')) return v;
      std::set<std::string> keys;
      do {
        space();
        const std::size_t at = pos_;
        std::string key = string_text();
        if (strict_ && !keys.insert(key).second) fail_at(fmt::format("key {} is given twice", Json(key).dump()), at);
        expect(':');
        v.members.emplace_back(std::move(key), value());
      } while (eat(','));
      expect('}');
    } else if (c == '[') {
      ++pos_;
      v.kind = Value::Kind::Array;
      if (eat(']')) return v;
      do v.items.push_back(value());
      while (eat(','));
      expect(']');
    } else if (c == '"') {
      v = Value::string(string_text());
    } else if (word("null")) {
      v.kind = Value::Kind::Null;
    } else if (word("true")) {
      v.kind = Value::Kind::Bool;
      v.boolean = true;
    } else if (word("false")) {
      v.kind = Value::Kind::Bool;
    } else if (const std::size_t from = pos_; word("NaN") || word("Infinity") || word("-Infinity")) {
      v.kind = Value::Kind::Number;  // Python's json.dumps writes these
      v.text = std::string(s_.substr(from, pos_ - from));
      if (strict_) fail_at(fmt::format("{} is not JSON (Python writes it; JSON numbers are finite)", v.text), from);
      v.number = v.text == "NaN" ? std::nan("") : (v.text[0] == '-' ? -HUGE_VAL : HUGE_VAL);
    } else {
      const std::size_t start = pos_;
      while (pos_ < s_.size() && (std::isdigit(static_cast<unsigned char>(s_[pos_])) || s_[pos_] == '-' ||
                                  s_[pos_] == '+' || s_[pos_] == '.' || s_[pos_] == 'e' || s_[pos_] == 'E'))
        ++pos_;
      if (pos_ == start) fail(fmt::format("unexpected '{}'", c));
      v.kind = Value::Kind::Number;
      v.text = std::string(s_.substr(start, pos_ - start));
      char* end = nullptr;
      errno = 0;
      v.number = std::strtod(v.text.c_str(), &end);
      if (end != v.text.c_str() + v.text.size() || (strict_ && !json_number(v.text)))
        fail_at(fmt::format("malformed number '{}'", v.text), start);
      if (strict_ && errno == ERANGE && std::isinf(v.number))
        fail_at(fmt::format("number {} is beyond a double's range", v.text), start);
    }
    return v;
  }

  // JSON's grammar of a number: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
  static bool json_number(std::string_view t) {
    std::size_t k = 0;
    auto digits = [&] {
      const std::size_t from = k;
      while (k < t.size() && std::isdigit(static_cast<unsigned char>(t[k]))) ++k;
      return k > from;
    };
    if (k < t.size() && t[k] == '-') ++k;
    if (k < t.size() && t[k] == '0') ++k;
    else if (!digits()) return false;
    if (k < t.size() && t[k] == '.' && (++k, !digits())) return false;
    if (k < t.size() && (t[k] == 'e' || t[k] == 'E')) {
      ++k;
      if (k < t.size() && (t[k] == '+' || t[k] == '-')) ++k;
      if (!digits()) return false;
    }
    return k == t.size();
  }

  // The four hex digits of a \u escape at pos_ (after the "\u").
  unsigned hex4() {
    if (pos_ + 4 > s_.size()) fail_at("short \\u escape", pos_ - 2);
    unsigned code = 0;
    for (std::size_t k = pos_; k < pos_ + 4; ++k) {
      const char h = s_[k];
      const int digit = h >= '0' && h <= '9' ? h - '0'
                        : h >= 'a' && h <= 'f' ? h - 'a' + 10
                        : h >= 'A' && h <= 'F' ? h - 'A' + 10
                                               : -1;
      if (digit < 0) fail_at(fmt::format("bad \\u escape '\\u{}'", s_.substr(pos_, 4)), pos_ - 2);
      code = code * 16 + static_cast<unsigned>(digit);
    }
    pos_ += 4;
    return code;
  }

  static void append_utf8(std::string& out, unsigned code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  std::string string_text() {
    if (pos_ >= s_.size() || s_[pos_] != '"') fail("expected a string");
    ++pos_;
    std::string out;
    while (pos_ < s_.size() && s_[pos_] != '"') {
      char c = s_[pos_++];
      if (c != '\\') {
        if (strict_ && static_cast<unsigned char>(c) < 0x20)
          fail_at(fmt::format("control character {:#04x} in a string (JSON writes it escaped)",
                              static_cast<unsigned char>(c)),
                  pos_ - 1);
        out += c;
        continue;
      }
      if (pos_ >= s_.size()) break;
      c = s_[pos_++];
      switch (c) {
        case '"': case '\\': case '/': out += c; break;
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'u': {
          // json.dumps writes a character beyond U+FFFF as a UTF-16 pair.
          const std::size_t at = pos_ - 2;
          unsigned code = hex4();
          const bool high = code >= 0xD800 && code <= 0xDBFF, low = code >= 0xDC00 && code <= 0xDFFF;
          if (high && s_.substr(pos_, 2) == "\\u") {
            const std::size_t before = pos_;
            pos_ += 2;
            const unsigned next = hex4();
            if (next >= 0xDC00 && next <= 0xDFFF) {
              append_utf8(out, 0x10000 + ((code - 0xD800) << 10) + (next - 0xDC00));
              break;
            }
            pos_ = before;
          }
          if (high || low) {
            // No character: an error in a system description; in a log
            // (copied into the package byte for byte, its strings only
            // compared) U+FFFD, as Python decodes it with errors="replace".
            if (strict_) fail_at(fmt::format("a lone UTF-16 surrogate \\u{:04x} (no character)", code), at);
            code = 0xFFFD;
          }
          append_utf8(out, code);
          break;
        }
        default: fail_at(fmt::format("bad escape '\\{}'", c), pos_ - 2);
      }
    }
    if (pos_ >= s_.size()) fail("unterminated string");
    ++pos_;
    return out;
  }

  std::string_view s_;
  std::size_t pos_ = 0;
  int depth_ = 0;
  bool strict_ = false;
};

std::string dump(const Value& v, int indent) {
  const std::string pad(static_cast<std::size_t>(indent + 4), ' '), end_pad(static_cast<std::size_t>(indent), ' ');
  switch (v.kind) {
    case Value::Kind::Null: return "null";
    case Value::Kind::Bool: return v.boolean ? "true" : "false";
    case Value::Kind::Number: return v.text;
    case Value::Kind::String: return quoted(v.text);
    case Value::Kind::Array: {
      std::string out = "[";
      for (std::size_t k = 0; k < v.items.size(); ++k) out += (k ? ", " : "") + dump(v.items[k], indent);
      return out + "]";
    }
    case Value::Kind::Object: {
      std::string out = "{\n";
      for (std::size_t k = 0; k < v.members.size(); ++k)
        out += pad + quoted(v.members[k].first) + ": " + dump(v.members[k].second, indent + 4) +
               (k + 1 < v.members.size() ? ",\n" : "\n");
      return out + end_pad + "}";
    }
  }
  return "null";
}

std::string read_text(const fs::path& path) {
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);
  if (fs::is_directory(status)) throw Error(fmt::format("{}: a folder, not a file", path.string()));
  // A device (/dev/zero never ends) or a pipe (an open that waits for a
  // writer) is no log, run file or system description.
  if (fs::exists(status) && !fs::is_regular_file(status))
    throw Error(fmt::format("{}: not a regular file (a device, a pipe or a socket); give a file", path.string()));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(fmt::format("{}: cannot be read", path.string()));
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// ---- one run's MLPerf log

struct Run {
  fs::path dir, log, run_file;
  std::map<std::string, Value> first;  // each key's first value
  double run_start_ms = 0, run_stop_ms = 0;
  std::string stop_status;
  std::optional<double> best_eval;  // the highest eval_accuracy logged
  double minutes() const { return (run_stop_ms - run_start_ms) / 60000.0; }
  // Whether the result summarizer counts the run: whether the checker
  // passes its log, by the rules of mlperf-logging's hpc 3.0.0 that a log of
  // deepcam-host can fail. An eval_accuracy in [0.82, 1] logged, whatever
  // run_stop's status (a run that went on past the benchmark's target,
  // to a target of its own, counts with all its time); in the closed
  // division also the full data set and the closed hyper-parameters. The
  // checker's verdict stays the authority (README: package_checker).
  bool reached_target() const { return best_eval && *best_eval >= kBenchmarkTargetIou && *best_eval <= 1.0; }
  bool full_data_set() const {
    return text("train_samples") == std::to_string(kClosedTrainSamples) &&
           text("eval_samples") == std::to_string(kClosedEvalSamples);
  }
  bool converged() const {
    return reached_target() &&
           (text("submission_division") != "closed" || (full_data_set() && closed_breaks().empty()));
  }
  // The closed division's rules on hyper-parameters (hpc 3.0.0's
  // closed_deepcam*.yaml) that a deepcam-host log can break: another
  // optimizer or schedule, Adam's eps, LAMB's settings, a warm-up factor
  // below 1, seed 0. Each broken one as "key value (closed: ...)".
  std::vector<std::string> closed_breaks() const {
    std::vector<std::string> breaks;
    const auto number = [&](const char* key) -> std::optional<double> {
      const auto it = first.find(key);
      if (it == first.end() || it->second.kind != Value::Kind::Number) return std::nullopt;
      return it->second.number;
    };
    const auto rule = [&](const char* key, bool holds, const char* closed) {
      if (!holds) breaks.push_back(fmt::format("{} {} (closed: {})", key, text(key).empty() ? "not logged" : text(key),
                                               closed));
    };
    const std::string optimizer = text("opt_name"), schedule = text("scheduler_type");
    rule("opt_name", optimizer == "Adam" || optimizer == "AdamW" || optimizer == "LAMB", "Adam, AdamW or LAMB");
    const std::optional<double> eps = number("opt_eps");
    rule("opt_eps", eps && std::fabs(*eps - 1e-6) <= 1e-9 * std::max(std::fabs(*eps), 1e-6), "1e-06");
    if (optimizer == "LAMB") {
      // The checker takes any value Python calls true.
      for (const char* key : {"opt_bias_correction", "opt_grad_averaging"}) {
        const auto it = first.find(key);
        const Value* v = it == first.end() ? nullptr : &it->second;
        rule(key,
             v && ((v->kind == Value::Kind::Bool && v->boolean) || (v->kind == Value::Kind::Number && v->number != 0) ||
                   (v->kind == Value::Kind::String && !v->text.empty()) || !v->items.empty() || !v->members.empty()),
             "true");
      }
      rule("opt_max_grad_norm", number("opt_max_grad_norm") == 1.0, "1.0");
    }
    rule("scheduler_type", schedule == "multistep" || schedule == "cosine_annealing", "multistep or cosine_annealing");
    rule("scheduler_lr_warmup_factor", number("scheduler_lr_warmup_factor") >= 1.0, "at least 1");
    const std::optional<double> decay = number("scheduler_decay_rate");
    if (schedule == "multistep") rule("scheduler_decay_rate", decay && *decay <= 1.0, "at most 1");
    if (schedule == "cosine_annealing") {
      rule("scheduler_t_max", number("scheduler_t_max") >= 1.0, "at least 1");
      rule("scheduler_eta_min", number("scheduler_eta_min") >= 0.0, "at least 0");
    }
    rule("seed", number("seed") > 0.0, "above 0");
    return breaks;
  }
  // What decided it, for messages.
  std::string outcome() const {
    const std::string status = fmt::format("run_stop status {}", stop_status.empty() ? "(none)" : stop_status);
    if (!reached_target())
      return fmt::format("{}; its best eval_accuracy ({}) is below the benchmark's target {}", status,
                         best_eval ? fmt::format("{:.4f}", *best_eval) : "none logged", kBenchmarkTargetIou);
    if (!full_data_set() && text("submission_division") == "closed")
      return fmt::format("{}; a closed-division run on {} training and {} validation samples, where the checker "
                         "wants the full data set's {} and {}",
                         status, text("train_samples"), text("eval_samples"), kClosedTrainSamples,
                         kClosedEvalSamples);
    if (!converged())
      return fmt::format("{}; a closed-division run whose log breaks the checker's closed rules: {}", status,
                         fmt::join(closed_breaks(), ", "));
    if (stop_status != "success")
      return fmt::format("{}, after its eval_accuracy reached the benchmark's target {} (the checker passes it, and "
                         "the summarizer counts it)",
                         status, kBenchmarkTargetIou);
    return status;
  }
  std::string text(const char* key) const {
    const auto it = first.find(key);
    return it == first.end() ? "" : it->second.text;  // a string's value or a number as written
  }
};

Run read_run(const fs::path& dir) {
  Run run;
  run.dir = dir;
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    throw Error(fmt::format("{}: not a directory (give the output folders of the runs: each holds its MLPerf log "
                            "and config.toml)",
                            dir.string()));
  run.run_file = dir / "config.toml";
  if (!fs::is_regular_file(run.run_file, ec))
    throw Error(fmt::format("{}: no config.toml there (the resolved run file deepcam-host writes beside the log)",
                            dir.string()));
  // The log is where the run's [mlperf] log_file put it, relative to the
  // folder; config.toml names it whether it was set or not.
  std::string log_file = "mlperf.log";
  try {
    const toml::table config = toml::parse_file(run.run_file.string());
    if (const auto* given = config.at_path("mlperf.log_file").as_string()) log_file = given->get();
  } catch (const toml::parse_error& e) {
    throw Error(fmt::format("{}:{}:{}: not the TOML deepcam-host writes: {}", run.run_file.string(),
                            e.source().begin.line, e.source().begin.column, e.description()));
  }
  run.log = dir / log_file;
  if (!fs::is_regular_file(run.log, ec))
    throw Error(fmt::format("{}: no MLPerf log there ({}, as its config.toml's [mlperf] log_file names it)",
                            dir.string(), log_file));
  std::istringstream lines(read_text(run.log));
  std::string line;
  bool started = false, stopped = false;
  std::optional<double> first_epoch;
  for (int number = 1; std::getline(lines, line); ++number) {
    const std::size_t at = line.find(kMarker);
    if (at == std::string::npos) continue;
    Value event;
    try {
      event = Parser(std::string_view(line).substr(at + std::string_view(kMarker).size())).document();
    } catch (const Error& e) {
      throw Error(fmt::format("{}:{}: not a JSON log line: {}", run.log.string(), number, e.what()));
    }
    const Value* key = event.find("key");
    const Value* time = event.find("time_ms");
    if (event.kind != Value::Kind::Object || !key || key->kind != Value::Kind::String || !time ||
        time->kind != Value::Kind::Number)
      throw Error(fmt::format("{}:{}: a log line needs \"key\" and \"time_ms\"", run.log.string(), number));
    // A time that is no number would score as one (NaN, or an infinite time to train).
    if (!std::isfinite(time->number))
      throw Error(fmt::format("{}:{}: \"time_ms\" is {}, not a finite number of milliseconds", run.log.string(),
                              number, python_float_repr(time->number)));
    const Value* value = event.find("value");
    run.first.emplace(key->text, value ? *value : Value{});
    if (key->text == "eval_accuracy" && value && value->kind == Value::Kind::Number && !std::isnan(value->number))
      run.best_eval = std::max(run.best_eval.value_or(value->number), value->number);
    if (key->text == "epoch_start" && !first_epoch) {
      const Value* meta = event.find("metadata");
      const Value* num = meta ? meta->find("epoch_num") : nullptr;
      first_epoch = num && num->kind == Value::Kind::Number ? num->number : 0.0;
      // deepcam-host's log of a resumed run begins at the epoch it resumes:
      // its run_start to run_stop leaves out the epochs before.
      if (*first_epoch != 1.0) {
        throw Error(fmt::format("{}:{}: the first epoch_start has epoch_num {}: a resumed run, whose time to train "
                                "leaves out the epochs before its resume; package runs trained from the start",
                                run.log.string(), number, python_float_repr(*first_epoch)));
      }
    }
    if (key->text == "run_start" && !started) {
      started = true;
      run.run_start_ms = time->number;
    } else if (key->text == "run_stop" && !stopped) {
      stopped = true;
      run.run_stop_ms = time->number;
      if (started && run.run_stop_ms < run.run_start_ms)
        throw Error(fmt::format("{}:{}: run_stop's time_ms ({}) is before run_start's ({}): a time to train below zero",
                                run.log.string(), number, python_float_repr(run.run_stop_ms),
                                python_float_repr(run.run_start_ms)));
      const Value* meta = event.find("metadata");
      const Value* status = meta ? meta->find("status") : nullptr;
      run.stop_status = status && status->kind == Value::Kind::String ? status->text : "";
    }
  }
  if (!started) throw Error(fmt::format("{}: no run_start: the run did not begin training", run.log.string()));
  if (!stopped)
    throw Error(fmt::format("{}: no run_stop: the run did not end (still running, or killed)", run.log.string()));
  const std::string benchmark = run.text("submission_benchmark");
  if (benchmark != kBenchmark)
    throw Error(fmt::format("{}: submission_benchmark is '{}', not '{}'", run.log.string(), benchmark, kBenchmark));
  for (const char* key : {"submission_division", "submission_org", "submission_status", "number_of_nodes",
                          "accelerators_per_node"})
    if (!run.first.count(key)) throw Error(fmt::format("{}: no {} line", run.log.string(), key));
  return run;
}

// ---- this machine, for the host fields of the system description

struct HostFacts {
  std::string cpu_model, os;
  int sockets = 0, cores_per_socket = 0, vcpus = 0;
  double memory_gb = 0;
};

HostFacts this_host() {
  HostFacts h;
  std::set<std::string> physical_ids;
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  auto field = [](const std::string& l) {
    const auto colon = l.find(':');
    std::string v = colon == std::string::npos ? "" : l.substr(colon + 1);
    const auto first = v.find_first_not_of(" \t");
    return first == std::string::npos ? std::string() : v.substr(first);
  };
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("processor", 0) == 0) ++h.vcpus;
    else if (line.rfind("model name", 0) == 0 && h.cpu_model.empty()) h.cpu_model = field(line);
    else if (line.rfind("physical id", 0) == 0) physical_ids.insert(field(line));
    else if (line.rfind("cpu cores", 0) == 0 && h.cores_per_socket == 0)
      h.cores_per_socket = std::atoi(field(line).c_str());
  }
  h.sockets = std::max<int>(1, static_cast<int>(physical_ids.size()));
  if (h.cores_per_socket == 0) h.cores_per_socket = std::max(1, h.vcpus / h.sockets);
  std::ifstream meminfo("/proc/meminfo");
  while (std::getline(meminfo, line))
    if (line.rfind("MemTotal:", 0) == 0) h.memory_gb = std::atof(field(line).c_str()) / (1024.0 * 1024.0);
  std::ifstream release("/etc/os-release");
  while (std::getline(release, line))
    if (line.rfind("PRETTY_NAME=", 0) == 0) {
      h.os = line.substr(12);
      if (h.os.size() >= 2 && h.os.front() == '"') h.os = h.os.substr(1, h.os.size() - 2);
    }
  return h;
}

Value number(long long n) {
  Value v;
  v.kind = Value::Kind::Number;
  v.number = static_cast<double>(n);
  v.text = std::to_string(n);
  return v;
}

Value number(double x) {
  Value v;
  v.kind = Value::Kind::Number;
  v.number = x;
  v.text = python_float_repr(x);  // every digit: the summarizer's score compares exactly
  return v;
}

Value system_description(const PackageOptions& o, const Run& first, std::vector<std::string>& empty_fields) {
  const HostFacts host = this_host();
  const std::string accelerators = first.text("accelerators_per_node");
  std::vector<std::pair<std::string, std::string>> fields = {
      {"submitter", first.text("submission_org")},
      {"division", first.text("submission_division")},
      {"status", first.text("submission_status")},
      {"system_name", o.system},
      {"number_of_nodes", first.text("number_of_nodes")},
      {"host_processors_per_node", std::to_string(host.sockets)},
      {"host_processor_model_name", host.cpu_model},
      {"host_processor_core_count", std::to_string(host.cores_per_socket)},
      {"host_processor_vcpu_count", std::to_string(host.vcpus)},
      {"host_processor_frequency", ""},
      {"host_processor_caches", ""},
      {"host_processor_interconnect", ""},
      {"host_memory_capacity", host.memory_gb > 0 ? fmt::format("{:.0f} GB", host.memory_gb) : ""},
      {"host_storage_type", ""},
      {"host_storage_capacity", ""},
      {"host_networking", ""},
      {"host_networking_topology", ""},
      {"host_memory_configuration", ""},
      {"accelerators_per_node", accelerators},
      {"accelerator_model_name", accelerators == "0" ? "none" : ""},
      {"accelerator_host_interconnect", ""},
      {"accelerator_frequency", ""},
      {"accelerator_on-chip_memories", ""},
      {"accelerator_memory_configuration", ""},
      {"accelerator_memory_capacity", ""},
      {"accelerator_interconnect", ""},
      {"accelerator_interconnect_topology", ""},
      {"cooling", ""},
      {"hw_notes", ""},
      {"framework", fmt::format("deepcam-host {}, LibTorch {}", DEEPCAM_VERSION, DEEPCAM_TORCH_VERSION)},
      {"other_software_stack", ""},
      {"operating_system", host.os},
      {"sw_notes", "packaged by deepcam-data package"},
  };
  Value desc;
  desc.kind = Value::Kind::Object;
  for (auto& [k, v] : fields) desc.members.emplace_back(k, Value::string(v));
  if (!o.system_desc.empty()) {
    Value given;
    try {
      const std::string text = read_text(o.system_desc);
      // Copied into systems/NAME.json, which the checker reads as UTF-8.
      if (const std::string problem = utf8_problem(text); !problem.empty())
        throw Error(fmt::format("not UTF-8 ({})", problem));
      given = Parser(text, Parser::Mode::Strict).document();
    } catch (const Error& e) {
      throw Error(fmt::format("--system-desc {}: {}", o.system_desc.string(), e.what()));
    }
    if (given.kind != Value::Kind::Object)
      throw Error(fmt::format("--system-desc {}: a JSON object of system description fields is expected",
                              o.system_desc.string()));
    for (auto& [k, v] : given.members) {
      if (v.kind != Value::Kind::String && v.kind != Value::Kind::Number)
        throw Error(fmt::format("--system-desc {}: field \"{}\" must be a string or a number",
                                o.system_desc.string(), k));
      if (k == "system_name" && v.text != o.system)
        throw Error(fmt::format("--system-desc {}: system_name is \"{}\" but --system is \"{}\"",
                                o.system_desc.string(), v.text, o.system));
      if ((k == "division" || k == "submitter" || k == "status") && v.text != desc.find(k)->text)
        throw Error(fmt::format("--system-desc {}: {} is \"{}\" but the logs say \"{}\"", o.system_desc.string(),
                                k, v.text, desc.find(k)->text));
      // The counts the logs fix: the accelerators of a node, and at least
      // the nodes the runs used (a larger system may be described: the
      // throughput instances may have used more of it at once).
      if (k == "accelerators_per_node" || k == "number_of_nodes") {
        const std::string& logged = desc.find(k)->text;
        char* end = nullptr;
        const double given_count = std::strtod(v.text.c_str(), &end);
        const bool whole = !v.text.empty() && *end == '\0' && std::isfinite(given_count) &&
                           given_count == std::floor(given_count);
        const double logged_count = std::strtod(logged.c_str(), nullptr);
        if (!whole || (k == "accelerators_per_node" ? given_count != logged_count : given_count < logged_count)) {
          throw Error(fmt::format("--system-desc {}: {} is \"{}\" but the logs say \"{}\"{}", o.system_desc.string(), k,
                                  v.text, logged,
                                  k == "number_of_nodes" ? " (a whole number at least that may describe a larger "
                                                           "system)"
                                                         : ""));
        }
      }
      auto it = std::find_if(desc.members.begin(), desc.members.end(), [&](const auto& m) { return m.first == k; });
      if (it != desc.members.end()) it->second = v;
      else desc.members.emplace_back(k, v);
    }
  }
  for (const auto& [k, v] : desc.members)
    if (v.kind == Value::Kind::String && v.text.empty()) empty_fields.push_back(k);
  return desc;
}

// Writes `text` to root/rel, root being the hidden folder the package is
// made in. A failure names the file as the package would hold it
// (`shown`/rel: --out's name, not the hidden folder, which is removed) and
// the cause of the failed write itself (a full disk), read from errno at
// once.
void write_file(const fs::path& root, const fs::path& shown, const fs::path& rel, const std::string& text) {
  const fs::path path = root / rel;
  const std::string name = (shown / rel).string();
  std::error_code ec;
  fs::create_directories(path.parent_path(), ec);
  if (ec) throw Error(fmt::format("{}: cannot make its folder: {}", name, ec.message()));
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw Error(write_error_text(name, errno));
  int err = 0;
  for (std::size_t done = 0; done < text.size();) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      err = errno;
      break;
    }
    done += static_cast<std::size_t>(n);
  }
  if (::close(fd) != 0 && err == 0) err = errno;
  if (err != 0) throw Error(write_error_text(name, err));
}

// mlperf_logging's result count for deepcam: exactly this many time-to-solution
// runs, and at least this many throughput instances.
constexpr std::size_t kRequiredRuns = 5;

long long count_in(const Run& r, const char* key) {
  const std::string text = r.text(key);
  char* end = nullptr;
  const long long n = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || n < 0)
    throw Error(fmt::format("{}: {} is '{}', not a count", r.log.string(), key, text));
  return n;
}

// The throughput measurement (MLPerf HPC's weak scaling): M instances trained
// to the target, each on S accelerators (nodes where there are none, as the
// result summarizer counts), scored by the time from the first run_start to
// the last run_stop.
struct Throughput {
  long long instance_scale = 0;
  long long most_at_once = 0;  // instances training at the same time, at most
  long long tts_scale = 0;     // the time-to-solution runs' scale, which the system description counts
  double first_start_ms = 0, last_stop_ms = 0;
  double minutes() const { return (last_stop_ms - first_start_ms) / 60000.0; }
};

Throughput throughput_of(const std::vector<Run>& instances, const Run& tts) {
  Throughput t;
  t.tts_scale = count_in(tts, "number_of_nodes") * std::max(count_in(tts, "accelerators_per_node"), 1LL);
  const Run& first = instances.front();
  std::map<std::string, const Run*> seeds;
  std::vector<std::pair<double, int>> edges;  // (time, +1 at run_start or -1 at run_stop)
  for (const Run& r : instances) {
    for (const char* key : {"submission_division", "submission_org", "submission_status"})
      if (r.text(key) != tts.text(key))
        throw Error(fmt::format("{}: {} is '{}' but the time-to-solution run {} has '{}': one package holds runs of "
                                "one system",
                                r.log.string(), key, r.text(key), tts.log.string(), tts.text(key)));
    // The rules count only instances that reached the target, and leave the
    // others out of the package (with their run_start and run_stop the
    // summarizer would count them).
    if (!r.converged())
      throw Error(fmt::format("{}: {}: every throughput instance must reach the target; leave this one out (the rules "
                              "allow leaving instances out)",
                              r.log.string(), r.outcome()));
    const long long scale = count_in(r, "number_of_nodes") * std::max(count_in(r, "accelerators_per_node"), 1LL);
    if (&r == &first) t.instance_scale = scale;
    else if (scale != t.instance_scale)
      throw Error(fmt::format("{}: instance scale {} (number_of_nodes x accelerators_per_node) but {} has {}: every "
                              "throughput instance trains at one scale",
                              r.log.string(), scale, first.log.string(), t.instance_scale));
    const std::string seed = r.text("seed");
    if (seed.empty()) throw Error(fmt::format("{}: no seed line", r.log.string()));
    if (const auto [it, fresh] = seeds.emplace(seed, &r); !fresh)
      throw Error(fmt::format("{}: seed {}, as {}: instances with the same seed must be left out (the rules); give "
                              "each instance its own seed",
                              r.log.string(), seed, it->second->log.string()));
    edges.emplace_back(r.run_start_ms, +1);
    edges.emplace_back(r.run_stop_ms, -1);
  }
  // At equal times a stop comes before a start: one instance ending as the
  // next begins is not two at once.
  std::sort(edges.begin(), edges.end());
  long long running = 0;
  for (const auto& [time, step] : edges) t.most_at_once = std::max(t.most_at_once, running += step);
  t.first_start_ms = edges.front().first;
  t.last_stop_ms = std::max_element(instances.begin(), instances.end(), [](const Run& a, const Run& b) {
                     return a.run_stop_ms < b.run_stop_ms;
                   })->run_stop_ms;
  return t;
}

// The last name of `path`, past any trailing '/': "pkg" of "pkg/", ".." of "new/..".
std::string last_name(const fs::path& path) {
  std::string text = path.string();
  while (text.size() > 1 && text.back() == '/') text.pop_back();
  return fs::path(text).filename().string();
}

bool valid_system_name(const std::string& s) {
  return !s.empty() && s != "." && s != ".." && std::all_of(s.begin(), s.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.' || c == '+';
  });
}

}  // namespace

PackageOptions parse_package_args(const std::vector<std::string>& args, std::string& error) {
  PackageOptions o;
  OptionsSeen seen("package");
  bool throughput = false;  // the run folders after --throughput are its instances
  for (std::size_t k = 0; k < args.size(); ++k) {
    std::string option = args[k], value;
    if (option.rfind("--", 0) != 0) {
      (throughput ? o.throughput_runs : o.runs).emplace_back(option);
      continue;
    }
    if (option == "--throughput") {
      if (error = seen.again(option); !error.empty()) return o;
      throughput = true;
      continue;
    }
    const std::string name = option.substr(0, option.find('='));
    if (name == "--throughput") {
      error = "package: --throughput takes no value: the run folders after it are the instances";
      return o;
    }
    if (name != "--system" && name != "--out" && name != "--system-desc") {
      error = fmt::format("package: unknown option {}", name);
      return o;
    }
    if (name != option) {
      value = option.substr(name.size() + 1);
      option = name;
    } else if (k + 1 < args.size()) {
      value = args[++k];
    } else {
      error = fmt::format("{} needs a value", option);
      return o;
    }
    if (error = seen.again(option); !error.empty()) return o;
    if (value.empty()) {
      error = fmt::format("package: {} is empty; give its value", option);
      return o;
    }
    if (option == "--system") o.system = value;
    else if (option == "--out") o.out = value;
    else o.system_desc = value;
  }
  if (o.runs.empty())
    error = throughput ? "package: give the time-to-solution runs (RUN_DIR...) before --throughput: the rules allow "
                         "a throughput score only beside a time-to-solution score of the same benchmark"
                       : "package: give the output folders of the runs (RUN_DIR...)";
  else if (throughput && o.throughput_runs.empty())
    error = "package: --throughput: give the output folders of the instances after it";
  else if (o.system.empty()) error = "package: --system NAME is required";
  else if (o.system == "." || o.system == "..")
    error = fmt::format("package: --system '{}': a folder's name, not a system's (it names the files "
                        "systems/NAME.json and results/NAME/)",
                        o.system);
  else if (!valid_system_name(o.system))
    error = fmt::format("package: --system '{}': use letters, digits and _ - . + only (it names a file)", o.system);
  else if (o.out.empty()) error = "package: --out DIR is required";
  else if (const std::string name = last_name(o.out); name == "." || name == "..")
    // It names a folder that exists, by another name: the package would be
    // written beside it and fail to be renamed into it.
    error = fmt::format("package: --out {}: ends in '.' or '..'; name the package folder itself", o.out.string());
  return o;
}

static int write_package(const PackageOptions& o);

int run_package(const PackageOptions& o) {
  try {
    return write_package(o);
  } catch (const fs::filesystem_error& e) {
    // A folder of the package that cannot be made (a read-only or full file
    // system): named with --out, in words, not as the library's exception.
    throw Error(fmt::format("--out {}: cannot write the package: {}: {}", o.out.string(), e.path1().string(),
                            e.code().message()));
  }
}

static int write_package(const PackageOptions& o) {
  std::error_code ec;
  // The folder itself, as the rename at the end names it: "pkg/" is pkg.
  fs::path out = fs::absolute(o.out).lexically_normal();
  if (!out.has_filename()) out = out.parent_path();
  if (fs::exists(fs::symlink_status(out, ec)))
    throw Error(fmt::format("--out {}: exists already; give a new folder (the package is written whole)",
                            o.out.string()));
  std::vector<Run> runs, instances;
  std::vector<fs::path> seen;
  auto read_runs = [&](const std::vector<fs::path>& dirs, std::vector<Run>& into) {
    for (const auto& dir : dirs) {
      // The same run twice (a link, a trailing slash) would be scored as two.
      for (const fs::path& earlier : seen) {
        if (fs::equivalent(earlier, dir, ec)) {
          throw Error(fmt::format("{}: the same run as {}; give each run once", dir.string(), earlier.string()));
        }
      }
      into.push_back(read_run(dir));
      seen.push_back(dir);
    }
  };
  read_runs(o.runs, runs);
  read_runs(o.throughput_runs, instances);
  const Run& first = runs.front();
  for (const Run& r : runs)
    for (const char* key :
         {"submission_division", "submission_org", "submission_status", "number_of_nodes", "accelerators_per_node"})
      if (r.text(key) != first.text(key))
        throw Error(fmt::format("{}: {} is '{}' but {} has '{}': one package holds runs of one system", r.log.string(),
                                key, r.text(key), first.log.string(), first.text(key)));
  // What mlperf-logging's package checker holds a closed division's runs
  // to: one global batch size (its RCP check fails on several), each its
  // own seed (a copy of a run is one too).
  if (first.text("submission_division") == "closed") {
    std::map<std::string, const Run*> seeds;
    for (const Run& r : runs) {
      if (r.text("global_batch_size") != first.text("global_batch_size"))
        throw Error(fmt::format("{}: global_batch_size is '{}' but {} has '{}': the package checker wants one batch "
                                "size across a closed division's runs",
                                r.log.string(), r.text("global_batch_size"), first.log.string(),
                                first.text("global_batch_size")));
      if (const auto [it, fresh] = seeds.emplace(r.text("seed"), &r); !fresh)
        throw Error(fmt::format("{}: seed {}, as {}: the package checker wants each closed run's own seed (a copied "
                                "run has its original's); give each run its own seed",
                                r.log.string(), r.text("seed"), it->second->log.string()));
    }
  }
  const Throughput throughput = instances.empty() ? Throughput{} : throughput_of(instances, first);
  // A throughput instance that is one of the time-to-solution runs (a copy
  // of its folder) would count twice.
  for (const Run& i : instances)
    for (const Run& r : runs)
      if (i.text("seed") == r.text("seed") && i.run_start_ms == r.run_start_ms)
        throw Error(fmt::format("{}: the run of {} (its seed and run_start), given as a throughput instance too; an "
                                "instance is a run of its own",
                                i.log.string(), r.log.string()));
  std::vector<std::string> empty_fields;
  const Value desc = system_description(o, first, empty_fields);

  // Everything goes into a temporary folder beside --out, renamed at the end.
  const fs::path parent = out.parent_path();
  fs::create_directories(parent);
  const fs::path temp = temporary_files::hidden_name(out);
  fs::remove_all(temp, ec);
  struct Cleanup {
    fs::path path;
    bool keep = false;
    ~Cleanup() {
      std::error_code ignored;
      if (!keep) fs::remove_all(path, ignored);
    }
  } cleanup{temp};

  const fs::path results = fs::path("results") / o.system / "strong" / kBenchmark;
  const fs::path run_files =
      fs::path("benchmarks") / kBenchmark / "implementations" / "deepcam-host" / "run_files" / o.system;
  std::vector<double> scores;
  int dropped = 0;
  Value per_run;
  per_run.kind = Value::Kind::Array;
  for (std::size_t n = 0; n < runs.size(); ++n) {
    throw_if_stopped();
    const Run& r = runs[n];
    // Copied through write_file, which names the file and the reason (a
    // full disk) where std::filesystem::copy_file says "Input/output error".
    write_file(temp, o.out, results / fmt::format("result_{}.txt", n), read_text(r.log));
    write_file(temp, o.out, run_files / fmt::format("result_{}.toml", n), read_text(r.run_file));
    if (r.converged()) scores.push_back(r.minutes());
    else ++dropped;
    deepcam::oprint("result_{}.txt: {}: time to train {:.4f} min, {}{}\n", n, r.dir.string(), r.minutes(), r.outcome(),
                    r.converged() ? "" : ": not counted");
    Value entry;
    entry.kind = Value::Kind::Object;
    entry.members.emplace_back("result", Value::string(fmt::format("result_{}.txt", n)));
    entry.members.emplace_back("run_dir", Value::string(fs::absolute(r.dir).lexically_normal().string()));
    entry.members.emplace_back("status", Value::string(r.stop_status));
    entry.members.emplace_back("counted", Value::boolean_of(r.converged()));
    entry.members.emplace_back("time_to_train_minutes", number(r.minutes()));
    per_run.items.push_back(std::move(entry));
  }
  write_file(temp, o.out, fs::path("systems") / (o.system + ".json"), dump(desc, 0) + "\n");
  Value throughput_summary;
  if (!instances.empty()) {
    const fs::path weak_results = fs::path("results") / o.system / "weak" / kBenchmark;
    throughput_summary.kind = Value::Kind::Object;
    Value per_instance;
    per_instance.kind = Value::Kind::Array;
    for (std::size_t n = 0; n < instances.size(); ++n) {
      throw_if_stopped();
      const Run& r = instances[n];
      write_file(temp, o.out, weak_results / fmt::format("result_{}.txt", n), read_text(r.log));
      write_file(temp, o.out, run_files / "weak" / fmt::format("result_{}.toml", n), read_text(r.run_file));
      deepcam::oprint(
          "weak/result_{}.txt: {}: seed {}, run_start {:.3f} min and run_stop {:.3f} min after the first "
          "run_start\n",
          n, r.dir.string(), r.text("seed"), (r.run_start_ms - throughput.first_start_ms) / 60000.0,
          (r.run_stop_ms - throughput.first_start_ms) / 60000.0);
      Value entry;
      entry.kind = Value::Kind::Object;
      entry.members.emplace_back("result", Value::string(fmt::format("weak/result_{}.txt", n)));
      entry.members.emplace_back("run_dir", Value::string(fs::absolute(r.dir).lexically_normal().string()));
      entry.members.emplace_back("seed", Value::string(r.text("seed")));
      entry.members.emplace_back("time_to_train_minutes", number(r.minutes()));
      per_instance.items.push_back(std::move(entry));
    }
    const bool enough = instances.size() >= kRequiredRuns;
    throughput_summary.members.emplace_back("instances", per_instance);
    throughput_summary.members.emplace_back("number_of_models", number(static_cast<long long>(instances.size())));
    throughput_summary.members.emplace_back("instance_scale", number(throughput.instance_scale));
    throughput_summary.members.emplace_back("most_instances_at_once", number(throughput.most_at_once));
    throughput_summary.members.emplace_back("time_to_train_all_minutes",
                                            enough ? number(throughput.minutes()) : Value{});
  }

  // The result summarizer's olympic mean: at most one run may be dropped; of
  // the scores left, the fastest is dropped and, unless a run was already
  // dropped, the slowest too.
  constexpr int kMaxDropped = 1;
  std::optional<double> score;
  std::sort(scores.begin(), scores.end());
  if (dropped <= kMaxDropped && scores.size() > static_cast<std::size_t>(2 * kMaxDropped - dropped)) {
    const auto begin = scores.begin() + kMaxDropped;
    const auto end = scores.end() - (kMaxDropped - dropped);
    double sum = 0;
    for (auto it = begin; it != end; ++it) sum += *it;
    score = sum / static_cast<double>(end - begin);
  }
  Value summary;
  summary.kind = Value::Kind::Object;
  summary.members.emplace_back("system", Value::string(o.system));
  summary.members.emplace_back("benchmark", Value::string(kBenchmark));
  summary.members.emplace_back("division", Value::string(first.text("submission_division")));
  summary.members.emplace_back("runs", per_run);
  summary.members.emplace_back("dropped_runs", number(static_cast<long long>(dropped)));
  summary.members.emplace_back("score_minutes", score ? number(*score) : Value{});
  if (!instances.empty()) summary.members.emplace_back("throughput", throughput_summary);
  write_file(temp, o.out, "score.json", dump(summary, 0) + "\n");

  fs::rename(temp, out, ec);
  if (ec) throw Error(fmt::format("--out {}: cannot rename {} to it: {}", out.string(), temp.string(), ec.message()));
  cleanup.keep = true;

  deepcam::oprint("package: {} runs of {} ({} division) in {}\n", runs.size(), o.system,
                  first.text("submission_division"), out.string());
  if (runs.size() != kRequiredRuns)
    deepcam::oprint(
        "package: note: the package checker wants exactly {} results for deepcam (strong scaling), "
        "this package has {}\n",
        kRequiredRuns, runs.size());
  if (!empty_fields.empty()) {
    std::string list;
    for (const auto& f : empty_fields) list += (list.empty() ? "" : ", ") + f;
    deepcam::oprint(
        "package: systems/{}.json: the host fields describe this machine; left empty (fill them in, or give "
        "--system-desc FILE): {}\n",
        o.system, list);
  }
  int status = 0;
  if (!score) {
    // Too many runs that did not converge, or too few that did.
    const std::string rule = dropped > kMaxDropped
                                 ? fmt::format("the olympic mean allows at most {} such run", kMaxDropped)
                                 : fmt::format("the olympic mean needs at least {} converged runs beside {} such",
                                               2 * kMaxDropped - dropped + 1, dropped);
    deepcam::eprint(
        "deepcam-data: package: no score: {} of {} runs did not converge (the benchmark's target IoU {} not "
        "reached, or a closed-division run short of the full data set or of its rules); {}\n",
        dropped, runs.size(), kBenchmarkTargetIou, rule);
    status = 1;
  } else {
    deepcam::oprint("score: {:.4f} minutes (olympic mean of {} runs: time to train from run_start to run_stop)\n",
                    *score, scores.size());
  }
  if (!instances.empty()) {
    if (instances.size() < kRequiredRuns) {
      deepcam::eprint(
          "deepcam-data: package: no throughput score: {} instances; the rules want at least {} for deepcam\n",
          instances.size(), kRequiredRuns);
      status = 1;
    } else {
      deepcam::oprint(
          "throughput: {} models of instance scale {} (at most {} at once) in {:.4f} minutes (time to train "
          "all: the first run_start to the last run_stop)\n",
          instances.size(), throughput.instance_scale, throughput.most_at_once, throughput.minutes());
    }
    // The system description's counts are the time-to-solution runs'; the
    // instances at once may have used more of the system.
    if (throughput.most_at_once * throughput.instance_scale > throughput.tts_scale)
      deepcam::oprint(
          "package: note: systems/{}.json counts the nodes of the time-to-solution runs (scale {}); the "
          "throughput instances used up to {} x {} at once: if the system is larger, give its "
          "number_of_nodes with --system-desc FILE\n",
          o.system, throughput.tts_scale, throughput.most_at_once, throughput.instance_scale);
  }
  return status;
}

}  // namespace deepcam::data
