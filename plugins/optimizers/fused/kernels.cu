// The fused Adam/AdamW and LAMB kernels over launch tables (multi_tensor.hpp).
// One thread block per chunk of kChunk elements; per-step values come from
// device memory; every reduction runs in a fixed order (per-chunk partials,
// then a sequential sum per tensor) so that two runs give the same bits.
#include <cuda_runtime.h>

#include <cmath>

#include "multi_tensor.hpp"

namespace deepcam::fused {
namespace {

// The sum of `value` over the block, valid in thread 0. Warp shuffles, then
// the warps' sums in warp order: the order is fixed by the block size alone.
template <typename T>
__device__ T block_sum(T value) {
  __shared__ T warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  T total = T(0);
  if (warp == 0) {
    total = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : T(0);
    for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_down_sync(0xffffffffu, total, offset);
  }
  return total;
}

struct Span {
  int tensor;
  std::int64_t begin;
  std::int64_t end;
};

__device__ Span block_span(const TensorTable& table) {
  const int tensor = table.block_tensor[blockIdx.x];
  const std::int64_t begin = static_cast<std::int64_t>(table.block_chunk[blockIdx.x]) * kChunk;
  const std::int64_t end = min(begin + kChunk, table.numel[tensor]);
  return {tensor, begin, end};
}

__global__ void adam_count_steps(const __grid_constant__ TensorTable table) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < table.tensors && table.first_chunk[i] == 0) *table.step[i] += 1.0f;
}

// The element-wise part in the operation order of PyTorch's single-tensor
// Adam (the CPU path), with its scalar factors computed in double.
__global__ void adam_update(const __grid_constant__ TensorTable table, AdamHyper hyper, const double* lr_ptr) {
  const Span span = block_span(table);
  const double lr = *lr_ptr;
  const double step = *table.step[span.tensor];
  const double step_size = lr / (1.0 - pow(hyper.beta1, step));
  const float bias_correction2_sqrt = static_cast<float>(sqrt(1.0 - pow(hyper.beta2, step)));
  const float neg_step_size = static_cast<float>(-step_size);
  const float decay = static_cast<float>(hyper.decoupled ? 1.0 - lr * hyper.weight_decay : hyper.weight_decay);
  const bool has_decay = hyper.weight_decay != 0.0;
  // at::lerp's form for weights below one half, which 1 - beta1 is in practice.
  const float weight = static_cast<float>(1.0 - hyper.beta1);
  const float beta2 = static_cast<float>(hyper.beta2);
  const float one_minus_beta2 = static_cast<float>(1.0 - hyper.beta2);
  const float eps = static_cast<float>(hyper.eps);

  float* param = table.param[span.tensor];
  const float* grad = table.grad[span.tensor];
  float* exp_avg = table.exp_avg[span.tensor];
  float* exp_avg_sq = table.exp_avg_sq[span.tensor];
  for (std::int64_t i = span.begin + threadIdx.x; i < span.end; i += blockDim.x) {
    float p = param[i];
    float g = grad[i];
    if (has_decay) {
      if (hyper.decoupled) {
        p = p * decay;
      } else {
        g = g + decay * p;
      }
    }
    float m = exp_avg[i];
    m = weight < 0.5f ? m + weight * (g - m) : g - (g - m) * (1.0f - weight);
    const float v = exp_avg_sq[i] * beta2 + one_minus_beta2 * g * g;
    const float denom = sqrtf(v) / bias_correction2_sqrt + eps;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    param[i] = p + neg_step_size * (m / denom);
  }
}

__global__ void lamb_grad_squares(const __grid_constant__ TensorTable table, double* partials) {
  const Span span = block_span(table);
  const float* grad = table.grad[span.tensor];
  // As the CPU path's norm (and APEX's): each square in float32, summed in
  // float64. A square beyond float32's range is inf on both paths (the clip
  // factor then zeroes every gradient); a float32 sum would also overflow
  // for squares that the CPU path sums finitely.
  double sum = 0.0;
  for (std::int64_t i = span.begin + threadIdx.x; i < span.end; i += blockDim.x) {
    const float g = grad[i];
    sum += static_cast<double>(g * g);
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partials[table.chunk_base[span.tensor] + table.block_chunk[blockIdx.x]] = sum;
}

__global__ void lamb_finalize(const double* partials, std::int32_t chunks, LambScalars* scalars) {
  double sum = 0.0;
  for (std::int32_t i = threadIdx.x; i < chunks; i += blockDim.x) sum += partials[i];
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    scalars->grad_norm = sqrt(sum);
    scalars->step += 1.0;
  }
}

// The per-step factors of SPEC 5.3, as APEX computes them (float).
struct LambFactors {
  float clip;
  float beta1, beta3, beta2, one_minus_beta2;
  float bias_correction1, bias_correction2;
  float eps, decay;
};

__device__ LambFactors lamb_factors(const LambHyper& hyper, const LambScalars& scalars) {
  LambFactors f;
  const double norm = scalars.grad_norm;
  // As the CPU path's clamp_min: a NaN norm gives a NaN factor (every
  // parameter NaN, as on the CPU), not 1.
  f.clip = !(norm <= hyper.max_grad_norm) ? static_cast<float>(norm / hyper.max_grad_norm) : 1.0f;
  f.beta1 = static_cast<float>(hyper.beta1);
  f.beta3 = static_cast<float>(1.0 - hyper.beta1);  // grad_averaging
  f.beta2 = static_cast<float>(hyper.beta2);
  f.one_minus_beta2 = static_cast<float>(1.0 - hyper.beta2);
  f.bias_correction1 = static_cast<float>(1.0 - pow(hyper.beta1, scalars.step));
  f.bias_correction2 = static_cast<float>(1.0 - pow(hyper.beta2, scalars.step));
  f.eps = static_cast<float>(hyper.eps);
  f.decay = static_cast<float>(hyper.weight_decay);
  return f;
}

__device__ __forceinline__ float lamb_direction(const LambFactors& f, float m, float v, float p) {
  return (m / f.bias_correction1) / (sqrtf(v / f.bias_correction2) + f.eps) + f.decay * p;
}

__global__ void lamb_moments(const __grid_constant__ TensorTable table, LambHyper hyper,
                             const LambScalars* scalars, float* update_partials, float* param_partials) {
  const Span span = block_span(table);
  const LambFactors f = lamb_factors(hyper, *scalars);
  float* param = table.param[span.tensor];
  const float* grad = table.grad[span.tensor];
  float* exp_avg = table.exp_avg[span.tensor];
  float* exp_avg_sq = table.exp_avg_sq[span.tensor];
  float update_sum = 0.0f;
  float param_sum = 0.0f;
  for (std::int64_t i = span.begin + threadIdx.x; i < span.end; i += blockDim.x) {
    const float g = grad[i] / f.clip;
    const float p = param[i];
    const float m = f.beta1 * exp_avg[i] + f.beta3 * g;
    const float v = f.beta2 * exp_avg_sq[i] + f.one_minus_beta2 * g * g;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    const float u = lamb_direction(f, m, v, p);
    update_sum += u * u;
    param_sum += p * p;
  }
  update_sum = block_sum(update_sum);
  __syncthreads();  // block_sum's shared buffer is reused
  param_sum = block_sum(param_sum);
  if (threadIdx.x == 0) {
    const std::int32_t slot = table.chunk_base[span.tensor] + table.block_chunk[blockIdx.x];
    update_partials[slot] = update_sum;
    param_partials[slot] = param_sum;
  }
}

__global__ void lamb_apply(const __grid_constant__ TensorTable table, LambHyper hyper, const LambScalars* scalars,
                           const float* update_partials, const float* param_partials) {
  const Span span = block_span(table);
  const LambFactors f = lamb_factors(hyper, *scalars);
  __shared__ float ratio;
  if (threadIdx.x == 0) {
    // Every block of the tensor sums the same partials in the same order, so
    // all of them use the same ratio.
    const std::int32_t base = table.chunk_base[span.tensor];
    const std::int32_t count = static_cast<std::int32_t>((table.numel[span.tensor] + kChunk - 1) / kChunk);
    double update_sq = 0.0;
    double param_sq = 0.0;
    for (std::int32_t c = 0; c < count; ++c) {
      update_sq += update_partials[base + c];
      param_sq += param_partials[base + c];
    }
    const double update_norm = sqrt(update_sq);
    const double param_norm = sqrt(param_sq);
    const double lr = scalars->lr;
    ratio = static_cast<float>(hyper.weight_decay != 0.0 && update_norm != 0.0 && param_norm != 0.0
                                   ? lr * (param_norm / update_norm)
                                   : lr);
  }
  __syncthreads();
  float* param = table.param[span.tensor];
  const float* exp_avg = table.exp_avg[span.tensor];
  const float* exp_avg_sq = table.exp_avg_sq[span.tensor];
  for (std::int64_t i = span.begin + threadIdx.x; i < span.end; i += blockDim.x) {
    const float p = param[i];
    param[i] = p - ratio * lamb_direction(f, exp_avg[i], exp_avg_sq[i], p);
  }
}

const char* status() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace

const char* launch_adam(const TensorTable& table, const AdamHyper& hyper, const double* lr, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (table.tensors > 0) adam_count_steps<<<(table.tensors + 127) / 128, 128, 0, s>>>(table);
  if (table.blocks > 0) adam_update<<<table.blocks, kThreads, 0, s>>>(table, hyper, lr);
  return status();
}

const char* launch_lamb_grad_norm(const TensorTable& table, double* grad_partials, void* stream) {
  if (table.blocks > 0) {
    lamb_grad_squares<<<table.blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(table, grad_partials);
  }
  return status();
}

const char* launch_lamb_finalize(const double* grad_partials, std::int32_t chunks, LambScalars* scalars,
                                 void* stream) {
  lamb_finalize<<<1, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(grad_partials, chunks, scalars);
  return status();
}

const char* launch_lamb_moments(const TensorTable& table, const LambHyper& hyper, const LambScalars* scalars,
                                float* update_partials, float* param_partials, void* stream) {
  if (table.blocks > 0) {
    lamb_moments<<<table.blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        table, hyper, scalars, update_partials, param_partials);
  }
  return status();
}

const char* launch_lamb_apply(const TensorTable& table, const LambHyper& hyper, const LambScalars* scalars,
                              const float* update_partials, const float* param_partials, void* stream) {
  if (table.blocks > 0) {
    lamb_apply<<<table.blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        table, hyper, scalars, update_partials, param_partials);
  }
  return status();
}

}  // namespace deepcam::fused
