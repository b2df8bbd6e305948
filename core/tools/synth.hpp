// `deepcam-data synth`: a synthetic DeepCAM data set in the layout of SPEC 1
// (train/, validation/, optionally test/, and stats.h5), for tests and for
// the quickstart when the real 8.8 TB are not at hand.
//
// The fields look like the CAM5 channels (realistic magnitudes, latitude
// structure, smooth large-scale noise) and the labels are learnable from
// them: tropical cyclones (class 1) are compact vortices with a deep PSL
// minimum, rotating winds and high TMQ; atmospheric rivers (class 2) are
// long narrow bands of high TMQ and moisture transport. Both have sharp
// edges in several channels at the label boundary.
//
// A sample depends only on (seed, split, index), so the output is the same
// bytes whatever the number of threads.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "progress.hpp"

namespace deepcam::data {

struct SynthOptions {
  std::filesystem::path out;
  int train = 16;
  int validation = 4;
  int test = 0;
  int height = 768;
  int width = 1152;
  std::uint64_t seed = 1;
  int threads = 2;
  ProgressOptions progress;
};

enum class Split : std::uint64_t { train = 0, validation = 1, test = 2 };

// One sample: data is height x width x 16 float32, labels height x width.
struct Sample {
  int height = 0, width = 0;
  std::vector<float> data;
  std::vector<std::int32_t> labels;
};

// Fills `sample` (resized to height x width) for (seed, split, index).
void generate_sample(std::uint64_t seed, Split split, std::uint64_t index, int height, int width,
                     Sample& sample);

// `data-YYYY-MM-DD-HH-1.h5` for the n-th 3-hourly time step from
// 2106-01-01 00:00 (365-day calendar, as CAM5 uses).
std::string sample_file_name(std::uint64_t step);

// The `synth` command: progress lines on stderr (progress.hpp), then one
// summary line (none with progress.quiet).
void run_synth(const SynthOptions& options);

}  // namespace deepcam::data
