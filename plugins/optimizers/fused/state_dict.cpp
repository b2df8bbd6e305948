#include "state_dict.hpp"

#include <ATen/core/List.h>
#include <ATen/ops/all.h>
#include <ATen/ops/any.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/lt.h>
#include <fmt/format.h>

#include <cmath>
#include <map>
#include <sstream>
#include <utility>

#include "deepcam/error.hpp"

namespace deepcam::fused {

c10::IValue write_state_dict(c10::impl::GenericDict state, c10::impl::GenericDict group,
                             std::size_t parameters) {
  // A generic list, not c10::List<int64_t>: torch::pickle_save writes the
  // latter through torch.jit._pickle.build_intlist, one more global that
  // Python's weights_only torch.load would have to allow.
  c10::impl::GenericList indices(c10::AnyType::get());
  for (std::size_t i = 0; i < parameters; ++i) indices.push_back(static_cast<std::int64_t>(i));
  group.insert("params", std::move(indices));
  c10::impl::GenericList groups(c10::AnyType::get());
  groups.push_back(std::move(group));

  c10::impl::GenericDict root(c10::StringType::get(), c10::AnyType::get());
  root.insert("state", std::move(state));
  root.insert("param_groups", std::move(groups));
  return root;
}
namespace {

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << ']';
  return out.str();
}

}  // namespace

StateDictReader::StateDictReader(std::string optimizer, std::string layout)
    : optimizer_(std::move(optimizer)), layout_(std::move(layout)) {}

void StateDictReader::fail(const std::string& what) const {
  throw Error(optimizer_ + " optimizer state: " + what + " (expected " + layout_ + " layout for the same model)");
}

// The dicts are small, and their key type depends on the reader that made
// them (Dict[str, Tensor], Dict[str, Any], ...), so a scan over str keys.
const c10::IValue* StateDictReader::find(const c10::impl::GenericDict& dict, const std::string& key) const {
  for (const auto& entry : dict) {
    if (entry.key().isString() && entry.key().toStringRef() == key) return &entry.value();
  }
  return nullptr;
}

const c10::IValue& StateDictReader::require(const c10::impl::GenericDict& dict, const std::string& key,
                                            const std::string& where) const {
  const c10::IValue* value = find(dict, key);
  if (value == nullptr) fail(where + " has no key \"" + key + "\"");
  return *value;
}

double StateDictReader::to_number(const c10::IValue& value, const std::string& where) const {
  if (value.isDouble()) return value.toDouble();
  if (value.isInt()) return static_cast<double>(value.toInt());
  if (value.isTensor() && value.toTensor().is_complex()) fail(where + " is a complex tensor, expected a real number");
  if (value.isTensor() && value.toTensor().numel() == 1) return value.toTensor().item<double>();
  fail(where + " is a " + value.tagKind() + ", expected a number");
}

double StateDictReader::number(const c10::impl::GenericDict& dict, const std::string& key,
                               const std::string& where) const {
  return to_number(require(dict, key, where), where + "[\"" + key + "\"]");
}

bool StateDictReader::boolean(const c10::impl::GenericDict& dict, const std::string& key,
                              const std::string& where) const {
  const c10::IValue& value = require(dict, key, where);
  if (value.isBool()) return value.toBool();
  if (value.isInt()) return value.toInt() != 0;
  fail(where + "[\"" + key + "\"] is a " + value.tagKind() + ", expected a boolean");
}

// Parameter ids are ints in torch.save files; a state that went through a
// str-keyed format (JSON, some converters) has "0", "1", ...
std::int64_t StateDictReader::to_index(const c10::IValue& key, const std::string& where) const {
  if (key.isInt()) return key.toInt();
  if (key.isString()) {
    const std::string& text = key.toStringRef();
    std::size_t used = 0;
    try {
      const long long index = std::stoll(text, &used);
      if (used == text.size()) return index;
    } catch (const std::exception&) {
    }
  }
  fail(where + " has key " + (key.isString() ? "\"" + key.toStringRef() + "\"" : key.tagKind()) +
       ", expected a parameter index");
}

std::vector<c10::IValue> StateDictReader::to_items(const c10::IValue& value, const std::string& where) const {
  if (value.isList()) return value.toListRef().vec();
  if (value.isTuple()) return value.toTupleRef().elements().vec();
  fail(where + " is a " + value.tagKind() + ", expected a list");
}

std::vector<double> StateDictReader::betas(const c10::impl::GenericDict& group) const {
  const std::vector<c10::IValue> items =
      to_items(require(group, "betas", "param_groups[0]"), "param_groups[0][\"betas\"]");
  if (items.size() != 2) fail("param_groups[0][\"betas\"] has " + std::to_string(items.size()) + " values");
  return {to_number(items[0], "param_groups[0][\"betas\"][0]"), to_number(items[1], "param_groups[0][\"betas\"][1]")};
}

Hyperparameters StateDictReader::hyperparameters(const c10::impl::GenericDict& group) const {
  Hyperparameters h{};
  h.lr = number(group, "lr", "param_groups[0]");
  const std::vector<double> b = betas(group);
  h.beta1 = b[0];
  h.beta2 = b[1];
  h.weight_decay = number(group, "weight_decay", "param_groups[0]");
  auto text = [](double v) { return fmt::format("{}", v); };
  if (!non_negative(h.lr)) {
    fail("param_groups[0][\"lr\"] is " + text(h.lr) +
         ", expected a finite number >= 0 (0 is the rate of a warmup's first step)");
  }
  for (std::size_t i = 0; i < 2; ++i) {
    if (!beta_in_range(b[i])) {
      fail("param_groups[0][\"betas\"][" + std::to_string(i) + "] is " + text(b[i]) + ", expected in [0, 1)");
    }
  }
  if (!non_negative(h.weight_decay)) {
    fail("param_groups[0][\"weight_decay\"] is " + text(h.weight_decay) + ", expected >= 0");
  }
  return h;
}

void StateDictReader::require_eps(const c10::impl::GenericDict& group, double eps) const {
  if (!find(group, "eps")) return;
  const double saved = number(group, "eps", "param_groups[0]");
  if (saved != eps) {
    fail(fmt::format("param_groups[0][\"eps\"] is {}, and SPEC 5 fixes eps at {}: this state cannot continue as "
                     "it would in PyTorch; [run] resume_weights_only = true starts the optimizer afresh",
                     saved, eps));
  }
}

void StateDictReader::require_off(const c10::impl::GenericDict& group, const std::string& key,
                                  const std::string& why) const {
  if (find(group, key) && boolean(group, key, "param_groups[0]")) {
    fail("param_groups[0][\"" + key + "\"] is True: " + why +
         "; [run] resume_weights_only = true starts the optimizer afresh");
  }
}

std::int64_t StateDictReader::count(const c10::impl::GenericDict& dict, const std::string& key,
                                    const std::string& where) const {
  const double value = number(dict, key, where);
  if (!(value >= 0.0 && value == std::floor(value))) {
    fail(fmt::format("{}[\"{}\"] is {}, expected a non-negative whole number", where, key, value));
  }
  // A step count, bounded as the checkpoint's own step is: 2^32 steps is
  // years of training at any speed.
  constexpr double kMostSteps = 4294967296.0;
  if (value > kMostSteps) {
    fail(fmt::format("{}[\"{}\"] is {:.0f}, expected a non-negative whole number up to 2^32 (years of training): "
                     "a larger one is a damaged file",
                     where, key, value));
  }
  return static_cast<std::int64_t>(value);
}

StateDictReader::Parsed StateDictReader::parse(const c10::IValue& saved, std::size_t parameters) const {
  if (!saved.isGenericDict()) fail("the top level is a " + saved.tagKind() + ", expected a dict");
  const c10::impl::GenericDict root = saved.toGenericDict();

  const std::vector<c10::IValue> groups = to_items(require(root, "param_groups", "the top level"), "\"param_groups\"");
  if (groups.size() != 1) {
    fail("\"param_groups\" has " + std::to_string(groups.size()) +
         " groups; this optimizer has one group with all the model's parameters");
  }
  if (!groups[0].isGenericDict()) fail("param_groups[0] is a " + groups[0].tagKind() + ", expected a dict");
  Parsed parsed{groups[0].toGenericDict(), {}};

  // The state is keyed by the ids listed in the group, in parameter order.
  const std::vector<c10::IValue> ids =
      to_items(require(parsed.group, "params", "param_groups[0]"), "param_groups[0][\"params\"]");
  if (ids.size() != parameters) {
    fail("param_groups[0][\"params\"] lists " + std::to_string(ids.size()) + " parameters, but the model has " +
         std::to_string(parameters));
  }
  std::map<std::int64_t, std::size_t> position;
  for (std::size_t i = 0; i < ids.size(); ++i) position[to_index(ids[i], "param_groups[0][\"params\"]")] = i;

  const c10::IValue& state = require(root, "state", "the top level");
  if (!state.isGenericDict()) fail("\"state\" is a " + state.tagKind() + ", expected a dict");
  for (const auto& item : state.toGenericDict()) {
    const std::int64_t id = to_index(item.key(), "\"state\"");
    const std::string where = "state[" + std::to_string(id) + "]";
    const auto found = position.find(id);
    if (found == position.end()) fail(where + " belongs to no parameter in param_groups[0][\"params\"]");
    if (!item.value().isGenericDict()) fail(where + " is a " + item.value().tagKind() + ", expected a dict");
    parsed.entries.push_back({found->second, where, item.value().toGenericDict()});
  }
  return parsed;
}

at::Tensor StateDictReader::moment(const Entry& entry, const std::string& key, const at::Tensor& param) const {
  const std::string name = entry.where + "[\"" + key + "\"]";
  const c10::IValue& value = require(entry.values, key, entry.where);
  if (!value.isTensor()) fail(name + " is a " + value.tagKind() + ", expected a tensor");
  const at::Tensor& tensor = value.toTensor();
  if (tensor.sizes() != param.sizes()) {
    fail(name + " has shape " + shape_str(tensor.sizes()) + " but parameter " + std::to_string(entry.parameter) +
         " has shape " + shape_str(param.sizes()));
  }
  // Casting would drop the imaginary part (PyTorch only warns).
  if (tensor.is_complex()) fail(name + " is a complex tensor, expected real values");
  // The parameter's device, dtype and memory layout, so that the fused
  // kernels can walk state and parameter in step. Checked once converted:
  // float64 values beyond float32's range become infinities there.
  at::Tensor converted = at::empty_like(param, at::MemoryFormat::Preserve).copy_(tensor);
  if (!at::isfinite(converted).all().item<bool>()) {
    // In float64, which holds every floating dtype's values (ATen has no
    // isfinite for some, as float8).
    if (tensor.is_floating_point() && !at::isfinite(tensor.to(at::kDouble)).all().item<bool>()) {
      fail(name + " holds NaN or infinite values");
    }
    fail(name + " holds values beyond the range of the parameter's " + std::string(c10::toString(param.scalar_type())) +
         ", which become infinite");
  }
  if (key == "exp_avg_sq" && at::lt(converted, 0).any().item<bool>()) {
    fail(name + " holds negative values; it is a running mean of squared gradients");
  }
  return converted;
}

}  // namespace deepcam::fused
