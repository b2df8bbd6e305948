#include "amp.hpp"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include "deepcam/error.hpp"

namespace deepcam {

Precision parse_precision(const std::string& text) {
  if (text == "fp32") return Precision::Fp32;
  if (text == "amp_fp16") return Precision::AmpFp16;
  if (text == "amp_bf16") return Precision::AmpBf16;
  throw Error("precision \"" + text + "\": expected fp32, amp_fp16 or amp_bf16");
}

AutocastGuard::AutocastGuard(at::DeviceType device_type, Precision precision) : type_(device_type) {
  if (precision == Precision::Fp32) return;
  active_ = true;
  was_enabled_ = at::autocast::is_autocast_enabled(type_);
  old_dtype_ = at::autocast::get_autocast_dtype(type_);
  at::autocast::set_autocast_enabled(type_, true);
  at::autocast::set_autocast_dtype(type_, precision == Precision::AmpFp16 ? at::kHalf : at::kBFloat16);
  at::autocast::increment_nesting();
}

AutocastGuard::~AutocastGuard() {
  if (!active_) return;
  // As torch.autocast's __exit__: the cast weights cached for this region go.
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(type_, was_enabled_);
  at::autocast::set_autocast_dtype(type_, old_dtype_);
}

GradScaler::GradScaler(const ScalerState& state, const at::Device& device)
    : options_(state),
      scale_(at::full({1}, state.scale, at::TensorOptions().dtype(at::kFloat).device(device))),
      growth_tracker_(at::full({1}, state.growth_tracker, at::TensorOptions().dtype(at::kInt).device(device))) {}

at::Tensor GradScaler::scale(const at::Tensor& loss) const { return loss * scale_; }

at::Tensor GradScaler::unscale(const std::vector<at::Tensor>& parameters) const {
  std::vector<at::Tensor> grads;
  for (const at::Tensor& p : parameters) {
    if (p.grad().defined()) grads.push_back(p.grad());
  }
  at::Tensor found_inf = at::zeros({1}, scale_.options());
  // In float64 first, as GradScaler: 1 / scale rounded once.
  const at::Tensor inv_scale = scale_.to(at::kDouble).reciprocal().to(at::kFloat);
  if (!grads.empty()) at::_amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale);
  return found_inf;
}

void GradScaler::update(const at::Tensor& found_inf) {
  at::_amp_update_scale_(scale_, growth_tracker_, found_inf, options_.growth_factor, options_.backoff_factor,
                         options_.growth_interval);
}

ScalerState GradScaler::state() const {
  ScalerState s = options_;
  s.scale = scale_.item<double>();
  s.growth_tracker = growth_tracker_.item<std::int64_t>();
  return s;
}

}  // namespace deepcam
