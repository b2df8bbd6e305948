#include "lamb.hpp"

#include <ATen/ATen.h>
#include <ATen/core/Dict.h>
#include <ATen/core/List.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/ivalue.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "deepcam/error.hpp"
#include "deepcam/mlperf_log.hpp"
#include "fused.hpp"
#include "hyperparameters.hpp"
#include "state_dict.hpp"

namespace deepcam::optimizers {
namespace {

const fused::StateDictReader& reader() {
  static const fused::StateDictReader instance("LAMB", "APEX FusedLAMB.state_dict()'s");
  return instance;
}

}  // namespace

LambOptions LambOptions::from(const Params& params) {
  LambOptions options;
  const fused::Hyperparameters h = fused::read_hyperparameters(params);
  options.lr = h.lr;
  options.beta1 = h.beta1;
  options.beta2 = h.beta2;
  options.weight_decay = h.weight_decay;
  options.max_grad_norm = params.number("max_grad_norm");
  if (!fused::positive(options.max_grad_norm)) {
    throw Error(params.setting("max_grad_norm") + ": must be > 0 (the MLPerf closed division requires 1.0)");
  }
  return options;
}

Lamb::Lamb(std::vector<at::Tensor> parameters, const LambOptions& options)
    : parameters_(std::move(parameters)), state_(parameters_.size()), options_(options) {}

void Lamb::step() {
  // The update writes into leaves that require grad.
  at::NoGradGuard no_grad;
  gradient_norm_ = at::Tensor();
  std::vector<std::size_t> with_grad;
  for (std::size_t i = 0; i < parameters_.size(); ++i) {
    if (!parameters_[i].grad().defined()) continue;
    with_grad.push_back(i);
    ParamState& state = state_[i];
    if (!state.exp_avg.defined()) {
      state.exp_avg = at::zeros_like(parameters_[i], at::MemoryFormat::Preserve);
      state.exp_avg_sq = at::zeros_like(parameters_[i], at::MemoryFormat::Preserve);
    }
  }
#if DEEPCAM_WITH_CUDA
  if (fused::applies(parameters_)) {
    fused_step(with_grad);
    return;
  }
#endif
  tensor_step(with_grad);
}

void Lamb::set_lr(double lr) {
  options_.lr = lr;
  // An asynchronous fill on the current stream, before the step that reads
  // it (also when that step is a replayed graph).
  if (scalars_.defined() && scalars_lr_ != lr) {
    scalars_.select(0, 0).fill_(lr);
    scalars_lr_ = lr;
  }
}

void Lamb::replayed() {
  // The finalize kernel counted the step on the device.
  ++step_;
  scalars_step_ = step_;
}

void Lamb::tensor_step(const std::vector<std::size_t>& with_grad) {
  fused_last_ = false;
  // APEX counts the step whether or not any parameter has a gradient.
  ++step_;
  if (with_grad.empty()) return;
  const double beta1 = options_.beta1;
  const double beta2 = options_.beta2;
  const double weight_decay = options_.weight_decay;
  const double lr = fused::float32_scalar(options_.lr);
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step_));
  const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(step_));

  // The global norm in float64 and the clip factor as tensors: on a GPU (the
  // fallback for dtypes the kernels do not take) nothing waits for it.
  const at::Tensor& first = parameters_[with_grad.front()];
  at::Tensor norm_sq = at::zeros({}, first.options().dtype(at::kDouble));
  for (std::size_t i : with_grad) {
    const at::Tensor& grad = parameters_[i].grad();
    norm_sq.add_(at::sum(grad.square(), at::kDouble));
  }
  gradient_norm_ = norm_sq.sqrt_();
  const at::Tensor clip = (gradient_norm_ / options_.max_grad_norm).clamp_min_(1.0);

  for (std::size_t i : with_grad) {
    at::Tensor& param = parameters_[i];
    ParamState& state = state_[i];
    // The 0-dim float64 clip does not promote the float32 gradient.
    const at::Tensor grad = param.grad() / clip;
    state.exp_avg.mul_(beta1).add_(grad, 1.0 - beta1);  // grad_averaging: (1 - b1) g
    state.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1.0 - beta2);
    at::Tensor update = (state.exp_avg / bias_correction1) / ((state.exp_avg_sq / bias_correction2).sqrt_().add_(kEps));
    if (weight_decay == 0.0) {
      param.add_(update, -lr);
      continue;
    }
    update.add_(param, weight_decay);
    const at::Tensor param_norm = param.norm();
    const at::Tensor update_norm = update.norm();
    const at::Tensor trusted = param_norm.gt(0).logical_and_(update_norm.gt(0));
    const at::Tensor ratio =
        at::where(trusted, param_norm / update_norm * lr, at::full({}, lr, param_norm.options()));
    param.sub_(update.mul_(ratio));
  }
}

#if DEEPCAM_WITH_CUDA
void Lamb::fused_step(const std::vector<std::size_t>& with_grad) {
  std::vector<fused::Entry> entries;
  for (std::size_t i : with_grad) {
    at::Tensor& param = parameters_[i];
    ParamState& state = state_[i];
    // A state from the CPU path with another layout: the kernels walk
    // parameter and moments in step.
    for (at::Tensor* moment : {&state.exp_avg, &state.exp_avg_sq}) {
      if (!fused::same_layout(param, *moment)) {
        *moment = at::empty_like(param, at::MemoryFormat::Preserve).copy_(*moment);
      }
    }
    entries.push_back({param.data_ptr<float>(), param.grad().data_ptr<float>(), state.exp_avg.data_ptr<float>(),
                       state.exp_avg_sq.data_ptr<float>(), nullptr, param.numel()});
  }
  const at::Tensor& first = parameters_[with_grad.front()];
  std::int32_t chunks = 0;
  const std::vector<fused::TensorTable> tables = fused::make_tables(entries, &chunks);

  fused_last_ = true;
  const at::TensorOptions on_device = first.options();
  if (!scalars_.defined() || scalars_.device() != first.device()) {
    scalars_ = at::zeros({3}, on_device.dtype(at::kDouble));
    scalars_step_ = 0;
    scalars_lr_ = 0.0;
  }
  // Fills queue on the stream like kernels: no host wait.
  if (scalars_lr_ != options_.lr) scalars_.select(0, 0).fill_(options_.lr);
  if (scalars_step_ != step_) scalars_.select(0, 1).fill_(static_cast<double>(step_));
  scalars_lr_ = options_.lr;
  const std::int64_t slots = std::max<std::int32_t>(chunks, 1);
  if (!grad_partials_.defined() || grad_partials_.numel() < slots || grad_partials_.device() != first.device()) {
    grad_partials_ = at::empty({slots}, on_device.dtype(at::kDouble));
    update_partials_ = at::empty({slots}, on_device);
    param_partials_ = at::empty({slots}, on_device);
  }

  static_assert(sizeof(fused::LambScalars) == 3 * sizeof(double), "scalars_ holds LambScalars");
  auto* scalars = reinterpret_cast<fused::LambScalars*>(scalars_.data_ptr<double>());
  const fused::LambHyper hyper{options_.beta1, options_.beta2, kEps, options_.weight_decay, options_.max_grad_norm};
  double* grad_partials = grad_partials_.data_ptr<double>();
  float* update_partials = update_partials_.data_ptr<float>();
  float* param_partials = param_partials_.data_ptr<float>();
  fused::on_stream_of(first, [&](void* stream) {
    for (const fused::TensorTable& table : tables) {
      fused::check(fused::launch_lamb_grad_norm(table, grad_partials, stream), "LAMB", "launch_lamb_grad_norm");
    }
    fused::check(fused::launch_lamb_finalize(grad_partials, chunks, scalars, stream), "LAMB",
                 "launch_lamb_finalize");
    for (const fused::TensorTable& table : tables) {
      fused::check(fused::launch_lamb_moments(table, hyper, scalars, update_partials, param_partials, stream),
                   "LAMB", "launch_lamb_moments");
    }
    for (const fused::TensorTable& table : tables) {
      fused::check(fused::launch_lamb_apply(table, hyper, scalars, update_partials, param_partials, stream),
                   "LAMB", "launch_lamb_apply");
    }
  });
  // The finalize kernel counted the step on the device and left the norm
  // there; a view, read before the next step overwrites it.
  gradient_norm_ = scalars_.select(0, 2);
  ++step_;
  scalars_step_ = step_;
}
#endif

void Lamb::zero_grad() {
  // PyTorch's default (set_to_none=True), as APEX's set_grad_none=True.
  for (at::Tensor& param : parameters_) {
    if (param.grad().defined()) param.mutable_grad().reset();
  }
}

void Lamb::log_hyperparameters(MlperfLog& log) const {
  // The reference logs opt_<key> for each key of FusedLAMB's param group, in
  // the group's order (as state_dict() writes it).
  log.event("opt_name", "LAMB");
  log.event("opt_lr", options_.lr);
  log.event("opt_bias_correction", true);
  log.event("opt_betas", Json::list({options_.beta1, options_.beta2}));
  log.event("opt_eps", kEps);
  log.event("opt_weight_decay", options_.weight_decay);
  log.event("opt_grad_averaging", true);
  log.event("opt_max_grad_norm", options_.max_grad_norm);
}

c10::IValue Lamb::state_dict() const {
  // Like PyTorch, the tensors are the live state, not copies.
  c10::impl::GenericDict state(c10::IntType::get(), c10::AnyType::get());
  for (std::size_t i = 0; i < state_.size(); ++i) {
    if (!state_[i].exp_avg.defined()) continue;
    c10::impl::GenericDict entry(c10::StringType::get(), c10::AnyType::get());
    entry.insert("exp_avg", state_[i].exp_avg);
    entry.insert("exp_avg_sq", state_[i].exp_avg_sq);
    state.insert(static_cast<std::int64_t>(i), std::move(entry));
  }

  // The keys and their order are those of APEX FusedLAMB's defaults, then
  // "step", which FusedLAMB adds to the group at its first step.
  c10::impl::GenericDict group(c10::StringType::get(), c10::AnyType::get());
  group.insert("lr", options_.lr);
  group.insert("bias_correction", true);
  group.insert("betas", c10::ivalue::Tuple::create(options_.beta1, options_.beta2));
  group.insert("eps", kEps);
  group.insert("weight_decay", options_.weight_decay);
  group.insert("grad_averaging", true);
  group.insert("max_grad_norm", options_.max_grad_norm);
  group.insert("step", step_);
  return fused::write_state_dict(std::move(state), std::move(group), parameters_.size());
}

void Lamb::load_state_dict(const c10::IValue& saved) {
  const fused::StateDictReader& read = reader();
  const fused::StateDictReader::Parsed parsed = read.parse(saved, parameters_.size());
  read.require_eps(parsed.group, kEps);
  LambOptions options = options_;
  const fused::Hyperparameters h = read.hyperparameters(parsed.group);
  options.lr = h.lr;
  options.beta1 = h.beta1;
  options.beta2 = h.beta2;
  options.weight_decay = h.weight_decay;
  options.max_grad_norm = read.number(parsed.group, "max_grad_norm", "param_groups[0]");
  if (!fused::positive(options.max_grad_norm)) {
    read.fail(fmt::format("param_groups[0][\"max_grad_norm\"] is {}, expected > 0", options.max_grad_norm));
  }
  for (const char* key : {"bias_correction", "grad_averaging"}) {
    if (!read.boolean(parsed.group, key, "param_groups[0]")) {
      read.fail(std::string("param_groups[0][\"") + key + "\"] is False; this LAMB has it always on");
    }
  }
  // FusedLAMB adds "step" at its first step: a state saved before has none.
  const std::int64_t step = read.find(parsed.group, "step") ? read.count(parsed.group, "step", "param_groups[0]") : 0;

  std::vector<ParamState> state(parameters_.size());
  for (const fused::StateDictReader::Entry& entry : parsed.entries) {
    const at::Tensor& param = parameters_[entry.parameter];
    state[entry.parameter].exp_avg = read.moment(entry, "exp_avg", param);
    state[entry.parameter].exp_avg_sq = read.moment(entry, "exp_avg_sq", param);
  }
  // Nothing changes unless all of it was valid.
  state_ = std::move(state);
  options_ = options;
  step_ = step;
}

}  // namespace deepcam::optimizers
