// Unit tests of deepcam::models::DeepLabV3Plus: the reference's checkpoint
// layout, SPEC 3.6 initialisation, shapes at both output strides, refused
// inputs and parameters, and a backward pass.
#include "deeplabv3plus.hpp"

// LibTorch first: c10's logging defines CHECK, CHECK_EQ, ... as aborting
// asserts, and doctest's definitions must be the ones left standing.
#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/types.h>
#include <ATen/record_function.h>
#undef CHECK
#undef CHECK_EQ
#undef CHECK_NE
#undef CHECK_LT
#undef CHECK_LE
#undef CHECK_GT
#undef CHECK_GE
#include <doctest/doctest.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "deepcam/error.hpp"
#include "test_paths.hpp"

namespace {

using deepcam::models::DeepLabV3Plus;
using deepcam::models::DeepLabV3PlusOptions;
using Entries = std::vector<std::pair<std::string, torch::Tensor>>;

// doctest::Approx's epsilon is relative to 1 + |value|, far too loose for
// standard deviations of 0.01, so the init checks compare ratios instead.

// PyTorch's state_dict() order, written here rather than taken from the core
// so that this test stands on its own: modules in pre-order, each with its
// own parameters, then its own buffers.
Entries state_entries(torch::nn::Module& root) {
  Entries out;
  for (const auto& item : root.named_modules("", /*include_self=*/true)) {
    const std::string prefix = item.key().empty() ? "" : item.key() + ".";
    for (const auto& p : item.value()->named_parameters(/*recurse=*/false)) {
      out.emplace_back(prefix + p.key(), p.value());
    }
    for (const auto& b : item.value()->named_buffers(/*recurse=*/false)) {
      out.emplace_back(prefix + b.key(), b.value());
    }
  }
  return out;
}

std::string shape_of(const torch::Tensor& t) {
  std::ostringstream s;
  s << '[';
  for (std::int64_t i = 0; i < t.dim(); ++i) s << (i ? ", " : "") << t.size(i);
  s << ']';
  return s.str();
}

std::string dtype_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat: return "float32";
    case torch::kLong: return "int64";
    default: return std::string("unexpected ") + c10::toString(t.scalar_type());
  }
}

torch::Tensor entry(const Entries& entries, const std::string& name) {
  for (const auto& [key, value] : entries) {
    if (key == name) return value;
  }
  FAIL("no state entry " << name);
  return {};
}

// Built once: the full-size model is only inspected, never run.
DeepLabV3Plus& full_model() {
  static DeepLabV3Plus model{DeepLabV3PlusOptions{}};
  return model;
}

DeepLabV3PlusOptions tiny(std::int64_t output_stride) {
  DeepLabV3PlusOptions o;
  o.width = 0.0625;
  o.middle_blocks = 1;
  o.output_stride = output_stride;
  return o;
}

}  // namespace

TEST_CASE("the state dict at default options is the reference's, line by line") {
  torch::manual_seed(0);
  const Entries entries = state_entries(full_model().module());

  std::ifstream file(test_support::testdata_dir() / "reference_state_dict.txt");
  REQUIRE(file.good());
  std::vector<std::string> expected;
  for (std::string line; std::getline(file, line);) {
    if (!line.empty()) expected.push_back(line);
  }
  REQUIRE(expected.size() == 529);
  CHECK(entries.size() == expected.size());

  for (std::size_t i = 0; i < std::min(entries.size(), expected.size()); ++i) {
    const auto& [name, t] = entries[i];
    const std::string got = name + " " + shape_of(t) + " " + dtype_of(t);
    if (got != expected[i]) {
      FAIL_CHECK("entry " << i << ": got '" << got << "', reference '" << expected[i] << "'");
      break;
    }
  }

  std::int64_t trainable_tensors = 0;
  std::int64_t trainable_numel = 0;
  for (const auto& p : full_model().module().parameters()) {
    if (p.requires_grad()) {
      ++trainable_tensors;
      trainable_numel += p.numel();
    }
  }
  CHECK(trainable_tensors == 301);
  CHECK(trainable_numel == 56454720);
}

TEST_CASE("initialisation follows SPEC 3.6") {
  torch::NoGradGuard no_grad;
  auto& root = full_model().module();
  const Entries entries = state_entries(root);

  std::size_t batch_norms = 0;
  for (const auto& m : root.modules()) {
    if (auto* bn = m->as<torch::nn::BatchNorm2d>()) {
      ++batch_norms;
      CHECK(torch::all(bn->weight == 1).item<bool>());
      CHECK(torch::all(bn->bias == 0).item<bool>());
    }
  }
  // 529 entries = 301 parameters + 228 buffers, 3 buffers per BatchNorm.
  CHECK(batch_norms == 76);

  // Kaiming normal, fan_in, gain sqrt 2: std = sqrt(2 / fan_in), mean 0.
  const auto check_kaiming = [&](const std::string& name, double fan_in, double tolerance) {
    const torch::Tensor w = entry(entries, name);
    INFO(name);
    const double expected = std::sqrt(2.0 / fan_in);
    CHECK(std::abs(w.std().item<double>() / expected - 1.0) < tolerance);
    CHECK(std::abs(w.mean().item<double>()) < 0.05 * expected);
  };
  check_kaiming("xception_features.conv1.weight", 16 * 9, 0.15);
  check_kaiming("xception_features.block4.rep.0.conv1.weight", 9, 0.05);       // depthwise
  check_kaiming("xception_features.block4.rep.0.pointwise.weight", 728, 0.02);
  check_kaiming("xception_features.block20.skip.weight", 728, 0.02);
  check_kaiming("xception_features.conv5.pointwise.weight", 1536, 0.02);
  check_kaiming("bottleneck.aspp1.atrous_convolution.weight", 2048, 0.02);
  check_kaiming("bottleneck.aspp4.atrous_convolution.weight", 2048 * 9, 0.02);

  // Outside the encoder and the rate branches LibTorch's default stays:
  // uniform within 1/sqrt(fan_in), std 1/sqrt(3 fan_in), which a Kaiming
  // normal draw of this size would exceed.
  const auto check_default = [&](const std::string& name, double fan_in) {
    const torch::Tensor w = entry(entries, name);
    INFO(name);
    CHECK(w.abs().max().item<double>() <= 1.0 / std::sqrt(fan_in) + 1e-7);
    CHECK(std::abs(w.std().item<double>() * std::sqrt(3 * fan_in) - 1.0) < 0.03);
  };
  check_default("bottleneck.global_avg_pool.global_average_pool.1.weight", 2048);
  check_default("bottleneck.conv.weight", 1280);
  check_default("conv2.weight", 128);
  check_default("upsample.conv1.0.weight", 304 * 9);
  check_default("upsample.deconv1.0.weight", 256 * 9);  // transposed: fan_in = out * k * k

  CHECK(torch::all(entry(entries, "bottleneck.global_avg_pool.global_average_pool.2.weights") == 1)
            .item<bool>());
  CHECK(torch::all(entry(entries, "bottleneck.global_avg_pool.global_average_pool.2.bias") == 0)
            .item<bool>());
}

TEST_CASE("a narrow model keeps the names, scales the channels and renumbers the exit block") {
  DeepLabV3Plus model(tiny(16));
  const Entries entries = state_entries(model.module());
  // 728 / 16 = 45.5 rounds to 46; 256 / 16 = 16.
  CHECK(shape_of(entry(entries, "xception_features.block3.skip.weight")) == "[46, 16, 1, 1]");
  CHECK(shape_of(entry(entries, "xception_features.block5.skip.weight")) == "[64, 46, 1, 1]");
  CHECK(shape_of(entry(entries, "upsample.conv1.0.weight")) == "[16, 19, 3, 3]");
  CHECK(shape_of(entry(entries, "upsample.last_deconv.0.weight")) == "[16, 3, 3, 3]");
  for (const auto& [name, t] : entries) {
    CHECK_MESSAGE(name.rfind("xception_features.block6", 0) != 0, name);
  }

  DeepLabV3PlusOptions minimal = tiny(16);
  minimal.width = 1e-4;  // every count rounds to 0 and is raised to 1
  DeepLabV3Plus narrowest(minimal);
  const Entries n = state_entries(narrowest.module());
  CHECK(shape_of(entry(n, "xception_features.conv5.pointwise.weight")) == "[1, 1, 1, 1]");
  CHECK(shape_of(entry(n, "upsample.last_deconv.0.weight")) == "[1, 3, 3, 3]");
}

TEST_CASE("forward gives (B, n_classes, H, W) at output stride 16 and 8") {
  torch::manual_seed(1);
  for (const std::int64_t os : {16, 8}) {
    INFO("output_stride = " << os);
    DeepLabV3Plus model(tiny(os));
    model.module().train();
    const torch::Tensor y = model.forward(torch::randn({2, 16, 32, 48}));
    CHECK(shape_of(y) == "[2, 3, 32, 48]");
    CHECK(torch::isfinite(y).all().item<bool>());

    // The image-pooling branch follows the feature map, whatever its size.
    model.module().eval();
    CHECK(shape_of(model.forward(torch::randn({1, 16, 64, 16}))) == "[1, 3, 64, 16]");
  }

  // Both strides have the same names and shapes: only strides and
  // dilations differ.
  DeepLabV3Plus a(tiny(16)), b(tiny(8));
  const Entries ea = state_entries(a.module()), eb = state_entries(b.module());
  REQUIRE(ea.size() == eb.size());
  for (std::size_t i = 0; i < ea.size(); ++i) {
    CHECK(ea[i].first == eb[i].first);
    CHECK(shape_of(ea[i].second) == shape_of(eb[i].second));
  }
}

TEST_CASE("inputs whose size the strides cannot divide are refused, naming the shape") {
  DeepLabV3Plus model(tiny(16));
  model.module().eval();
  CHECK_THROWS_WITH_AS(model.forward(torch::randn({2, 16, 30, 48})),
                       doctest::Contains("[2, 16, 30, 48]"), deepcam::Error);
  CHECK_THROWS_WITH_AS(model.forward(torch::randn({2, 16, 32, 40})),
                       doctest::Contains("multiples of 16"), deepcam::Error);
  CHECK_THROWS_WITH_AS(model.forward(torch::randn({2, 4, 32, 48})),
                       doctest::Contains("[2, 4, 32, 48]"), deepcam::Error);
  CHECK_THROWS_AS(model.forward(torch::randn({16, 32, 48})), deepcam::Error);

  // At output stride 8 multiples of 8 line up.
  DeepLabV3Plus os8(tiny(8));
  os8.module().eval();
  CHECK(shape_of(os8.forward(torch::randn({1, 16, 40, 24}))) == "[1, 3, 40, 24]");
  CHECK_THROWS_AS(os8.forward(torch::randn({1, 16, 36, 24})), deepcam::Error);
}

TEST_CASE("a training batch that leaves BatchNorm one value per channel is refused, naming the cause") {
  // It was LibTorch's "Expected more than 1 value per channel when
  // training", an internal error to the host.
  DeepLabV3Plus model(tiny(16));
  model.module().train();
  CHECK_THROWS_WITH_AS(model.forward(torch::randn({1, 16, 16, 16})),
                       doctest::Contains("one sample of 16 x 16 pixels leaves one value per channel at output "
                                         "stride 16"),
                       deepcam::Error);
  // Two values per channel train, as in PyTorch: two samples, or a wider one.
  CHECK(shape_of(model.forward(torch::randn({2, 16, 16, 16}))) == "[2, 3, 16, 16]");
  CHECK(shape_of(model.forward(torch::randn({1, 16, 16, 32}))) == "[1, 3, 16, 32]");
  // At output stride 8 one sample of 16 x 16 leaves four.
  DeepLabV3Plus os8(tiny(8));
  os8.module().train();
  CHECK(shape_of(os8.forward(torch::randn({1, 16, 16, 16}))) == "[1, 3, 16, 16]");
  // In evaluation BatchNorm uses its running statistics.
  model.module().eval();
  CHECK(shape_of(model.forward(torch::randn({1, 16, 16, 16}))) == "[1, 3, 16, 16]");
}

TEST_CASE("backward gives a finite gradient for every parameter") {
  torch::manual_seed(2);
  for (const std::int64_t os : {16, 8}) {
    INFO("output_stride = " << os);
    DeepLabV3Plus model(tiny(os));
    model.module().train();
    const torch::Tensor y = model.forward(torch::randn({2, 16, 32, 48}));
    (y * torch::randn_like(y)).sum().backward();
    std::size_t checked = 0;
    for (const auto& p : model.module().named_parameters()) {
      INFO(p.key());
      REQUIRE(p.value().grad().defined());
      CHECK(torch::isfinite(p.value().grad()).all().item<bool>());
      ++checked;
    }
    CHECK(checked == 301 - 15 * 12);  // 15 fewer middle blocks of 12 tensors
    const torch::Tensor first = model.module().named_parameters()["xception_features.conv1.weight"];
    CHECK(first.grad().abs().sum().item<double>() > 0);
  }
}

TEST_CASE("channels_last on the CPU gives the contiguous model's outputs and gradients") {
  // At width 0.125 block1's strided 1x1 skip convolution sees 8 channels at
  // 48 x 72: there oneDNN's own strided NHWC backward pass writes past its
  // buffers, so this case crashes unless the model takes that convolution
  // on every second pixel.
  DeepLabV3PlusOptions o = tiny(16);
  o.width = 0.125;
  const auto run = [&](torch::MemoryFormat format, torch::Dtype dtype) {
    torch::manual_seed(3);
    DeepLabV3Plus model(o);
    model.module().to(dtype);
    model.module().train();
    for (auto& p : model.module().parameters()) {
      if (p.dim() == 4) p.set_data(p.data().contiguous(format));
    }
    const torch::Tensor x = torch::randn({2, 16, 96, 144}).to(dtype).contiguous(format);
    const torch::Tensor y = model.forward(x);
    (y * torch::randn(y.sizes()).to(dtype)).sum().backward();  // randn_like would follow the layout
    std::vector<std::pair<std::string, torch::Tensor>> out{{"output", y.detach().contiguous()}};
    for (const auto& p : model.module().named_parameters()) out.emplace_back(p.key(), p.value().grad().contiguous());
    return out;
  };
  // In float64 the two layouts agree to rounding: any element a layout
  // mistake moved would show.
  {
    const auto nchw = run(torch::MemoryFormat::Contiguous, torch::kDouble);
    const auto nhwc = run(torch::MemoryFormat::ChannelsLast, torch::kDouble);
    REQUIRE(nchw.size() == nhwc.size());
    for (std::size_t i = 0; i < nchw.size(); ++i) {
      INFO(nchw[i].first);
      const torch::Tensor& a = nchw[i].second;
      const torch::Tensor& b = nhwc[i].second;
      const double scale = a.abs().max().item<double>();
      CHECK(scale > 0);
      CHECK((a - b).abs().max().item<double>() <= 1e-9 * scale);
    }
  }
  // In float32, oneDNN's own NHWC kernels (which float64 does not use) sum
  // in another order: the outputs agree to float32's rounding, but the few
  // activations that lie within rounding of a ReLU's kink may fall on the
  // other side of it, and training-mode BatchNorm spreads each such step
  // over its whole batch. So the gradients are compared as wholes (their
  // norms), where a layout mistake would be off by their size: with one
  // thread they differed by up to 2e-3 of the norm, with two by under 1e-4.
  const auto nchw = run(torch::MemoryFormat::Contiguous, torch::kFloat);
  const auto nhwc = run(torch::MemoryFormat::ChannelsLast, torch::kFloat);
  REQUIRE(nchw.size() == nhwc.size());
  for (std::size_t i = 0; i < nchw.size(); ++i) {
    INFO(nchw[i].first);
    const torch::Tensor& a = nchw[i].second;
    const torch::Tensor& b = nhwc[i].second;
    if (i == 0) {
      CHECK((a - b).abs().max().item<double>() <= 1e-4 * a.abs().max().item<double>());
    } else {
      CHECK((a - b).norm().item<double>() <= 1e-2 * a.norm().item<double>());
    }
  }
}

namespace {

// The convolutions of a training step whose input (forward) or incoming
// gradient (backward) is not NHWC, as "aten::op CxHxW"; filled by a
// RecordFunction observer while a test holds it.
std::vector<std::string> g_not_nhwc;
std::int64_t g_convolutions = 0;  // those seen: none would mean no observer ran

std::unique_ptr<at::ObserverContext> note_layout(const at::RecordFunction& fn) {
  const std::string name = fn.name();
  if (name != "aten::convolution" && name != "aten::convolution_backward") return nullptr;
  ++g_convolutions;
  const auto inputs = fn.inputs();
  for (std::size_t i = 0; i < std::min<std::size_t>(2, inputs.size()); ++i) {
    if (!inputs[i].isTensor()) continue;
    const at::Tensor& t = inputs[i].toTensor();
    if (t.dim() == 4 && !t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
      g_not_nhwc.push_back(fmt::format("{} {}x{}x{}", name, t.size(1), t.size(2), t.size(3)));
    }
  }
  return nullptr;
}

}  // namespace

TEST_CASE("channels_last: every convolution of a training step reads NHWC") {
  // With NCHW input, a convolution of NHWC weights converts it (a copy, and
  // on the CPU a blocked-format kernel): the step would not be NHWC end to end.
  for (const double width : {0.0625, 1.0}) {
    INFO("width " << width);
    DeepLabV3PlusOptions o = tiny(16);
    o.width = width;
    torch::manual_seed(3);
    DeepLabV3Plus model(o);
    model.module().train();
    for (auto& p : model.module().parameters()) {
      if (p.dim() == 4) p.set_data(p.data().contiguous(torch::MemoryFormat::ChannelsLast));
    }
    const torch::Tensor x = torch::randn({1, 16, 64, 96}).contiguous(torch::MemoryFormat::ChannelsLast);
    g_not_nhwc.clear();
    g_convolutions = 0;
    const at::CallbackHandle handle =
        at::addThreadLocalCallback(at::RecordFunctionCallback(note_layout).needsInputs(true));
    const torch::Tensor y = model.forward(x);
    // An NHWC gradient, as the loss gives (a sum's would be one value broadcast).
    (y * torch::randn(y.sizes()).contiguous(torch::MemoryFormat::ChannelsLast)).sum().backward();
    at::removeCallback(handle);
    CHECK(y.is_contiguous(torch::MemoryFormat::ChannelsLast));
    CHECK(g_convolutions > 2 * 40);  // every convolution, forward and backward (over 40 of them)
    CHECK_MESSAGE(g_not_nhwc.empty(), fmt::format("{}", fmt::join(g_not_nhwc, "; ")));
  }
}

TEST_CASE("options come from the [model] table and the data's shape") {
  const deepcam::ModelContext context{4, 2, 0, 1};
  const auto params = [](double width, std::int64_t blocks, std::int64_t os) {
    return deepcam::Params("run.toml [model]", {{"width", deepcam::ParamValue(width)},
                                                {"middle_blocks", deepcam::ParamValue(blocks)},
                                                {"output_stride", deepcam::ParamValue(os)}});
  };
  const DeepLabV3PlusOptions o = DeepLabV3PlusOptions::from(params(0.5, 3, 8), context);
  CHECK(o.in_channels == 4);
  CHECK(o.n_classes == 2);
  CHECK(o.width == 0.5);
  CHECK(o.middle_blocks == 3);
  CHECK(o.output_stride == 8);

  CHECK_THROWS_WITH_AS(DeepLabV3PlusOptions::from(params(0.0, 16, 16), context),
                       doctest::Contains("run.toml [model] width = 0"), deepcam::Error);
  CHECK_THROWS_WITH_AS(DeepLabV3PlusOptions::from(params(1.0, 16, 12), context),
                       doctest::Contains("output_stride = 12"), deepcam::Error);
  CHECK_THROWS_WITH_AS(DeepLabV3PlusOptions::from(params(1.0, 17, 16), context),
                       doctest::Contains("middle_blocks = 17"), deepcam::Error);
}
