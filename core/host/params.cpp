#include "deepcam/params.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "deepcam/error.hpp"
#include "deepcam/json.hpp"

namespace deepcam {

const char* to_string(ParamType type) {
  switch (type) {
    case ParamType::Int: return "int";
    case ParamType::Float: return "float";
    case ParamType::Bool: return "bool";
    case ParamType::String: return "string";
    case ParamType::IntList: return "int list";
    case ParamType::FloatList: return "float list";
    case ParamType::StringList: return "string list";
    case ParamType::Plugin: return "plugin table";
    case ParamType::Path: return "path";
  }
  return "unknown";
}

Params::Params(std::string where, std::map<std::string, ParamValue> values,
               std::map<std::string, std::string> sources)
    : where_(std::move(where)), values_(std::move(values)), sources_(std::move(sources)) {}

std::string Params::where(const std::string& key) const {
  auto it = sources_.find(key);
  if (it != sources_.end()) return it->second;
  return fmt::format("{} {}", where_, key);
}

namespace {
// How where(key) ends for a key that took its default (config.cpp writes it).
const std::string kDefault = " (default)";

bool ends_as_default(const std::string& where) {
  return where.size() >= kDefault.size() &&
         where.compare(where.size() - kDefault.size(), std::string::npos, kDefault) == 0;
}
}  // namespace

bool Params::is_default(const std::string& key) const {
  at(key);  // a key the schema does not declare is the plugin's bug, as for a lookup
  return ends_as_default(where(key));
}

std::string Params::setting(const std::string& key) const {
  std::string where = this->where(key);
  if (where.rfind("--set ", 0) == 0) return where;
  const std::string value = " = " + to_toml(at(key));
  if (ends_as_default(where)) return where.insert(where.size() - kDefault.size(), value);
  return where + value;
}

const ParamValue& Params::at(const std::string& key) const {
  auto it = values_.find(key);
  if (it == values_.end()) {
    throw PluginBug(fmt::format("the plugin asked for parameter '{}', which its schema does not declare (table {})",
                                key, where_));
  }
  return it->second;
}

template <typename T>
static const T& get(const ParamValue& v, const std::string& where, const std::string& key,
                    const char* type) {
  if (const T* p = std::get_if<T>(&v)) return *p;
  throw PluginBug(fmt::format("the plugin asked for parameter '{}' as {}, which is not the type its schema "
                              "declares (table {})",
                              key, type, where));
}

std::int64_t Params::integer(const std::string& key) const {
  return get<std::int64_t>(at(key), where_, key, "int");
}

double Params::number(const std::string& key) const {
  const ParamValue& v = at(key);
  if (const auto* i = std::get_if<std::int64_t>(&v)) return static_cast<double>(*i);
  return get<double>(v, where_, key, "float");
}

bool Params::boolean(const std::string& key) const { return get<bool>(at(key), where_, key, "bool"); }

const std::string& Params::string(const std::string& key) const {
  return get<std::string>(at(key), where_, key, "string");
}

const std::vector<std::int64_t>& Params::integers(const std::string& key) const {
  return get<std::vector<std::int64_t>>(at(key), where_, key, "int list");
}

const std::vector<double>& Params::numbers(const std::string& key) const {
  return get<std::vector<double>>(at(key), where_, key, "float list");
}

const std::vector<std::string>& Params::strings(const std::string& key) const {
  return get<std::vector<std::string>>(at(key), where_, key, "string list");
}

const NestedPlugin& Params::plugin(const std::string& key) const { return *plugin_shared(key); }

std::shared_ptr<const NestedPlugin> Params::plugin_shared(const std::string& key) const {
  return get<std::shared_ptr<const NestedPlugin>>(at(key), where_, key, "plugin table");
}

namespace {
// A TOML basic string: JSON's escapes are TOML's, but for a character
// beyond U+FFFF, which JSON writes as a UTF-16 surrogate pair (\ud83c\udf89)
// and TOML forbids: it is written \U0001f389.
std::string toml_string(const std::string& s) {
  const std::string json = Json(s).dump();
  const auto unit = [&](std::size_t at) -> long {  // the code unit of "\uXXXX" at `at`, or -1
    if (at + 6 > json.size() || json[at] != '\\' || json[at + 1] != 'u') return -1;
    return std::strtol(json.substr(at + 2, 4).c_str(), nullptr, 16);
  };
  std::string out;
  out.reserve(json.size());
  for (std::size_t i = 0; i < json.size(); ++i) {
    if (json[i] != '\\') {
      out += json[i];
      continue;
    }
    const long high = unit(i), low = unit(i + 6);
    if (high >= 0xD800 && high <= 0xDBFF && low >= 0xDC00 && low <= 0xDFFF) {
      out += fmt::format("\\U{:08x}", 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00));
      i += 11;
      continue;
    }
    out += json.substr(i, 2);  // an escape pair, "\\" included, as it is
    ++i;
  }
  return out;
}
std::string toml_float(double d) {
  std::string r = python_float_repr(d);
  if (r == "NaN") return "nan";
  if (r == "Infinity") return "inf";
  if (r == "-Infinity") return "-inf";
  return r;
}
template <typename T, typename F>
std::string toml_list(const std::vector<T>& items, F&& one) {
  std::string out = "[";
  for (std::size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + one(items[i]);
  return out + "]";
}
// 2^63: the first double past std::int64_t's range.
constexpr double kTwoTo63 = 9223372036854775808.0;

// -1, 0 or 1 as v is below, equal to or above b, exactly: converting v to
// double would round it (9200000000000000500 to 9.2e18).
int compare(std::int64_t v, double b) {
  if (b >= kTwoTo63) return -1;
  if (b < -kTwoTo63) return 1;
  const double whole = std::floor(b);
  const auto w = static_cast<std::int64_t>(whole);  // exact: whole is in [-2^63, 2^63)
  if (v != w) return v < w ? -1 : 1;
  return whole == b ? 0 : -1;
}
}  // namespace

std::string to_toml(const ParamValue& value) {
  struct Visitor {
    std::string operator()(std::int64_t v) const { return std::to_string(v); }
    std::string operator()(double v) const { return toml_float(v); }
    std::string operator()(bool v) const { return v ? "true" : "false"; }
    std::string operator()(const std::string& v) const { return toml_string(v); }
    std::string operator()(const std::vector<std::int64_t>& v) const {
      return toml_list(v, [](std::int64_t x) { return std::to_string(x); });
    }
    std::string operator()(const std::vector<double>& v) const { return toml_list(v, toml_float); }
    std::string operator()(const std::vector<std::string>& v) const {
      return toml_list(v, toml_string);
    }
    // An inline table; the resolved config prints nested tables as sections.
    std::string operator()(const std::shared_ptr<const NestedPlugin>& v) const {
      std::string out = "{ name = " + toml_string(v->name);
      for (const auto& [key, value] : v->params.values()) out += ", " + key + " = " + to_toml(value);
      return out + " }";
    }
  };
  return std::visit(Visitor{}, value);
}

std::string toml_comment_text(const std::string& text) {
  const bool plain = std::none_of(text.begin(), text.end(), [](char c) {
    const auto u = static_cast<unsigned char>(c);
    return (u < 0x20 && u != '\t') || u == 0x7f;
  });
  return plain ? text : toml_string(text);
}

std::string range_text(const ParamSpec& spec) {
  const bool integral = spec.type == ParamType::Int || spec.type == ParamType::IntList;
  auto bound = [&](double v) -> std::string {
    if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
    const bool int64 = v >= -kTwoTo63 && v < kTwoTo63;
    return integral && int64 ? std::to_string(static_cast<std::int64_t>(v)) : to_toml(v);
  };
  // An infinite end is never reached, so it is always shown open.
  const bool min_open = spec.min_open || std::isinf(spec.min);
  const bool max_open = spec.max_open || std::isinf(spec.max);
  return (min_open ? "(" : "[") + bound(spec.min) + ", " + bound(spec.max) + (max_open ? ")" : "]");
}

bool in_range(const ParamSpec& spec, double v) {
  if (spec.min > spec.max) return true;
  // As range_text shows it: an infinite end is open, so inf is out of (0, inf).
  const bool min_open = spec.min_open || std::isinf(spec.min);
  const bool max_open = spec.max_open || std::isinf(spec.max);
  const bool above_min = min_open ? v > spec.min : v >= spec.min;
  const bool below_max = max_open ? v < spec.max : v <= spec.max;
  return above_min && below_max;
}

bool in_range(const ParamSpec& spec, std::int64_t v) {
  if (spec.min > spec.max) return true;
  const bool min_open = spec.min_open || std::isinf(spec.min);
  const bool max_open = spec.max_open || std::isinf(spec.max);
  const int to_min = compare(v, spec.min);
  const int to_max = compare(v, spec.max);
  const bool above_min = min_open ? to_min > 0 : to_min >= 0;
  const bool below_max = max_open ? to_max < 0 : to_max <= 0;
  return above_min && below_max;
}

}  // namespace deepcam
