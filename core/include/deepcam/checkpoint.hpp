// Checkpoints in the reference's torch.save layout:
// {"step": int, "epoch": int, "model": {name: tensor}, "optimizer": {...}},
// with our extra keys ("scaler", "model_config", "optimizer_name",
// "accumulated_gradients", "gradient_accumulation_frequency", "world_size")
// beside them, which the reference's loader ignores.
// Python's torch.load reads ours, and we read one written by Python.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "deepcam/export.hpp"
#include "deepcam/params.hpp"

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
  std::int64_t step = 0;   // batches trained (as the reference counts steps)
  std::int64_t epoch = 0;  // epochs completed
  std::optional<ScalerState> scaler;
  // The gradients accumulated since the last optimizer step, by parameter
  // name, when the checkpoint was taken at a step that
  // gradient_accumulation_frequency does not divide (an epoch whose batch
  // count k does not divide carries its partial gradient into the next, as
  // the reference does). Kept as "accumulated_gradients", a key the
  // reference ignores; empty when there is none.
  std::vector<std::pair<std::string, at::Tensor>> accumulated_gradients;
  // How many batches that gradient sums (step modulo the writer's
  // gradient_accumulation_frequency), kept as "accumulated_batches" (plugin
  // ABI 6): a resume with another frequency would add to it as if it summed
  // another number. 0 when not known (no partial gradient, or a file of an
  // earlier version).
  std::int64_t accumulated_batches = 0;
  // The writer's gradient_accumulation_frequency, kept as
  // "gradient_accumulation_frequency" (plugin ABI 7): the schedule counts
  // optimizer steps as step / k, so a resume with another k would go on
  // from another point of it. 0 when not known (a file of an earlier
  // version, or Python's).
  std::int64_t gradient_accumulation_frequency = 0;
  // The writer's number of ranks, kept as "world_size" (plugin ABI 7): a
  // partial gradient sums that many ranks' batches. 0 when not known.
  std::int64_t world_size = 0;
  // The writer's [run] train_batch_size (per rank), kept as
  // "train_batch_size" (plugin ABI 9): with world_size it gives the global
  // batch, and a partial gradient sums batches of that size. 0 when not known.
  std::int64_t train_batch_size = 0;
  // The writer's [run] seed (drawn, for seed = "auto"), kept as "seed"
  // (plugin ABI 10): the seed orders each epoch's samples, so a resume with
  // another one shuffles its epochs otherwise than the run it continues.
  // 0 when not known.
  std::int64_t seed = 0;
  // A run of more than one rank saved in the middle of an accumulation: the
  // ranks' partial gradients are not in the file (only rank 0 writes it), so
  // resuming from it is refused. Kept as "partial_accumulation_ranks"; 0 when none.
  std::int64_t partial_accumulation_ranks = 0;
  // Read, not written: the [model] settings of the run that wrote the file
  // ("model_config") that differ from this run's although every weight fits
  // (a setting that shapes no weight, e.g. a DeepLab model's output stride:
  // DeepLab evaluates at 8 what it trained at 16), one "key = there, here" each.
  std::vector<std::string> other_model_settings;
};

// What built the model: the plugin's name and its checked [model] values,
// kept in our checkpoints as "model_config" ({"name": ..., key: TOML text}),
// so that a checkpoint of another model (other middle_blocks or width) is
// named by the key that differs rather than by the first tensor that does
// not fit. Python's torch.load reads it as a dict of strings.
// The input channels ([data] channels) travel beside it as "data_channels":
// weights trained on one order of the fields fit any other order of as many.
struct ModelConfig {
  std::string plugin;
  const Params* params = nullptr;
  std::vector<std::int64_t> channels;  // empty: not known
  std::string channels_where;          // where this run's channels were set
};

// Writes the checkpoint with save_torch (torch_pickle.hpp): streamed, with
// no second copy of the state in memory, to PATH.tmp-<pid>, then renamed.
// `optimizer_plugin`, the [optimizer] name, is kept as "optimizer_name"
// beside the optimizer's state (none when empty).
DEEPCAM_API void save_checkpoint(const std::string& path, const CheckpointInfo& info,
                                 torch::nn::Module& model, const Optimizer* optimizer,
                                 const ModelConfig& config = {}, const std::string& optimizer_plugin = {});

struct LoadOptions {
  // Resuming training: the file must hold an optimizer state (an error
  // naming [run] resume_weights_only otherwise).
  bool require_optimizer = false;
  // [run] resume_weights_only: the model's weights, step and epoch only;
  // any optimizer state or partial gradient in the file is left unread.
  bool weights_only = false;
  ModelConfig model;  // this run's, for naming a model key that differs
  // This run's [optimizer] name: an optimizer state that the file says
  // another optimizer plugin wrote ("optimizer_name") is refused, naming
  // both, before that plugin's own checks would name a key its state lacks.
  std::string optimizer_plugin;
};

// Reads a checkpoint written here or by Python's torch.save (the MLCommons
// reference's, whose model keys all start with "module.", the prefix
// DistributedDataParallel adds: it is dropped). Every field is checked
// before anything is changed: `step` and `epoch` non-negative integers (or
// 0-d integer tensors), every model entry present with the model's name,
// shape and dtype and finite values, the optimizer state through the
// optimizer's own checks (an entry per parameter with its shape), the
// scaler's numbers in their ranges. Every message names the file and the
// field. `optimizer` null: only the model is read (--evaluate).
DEEPCAM_API CheckpointInfo load_checkpoint(const std::string& path, torch::nn::Module& model,
                                           Optimizer* optimizer, const LoadOptions& options = {});

}  // namespace deepcam
