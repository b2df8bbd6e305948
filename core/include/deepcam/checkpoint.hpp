// Checkpoints in the reference's torch.save layout:
// {"step": int, "epoch": int, "model": {name: tensor}, "optimizer": {...}}.
// Python's torch.load reads ours, and we read one written by Python.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "deepcam/export.hpp"

namespace torch::nn {
class Module;
}

namespace deepcam {

class Optimizer;

// The module's state in PyTorch's state_dict() order: for each module in
// pre-order, its own parameters, then its own buffers.
DEEPCAM_API std::vector<std::pair<std::string, at::Tensor>> state_entries(torch::nn::Module& module);

// torch.amp.GradScaler's state_dict(), kept as "scaler" in the checkpoints
// of float16 runs ([run] precision = "amp_fp16") so that a resume continues
// the same scale sequence.
struct ScalerState {
  double scale = 65536.0;
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  std::int64_t growth_interval = 2000;
  std::int64_t growth_tracker = 0;
};

struct CheckpointInfo {
  std::int64_t step = 0;   // optimizer steps taken
  std::int64_t epoch = 0;  // epochs completed
  std::optional<ScalerState> scaler;
};

// Writes to PATH.tmp-<pid> and renames, so that a reader never sees half a file.
DEEPCAM_API void save_checkpoint(const std::string& path, const CheckpointInfo& info,
                                 torch::nn::Module& model, const Optimizer* optimizer);

// Loads the model (every entry must match by name, shape and dtype) and, when
// `optimizer` is given and the file has one, the optimizer state.
DEEPCAM_API CheckpointInfo load_checkpoint(const std::string& path, torch::nn::Module& model,
                                           Optimizer* optimizer);

}  // namespace deepcam
