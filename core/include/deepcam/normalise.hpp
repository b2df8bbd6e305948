// The readers' per-sample kernels: channel selection, min/max normalisation
// and layout of one sample (SPEC 1.4), and the decoding of its labels.
//
// Normalisation: (H*W, C_file) float32 in, out[k] = scale[k] * (in[channels[k]]
// - shift[k]) in float32, written either channels first, (C, H*W)
// (normalise_sample), or channels last, (H*W, C) (normalise_sample_hwc: the
// layout of a channels_last batch, which needs no transposition). Also the
// selection alone (select_channels), for a reader that normalises later,
// elsewhere (the prefetch reader, on the GPU). Every file reader (hdf5, npy)
// calls these functions, so that the same values give the same batches bit
// for bit whatever the file format and layout: every path (scalar, SSE,
// AVX2, AVX-512) computes each value with the same two IEEE float32
// operations, a subtraction then a multiplication, never a fused
// multiply-add, so any mix of them is exact. Why it is written as it is:
// core/data/normalise.cpp.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "deepcam/export.hpp"

namespace deepcam {

// Writes the C selected channels of `raw` ((pixels, file_channels), C order)
// normalised into `data` ((C, pixels), C order). Returns false if any result
// is NaN or infinite; the caller looks for the first one only then, to name
// it. Thread-safe; fastest when `data` is 64-byte aligned and pixels % 16 == 0.
DEEPCAM_API bool normalise_sample(const float* raw, std::int64_t pixels, std::int64_t file_channels,
                                  const std::vector<std::int64_t>& channels,
                                  const std::vector<float>& shift, const std::vector<float>& scale,
                                  float* data);

// The same values as normalise_sample(), bit for bit, in the file's pixel
// order: `data` is (pixels, C), C order. Same return value; fastest when
// `data` is 64-byte aligned and C is 16.
DEEPCAM_API bool normalise_sample_hwc(const float* raw, std::int64_t pixels, std::int64_t file_channels,
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

// The classes a label may hold: 0 background, 1 tropical cyclone, 2
// atmospheric river (SPEC 1.1).
constexpr std::int64_t kClasses = 3;

// The 16 input channels of a CAM5 file, in the order of the last axis of
// climate/data (the reference data set's variable list).
inline constexpr std::array<const char*, 16> kChannelNames = {
    "TMQ", "U850", "V850", "UBOT", "VBOT", "QREFHT", "PS", "PSL",
    "T200", "T500", "PRECT", "TS", "TREFHT", "Z1000", "Z200", "ZBOT"};

// How labels are stored: the element type, in this machine's byte order.
enum class LabelType { Int8, Int16, Int32, Int64, UInt8, UInt16, UInt32, UInt64, Float16, Float32, Float64 };

DEEPCAM_API const char* to_string(LabelType type);  // "int32", "float16", ...

// The outcome of decode_labels(): `bad` is the index of the first element
// that is not a class id (not a whole number, or outside 0 .. kClasses - 1),
// -1 if none; `value` is that element, as a double.
struct LabelCheck {
  std::int64_t bad = -1;
  double value = 0.0;
};

// Converts `count` labels stored as `type` at `src` to int64 in `out`,
// checking on the way that each is a class id (one pass; the first bad
// element is looked for only when there is one). `src` may equal `out` for
// LabelType::Int64 (an in-place check). Thread-safe.
DEEPCAM_API LabelCheck decode_labels(const void* src, LabelType type, std::int64_t count,
                                     std::int64_t* out);

}  // namespace deepcam
