// The normalisation kernel of deepcam/normalise.hpp.
//
// Why it is written this way: decoding is most of a reader's work once the
// file is in the page cache (a 56 MB sample). A pixel at a time, each value
// goes to another of the C planes; instead, per block of pixels:
//   - four consecutive selected channels (the usual case: all 16 in order)
//     are read as one 4-float vector per pixel, four pixels are transposed in
//     registers and written as one 4-pixel vector per channel, with
//     streaming stores (the output does not fit in any cache, so filling
//     cache lines with it first only costs memory bandwidth): about 3x the
//     plain loop below;
//   - other channels go through a loop over one channel's run of the block,
//     which the compiler vectorises, the block's pixels staying in L1.
// NaN and infinity are detected on the way (an OR of exponent bits) rather
// than in a second pass over the output; the caller looks for the first one
// only when there is one, to name it.
// Without SSE2 (a non-x86 build) only the plain loop is compiled.
#include "deepcam/normalise.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace deepcam {

namespace {

// The exponent bits of a float plus one: bit 31 is set only for an all-ones
// exponent (NaN or infinity). ORed over all results.
std::uint32_t exponent_mark(float v) {
  std::uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return (bits & 0x7f800000u) + 0x00800000u;
}

// One output channel over pixels [p0, p0 + n): a strided read and a
// contiguous write that the compiler vectorises; the stride is a
// compile-time constant for the usual 16 file channels.
template <std::int64_t kStride>
std::uint32_t normalise_run(const float* raw, std::int64_t stride_at_run_time, std::int64_t channel,
                            std::int64_t p0, std::int64_t n, float min, float factor, float* out) {
  const std::int64_t stride = kStride > 0 ? kStride : stride_at_run_time;
  const float* __restrict src = raw + p0 * stride + channel;
  float* __restrict dst = out + p0;
  std::uint32_t marks = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const float v = (src[i * stride] - min) * factor;
    dst[i] = v;
    marks |= exponent_mark(v);
  }
  return marks;
}

// select_channels() for C selected channels known at compile time (the
// usual 16 and 3 of the benchmark and the tests) or not (kCount 0): the
// inner loop over channels then has a constant trip count, which the
// compiler unrolls and vectorises. kAll: every file channel, in order (the
// usual case), read as one contiguous run per pixel rather than gathered,
// about twice as fast.
template <std::int64_t kCount, bool kAll>
std::uint32_t select_run(const float* raw, std::int64_t pixels, std::int64_t file_channels,
                         const std::int64_t* channels, std::int64_t count_at_run_time,
                         const float* shift, const float* scale, float* out) {
  const std::int64_t count = kCount > 0 ? kCount : count_at_run_time;
  std::uint32_t marks = 0;
  for (std::int64_t p = 0; p < pixels; ++p) {
    const float* __restrict src = raw + p * file_channels;
    float* __restrict dst = out + p * count;
    for (std::int64_t k = 0; k < count; ++k) {
      const float x = src[kAll ? k : channels[k]];
      dst[k] = x;
      marks |= exponent_mark((x - shift[k]) * scale[k]);
    }
  }
  return marks;
}

}  // namespace

bool select_channels(const float* raw, std::int64_t pixels, std::int64_t file_channels,
                     const std::vector<std::int64_t>& channels, const std::vector<float>& shift,
                     const std::vector<float>& scale, float* out) {
  const auto count = static_cast<std::int64_t>(channels.size());
  bool all = count == file_channels;
  for (std::int64_t k = 0; all && k < count; ++k) all = channels[static_cast<std::size_t>(k)] == k;
  const std::int64_t* c = channels.data();
  std::uint32_t marks;
  if (all && count == 16)
    marks = select_run<16, true>(raw, pixels, file_channels, c, count, shift.data(), scale.data(), out);
  else if (all)
    marks = select_run<0, true>(raw, pixels, file_channels, c, count, shift.data(), scale.data(), out);
  else if (count == 3)
    marks = select_run<3, false>(raw, pixels, file_channels, c, count, shift.data(), scale.data(), out);
  else
    marks = select_run<0, false>(raw, pixels, file_channels, c, count, shift.data(), scale.data(), out);
  return (marks & 0x80000000u) == 0;
}

bool normalise_sample(const float* raw, std::int64_t pixels, std::int64_t file_channels,
                      const std::vector<std::int64_t>& channels, const std::vector<float>& shift,
                      const std::vector<float>& scale, float* data) {
  constexpr std::int64_t kBlock = 512;  // 32 KiB of 16-channel pixels
  static_assert(kBlock % 4 == 0, "the vector path takes whole groups of 4 pixels");
  const auto count = static_cast<std::int64_t>(channels.size());
  std::uint32_t marks = 0;
#if defined(__SSE2__)
  // Streaming stores need 16-byte aligned destinations: every plane starts
  // aligned when the output does and a plane is a multiple of 4 floats. Then
  // every block is a multiple of 4 pixels too.
  const bool vector_ok = reinterpret_cast<std::uintptr_t>(data) % 16 == 0 && pixels % 4 == 0;
  __m128i vmarks = _mm_setzero_si128();
  const __m128i exponent = _mm_set1_epi32(0x7f800000), one = _mm_set1_epi32(0x00800000);
  bool streamed = false;
#endif
  for (std::int64_t p0 = 0; p0 < pixels; p0 += kBlock) {
    const std::int64_t n = std::min(kBlock, pixels - p0);
    std::int64_t k = 0;
    while (k < count) {
      float* out = data + k * pixels;
#if defined(__SSE2__)
      const std::int64_t c0 = channels[static_cast<std::size_t>(k)];
      if (vector_ok && k + 4 <= count && channels[k + 1] == c0 + 1 && channels[k + 2] == c0 + 2 &&
          channels[k + 3] == c0 + 3) {
        const __m128 min = _mm_loadu_ps(shift.data() + k), factor = _mm_loadu_ps(scale.data() + k);
        const float* src = raw + p0 * file_channels + c0;
        float* d0 = out + p0;
        float* d1 = d0 + pixels;
        float* d2 = d1 + pixels;
        float* d3 = d2 + pixels;
        for (std::int64_t i = 0; i < n; i += 4) {
          __m128 r0 = _mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(src + i * file_channels), min), factor);
          __m128 r1 = _mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(src + (i + 1) * file_channels), min), factor);
          __m128 r2 = _mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(src + (i + 2) * file_channels), min), factor);
          __m128 r3 = _mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(src + (i + 3) * file_channels), min), factor);
          vmarks = _mm_or_si128(vmarks, _mm_add_epi32(_mm_and_si128(_mm_castps_si128(r0), exponent), one));
          vmarks = _mm_or_si128(vmarks, _mm_add_epi32(_mm_and_si128(_mm_castps_si128(r1), exponent), one));
          vmarks = _mm_or_si128(vmarks, _mm_add_epi32(_mm_and_si128(_mm_castps_si128(r2), exponent), one));
          vmarks = _mm_or_si128(vmarks, _mm_add_epi32(_mm_and_si128(_mm_castps_si128(r3), exponent), one));
          _MM_TRANSPOSE4_PS(r0, r1, r2, r3);  // r_j: channel k + j of pixels i .. i + 3
          _mm_stream_ps(d0 + i, r0);
          _mm_stream_ps(d1 + i, r1);
          _mm_stream_ps(d2 + i, r2);
          _mm_stream_ps(d3 + i, r3);
        }
        streamed = true;
        k += 4;
        continue;
      }
#endif
      const auto c = channels[static_cast<std::size_t>(k)];
      marks |= file_channels == 16
                   ? normalise_run<16>(raw, file_channels, c, p0, n, shift[k], scale[k], out)
                   : normalise_run<0>(raw, file_channels, c, p0, n, shift[k], scale[k], out);
      ++k;
    }
  }
#if defined(__SSE2__)
  // Streaming stores are weakly ordered: make them visible before the
  // sample is handed to another thread.
  if (streamed) _mm_sfence();
  alignas(16) std::uint32_t lanes[4];
  _mm_store_si128(reinterpret_cast<__m128i*>(lanes), vmarks);
  marks |= lanes[0] | lanes[1] | lanes[2] | lanes[3];
#endif
  return (marks & 0x80000000u) == 0;
}

}  // namespace deepcam
