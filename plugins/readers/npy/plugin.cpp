// Entry point of libdeepcam_reader_npy.so: the parameter schema and the
// factory the host calls after checking the [reader] table against it.
#include "deepcam/plugin.hpp"

#include <memory>

#include "npy_reader.hpp"

namespace {

const deepcam::ParamSpec kParams[] = {
    {"threads", deepcam::ParamType::Int, "4", "files of a batch read in parallel", 1.0, 256.0},
    {"io", deepcam::ParamType::String, "\"mmap\"",
     "mmap (page cache, best warm), pread (whole-file buffered reads, best cold) or direct "
     "(O_DIRECT into aligned buffers, no page cache)",
     1.0, 0.0, "mmap|pread|direct"},
    {"shuffle_mode", deepcam::ParamType::String, "\"global\"",
     "global (the reference's), node or gpu: shards permuted within (SPEC 2.2)", 1.0, 0.0,
     "global|node|gpu"},
    {"data_oversampling_factor", deepcam::ParamType::Int, "1",
     "node/gpu mode: shards per rank drawn at start, staged, one read per epoch in turn", 1.0,
     1024.0},
    {"check_finite", deepcam::ParamType::Bool, "true",
     "refuse a sample holding NaN or Inf, naming the file"},
};

std::unique_ptr<deepcam::Reader> make(const deepcam::Params& params,
                                      const deepcam::ReaderContext& context) {
  return std::make_unique<deepcam::readers::NpyReader>(
      context, deepcam::readers::NpyReaderOptions::from(params));
}

}  // namespace

DEEPCAM_READER_PLUGIN("npy", "1.0.0",
                      "DeepCAM .npy sample pairs (mmap, pread or O_DIRECT), normalised, sharded with "
                      "shuffle modes global, node and gpu",
                      kParams, make)
