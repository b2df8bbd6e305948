// The loss and the metric of SPEC 4.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>

#include "deepcam/export.hpp"

namespace deepcam {

// w_c = f_c^(-1/8) for the class frequencies of SPEC 4.1.
DEEPCAM_API std::array<double, 3> class_weights();

// Per-pixel cross entropy weighted by w[target], then the plain mean over all
// pixels of the batch (not divided by the sum of the weights).
// logits (B, 3, H, W) float, labels (B, H, W) int64; returns a scalar.
DEEPCAM_API at::Tensor weighted_cross_entropy(const at::Tensor& logits, const at::Tensor& labels);

// The predicted class of each pixel (B, H, W) uint8: argmax over classes of
// softmax(logits), the first class at a tie (SPEC 4.2), exactly as the
// reference's torch.argmax(torch.softmax(logits, 1), 1).
DEEPCAM_API at::Tensor predict(const at::Tensor& logits);

// The IoU score of each sample (B,) float64: sum over classes j of
// tp / (3 (tp + fp + fn)), 1/3 for a class absent from both prediction and label.
DEEPCAM_API at::Tensor iou_per_sample(const at::Tensor& logits, const at::Tensor& labels);

// The batch score: the mean of iou_per_sample.
DEEPCAM_API double iou_score(const at::Tensor& logits, const at::Tensor& labels);

}  // namespace deepcam
