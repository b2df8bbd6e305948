// Parameters of a plugin: each plugin declares its schema in code (type,
// default, range, one-line doc); the host checks the plugin's TOML table
// against it before anything is built, and hands the plugin typed values.
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "deepcam/export.hpp"

namespace deepcam {

// Plugin: a nested table naming another plugin ([reader.source] name = "npy"),
// for plugins that wrap another one; the spec's `choices` holds the kind of
// plugin it names ("reader").
// Path: a string naming a file or folder; a relative one is taken from the
// folder of the TOML file that sets it (from the current directory when set
// with --set or left at its default), so plugins always get it absolute.
enum class ParamType { Int, Float, Bool, String, IntList, FloatList, StringList, Plugin, Path };

DEEPCAM_API const char* to_string(ParamType type);

// One declared parameter. Plain data so that a plugin can declare its schema
// as a static array that lives as long as the library.
struct ParamSpec {
  const char* key;
  ParamType type;
  // The default as a TOML value ("1e-3", "[5, 12]", "\"global\""); nullptr
  // makes the key required.
  const char* default_toml;
  const char* doc;
  // Bounds for numbers and for each element of a number list, inclusive
  // unless min_open / max_open say otherwise; kUnbounded for no upper bound,
  // -kUnbounded for no lower one; min > max means no range at all.
  double min = 1.0;
  double max = 0.0;
  // For strings: the allowed values, separated by '|'; nullptr for any.
  // For a Plugin parameter: the kind of plugin the nested table names.
  const char* choices = nullptr;
  // An open bound excludes itself: lr > 0 is min 0.0 with min_open.
  bool min_open = false;
  bool max_open = false;
};

inline constexpr double kUnbounded = std::numeric_limits<double>::infinity();

struct ParamSchema {
  const ParamSpec* specs;
  std::size_t size;
  const ParamSpec* begin() const { return specs; }
  const ParamSpec* end() const { return specs + size; }
};

struct NestedPlugin;
struct PluginDescriptor;

using ParamValue = std::variant<std::int64_t, double, bool, std::string, std::vector<std::int64_t>,
                                std::vector<double>, std::vector<std::string>,
                                std::shared_ptr<const NestedPlugin>>;

// The checked values of one table, defaults filled in. A lookup of a key the
// schema does not declare, or with the wrong type, is a programming error in
// the plugin and throws naming the table and the key.
class DEEPCAM_API Params {
 public:
  Params() = default;
  Params(std::string where, std::map<std::string, ParamValue> values,
         std::map<std::string, std::string> sources = {});

  std::int64_t integer(const std::string& key) const;
  double number(const std::string& key) const;
  bool boolean(const std::string& key) const;
  const std::string& string(const std::string& key) const;
  const std::vector<std::int64_t>& integers(const std::string& key) const;
  const std::vector<double>& numbers(const std::string& key) const;
  const std::vector<std::string>& strings(const std::string& key) const;
  const NestedPlugin& plugin(const std::string& key) const;
  // The same, shared: a wrapper keeps it to keep the nested plugin's library
  // loaded as long as the object it built from it.
  std::shared_ptr<const NestedPlugin> plugin_shared(const std::string& key) const;

  bool has(const std::string& key) const { return values_.count(key) != 0; }
  // Where the values came from, for messages: "run.toml [optimizer]".
  const std::string& where() const { return where_; }
  // Where one value came from, for a check the schema cannot express:
  // "run.toml:14 [optimizer] lr", "--set optimizer.lr=0", or
  // "run.toml [optimizer] lr (default)"; "run.toml [optimizer] lr" for
  // Params built without sources.
  std::string where(const std::string& key) const;
  // Whether the key holds its schema's default: no run file or --set gave it.
  bool is_default(const std::string& key) const;
  // The same with the value as TOML writes it, for a message about the value:
  // "run.toml:14 [model] output_stride = 12", "run.toml [optimizer] lr =
  // 0.002 (default)"; an --set item as given, "--set model.output_stride=12",
  // since it holds the value already.
  std::string setting(const std::string& key) const;
  // key -> where(key) for the keys set in a file or by --set.
  const std::map<std::string, std::string>& sources() const { return sources_; }
  const std::map<std::string, ParamValue>& values() const { return values_; }

 private:
  const ParamValue& at(const std::string& key) const;
  std::string where_;
  std::map<std::string, ParamValue> values_;
  std::map<std::string, std::string> sources_;  // key -> where(key), for keys set in a file or by --set
};

// The value of a Plugin parameter: the plugin its table names, loaded and
// checked like a top-level one, and that table's checked values. The wrapper
// builds the nested object itself through descriptor's factory, so the host
// needs no hook per kind and knows no concrete plugin.
struct NestedPlugin {
  std::string kind;                     // "reader"
  std::string name;                     // "npy"
  std::string path;                     // the library file loaded
  const PluginDescriptor* descriptor = nullptr;
  std::shared_ptr<const void> library;  // keeps the library loaded
  Params params;                        // "run.toml [reader.source]"
};

// "[1, 256]", "(0.0, inf)" or "[0.0, 1.0)": a spec's bounds as the check
// applies them, integers for integer keys; a parenthesis is an open bound.
DEEPCAM_API std::string range_text(const ParamSpec& spec);

// Whether v lies within the spec's bounds (always, for a spec without any);
// an integer is compared exactly, not as the nearest double.
DEEPCAM_API bool in_range(const ParamSpec& spec, double v);
DEEPCAM_API bool in_range(const ParamSpec& spec, std::int64_t v);

// What is wrong with a plugin's own schema, naming the key, or "" when
// nothing is: a null or repeated key, a key that is not a bare TOML key or
// is the host's (name, library), a missing doc, an unknown type, a default
// that is not TOML, not of its type, out of its range or not among its
// choices, choices on a key that takes none, a plugin table without a known
// kind. The loader refuses such a plugin. Defined beside the run-file checks
// (config.cpp): a default is checked exactly as a value in a run file.
DEEPCAM_API std::string schema_problem(const ParamSchema& schema);

// The TOML text of a value, as --describe and the resolved config print it.
DEEPCAM_API std::string to_toml(const ParamValue& value);

// `text` (a path, a --set item) as a TOML comment may hold it: as it is, or
// quoted and escaped as a TOML string when it holds a control character,
// which would end the comment (a newline) or is not allowed in one.
DEEPCAM_API std::string toml_comment_text(const std::string& text);

}  // namespace deepcam
