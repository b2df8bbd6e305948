// The interface between the optimizers' C++ side and their CUDA kernels:
// plain structs of raw pointers and sizes, and launchers, so that neither
// nvcc sees LibTorch nor the optimizers see CUDA headers.
//
// One launch covers up to kMaxTensors tensors, cut into chunks of kChunk
// elements, one thread block per chunk; the table travels by value as the
// kernel argument (CUDA 12.1+ takes up to 32 KiB of arguments on Volta and
// newer), so the 301 tensors of DeepCAM's DeepLabv3+ need one launch per
// kernel and nothing is copied to the device beforehand. Every per-step value
// that changes (lr, the step count, LAMB's gradient norm) is read from device
// memory, never from the host, so a step needs no synchronisation and could
// be captured in a CUDA graph.
#pragma once

#include <cstdint>
#include <vector>

namespace deepcam::fused {

constexpr int kMaxTensors = 320;
constexpr int kMaxBlocks = 1536;
constexpr std::int64_t kChunk = 65536;
constexpr int kThreads = 512;

// One launch's share of the tensors. block_tensor/block_chunk map each thread
// block to (entry, chunk); chunk_base gives each entry's first slot in the
// per-chunk partial-sum buffers (LAMB's norms), so that every sum is taken
// in a fixed order and the result does not depend on block scheduling.
struct TensorTable {
  float* param[kMaxTensors];
  const float* grad[kMaxTensors];
  float* exp_avg[kMaxTensors];
  float* exp_avg_sq[kMaxTensors];
  float* step[kMaxTensors];  // Adam: the tensor's own float32 step count
  std::int64_t numel[kMaxTensors];
  std::int32_t chunk_base[kMaxTensors];
  // The entry's first chunk in this table: a tensor too large for the rest
  // of one table continues in the next, and only the table holding its
  // chunk 0 counts its Adam step.
  std::int32_t first_chunk[kMaxTensors];
  std::uint16_t block_tensor[kMaxBlocks];
  std::int32_t block_chunk[kMaxBlocks];
  std::int32_t tensors;
  std::int32_t blocks;
};

// In double, as PyTorch computes its scalar factors from Python floats.
struct AdamHyper {
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool decoupled;  // AdamW: p *= 1 - lr * wd; Adam: g += wd * p
};

struct LambHyper {
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  double max_grad_norm;
};

// LAMB's per-step scalars, one small device buffer: lr is written by the
// host (an asynchronous fill), step and grad_norm by the kernels.
struct LambScalars {
  double lr;
  double step;
  double grad_norm;
};

// What the C++ side knows of one tensor; make_tables cuts a list of them
// into launch tables. `step` may be null (LAMB keeps one count per group).
struct Entry {
  float* param;
  const float* grad;
  float* exp_avg;
  float* exp_avg_sq;
  float* step;
  std::int64_t numel;
};

// The tables for one step, in entry order. Chunk partial-sum slots are
// numbered across all tables; *chunks receives their total.
std::vector<TensorTable> make_tables(const std::vector<Entry>& entries, std::int32_t* chunks);

// The launchers (kernels.cu, built only with CUDA). Each returns nullptr on
// success, else the CUDA error's text; `stream` is a cudaStream_t.

// Adam/AdamW over one table: the entries' steps are incremented, then the
// update uses them. `lr` points to one double on the device.
const char* launch_adam(const TensorTable& table, const AdamHyper& hyper, const double* lr,
                        void* stream);

// LAMB in four passes, each over every table before the next pass starts:
// 1. per-chunk sums of g^2 into grad_partials (float64);
const char* launch_lamb_grad_norm(const TensorTable& table, double* grad_partials, void* stream);
// 2. once: G from all `chunks` partials into scalars->grad_norm, step += 1;
const char* launch_lamb_finalize(const double* grad_partials, std::int32_t chunks, LambScalars* scalars,
                                 void* stream);
// 3. the moments from the clipped gradient, and per-chunk sums of ||u||^2
//    and ||p||^2;
const char* launch_lamb_moments(const TensorTable& table, const LambHyper& hyper,
                                const LambScalars* scalars, float* update_partials,
                                float* param_partials, void* stream);
// 4. the trust-ratio update, u recomputed from the new moments (cheaper in
//    memory than keeping u, and the gradients stay untouched).
const char* launch_lamb_apply(const TensorTable& table, const LambHyper& hyper,
                              const LambScalars* scalars, const float* update_partials,
                              const float* param_partials, void* stream);

}  // namespace deepcam::fused
