// Unit test of deepcam::optimizers::Adam against PyTorch's own
// torch.optim.Adam, which tests/integration/adam_reference.py runs in the
// project's venv (DEEPCAM_PYTHON overrides the interpreter).
#include <torch/serialize.h>
#include <torch/types.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "adam.hpp"
#include "deepcam/error.hpp"
#include "deepcam/mlperf_log.hpp"
#include "deepcam/torch_pickle.hpp"
#include "fused_test_support.hpp"

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
#include "mlperf_log_lines.hpp"

using deepcam::optimizers::Adam;
using deepcam::optimizers::AdamOptions;
using namespace deepcam::optimizers::testing;
using test_support::log_lines;

namespace {

// The main configuration's 11 steps, which most cases share: each run of
// the script costs seconds of torch import.
const char* const kMainConfig = "run 0.01 0.8 0.99 0.1 11";

const Reference& main_reference() {
  static const Reference ref = run_reference(kMainConfig);
  return ref;
}


const c10::IValue& key(const c10::impl::GenericDict& dict, const std::string& name) {
  for (const auto& entry : dict) {
    if (entry.key().isString() && entry.key().toStringRef() == name) return entry.value();
  }
  FAIL("no key " << name);
  throw 0;
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / (name + "." + std::to_string(getpid()))).string();
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void compare_with_pytorch(double lr, double beta1, double beta2, double weight_decay, int steps) {
  std::ostringstream args;
  args.precision(17);
  args << "run " << lr << ' ' << beta1 << ' ' << beta2 << ' ' << weight_decay << ' ' << steps;
  const Reference& ref = args.str() == kMainConfig ? main_reference() : run_reference(args.str());
  std::vector<at::Tensor> params = make_params(ref, "init");
  Adam adam(params, AdamOptions{lr, beta1, beta2, weight_decay});
  for (int step = 1; step <= steps; ++step) {
    set_grads(params, ref, step);
    adam.step();
    for (int i = 0; i < kParams; ++i) {
      check_equal(params[i], ref.at("param" + std::to_string(step), i),
                  "step " + std::to_string(step) + " parameter " + std::to_string(i));
    }
  }
  const c10::impl::GenericDict state = key(adam.state_dict().toGenericDict(), "state").toGenericDict();
  CHECK(state.size() == 3);  // parameter 2 never had a gradient
  for (int i = 0; i < kParams; ++i) {
    CHECK(state.contains(static_cast<std::int64_t>(i)) == ref.has("step", i));
    if (!ref.has("step", i)) continue;
    const c10::impl::GenericDict entry = state.at(static_cast<std::int64_t>(i)).toGenericDict();
    check_equal(key(entry, "step").toTensor(), ref.at("step", i), "step of " + std::to_string(i));
    check_equal(key(entry, "exp_avg").toTensor(), ref.at("exp_avg", i), "exp_avg of " + std::to_string(i));
    check_equal(key(entry, "exp_avg_sq").toTensor(), ref.at("exp_avg_sq", i),
                "exp_avg_sq of " + std::to_string(i));
  }
}

}  // namespace

TEST_CASE("Adam matches torch.optim.Adam bit for bit over 10 steps") {
  SUBCASE("L2 weight decay, non-default betas") { compare_with_pytorch(0.01, 0.8, 0.99, 0.1, 11); }
  SUBCASE("SPEC defaults") { compare_with_pytorch(1e-3, 0.9, 0.999, 1e-6, 10); }
  SUBCASE("no weight decay") { compare_with_pytorch(3e-3, 0.9, 0.999, 0.0, 10); }
}

TEST_CASE("Adam continues from a state_dict saved by Python's torch.save") {
  const std::string path = temp_path("adam_python_state");
  const Reference first = run_reference("run 0.01 0.8 0.99 0.1 5 " + path);
  const Reference& full = main_reference();
  // Both readers: LibTorch's, and the core's that checkpoints go through.
  const c10::IValue saved_states[] = {torch::pickle_load(read_file(path)), deepcam::load_torch_save(path)};
  std::remove(path.c_str());

  for (const c10::IValue& saved : saved_states) {
    std::vector<at::Tensor> params = make_params(first, "param5");
    // Other hyper-parameters on purpose: loading restores the saved ones, as PyTorch does.
    Adam adam(params, AdamOptions{});
    adam.load_state_dict(saved);
    CHECK(adam.lr() == 0.01);
    CHECK(adam.options().beta1 == 0.8);
    CHECK(adam.options().beta2 == 0.99);
    CHECK(adam.options().weight_decay == 0.1);
    for (int step = 6; step <= 10; ++step) {
      set_grads(params, full, step);
      adam.step();
    }
    for (int i = 0; i < kParams; ++i) {
      check_equal(params[i], full.at("param10", i), "parameter " + std::to_string(i));
    }
  }
}

TEST_CASE("Python's torch.optim.Adam continues from a state_dict saved by torch::pickle_save") {
  const Reference& ref = main_reference();
  std::vector<at::Tensor> params = make_params(ref, "init");
  Adam adam(params, AdamOptions{0.01, 0.8, 0.99, 0.1});
  for (int step = 1; step <= 10; ++step) {
    set_grads(params, ref, step);
    adam.step();
  }
  const std::string path = temp_path("adam_cpp_state");
  {
    const std::vector<char> bytes = torch::pickle_save(adam.state_dict());
    std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  const Reference loaded = run_reference("load " + path);
  std::remove(path.c_str());

  const std::vector<std::string> expected_groups = {
      "groupkeyslrbetasepsweight_decayamsgradmaximizeforeachcapturabledifferentiablefused"
      "decoupled_weight_decayparams",
      "grouplr0.01", "groupbetas0.80.99", "groupbetas_typetuple", "groupweight_decay0.1",
      "groupdecoupled_weight_decayFalse"};
  CHECK(loaded.groups == expected_groups);
  const c10::impl::GenericDict state = key(adam.state_dict().toGenericDict(), "state").toGenericDict();
  for (int i = 0; i < kParams; ++i) {
    CHECK(loaded.has("step", i) == (i != 2));
    if (!loaded.has("step", i)) continue;
    const c10::impl::GenericDict entry = state.at(static_cast<std::int64_t>(i)).toGenericDict();
    for (const char* name : {"step", "exp_avg", "exp_avg_sq"}) {
      check_equal(key(entry, name).toTensor(), loaded.at(name, i),
                  std::string("Python's ") + name + " of " + std::to_string(i));
    }
  }

  set_grads(params, ref, 11);
  adam.step();
  for (int i = 0; i < kParams; ++i) {
    check_equal(params[i], ref.at("param11", i), "C++ parameter " + std::to_string(i));
    check_equal(params[i], loaded.at("next", i), "Python parameter " + std::to_string(i));
  }
}

TEST_CASE("Adam state_dict has PyTorch's layout and survives pickle_save / pickle_load") {
  const Reference& ref = main_reference();
  std::vector<at::Tensor> params = make_params(ref, "init");
  Adam adam(params, AdamOptions{0.01, 0.8, 0.99, 0.1});
  for (int step = 1; step <= 5; ++step) {
    set_grads(params, ref, step);
    adam.step();
  }
  const c10::IValue dict = adam.state_dict();
  const c10::impl::GenericDict root = dict.toGenericDict();
  const c10::impl::GenericDict group = key(root, "param_groups").toListRef()[0].toGenericDict();
  CHECK(key(group, "betas").isTuple());
  CHECK(key(group, "eps").toDouble() == 1e-6);
  CHECK(key(group, "foreach").isNone());
  CHECK(key(group, "amsgrad").toBool() == false);
  std::vector<std::int64_t> ids;
  for (const c10::IValue& id : key(group, "params").toListRef()) ids.push_back(id.toInt());
  CHECK(ids == std::vector<std::int64_t>{0, 1, 2, 3});
  const c10::impl::GenericDict entry = key(root, "state").toGenericDict().at(std::int64_t{1}).toGenericDict();
  const at::Tensor step = key(entry, "step").toTensor();
  CHECK(step.dim() == 0);
  CHECK((step.scalar_type() == at::kFloat));
  CHECK(step.item<double>() == 2.0);  // parameter 1 has a gradient on even steps only

  std::vector<at::Tensor> copies;
  for (const at::Tensor& p : params) copies.push_back(p.detach().clone().requires_grad_(true));
  Adam restored(copies, AdamOptions{});
  restored.load_state_dict(torch::pickle_load(torch::pickle_save(dict)));
  for (int step = 6; step <= 10; ++step) {
    set_grads(params, ref, step);
    set_grads(copies, ref, step);
    adam.step();
    restored.step();
  }
  for (int i = 0; i < kParams; ++i) {
    CHECK(torch::equal(params[i], copies[i]));
    check_equal(copies[i], ref.at("param10", i), "parameter " + std::to_string(i));
  }
}

TEST_CASE("Adam load_state_dict accepts string keys and a plain-number step") {
  std::vector<at::Tensor> params = {torch::ones({2}).requires_grad_(true)};
  Adam adam(params, AdamOptions{});
  c10::impl::GenericDict entry(c10::StringType::get(), c10::AnyType::get());
  entry.insert("step", 3.0);
  entry.insert("exp_avg", torch::full({2}, 0.5));
  entry.insert("exp_avg_sq", torch::full({2}, 0.25));
  c10::impl::GenericDict state(c10::StringType::get(), c10::AnyType::get());
  // The saved ids (here 7) map to parameters by their position in "params", as in PyTorch.
  state.insert("7", entry);
  c10::impl::GenericDict group(c10::StringType::get(), c10::AnyType::get());
  group.insert("lr", 0.5);
  group.insert("betas", c10::List<double>({0.5, 0.75}));
  group.insert("weight_decay", std::int64_t{0});
  group.insert("params", c10::List<std::int64_t>({7}));
  c10::impl::GenericList groups(c10::AnyType::get());
  groups.push_back(group);
  c10::impl::GenericDict root(c10::StringType::get(), c10::AnyType::get());
  root.insert("state", state);
  root.insert("param_groups", groups);
  adam.load_state_dict(root);
  CHECK(adam.lr() == 0.5);
  CHECK(adam.options().beta2 == 0.75);
  CHECK(adam.options().weight_decay == 0.0);
  const c10::impl::GenericDict saved =
      key(adam.state_dict().toGenericDict(), "state").toGenericDict().at(std::int64_t{0}).toGenericDict();
  CHECK(key(saved, "step").toTensor().item<double>() == 3.0);
  CHECK(torch::equal(key(saved, "exp_avg").toTensor(), torch::full({2}, 0.5)));

  // One more step (the 4th) from that state, by hand, with g = 1.
  params[0].mutable_grad() = torch::ones({2});
  adam.step();
  const double m = 0.5 * 0.5 + 0.5 * 1.0, v = 0.75 * 0.25 + 0.25 * 1.0;
  const double expected = 1.0 - 0.5 / (1 - 0.5 * 0.5 * 0.5 * 0.5) * m /
                                    (std::sqrt(v) / std::sqrt(1 - std::pow(0.75, 4)) + 1e-6);
  CHECK(params[0][0].item<double>() == doctest::Approx(expected).epsilon(1e-6));
}

TEST_CASE("Adam load_state_dict refuses a state of another model and keeps its own") {
  const Reference& ref = main_reference();
  std::vector<at::Tensor> params = make_params(ref, "init");
  Adam adam(params, AdamOptions{0.01, 0.8, 0.99, 0.1});
  set_grads(params, ref, 1);
  adam.step();
  const c10::IValue good = torch::pickle_load(torch::pickle_save(adam.state_dict()));

  auto message_of = [&](std::vector<at::Tensor> others) {
    Adam other(std::move(others), AdamOptions{});
    try {
      other.load_state_dict(good);
    } catch (const deepcam::Error& e) {
      CHECK(other.state_dict().toGenericDict().at("state").toGenericDict().size() == 0);
      CHECK(other.lr() == 1e-3);
      return std::string(e.what());
    }
    return std::string("no error");
  };
  SUBCASE("fewer parameters") {
    const std::string message = message_of({torch::zeros({16, 20}), torch::zeros({5})});
    CHECK(message.find("lists 4 parameters, but the model has 2") != std::string::npos);
  }
  SUBCASE("another shape") {
    const std::string message =
        message_of({torch::zeros({20, 16}), torch::zeros({5}), torch::zeros({2, 2}), torch::zeros({})});
    CHECK(message.find("state[0][\"exp_avg\"] has shape [16, 20] but parameter 0 has shape [20, 16]") !=
          std::string::npos);
  }
  SUBCASE("not a state_dict") {
    Adam other(params, AdamOptions{});
    CHECK_THROWS_WITH_AS(other.load_state_dict(c10::IValue(3.0)),
                         doctest::Contains("the top level is a Double, expected a dict"), deepcam::Error);
    c10::impl::GenericDict empty(c10::StringType::get(), c10::AnyType::get());
    CHECK_THROWS_WITH_AS(other.load_state_dict(empty), doctest::Contains("no key \"param_groups\""),
                         deepcam::Error);
  }
}

TEST_CASE("Adam skips parameters without a gradient; zero_grad clears gradients") {
  std::vector<at::Tensor> params = {torch::ones({3}).requires_grad_(true), torch::ones({2}).requires_grad_(true)};
  Adam adam(params, AdamOptions{});
  params[0].mutable_grad() = torch::ones({3});
  adam.step();
  CHECK(torch::equal(params[1], torch::ones({2})));
  CHECK(params[0][0].item<float>() < 1.0f);
  adam.zero_grad();
  CHECK_FALSE(params[0].grad().defined());
  CHECK_FALSE(params[1].grad().defined());
}

TEST_CASE("Adam set_lr drives the step size") {
  std::vector<at::Tensor> params = {torch::zeros({1}).requires_grad_(true)};
  Adam adam(params, AdamOptions{1e-3, 0.9, 0.999, 0.0});
  CHECK(adam.lr() == 1e-3);
  adam.set_lr(0.25);
  CHECK(adam.lr() == 0.25);
  params[0].mutable_grad() = torch::ones({1});
  adam.step();
  // The first bias-corrected step moves by lr * g / (|g| + eps).
  CHECK(params[0].item<double>() == doctest::Approx(-0.25 / (1 + 1e-6)).epsilon(1e-6));
}

TEST_CASE("Adam logs the opt_* keys of SPEC 5.4") {
  Adam adam({}, AdamOptions{2e-3, 0.8, 0.99, 0.0});
  const std::vector<std::string> lines = log_lines([&](deepcam::MlperfLog& log) { adam.log_hyperparameters(log); });
  const std::vector<std::string> expected = {
      R"("key":"opt_name","value":"Adam")", R"("key":"opt_lr","value":0.002)",
      R"("key":"opt_betas","value":[0.8,0.99])", R"("key":"opt_eps","value":1e-06)",
      R"("key":"opt_weight_decay","value":0.0)"};
  REQUIRE(lines.size() == expected.size());
  for (std::size_t i = 0; i < lines.size(); ++i) {
    INFO(lines[i]);
    CHECK(lines[i].rfind(":::MLLOG{", 0) == 0);
    CHECK(lines[i].find(expected[i]) != std::string::npos);
  }
}

TEST_CASE("AdamOptions checks what the schema cannot") {
  using deepcam::ParamValue;
  auto params = [](double lr, std::vector<double> betas, double wd) {
    return deepcam::Params("run.toml [optimizer]", {{"lr", ParamValue(lr)},
                                                    {"betas", ParamValue(std::move(betas))},
                                                    {"weight_decay", ParamValue(wd)}});
  };
  const AdamOptions ok = AdamOptions::from(params(0.5, {0.5, 0.25}, 0.125));
  CHECK(ok.lr == 0.5);
  CHECK(ok.beta1 == 0.5);
  CHECK(ok.beta2 == 0.25);
  CHECK(ok.weight_decay == 0.125);
  CHECK_THROWS_WITH_AS(AdamOptions::from(params(0.0, {0.9, 0.999}, 0.0)),
                       doctest::Contains("run.toml [optimizer] lr"), deepcam::Error);
  CHECK_THROWS_WITH_AS(AdamOptions::from(params(1e-3, {0.9}, 0.0)),
                       doctest::Contains("run.toml [optimizer] betas has 1 values"), deepcam::Error);
  CHECK_THROWS_WITH_AS(AdamOptions::from(params(1e-3, {0.9, 1.0}, 0.0)),
                       doctest::Contains("each must be in [0, 1)"), deepcam::Error);
  CHECK_THROWS_WITH_AS(AdamOptions::from(params(1e-3, {0.9, 0.999}, -1.0)),
                       doctest::Contains("weight_decay"), deepcam::Error);
}

using fused_test::backward_format;
using fused_test::no_gpu;

// Runs only where a GPU is present; reported as skipped otherwise.
TEST_CASE("Adam and AdamW: the fused CUDA kernels match the CPU path for 10 steps" * doctest::skip(no_gpu())) {
  for (const bool decoupled : {false, true}) {
    INFO("decoupled_weight_decay = " << decoupled);
    // Several chunks (70000 > 65536), a channels-last parameter (dense but
    // not contiguous), one with gradients on even steps only, a scalar, and
    // a channels-last 1x1 weight whose gradient has the strides a
    // convolution's backward pass gives it (other strides along the
    // dimensions of size 1: still the fused path).
    const std::vector<std::vector<std::int64_t>> shapes = {{70000}, {8, 3, 5, 5}, {17}, {}, {4, 3, 1, 1}};
    torch::manual_seed(7);
    std::vector<at::Tensor> cpu;
    std::vector<at::Tensor> gpu;
    for (const auto& shape : shapes) {
      at::Tensor p = torch::randn(shape);
      cpu.push_back(p.clone().requires_grad_(true));
      at::Tensor g = p.to(torch::kCUDA);
      if (shape.size() == 4) g = g.contiguous(at::MemoryFormat::ChannelsLast);
      gpu.push_back(g.requires_grad_(true));
    }
    const AdamOptions options{0.01, 0.8, 0.99, 0.1, decoupled};
    Adam on_cpu(cpu, options);
    Adam on_gpu(gpu, options);
    for (int step = 1; step <= 10; ++step) {
      on_cpu.set_lr(0.01 / step);
      on_gpu.set_lr(0.01 / step);
      for (std::size_t i = 0; i < shapes.size(); ++i) {
        const bool has_grad = !(i == 2 && step % 2 == 1);
        const at::Tensor g = has_grad ? torch::randn(shapes[i]) : at::Tensor();
        cpu[i].mutable_grad() = g;
        gpu[i].mutable_grad() =
            has_grad ? at::empty(shapes[i], at::TensorOptions(torch::kCUDA).memory_format(backward_format(shapes[i]))).copy_(g) : g;
      }
      on_cpu.step();
      on_gpu.step();
      CHECK(on_gpu.capturable());  // the fused kernels took the step
    }
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      INFO("parameter " << i);
      CHECK(torch::allclose(gpu[i].detach().cpu(), cpu[i].detach(), 1e-5, 1e-6));
    }
    const auto state = [](const Adam& adam, std::int64_t i, const char* name) {
      return key(key(adam.state_dict().toGenericDict(), "state").toGenericDict().at(i).toGenericDict(), name)
          .toTensor()
          .cpu();
    };
    for (std::int64_t i = 0; i < static_cast<std::int64_t>(shapes.size()); ++i) {
      CHECK(state(on_gpu, i, "step").item<double>() == state(on_cpu, i, "step").item<double>());
      CHECK(torch::allclose(state(on_gpu, i, "exp_avg"), state(on_cpu, i, "exp_avg"), 1e-5, 1e-6));
      CHECK(torch::allclose(state(on_gpu, i, "exp_avg_sq"), state(on_cpu, i, "exp_avg_sq"), 1e-5, 1e-7));
    }
  }
}
