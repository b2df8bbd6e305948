#include "adam.hpp"

#include <ATen/ATen.h>
#include <ATen/core/Dict.h>
#include <ATen/core/List.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/ivalue.h>
#include <fmt/format.h>

#include <cmath>
#include <string>
#include <utility>

#include "deepcam/error.hpp"
#include "deepcam/mlperf_log.hpp"
#include "fused.hpp"
#include "hyperparameters.hpp"
#include "state_dict.hpp"

namespace deepcam::optimizers {
AdamOptions AdamOptions::from(const Params& params) {
  AdamOptions options;
  const fused::Hyperparameters h = fused::read_hyperparameters(params);
  options.lr = h.lr;
  options.beta1 = h.beta1;
  options.beta2 = h.beta2;
  options.weight_decay = h.weight_decay;
  return options;
}

Adam::Adam(std::vector<at::Tensor> parameters, const AdamOptions& options)
    : parameters_(std::move(parameters)), state_(parameters_.size()), options_(options) {}

void Adam::set_lr(double lr) {
  options_.lr = lr;
  // An asynchronous fill on the current stream, before the step that reads
  // it (also when that step is a replayed graph).
  if (lr_on_device_.defined() && lr_on_device_value_ != lr) {
    lr_on_device_.fill_(lr);
    lr_on_device_value_ = lr;
  }
}

void Adam::step() {
  // The update writes into leaves that require grad.
  at::NoGradGuard no_grad;
#if DEEPCAM_WITH_CUDA
  if (fused::applies(parameters_)) {
    fused_last_ = true;
    fused_step();
    return;
  }
#endif
  fused_last_ = false;
  const double beta1 = options_.beta1;
  const double beta2 = options_.beta2;
  const double lr = options_.lr;
  const double weight_decay = options_.weight_decay;
  for (std::size_t i = 0; i < parameters_.size(); ++i) {
    at::Tensor& param = parameters_[i];
    if (!param.grad().defined()) continue;
    ParamState& state = state_[i];
    if (!state.step.defined()) {
      state.step = at::zeros({}, at::TensorOptions().dtype(at::kFloat));
      state.exp_avg = at::zeros_like(param, at::MemoryFormat::Preserve);
      state.exp_avg_sq = at::zeros_like(param, at::MemoryFormat::Preserve);
    }
    // Every line below is one line of torch/optim/adam.py _single_tensor_adam,
    // in its order, with its scalar arithmetic in double as Python does it:
    // reordering any of them changes the last bits of the result.
    state.step.add_(1);
    at::Tensor grad = param.grad();
    if (weight_decay != 0.0) {
      if (options_.decoupled_weight_decay) {
        param.mul_(fused::float32_scalar(1.0 - lr * weight_decay));
      } else {
        grad = grad.add(param, weight_decay);
      }
    }
    state.exp_avg.lerp_(grad, 1.0 - beta1);
    state.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1.0 - beta2);
    const double step = state.step.item<double>();
    const double bias_correction1 = 1.0 - std::pow(beta1, step);
    const double bias_correction2 = 1.0 - std::pow(beta2, step);
    const double step_size = lr / bias_correction1;
    const double bias_correction2_sqrt = std::pow(bias_correction2, 0.5);
    at::Tensor denom = (state.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(kEps);
    param.addcdiv_(state.exp_avg, denom, fused::float32_scalar(-step_size));
  }
}

#if DEEPCAM_WITH_CUDA
void Adam::fused_step() {
  std::vector<fused::Entry> entries;
  const at::Tensor* first = nullptr;
  for (std::size_t i = 0; i < parameters_.size(); ++i) {
    at::Tensor& param = parameters_[i];
    const at::Tensor& grad = param.grad();
    if (!grad.defined()) continue;
    ParamState& state = state_[i];
    if (!state.step.defined()) {
      state.step = at::zeros({}, param.options().dtype(at::kFloat));
      state.exp_avg = at::zeros_like(param, at::MemoryFormat::Preserve);
      state.exp_avg_sq = at::zeros_like(param, at::MemoryFormat::Preserve);
    }
    // A state from the CPU path or from a file: the kernel counts the step
    // on the device and walks the moments in the parameter's layout.
    if (state.step.device() != param.device()) state.step = state.step.to(param.device());
    for (at::Tensor* moment : {&state.exp_avg, &state.exp_avg_sq}) {
      if (!fused::same_layout(param, *moment)) {
        *moment = at::empty_like(param, at::MemoryFormat::Preserve).copy_(*moment);
      }
    }
    entries.push_back({param.data_ptr<float>(), grad.data_ptr<float>(), state.exp_avg.data_ptr<float>(),
                       state.exp_avg_sq.data_ptr<float>(), state.step.data_ptr<float>(), param.numel()});
    if (first == nullptr) first = &param;
  }
  if (first == nullptr) return;

  if (!lr_on_device_.defined() || lr_on_device_.device() != first->device()) {
    lr_on_device_ = at::full({}, options_.lr, first->options().dtype(at::kDouble));
  } else if (lr_on_device_value_ != options_.lr) {
    lr_on_device_.fill_(options_.lr);
  }
  lr_on_device_value_ = options_.lr;

  const fused::AdamHyper hyper{options_.beta1, options_.beta2, kEps, options_.weight_decay,
                               options_.decoupled_weight_decay};
  const double* lr = lr_on_device_.data_ptr<double>();
  std::int32_t chunks = 0;
  const std::vector<fused::TensorTable> tables = fused::make_tables(entries, &chunks);
  const char* name = options_.decoupled_weight_decay ? "AdamW" : "Adam";
  fused::on_stream_of(*first, [&](void* stream) {
    for (const fused::TensorTable& table : tables) {
      fused::check(fused::launch_adam(table, hyper, lr, stream), name, "launch_adam");
    }
  });
}
#endif

void Adam::zero_grad() {
  // PyTorch's default (set_to_none=True): backward then allocates fresh grads.
  for (at::Tensor& param : parameters_) {
    if (param.grad().defined()) param.mutable_grad().reset();
  }
}

void Adam::log_hyperparameters(MlperfLog& log) const {
  log.event("opt_name", options_.decoupled_weight_decay ? "AdamW" : "Adam");
  log.event("opt_lr", options_.lr);
  log.event("opt_betas", Json::list({options_.beta1, options_.beta2}));
  log.event("opt_eps", kEps);
  log.event("opt_weight_decay", options_.weight_decay);
}

c10::IValue Adam::state_dict() const {
  // Like PyTorch, the tensors are the live state, not copies.
  c10::impl::GenericDict state(c10::IntType::get(), c10::AnyType::get());
  for (std::size_t i = 0; i < state_.size(); ++i) {
    if (!state_[i].step.defined()) continue;
    c10::impl::GenericDict entry(c10::StringType::get(), c10::AnyType::get());
    entry.insert("step", state_[i].step);
    entry.insert("exp_avg", state_[i].exp_avg);
    entry.insert("exp_avg_sq", state_[i].exp_avg_sq);
    state.insert(static_cast<std::int64_t>(i), std::move(entry));
  }

  // The keys and their order are those of torch 2.11's Adam.state_dict().
  c10::impl::GenericDict group(c10::StringType::get(), c10::AnyType::get());
  group.insert("lr", options_.lr);
  group.insert("betas", c10::ivalue::Tuple::create(options_.beta1, options_.beta2));
  group.insert("eps", kEps);
  group.insert("weight_decay", options_.weight_decay);
  group.insert("amsgrad", false);
  group.insert("maximize", false);
  group.insert("foreach", c10::IValue());
  group.insert("capturable", false);
  group.insert("differentiable", false);
  group.insert("fused", c10::IValue());
  group.insert("decoupled_weight_decay", options_.decoupled_weight_decay);
  return fused::write_state_dict(std::move(state), std::move(group), parameters_.size());
}

void Adam::load_state_dict(const c10::IValue& saved) {
  const std::string name = options_.decoupled_weight_decay ? "AdamW" : "Adam";
  const fused::StateDictReader read(name, "PyTorch's " + name + ".state_dict()");
  const fused::StateDictReader::Parsed parsed = read.parse(saved, parameters_.size());
  // torch 2.11's Adam and AdamW both record which they are; older files do not.
  if (read.find(parsed.group, "decoupled_weight_decay") &&
      read.boolean(parsed.group, "decoupled_weight_decay", "param_groups[0]") != options_.decoupled_weight_decay) {
    read.fail(fmt::format("param_groups[0][\"decoupled_weight_decay\"] is {}: written by {}, whose weight decay "
                          "differs; resume with [optimizer] name = \"{}\"",
                          options_.decoupled_weight_decay ? "False" : "True",
                          options_.decoupled_weight_decay ? "Adam" : "AdamW",
                          options_.decoupled_weight_decay ? "adam" : "adamw"));
  }
  // Options of PyTorch's Adam that this one does not have: PyTorch would
  // continue the state with them.
  read.require_off(parsed.group, "amsgrad",
                   "written with AMSGrad (its max_exp_avg_sq), which this " + name + " does not offer");
  read.require_off(parsed.group, "maximize",
                   "written maximizing the objective, which this " + name + " does not offer");
  read.require_eps(parsed.group, kEps);
  AdamOptions options = options_;
  const fused::Hyperparameters h = read.hyperparameters(parsed.group);
  options.lr = h.lr;
  options.beta1 = h.beta1;
  options.beta2 = h.beta2;
  options.weight_decay = h.weight_decay;

  std::vector<ParamState> state(parameters_.size());
  for (const fused::StateDictReader::Entry& entry : parsed.entries) {
    const at::Tensor& param = parameters_[entry.parameter];
    ParamState& target = state[entry.parameter];
    // On the CPU as PyTorch keeps it; the fused path moves it to the GPU.
    target.step = at::scalar_tensor(static_cast<double>(read.count(entry.values, "step", entry.where)),
                                    at::TensorOptions().dtype(at::kFloat));
    target.exp_avg = read.moment(entry, "exp_avg", param);
    target.exp_avg_sq = read.moment(entry, "exp_avg_sq", param);
  }
  // Nothing changes unless all of it was valid.
  state_ = std::move(state);
  options_ = options;
}

}  // namespace deepcam::optimizers
