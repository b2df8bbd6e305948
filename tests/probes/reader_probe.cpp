// The batches a run file's reader hands out, written to files, for
// tests/integration/test_reader_inputs.py, which compares them with NumPy's
// own arithmetic on the same files.
//
//   reader_probe RUN.toml OUT_DIR [--split train|validation] [--epochs N] [--set KEY=VALUE]...
//
// Reads N epochs (default 1) of the split as the engine does: the caller's
// Batch is reused from call to call, and the previous batch's labels are
// held while the next batch is read (as the engine holds them for the
// metric). Batch i of epoch e is written as OUT_DIR/e{e}-b{i}-data.npy
// ((B, C, H, W) float32, in that logical order whatever the batch's
// strides) and OUT_DIR/e{e}-b{i}-labels.npy ((B, H, W) int64). One JSON line
// per batch on stdout: epoch, batch, shape, strides, data_ptr, labels_ptr
// (where its memory lies, to see buffers being reused), minor_faults (the
// process's minor page faults during next(): first touches of fresh memory)
// and held_intact (whether the previous batch's labels still held their
// values after this batch was read). A reader error is printed on stderr with exit status 2.
#include <ATen/ATen.h>
#include <sys/resource.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "deepcam/build_reader.hpp"
#include "deepcam/config.hpp"
#include "deepcam/mlperf_log.hpp"
#include "deepcam/npy.hpp"
#include "deepcam/plugin_loader.hpp"
#include "process_end.hpp"

namespace {

long minor_faults() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

std::string list(at::IntArrayRef values) {
  std::string out = "[";
  for (std::size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + std::to_string(values[i]);
  return out + "]";
}

int run_probe(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: reader_probe RUN.toml OUT_DIR [--split train|validation] [--epochs N] [--set KEY=VALUE]...\n");
    return 2;
  }
  const std::string run_file = argv[1], out_dir = argv[2];
  deepcam::Split split = deepcam::Split::Train;
  int epochs = 1;
  std::vector<std::string> overrides;
  for (int i = 3; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--split") split = value == "validation" ? deepcam::Split::Validation : deepcam::Split::Train;
    else if (flag == "--epochs") epochs = std::atoi(value.c_str());
    else if (flag == "--set") overrides.push_back(value);
    else {
      std::fprintf(stderr, "reader_probe: unknown option %s\n", flag.c_str());
      return 2;
    }
  }
  try {
    deepcam::PluginLoader loader;
    const deepcam::RunConfig config = deepcam::load_config(run_file, overrides, loader);
    deepcam::MlperfLog log(nullptr, false);
    const auto reader = deepcam::build_reader(config, deepcam::reader_context(config, 0, 1, &log));
    deepcam::Batch batch;
    for (int e = 0; e < epochs; ++e) {
      reader->start_epoch(split, e);
      at::Tensor held, held_copy;
      for (int i = 0;; ++i) {
        const long faults_before = minor_faults();
        if (!reader->next(batch)) break;
        const long faults = minor_faults() - faults_before;
        const bool intact = !held.defined() || at::equal(held, held_copy);
        held = batch.labels;  // as the engine keeps the last batch's labels
        held_copy = held.clone();
        const at::Tensor data = batch.data.contiguous();
        const std::string stem = out_dir + "/e" + std::to_string(e) + "-b" + std::to_string(i);
        deepcam::npy::write(stem + "-data.npy", deepcam::npy::DType::Float32, data.sizes().vec(), data.data_ptr());
        deepcam::npy::write(stem + "-labels.npy", deepcam::npy::DType::Int64, batch.labels.sizes().vec(),
                            batch.labels.data_ptr());
        std::printf("{\"epoch\": %d, \"batch\": %d, \"shape\": %s, \"strides\": %s, \"data_ptr\": %llu, "
                    "\"labels_ptr\": %llu, \"minor_faults\": %ld, \"held_intact\": %s}\n",
                    e, i, list(batch.data.sizes()).c_str(), list(batch.data.strides()).c_str(),
                    static_cast<unsigned long long>(reinterpret_cast<std::uintptr_t>(batch.data.data_ptr())),
                    static_cast<unsigned long long>(reinterpret_cast<std::uintptr_t>(batch.labels.data_ptr())), faults,
                    intact ? "true" : "false");
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) { deepcam::end_process(run_probe(argc, argv)); }
