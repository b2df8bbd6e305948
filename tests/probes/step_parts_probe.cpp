// Times two pieces of the training step's bookkeeping, each beside the
// formulation it replaced, for scripts/bench_step_parts.py:
//
//   step_parts_probe STATE_DICT_TXT REPEATS
//
// - the train IoU of a logged step: deepcam::iou_per_sample against ATen's
//   argmax over the class dimension followed by three masked counts per
//   class (what the engine did before), on a quickstart-size batch
//   (4, 3, 96, 144) and a full-size one (2, 3, 768, 1152);
// - the divergence watch's global gradient norm, stack(_foreach_norm).norm(),
//   over gradients with the reference model's parameter shapes (read from
//   STATE_DICT_TXT, testdata/reference_state_dict.txt): the cost a LAMB step
//   no longer pays, since the watch reads LAMB's own norm.
// Prints one JSON object per line; medians of REPEATS (>= 1) runs in
// milliseconds. A "before" and its "after" alternate in one loop, so that
// other work on the machine slows both alike.
#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "deepcam/loss.hpp"
#include "process_end.hpp"

namespace {

double elapsed_ms(const std::function<void()>& work) {
  const auto t0 = std::chrono::steady_clock::now();
  work();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// The median of a non-empty list: for an even count, the mean of the two
// middle values.
double median(std::vector<double> ms) {
  std::sort(ms.begin(), ms.end());
  const std::size_t mid = ms.size() / 2;
  return ms.size() % 2 == 1 ? ms[mid] : (ms[mid - 1] + ms[mid]) / 2.0;
}

struct BeforeAfter {
  double before_ms, after_ms;
};

// Each is warmed up once, then the two alternate `repeats` times.
BeforeAfter interleaved_medians_ms(int repeats, const std::function<void()>& before,
                                   const std::function<void()>& after) {
  before();
  after();
  std::vector<double> before_ms, after_ms;
  for (int i = 0; i < repeats; ++i) {
    before_ms.push_back(elapsed_ms(before));
    after_ms.push_back(elapsed_ms(after));
  }
  return {median(before_ms), median(after_ms)};
}

double median_ms(int repeats, const std::function<void()>& work) {
  work();  // warm-up
  std::vector<double> ms;
  for (int i = 0; i < repeats; ++i) ms.push_back(elapsed_ms(work));
  return median(ms);
}

// The engine's IoU before: ATen's argmax over classes, then per class three
// masked counts.
at::Tensor iou_by_argmax(const at::Tensor& logits, const at::Tensor& labels) {
  const std::int64_t classes = logits.size(1);
  const at::Tensor pred = logits.argmax(1).flatten(1);
  const at::Tensor truth = labels.flatten(1);
  at::Tensor score = at::zeros({pred.size(0)}, at::kDouble);
  for (std::int64_t j = 0; j < classes; ++j) {
    const at::Tensor p = pred == j;
    const at::Tensor t = truth == j;
    const at::Tensor tp = (p & t).sum(1).to(at::kDouble);
    const at::Tensor uni = tp + (p & ~t).sum(1).to(at::kDouble) + (~p & t).sum(1).to(at::kDouble);
    score += at::where(uni > 0, tp / (static_cast<double>(classes) * uni.clamp_min(1)),
                       at::full_like(uni, 1.0 / static_cast<double>(classes)));
  }
  return score;
}

// The trainable parameters' shapes: every entry but BatchNorm's running
// statistics and counters.
std::vector<std::vector<std::int64_t>> parameter_shapes(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    std::fprintf(stderr, "step_parts_probe: cannot read %s\n", path.c_str());
    std::exit(2);
  }
  std::vector<std::vector<std::int64_t>> shapes;
  std::string name, shape, line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    fields >> name;
    if (name.find("running_") != std::string::npos || name.find("num_batches_tracked") != std::string::npos) continue;
    std::getline(fields, shape, ']');
    std::vector<std::int64_t> dims;
    for (char& c : shape) {
      if (c == '[' || c == ',') c = ' ';
    }
    std::istringstream numbers(shape);
    for (std::int64_t d; numbers >> d;) dims.push_back(d);
    shapes.push_back(dims);
  }
  return shapes;
}

int run_probe(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: step_parts_probe STATE_DICT_TXT REPEATS\n");
    return 2;
  }
  errno = 0;
  char* end = nullptr;
  const long repeats = std::strtol(argv[2], &end, 10);
  if (end == argv[2] || *end != '\0' || errno != 0 || repeats < 1 || repeats > 1'000'000) {
    std::fprintf(stderr, "step_parts_probe: REPEATS must be a whole number from 1 to 1000000, got '%s'\n", argv[2]);
    return 2;
  }
  at::manual_seed(0);
  const std::vector<std::vector<std::int64_t>> batches = {{4, 3, 96, 144}, {2, 3, 768, 1152}};
  for (const auto& shape : batches) {
    const at::Tensor logits = at::randn(shape);
    const at::Tensor labels = at::randint(0, 3, {shape[0], shape[2], shape[3]});
    const bool same = deepcam::iou_per_sample(logits, labels).allclose(iou_by_argmax(logits, labels));
    const BeforeAfter ms = interleaved_medians_ms(
        static_cast<int>(repeats), [&] { iou_by_argmax(logits, labels); },
        [&] { deepcam::iou_per_sample(logits, labels); });
    std::printf("{\"part\": \"train IoU\", \"shape\": [%lld, %lld, %lld, %lld], \"before_ms\": %.3f, "
                "\"after_ms\": %.3f, \"same_scores\": %s}\n",
                static_cast<long long>(shape[0]), static_cast<long long>(shape[1]),
                static_cast<long long>(shape[2]), static_cast<long long>(shape[3]),
                ms.before_ms, ms.after_ms, same ? "true" : "false");
  }
  std::vector<at::Tensor> grads;
  std::int64_t elements = 0;
  for (const auto& shape : parameter_shapes(argv[1])) {
    grads.push_back(at::randn(shape));
    elements += grads.back().numel();
  }
  std::printf("{\"part\": \"watch's gradient norm\", \"tensors\": %zu, \"elements\": %lld, \"before_ms\": %.3f, "
              "\"after_ms\": 0}\n",
              grads.size(), static_cast<long long>(elements),
              median_ms(static_cast<int>(repeats), [&] { at::stack(at::_foreach_norm(grads, 2)).norm(); }));
  return 0;
}

}  // namespace

int main(int argc, char** argv) { deepcam::end_process(run_probe(argc, argv)); }
