#include "sgd.hpp"

#include <ATen/ATen.h>
#include <ATen/core/Dict.h>
#include <ATen/core/List.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/ivalue.h>

#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <utility>

#include "deepcam/error.hpp"
#include "deepcam/mlperf_log.hpp"

namespace deepcam::optimizers {
namespace {

// Messages name the entry in PyTorch's layout, e.g. state[3]["momentum_buffer"];
// the caller knows the file and adds it.
[[noreturn]] void fail(const std::string& what) {
  throw Error("SGD optimizer state: " + what +
              " (expected PyTorch's SGD.state_dict() layout for the same model)");
}

std::string number_str(double value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << ']';
  return out.str();
}

// The dicts are small, and their key type depends on the reader that made
// them (Dict[str, Tensor], Dict[str, Any], ...), so a scan over str keys.
const c10::IValue* find_key(const c10::impl::GenericDict& dict, const std::string& key) {
  for (const auto& entry : dict) {
    if (entry.key().isString() && entry.key().toStringRef() == key) return &entry.value();
  }
  return nullptr;
}

const c10::IValue& require_key(const c10::impl::GenericDict& dict, const std::string& key,
                               const std::string& where) {
  const c10::IValue* value = find_key(dict, key);
  if (value == nullptr) fail(where + " has no key \"" + key + "\"");
  return *value;
}

// Python keeps a hyper-parameter as the user gave it: momentum=0 is an int.
double to_number(const c10::IValue& value, const std::string& where) {
  if (value.isDouble()) return value.toDouble();
  if (value.isInt()) return static_cast<double>(value.toInt());
  if (value.isTensor() && value.toTensor().numel() == 1) return value.toTensor().item<double>();
  fail(where + " is a " + value.tagKind() + ", expected a number");
}

bool to_bool(const c10::IValue& value, const std::string& where) {
  if (value.isBool()) return value.toBool();
  fail(where + " is a " + value.tagKind() + ", expected true or false");
}

// Parameter ids are ints in torch.save files; a state that went through a
// str-keyed format (JSON, some converters) has "0", "1", ...
std::int64_t to_index(const c10::IValue& key, const std::string& where) {
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

std::vector<c10::IValue> to_items(const c10::IValue& value, const std::string& where) {
  if (value.isList()) return value.toListRef().vec();
  if (value.isTuple()) return value.toTupleRef().elements().vec();
  fail(where + " is a " + value.tagKind() + ", expected a list");
}

}  // namespace

void SgdOptions::check(const std::function<std::string(const std::string& key)>& where) const {
  // torch.optim.SGD's own checks, with its wording of the Nesterov rule.
  if (!(lr >= 0.0)) throw Error(where("lr") + " = " + number_str(lr) + ": must be >= 0");
  if (!(momentum >= 0.0)) throw Error(where("momentum") + " = " + number_str(momentum) + ": must be >= 0");
  if (!(weight_decay >= 0.0)) {
    throw Error(where("weight_decay") + " = " + number_str(weight_decay) + ": must be >= 0");
  }
  if (nesterov && (momentum <= 0.0 || dampening != 0.0)) {
    throw Error(where("nesterov") + " = true: Nesterov momentum needs momentum > 0 and dampening = 0 (momentum = " +
                number_str(momentum) + ", dampening = " + number_str(dampening) +
                "); set both or nesterov = false");
  }
}

SgdOptions SgdOptions::from(const Params& params) {
  SgdOptions options;
  options.lr = params.number("lr");
  options.momentum = params.number("momentum");
  options.dampening = params.number("dampening");
  options.weight_decay = params.number("weight_decay");
  options.nesterov = params.boolean("nesterov");
  // "run.toml:4 [optimizer] nesterov": the file and line that set the key.
  options.check([&](const std::string& key) { return params.where(key); });
  return options;
}

Sgd::Sgd(std::vector<at::Tensor> parameters, const SgdOptions& options)
    : parameters_(std::move(parameters)), momentum_buffers_(parameters_.size()), options_(options) {}

void Sgd::step() {
  // The update writes into leaves that require grad.
  at::NoGradGuard no_grad;
  const double lr = options_.lr;
  const double momentum = options_.momentum;
  const double dampening = options_.dampening;
  const double weight_decay = options_.weight_decay;
  for (std::size_t i = 0; i < parameters_.size(); ++i) {
    at::Tensor& param = parameters_[i];
    if (!param.grad().defined()) continue;
    // Every line below is one line of torch/optim/sgd.py _single_tensor_sgd,
    // in its order, with its scalar arithmetic in double as Python does it:
    // reordering any of them changes the last bits of the result.
    at::Tensor grad = param.grad();
    if (weight_decay != 0.0) grad = grad.add(param, weight_decay);
    if (momentum != 0.0) {
      at::Tensor& buf = momentum_buffers_[i];
      if (!buf.defined()) {
        buf = grad.detach().clone();
      } else {
        buf.mul_(momentum).add_(grad, 1.0 - dampening);
      }
      if (options_.nesterov) {
        grad = grad.add(buf, momentum);
      } else {
        grad = buf;
      }
    }
    param.add_(grad, -lr);
  }
}

void Sgd::zero_grad() {
  // PyTorch's default (set_to_none=True): backward then allocates fresh grads.
  for (at::Tensor& param : parameters_) {
    if (param.grad().defined()) param.mutable_grad().reset();
  }
}

void Sgd::log_hyperparameters(MlperfLog& log) const {
  // SPEC 5.4 names the keys for Adam, AdamW and LAMB; SGD logs its own
  // hyper-parameters under the same opt_ prefix.
  log.event("opt_name", "SGD");
  log.event("opt_lr", options_.lr);
  log.event("opt_momentum", options_.momentum);
  log.event("opt_dampening", options_.dampening);
  log.event("opt_nesterov", options_.nesterov);
  log.event("opt_weight_decay", options_.weight_decay);
}

c10::IValue Sgd::state_dict() const {
  // Like PyTorch, the tensors are the live state, not copies.
  c10::impl::GenericDict state(c10::IntType::get(), c10::AnyType::get());
  for (std::size_t i = 0; i < momentum_buffers_.size(); ++i) {
    if (!momentum_buffers_[i].defined()) continue;
    c10::impl::GenericDict entry(c10::StringType::get(), c10::AnyType::get());
    entry.insert("momentum_buffer", momentum_buffers_[i]);
    state.insert(static_cast<std::int64_t>(i), std::move(entry));
  }

  // A generic list, not c10::List<int64_t>: torch::pickle_save writes the
  // latter through torch.jit._pickle.build_intlist, one more global that
  // Python's weights_only torch.load would have to allow.
  c10::impl::GenericList indices(c10::AnyType::get());
  for (std::size_t i = 0; i < parameters_.size(); ++i) indices.push_back(static_cast<std::int64_t>(i));
  // The keys and their order are those of torch 2.11's SGD.state_dict().
  c10::impl::GenericDict group(c10::StringType::get(), c10::AnyType::get());
  group.insert("lr", options_.lr);
  group.insert("momentum", options_.momentum);
  group.insert("dampening", options_.dampening);
  group.insert("weight_decay", options_.weight_decay);
  group.insert("nesterov", options_.nesterov);
  group.insert("maximize", false);
  group.insert("foreach", c10::IValue());
  group.insert("differentiable", false);
  group.insert("fused", c10::IValue());
  group.insert("params", std::move(indices));
  c10::impl::GenericList groups(c10::AnyType::get());
  groups.push_back(std::move(group));

  c10::impl::GenericDict root(c10::StringType::get(), c10::AnyType::get());
  root.insert("state", std::move(state));
  root.insert("param_groups", std::move(groups));
  return root;
}

void Sgd::load_state_dict(const c10::IValue& saved) {
  if (!saved.isGenericDict()) fail("the top level is a " + saved.tagKind() + ", expected a dict");
  const c10::impl::GenericDict root = saved.toGenericDict();

  const std::vector<c10::IValue> groups = to_items(require_key(root, "param_groups", "the top level"),
                                                   "\"param_groups\"");
  if (groups.size() != 1) {
    fail("\"param_groups\" has " + std::to_string(groups.size()) +
         " groups; this optimizer has one group with all the model's parameters");
  }
  if (!groups[0].isGenericDict()) fail("param_groups[0] is a " + groups[0].tagKind() + ", expected a dict");
  const c10::impl::GenericDict group = groups[0].toGenericDict();

  // The state is keyed by the ids listed in the group, in parameter order.
  const std::vector<c10::IValue> ids = to_items(require_key(group, "params", "param_groups[0]"),
                                                "param_groups[0][\"params\"]");
  if (ids.size() != parameters_.size()) {
    fail("param_groups[0][\"params\"] lists " + std::to_string(ids.size()) +
         " parameters, but the model has " + std::to_string(parameters_.size()));
  }
  std::map<std::int64_t, std::size_t> position;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    position[to_index(ids[i], "param_groups[0][\"params\"]")] = i;
  }

  SgdOptions options = options_;
  const auto number = [&](const char* key) {
    return to_number(require_key(group, key, "param_groups[0]"), std::string("param_groups[0][\"") + key + "\"]");
  };
  options.lr = number("lr");
  options.momentum = number("momentum");
  options.dampening = number("dampening");
  options.weight_decay = number("weight_decay");
  // PyTorch fills in nesterov and maximize when an older state lacks them.
  const c10::IValue* nesterov = find_key(group, "nesterov");
  options.nesterov = nesterov != nullptr && to_bool(*nesterov, "param_groups[0][\"nesterov\"]");
  const c10::IValue* maximize = find_key(group, "maximize");
  if (maximize != nullptr && to_bool(*maximize, "param_groups[0][\"maximize\"]")) {
    fail("param_groups[0][\"maximize\"] is true; this optimizer only minimises");
  }
  try {
    options.check([](const std::string& key) { return "param_groups[0] " + key; });
  } catch (const Error& e) {
    fail(e.what());
  }

  const c10::IValue& state_value = require_key(root, "state", "the top level");
  if (!state_value.isGenericDict()) fail("\"state\" is a " + state_value.tagKind() + ", expected a dict");
  std::vector<at::Tensor> buffers(parameters_.size());
  for (const auto& item : state_value.toGenericDict()) {
    const std::int64_t id = to_index(item.key(), "\"state\"");
    const std::string where = "state[" + std::to_string(id) + "]";
    const auto found = position.find(id);
    if (found == position.end()) fail(where + " belongs to no parameter in param_groups[0][\"params\"]");
    const at::Tensor& param = parameters_[found->second];
    if (!item.value().isGenericDict()) fail(where + " is a " + item.value().tagKind() + ", expected a dict");
    const c10::impl::GenericDict entry = item.value().toGenericDict();
    // Older PyTorch wrote None when momentum was 0: no buffer yet.
    const c10::IValue* value = find_key(entry, "momentum_buffer");
    if (value == nullptr || value->isNone()) continue;
    const std::string name = where + "[\"momentum_buffer\"]";
    if (!value->isTensor()) fail(name + " is a " + value->tagKind() + ", expected a tensor");
    const at::Tensor& tensor = value->toTensor();
    if (tensor.sizes() != param.sizes()) {
      fail(name + " has shape " + shape_str(tensor.sizes()) + " but parameter " +
           std::to_string(found->second) + " has shape " + shape_str(param.sizes()));
    }
    // As PyTorch does: the state follows the parameter's device and dtype.
    buffers[found->second] = tensor.to(param.device(), param.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  }
  // Nothing changes unless all of it was valid.
  momentum_buffers_ = std::move(buffers);
  options_ = options;
}

}  // namespace deepcam::optimizers
