// Entry point of libdeepcam_reader_hdf5.so: the parameter schema and the
// factory the host calls after checking the [data.reader] table against it.
#include "deepcam/plugin.hpp"

#include <memory>

#include "hdf5_reader.hpp"

namespace {

const deepcam::ParamSpec kParams[] = {
    {"threads", deepcam::ParamType::Int, "4", "files of a batch read in parallel", 1.0, 256.0},
    {"check_finite", deepcam::ParamType::Bool, "true",
     "refuse a sample holding NaN or Inf, naming the file"},
};

std::unique_ptr<deepcam::Reader> make(const deepcam::Params& params,
                                      const deepcam::ReaderContext& context) {
  return std::make_unique<deepcam::readers::Hdf5Reader>(
      context, deepcam::readers::Hdf5ReaderOptions::from(params));
}

}  // namespace

DEEPCAM_READER_PLUGIN("hdf5", "1.0.0",
                      "DeepCAM HDF5 samples, normalised, globally shuffled and sharded as the "
                      "reference does",
                      kParams, make)
