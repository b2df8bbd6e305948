// Synchronous BatchNorm for model plugins: torch.nn.SyncBatchNorm's
// arithmetic over a Group of ranks (SPEC 7, [run] batchnorm_group_size).
//
// In training mode a BatchNorm layer calls
//   y = deepcam::sync_batch_norm(x, bn->weight, bn->bias, bn->running_mean,
//                                bn->running_var, momentum, eps, *group);
// instead of its forward. The batch statistics are those of the group's
// samples together: every rank gathers each rank's per-channel count, mean
// and biased variance and combines them (Chan's parallel formula, in
// float64); the backward pass sums the per-channel sums of dy and
// dy * (x - mean) over the group, as SyncBatchNorm's backward does. The
// gradients of weight and bias stay this rank's own, as in PyTorch: the
// gradient all-reduce over all ranks averages them. The running statistics
// are updated with the group's mean and unbiased variance. Evaluation mode
// needs no group: use the layer's own forward there.
#pragma once

#include <ATen/core/Tensor.h>

#include "deepcam/export.hpp"
#include "deepcam/group.hpp"

namespace deepcam {

// input (N, C, ...) float; weight, bias, running_mean, running_var (C).
// Differentiable in input, weight and bias; updates the running statistics
// in place (PyTorch's momentum convention: new = (1 - m) old + m batch).
DEEPCAM_API at::Tensor sync_batch_norm(const at::Tensor& input, const at::Tensor& weight,
                                       const at::Tensor& bias, at::Tensor running_mean,
                                       at::Tensor running_var, double momentum, double eps,
                                       Group& group);

}  // namespace deepcam
