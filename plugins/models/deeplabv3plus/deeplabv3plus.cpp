// DeepLabv3+ / aligned Xception (SPEC section 3). The module tree mirrors the
// reference's so that state-dict names carry over unchanged: BatchNorms sit
// one level down as `<name>.bn`, and ReLUs keep their Sequential slots even
// though they hold no state, because the slots number the names after them.
#include "deeplabv3plus.hpp"

#include <torch/nn/init.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/pooling.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "deepcam/error.hpp"
#include "deepcam/sync_batch_norm.hpp"

namespace deepcam::models {

namespace {

namespace nn = torch::nn;

// The reference wraps every BatchNorm2d in a module (to swap in SyncBatchNorm),
// which puts `.bn` into every checkpoint name. Here too the wrapper is where
// the synchronous form comes in: with a group, training-mode batches are
// normalised with the group's statistics.
struct WrappedBatchNormImpl : nn::Module {
  explicit WrappedBatchNormImpl(std::int64_t channels)
      : bn(register_module("bn", nn::BatchNorm2d(channels))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    if (!group || !is_training()) return bn->forward(x);
    const auto& o = bn->options;
    bn->num_batches_tracked.add_(1);
    return sync_batch_norm(x, bn->weight, bn->bias, bn->running_mean, bn->running_var, o.momentum().value(),
                           o.eps(), *group);
  }
  nn::BatchNorm2d bn;
  Group* group = nullptr;  // set on the whole tree by DeepLabV3Plus
};
TORCH_MODULE(WrappedBatchNorm);

// 3x3 depthwise (padding = dilation keeps the size at stride 1) then 1x1.
struct SeparableConvImpl : nn::Module {
  SeparableConvImpl(std::int64_t in, std::int64_t out, std::int64_t stride, std::int64_t dilation)
      : conv1(register_module("conv1", nn::Conv2d(nn::Conv2dOptions(in, in, 3)
                                                      .stride(stride)
                                                      .padding(dilation)
                                                      .dilation(dilation)
                                                      .groups(in)
                                                      .bias(false)))),
        pointwise(register_module("pointwise", nn::Conv2d(nn::Conv2dOptions(in, out, 1).bias(false)))) {}
  torch::Tensor forward(const torch::Tensor& x) { return pointwise->forward(conv1->forward(x)); }
  nn::Conv2d conv1;
  nn::Conv2d pointwise;
};
TORCH_MODULE(SeparableConv);

nn::ReLU relu(bool inplace) { return nn::ReLU(nn::ReLUOptions().inplace(inplace)); }

struct BlockSpec {
  std::int64_t in, out, reps, stride, dilation;
  bool end_relu, grow_first, is_last;
};

// SPEC 3.2.
struct BlockImpl : nn::Module {
  explicit BlockImpl(const BlockSpec& s) : end_relu(s.end_relu) {
    if (s.out != s.in || s.stride != 1) {
      skip = register_module("skip", nn::Conv2d(nn::Conv2dOptions(s.in, s.out, 1).stride(s.stride).bias(false)));
      skipbn = register_module("skipbn", WrappedBatchNorm(s.out));
    }
    auto add_triple = [&](std::int64_t a, std::int64_t b) {
      rep->push_back(SeparableConv(a, b, 1, s.dilation));
      rep->push_back(WrappedBatchNorm(b));
      rep->push_back(relu(true));
    };
    std::vector<std::pair<std::int64_t, std::int64_t>> triples;
    if (s.grow_first) {
      triples.emplace_back(s.in, s.out);
      for (std::int64_t i = 1; i < s.reps; ++i) triples.emplace_back(s.out, s.out);
    } else {
      for (std::int64_t i = 1; i < s.reps; ++i) triples.emplace_back(s.in, s.in);
      triples.emplace_back(s.in, s.out);
    }
    for (std::size_t i = 0; i < triples.size(); ++i) {
      if (i + 1 < triples.size()) {
        add_triple(triples[i].first, triples[i].second);
      } else {  // the list's last ReLU is dropped
        rep->push_back(SeparableConv(triples[i].first, triples[i].second, 1, s.dilation));
        rep->push_back(WrappedBatchNorm(triples[i].second));
      }
    }
    if (s.stride != 1) {
      rep->push_back(SeparableConv(s.out, s.out, s.stride, 1));
    } else if (s.is_last) {
      rep->push_back(SeparableConv(s.out, s.out, 1, 1));
    }
    register_module("rep", rep);
  }

  torch::Tensor forward(const torch::Tensor& input) {
    torch::Tensor x = rep->forward(input);
    // In place, as the reference: neither the last conv nor the BN of `rep`
    // needs its own output for the backward pass.
    if (skip) {
      x.add_(skipbn->forward(skip_conv(input)));
    } else {
      x.add_(input);
    }
    if (end_relu) x.relu_();
    return x;
  }

  // The 1x1 skip convolution. On the CPU in channels_last, a strided one is
  // taken as the same 1x1 convolution of every stride-th pixel (each output
  // pixel is the same sum): LibTorch 2.11's oneDNN strides such a
  // convolution itself, and its AVX-512 backward pass then writes past its
  // buffers for some inputs of fewer than 16 channels, as block1's 8 at
  // width 0.125 (a SIGSEGV or a corrupt heap; PyTorch crashes there too).
  torch::Tensor skip_conv(const torch::Tensor& input) {
    const std::int64_t stride = skip->options.stride()->at(0);
    if (stride == 1 || !input.is_cpu() || input.suggest_memory_format() != torch::MemoryFormat::ChannelsLast) {
      return skip->forward(input);
    }
    using torch::indexing::None;
    using torch::indexing::Slice;
    const torch::Tensor pixels = input.index({Slice(), Slice(), Slice(None, None, stride), Slice(None, None, stride)})
                                     .contiguous(torch::MemoryFormat::ChannelsLast);
    return torch::conv2d(pixels, skip->weight);
  }

  bool end_relu;
  nn::Conv2d skip{nullptr};
  WrappedBatchNorm skipbn{nullptr};
  nn::Sequential rep;
};
TORCH_MODULE(Block);

// SPEC 3.1 and 3.3; returns (features, low-level features).
struct XceptionImpl : nn::Module {
  XceptionImpl(const DeepLabV3PlusOptions& o, const std::function<std::int64_t(std::int64_t)>& c) {
    const bool os8 = o.output_stride == 8;
    const std::int64_t block3_stride = os8 ? 1 : 2;
    const std::int64_t middle_rate = os8 ? 2 : 1;
    const std::int64_t exit_rate0 = os8 ? 2 : 1;
    const std::int64_t exit_rate1 = os8 ? 4 : 2;

    conv1 = register_module("conv1", nn::Conv2d(nn::Conv2dOptions(o.in_channels, c(32), 3).stride(2).padding(1).bias(false)));
    bn1 = register_module("bn1", WrappedBatchNorm(c(32)));
    conv2 = register_module("conv2", nn::Conv2d(nn::Conv2dOptions(c(32), c(64), 3).stride(1).padding(1).bias(false)));
    bn2 = register_module("bn2", WrappedBatchNorm(c(64)));

    std::vector<BlockSpec> specs = {
        {c(64), c(128), 2, 2, 1, false, true, false},
        {c(128), c(256), 2, 2, 1, true, true, false},
        {c(256), c(728), 2, block3_stride, 1, true, true, true},
    };
    for (std::int64_t i = 0; i < o.middle_blocks; ++i) {
      specs.push_back({c(728), c(728), 3, 1, middle_rate, true, true, false});
    }
    specs.push_back({c(728), c(1024), 2, 1, exit_rate0, false, false, true});
    for (std::size_t i = 0; i < specs.size(); ++i) {
      blocks.push_back(register_module("block" + std::to_string(i + 1), Block(specs[i])));
    }

    conv3 = register_module("conv3", SeparableConv(c(1024), c(1536), 1, exit_rate1));
    bn3 = register_module("bn3", WrappedBatchNorm(c(1536)));
    conv4 = register_module("conv4", SeparableConv(c(1536), c(1536), 1, exit_rate1));
    bn4 = register_module("bn4", WrappedBatchNorm(c(1536)));
    conv5 = register_module("conv5", SeparableConv(c(1536), c(2048), 1, exit_rate1));
    bn5 = register_module("bn5", WrappedBatchNorm(c(2048)));
  }

  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& input) {
    torch::Tensor x = bn1->forward(conv1->forward(input)).relu_();
    x = bn2->forward(conv2->forward(x)).relu_();
    // The reference keeps block1's output and then applies the ReLU in place,
    // so the low-level features are the activated tensor.
    x = blocks[0]->forward(x).relu_();
    const torch::Tensor low_level = x;
    for (std::size_t i = 1; i < blocks.size(); ++i) x = blocks[i]->forward(x);
    x = bn3->forward(conv3->forward(x)).relu_();
    x = bn4->forward(conv4->forward(x)).relu_();
    x = bn5->forward(conv5->forward(x)).relu_();
    return {x, low_level};
  }

  nn::Conv2d conv1{nullptr}, conv2{nullptr};
  WrappedBatchNorm bn1{nullptr}, bn2{nullptr}, bn3{nullptr}, bn4{nullptr}, bn5{nullptr};
  std::vector<Block> blocks;
  SeparableConv conv3{nullptr}, conv4{nullptr}, conv5{nullptr};
};
TORCH_MODULE(Xception);

// One ASPP rate branch: 1x1 at rate 1, else 3x3 with padding = dilation = rate.
struct AsppBranchImpl : nn::Module {
  AsppBranchImpl(std::int64_t in, std::int64_t out, std::int64_t rate) {
    const std::int64_t kernel = rate == 1 ? 1 : 3;
    const std::int64_t padding = rate == 1 ? 0 : rate;
    atrous_convolution = register_module(
        "atrous_convolution",
        nn::Conv2d(nn::Conv2dOptions(in, out, kernel).padding(padding).dilation(rate).bias(false)));
    bn = register_module("bn", WrappedBatchNorm(out));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::relu(bn->forward(atrous_convolution->forward(x)));
  }
  nn::Conv2d atrous_convolution{nullptr};
  WrappedBatchNorm bn{nullptr};
};
TORCH_MODULE(AsppBranch);

// Per-channel scale and shift, the image-pooling branch's stand-in for a BN
// (a BN cannot normalise a 1x1 map of batch size 1).
struct TrainableAffineImpl : nn::Module {
  explicit TrainableAffineImpl(std::int64_t channels)
      : weights(register_parameter("weights", torch::ones({channels, 1, 1}))),
        bias(register_parameter("bias", torch::zeros({channels, 1, 1}))) {}
  torch::Tensor forward(const torch::Tensor& x) { return weights * x + bias; }
  torch::Tensor weights, bias;
};
TORCH_MODULE(TrainableAffine);

struct GlobalAveragePoolImpl : nn::Module {
  GlobalAveragePoolImpl(std::int64_t in, std::int64_t out) {
    global_average_pool->push_back(nn::AdaptiveAvgPool2d(nn::AdaptiveAvgPool2dOptions(1)));
    global_average_pool->push_back(nn::Conv2d(nn::Conv2dOptions(in, out, 1).bias(false)));
    global_average_pool->push_back(TrainableAffine(out));
    global_average_pool->push_back(relu(false));
    register_module("global_average_pool", global_average_pool);
  }
  torch::Tensor forward(const torch::Tensor& x) { return global_average_pool->forward(x); }
  nn::Sequential global_average_pool;
};
TORCH_MODULE(GlobalAveragePool);

// SPEC 3.4.
struct BottleneckImpl : nn::Module {
  BottleneckImpl(std::int64_t in, std::int64_t out, std::int64_t output_stride) {
    const std::int64_t k = output_stride == 8 ? 2 : 1;
    const std::int64_t rates[4] = {1, 6 * k, 12 * k, 18 * k};
    for (int i = 0; i < 4; ++i) {
      aspp.push_back(register_module("aspp" + std::to_string(i + 1), AsppBranch(in, out, rates[i])));
    }
    global_avg_pool = register_module("global_avg_pool", GlobalAveragePool(in, out));
    conv = register_module("conv", nn::Conv2d(nn::Conv2dOptions(5 * out, out, 1).bias(false)));
    bn = register_module("bn", WrappedBatchNorm(out));
  }

  torch::Tensor forward(const torch::Tensor& x) {
    std::vector<torch::Tensor> parts;
    parts.reserve(5);
    for (auto& branch : aspp) parts.push_back(branch->forward(x));
    // Follows the feature map's size; the reference tiles to a fixed 48x72.
    // Laid out as the feature map: an expanded (stride 0) part would make
    // the concatenation NCHW, which in channels_last the projection would
    // convert back (a copy each way in every step).
    parts.push_back(global_avg_pool->forward(x)
                        .expand({-1, -1, x.size(2), x.size(3)})
                        .contiguous(x.suggest_memory_format()));
    return torch::relu(bn->forward(conv->forward(torch::cat(parts, 1))));
  }

  std::vector<AsppBranch> aspp;
  GlobalAveragePool global_avg_pool{nullptr};
  nn::Conv2d conv{nullptr};
  WrappedBatchNorm bn{nullptr};
};
TORCH_MODULE(Bottleneck);

nn::ConvTranspose2d deconv(std::int64_t in, std::int64_t out, std::int64_t stride) {
  return nn::ConvTranspose2d(nn::ConvTranspose2dOptions(in, out, 3)
                                 .stride(stride)
                                 .padding(1)
                                 .output_padding(stride - 1)
                                 .bias(false));
}

// SPEC 3.5, the part after the low-level path.
struct DecoderImpl : nn::Module {
  DecoderImpl(std::int64_t c256, std::int64_t c48, std::int64_t n_classes, std::int64_t output_stride) {
    // At output stride 8 the ASPP output is at H/8 while the low-level map is
    // at H/4, so deconv1 may only double once: its second transposed conv
    // keeps the size (stride 1, output_padding 0). Kernel and channels, hence
    // names and shapes, stay as at stride 16.
    const std::int64_t second_stride = output_stride == 8 ? 1 : 2;
    deconv1->push_back(deconv(c256, c256, 2));
    deconv1->push_back(WrappedBatchNorm(c256));
    deconv1->push_back(relu(false));
    deconv1->push_back(deconv(c256, c256, second_stride));
    deconv1->push_back(WrappedBatchNorm(c256));
    deconv1->push_back(relu(false));

    conv1->push_back(nn::Conv2d(nn::Conv2dOptions(c256 + c48, c256, 3).padding(1).bias(false)));
    conv1->push_back(WrappedBatchNorm(c256));
    conv1->push_back(relu(false));
    conv1->push_back(nn::Conv2d(nn::Conv2dOptions(c256, c256, 3).padding(1).bias(false)));
    conv1->push_back(WrappedBatchNorm(c256));
    conv1->push_back(relu(false));
    conv1->push_back(nn::Conv2d(nn::Conv2dOptions(c256, c256, 1).bias(true)));

    deconv2->push_back(deconv(c256, c256, 2));
    deconv2->push_back(WrappedBatchNorm(c256));
    deconv2->push_back(relu(false));

    last_deconv->push_back(deconv(c256, n_classes, 2));

    register_module("deconv1", deconv1);
    register_module("conv1", conv1);
    register_module("deconv2", deconv2);
    register_module("last_deconv", last_deconv);
  }

  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& low_level) {
    torch::Tensor y = torch::cat({deconv1->forward(x), low_level}, 1);
    y = conv1->forward(y);
    y = deconv2->forward(y);
    return last_deconv->forward(y);
  }

  nn::Sequential deconv1, conv1, deconv2, last_deconv;
};
TORCH_MODULE(Decoder);

// Kaiming normal, fan_in, gain sqrt(2), on every conv below `root` (SPEC 3.6).
void kaiming_init_convs(nn::Module& root) {
  torch::NoGradGuard no_grad;
  for (const auto& m : root.modules(/*include_self=*/true)) {
    if (auto* conv = m->as<nn::Conv2d>()) {
      nn::init::kaiming_normal_(conv->weight, 0.0, torch::kFanIn, torch::kReLU);
    }
  }
}

std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << '[';
  for (std::int64_t i = 0; i < t.dim(); ++i) s << (i ? ", " : "") << t.size(i);
  s << ']';
  return s.str();
}

}  // namespace

struct DeepLabV3Plus::Net : nn::Module {
  explicit Net(const DeepLabV3PlusOptions& o) {
    const auto c = [w = o.width](std::int64_t channels) {
      return std::max<std::int64_t>(1, std::llround(static_cast<double>(channels) * w));
    };
    xception_features = register_module("xception_features", Xception(o, c));
    bottleneck = register_module("bottleneck", Bottleneck(c(2048), c(256), o.output_stride));
    conv2 = register_module("conv2", nn::Conv2d(nn::Conv2dOptions(c(128), c(48), 1).bias(false)));
    bn2 = register_module("bn2", WrappedBatchNorm(c(48)));
    upsample = register_module("upsample", Decoder(c(256), c(48), o.n_classes, o.output_stride));

    kaiming_init_convs(*xception_features);
    for (auto& branch : bottleneck->aspp) kaiming_init_convs(*branch);
  }

  torch::Tensor forward(const torch::Tensor& input) {
    auto [x, low_level] = xception_features->forward(input);
    x = bottleneck->forward(x);
    low_level = torch::relu(bn2->forward(conv2->forward(low_level)));
    return upsample->forward(x, low_level);
  }

  Xception xception_features{nullptr};
  Bottleneck bottleneck{nullptr};
  nn::Conv2d conv2{nullptr};
  WrappedBatchNorm bn2{nullptr};
  Decoder upsample{nullptr};
};

DeepLabV3PlusOptions DeepLabV3PlusOptions::from(const Params& params, const ModelContext& context) {
  DeepLabV3PlusOptions o;
  o.in_channels = context.in_channels;
  o.n_classes = context.n_classes;
  o.width = params.number("width");
  o.middle_blocks = params.integer("middle_blocks");
  o.output_stride = params.integer("output_stride");
  o.batchnorm_group = context.batchnorm_group;
  const std::string& where = params.where();
  if (!(o.width > 0.0 && o.width <= 1.0)) {
    throw Error(params.setting("width") + ": must be in (0, 1] (a factor on every channel count)");
  }
  if (o.middle_blocks < 1 || o.middle_blocks > 16) {
    throw Error(params.setting("middle_blocks") + ": must be in 1..16");
  }
  if (o.output_stride != 8 && o.output_stride != 16) {
    throw Error(params.setting("output_stride") + ": must be 8 or 16");
  }
  if (o.in_channels < 1 || o.n_classes < 1) {
    throw Error(where + ": deeplabv3plus needs at least one input channel and one class (got " +
                std::to_string(o.in_channels) + " channels, " + std::to_string(o.n_classes) +
                " classes from the data)");
  }
  return o;
}

DeepLabV3Plus::DeepLabV3Plus(const DeepLabV3PlusOptions& options)
    : options_(options), net_(std::make_shared<Net>(options)) {
  for (const auto& m : net_->modules(/*include_self=*/false)) {
    if (auto* bn = m->as<WrappedBatchNormImpl>()) bn->group = options.batchnorm_group;
  }
}

DeepLabV3Plus::~DeepLabV3Plus() = default;

torch::nn::Module& DeepLabV3Plus::module() { return *net_; }

at::Tensor DeepLabV3Plus::forward(const at::Tensor& input) {
  const std::int64_t os = options_.output_stride;
  if (input.dim() != 4 || input.size(1) != options_.in_channels || input.size(2) % os != 0 ||
      input.size(3) % os != 0 || input.size(2) == 0 || input.size(3) == 0) {
    throw Error("deeplabv3plus: input of shape " + shape_of(input) + " refused: expected (B, " +
                std::to_string(options_.in_channels) + ", H, W) with H and W positive multiples of " +
                std::to_string(os) + " (the output stride)");
  }
  // At the encoder's output each BatchNorm normalises B x (H / os) x (W /
  // os) values per channel; in training one alone cannot be normalised (as
  // in PyTorch, which refuses it). A BatchNorm group adds the other ranks'.
  if (net_->is_training() && !options_.batchnorm_group &&
      input.size(0) * (input.size(2) / os) * (input.size(3) / os) == 1) {
    throw Error("deeplabv3plus: a training batch of one sample of " + std::to_string(input.size(2)) + " x " +
                std::to_string(input.size(3)) + " pixels leaves one value per channel at output stride " +
                std::to_string(os) + ", and BatchNorm needs more than one in training; use a batch of 2 or more, "
                "or larger samples");
  }
  return net_->forward(input);
}

}  // namespace deepcam::models
