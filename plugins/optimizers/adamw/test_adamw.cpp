// Unit test of deepcam::optimizers::AdamW against PyTorch's own
// torch.optim.AdamW, which tests/integration/adam_reference.py --adamw runs in
// the project's venv (DEEPCAM_PYTHON overrides the interpreter). The fused
// CUDA path of AdamW is tested with Adam's (test_adam.cpp).
#include <torch/serialize.h>
#include <torch/types.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "adamw.hpp"
#include "deepcam/error.hpp"
#include "deepcam/mlperf_log.hpp"

// c10's logging defines CHECK and CHECK_EQ... as aborting macros; doctest's
// must win, so it comes last and the c10 ones go.
#undef CHECK
#undef CHECK_EQ
#undef CHECK_NE
#undef CHECK_LE
#undef CHECK_LT
#undef CHECK_GE
#undef CHECK_GT
#include <doctest/doctest.h>

#include "adam_reference_test.hpp"

using deepcam::optimizers::AdamOptions;
using deepcam::optimizers::AdamW;
using namespace deepcam::optimizers::testing;

namespace {

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / (name + "." + std::to_string(getpid()))).string();
}

const AdamOptions kOptions{0.01, 0.8, 0.99, 0.1};

const Reference& main_reference() {
  static const Reference ref = run_reference("--adamw run 0.01 0.8 0.99 0.1 11");
  return ref;
}

}  // namespace

TEST_CASE("AdamW matches torch.optim.AdamW bit for bit over 10 steps") {
  const Reference& ref = main_reference();
  std::vector<at::Tensor> params = make_params(ref, "init");
  AdamW adamw(params, kOptions);
  for (int step = 1; step <= 10; ++step) {
    set_grads(params, ref, step);
    adamw.step();
    for (int i = 0; i < kParams; ++i) {
      check_equal(params[i], ref.at("param" + std::to_string(step), i),
                  "step " + std::to_string(step) + " parameter " + std::to_string(i));
    }
  }
  // Parameter 2 never had a gradient: AdamW, like Adam, leaves it alone
  // (PyTorch applies the decay only to parameters with a gradient).
  check_equal(params[2], ref.at("init", 2), "parameter 2");
}

TEST_CASE("AdamW differs from Adam with the same options: the decay is decoupled") {
  std::vector<at::Tensor> a = {torch::full({3}, 2.0f).requires_grad_(true)};
  std::vector<at::Tensor> b = {torch::full({3}, 2.0f).requires_grad_(true)};
  AdamW adamw(a, AdamOptions{0.1, 0.9, 0.999, 0.5});
  deepcam::optimizers::Adam adam(b, AdamOptions{0.1, 0.9, 0.999, 0.5});
  a[0].mutable_grad() = torch::ones({3});
  b[0].mutable_grad() = torch::ones({3});
  adamw.step();
  adam.step();
  // AdamW: 2 * (1 - 0.1 * 0.5) - 0.1 * m_hat / (sqrt(v_hat) + eps), m_hat = v_hat = 1.
  CHECK(a[0][0].item<double>() == doctest::Approx(2.0 * 0.95 - 0.1 / (1 + 1e-6)).epsilon(1e-6));
  // Adam: the decay enters the gradient (g = 2), and the first step is still lr.
  CHECK(b[0][0].item<double>() == doctest::Approx(2.0 - 0.1 * 2.0 / (2.0 + 1e-6)).epsilon(1e-6));
}

TEST_CASE("AdamW continues from a state_dict written by Python's torch.optim.AdamW") {
  const std::string path = temp_path("adamw_python_state");
  const Reference first = run_reference("--adamw run 0.01 0.8 0.99 0.1 5 " + path);
  const c10::IValue saved = [&] {
    std::ifstream in(path, std::ios::binary);
    const std::vector<char> bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    return torch::pickle_load(bytes);
  }();
  std::remove(path.c_str());
  const Reference& full = main_reference();
  std::vector<at::Tensor> params = make_params(first, "param5");
  // Other hyper-parameters on purpose: loading restores the saved ones.
  AdamW adamw(params, AdamOptions{});
  adamw.load_state_dict(saved);
  CHECK(adamw.lr() == 0.01);
  CHECK(adamw.options().weight_decay == 0.1);
  CHECK(adamw.options().decoupled_weight_decay);
  for (int step = 6; step <= 10; ++step) {
    set_grads(params, full, step);
    adamw.step();
  }
  for (int i = 0; i < kParams; ++i) {
    check_equal(params[i], full.at("param10", i), "parameter " + std::to_string(i));
  }
}

TEST_CASE("Python's torch.optim.AdamW continues from a state_dict saved by torch::pickle_save") {
  const Reference& ref = main_reference();
  std::vector<at::Tensor> params = make_params(ref, "init");
  AdamW adamw(params, kOptions);
  for (int step = 1; step <= 10; ++step) {
    set_grads(params, ref, step);
    adamw.step();
  }
  const std::string path = temp_path("adamw_cpp_state");
  {
    const std::vector<char> bytes = torch::pickle_save(adamw.state_dict());
    std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  const Reference loaded = run_reference("--adamw load " + path);
  std::remove(path.c_str());
  const std::vector<std::string> expected_groups = {
      "groupkeyslrbetasepsweight_decayamsgradmaximizeforeachcapturabledifferentiablefused"
      "decoupled_weight_decayparams",
      "grouplr0.01", "groupbetas0.80.99", "groupbetas_typetuple", "groupweight_decay0.1",
      "groupdecoupled_weight_decayTrue"};
  CHECK(loaded.groups == expected_groups);
  set_grads(params, ref, 11);
  adamw.step();
  for (int i = 0; i < kParams; ++i) {
    check_equal(params[i], ref.at("param11", i), "C++ parameter " + std::to_string(i));
    check_equal(params[i], loaded.at("next", i), "Python parameter " + std::to_string(i));
  }
}

TEST_CASE("AdamW logs opt_name AdamW and the other opt_* keys of SPEC 5.4") {
  AdamW adamw({}, AdamOptions{2e-3, 0.8, 0.99, 0.01});
  std::FILE* file = std::tmpfile();
  REQUIRE(file != nullptr);
  {
    deepcam::MlperfLog log(file, true);
    adamw.log_hyperparameters(log);
  }
  std::fflush(file);
  std::rewind(file);
  std::string text;
  char buffer[4096];
  while (std::size_t n = std::fread(buffer, 1, sizeof buffer, file)) text.append(buffer, n);
  std::fclose(file);
  text.erase(std::remove(text.begin(), text.end(), ' '), text.end());
  for (const char* expected :
       {R"("key":"opt_name","value":"AdamW")", R"("key":"opt_lr","value":0.002)",
        R"("key":"opt_betas","value":[0.8,0.99])", R"("key":"opt_eps","value":1e-06)",
        R"("key":"opt_weight_decay","value":0.01)"}) {
    INFO(expected);
    CHECK(text.find(expected) != std::string::npos);
  }
}
