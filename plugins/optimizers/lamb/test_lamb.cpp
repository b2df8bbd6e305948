// Unit test of deepcam::optimizers::Lamb against an independent
// double-precision implementation of SPEC 5.3 written here, element by
// element from the formulas (no tensor code shared with the plugin).
#include <torch/serialize.h>
#include <torch/nn/modules/linear.h>
#include <torch/types.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <limits>
#include <vector>

#include "deepcam/checkpoint.hpp"
#include "deepcam/error.hpp"
#include "deepcam/mlperf_log.hpp"
#include "fused_test_support.hpp"
#include "lamb.hpp"

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

#include "mlperf_log_lines.hpp"
#include "test_paths.hpp"

using deepcam::optimizers::Lamb;
using deepcam::optimizers::LambOptions;

namespace {

using Values = std::vector<double>;

// SPEC 5.3 in double precision, one tensor at a time, as plain loops.
struct ReferenceLamb {
  LambOptions options;
  std::vector<Values> params;
  std::vector<Values> exp_avg;
  std::vector<Values> exp_avg_sq;
  int step = 0;
  double last_grad_norm = 0.0;

  void update(const std::vector<std::optional<Values>>& grads) {
    ++step;
    double norm_sq = 0.0;
    for (const auto& g : grads) {
      if (!g) continue;
      for (double x : *g) norm_sq += x * x;
    }
    last_grad_norm = std::sqrt(norm_sq);
    const double clip = std::max(1.0, last_grad_norm / options.max_grad_norm);
    const double b1 = options.beta1, b2 = options.beta2, wd = options.weight_decay;
    for (std::size_t t = 0; t < params.size(); ++t) {
      if (!grads[t]) continue;
      Values& p = params[t];
      if (exp_avg[t].empty()) {
        exp_avg[t].assign(p.size(), 0.0);
        exp_avg_sq[t].assign(p.size(), 0.0);
      }
      Values u(p.size());
      double p_sq = 0.0, u_sq = 0.0;
      for (std::size_t k = 0; k < p.size(); ++k) {
        const double g = (*grads[t])[k] / clip;
        exp_avg[t][k] = b1 * exp_avg[t][k] + (1 - b1) * g;
        exp_avg_sq[t][k] = b2 * exp_avg_sq[t][k] + (1 - b2) * g * g;
        const double m_hat = exp_avg[t][k] / (1 - std::pow(b1, step));
        const double v_hat = exp_avg_sq[t][k] / (1 - std::pow(b2, step));
        u[k] = m_hat / (std::sqrt(v_hat) + 1e-6) + wd * p[k];
        p_sq += p[k] * p[k];
        u_sq += u[k] * u[k];
      }
      const double p_norm = std::sqrt(p_sq), u_norm = std::sqrt(u_sq);
      const double ratio = (wd != 0 && p_norm != 0 && u_norm != 0) ? options.lr * p_norm / u_norm : options.lr;
      for (std::size_t k = 0; k < p.size(); ++k) p[k] -= ratio * u[k];
    }
  }
};

Values values_of(const at::Tensor& t) {
  const at::Tensor flat = t.detach().cpu().to(torch::kDouble).contiguous().reshape({-1});
  return Values(flat.data_ptr<double>(), flat.data_ptr<double>() + flat.numel());
}

void check_close(const at::Tensor& actual, const Values& expected, const std::string& what) {
  const Values got = values_of(actual);
  REQUIRE(got.size() == expected.size());
  for (std::size_t k = 0; k < got.size(); ++k) {
    INFO(what << " element " << k << ": " << got[k] << " vs " << expected[k]);
    CHECK(std::abs(got[k] - expected[k]) <= 1e-7 + 2e-5 * std::abs(expected[k]));
  }
}

// The test problem: a matrix, a vector, a zero-norm tensor (all zeros, with
// gradients: its trust ratio falls back to lr), a zero-update tensor (zeros
// with zero gradients: u = 0), a scalar with gradients on even steps only,
// and a tensor that never gets a gradient.
const std::vector<std::vector<std::int64_t>> kShapes = {{16, 20}, {7}, {2, 2}, {3}, {}, {5}};
constexpr int kZeroNorm = 2, kZeroUpdate = 3, kEvenSteps = 4, kNoGrad = 5;

std::vector<at::Tensor> make_params() {
  torch::manual_seed(11);
  std::vector<at::Tensor> params;
  for (std::size_t t = 0; t < kShapes.size(); ++t) {
    at::Tensor p = (t == kZeroNorm || t == kZeroUpdate) ? torch::zeros(kShapes[t]) : torch::randn(kShapes[t]);
    params.push_back(p.requires_grad_(true));
  }
  return params;
}

// Gradients of step `step` (1-based), scaled by `scale` to put the global
// norm above or below max_grad_norm.
std::vector<at::Tensor> make_grads(int step, double scale) {
  torch::manual_seed(1000 + step);
  std::vector<at::Tensor> grads;
  for (std::size_t t = 0; t < kShapes.size(); ++t) {
    if (t == kNoGrad || (t == kEvenSteps && step % 2 == 1)) {
      grads.emplace_back();
    } else if (t == kZeroUpdate) {
      grads.push_back(torch::zeros(kShapes[t]));
    } else {
      grads.push_back(torch::randn(kShapes[t]) * scale);
    }
  }
  return grads;
}

void set_grads(std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads) {
  for (std::size_t t = 0; t < params.size(); ++t) params[t].mutable_grad() = grads[t];
}

ReferenceLamb make_reference(const std::vector<at::Tensor>& params, const LambOptions& options) {
  ReferenceLamb ref{options, {}, {}, {}};
  for (const at::Tensor& p : params) ref.params.push_back(values_of(p));
  ref.exp_avg.resize(params.size());
  ref.exp_avg_sq.resize(params.size());
  return ref;
}

const c10::IValue& key(const c10::impl::GenericDict& dict, const std::string& name) {
  for (const auto& entry : dict) {
    if (entry.key().isString() && entry.key().toStringRef() == name) return entry.value();
  }
  FAIL("no key " << name);
  throw 0;
}

c10::impl::GenericDict group_of(const Lamb& lamb) {
  return key(lamb.state_dict().toGenericDict(), "param_groups").toListRef()[0].toGenericDict();
}

c10::impl::GenericDict state_of(const Lamb& lamb) { return key(lamb.state_dict().toGenericDict(), "state").toGenericDict(); }

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / (name + "." + std::to_string(getpid()))).string();
}

// 10 steps of the plugin and of the reference side by side. `clipped` says
// which side of max_grad_norm the global norm must be on at every step.
void compare_with_reference(const LambOptions& options, double grad_scale, bool clipped) {
  std::vector<at::Tensor> params = make_params();
  Lamb lamb(params, options);
  ReferenceLamb ref = make_reference(params, options);
  for (int step = 1; step <= 10; ++step) {
    const std::vector<at::Tensor> grads = make_grads(step, grad_scale);
    std::vector<std::optional<Values>> ref_grads;
    for (const at::Tensor& g : grads) ref_grads.push_back(g.defined() ? std::optional<Values>(values_of(g)) : std::nullopt);
    set_grads(params, grads);
    lamb.set_lr(options.lr * (1.0 + 0.1 * step));  // the schedule changes lr between steps
    ref.options.lr = lamb.lr();
    lamb.step();
    ref.update(ref_grads);
    INFO("step " << step << ", global gradient norm " << ref.last_grad_norm);
    CHECK((ref.last_grad_norm > options.max_grad_norm) == clipped);
    for (std::size_t t = 0; t < params.size(); ++t) check_close(params[t], ref.params[t], "parameter " + std::to_string(t));
  }
  CHECK(lamb.steps() == 10);
  // The zero-norm tensor moved (by lr * u), the zero-update one did not.
  CHECK(values_of(params[kZeroNorm]) != Values(4, 0.0));
  CHECK(values_of(params[kZeroUpdate]) == Values(3, 0.0));
  const c10::impl::GenericDict state = state_of(lamb);
  CHECK(state.size() == kShapes.size() - 1);
  CHECK_FALSE(state.contains(std::int64_t{kNoGrad}));
  CHECK(torch::equal(params[kNoGrad], make_params()[kNoGrad]));
  for (std::size_t t = 0; t < params.size(); ++t) {
    if (t == kNoGrad) continue;
    const c10::impl::GenericDict entry = state.at(static_cast<std::int64_t>(t)).toGenericDict();
    check_close(key(entry, "exp_avg").toTensor(), ref.exp_avg[t], "exp_avg of " + std::to_string(t));
    check_close(key(entry, "exp_avg_sq").toTensor(), ref.exp_avg_sq[t], "exp_avg_sq of " + std::to_string(t));
  }
}

}  // namespace

TEST_CASE("LAMB matches SPEC 5.3 over 10 steps with clipping (G > max_grad_norm) and weight decay") {
  compare_with_reference(LambOptions{0.01, 0.9, 0.999, 0.01, 1.0}, 3.0, true);
}

TEST_CASE("LAMB matches SPEC 5.3 over 10 steps without clipping (G < max_grad_norm) and with weight decay") {
  compare_with_reference(LambOptions{0.01, 0.8, 0.99, 0.1, 1.0}, 0.01, false);
}

TEST_CASE("LAMB matches SPEC 5.3 over 10 steps without weight decay (no trust ratio)") {
  compare_with_reference(LambOptions{0.002, 0.9, 0.999, 0.0, 2.5}, 1.0, true);
}

TEST_CASE("LAMB's first step by hand: clipping, bias correction and the trust ratio") {
  std::vector<at::Tensor> params = {torch::tensor({3.0f, 4.0f}).requires_grad_(true)};
  Lamb lamb(params, LambOptions{0.1, 0.9, 0.999, 0.5, 1.0});
  params[0].mutable_grad() = torch::tensor({6.0f, 8.0f});  // G = 10: g becomes (0.6, 0.8)
  lamb.step();
  // Step 1: m_hat = g, v_hat = g^2, so m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps).
  const double u0 = 1 / (1 + 1e-6 / 0.6) + 0.5 * 3, u1 = 1 / (1 + 1e-6 / 0.8) + 0.5 * 4;
  const double ratio = 0.1 * 5.0 / std::sqrt(u0 * u0 + u1 * u1);
  CHECK(params[0][0].item<double>() == doctest::Approx(3 - ratio * u0).epsilon(1e-6));
  CHECK(params[0][1].item<double>() == doctest::Approx(4 - ratio * u1).epsilon(1e-6));
}

TEST_CASE("LAMB counts every step, as APEX does, even one without gradients") {
  std::vector<at::Tensor> params = {torch::ones({2}).requires_grad_(true)};
  Lamb lamb(params, LambOptions{});
  lamb.step();
  CHECK(lamb.steps() == 1);
  CHECK(torch::equal(params[0], torch::ones({2})));
  CHECK(state_of(lamb).size() == 0);
  params[0].mutable_grad() = torch::ones({2});
  lamb.step();
  CHECK(lamb.steps() == 2);
  lamb.zero_grad();
  CHECK_FALSE(params[0].grad().defined());
}

TEST_CASE("LAMB reports the global gradient norm of its last step, before clipping") {
  torch::manual_seed(3);
  std::vector<at::Tensor> params = {torch::randn({5, 3}).requires_grad_(true), torch::randn({7}).requires_grad_(true),
                                    torch::randn({2}).requires_grad_(true)};
  Lamb lamb(params, LambOptions{});
  lamb.step();
  CHECK_FALSE(lamb.gradient_norm().defined());  // no gradients: no norm
  std::vector<at::Tensor> grads;
  for (std::size_t i = 0; i < 2; ++i) {  // the third parameter has none
    params[i].mutable_grad() = torch::randn(params[i].sizes()) * 10;  // G > max_grad_norm: clipped
    grads.push_back(params[i].grad().clone());
  }
  lamb.step();
  const at::Tensor norm = lamb.gradient_norm();
  REQUIRE(norm.defined());
  CHECK(norm.dim() == 0);
  const double expected = std::sqrt(grads[0].to(torch::kDouble).square().sum().item<double>() +
                                    grads[1].to(torch::kDouble).square().sum().item<double>());
  // Squares in float32 (as APEX), summed in float64.
  CHECK(norm.item<double>() == doctest::Approx(expected).epsilon(1e-6));
  CHECK(norm.item<double>() > LambOptions{}.max_grad_norm);
  lamb.zero_grad();
  lamb.step();
  CHECK_FALSE(lamb.gradient_norm().defined());  // not the previous step's
}

TEST_CASE("LAMB's global norm sums in float64 squares made in float32, as APEX's") {
  // 4e18^2 fits in float32, the sum of 70000 of them does not; (4e20)^2 does not fit itself.
  for (const double scale : {4e18, 4e20}) {
    INFO("gradient scale " << scale);
    std::vector<at::Tensor> params = {torch::zeros({70000}).requires_grad_(true)};
    Lamb lamb(params, LambOptions{});
    params[0].mutable_grad() = torch::full({70000}, scale);
    lamb.step();
    const double norm = lamb.gradient_norm().item<double>();
    if (scale < 1e19) {
      CHECK(norm == doctest::Approx(scale * std::sqrt(70000.0)).epsilon(1e-6));
    } else {
      CHECK(std::isinf(norm));
      CHECK(params[0].detach().eq(0).all().item<bool>());  // every gradient clipped to zero
    }
  }
}

TEST_CASE("LAMB state_dict has the FusedLAMB layout and survives pickle_save / pickle_load") {
  const LambOptions options{0.01, 0.8, 0.99, 0.1, 1.0};
  std::vector<at::Tensor> params = make_params();
  Lamb lamb(params, options);
  for (int step = 1; step <= 5; ++step) {
    set_grads(params, make_grads(step, 3.0));
    lamb.step();
  }
  const c10::impl::GenericDict group = group_of(lamb);
  std::vector<std::string> keys;
  for (const auto& entry : group) keys.push_back(entry.key().toStringRef());
  CHECK(keys == std::vector<std::string>{"lr", "bias_correction", "betas", "eps", "weight_decay", "grad_averaging",
                                         "max_grad_norm", "step", "params"});
  CHECK(key(group, "step").toInt() == 5);
  CHECK(key(group, "bias_correction").toBool());
  CHECK(key(group, "betas").isTuple());
  CHECK(key(group, "max_grad_norm").toDouble() == 1.0);

  std::vector<at::Tensor> copies;
  for (const at::Tensor& p : params) copies.push_back(p.detach().clone().requires_grad_(true));
  // Other hyper-parameters on purpose: loading restores the saved ones.
  Lamb restored(copies, LambOptions{0.5, 0.5, 0.5, 0.0, 3.0});
  restored.load_state_dict(torch::pickle_load(torch::pickle_save(lamb.state_dict())));
  CHECK(restored.steps() == 5);
  CHECK(restored.lr() == 0.01);
  CHECK(restored.options().beta1 == 0.8);
  CHECK(restored.options().beta2 == 0.99);
  CHECK(restored.options().weight_decay == 0.1);
  CHECK(restored.options().max_grad_norm == 1.0);
  for (int step = 6; step <= 10; ++step) {
    set_grads(params, make_grads(step, 3.0));
    set_grads(copies, make_grads(step, 3.0));
    lamb.step();
    restored.step();
  }
  for (std::size_t t = 0; t < params.size(); ++t) CHECK(torch::equal(params[t], copies[t]));
}

TEST_CASE("LAMB saves and resumes through a checkpoint file that Python's torch.load reads") {
  torch::manual_seed(3);
  torch::nn::Linear model(4, 3);
  Lamb lamb(model->parameters(), LambOptions{0.01, 0.9, 0.999, 0.01, 1.0});
  const auto train = [](torch::nn::Linear& m, Lamb& opt, int step) {
    torch::manual_seed(50 + step);
    opt.zero_grad();
    m->forward(torch::randn({8, 4})).square().sum().backward();
    opt.step();
  };
  for (int step = 1; step <= 3; ++step) train(model, lamb, step);
  const std::string path = temp_path("lamb_checkpoint") + ".pt";
  deepcam::CheckpointInfo saved;
  saved.step = 3;
  saved.epoch = 1;
  deepcam::save_checkpoint(path, saved, *model, &lamb);

  torch::nn::Linear resumed(4, 3);
  Lamb resumed_lamb(resumed->parameters(), LambOptions{});
  const deepcam::CheckpointInfo info = deepcam::load_checkpoint(path, *resumed, &resumed_lamb);
  CHECK(info.step == 3);
  CHECK(resumed_lamb.steps() == 3);
  for (int step = 4; step <= 6; ++step) {
    train(model, lamb, step);
    train(resumed, resumed_lamb, step);
  }
  CHECK(torch::equal(model->weight, resumed->weight));
  CHECK(torch::equal(model->bias, resumed->bias));

  // Python's default weights_only torch.load reads the LAMB state.
  const std::string command = "'" + test_support::python() + "' -c \"import sys, torch; " +
                              "o = torch.load(sys.argv[1])['optimizer']; " +
                              "g = o['param_groups'][0]; print(g['step'], g['max_grad_norm'], sorted(o['state'][0]))\" " +
                              path;
  std::FILE* pipe = popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  char buffer[256] = {};
  const std::size_t n = std::fread(buffer, 1, sizeof buffer - 1, pipe);
  CHECK(pclose(pipe) == 0);
  CHECK(std::string(buffer, n) == "3 1.0 ['exp_avg', 'exp_avg_sq']\n");
  std::remove(path.c_str());
}

TEST_CASE("LAMB load_state_dict refuses other optimizers' states and keeps its own") {
  std::vector<at::Tensor> params = {torch::ones({2}).requires_grad_(true)};
  Lamb lamb(params, LambOptions{});
  params[0].mutable_grad() = torch::ones({2});
  lamb.step();
  c10::impl::GenericDict group(c10::StringType::get(), c10::AnyType::get());
  group.insert("lr", 0.5);
  group.insert("betas", c10::ivalue::Tuple::create(0.9, 0.999));
  group.insert("weight_decay", 0.0);
  group.insert("params", c10::List<std::int64_t>({0}));
  c10::impl::GenericList groups(c10::AnyType::get());
  groups.push_back(group);
  c10::impl::GenericDict root(c10::StringType::get(), c10::AnyType::get());
  root.insert("state", c10::impl::GenericDict(c10::IntType::get(), c10::AnyType::get()));
  root.insert("param_groups", groups);
  // An Adam state: no max_grad_norm.
  CHECK_THROWS_WITH_AS(lamb.load_state_dict(root),
                       doctest::Contains("LAMB optimizer state: param_groups[0] has no key \"max_grad_norm\""),
                       deepcam::Error);
  group.insert("max_grad_norm", 1.0);
  group.insert("bias_correction", false);
  group.insert("grad_averaging", true);
  CHECK_THROWS_WITH_AS(lamb.load_state_dict(root), doctest::Contains("[\"bias_correction\"] is False"),
                       deepcam::Error);
  // Values out of their run-file ranges, as a hand-edited file may hold.
  group.insert_or_assign("bias_correction", true);
  group.insert_or_assign("max_grad_norm", 0.0);
  CHECK_THROWS_WITH_AS(lamb.load_state_dict(root),
                       doctest::Contains("param_groups[0][\"max_grad_norm\"] is 0, expected > 0"), deepcam::Error);
  group.insert_or_assign("max_grad_norm", 1.0);
  group.insert_or_assign("weight_decay", -0.5);
  CHECK_THROWS_WITH_AS(lamb.load_state_dict(root),
                       doctest::Contains("param_groups[0][\"weight_decay\"] is -0.5, expected >= 0"), deepcam::Error);
  CHECK(lamb.lr() == 1e-3);
  CHECK(lamb.steps() == 1);
  CHECK(state_of(lamb).size() == 1);
}

TEST_CASE("LAMB logs the opt_* keys of SPEC 5.4 with the types the MLPerf checker expects") {
  Lamb lamb({}, LambOptions{0.0055, 0.9, 0.999, 0.01, 1.0});
  const std::vector<std::string> lines =
      test_support::log_lines([&](deepcam::MlperfLog& log) { lamb.log_hyperparameters(log); });
  const std::vector<std::string> expected = {
      R"("key":"opt_name","value":"LAMB")",          R"("key":"opt_lr","value":0.0055)",
      R"("key":"opt_bias_correction","value":true)", R"("key":"opt_betas","value":[0.9,0.999])",
      R"("key":"opt_eps","value":1e-06)",            R"("key":"opt_weight_decay","value":0.01)",
      R"("key":"opt_grad_averaging","value":true)",  R"("key":"opt_max_grad_norm","value":1.0)"};
  REQUIRE(lines.size() == expected.size());
  for (std::size_t i = 0; i < lines.size(); ++i) {
    INFO(lines[i]);
    CHECK(lines[i].find(expected[i]) != std::string::npos);
  }
}

TEST_CASE("LambOptions checks what the schema cannot") {
  using deepcam::ParamValue;
  auto params = [](double lr, std::vector<double> betas, double wd, double max_norm) {
    return deepcam::Params("run.toml [optimizer]", {{"lr", ParamValue(lr)},
                                                    {"betas", ParamValue(std::move(betas))},
                                                    {"weight_decay", ParamValue(wd)},
                                                    {"max_grad_norm", ParamValue(max_norm)}});
  };
  const LambOptions ok = LambOptions::from(params(0.5, {0.5, 0.25}, 0.125, 2.0));
  CHECK(ok.lr == 0.5);
  CHECK(ok.beta2 == 0.25);
  CHECK(ok.weight_decay == 0.125);
  CHECK(ok.max_grad_norm == 2.0);
  CHECK_THROWS_WITH_AS(LambOptions::from(params(0.0, {0.9, 0.999}, 0.0, 1.0)),
                       doctest::Contains("run.toml [optimizer] lr"), deepcam::Error);
  CHECK_THROWS_WITH_AS(LambOptions::from(params(1e-3, {0.9}, 0.0, 1.0)),
                       doctest::Contains("run.toml [optimizer] betas has 1 values"), deepcam::Error);
  CHECK_THROWS_WITH_AS(LambOptions::from(params(1e-3, {0.9, 1.0}, 0.0, 1.0)),
                       doctest::Contains("each must be in [0, 1)"), deepcam::Error);
  CHECK_THROWS_WITH_AS(LambOptions::from(params(1e-3, {0.9, 0.999}, -1.0, 1.0)),
                       doctest::Contains("weight_decay"), deepcam::Error);
  CHECK_THROWS_WITH_AS(LambOptions::from(params(1e-3, {0.9, 0.999}, 0.0, 0.0)),
                       doctest::Contains("run.toml [optimizer] max_grad_norm = 0"), deepcam::Error);
}

using fused_test::backward_format;
using fused_test::no_gpu;

// Runs only where a GPU is present; reported as skipped otherwise.
TEST_CASE("LAMB: the fused CUDA kernels match the CPU path for 10 steps" * doctest::skip(no_gpu())) {
  // Both paths square in float32 and sum in float64: at 1e18 the squares fit in float32 and
  // only their sum does not (a finite norm, clipped); at 1e20 the squares themselves are inf
  // (an inf norm, every gradient clipped to zero).
  for (const double scale : {3.0, 0.001, 1e18, 1e20}) {
    INFO("gradient scale " << scale << (scale > 1 ? " (clipped)" : " (not clipped)"));
    // Several chunks (70000 > 65536), a channels-last tensor (dense, not
    // contiguous), a zero-norm one, one with gradients on even steps only,
    // one that never gets a gradient, and a channels-last 1x1 weight whose
    // gradient has the strides a convolution's backward pass gives it
    // (other strides along the dimensions of size 1: still the fused path).
    const std::vector<std::vector<std::int64_t>> shapes = {{70000}, {8, 3, 5, 5}, {4}, {17}, {6}, {4, 3, 1, 1}};
    torch::manual_seed(5);
    std::vector<at::Tensor> cpu;
    std::vector<at::Tensor> gpu;
    for (std::size_t t = 0; t < shapes.size(); ++t) {
      const at::Tensor p = t == 2 ? torch::zeros(shapes[t]) : torch::randn(shapes[t]);
      cpu.push_back(p.clone().requires_grad_(true));
      at::Tensor g = p.to(torch::kCUDA);
      if (shapes[t].size() == 4) g = g.contiguous(at::MemoryFormat::ChannelsLast);
      gpu.push_back(g.requires_grad_(true));
    }
    const LambOptions options{0.01, 0.9, 0.999, 0.01, 1.0};
    Lamb on_cpu(cpu, options);
    Lamb on_gpu(gpu, options);
    for (int step = 1; step <= 10; ++step) {
      on_cpu.set_lr(0.01 / step);
      on_gpu.set_lr(0.01 / step);
      for (std::size_t t = 0; t < shapes.size(); ++t) {
        const bool has_grad = t != 4 && !(t == 3 && step % 2 == 1);
        const at::Tensor g = has_grad ? torch::randn(shapes[t]) * scale : at::Tensor();
        cpu[t].mutable_grad() = g;
        gpu[t].mutable_grad() =
            has_grad ? at::empty(shapes[t], at::TensorOptions(torch::kCUDA).memory_format(backward_format(shapes[t]))).copy_(g) : g;
      }
      on_cpu.step();
      on_gpu.step();
      CHECK(on_gpu.capturable());  // the fused kernels took the step
      const double cpu_norm = on_cpu.gradient_norm().item<double>();
      CHECK(std::isinf(cpu_norm) == (scale > 1e19));
      if (std::isinf(cpu_norm)) {
        CHECK(std::isinf(on_gpu.gradient_norm().item<double>()));
      } else {
        CHECK(on_gpu.gradient_norm().item<double>() == doctest::Approx(cpu_norm).epsilon(1e-9));
      }
    }
    CHECK(on_gpu.steps() == 10);
    for (std::size_t t = 0; t < shapes.size(); ++t) {
      INFO("parameter " << t);
      CHECK(torch::allclose(gpu[t].detach().cpu(), cpu[t].detach(), 1e-5, 1e-6));
    }
  }
}

TEST_CASE("LAMB: a NaN gradient makes every parameter NaN on CUDA as on the CPU" * doctest::skip(no_gpu())) {
  // The global norm is NaN; the clip factor follows it (clamp_min on the CPU), so no parameter is
  // updated with an unclipped finite gradient.
  torch::manual_seed(6);
  const std::vector<std::vector<std::int64_t>> shapes = {{70000}, {33}};
  std::vector<at::Tensor> cpu, gpu;
  for (const auto& shape : shapes) {
    const at::Tensor p = torch::randn(shape);
    cpu.push_back(p.clone().requires_grad_(true));
    gpu.push_back(p.to(torch::kCUDA).requires_grad_(true));
  }
  const LambOptions options{0.01, 0.9, 0.999, 0.01, 1.0};
  Lamb on_cpu(cpu, options), on_gpu(gpu, options);
  for (std::size_t t = 0; t < shapes.size(); ++t) {
    at::Tensor g = torch::randn(shapes[t]);
    if (t == 1) g[5] = std::numeric_limits<float>::quiet_NaN();
    cpu[t].mutable_grad() = g;
    gpu[t].mutable_grad() = g.to(torch::kCUDA);
  }
  on_cpu.step();
  on_gpu.step();
  CHECK(on_gpu.capturable());
  for (std::size_t t = 0; t < shapes.size(); ++t) {
    INFO("parameter " << t);
    CHECK(cpu[t].detach().isnan().all().item<bool>());
    CHECK(gpu[t].detach().isnan().all().item<bool>());
  }
}
