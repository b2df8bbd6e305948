#include "deepcam/loss.hpp"

#include <torch/torch.h>

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
    w = torch::tensor({f[0], f[1], f[2]}, torch::TensorOptions().dtype(logits.scalar_type())).to(logits.device());
  }
  return w;
}

}  // namespace

at::Tensor weighted_cross_entropy(const at::Tensor& logits, const at::Tensor& labels) {
  const at::Tensor& weight = weights_like(logits);
  namespace F = torch::nn::functional;
  return F::cross_entropy(logits, labels, F::CrossEntropyFuncOptions().weight(weight).reduction(torch::kNone))
      .mean();
}

at::Tensor iou_per_sample(const at::Tensor& logits, const at::Tensor& labels) {
  const int64_t classes = logits.size(1);
  const at::Tensor pred = logits.argmax(1).flatten(1);
  const at::Tensor truth = labels.flatten(1);
  at::Tensor score = torch::zeros({pred.size(0)}, torch::TensorOptions().dtype(torch::kFloat64).device(pred.device()));
  for (int64_t j = 0; j < classes; ++j) {
    const at::Tensor p = pred == j;
    const at::Tensor t = truth == j;
    const at::Tensor tp = (p & t).sum(1).to(torch::kFloat64);
    const at::Tensor fp = (p & ~t).sum(1).to(torch::kFloat64);
    const at::Tensor fn = (~p & t).sum(1).to(torch::kFloat64);
    const at::Tensor uni = tp + fp + fn;
    score += torch::where(uni > 0, tp / (static_cast<double>(classes) * uni.clamp_min(1)),
                          torch::full_like(uni, 1.0 / static_cast<double>(classes)));
  }
  return score;
}

double iou_score(const at::Tensor& logits, const at::Tensor& labels) {
  return iou_per_sample(logits, labels).mean().item<double>();
}

}  // namespace deepcam
