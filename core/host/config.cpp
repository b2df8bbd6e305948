#include "deepcam/config.hpp"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string_view>
#include <toml++/toml.h>
#include <torch/cuda.h>

#include "deepcam/data_set.hpp"
#include "deepcam/error.hpp"
#include "deepcam/json.hpp"
#include "deepcam/stop_request.hpp"

namespace deepcam {

namespace {

constexpr double kNoMin = 1.0, kNoMax = 0.0;  // min > max: unbounded

const ParamSpec kRunSpecs[] = {
    {"seed", ParamType::Int, "1",
     "random seed of model init and data order (MLPerf needs > 0); \"auto\": drawn from the clock by rank 0 at "
     "start, logged and written into config.toml",
     1, 9.2e18},
    {"output_dir", ParamType::Path, "\"runs/default\"",
     "where the MLPerf log, the resolved config and checkpoints go"},
    {"max_epochs", ParamType::Int, "50", "stop after this many epochs if the target is not reached", 1, kUnbounded},
    {"target_iou", ParamType::Float, "0.82", "validation IoU that ends the run (SPEC 4.3)", 0, 1},
    {"logging_frequency", ParamType::Int, "10",
     "log train loss/accuracy and a progress line every this many steps; 0: only at epoch ends", 0, kUnbounded},
    {"progress_seconds", ParamType::Float, "30",
     "a progress line on stderr at least this often in training and validation, whatever logging_frequency is; "
     "0: only at logging steps",
     0, kUnbounded},
    {"train_batch_size", ParamType::Int, "2", "local (per-rank) training batch size", 1, 1e6},
    {"validation_batch_size", ParamType::Int, "1", "local (per-rank) validation batch size", 1, 1e6},
    {"gradient_accumulation_frequency", ParamType::Int, "1", "batches per optimizer step", 1, 1e6},
    {"device", ParamType::String, "\"cpu\"", "where the model runs; auto: cuda when a GPU is present, else cpu",
     kNoMin, kNoMax, "cpu|cuda|auto"},
    {"threads", ParamType::Int, "0", "intra-op CPU threads of LibTorch; 0 keeps its default", 0, 4096},
    {"checkpoint_every", ParamType::Int, "0",
     "save a checkpoint every this many epochs; 0: only at the end (after run_stop); -1: none at all (a benchmark run)",
     -1, kUnbounded},
    {"resume", ParamType::Path, "\"\"", "checkpoint to resume from (step, epoch, model, optimizer)"},
    {"resume_weights_only", ParamType::Bool, "false",
     "resume from a checkpoint that has no optimizer state (the model's weights only; the optimizer starts "
     "afresh); without it such a checkpoint is an error"},
    {"overwrite", ParamType::Bool, "false",
     "replace the checkpoints and MLPerf log of an earlier run in output_dir; without it such a run is refused "
     "(unless it resumes from one of them)"},
    {"rendezvous", ParamType::String, "\"env\"",
     "how the ranks meet: \"env\" (MASTER_ADDR, MASTER_PORT), \"tcp://HOST:PORT\" (rank 0 hosts the store) or "
     "\"file:///PATH\" (a file on a file system all ranks share, left by no earlier run)"},
    {"comm_timeout_s", ParamType::Float, "1800",
     "seconds a collective or the rendezvous may wait before the run stops naming the rank that was lost", 1, 1e6},
    {"bucket_cap_mb", ParamType::Float, "25", "size of a gradient all-reduce bucket in MiB (DDP's bucket_cap_mb)",
     0.001, 1e5},
    {"precision", ParamType::String, "\"fp32\"",
     "fp32, or autocast around forward and loss as torch.autocast: amp_bf16, or amp_fp16 with "
     "torch.amp.GradScaler's dynamic loss scaling",
     kNoMin, kNoMax, "fp32|amp_fp16|amp_bf16"},
    {"memory_format", ParamType::String, "\"contiguous\"",
     "layout of the model's 4-d weights, its inputs and their gradients: contiguous (NCHW) or channels_last (NHWC)",
     kNoMin, kNoMax, "contiguous|channels_last"},
    {"cudnn_benchmark", ParamType::Bool, "true",
     "let cuDNN time its algorithms for each convolution shape on the first steps (CUDA only)"},
    {"cuda_graphs", ParamType::Bool, "false",
     "capture the training step (forward, loss, backward, on many ranks the NCCL all-reduce, optimizer step) in a "
     "CUDA graph after 3 eager steps and replay it (CUDA, no gradient accumulation, fp32 or amp_bf16, a fused "
     "optimizer)"},
    {"batchnorm_group_size", ParamType::Int, "1",
     "ranks (consecutive) whose BatchNorm statistics are shared in training, as torch.nn.SyncBatchNorm; "
     "1: each rank its own; must divide the number of ranks (or exceed it: all ranks)",
     1, 1e6},
};

const ParamSpec kDataSpecs[] = {
    {"root", ParamType::Path, nullptr, "data set root holding train/, validation/ and stats.h5"},
    {"channels", ParamType::IntList, "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]",
     "input channels, in this order, each at most once", 0, 15},
};

const ParamSpec kMlperfSpecs[] = {
    {"org", ParamType::String, "\"deepcam-host\"", "submission_org"},
    {"platform", ParamType::String, "\"cpu\"", "submission_platform"},
    {"division", ParamType::String, "\"open\"", "submission_division", kNoMin, kNoMax, "open|closed"},
    {"status", ParamType::String, "\"research\"", "submission_status", kNoMin, kNoMax,
     "cloud|onprem|preview|research"},
    {"log_file", ParamType::String, "\"mlperf.log\"", "the MLPerf log, relative to run.output_dir"},
    {"cache_clear", ParamType::Bool, "false",
     "cache_clear: true records that the job dropped the page cache on every node before this run (run.sub's "
     "CLEAR_CACHES=1 sets it); deepcam-host drops nothing itself"},
};

const std::vector<std::string> kPluginSections = {"reader", "model", "optimizer", "scheduler"};
const std::vector<std::string> kSections = {"run", "data", "mlperf", "reader", "model", "optimizer",
                                            "scheduler"};

std::size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1] ? 1 : 0)});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

struct Location {
  std::string file;
  std::string section;
  std::map<std::string, std::string> overridden;  // key -> the --set item that set it

  // The file a key's node was read from: with several run files, the one
  // that set it (merging moves nodes, which keeps their source).
  std::string file_of(const toml::node* node) const {
    return node && node->source().path ? *node->source().path : file;
  }

  // A relative path set in a file is taken from that file's folder; one
  // set with --set or left at its default, or set in a run file given as a
  // file descriptor (`<(generate)`, /dev/stdin: no folder of the user's),
  // from the current directory.
  std::string resolve(const std::string& key, const std::string& value, bool from_file,
                      const toml::node* node = nullptr) const {
    if (value.empty()) return value;
    std::filesystem::path p(value);
    if (p.is_relative()) {
      const std::filesystem::path folder = std::filesystem::absolute(file_of(node)).lexically_normal().parent_path();
      const bool descriptor = folder == "/dev" || folder == "/dev/fd" || folder == "/proc/self/fd";
      const bool in_file = from_file && !overridden.count(key) && !descriptor;
      p = (in_file ? folder : std::filesystem::current_path()) / p;
    }
    return p.lexically_normal().string();
  }

  std::string at(const std::string& key, const toml::node* node) const {
    if (auto it = overridden.find(key); it != overridden.end()) return "--set " + it->second;
    if (node && node->source().begin.line > 0) {
      return fmt::format("{}:{} [{}] {}", file_of(node), node->source().begin.line, section, key);
    }
    return fmt::format("{} [{}] {}", file_of(node), section, key);
  }
};

// A plugin table's `library` key: a path, resolved from the run file's
// folder; "" when the key is absent (the plugin is searched for by name).
std::string library_path(const toml::node* lib, const Location& loc) {
  if (!lib) return "";
  if (!lib->is_string()) throw Error(fmt::format("{}: expected a string path", loc.at("library", lib)));
  const std::string given = *lib->value<std::string>();
  if (given.empty()) {
    throw Error(fmt::format("{}: an empty path; name the plugin's library, or leave the key out to find the plugin "
                            "by its name",
                            loc.at("library", lib)));
  }
  return loc.resolve("library", given, /*from_file=*/true, lib);
}

std::string did_you_mean(const std::string& word, const std::vector<std::string>& known) {
  const std::string m = closest_match(word, known);
  return m.empty() ? "" : fmt::format("; did you mean '{}'?", m);
}

ParamValue parse_default(const ParamSpec& spec);

std::string type_name(const toml::node& node) {
  switch (node.type()) {
    case toml::node_type::string: return "string";
    case toml::node_type::integer: return "int";
    case toml::node_type::floating_point: return "float";
    case toml::node_type::boolean: return "bool";
    case toml::node_type::array: return "array";
    case toml::node_type::table: return "table";
    default: return "date/time";
  }
}

// How a float was written, when it can be found: the text after '=' of a
// --set item, or the number at the node's place in its file; "" otherwise.
std::string float_literal(const toml::node& node, const std::string& where) {
  const auto number_end = [](const std::string& text, std::size_t from) {
    return text.find_first_not_of("0123456789+-._eE", from);
  };
  if (where.rfind("--set ", 0) == 0) {
    const std::size_t eq = where.find('=');
    if (eq == std::string::npos) return "";
    const std::size_t begin = where.find_first_not_of(" \t", eq + 1);
    return begin == std::string::npos ? "" : where.substr(begin, number_end(where, begin) - begin);
  }
  const auto& source = node.source();
  if (!source.path || source.begin.line == 0 || source.begin.column == 0) return "";
  std::ifstream in(*source.path);
  std::string line;
  for (toml::source_index n = 0; n < source.begin.line && std::getline(in, line); ++n) {
  }
  if (!in || source.begin.column > line.size()) return "";
  const std::size_t begin = source.begin.column - 1;
  return line.substr(begin, number_end(line, begin) - begin);
}

// A nonzero number too small for a double (1e-400), which TOML reads as
// 0.0: said so, since "0.0 is out of range" names a value not written.
std::string underflow_note(const toml::node& node, const std::string& where, double v) {
  if (v != 0.0) return "";
  const std::string literal = float_literal(node, where);
  const std::string mantissa = literal.substr(0, literal.find_first_of("eE"));
  if (mantissa.find_first_of("123456789") == std::string::npos) return "";
  return fmt::format(" ({} is nearer zero than any double and reads as {})", literal, to_toml(v));
}

// A string value of a run file or --set, TOML's escapes read: no control
// character, which a path, a name or a label never needs, and which the
// lines that show them ("saved DIR/checkpoint-epoch1.pt", "log FILE") would
// print raw (an ESC drives the terminal, a newline splits the line).
std::string checked_text(std::string text, const std::string& where) {
  if (const std::string problem = control_character(text); !problem.empty()) {
    throw Error(fmt::format("{}: the string {} {}; write it without", where, Json(text).dump(), problem));
  }
  return text;
}

ParamValue convert(const ParamSpec& spec, const toml::node& node, const std::string& where) {
  auto wrong = [&]() {
    std::string hint;
    if (const auto* text = node.as_string(); text && (spec.type == ParamType::Int || spec.type == ParamType::Float)) {
      const std::string& t = text->get();
      std::string lower = t;
      for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      char* end = nullptr;
      if (std::string_view(spec.key) == "seed" && lower == "auto" && t != "auto") {
        hint = fmt::format(" \"{}\"; \"auto\", in lower case, draws a seed", t);
      } else if (t.find_first_of("0123456789") != std::string::npos &&
                 (std::strtod(t.c_str(), &end), end == t.c_str() + t.size())) {
        // How TOML reads the text unquoted: a number of some type, or no
        // number, for the reason its parser gives.
        toml::table unquoted;
        std::string no_number;
        try {
          unquoted = toml::parse("v = " + t);
        } catch (const toml::parse_error& e) {
          no_number = std::string(e.description());
        }
        const toml::node* read = unquoted.get("v");
        // A point without a digit on each side: ".5", "5.", "1.e5".
        bool bare_point = false;
        for (std::size_t i = t.find('.'); i != std::string::npos; i = t.find('.', i + 1)) {
          const auto digit = [&](std::size_t at) {
            return at < t.size() && std::isdigit(static_cast<unsigned char>(t[at])) != 0;
          };
          if (i == 0 || !digit(i - 1) || !digit(i + 1)) bare_point = true;
        }
        if (read && (read->is_integer() || (read->is_floating_point() && spec.type == ParamType::Float))) {
          // `seed = "5"`: the quotes make it a string.
          hint = fmt::format(" \"{}\": in quotes a number is a string; write it without them", t);
        } else if (read && read->is_floating_point()) {
          hint = fmt::format(" \"{}\": in quotes a number is a string, and without them a float; this key takes a "
                             "whole number",
                             t);
        } else if (bare_point) {
          // A number C or Python reads and TOML does not.
          hint = fmt::format(" \"{}\", which TOML reads as no number: it wants a digit on each side of a point "
                             "(0.5, 5.0)",
                             t);
        } else if (!no_number.empty()) {
          hint = fmt::format(" \"{}\", which TOML reads as no number either ({})", t, no_number);
        }
      }
    }
    return Error(fmt::format("{}: expected {}, got {}{}", where, to_string(spec.type), type_name(node), hint));
  };
  auto number = [&](const toml::node& n, bool integer_only) -> double {
    if (n.is_integer()) return static_cast<double>(*n.value<std::int64_t>());
    if (!integer_only && n.is_floating_point()) return *n.value<double>();
    throw wrong();
  };
  auto check_range = [&](double v) {
    if (std::isnan(v)) {
      // A schema without a range (min > max) has no range to show.
      throw Error(fmt::format("{}: nan is not a number this key takes{}", where,
                              spec.min <= spec.max ? fmt::format(" (its range: {})", range_text(spec)) : ""));
    }
    if (!in_range(spec, v)) {
      throw Error(fmt::format("{}: {} is out of range {}{}", where, to_toml(v), range_text(spec),
                              underflow_note(node, where, v)));
    }
  };
  auto check_integer = [&](std::int64_t v) {
    if (!in_range(spec, v)) throw Error(fmt::format("{}: {} is out of range {}", where, v, range_text(spec)));
  };
  switch (spec.type) {
    case ParamType::Int: {
      if (!node.is_integer()) throw wrong();
      const auto v = *node.value<std::int64_t>();
      check_integer(v);
      return v;
    }
    case ParamType::Float: {
      const double v = number(node, false);
      check_range(v);
      return v;
    }
    case ParamType::Bool:
      if (!node.is_boolean()) throw wrong();
      return *node.value<bool>();
    case ParamType::Path:
      if (!node.is_string()) throw wrong();
      return checked_text(*node.value<std::string>(), where);
    case ParamType::String: {
      if (!node.is_string()) throw wrong();
      std::string v = checked_text(*node.value<std::string>(), where);
      if (spec.choices) {
        std::vector<std::string> options;
        std::string all = spec.choices;
        for (std::size_t s = 0, e; s <= all.size(); s = e + 1) {
          e = all.find('|', s);
          if (e == std::string::npos) e = all.size();
          options.push_back(all.substr(s, e - s));
        }
        if (std::find(options.begin(), options.end(), v) == options.end()) {
          throw Error(fmt::format("{}: \"{}\" is not one of {}{}", where, v, fmt::join(options, ", "),
                                  did_you_mean(v, options)));
        }
      }
      return v;
    }
    case ParamType::IntList:
    case ParamType::FloatList:
    case ParamType::StringList: {
      const toml::array* arr = node.as_array();
      if (!arr) throw wrong();
      if (spec.type == ParamType::StringList) {
        std::vector<std::string> out;
        for (const auto& e : *arr) {
          if (!e.is_string()) throw wrong();
          out.push_back(checked_text(*e.value<std::string>(), where));
        }
        return out;
      }
      if (spec.type == ParamType::IntList) {
        std::vector<std::int64_t> out;
        for (const auto& e : *arr) {
          if (!e.is_integer()) throw wrong();
          check_integer(*e.value<std::int64_t>());
          out.push_back(*e.value<std::int64_t>());
        }
        return out;
      }
      std::vector<double> out;
      for (const auto& e : *arr) {
        out.push_back(number(e, false));
        check_range(out.back());
      }
      return out;
    }
    case ParamType::Plugin:
      break;  // nested tables are checked by Checker::nested, which loads their plugin
  }
  throw wrong();
}

// A spec's default as the table `v = <default>`; `where` starts the message
// when the text is not one TOML value.
toml::table default_table(const ParamSpec& spec, const std::string& where) {
  toml::table t;
  try {
    t = toml::parse(std::string("v = ") + spec.default_toml);
  } catch (const toml::parse_error& e) {
    throw Error(fmt::format("{}: not a TOML value ({})", where, e.description()));
  }
  if (t.size() != 1) throw Error(fmt::format("{}: more than one TOML value", where));
  return t;
}

ParamValue parse_default(const ParamSpec& spec) {
  const std::string where = fmt::format("default of '{}'", spec.key);
  const toml::table t = default_table(spec, where);
  return convert(spec, *t.get("v"), where);
}

PluginKind kind_named(const ParamSpec& spec) {
  const PluginKind kinds[] = {PluginKind::Reader, PluginKind::Model, PluginKind::Optimizer, PluginKind::Scheduler};
  for (PluginKind kind : kinds) {
    if (spec.choices && std::string(spec.choices) == to_string(kind)) return kind;
  }
  throw Error(fmt::format("parameter '{}' is declared as a plugin table of unknown kind '{}' (a bug in the plugin)",
                          spec.key, spec.choices ? spec.choices : "(none)"));
}

// What checking needs besides the table: where keys were overridden (by
// section path, "reader.source") and the loader for nested plugin tables.
struct Checker {
  std::string file;
  std::map<std::string, std::map<std::string, std::string>> set_keys;
  PluginLoader* loader = nullptr;
  const toml::table* root = nullptr;  // the merged run file, for the hints of an unknown key (section_has)

  Location location(const std::string& section) const {
    auto it = set_keys.find(section);
    return Location{file, section, it == set_keys.end() ? std::map<std::string, std::string>{} : it->second};
  }

  Params check(const toml::table* table, const ParamSchema& schema, const Location& loc,
               const std::set<std::string>& host_keys) const;
  std::shared_ptr<const NestedPlugin> nested(const ParamSpec& spec, const toml::node& node, const Location& parent,
                                             const std::string& where) const;

  // What a plugin table names, its plugin loaded and its keys checked.
  struct Chosen {
    std::string name;
    const LoadedPlugin* plugin = nullptr;
    Params params;
    std::string name_at;  // where its name was set
  };
  Chosen choose(const toml::table* t, PluginKind kind, const std::string& section, const std::string& where) const;
  bool section_has(const std::string& section, const std::string& key) const;
  std::string reference_flag_hint(const std::string& key) const;
  std::string other_section_hint(const std::string& section, const std::string& key) const;
};

// Whether [section] of this run takes `key`: a host section by its schema,
// a plugin section by the schema of the plugin it names (loaded by name; one
// that cannot be loaded, or is given by `library`, is passed over: its own
// check names its problem). For the hints of an unknown key only.
bool Checker::section_has(const std::string& section, const std::string& key) const {
  const auto has = [&](const ParamSchema& schema) {
    return std::any_of(schema.begin(), schema.end(), [&](const ParamSpec& spec) { return key == spec.key; });
  };
  if (section == "run") return has(schema_of(kRunSpecs));
  if (section == "data") return has(schema_of(kDataSpecs));
  if (section == "mlperf") return has(schema_of(kMlperfSpecs));
  const auto at = std::find(kPluginSections.begin(), kPluginSections.end(), section);
  if (at == kPluginSections.end() || !root || !loader) return false;
  if (key == "name") return true;
  const PluginKind kinds[] = {PluginKind::Reader, PluginKind::Model, PluginKind::Optimizer, PluginKind::Scheduler};
  const toml::table* t = root->get_as<toml::table>(section);
  const auto name = t ? t->get_as<std::string>("name") : nullptr;
  if (!name || t->contains("library")) return false;
  try {
    return has(loader->load(kinds[at - kPluginSections.begin()], name->get(), "").descriptor->params);
  } catch (const Error&) {
    return false;
  }
}

// A flag of the MLCommons reference's train.py that users bring along as a
// key: the key it is in this run, where that section takes it. "" for
// other keys.
std::string Checker::reference_flag_hint(const std::string& key) const {
  struct Flag {
    const char* flag;
    const char* section;
    const char* key;
    const char* note;
  };
  static const Flag kFlags[] = {
      {"local_batch_size", "run", "train_batch_size", " (per rank, as there)"},
      {"save_frequency", "run", "checkpoint_every", " (its 0, no checkpoints, is -1 here)"},
      {"checkpoint", "run", "resume", ""},
      {"run_tag", "run", "output_dir", ""},
      {"wireup_method", "run", "rendezvous", ", with the launcher's variables"},
      {"data_dir_prefix", "data", "root", ""},
      {"max_inter_threads", "reader", "threads", ""},
      {"optimizer", "optimizer", "name", " (the plugin's name)"},
      {"start_lr", "optimizer", "lr", ""},
      {"optimizer_betas", "optimizer", "betas", ""},
      {"lr_schedule", "scheduler", "name", " and the scheduler plugin's keys"}};
  static const std::pair<const char*, const char*> kNoKey[] = {
      {"adam_eps", "eps is 1e-6, as the MLPerf rules fix it"},
      {"model_prefix", "checkpoints are named checkpoint-epochN.pt"}};
  for (const auto& [flag, why] : kNoKey)
    if (key == flag) return fmt::format("; the reference's --{} has no key here: {}", key, why);
  for (const Flag& f : kFlags)
    if (key == f.flag && section_has(f.section, f.key))
      return fmt::format("; the reference's --{} is [{}] {}{}", key, f.section, f.key, f.note);
  return "";
}

// The other section of this run that takes `key`, unknown in [section]
// (`--set run.weight_decay=...`); "" when none does.
std::string Checker::other_section_hint(const std::string& section, const std::string& key) const {
  std::vector<std::string> sections = {"run", "data", "mlperf"};
  sections.insert(sections.end(), kPluginSections.begin(), kPluginSections.end());
  for (const std::string& other : sections)
    if (other != section && section_has(other, key)) return fmt::format("; {} is a key of [{}]", key, other);
  return "";
}

// The plugin of `kind` that table `t` of `section` names (name = "...", and
// library = "..." where given), loaded, with the table's keys checked
// against its schema. `where` starts the message when the table (absent
// when null) names none.
Checker::Chosen Checker::choose(const toml::table* t, PluginKind kind, const std::string& section,
                                const std::string& where) const {
  const Location loc = location(section);
  const toml::node* name_node = t ? t->get("name") : nullptr;
  if (name_node && !name_node->is_string()) {
    throw Error(fmt::format("{}: expected a string, the {} plugin's name (see deepcam-host --list-plugins), got {}",
                            loc.at("name", name_node), to_string(kind), type_name(*name_node)));
  }
  if (!name_node) {
    throw Error(fmt::format("{}: [{}] needs name = \"<{} plugin>\" (see deepcam-host --list-plugins)", where,
                            section, to_string(kind)));
  }
  if (!loader) throw Error(fmt::format("{}: a plugin table needs the plugin loader to be checked", where));
  const toml::node* lib = t->get("library");
  const std::string library = library_path(lib, loc);
  // The variable's fault, not the table's: named without the table.
  if (const std::string problem = lib ? "" : loader->search_path_problem(); !problem.empty()) throw Error(problem);
  Chosen out;
  out.name = *name_node->value<std::string>();
  out.name_at = loc.at("name", name_node);
  try {
    out.plugin = &loader->load(kind, out.name, library);
  } catch (const Error& e) {
    // A library named explicitly is where the problem is.
    throw Error(fmt::format("{}: {}", lib ? loc.at("library", lib) : out.name_at, e.what()));
  }
  out.params = check(t, out.plugin->descriptor->params, loc, {"name", "library"});
  return out;
}

// A nested plugin table is checked like a top-level plugin section, before
// anything is built: its plugin is loaded (of the kind the spec names) and
// its keys are checked against that plugin's own schema.
std::shared_ptr<const NestedPlugin> Checker::nested(const ParamSpec& spec, const toml::node& node,
                                                    const Location& parent, const std::string& where) const {
  const PluginKind kind = kind_named(spec);
  const std::string section = parent.section + "." + spec.key;
  const toml::table* t = node.as_table();
  if (!t) {
    throw Error(fmt::format("{}: expected a table [{}] naming a {} plugin (name = \"...\" and its keys), got {}",
                            where, section, to_string(kind), type_name(node)));
  }
  Chosen chosen = choose(t, kind, section, where);
  auto out = std::make_shared<NestedPlugin>();
  out->kind = to_string(kind);
  out->name = std::move(chosen.name);
  out->path = chosen.plugin->path;
  out->descriptor = chosen.plugin->descriptor;
  out->library = chosen.plugin->library;
  out->params = std::move(chosen.params);
  return out;
}

// Checks a table against a schema; `host_keys` are keys the host consumes
// (name, library) and the schema does not list.
Params Checker::check(const toml::table* table, const ParamSchema& schema, const Location& loc,
                      const std::set<std::string>& host_keys) const {
  std::map<std::string, ParamValue> values;
  std::map<std::string, std::string> sources;
  std::vector<std::string> known;
  for (const auto& spec : schema) known.emplace_back(spec.key);
  if (table) {
    for (const auto& [k, node] : *table) {
      const std::string key(k.str());
      if (host_keys.count(key)) continue;
      auto it = std::find_if(schema.begin(), schema.end(), [&](const ParamSpec& s) { return key == s.key; });
      if (it == schema.end()) {
        std::vector<std::string> all = known;
        all.insert(all.end(), host_keys.begin(), host_keys.end());
        std::sort(all.begin(), all.end());
        std::string hint = reference_flag_hint(key);
        if (hint.empty()) hint = did_you_mean(key, all);
        if (hint.empty()) hint = other_section_hint(loc.section, key);
        throw Error(fmt::format("{}: unknown key{} (known: {})", loc.at(key, &node), hint, fmt::join(all, ", ")));
      }
      sources[key] = loc.at(key, &node);
      if (it->type == ParamType::Plugin) {
        values[key] = nested(*it, node, loc, loc.at(key, &node));
      } else if (loc.section == "run" && key == "seed" && node.is_string() && *node.value<std::string>() == "auto") {
        values[key] = kAutoSeed;  // the engine draws it once the ranks have met
      } else {
        values[key] = convert(*it, node, loc.at(key, &node));
        if (it->type == ParamType::Path) {
          values[key] = loc.resolve(key, std::get<std::string>(values[key]), /*from_file=*/true, &node);
        }
      }
    }
  }
  for (const auto& spec : schema) {
    if (values.count(spec.key)) continue;
    sources[spec.key] = fmt::format("{} [{}] {} (default)", loc.file, loc.section, spec.key);
    if (!spec.default_toml) {
      const std::string what =
          spec.type == ParamType::Plugin
              ? fmt::format("a table [{}.{}] with name = \"<{} plugin>\"", loc.section, spec.key, spec.choices)
              : std::string(spec.doc);
      throw Error(fmt::format("{} [{}]: missing required key '{}' ({})", loc.file, loc.section, spec.key, what));
    }
    if (spec.type == ParamType::Plugin) {
      const toml::table t = default_table(spec, fmt::format("default of '{}'", spec.key));
      values[spec.key] = nested(spec, *t.get("v"), loc, fmt::format("default of '{}'", spec.key));
    } else {
      values[spec.key] = parse_default(spec);
      if (spec.type == ParamType::Path) {
        values[spec.key] = loc.resolve(spec.key, std::get<std::string>(values[spec.key]), /*from_file=*/false);
      }
    }
  }
  return Params(fmt::format("{} [{}]", loc.file, loc.section), std::move(values), std::move(sources));
}

// A run file is a few KiB; more is another file, or a pipe that never ends.
constexpr std::size_t kMaxRunFileBytes = std::size_t{16} << 20;

// The text of a run file, or of a pipe given as one (`<(...)`, a FIFO),
// read to its end. A pipe is waited on in slices: a stop signal, which this
// process may take on a thread of its own, ends the wait, which a blocking
// read would not (nor the open of a FIFO that no writer opened yet).
std::string run_file_text(const std::string& file) {
  const int fd = ::open(file.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) throw Error(fmt::format("{}: cannot read: {}", file, std::strerror(errno)));
  struct Closed {
    int fd;
    ~Closed() { ::close(fd); }
  } closed{fd};
  std::string text;
  char buffer[1 << 16];
  for (;;) {
    if (const int signal = stop_requested()) {
      throw StopRequested(signal, fmt::format("stopped by {} while reading the run file {}", strsignal(signal),
                                              file));
    }
    pollfd wanted{fd, POLLIN, 0};
    // A FIFO that no writer opened yet shows no event, and reads as ended.
    const int ready = ::poll(&wanted, 1, 200);
    if (ready < 0 && errno != EINTR) throw Error(fmt::format("{}: cannot read: {}", file, std::strerror(errno)));
    if (ready <= 0) continue;
    const ssize_t got = ::read(fd, buffer, sizeof buffer);
    if (got < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      throw Error(fmt::format("{}: cannot read: {}", file, std::strerror(errno)));
    }
    if (got == 0) return text;  // its end
    text.append(buffer, static_cast<std::size_t>(got));
    if (text.size() > kMaxRunFileBytes) {
      throw Error(fmt::format("{}: more than {} MiB, which no run file is (a few KiB of TOML); give the run file",
                              file, kMaxRunFileBytes >> 20));
    }
  }
}

toml::table parse_file(const std::string& file) {
  if (file.empty()) throw Error("a run file's name is empty (an unset shell variable?); give the run file");
  std::error_code ec;
  const std::filesystem::file_status status = std::filesystem::status(file, ec);
  if (std::filesystem::is_directory(status)) {
    throw Error(fmt::format("{}: is a directory; give the run file (a .toml file, e.g. configs/quickstart.toml)",
                            file));
  }
  // A device would be read as if it were text (/dev/zero never ends); a pipe
  // (`deepcam-host <(...)`) is read to its end, as a shell reads a script.
  if (std::filesystem::exists(status) && !std::filesystem::is_regular_file(status) &&
      !std::filesystem::is_fifo(status)) {
    throw Error(fmt::format("{}: is not a regular file (a device or socket); give the run file (a .toml file, "
                            "e.g. configs/quickstart.toml)",
                            file));
  }
  const std::string text = run_file_text(file);
  try {
    return toml::parse(text, file);
  } catch (const toml::parse_error& e) {
    const auto& src = e.source();
    if (src.begin.line == 0) throw Error(fmt::format("{}: cannot read: {}", file, e.description()));
    throw Error(fmt::format("{}:{}:{}: {}", file, src.begin.line, src.begin.column, e.description()));
  }
}

// The first key or string under `node` that holds U+0000, and `text`, it
// as JSON writes it; nullptr for none. A C string ends there, so a path or a
// message would lose what follows.
const toml::node* holding_nul(const toml::node& node, std::string* text) {
  if (const toml::table* table = node.as_table()) {
    for (const auto& [k, value] : *table) {
      if (k.str().find('\0') != std::string_view::npos) {
        *text = "the key " + Json(std::string(k.str())).dump();
        return &value;
      }
      if (const toml::node* found = holding_nul(value, text)) return found;
    }
  } else if (const toml::array* array = node.as_array()) {
    for (const toml::node& item : *array) {
      if (const toml::node* found = holding_nul(item, text)) return found;
    }
  } else if (const auto* string = node.as_string(); string && string->get().find('\0') != std::string::npos) {
    *text = "the string " + Json(string->get()).dump();
    return &node;
  }
  return nullptr;
}

// Where a key written before any [section] header belongs: the host section
// that takes it, else a list of the sections (a plugin's keys are known only
// once its section names it).
std::string host_section_of(const std::string& key) {
  const std::pair<const char*, ParamSchema> host[] = {
      {"run", schema_of(kRunSpecs)}, {"data", schema_of(kDataSpecs)}, {"mlperf", schema_of(kMlperfSpecs)}};
  for (const auto& [section, schema] : host) {
    if (std::any_of(schema.begin(), schema.end(), [&](const ParamSpec& spec) { return key == spec.key; })) {
      return fmt::format("it is a key of [{}]: write it under a [{}] line", section, section);
    }
  }
  return fmt::format("each key belongs under one of the section headers [{}]", fmt::join(kSections, "], ["));
}

constexpr const char* kNulText = "holds the character U+0000, which no path, name or value may hold";

// A run file whose top level holds only known sections, each a table, and
// no U+0000.
toml::table parse_sections(const std::string& file) {
  toml::table root = parse_file(file);
  std::string text;
  if (const toml::node* at = holding_nul(root, &text)) {
    throw Error(fmt::format("{}:{}: {} {}", file, at->source().begin.line, text, kNulText));
  }
  for (const auto& [k, node] : root) {
    const std::string section(k.str());
    const bool known = std::find(kSections.begin(), kSections.end(), section) != kSections.end();
    if (!known && !node.is_table()) {
      throw Error(fmt::format("{}:{}: {} stands before any section header; {}", file, node.source().begin.line,
                              section, host_section_of(section)));
    }
    if (!known) {
      throw Error(fmt::format("{}:{}: unknown section [{}]{} (sections: {})", file, node.source().begin.line,
                              section, did_you_mean(section, kSections), fmt::join(kSections, ", ")));
    }
    if (!node.is_table()) {
      throw Error(fmt::format("{}:{}: '{}' must be a table [{}]", file, node.source().begin.line, section, section));
    }
  }
  return root;
}

// Lays `top` (a later run file) over `base`: each key of `top` replaces the
// same key of `base`, and a table is merged key by key, except a plugin
// table whose `name` differs from base's: another plugin, whose keys are not
// the first one's, so `top`'s table replaces it whole. Nodes are moved, which
// keeps the file and line they were read from.
void merge_into(toml::table& base, toml::table&& top) {
  for (auto&& [k, node] : top) {
    toml::table* base_table = base.get_as<toml::table>(k.str());
    if (toml::table* top_table = node.as_table(); top_table && base_table) {
      const auto* top_name = top_table->get_as<std::string>("name");
      const auto* base_name = base_table->get_as<std::string>("name");
      if (!(top_name && base_name && top_name->get() != base_name->get())) {
        merge_into(*base_table, std::move(*top_table));
        continue;
      }
    }
    base.insert_or_assign(k, std::move(node));
  }
}

// The file a node was read from (`fallback` for one made by --set).
std::string origin(const toml::node& node, const std::string& fallback) {
  return node.source().path ? *node.source().path : fallback;
}

// What is wrong with an --set item's bytes for a TOML document, or "": a
// control character (a newline would break config.toml's comment that names
// the item; TOML's escapes, "a\nb", stay possible) or a byte sequence that
// is not UTF-8 (TOML is UTF-8, as a run file must be).
std::string text_problem(const std::string& item) {
  if (std::string problem = control_character(item); !problem.empty()) return problem;
  if (const std::string problem = utf8_problem(item); !problem.empty()) return "is not UTF-8 (" + problem + ")";
  return "";
}

// Applies one `section.key=value`; the value is TOML, or a bare string. The
// key may be a path into nested tables: `reader.source.io=mmap`.
void apply_override(toml::table& root, const std::string& item,
                    std::map<std::string, std::map<std::string, std::string>>& set_keys) {
  if (const std::string problem = text_problem(item); !problem.empty()) {
    // Not echoed raw: the item's bytes are what is wrong.
    throw Error(fmt::format("--set {}: the item {}", Json(item).dump(), problem));
  }
  const auto eq = item.find('=');
  const auto dot = item.find('.');
  if (eq == std::string::npos || dot == std::string::npos || dot > eq) {
    throw Error(fmt::format("--set {}: expected section.key=value", item));
  }
  // Blanks around the dots and the '=' are TOML's spacing, as in a run file
  // (`--set "run.seed = 5"`), not part of a key or of a bare string.
  const auto trimmed = [](const std::string& t) {
    const auto first = t.find_first_not_of(" \t");
    return first == std::string::npos ? std::string() : t.substr(first, t.find_last_not_of(" \t") - first + 1);
  };
  std::vector<std::string> path;
  const std::string dotted = item.substr(0, eq);
  for (std::size_t s = 0, e; s <= dotted.size(); s = e + 1) {
    e = dotted.find('.', s);
    if (e == std::string::npos) e = dotted.size();
    path.push_back(trimmed(dotted.substr(s, e - s)));
  }
  const std::string& section = path.front();
  const std::string text = trimmed(item.substr(eq + 1));
  if (std::find(kSections.begin(), kSections.end(), section) == kSections.end()) {
    throw Error(fmt::format("--set {}: unknown section [{}]{}", item, section, did_you_mean(section, kSections)));
  }
  for (const auto& part : path) {
    if (part.empty()) throw Error(fmt::format("--set {}: empty key in '{}'", item, dotted));
  }
  toml::table parsed;
  try {
    parsed = toml::parse("v = " + text);
  } catch (const toml::parse_error& e) {
    // Digits alone are meant as a number (one past 64 bits, a leading zero),
    // not as the string a type check would then refuse as "got string".
    const std::size_t sign = !text.empty() && (text[0] == '+' || text[0] == '-') ? 1 : 0;
    if (text.size() > sign && text.find_first_not_of("0123456789", sign) == std::string::npos) {
      throw Error(fmt::format("--set {}: {} is not a TOML integer ({})", item, text, e.description()));
    }
    // A quoted string, a list or a table cut short is a typo, not a bare
    // string that holds its opening quote or bracket.
    if (const auto first = text.find_first_not_of(" \t");
        first != std::string::npos && std::string_view("\"'[{").find(text[first]) != std::string_view::npos) {
      throw Error(fmt::format("--set {}: {} is not a TOML value ({})", item, text, e.description()));
    }
    parsed.insert_or_assign("v", text);
  }
  if (std::string nul; holding_nul(parsed, &nul)) throw Error(fmt::format("--set {}: {} {}", item, nul, kNulText));
  toml::table* t = &root;
  std::string table_path;
  for (std::size_t i = 0; i + 1 < path.size(); ++i) {
    if (!t->contains(path[i])) {
      // A table this item makes comes from it, not from the file: an
      // unknown key there names the item.
      if (i > 0) set_keys[table_path][path[i]] = item;
      t->insert(path[i], toml::table{});
    }
    table_path += (i ? "." : "") + path[i];
    t = t->get_as<toml::table>(path[i]);
    if (!t) throw Error(fmt::format("--set {}: [{}] is not a table", item, table_path));
  }
  t->insert_or_assign(path.back(), *parsed.get("v"));
  set_keys[table_path][path.back()] = item;
  // A table given whole (`--set 'reader.source={name = "npy"}'`): its keys
  // come from --set too, not from a line of the file.
  std::function<void(const toml::table&, const std::string&)> mark = [&](const toml::table& table,
                                                                         const std::string& where) {
    for (const auto& [k, node] : table) {
      set_keys[where][std::string(k.str())] = fmt::format("{}: [{}] {}", item, where, k.str());
      if (const toml::table* sub = node.as_table()) mark(*sub, where + "." + std::string(k.str()));
    }
  };
  if (const toml::table* whole = parsed.get("v")->as_table()) mark(*whole, table_path + "." + path.back());
}

}  // namespace

std::string closest_match(const std::string& word, const std::vector<std::string>& candidates) {
  std::string best;
  std::size_t best_d = std::max<std::size_t>(2, word.size() / 3) + 1;
  for (const auto& c : candidates) {
    const std::size_t d = edit_distance(word, c);
    if (d < best_d) {
      best_d = d;
      best = c;
    }
  }
  return best;
}

std::string schema_problem(const ParamSchema& schema) {
  if (schema.size > 0 && !schema.specs) {
    return fmt::format("the schema counts {} parameters but has no array", schema.size);
  }
  // What a run file's bare key and --set section.key=value can name.
  static const char kBare[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
  std::set<std::string> keys;
  const char* previous = nullptr;
  for (const ParamSpec& spec : schema) {
    if (!spec.key) {
      return previous ? fmt::format("the parameter after '{}' has no key (nullptr)", previous)
                      : std::string("the first parameter has no key (nullptr)");
    }
    previous = spec.key;
    const std::string key = spec.key;
    const std::string at = fmt::format("parameter '{}'", key);
    if (key.empty() || key.find_first_not_of(kBare) != std::string::npos) {
      return at + ": not a bare TOML key (letters, digits, '_' and '-')";
    }
    if (key == "name" || key == "library") return at + ": the host's own key of every plugin table; do not declare it";
    if (!keys.insert(key).second) return at + ": declared twice";
    if (!spec.doc || !*spec.doc) return at + ": no doc (the one line that --describe prints)";
    if (std::string(spec.doc).find_first_of("\r\n") != std::string::npos) {
      return at + ": its doc holds a line break; a doc is one line";
    }
    if (static_cast<unsigned>(spec.type) > static_cast<unsigned>(ParamType::Path)) {
      return fmt::format("{}: type {} is not a ParamType", at, static_cast<unsigned>(spec.type));
    }
    if (std::isnan(spec.min) || std::isnan(spec.max)) return at + ": a bound is NaN";
    // An integer is checked against the bounds as they are, but its range is
    // printed as integers: fractional bounds would print "[0, 1]" and refuse 0.
    const bool integral = spec.type == ParamType::Int || spec.type == ParamType::IntList;
    if (integral && spec.min <= spec.max && (std::floor(spec.min) != spec.min || std::floor(spec.max) != spec.max)) {
      return fmt::format("{}: range [{}, {}] of an integer key: its bounds must be whole numbers", at, spec.min,
                         spec.max);
    }
    if (spec.type == ParamType::Plugin) {
      const PluginKind kinds[] = {PluginKind::Reader, PluginKind::Model, PluginKind::Optimizer, PluginKind::Scheduler};
      if (std::none_of(std::begin(kinds), std::end(kinds),
                       [&](PluginKind k) { return spec.choices && std::string(spec.choices) == to_string(k); })) {
        return fmt::format("{}: a plugin table needs the kind of plugin it names in `choices` (reader, model, "
                           "optimizer or scheduler), not {}",
                           at, spec.choices ? fmt::format("\"{}\"", spec.choices) : std::string("nullptr"));
      }
    } else if (spec.choices && spec.type != ParamType::String) {
      return fmt::format("{}: choices \"{}\" on the {} key, which takes none (choices are for string keys)", at,
                         spec.choices, to_string(spec.type));
    }
    if (spec.choices && spec.type == ParamType::String) {
      // "a||b", "|a" or "": an empty string would be a choice, printed as nothing.
      const std::string choices = std::string("|") + spec.choices + "|";
      if (choices.find("||") != std::string::npos) {
        return fmt::format("{}: choices \"{}\" hold an empty choice", at, spec.choices);
      }
    }
    if (!spec.default_toml) continue;
    const std::string where = fmt::format("{}: default {}", at, spec.default_toml);
    try {
      const toml::table t = default_table(spec, where);
      const toml::node& v = *t.get("v");
      if (spec.type == ParamType::Plugin) {
        // The nested plugin is loaded when a run uses the default, not here.
        const toml::table* table = v.as_table();
        if (!table || !table->get_as<std::string>("name")) {
          return where + ": not a table with name = \"<plugin>\"";
        }
      } else {
        convert(spec, v, where);
      }
    } catch (const Error& e) {
      return e.what();
    }
  }
  return "";
}

ParamSchema host_schema(const std::string& section) {
  if (section == "run") return schema_of(kRunSpecs);
  if (section == "data") return schema_of(kDataSpecs);
  if (section == "mlperf") return schema_of(kMlperfSpecs);
  throw Error(fmt::format("--describe {}: no host section [{}] and no plugin kind '{}'; the host's sections are "
                          "run, data, mlperf; the plugin kinds reader, model, optimizer, scheduler",
                          section, section, section));
}

Params check_table_file(const std::string& file, const std::string& section, const ParamSchema& schema,
                        PluginLoader* loader) {
  toml::table root = parse_file(file);
  const Checker checker{file, {}, loader};
  return checker.check(root.get_as<toml::table>(section), schema, checker.location(section), {"name", "library"});
}

RunConfig load_config(const std::string& file, const std::vector<std::string>& overrides,
                      PluginLoader& loader) {
  return load_config(std::vector<std::string>{file}, overrides, loader);
}

RunConfig load_config(const std::vector<std::string>& files, const std::vector<std::string>& overrides,
                      PluginLoader& loader) {
  if (files.empty()) throw Error("no run file given");
  // Each file's sections are checked before the next file or an --set item
  // is laid over them, which would hide or be blamed for a wrong one.
  toml::table root = parse_sections(files.front());
  for (std::size_t i = 1; i < files.size(); ++i) merge_into(root, parse_sections(files[i]));
  // Messages about what no file set (a missing key, a default) name them all.
  const std::string file = fmt::format("{}", fmt::join(files, " + "));
  std::map<std::string, std::map<std::string, std::string>> set_keys;
  for (const auto& o : overrides) apply_override(root, o, set_keys);
  const Checker checker{file, set_keys, &loader, &root};
  auto location = [&](const std::string& section) { return checker.location(section); };

  RunConfig cfg;
  cfg.file = file;
  cfg.run = checker.check(root.get_as<toml::table>("run"), schema_of(kRunSpecs), location("run"), {});
  if (cfg.run.string("output_dir").empty()) {
    throw Error(
        fmt::format("{}: empty; name the folder for the run's log and checkpoints", cfg.run.where("output_dir")));
  }
  if (cfg.run.string("device") == "auto") {
    // Decided here, so that everything after (and the resolved config) sees
    // the device the run uses.
    auto values = cfg.run.values();
    values["device"] = std::string(torch::cuda::is_available() ? "cuda" : "cpu");
    cfg.run = Params(cfg.run.where(), std::move(values), cfg.run.sources());
  }
  cfg.data = checker.check(root.get_as<toml::table>("data"), schema_of(kDataSpecs), location("data"), {});
  {
    // Checked here, where it is known who set it: a reader can only say the
    // folder it was given.
    const std::string& data_root = cfg.data.string("root");
    if (data_root.empty()) {
      const toml::table* t = root.get_as<toml::table>("data");
      throw Error(fmt::format("{}: empty; name the data set's folder, which holds train/, validation/ and "
                              "stats.h5",
                              location("data").at("root", t ? t->get("root") : nullptr)));
    }
    if (const std::string problem = directory_problem(data_root); !problem.empty()) {
      const toml::table* t = root.get_as<toml::table>("data");
      const std::string where = location("data").at("root", t ? t->get("root") : nullptr);
      // The path resolved against the run file's folder, unless an --set
      // item shows it as it is.
      const std::string typed = "=" + data_root;
      const bool shown = where.rfind("--set ", 0) == 0 && where.size() > typed.size() &&
                         where.compare(where.size() - typed.size(), std::string::npos, typed) == 0;
      throw Error(fmt::format("{}: {}{}", where, shown ? "" : data_root + ": ", problem));
    }
    // A folder above or beside the data set (a typo, one level too high):
    // named with the key here; the reader would name only train/.
    if (!split_folder_problem(data_root, "train").empty() && !split_folder_problem(data_root, "validation").empty()) {
      const toml::table* t = root.get_as<toml::table>("data");
      throw Error(fmt::format("{}: {} holds neither train/ nor validation/: it is no data set root, which holds "
                              "train/, validation/ and stats.h5",
                              location("data").at("root", t ? t->get("root") : nullptr), data_root));
    }
  }
  {
    // A channel named twice feeds the model one field as two inputs: a typo
    // in the list, never a choice.
    const std::vector<std::int64_t>& channels = cfg.data.integers("channels");
    if (channels.empty()) {
      const toml::table* t = root.get_as<toml::table>("data");
      throw Error(fmt::format("{}: no channel selected; name at least one of 0..15",
                              location("data").at("channels", t ? t->get("channels") : nullptr)));
    }
    for (std::size_t i = 0; i < channels.size(); ++i) {
      const auto first = std::find(channels.begin(), channels.end(), channels[i]);
      if (first != channels.begin() + static_cast<std::ptrdiff_t>(i)) {
        const toml::table* t = root.get_as<toml::table>("data");
        throw Error(fmt::format("{}: channel {} is selected twice (items {} and {}); each channel at most once",
                                location("data").at("channels", t ? t->get("channels") : nullptr), channels[i],
                                first - channels.begin(), i));
      }
    }
  }
  cfg.mlperf = checker.check(root.get_as<toml::table>("mlperf"), schema_of(kMlperfSpecs), location("mlperf"), {});
  // The MLPerf checker fails a log whose submission_org or
  // submission_platform is empty: refused before a run that would be for nothing.
  for (const char* key : {"org", "platform"}) {
    if (cfg.mlperf.string(key).empty()) {
      throw Error(fmt::format("{}: empty; the MLPerf checker fails a log whose submission_{} is empty",
                              cfg.mlperf.where(key), key));
    }
  }

  const PluginKind kinds[] = {PluginKind::Reader, PluginKind::Model, PluginKind::Optimizer,
                              PluginKind::Scheduler};
  std::map<std::string, std::string> name_origin;  // plugin section -> where its name was set
  PluginChoice* choices[] = {&cfg.reader, &cfg.model, &cfg.optimizer, &cfg.scheduler};
  for (std::size_t i = 0; i < 4; ++i) {
    const std::string& section = kPluginSections[i];
    const toml::table* t = root.get_as<toml::table>(section);
    Checker::Chosen chosen = checker.choose(t, kinds[i], section, t ? origin(*t, file) : file);
    name_origin[section] = chosen.name_at;
    PluginChoice& c = *choices[i];
    c.kind = kinds[i];
    c.name = std::move(chosen.name);
    c.plugin = chosen.plugin;
    c.params = std::move(chosen.params);
  }

  // The resolved configuration, every default filled in; a nested plugin
  // table follows its parent's keys as its own section, [reader.source].
  // Each value says where it was set: the file and line, the --set item, or
  // "default"; with several run files the later ones and --set win.
  auto comment = [](const std::string& where) -> std::string {
    static const std::string kDefault = "(default)";
    if (where.empty()) return "";
    if (where.size() >= kDefault.size() &&
        where.compare(where.size() - kDefault.size(), kDefault.size(), kDefault) == 0)
      return "  # default";
    if (where.rfind("--set ", 0) == 0) return "  # " + toml_comment_text(where);
    return "  # " + toml_comment_text(where.substr(0, where.find(" [")));
  };
  std::string out = fmt::format("# resolved from {}{}\n", toml_comment_text(file),
                                files.size() > 1 ? " (merged left to right, then --set)" : "");
  std::function<void(const std::string&, const Params&, const ParamSchema&, const std::string*, const std::string*)>
      section_text = [&](const std::string& name, const Params& p, const ParamSchema& schema,
                         const std::string* plugin_name, const std::string* plugin_path) {
        out += fmt::format("\n[{}]\n", name);
        if (plugin_name) {
          const auto from = name_origin.find(name);
          out += fmt::format("name = {}{}\n", to_toml(ParamValue(*plugin_name)),
                             from == name_origin.end() ? "" : comment(from->second));
          out += fmt::format("library = {}  # loaded\n", to_toml(ParamValue(*plugin_path)));
        }
        for (const auto& spec : schema) {
          if (spec.type == ParamType::Plugin) continue;
          if (name == "run" && std::string(spec.key) == "seed" && p.integer("seed") == kAutoSeed) {
            out += "seed = \"auto\"\n";
            continue;
          }
          const auto from = p.sources().find(spec.key);
          out += fmt::format("{} = {}{}\n", spec.key, to_toml(p.values().at(spec.key)),
                             from == p.sources().end() ? "" : comment(from->second));
        }
        for (const auto& spec : schema) {
          if (spec.type != ParamType::Plugin) continue;
          const NestedPlugin& n = p.plugin(spec.key);
          // A nested table's name: where the table was set.
          if (const auto from = p.sources().find(spec.key); from != p.sources().end())
            name_origin[name + "." + spec.key] = from->second;
          section_text(name + "." + spec.key, n.params, n.descriptor->params, &n.name, &n.path);
        }
      };
  section_text("run", cfg.run, schema_of(kRunSpecs), nullptr, nullptr);
  section_text("data", cfg.data, schema_of(kDataSpecs), nullptr, nullptr);
  for (std::size_t i = 0; i < 4; ++i) {
    section_text(kPluginSections[i], choices[i]->params, choices[i]->plugin->descriptor->params, &choices[i]->name,
                 &choices[i]->plugin->path);
  }
  section_text("mlperf", cfg.mlperf, schema_of(kMlperfSpecs), nullptr, nullptr);
  cfg.resolved = out;
  return cfg;
}

}  // namespace deepcam
