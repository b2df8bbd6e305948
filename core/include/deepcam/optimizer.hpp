// The optimizer interface. An optimizer owns its per-parameter state and
// updates the tensors it was built with from their .grad().
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "deepcam/export.hpp"

namespace c10 {
struct IValue;
}

namespace deepcam {

class MlperfLog;

struct OptimizerContext {
  std::vector<at::Tensor> parameters;  // in the model's registration order
};

class DEEPCAM_API Optimizer {
 public:
  virtual ~Optimizer();
  virtual void step() = 0;
  virtual void zero_grad() = 0;
  // The learning rate the schedule sets before each step.
  virtual void set_lr(double lr) = 0;
  virtual double lr() const = 0;
  // The opt_* keys of SPEC 5.4.
  virtual void log_hyperparameters(MlperfLog& log) const = 0;
  // The state in PyTorch's optimizer.state_dict() layout ({"state": {i: {...}},
  // "param_groups": [{...}]}), so that checkpoints travel both ways.
  virtual c10::IValue state_dict() const = 0;
  virtual void load_state_dict(const c10::IValue& state) = 0;
  // Plugin ABI 3. The global 2-norm of the gradients the last step() used,
  // before any clipping, as a 0-d tensor on their device, when the optimizer
  // computes it anyway (LAMB's clipping): the engine's divergence watch reads
  // it instead of computing it again. An undefined tensor when the optimizer
  // does not compute it, or the last step() had no gradients.
  virtual at::Tensor gradient_norm() const = 0;
  // Plugin ABI 4, for CUDA graphs ([run] cuda_graphs). Whether the step()
  // just run can be captured in a CUDA graph and replayed: it queues the
  // same kernels on the current stream every time, reads the learning rate
  // and its step counts from device memory, and neither waits for the
  // device nor allocates. If so, set_lr() writes the learning rate's device
  // copy at once (queued on the current stream), because the engine calls
  // it outside the graph before each replay. False if any of that does not
  // hold (the plain tensor code, a CPU tensor).
  virtual bool capturable() const = 0;
  // A graph holding one step() was replayed: advance what the optimizer
  // counts on the host (what state_dict() writes) as that step() would have.
  virtual void replayed() = 0;
};

}  // namespace deepcam
