#include "deepcam/checkpoint.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/nn/module.h>

#include <ATen/ATen.h>
#include <ATen/core/Dict.h>
#include <ATen/core/ivalue.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <stdexcept>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <variant>

#include "deepcam/error.hpp"
#include "deepcam/optimizer.hpp"
#include "deepcam/torch_pickle.hpp"
#include "text.hpp"

namespace deepcam {

std::vector<std::pair<std::string, at::Tensor>> state_entries(torch::nn::Module& module) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& item : module.named_modules()) {
    const std::string prefix = item.key().empty() ? "" : item.key() + ".";
    for (const auto& p : item.value()->named_parameters(/*recurse=*/false)) {
      out.emplace_back(prefix + p.key(), p.value());
    }
    for (const auto& b : item.value()->named_buffers(/*recurse=*/false)) {
      out.emplace_back(prefix + b.key(), b.value());
    }
  }
  return out;
}

namespace {

constexpr const char* kDdpPrefix = "module.";

c10::impl::GenericDict str_dict() { return c10::impl::GenericDict(c10::StringType::get(), c10::AnyType::get()); }

std::string shape_text(const at::Tensor& t) {
  if (t.dim() == 0) return fmt::format("scalar {}", c10::toString(t.scalar_type()));
  return fmt::format("{} {}", fmt::join(t.sizes(), "x"), c10::toString(t.scalar_type()));
}

// How a stored tensor differs from the one it is loaded into (`theirs`:
// "the model"), in shape or else in dtype; "" when in neither.
std::string difference(const at::Tensor& stored, const at::Tensor& into, const char* theirs) {
  if (stored.sizes() != into.sizes()) {
    return fmt::format("has shape {}, {} has {}", shape_text(stored), theirs, shape_text(into));
  }
  if (stored.scalar_type() != into.scalar_type()) {
    return fmt::format("has dtype {}, {} has {} (the shape is the same: save it as {})",
                       c10::toString(stored.scalar_type()), theirs, c10::toString(into.scalar_type()),
                       c10::toString(into.scalar_type()));
  }
  return "";
}

// Why an optimizer state's `step` (`field` names it) is no step PyTorch
// keeps (a number, or a one-element tensor, that is a non-negative whole
// number); "" when it is one. Read as a resume reads it and as a save
// checks it.
std::string step_problem(const c10::IValue& step, const std::string& field) {
  double s = 0;
  if (step.isInt()) s = static_cast<double>(step.toInt());
  else if (step.isDouble()) s = step.toDouble();
  else if (step.isTensor() && step.toTensor().is_complex())
    return fmt::format("{} is a complex tensor, expected a number", field);
  else if (step.isTensor() && step.toTensor().numel() == 1) s = step.toTensor().item<double>();
  else return fmt::format("{} is a {}, expected a number", field, step.tagKind());
  if (!std::isfinite(s) || s < 0 || s != std::floor(s)) {
    return fmt::format("{} is {}, expected a non-negative whole number", field, s);
  }
  return "";
}

// The key of the first floating tensor of one parameter's optimizer state
// that holds NaN or Inf, or "": a state no resume takes (a diverged run's).
std::string nonfinite_entry(const c10::impl::GenericDict& per_parameter) {
  for (const auto& item : per_parameter) {
    if (!item.value().isTensor() || !item.key().isString()) continue;
    const at::Tensor& t = item.value().toTensor();
    if (!t.defined() || t.is_meta() || !at::isFloatingType(t.scalar_type()) || t.numel() == 0) continue;
    // float8 and other narrow types lack isfinite: widened to float32 first.
    const at::Tensor wide = t.element_size() < 4 ? t.to(at::kFloat) : t;
    if (!at::isfinite(wide).all().item<bool>()) return item.key().toStringRef();
  }
  return "";
}

// What a value of an optimizer's state may be, as torch.save and torch.load
// carry it: None, a bool, a number, a string, a tensor with data, or a list,
// tuple or dict of them. "" when it is; else what it is, at `where`.
std::string unsavable(const c10::IValue& v, const std::string& where) {
  if (v.isNone() || v.isBool() || v.isInt() || v.isDouble() || v.isString()) return "";
  if (v.isTensor()) {
    const at::Tensor& t = v.toTensor();
    if (!t.defined()) return fmt::format("{} is an undefined tensor", where);
    if (t.is_meta()) return fmt::format("{} is a meta tensor, which holds no data", where);
    return "";
  }
  if (v.isList() || v.isTuple()) {
    const std::vector<c10::IValue> items = v.isList() ? v.toListRef().vec() : v.toTupleRef().elements().vec();
    for (std::size_t i = 0; i < items.size(); ++i) {
      if (std::string problem = unsavable(items[i], fmt::format("{}[{}]", where, i)); !problem.empty()) return problem;
    }
    return "";
  }
  if (v.isGenericDict()) {
    for (const auto& item : v.toGenericDict()) {
      const std::string key = item.key().isString() ? "'" + item.key().toStringRef() + "'"
                              : item.key().isInt()  ? std::to_string(item.key().toInt())
                                                    : item.key().tagKind();
      if (std::string problem = unsavable(item.value(), fmt::format("{}[{}]", where, key)); !problem.empty()) {
        return problem;
      }
    }
    return "";
  }
  return fmt::format("{} is a {}, which a checkpoint cannot hold", where, v.tagKind());
}

// Why the state an optimizer plugin's state_dict() returned cannot be saved
// as PyTorch's layout ({"state": {i: {...}}, "param_groups": [...]}), or
// resumed from ("" when it can): what a resume refuses, refused when it is
// written, as the plugin's fault, rather than in a checkpoint that no run
// can continue from.
std::string optimizer_state_problem(const c10::IValue& state) {
  if (!state.isGenericDict()) return fmt::format("is a {}, not a dict", state.tagKind());
  const c10::impl::GenericDict root = state.toGenericDict();
  const auto has = [&](const char* key, bool (c10::IValue::*is)() const) {
    const auto it = root.find(key);
    return it != root.end() && (it->value().*is)();
  };
  if (!has("state", &c10::IValue::isGenericDict)) return "has no dict 'state'";
  if (!has("param_groups", &c10::IValue::isList)) return "has no list 'param_groups'";
  if (std::string problem = unsavable(state, ""); !problem.empty()) return problem;
  // A step as a resume reads it (step_problem).
  for (const auto& entry : root.find("state")->value().toGenericDict()) {
    if (!entry.value().isGenericDict()) continue;
    const auto& per_parameter = entry.value().toGenericDict();
    const std::string parameter = entry.key().isInt()      ? std::to_string(entry.key().toInt())
                                  : entry.key().isString() ? "'" + entry.key().toStringRef() + "'"
                                                           : entry.key().tagKind();
    if (const std::string key = nonfinite_entry(per_parameter); !key.empty()) {
      return fmt::format("['state'][{}]['{}'] holds NaN or Inf, which a resume refuses", parameter, key);
    }
    const auto step = per_parameter.find("step");
    if (step == per_parameter.end()) continue;
    const std::string field = fmt::format("['state'][{}]['step']", parameter);
    if (std::string problem = step_problem(step->value(), field); !problem.empty()) return problem;
  }
  return "";
}

}  // namespace

void save_checkpoint(const std::string& path, const CheckpointInfo& info, torch::nn::Module& model,
                     const Optimizer* optimizer, const ModelConfig& config, const std::string& optimizer_plugin) {
  // The live tensors, detached (views, not copies): save_torch streams each
  // storage into the file from where it lies.
  c10::impl::GenericDict model_state(c10::StringType::get(), c10::TensorType::get());
  for (const auto& [name, tensor] : state_entries(model)) model_state.insert(name, tensor.detach());
  c10::impl::GenericDict top = str_dict();
  top.insert("step", info.step);
  top.insert("epoch", info.epoch);
  top.insert("model", model_state);
  if (optimizer) {
    c10::IValue state = optimizer->state_dict();
    if (const std::string problem = optimizer_state_problem(state); !problem.empty()) {
      throw std::logic_error(fmt::format("its state_dict() {}; a checkpoint holds the state in PyTorch's layout, "
                                         "which a resume loads", problem));
    }
    top.insert("optimizer", std::move(state));
  }
  if (optimizer && !optimizer_plugin.empty()) top.insert("optimizer_name", optimizer_plugin);
  if (info.scaler) {
    // The keys and types of GradScaler.state_dict().
    c10::impl::GenericDict scaler = str_dict();
    scaler.insert("scale", info.scaler->scale);
    scaler.insert("growth_factor", info.scaler->growth_factor);
    scaler.insert("backoff_factor", info.scaler->backoff_factor);
    scaler.insert("growth_interval", info.scaler->growth_interval);
    scaler.insert("_growth_tracker", info.scaler->growth_tracker);
    top.insert("scaler", scaler);
  }
  if (config.params) {
    c10::impl::GenericDict model_config = str_dict();
    model_config.insert("name", config.plugin);
    for (const auto& [key, value] : config.params->values()) model_config.insert(key, to_toml(value));
    top.insert("model_config", model_config);
  }
  if (!config.channels.empty()) top.insert("data_channels", c10::List<std::int64_t>(config.channels));
  if (!info.accumulated_gradients.empty()) {
    c10::impl::GenericDict grads(c10::StringType::get(), c10::TensorType::get());
    for (const auto& [name, grad] : info.accumulated_gradients) grads.insert(name, grad.detach());
    top.insert("accumulated_gradients", grads);
    if (info.accumulated_batches > 0) top.insert("accumulated_batches", info.accumulated_batches);
  }
  if (info.partial_accumulation_ranks > 0) top.insert("partial_accumulation_ranks", info.partial_accumulation_ranks);
  if (info.gradient_accumulation_frequency > 0) {
    top.insert("gradient_accumulation_frequency", info.gradient_accumulation_frequency);
  }
  if (info.world_size > 0) top.insert("world_size", info.world_size);
  if (info.train_batch_size > 0) top.insert("train_batch_size", info.train_batch_size);
  if (info.seed > 0) top.insert("seed", info.seed);
  save_torch(path, top);
}

namespace {

// How messages name a field: a top-level key quoted ('step'), a nested one
// as Python subscripts it (['scaler']['scale']), as passed in.
std::string shown(const std::string& field) { return field.rfind('[', 0) == 0 ? field : "'" + field + "'"; }

// The checks of one file; every message starts with the file's path.
class Fields {
 public:
  Fields(const std::string& path, const c10::impl::GenericDict& top) : path_(path), top_(top) {}

  [[noreturn]] void fail(const std::string& what) const { throw Error(fmt::format("{}: {}", path_, what)); }

  std::optional<c10::IValue> find(const c10::impl::GenericDict& dict, const std::string& key) const {
    for (const auto& e : dict) {
      if (e.key().isString() && e.key().toStringRef() == key) return e.value();
    }
    return std::nullopt;
  }
  // How many of the top-level values are tensors (a bare state dict's are).
  std::size_t top_level_tensors() const {
    std::size_t n = 0;
    for (const auto& e : top_) n += e.value().isTensor();
    return n;
  }
  std::optional<c10::IValue> find(const std::string& key) const {
    auto v = find(top_, key);
    // Python writes None for a state it does not have.
    if (v && v->isNone()) return std::nullopt;
    return v;
  }

  // A non-negative integer, or a 0-d integer tensor holding one.
  std::int64_t count(const c10::IValue& v, const std::string& field, std::int64_t most) const {
    std::int64_t n = 0;
    if (v.isInt()) {
      n = v.toInt();
    } else if (v.isTensor()) {
      const at::Tensor& t = v.toTensor();
      if (t.dim() != 0 || !at::isIntegralType(t.scalar_type(), /*includeBool=*/false)) {
        fail(fmt::format("{} is a tensor of shape [{}] and dtype {}, expected an integer or a 0-d integer tensor",
                         shown(field), fmt::join(t.sizes(), ", "), c10::toString(t.scalar_type())));
      }
      if (t.scalar_type() == at::kUInt64) {
        // Above int64's range it is out of every field's range too.
        const std::uint64_t u = t.item().toUInt64();
        if (u > static_cast<std::uint64_t>(most)) {
          fail(fmt::format("{} is {}, expected an integer in 0..{}", shown(field), u, most));
        }
        n = static_cast<std::int64_t>(u);
      } else {
        n = t.item<std::int64_t>();
      }
    } else {
      fail(fmt::format("{} is a {}, expected a non-negative integer", shown(field), v.tagKind()));
    }
    if (n < 0 || n > most) fail(fmt::format("{} is {}, expected an integer in 0..{}", shown(field), n, most));
    return n;
  }

  c10::impl::GenericDict dict(const c10::IValue& v, const std::string& field) const {
    if (!v.isGenericDict()) fail(fmt::format("{} is a {}, expected a dict", shown(field), v.tagKind()));
    return v.toGenericDict();
  }

  // A dict of str -> tensor; `prefix` is dropped from every key when every
  // key has it (DistributedDataParallel's "module.").
  std::map<std::string, at::Tensor> tensors(const c10::IValue& v, const std::string& field,
                                            const char* prefix = nullptr) const {
    std::vector<std::pair<std::string, at::Tensor>> items;
    for (const auto& e : dict(v, field)) {
      if (!e.key().isString()) {
        fail(fmt::format("{} has a key of type {}, expected names", shown(field), e.key().tagKind()));
      }
      if (!e.value().isTensor()) {
        fail(fmt::format("{} entry '{}' is a {}, expected a tensor", shown(field), e.key().toStringRef(),
                         e.value().tagKind()));
      }
      items.emplace_back(e.key().toStringRef(), e.value().toTensor());
    }
    const std::string p = prefix ? prefix : "";
    const bool strip = !p.empty() && !items.empty() &&
                       std::all_of(items.begin(), items.end(), [&](const auto& i) { return i.first.rfind(p, 0) == 0; });
    std::map<std::string, at::Tensor> out;
    for (auto& [name, t] : items) out[strip ? name.substr(p.size()) : name] = t;
    return out;
  }

  double number(const c10::impl::GenericDict& d, const std::string& field, const char* key) const {
    const auto v = find(d, key);
    if (!v) fail(fmt::format("'{}' has no '{}'", field, key));
    double x = 0;
    if (v->isDouble()) x = v->toDouble();
    else if (v->isInt()) x = static_cast<double>(v->toInt());
    else fail(fmt::format("['{}']['{}'] is a {}, expected a number", field, key, v->tagKind()));
    if (!std::isfinite(x)) fail(fmt::format("['{}']['{}'] is {}, expected a finite number", field, key, x));
    return x;
  }

  const std::string& path() const { return path_; }

 private:
  const std::string& path_;
  c10::impl::GenericDict top_;
};

// The optimizer state's per-parameter entries, for any optimizer plugin: a
// floating tensor that holds NaN or Inf (the state of a diverged run, a
// damaged file) is refused here, and so is a "step", which PyTorch keeps as
// a number or a 0-d tensor, that is negative or not whole; the rest (one
// entry per parameter, moments of the parameter's shape, their signs) by the
// optimizer's own load_state_dict.
void check_optimizer_steps(const Fields& f, const c10::IValue& optimizer) {
  const c10::impl::GenericDict root = f.dict(optimizer, "optimizer");
  const auto state = f.find(root, "state");
  if (!state) f.fail("'optimizer' has no 'state'");
  for (const auto& entry : f.dict(*state, "['optimizer']['state']")) {
    if (!entry.value().isGenericDict()) continue;  // the optimizer names it
    const std::string parameter = entry.key().isInt() ? std::to_string(entry.key().toInt())
                                                      : "'" + entry.key().toStringRef() + "'";
    if (const std::string key = nonfinite_entry(entry.value().toGenericDict()); !key.empty()) {
      f.fail(fmt::format("['optimizer']['state'][{}]['{}'] holds NaN or Inf (the state of a run that diverged, "
                         "or a damaged file); resume from an earlier checkpoint",
                         parameter, key));
    }
    const auto step = f.find(entry.value().toGenericDict(), "step");
    if (!step) continue;
    const std::string field = fmt::format("['optimizer']['state'][{}]['step']", parameter);
    if (const std::string problem = step_problem(*step, field); !problem.empty()) f.fail(problem);
  }
}

// "[data] channels = [...] in the checkpoint, [...] in this run", when the
// checkpoint's "data_channels" (ours) differ from this run's; "" otherwise.
std::string channel_difference(const Fields& f, const ModelConfig& mine) {
  const auto saved = f.find("data_channels");
  if (!saved || mine.channels.empty()) return "";
  if (!saved->isIntList()) {
    f.fail(fmt::format("'data_channels' is a {}, expected a list of integers", saved->tagKind()));
  }
  const std::vector<std::int64_t> there = saved->toIntVector();
  if (there == mine.channels) return "";
  return fmt::format("[data] channels = [{}] in the checkpoint, [{}] in this run ({})", fmt::join(there, ", "),
                     fmt::join(mine.channels, ", "), mine.channels_where);
}

// A "model_config" value as TOML writes it, to compare with this run's
// `mine`: deepcam-host writes each as TOML text; a file written elsewhere
// (Python) may hold a number or a bool, read as the key's type (8 and 8.0
// are one value); any other type is named, so that it differs.
std::string model_value_text(const c10::IValue& v, const ParamValue& mine) {
  if (v.isString()) return v.toStringRef();
  if (v.isBool()) return to_toml(ParamValue(v.toBool()));
  const bool integer_key = std::holds_alternative<std::int64_t>(mine);
  if (v.isInt()) {
    return integer_key ? to_toml(ParamValue(v.toInt())) : to_toml(ParamValue(static_cast<double>(v.toInt())));
  }
  if (v.isDouble()) {
    const double x = v.toDouble();
    const bool whole = std::isfinite(x) && std::nearbyint(x) == x && std::fabs(x) < 9.0e18;
    return integer_key && whole ? to_toml(ParamValue(static_cast<std::int64_t>(x))) : to_toml(ParamValue(x));
  }
  return fmt::format("(a {})", v.tagKind());
}

// The model keys that differ from the checkpoint's "model_config" (ours),
// if it has one, and the input channels.
std::vector<std::string> model_differences(const Fields& f, const ModelConfig& mine) {
  const auto saved = f.find("model_config");
  if (!saved) return {};
  // The model's settings by name (a value of any type: one of no TOML
  // scalar type differs from every setting, model_value_text): anything
  // but a dict of names is a damaged file, not settings to compare.
  if (!saved->isGenericDict()) {
    f.fail(fmt::format("'model_config' is a {}, expected a dict of the model's settings", saved->tagKind()));
  }
  for (const auto& e : saved->toGenericDict()) {
    if (!e.key().isString()) {
      f.fail(fmt::format("'model_config' has a key that is a {}, expected the name of a setting", e.key().tagKind()));
    }
  }
  if (!mine.params) return {};
  const c10::impl::GenericDict cfg = saved->toGenericDict();
  auto text = [&](const std::string& key) -> std::optional<std::string> {
    const auto v = f.find(cfg, key);
    if (v && v->isString()) return v->toStringRef();
    return std::nullopt;
  };
  std::vector<std::string> differ;
  if (const std::string channels = channel_difference(f, mine); !channels.empty()) differ.push_back(channels);
  if (const auto name = text("name"); name && *name != mine.plugin) {
    differ.push_back(fmt::format("[model] name = \"{}\" in the checkpoint, \"{}\" in this run", *name, mine.plugin));
  } else {
    for (const auto& [key, value] : mine.params->values()) {
      const std::string here = to_toml(value);
      const auto v = f.find(cfg, key);
      const auto there = v ? std::optional<std::string>(model_value_text(*v, value)) : std::nullopt;
      if (there && *there != here) {
        differ.push_back(fmt::format("[model] {} = {} in the checkpoint, {} in this run ({})", key, *there, here,
                                     mine.params->where(key)));
      }
    }
  }
  return differ;
}

// A checkpoint of other input channels: refused in the same words whether
// its weights fit this model (reordered) or not (fewer, more).
[[noreturn]] void fail_on_other_channels(const Fields& f, const std::string& channels) {
  f.fail(fmt::format("written for other input channels: {}; use the channels it was trained on", channels));
}

// When the model's entries do not fit: the model keys that differ, if the
// checkpoint says.
void fail_on_other_model(const Fields& f, const ModelConfig& mine) {
  const std::vector<std::string> differ = model_differences(f, mine);
  if (differ.size() == 1 && differ.front() == channel_difference(f, mine)) fail_on_other_channels(f, differ.front());
  if (!differ.empty()) {
    f.fail(fmt::format("written for another model: {}; use the settings of the run that wrote it",
                       fmt::join(differ, "; ")));
  }
}

// The GradScaler state in a checkpoint's 'scaler' dict, checked.
ScalerState read_scaler(const Fields& f, const c10::impl::GenericDict& d) {
  ScalerState s;
  s.scale = f.number(d, "scaler", "scale");
  s.growth_factor = f.number(d, "scaler", "growth_factor");
  s.backoff_factor = f.number(d, "scaler", "backoff_factor");
  const auto interval = f.find(d, "growth_interval");
  const auto tracker = f.find(d, "_growth_tracker");
  if (!interval) f.fail("'scaler' has no 'growth_interval'");
  if (!tracker) f.fail("'scaler' has no '_growth_tracker'");
  // GradScaler keeps the tracker as an int32 tensor, and ATen's CUDA
  // kernel takes the interval as an int: a larger one would be cut short.
  constexpr std::int64_t kInt32Max = std::numeric_limits<std::int32_t>::max();
  s.growth_interval = f.count(*interval, "['scaler']['growth_interval']", kInt32Max);
  s.growth_tracker = f.count(*tracker, "['scaler']['_growth_tracker']", kInt32Max);
  if (s.scale <= 0) f.fail(fmt::format("['scaler']['scale'] is {}, expected > 0", s.scale));
  // GradScaler keeps it as a float32 tensor, and unscales by its
  // reciprocal, also float32.
  constexpr double kFloat32Max = std::numeric_limits<float>::max();
  if (s.scale > kFloat32Max || static_cast<float>(s.scale) == 0.0f) {
    f.fail(fmt::format("['scaler']['scale'] is {}, beyond float32's range, where the scale is kept", s.scale));
  }
  if (1.0 / static_cast<double>(static_cast<float>(s.scale)) > kFloat32Max) {
    f.fail(fmt::format("['scaler']['scale'] is {}, so small that its reciprocal, by which the gradients are "
                       "unscaled, is beyond float32's range",
                       s.scale));
  }
  if (s.growth_factor <= 1) f.fail(fmt::format("['scaler']['growth_factor'] is {}, expected > 1", s.growth_factor));
  if (s.backoff_factor <= 0 || s.backoff_factor >= 1) {
    f.fail(fmt::format("['scaler']['backoff_factor'] is {}, expected in (0, 1)", s.backoff_factor));
  }
  if (s.growth_interval < 1) f.fail("['scaler']['growth_interval'] is 0, expected >= 1");
  // GradScaler grows the scale and starts the count again when it reaches
  // the interval: a count at or beyond it never would again.
  if (s.growth_tracker >= s.growth_interval) {
    f.fail(fmt::format("['scaler']['_growth_tracker'] is {}, expected below ['scaler']['growth_interval'] ({}): "
                       "the scale grows and the count starts again when it reaches the interval",
                       s.growth_tracker, s.growth_interval));
  }
  return s;
}

}  // namespace

CheckpointInfo load_checkpoint(const std::string& path, torch::nn::Module& model, Optimizer* optimizer,
                               const LoadOptions& options) {
  // Our own reader: the reference's files hold OrderedDicts, which
  // torch::pickle_load cannot read.
  const c10::IValue top = load_torch_save(path);
  if (!top.isGenericDict()) throw Error(fmt::format("{}: the top level is a {}, expected a dict", path, top.tagKind()));
  const Fields f(path, top.toGenericDict());

  CheckpointInfo info;
  constexpr std::int64_t kMost = std::numeric_limits<std::int64_t>::max() / 4;
  // 2^32 batches is years of training at any speed: a larger step is a
  // damaged file, and a schedule resumed at it (cosine_annealing walks its
  // recursion up to the step) would not start in any time.
  constexpr std::int64_t kMostSteps = std::int64_t{1} << 32;
  constexpr std::int64_t kMostRanks = std::int64_t{1} << 24;
  constexpr std::int64_t kMostBatch = 1000000;
  const auto step = f.find("step");
  const auto epoch = f.find("epoch");
  if (step) info.step = f.count(*step, "step", kMostSteps);
  if (epoch) info.epoch = f.count(*epoch, "epoch", kMostSteps);
  if (epoch && !step) f.fail(fmt::format("'epoch' is {} but there is no 'step'", info.epoch));
  if (info.step < info.epoch) {
    f.fail(fmt::format("'step' is {} but 'epoch' is {}: every epoch takes at least one step", info.step, info.epoch));
  }

  // The model: every entry by name, shape and dtype, finite.
  const auto model_state = f.find("model");
  if (!model_state) {
    if (const std::size_t n = f.top_level_tensors(); n > 0) {
      f.fail(fmt::format("no 'model' state dict: the file holds {} tensors at its top level, as "
                         "torch.save(model.state_dict()) writes a bare state dict; deepcam-host reads a checkpoint "
                         "dict with the state dict under 'model', as the reference saves it: save "
                         "{{'model': model.state_dict()}}",
                         n));
    }
    f.fail("no 'model' state dict");
  }
  const std::map<std::string, at::Tensor> stored = f.tensors(*model_state, "model", kDdpPrefix);
  const auto entries = state_entries(model);
  // Not one name in common: the file's names carry a prefix (torch.compile's
  // "_orig_mod.", a wrapper's "model.") or belong to another network.
  const bool none_in_common = std::none_of(entries.begin(), entries.end(),
                                           [&](const auto& e) { return stored.count(e.first) != 0; });
  std::set<std::string> known;
  for (const auto& [name, tensor] : entries) {
    known.insert(name);
    auto it = stored.find(name);
    if (it == stored.end()) {
      fail_on_other_model(f, options.model);
      if (none_in_common && !stored.empty()) {
        f.fail(fmt::format("model entry '{}' is missing, and no entry of the file has a name of the model's (the "
                           "file's first is '{}'): a prefix other than DistributedDataParallel's 'module.', such as "
                           "torch.compile's '_orig_mod.', is not taken off; save the state dict without it",
                           name, stored.begin()->first));
      }
      f.fail(fmt::format("model entry '{}' is missing", name));
    }
    if (const std::string differs = difference(it->second, tensor, "the model"); !differs.empty()) {
      fail_on_other_model(f, options.model);
      f.fail(fmt::format("model entry '{}' {}", name, differs));
    }
  }
  for (const auto& [name, t] : stored) {
    if (!known.count(name)) {
      fail_on_other_model(f, options.model);
      f.fail(fmt::format("entry '{}' is not in this model", name));
    }
  }
  for (const auto& [name, t] : stored) {
    if (t.is_floating_point() && !at::isfinite(t).all().item<bool>()) {
      f.fail(fmt::format("model entry '{}' holds NaN or infinite values", name));
    }
    // BatchNorm's running variance, and its count of batches.
    if (ends_with(name, ".running_var") && t.is_floating_point() && at::lt(t, 0).any().item<bool>()) {
      f.fail(fmt::format("model entry '{}' holds negative values; it is a variance", name));
    }
    if (ends_with(name, ".num_batches_tracked") && !t.is_floating_point() && !t.is_complex() &&
        at::lt(t, 0).any().item<bool>()) {
      f.fail(fmt::format("model entry '{}' holds a negative value; it counts batches", name));
    }
  }

  // Every weight fits, but the first convolution's would meet other fields
  // than it learnt.
  if (const std::string channels = channel_difference(f, options.model); !channels.empty()) {
    fail_on_other_channels(f, channels);
  }
  info.other_model_settings = model_differences(f, options.model);

  // The optimizer: checked and loaded by itself, all or nothing.
  const bool read_optimizer = optimizer && !options.weights_only;
  const auto optimizer_state = read_optimizer ? f.find("optimizer") : std::nullopt;
  if (read_optimizer && options.require_optimizer && !optimizer_state) {
    f.fail("no 'optimizer' state to resume from (a checkpoint of the model alone); set [run] resume_weights_only = "
           "true to resume from its weights with a fresh optimizer");
  }
  if (optimizer_state && (!step || !epoch)) {
    // The optimizer would continue at its own step while the schedule and
    // the epochs started again at 0.
    f.fail(fmt::format("the 'optimizer' state is there but no '{}', so a resume cannot know where training "
                       "stopped; set [run] resume_weights_only = true to resume from its weights with a fresh "
                       "optimizer",
                       step ? "epoch" : "step"));
  }
  if (optimizer_state && !options.optimizer_plugin.empty()) {
    if (const auto written_by = f.find("optimizer_name")) {
      if (!written_by->isString())
        f.fail(fmt::format("'optimizer_name' is a {}, expected a string", written_by->tagKind()));
      const std::string& theirs = written_by->toStringRef();
      if (theirs != options.optimizer_plugin) {
        f.fail(fmt::format("'optimizer' is the state of the optimizer plugin \"{0}\", and this run's [optimizer] name "
                           "is \"{1}\": resume with [optimizer] name = \"{0}\", or set [run] resume_weights_only = "
                           "true to start \"{1}\" afresh from the checkpoint's weights",
                           theirs, options.optimizer_plugin));
      }
    }
  }
  if (optimizer_state) check_optimizer_steps(f, *optimizer_state);

  if (const auto sc = f.find("scaler")) {
    // An empty dict is GradScaler(enabled=False).state_dict(): a script that
    // always saves its scaler writes it from a run without fp16. It holds
    // no scaler, as a file without the key (PyTorch's enabled scaler
    // refuses to load it; an amp_fp16 resume starts one afresh, and says so).
    const c10::impl::GenericDict d = f.dict(*sc, "scaler");
    if (!d.empty()) info.scaler = read_scaler(f, d);
  }

  if (const auto ranks = f.find("partial_accumulation_ranks")) {
    info.partial_accumulation_ranks = f.count(*ranks, "partial_accumulation_ranks", kMost);
  }
  const auto batches = f.find("accumulated_batches");
  if (batches) info.accumulated_batches = f.count(*batches, "accumulated_batches", kMost);
  if (const auto k = f.find("gradient_accumulation_frequency")) {
    info.gradient_accumulation_frequency = f.count(*k, "gradient_accumulation_frequency", kMost);
    if (info.gradient_accumulation_frequency == 0) f.fail("'gradient_accumulation_frequency' is 0, expected >= 1");
    // Saved in the middle of an accumulation only where its frequency does
    // not divide the step.
    if (info.partial_accumulation_ranks > 0 && info.step % info.gradient_accumulation_frequency == 0) {
      f.fail(fmt::format("'partial_accumulation_ranks' is {}, but its step {} ends an accumulation of "
                         "'gradient_accumulation_frequency' {}: no accumulation was in progress",
                         info.partial_accumulation_ranks, info.step, info.gradient_accumulation_frequency));
    }
  }
  if (const auto ranks = f.find("world_size")) {
    // More ranks than any machine has, or a larger batch than a run file
    // takes ([run] train_batch_size: 1..1e6): a damaged file.
    info.world_size = f.count(*ranks, "world_size", kMostRanks);
    if (info.world_size == 0) f.fail("'world_size' is 0, expected >= 1");
  }
  if (const auto seed = f.find("seed")) {
    info.seed = f.count(*seed, "seed", kMost);
    if (info.seed == 0) f.fail("'seed' is 0, expected >= 1 (deepcam-host's seeds start at 1)");
  }
  if (const auto batch = f.find("train_batch_size")) {
    info.train_batch_size = f.count(*batch, "train_batch_size", kMostBatch);
    if (info.train_batch_size == 0) f.fail("'train_batch_size' is 0, expected >= 1");
  }
  if (const auto grads = f.find("accumulated_gradients"); grads && !options.weights_only) {
    std::map<std::string, at::Tensor> params;
    for (const auto& p : model.named_parameters()) params[p.key()] = p.value();
    for (const auto& [name, g] : f.tensors(*grads, "accumulated_gradients")) {
      const auto it = params.find(name);
      if (it == params.end())
        f.fail(fmt::format("'accumulated_gradients' entry '{}' is no parameter of the model", name));
      if (const std::string differs = difference(g, it->second, "the parameter"); !differs.empty()) {
        f.fail(fmt::format("'accumulated_gradients' entry '{}' {}", name, differs));
      }
      info.accumulated_gradients.emplace_back(name, g);
    }
    // save_checkpoint writes the partial gradient whole, every trained
    // parameter's, with the batches it sums (at least one): a part of it
    // would resume to other weights than the uninterrupted run's.
    if (!batches) f.fail("'accumulated_gradients' comes without 'accumulated_batches', the batches it sums");
    if (info.accumulated_batches == 0) f.fail("'accumulated_batches' is 0, but 'accumulated_gradients' is there");
    std::set<std::string> held;
    for (const auto& entry : info.accumulated_gradients) held.insert(entry.first);
    for (const auto& [name, param] : params) {
      if (param.requires_grad() && !held.count(name)) {
        f.fail(fmt::format("'accumulated_gradients' has no entry for the parameter '{}' (it holds {} of the "
                           "model's parameters)",
                           name, held.size()));
      }
    }
  } else if (batches && info.accumulated_batches > 0 && !options.weights_only) {
    f.fail(fmt::format("'accumulated_batches' is {}, but there is no 'accumulated_gradients'",
                       info.accumulated_batches));
  }

  // Everything checked: now the model, then the optimizer (which checks
  // its own entries before it changes anything).
  {
    at::NoGradGuard no_grad;
    for (auto& [name, tensor] : entries) tensor.copy_(stored.at(name));
  }
  if (optimizer_state) {
    try {
      optimizer->load_state_dict(*optimizer_state);
    } catch (const Error& e) {
      f.fail(fmt::format("'optimizer': {}", e.what()));
    } catch (const c10::Error& e) {
      // An operation the optimizer's checks apply to a stored tensor that
      // ATen lacks for its dtype.
      f.fail(fmt::format("'optimizer': {}", e.what_without_backtrace()));
    }
  }
  return info;
}

}  // namespace deepcam
