// A rank of a multi-process check of the data-parallel pieces, started by
// tests/integration/test_data_parallel.py with torchrun-style variables. Each
// rank computes its distributed result and, in the same process, what one
// process computes without communication from every rank's inputs (all
// inputs are drawn from fixed seeds, so each rank can make the others'),
// compares the two and exits 1 with the differences when they disagree.
//
//   data_parallel_probe syncbn
//       deepcam::sync_batch_norm over the world (2 ranks) against
//       at::batch_norm on the ranks' inputs concatenated: outputs, input
//       gradients, the summed weight/bias gradients, running statistics.
//   data_parallel_probe syncbn-half
//       The same on float16 inputs of more elements per channel over the
//       group than float16 holds (65504), as under autocast at full size.
//   data_parallel_probe syncbn-nhwc
//       The same on a channels_last input: the output and the input
//       gradient are channels_last too.
//   data_parallel_probe syncbn-pairs
//       The same over groups of 2 consecutive ranks (4 ranks: {0, 1} and
//       {2, 3}), batchnorm_group_size = 2, against each group's inputs.
//   data_parallel_probe gradients K
//       GradientAllReduce over 3 steps of the deeplabv3plus plugin (BatchNorm
//       per rank), K batches accumulated per step: each step's all-reduced
//       gradient against the mean of the gradients one process computes on
//       each rank's batches separately.
//   data_parallel_probe synced-gradients K
//       The same with BatchNorm synchronous over the 2 ranks: against the
//       gradient of one process on both ranks' batches concatenated, and
//       the running statistics after the 3 steps. SyncBN's statistics
//       (combined in float64) and at::batch_norm's differ in the last float32
//       digits, which the whole network's backward carries to about 1e-5 of
//       a gradient; steps of 0.05 reach weights where it grows to percents.
//       Hence a step of 0.005 and a tolerance of 1e-4: a wrong gradient is
//       off by far more.
//   data_parallel_probe bnstats
//       average_batchnorm_statistics: every rank ends with the mean of the
//       ranks' running statistics.
//   data_parallel_probe --device cuda graphed-gradients
//       The gradients check (K = 1) with the step (forward, loss, backward,
//       the bucketed all-reduce) captured in a CUDA graph as the engine's
//       [run] cuda_graphs captures it: three eager steps on the graph's side
//       stream, the captured one, two replays on new batches, each step's
//       gradient against one process's.
//
// With --device cuda first, tensors and models live on each rank's GPU
// (LOCAL_RANK) and the collectives go through NCCL. The probe asks for
// process groups also at world size 1 (CommOptions::group_of_one), so that
// a machine with one GPU, where NCCL refuses two ranks, still sends syncbn's
// and the gradients' collectives through ProcessGroupNCCL. Each rank prints
// the backend its collectives went through.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/nn/module.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "comm.hpp"
#include "data_parallel.hpp"
#include "deepcam/loss.hpp"
#include "deepcam/plugin.hpp"
#include "deepcam/plugin_loader.hpp"
#include "deepcam/sync_batch_norm.hpp"
#include "deepcam_build_config.h"
#include "process_end.hpp"
#include "ranks.hpp"
#if DEEPCAM_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>

#include "step_graph.hpp"
#endif

namespace {

constexpr double kTolerance = 1e-5;
int failures = 0;
at::Device device(at::kCPU);  // --device

// max |a - b| / max |b|, the "max relative difference" of the tests.
double rel_diff(const at::Tensor& a, const at::Tensor& b) {
  const double scale = b.abs().max().item<double>();
  return (a - b).abs().max().item<double>() / (scale > 0 ? scale : 1.0);
}

void expect_close(const std::string& what, const at::Tensor& got, const at::Tensor& want, int rank,
                  double tolerance = kTolerance) {
  const double d = rel_diff(got.to(at::kDouble), want.to(at::kDouble));
  if (!(d <= tolerance)) {
    std::printf("rank %d: %s differs: max relative difference %g > %g\n", rank, what.c_str(), d, tolerance);
    ++failures;
  }
}

at::Tensor seeded_randn(std::uint64_t seed, at::IntArrayRef shape) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, gen).to(device);
}

// The reference, at::batch_norm over the input of every rank of the group,
// runs in float32 on the float32 values of the inputs; `tolerance` allows
// for `dtype`. `group_size` 0: all ranks; else groups of that many
// consecutive ranks (SPEC 7), the group of rank r starting at r - r % size.
int syncbn(deepcam::Communicator& comm, at::ScalarType dtype, std::vector<std::int64_t> shape, double tolerance,
           int group_size = 0, at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  const int P = comm.size(), rank = comm.rank();
  const int G = group_size > 0 ? group_size : P, first = rank - rank % G;
  deepcam::Group& group = group_size > 0 ? comm.consecutive(group_size) : comm.world();
  const std::int64_t C = shape[1], N = shape[0];
  const at::Tensor weight = seeded_randn(7, {C}).requires_grad_();
  const at::Tensor bias = seeded_randn(8, {C}).requires_grad_();
  auto input_of = [&](int r) { return (seeded_randn(100 + r, shape) * (1.0 + r) + r).to(dtype).to(at::kFloat); };
  // Off zero, so that the input gradient's terms in the group's mean
  // gradient count.
  auto grad_of = [&](int r) { return (seeded_randn(200 + r, shape) + 2.0).to(dtype).to(at::kFloat); };

  at::Tensor x = input_of(rank).to(dtype).contiguous(format).requires_grad_();
  const auto on_device = at::TensorOptions(device);
  at::Tensor running_mean = at::zeros({C}, on_device), running_var = at::ones({C}, on_device);
  const at::Tensor y = deepcam::sync_batch_norm(x, weight, bias, running_mean, running_var, 0.1, 1e-5, group);
  if (y.scalar_type() != dtype) {
    std::printf("rank %d: the output is %s, the input %s\n", rank, c10::toString(y.scalar_type()),
                c10::toString(dtype));
    ++failures;
  }
  (y * grad_of(rank).to(dtype).contiguous(format)).sum().backward();
  // NHWC in, NHWC out, both ways, as the convolutions around it under channels_last.
  for (const auto& [what, t] : {std::pair{"output", y}, std::pair{"input gradient", x.grad()}}) {
    if (!t.is_contiguous(format)) {
      std::printf("rank %d: the %s is not in the input's memory format\n", rank, what);
      ++failures;
    }
  }
  at::Tensor summed_dw = weight.grad().clone(), summed_db = bias.grad().clone();
  group.all_reduce_sum(summed_dw);
  group.all_reduce_sum(summed_db);

  std::vector<at::Tensor> xs, gs;
  for (int r = first; r < first + G; ++r) {
    xs.push_back(input_of(r));
    gs.push_back(grad_of(r));
  }
  const at::Tensor x_all = at::cat(xs).requires_grad_();
  const at::Tensor w_ref = weight.detach().clone().requires_grad_(), b_ref = bias.detach().clone().requires_grad_();
  at::Tensor rm_ref = at::zeros({C}, on_device), rv_ref = at::ones({C}, on_device);
  const at::Tensor y_all = at::batch_norm(x_all, w_ref, b_ref, rm_ref, rv_ref, /*training=*/true, 0.1, 1e-5, false);
  (y_all * at::cat(gs)).sum().backward();
  expect_close("output", y, y_all.narrow(0, N * (rank - first), N), rank, tolerance);
  expect_close("input gradient", x.grad(), x_all.grad().narrow(0, N * (rank - first), N), rank, tolerance);
  expect_close("weight gradient summed over the group", summed_dw, w_ref.grad(), rank, tolerance);
  expect_close("bias gradient summed over the group", summed_db, b_ref.grad(), rank, tolerance);
  expect_close("running mean", running_mean, rm_ref, rank, tolerance);
  expect_close("running variance", running_var, rv_ref, rank, tolerance);
  return 0;
}

std::unique_ptr<deepcam::Model> make_model(deepcam::PluginLoader& loader, deepcam::Group* bn_group = nullptr) {
  const deepcam::LoadedPlugin& p = loader.load(deepcam::PluginKind::Model, "deeplabv3plus");
  const deepcam::Params params("probe [model]", {{"width", 0.0625},
                                                 {"middle_blocks", std::int64_t{1}},
                                                 {"output_stride", std::int64_t{16}}});
  at::manual_seed(5);
  deepcam::ModelContext context{16, 3, 0, 1};
  context.batchnorm_group = bn_group;
  auto model = p.descriptor->make_model(params, context);
  model->module().to(device);
  return model;
}

// The model under test and a twin with the same initial weights that one
// process trains without communication, both in training mode.
struct Twins {
  explicit Twins(deepcam::Group* bn_group = nullptr)
      : model(make_model(loader, bn_group)),
        reference(make_model(loader)),
        params(model->module().parameters()),
        ref_params(reference->module().parameters()) {
    model->module().train();
    reference->module().train();
  }
  // The same update on both, from the model's (all-reduced) gradient; in
  // place, as a CUDA graph's replays read the weights' memory.
  void descend(double lr = 0.05) {
    at::NoGradGuard no_grad;
    for (std::size_t i = 0; i < params.size(); ++i) {
      params[i].sub_(params[i].grad(), lr);
      ref_params[i].copy_(params[i]);
    }
  }

  deepcam::PluginLoader loader;  // first: it outlives the models
  std::unique_ptr<deepcam::Model> model, reference;
  std::vector<at::Tensor> params, ref_params;
};

struct Sample {
  at::Tensor data, labels;
};

Sample batch_of(int step, int micro, int rank) {
  const std::uint64_t seed = 1000 + 100 * static_cast<std::uint64_t>(step) + 10 * static_cast<std::uint64_t>(micro) +
                             static_cast<std::uint64_t>(rank);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return {at::randn({2, 16, 32, 48}, gen).to(device), at::randint(0, 3, {2, 32, 48}, gen).to(device)};
}

// One process, no communication: the mean over the P ranks of each rank's
// gradient on its own k batches of `step`.
std::vector<at::Tensor> mean_gradient(deepcam::Model& reference, std::vector<at::Tensor>& ref_params, int step, int k,
                                      int P) {
  std::vector<at::Tensor> mean(ref_params.size());
  for (int r = 0; r < P; ++r) {
    for (auto& p : ref_params) p.mutable_grad() = at::Tensor();
    for (int j = 0; j < k; ++j) {
      const Sample s = batch_of(step, j, r);
      (deepcam::weighted_cross_entropy(reference.forward(s.data), s.labels) / static_cast<double>(k)).backward();
    }
    for (std::size_t i = 0; i < ref_params.size(); ++i) {
      const at::Tensor g = ref_params[i].grad().to(at::kDouble) / P;
      mean[i] = r == 0 ? g : mean[i] + g;
    }
  }
  return mean;
}

int gradients(deepcam::Communicator& comm, int k) {
  const int P = comm.size(), rank = comm.rank();
  Twins t;
  // Small buckets, so that several all-reduces overlap the backward pass.
  deepcam::GradientAllReduce sync(comm, t.params, 64 * 1024);
  if (sync.bucket_count() < 3) {
    std::printf("rank %d: expected several buckets, got %zu\n", rank, sync.bucket_count());
    ++failures;
  }
  for (int step = 0; step < 3; ++step) {
    for (auto& p : t.params) p.mutable_grad() = at::Tensor();
    for (int j = 0; j < k; ++j) {
      if (j == k - 1) sync.arm();
      const Sample s = batch_of(step, j, rank);
      (deepcam::weighted_cross_entropy(t.model->forward(s.data), s.labels) / static_cast<double>(k)).backward();
    }
    sync.finish();

    const std::vector<at::Tensor> mean = mean_gradient(*t.reference, t.ref_params, step, k, P);
    for (std::size_t i = 0; i < t.params.size(); ++i) {
      expect_close("step " + std::to_string(step) + " gradient of parameter " + std::to_string(i), t.params[i].grad(),
                   mean[i], rank);
    }
    t.descend();
  }
  return 0;
}

// BatchNorm synchronous over all ranks: the all-reduced gradient is the
// gradient one process computes on the ranks' batches concatenated.
constexpr double kSyncedTolerance = 1e-4;

int synced_gradients(deepcam::Communicator& comm, int k) {
  const int P = comm.size(), rank = comm.rank();
  Twins t(&comm.consecutive(2));
  deepcam::GradientAllReduce sync(comm, t.params, 64 * 1024);
  for (int step = 0; step < 3; ++step) {
    for (auto& p : t.params) p.mutable_grad() = at::Tensor();
    for (auto& p : t.ref_params) p.mutable_grad() = at::Tensor();
    for (int j = 0; j < k; ++j) {
      if (j == k - 1) sync.arm();
      const Sample s = batch_of(step, j, rank);
      (deepcam::weighted_cross_entropy(t.model->forward(s.data), s.labels) / static_cast<double>(k)).backward();
      std::vector<at::Tensor> data, labels;
      for (int r = 0; r < P; ++r) {
        const Sample o = batch_of(step, j, r);
        data.push_back(o.data);
        labels.push_back(o.labels);
      }
      (deepcam::weighted_cross_entropy(t.reference->forward(at::cat(data)), at::cat(labels)) / static_cast<double>(k))
          .backward();
    }
    sync.finish();
    for (std::size_t i = 0; i < t.params.size(); ++i) {
      expect_close("step " + std::to_string(step) + " gradient of parameter " + std::to_string(i), t.params[i].grad(),
                   t.ref_params[i].grad(), rank, kSyncedTolerance);
    }
    t.descend(0.005);
  }
  const auto buffers = t.model->module().named_buffers();
  const auto ref_buffers = t.reference->module().named_buffers();
  for (std::size_t i = 0; i < buffers.size(); ++i) {
    expect_close("buffer " + buffers[i].key(), buffers[i].value(), ref_buffers[i].value(), rank, kSyncedTolerance);
  }
  return 0;
}

#if DEEPCAM_WITH_CUDA
int graphed_gradients(deepcam::Communicator& comm) {
  if (!device.is_cuda()) {
    std::fprintf(stderr, "data_parallel_probe: graphed-gradients needs --device cuda\n");
    return 2;
  }
  const int P = comm.size(), rank = comm.rank();
  Twins t;
  deepcam::GradientAllReduce sync(comm, t.params, 64 * 1024);
  deepcam::StepGraph graph(device);
  const auto step = [&] {
    sync.arm();
    deepcam::weighted_cross_entropy(t.model->forward(graph.input()), graph.labels()).backward();
    sync.finish();
  };
  constexpr int kEagerSteps = 3, kSteps = 6;
  for (int s = 0; s < kSteps; ++s) {
    const Sample batch = batch_of(s, 0, rank);
    graph.load(batch.data, batch.labels);
    // Unset before every step up to the captured one, so that the captured
    // backward allocates the gradients that every replay overwrites.
    if (s <= kEagerSteps) {
      for (auto& p : t.params) p.mutable_grad() = at::Tensor();
    }
    std::string how = "replayed";
    if (s < kEagerSteps) {
      graph.run_eager(step);
      how = "eager";
    } else if (s == kEagerSteps) {
      graph.capture(step);
      how = "captured";
    } else {
      graph.replay();
    }
    const std::vector<at::Tensor> mean = mean_gradient(*t.reference, t.ref_params, s, 1, P);
    for (std::size_t i = 0; i < t.params.size(); ++i) {
      expect_close("step " + std::to_string(s) + " (" + how + ") gradient of parameter " + std::to_string(i),
                   t.params[i].grad(), mean[i], rank);
    }
    t.descend();
  }
  return graph.captured() ? 0 : 1;
}
#endif

int bnstats(deepcam::Communicator& comm) {
  const int rank = comm.rank();
  deepcam::PluginLoader loader;
  auto model = make_model(loader);
  model->module().train();
  {
    at::NoGradGuard no_grad;
    model->forward(batch_of(0, 0, rank).data);  // rank-specific running statistics
  }
  std::vector<at::Tensor> before;
  for (const auto& b : model->module().named_buffers()) {
    if (b.key().find("running_") != std::string::npos) before.push_back(b.value().clone());
  }
  deepcam::average_batchnorm_statistics(model->module(), comm.world());
  std::size_t i = 0;
  for (const auto& b : model->module().named_buffers()) {
    if (b.key().find("running_") == std::string::npos) continue;
    const at::Tensor mean = comm.world().all_gather(before[i]).mean(0);
    const at::Tensor everyone = comm.world().all_gather(b.value());
    expect_close(b.key() + " (the mean of the ranks')", b.value(), mean, rank);
    for (int r = 0; r < comm.size(); ++r) {
      if (!everyone[r].equal(b.value())) {
        std::printf("rank %d: %s differs from rank %d's\n", rank, b.key().c_str(), r);
        ++failures;
      }
    }
    if (before[i].equal(mean)) {
      std::printf("rank %d: %s was already the mean before averaging; the check proves nothing\n", rank,
                  b.key().c_str());
      ++failures;
    }
    ++i;
  }
  return i == 0 ? 1 : 0;
}

int run_probe(int argc, char** argv) {
  try {
    at::set_num_threads(1);
    if (argc > 2 && std::string(argv[1]) == "--device") {
      device = at::Device(argv[2]);
      argv += 2;
      argc -= 2;
    }
    const std::string mode = argc > 1 ? argv[1] : "";
    deepcam::CommOptions options;
    options.timeout = std::chrono::milliseconds(60000);
    options.cuda = device.is_cuda();
    options.group_of_one = true;
    deepcam::Communicator comm(deepcam::detect_ranks(), options);
#if DEEPCAM_WITH_CUDA
    if (device.is_cuda()) {
      // This rank's GPU, also for what allocates on the current device (a
      // CUDA graph's streams), as the engine sets it.
      device = at::Device(at::kCUDA, static_cast<at::DeviceIndex>(comm.local_rank()));
      c10::cuda::set_device(device.index());
    }
#endif
    std::printf("rank %d of %d: collectives through %s\n", comm.rank(), comm.size(),
                comm.backend(device.type()).c_str());
    int status = 2;
    if (mode == "syncbn") status = syncbn(comm, at::kFloat, {3, 4, 5, 6}, kTolerance);
    else if (mode == "syncbn-half") status = syncbn(comm, at::kHalf, {1, 2, 256, 260}, 1e-2);
    else if (mode == "syncbn-nhwc") status = syncbn(comm, at::kFloat, {3, 4, 5, 6}, kTolerance, 0, at::MemoryFormat::ChannelsLast);
    else if (mode == "syncbn-pairs") status = syncbn(comm, at::kFloat, {3, 4, 5, 6}, kTolerance, 2);
    else if (mode == "gradients" && argc > 2) status = gradients(comm, std::atoi(argv[2]));
    else if (mode == "synced-gradients" && argc > 2) status = synced_gradients(comm, std::atoi(argv[2]));
    else if (mode == "bnstats") status = bnstats(comm);
#if DEEPCAM_WITH_CUDA
    else if (mode == "graphed-gradients") status = graphed_gradients(comm);
#endif
    else std::fprintf(stderr, "usage: data_parallel_probe [--device cuda] syncbn | syncbn-half | syncbn-nhwc | syncbn-pairs | gradients K | "
                              "synced-gradients K | bnstats | graphed-gradients (CUDA)\n");
    comm.finish();
    if (status == 0 && failures == 0) std::printf("rank %d: %s: all checks hold\n", comm.rank(), mode.c_str());
    return status != 0 ? status : failures != 0 ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "data_parallel_probe: %s\n", e.what());
    return 3;
  }
}

}  // namespace

int main(int argc, char** argv) { deepcam::end_process(run_probe(argc, argv)); }
