#include "deepcam/sync_batch_norm.hpp"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <vector>

namespace deepcam {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Every dimension but the channels'.
std::vector<std::int64_t> reduced_dims(const at::Tensor& x) {
  std::vector<std::int64_t> dims{0};
  for (std::int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

// What the statistics are computed in: float32 for float16 and bfloat16
// inputs (autocast), as torch.nn.SyncBatchNorm keeps them; a group's count
// per channel (ranks x batch x H x W) is past float16's largest number.
at::ScalarType statistics_type(const at::Tensor& x) {
  return at::isReducedFloatingType(x.scalar_type()) ? at::kFloat : x.scalar_type();
}

// (C) -> (1, C, 1, ...) to broadcast over x.
at::Tensor per_channel(const at::Tensor& v, const at::Tensor& x) {
  std::vector<std::int64_t> shape(static_cast<std::size_t>(x.dim()), 1);
  shape[1] = v.size(0);
  return v.view(shape);
}

struct SyncBatchNormFunction : torch::autograd::Function<SyncBatchNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& bias, at::Tensor running_mean, at::Tensor running_var, double momentum,
                            double eps, Group* group) {
    const std::int64_t channels = input.size(1);
    const auto dims = reduced_dims(input);
    // This rank's count, mean and biased variance per channel; combined over
    // the group in float64 (Chan et al.: M2 = sum_r n_r (var_r + (mean_r - mean)^2)).
    // (A float32 copy of a float16 input: its own mean and variance would
    // keep three digits.)
    const auto [var_local, mean_local] =
        at::var_mean(input.to(statistics_type(input)), dims, /*correction=*/0, /*keepdim=*/false);
    const double count_local = static_cast<double>(input.numel() / channels);
    const at::Tensor stats =
        at::cat({mean_local.to(at::kDouble), var_local.to(at::kDouble),
                 at::full({1}, count_local, mean_local.options().dtype(at::kDouble))});
    const at::Tensor all = group->all_gather(stats);  // (G, 2C + 1)
    const at::Tensor counts = all.select(1, 2 * channels).unsqueeze(1);
    const at::Tensor means = all.narrow(1, 0, channels);
    const at::Tensor vars = all.narrow(1, channels, channels);
    const at::Tensor total = counts.sum();
    const at::Tensor mean = (means * counts).sum(0) / total;
    const at::Tensor var = ((vars + (means - mean).pow(2)) * counts).sum(0) / total;
    {
      at::NoGradGuard no_grad;
      const at::Tensor unbiased = var * total / (total - 1);
      running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.scalar_type()), momentum);
      running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.scalar_type()), momentum);
    }
    const at::ScalarType stats_type = statistics_type(input);
    const at::Tensor mean_x = mean.to(stats_type);
    const at::Tensor invstd = (var + eps).rsqrt().to(stats_type);
    const at::Tensor xhat = (input - per_channel(mean_x, input)) * per_channel(invstd, input);
    ctx->save_for_backward({input, weight, mean_x, invstd, total.to(stats_type)});
    ctx->saved_data["group"] = reinterpret_cast<std::int64_t>(group);
    // In the input's type, as at::batch_norm gives it.
    return (xhat * per_channel(weight, input) + per_channel(bias, input)).to(input.scalar_type());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& mean = saved[2];
    const at::Tensor& invstd = saved[3];
    const at::Tensor& total = saved[4];
    auto* group = reinterpret_cast<Group*>(ctx->saved_data["group"].toInt());
    const at::ScalarType stats_type = mean.scalar_type();
    // In the input's layout (NHWC under channels_last), as torch.nn.SyncBatchNorm
    // keeps it: the gradient then stays in the layout the convolutions use.
    const at::Tensor dy = grad_outputs[0].contiguous(input.suggest_memory_format()).to(stats_type);
    const auto dims = reduced_dims(input);
    const at::Tensor xmu = input - per_channel(mean, input);
    const at::Tensor sum_dy = dy.sum(dims);
    const at::Tensor sum_dy_xmu = (dy * xmu).sum(dims);
    // This rank's own, as in torch.nn.SyncBatchNorm: the gradient all-reduce
    // averages them over the ranks.
    const at::Tensor grad_weight = sum_dy_xmu * invstd;
    const at::Tensor grad_bias = sum_dy;
    at::Tensor sums = at::cat({sum_dy, sum_dy_xmu});
    group->all_reduce_sum(sums);
    const std::int64_t channels = input.size(1);
    const at::Tensor mean_dy = sums.narrow(0, 0, channels) / total;
    const at::Tensor mean_dy_xmu = sums.narrow(0, channels, channels) / total;
    const at::Tensor grad_input =
        (dy - per_channel(mean_dy, input) - xmu * per_channel(invstd * invstd * mean_dy_xmu, input)) *
        per_channel(invstd * weight, input);
    return {grad_input.to(input.scalar_type()), grad_weight, grad_bias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

at::Tensor sync_batch_norm(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                           at::Tensor running_mean, at::Tensor running_var, double momentum, double eps,
                           Group& group) {
  return SyncBatchNormFunction::apply(input, weight, bias, running_mean, running_var, momentum, eps, &group);
}

}  // namespace deepcam
