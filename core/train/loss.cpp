#include "deepcam/loss.hpp"

#include <ATen/ATen.h>

#include <cmath>
#include <map>
#include <mutex>
#include <string>
#include <utility>

namespace deepcam {

std::array<double, 3> class_weights() {
  const double f[3] = {0.986267818390377, 0.0004578708870701058, 0.01327431072255291};
  return {std::pow(f[0], -0.125), std::pow(f[1], -0.125), std::pow(f[2], -0.125)};
}

namespace {

// The class weights on the logits' device and in their dtype, made once:
// copying them from the host every step would make a CUDA step wait for it.
const at::Tensor& weights_like(const at::Tensor& logits) {
  static std::mutex mutex;
  static std::map<std::pair<std::string, at::ScalarType>, at::Tensor> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& w = cache[{logits.device().str(), logits.scalar_type()}];
  if (!w.defined()) {
    const auto f = class_weights();
    w = at::tensor({f[0], f[1], f[2]}, at::TensorOptions().dtype(logits.scalar_type())).to(logits.device());
  }
  return w;
}

}  // namespace

at::Tensor weighted_cross_entropy(const at::Tensor& logits, const at::Tensor& labels) {
  const at::Tensor& weight = weights_like(logits);
  // torch.nn.functional.cross_entropy's kernel: no ignored class, no smoothing.
  return at::cross_entropy_loss(logits, labels, weight, at::Reduction::None, /*ignore_index=*/-100,
                                /*label_smoothing=*/0.0)
      .mean();
}

at::Tensor predict(const at::Tensor& logits) {
  // The reference's argmax(softmax(logits)): the probabilities as softmax
  // computes them on this device (near-equal logits may round to one
  // probability), then the first class of the largest one. One comparison
  // per class after the first instead of ATen's argmax over the class
  // dimension, which is slow on CPU for a short, strided dimension.
  const at::Tensor p = at::softmax(logits, 1);
  at::Tensor best = p.select(1, 0);
  at::Tensor pred = at::zeros(best.sizes(), best.options().dtype(at::kByte));
  for (std::int64_t j = 1; j < p.size(1); ++j) {
    const at::Tensor pj = p.select(1, j);
    pred.masked_fill_(pj > best, j);  // strictly larger: a tie keeps the first class
    best = at::maximum(best, pj);
  }
  return pred;
}

at::Tensor iou_per_sample(const at::Tensor& logits, const at::Tensor& labels) {
  const std::int64_t batch = logits.size(0);
  const std::int64_t classes = logits.size(1);
  // Each sample's confusion matrix in one count: cell (sample, truth, pred).
  const at::Tensor pred = predict(logits).flatten(1).to(at::kLong);
  const at::Tensor offset = at::arange(batch, labels.options().dtype(at::kLong)).mul_(classes * classes).unsqueeze(1);
  const at::Tensor cell = labels.flatten(1).mul(classes).add_(pred).add_(offset);
  const at::Tensor confusion =
      at::bincount(cell.flatten(), {}, batch * classes * classes).view({batch, classes, classes}).to(at::kDouble);
  const at::Tensor tp = confusion.diagonal(0, 1, 2);
  const at::Tensor predicted = confusion.sum(1);  // per predicted class
  const at::Tensor actual = confusion.sum(2);     // per true class
  // tp + fp + fn, summed in that order as the reference does.
  const at::Tensor uni = tp + (predicted - tp) + (actual - tp);
  const at::Tensor per_class = at::where(uni > 0, tp / (static_cast<double>(classes) * uni.clamp_min(1)),
                                         at::full_like(uni, 1.0 / static_cast<double>(classes)));
  // Summed over classes one after another, as the reference accumulates them.
  at::Tensor score = per_class.select(1, 0).clone();
  for (std::int64_t j = 1; j < classes; ++j) score += per_class.select(1, j);
  return score;
}

double iou_score(const at::Tensor& logits, const at::Tensor& labels) {
  return iou_per_sample(logits, labels).mean().item<double>();
}

}  // namespace deepcam
