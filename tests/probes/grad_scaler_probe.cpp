// deepcam::GradScaler on a scripted sequence of gradients, for
// tests/integration/test_precision.py, which runs torch.amp.GradScaler on the
// same sequence in Python and compares every line.
//
//   grad_scaler_probe [--device cuda] INIT_SCALE GROWTH_INTERVAL KIND...
//
// KIND is finite, inf or nan: step i's gradient of a 3-element parameter is
// scale * (1, -2, 0.5) * (i + 1), with its second element replaced by +inf or
// NaN. Each step prints "step i scale S tracker T found_inf F grad G0 G1 G2"
// after unscale and update (the unscaled gradient as 9 significant digits).
// With --device cuda the parameter, its gradients and the scaler live on the
// GPU (the CUDA versions of the two kernels).
#include <ATen/ATen.h>

#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>

#include "amp.hpp"
#include "process_end.hpp"

namespace {

int run_probe(int argc, char** argv) {
  at::Device device(at::kCPU);
  int first = 1;
  if (argc > 2 && std::string(argv[1]) == "--device") {
    device = at::Device(argv[2]);
    first = 3;
  }
  if (argc < first + 3) {
    std::fprintf(stderr, "usage: grad_scaler_probe [--device cuda] INIT_SCALE GROWTH_INTERVAL KIND...\n");
    return 2;
  }
  deepcam::ScalerState state;
  state.scale = std::atof(argv[first]);
  state.growth_interval = std::atoll(argv[first + 1]);
  deepcam::GradScaler scaler(state, device);
  at::Tensor param = at::zeros({3}, at::TensorOptions(device)).requires_grad_();
  for (int i = first + 2; i < argc; ++i) {
    const std::string kind = argv[i];
    const int step = i - (first + 2);
    // The loss whose gradient is (1, -2, 0.5) * (step + 1), scaled as
    // GradScaler.scale(loss) scales it.
    const at::Tensor weights = (at::tensor({1.0f, -2.0f, 0.5f}) * static_cast<float>(step + 1)).to(device);
    param.mutable_grad() = at::Tensor();
    scaler.scale((param * weights).sum()).backward();
    if (kind == "inf") param.mutable_grad()[1] = std::numeric_limits<float>::infinity();
    if (kind == "nan") param.mutable_grad()[1] = std::numeric_limits<float>::quiet_NaN();
    const at::Tensor found_inf = scaler.unscale({param});
    scaler.update(found_inf);
    const deepcam::ScalerState s = scaler.state();
    const at::Tensor g = param.grad();
    std::printf("step %d scale %.9g tracker %lld found_inf %.9g grad %.9g %.9g %.9g\n", step, s.scale,
                static_cast<long long>(s.growth_tracker), found_inf.item<double>(), g[0].item<double>(),
                g[1].item<double>(), g[2].item<double>());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) { deepcam::end_process(run_probe(argc, argv)); }
