// The readers' channel selection, min/max normalisation and transposition
// of one sample (SPEC 1.4), (H*W, C_file) float32 -> (C, H*W): out[k][p] =
// (in[p][channels[k]] - shift[k]) * scale[k], in float32. Also the
// selection alone (select_channels), for a reader that normalises later,
// elsewhere (the prefetch reader, on the GPU). Every file reader
// (hdf5, npy) calls this one function, so that the same values give the same
// batches bit for bit whatever the file format: the vector path computes
// each value with the same two IEEE operations (subtract, multiply) as the
// scalar one, so any mix of the two is exact. Why it is written as it is:
// src/normalise.cpp.
#pragma once

#include <cstdint>
#include <vector>

#include "deepcam/export.hpp"

namespace deepcam {

// Writes the C selected channels of `raw` ((pixels, file_channels), C order)
// normalised into `data` ((C, pixels), C order). Returns false if any result
// is NaN or infinite; the caller looks for the first one only then, to name
// it. Thread-safe; fastest when `data` is 16-byte aligned and pixels % 4 == 0.
DEEPCAM_API bool normalise_sample(const float* raw, std::int64_t pixels, std::int64_t file_channels,
                                  const std::vector<std::int64_t>& channels,
                                  const std::vector<float>& shift, const std::vector<float>& scale,
                                  float* data);

// Copies the C selected channels of `raw` ((pixels, file_channels), C order)
// into `out` ((pixels, C), C order: the file's pixel-major order kept), not
// normalised. Returns false if any value normalise_sample() would compute
// from them is NaN or infinite: the check takes (x - shift[k]) * scale[k],
// not x, because a finite x far outside [min, max] can still overflow, so a
// caller refuses exactly the samples that normalise_sample()'s caller
// refuses. Thread-safe.
DEEPCAM_API bool select_channels(const float* raw, std::int64_t pixels, std::int64_t file_channels,
                                 const std::vector<std::int64_t>& channels,
                                 const std::vector<float>& shift, const std::vector<float>& scale,
                                 float* out);

}  // namespace deepcam
