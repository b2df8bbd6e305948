// Mixed precision ([run] precision): autocast around the forward pass, as
// torch.autocast, and for float16 the dynamic loss scaling of
// torch.amp.GradScaler, with the kernels PyTorch itself uses
// (_amp_foreach_non_finite_check_and_unscale_, _amp_update_scale_), so that
// the scale follows the same sequence step for step.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "deepcam/checkpoint.hpp"
#include "deepcam/export.hpp"

namespace deepcam {

enum class Precision { Fp32, AmpFp16, AmpBf16 };

// "fp32", "amp_fp16", "amp_bf16" (the choices the run file accepts).
DEEPCAM_API Precision parse_precision(const std::string& text);

// Enables autocast for one device type for its lifetime, with the dtype of
// `precision` (nothing for Fp32), and restores what was there before.
class DEEPCAM_API AutocastGuard {
 public:
  AutocastGuard(at::DeviceType device_type, Precision precision);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  at::DeviceType type_;
  bool active_ = false;
  bool was_enabled_ = false;
  at::ScalarType old_dtype_ = at::kFloat;
};

class DEEPCAM_API GradScaler {
 public:
  GradScaler(const ScalerState& state, const at::Device& device);

  // loss * scale.
  at::Tensor scale(const at::Tensor& loss) const;
  // Divides every gradient by the scale in place; returns found_inf (a
  // 1-element float tensor on the device, 1 when any gradient is not
  // finite), as GradScaler.unscale_ does.
  at::Tensor unscale(const std::vector<at::Tensor>& parameters) const;
  // Backs the scale off after a non-finite step, grows it after
  // growth_interval finite ones (GradScaler.update).
  void update(const at::Tensor& found_inf);

  ScalerState state() const;  // reads the device: at checkpoints only

 private:
  ScalerState options_;
  at::Tensor scale_;           // float32 (1)
  at::Tensor growth_tracker_;  // int32 (1)
};

}  // namespace deepcam
