// The kernels of deepcam/normalise.hpp.
//
// Why they are written this way: decoding is most of a reader's work once
// the file is in the page cache (56.6 MB of input per full-size sample), and
// most of that is the (H, W, C) -> (C, H, W) transposition: a pixel at a
// time, each value goes to another of the C planes. So:
//   - channels first (normalise_sample), per block of pixels, a run of
//     consecutive selected channels (the usual case: all 16 in order) is
//     read as one vector per pixel, normalised there (each lane its own
//     channel's shift and scale), transposed in registers, and written as
//     one vector of consecutive pixels per channel plane: 16 x 16 with
//     AVX-512 (a pixel's 16 channels are one register, each store one
//     whole cache line), 8 x 8 with AVX2, 4 x 4 with SSE2, chosen at run
//     time from what the CPU offers (the build targets plain x86-64);
//     channels outside such runs go through a loop over one channel's run
//     of the block, the block's pixels staying in L1;
//   - channels last (normalise_sample_hwc) there is nothing to transpose:
//     the selected channels of a pixel are read as one vector, normalised
//     and written as one, at the speed of a copy;
//   - the output is written with streaming stores where it is aligned: it
//     does not fit in any cache (a batch of full-size samples is hundreds of
//     MB), so reading its lines in before overwriting them would only cost
//     memory bandwidth.
// Every path computes (x - shift) then * scale, two IEEE float32 operations
// with one rounding each: no intrinsic here is a fused multiply-add, and
// `scale * (x - shift)` cannot be contracted into one (the product is not
// added to anything), so any mix of paths gives the same bits, and the same
// bits as NumPy's float32 `scale * (x - shift)`.
// NaN and infinity are detected on the way (an OR of exponent bits) rather
// than in a second pass over the output; the caller looks for the first one
// only when there is one, to name it.
// Labels are converted to int64 and checked to be class ids in the same
// loop, vectorised by the compiler.
// Without SSE2 (a non-x86 build) only the plain loops are compiled.
#include "deepcam/normalise.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__SSE2__)
#include <immintrin.h>
#define DEEPCAM_X86 1
#else
#define DEEPCAM_X86 0
#endif

namespace deepcam {

namespace {

// The exponent bits of a float plus one: bit 31 is set only for an all-ones
// exponent (NaN or infinity). ORed over all results.
inline std::uint32_t exponent_mark(float v) {
  std::uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return (bits & 0x7f800000u) + 0x00800000u;
}

constexpr std::uint32_t kNotFinite = 0x80000000u;

// One output channel over pixels [p0, p0 + n): a strided read and a
// contiguous write that the compiler vectorises; the stride is a
// compile-time constant for the usual 16 file channels.
template <std::int64_t kStride>
std::uint32_t normalise_run(const float* raw, std::int64_t stride_at_run_time, std::int64_t channel,
                            std::int64_t p0, std::int64_t n, float shift, float scale, float* out) {
  const std::int64_t stride = kStride > 0 ? kStride : stride_at_run_time;
  const float* __restrict src = raw + p0 * stride + channel;
  float* __restrict dst = out + p0;
  std::uint32_t marks = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const float v = scale * (src[i * stride] - shift);
    dst[i] = v;
    marks |= exponent_mark(v);
  }
  return marks;
}

// Pixel order kept, (pixels, C) out, for C selected channels known at
// compile time (the usual 16 and 3) or not (kCount 0): the inner loop over
// channels then has a constant trip count, which the compiler unrolls and
// vectorises. kAll: every file channel, in order, read as one contiguous
// run per pixel rather than gathered. kNormalise: write the normalised
// values (normalise_sample_hwc), else the selected ones as they are
// (select_channels); the marks are those of the normalised values either way.
template <std::int64_t kCount, bool kAll, bool kNormalise>
std::uint32_t pixel_run(const float* raw, std::int64_t p0, std::int64_t p1, std::int64_t file_channels,
                        const std::int64_t* channels, std::int64_t count_at_run_time, const float* shift,
                        const float* scale, float* out) {
  const std::int64_t count = kCount > 0 ? kCount : count_at_run_time;
  std::uint32_t marks = 0;
  for (std::int64_t p = p0; p < p1; ++p) {
    const float* __restrict src = raw + p * file_channels;
    float* __restrict dst = out + p * count;
    for (std::int64_t k = 0; k < count; ++k) {
      const float x = src[kAll ? k : channels[k]];
      const float v = scale[k] * (x - shift[k]);
      dst[k] = kNormalise ? v : x;
      marks |= exponent_mark(v);
    }
  }
  return marks;
}

template <bool kNormalise>
std::uint32_t pixel_order(const float* raw, std::int64_t p0, std::int64_t p1, std::int64_t file_channels,
                          const std::vector<std::int64_t>& channels, const float* shift, const float* scale,
                          float* out) {
  const auto count = static_cast<std::int64_t>(channels.size());
  bool all = count == file_channels;
  for (std::int64_t k = 0; all && k < count; ++k) all = channels[static_cast<std::size_t>(k)] == k;
  const std::int64_t* c = channels.data();
  if (all && count == 16)
    return pixel_run<16, true, kNormalise>(raw, p0, p1, file_channels, c, count, shift, scale, out);
  if (all) return pixel_run<0, true, kNormalise>(raw, p0, p1, file_channels, c, count, shift, scale, out);
  if (count == 3) return pixel_run<3, false, kNormalise>(raw, p0, p1, file_channels, c, count, shift, scale, out);
  return pixel_run<0, false, kNormalise>(raw, p0, p1, file_channels, c, count, shift, scale, out);
}

// Whether channels[k .. k + n) are n consecutive file channels.
[[maybe_unused]] bool consecutive(const std::vector<std::int64_t>& channels, std::size_t k, std::size_t n) {
  if (k + n > channels.size()) return false;
  for (std::size_t j = 1; j < n; ++j)
    if (channels[k + j] != channels[k] + static_cast<std::int64_t>(j)) return false;
  return true;
}

[[maybe_unused]] bool aligned(const void* p, std::uintptr_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

#if DEEPCAM_X86
bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

// ---- AVX-512: a pixel's 16 channels are one register ------------------------------------------

// GCC before 12.3 warns inside its own AVX-512 intrinsics, whose undefined
// operand it reads as uninitialized (GCC bug 105593), once they are inlined
// here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

__attribute__((target("avx512f"))) inline __m512i marks512(__m512 v, __m512i marks) {
  const __m512i exponent = _mm512_set1_epi32(0x7f800000), one = _mm512_set1_epi32(0x00800000);
  return _mm512_or_si512(marks, _mm512_add_epi32(_mm512_and_si512(_mm512_castps_si512(v), exponent), one));
}

// r[j]: row j of a 16 x 16 block in, column j out.
__attribute__((target("avx512f"))) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
    r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xDD);
  }
}

// 16 consecutive channels (file channel c0 on) of pixels [p0, p1) into
// their 16 planes, out + j * pixels; p0, p1 and pixels multiples of 16,
// out 64-byte aligned.
__attribute__((target("avx512f"))) std::uint32_t planes16_avx512(const float* raw, std::int64_t file_channels,
                                                                 std::int64_t c0, std::int64_t p0, std::int64_t p1,
                                                                 std::int64_t pixels, const float* shift,
                                                                 const float* scale, float* out) {
  const __m512 sub = _mm512_loadu_ps(shift), mul = _mm512_loadu_ps(scale);
  __m512i marks = _mm512_setzero_si512();
  __m512 r[16];
  for (std::int64_t p = p0; p < p1; p += 16) {
    const float* src = raw + p * file_channels + c0;
    for (int j = 0; j < 16; ++j) {
      r[j] = _mm512_mul_ps(mul, _mm512_sub_ps(_mm512_loadu_ps(src + j * file_channels), sub));
      marks = marks512(r[j], marks);
    }
    transpose16(r);
    for (int j = 0; j < 16; ++j) _mm512_stream_ps(out + j * pixels + p, r[j]);
  }
  return static_cast<std::uint32_t>(_mm512_reduce_or_epi32(marks));
}

// 16 consecutive channels of pixels [p0, p1), pixel order kept: out is
// (pixels, 16), 64-byte aligned.
__attribute__((target("avx512f"))) std::uint32_t pixels16_avx512(const float* raw, std::int64_t file_channels,
                                                                 std::int64_t c0, std::int64_t p0, std::int64_t p1,
                                                                 const float* shift, const float* scale,
                                                                 float* out) {
  const __m512 sub = _mm512_loadu_ps(shift), mul = _mm512_loadu_ps(scale);
  __m512i marks = _mm512_setzero_si512();
  for (std::int64_t p = p0; p < p1; ++p) {
    const __m512 v = _mm512_mul_ps(mul, _mm512_sub_ps(_mm512_loadu_ps(raw + p * file_channels + c0), sub));
    marks = marks512(v, marks);
    _mm512_stream_ps(out + p * 16, v);
  }
  return static_cast<std::uint32_t>(_mm512_reduce_or_epi32(marks));
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// ---- AVX2: 8 channels per register -------------------------------------------------------------

__attribute__((target("avx2"))) inline __m256i marks256(__m256 v, __m256i marks) {
  const __m256i exponent = _mm256_set1_epi32(0x7f800000), one = _mm256_set1_epi32(0x00800000);
  return _mm256_or_si256(marks, _mm256_add_epi32(_mm256_and_si256(_mm256_castps_si256(v), exponent), one));
}

__attribute__((target("avx2"))) inline std::uint32_t reduce256(__m256i marks) {
  alignas(32) std::uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), marks);
  std::uint32_t m = 0;
  for (const std::uint32_t l : lanes) m |= l;
  return m;
}

__attribute__((target("avx2"))) inline void transpose8(__m256 r[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    s[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(s[j], s[4 + j], 0x20);
    r[4 + j] = _mm256_permute2f128_ps(s[j], s[4 + j], 0x31);
  }
}

// As planes16_avx512 for 8 consecutive channels; p0, p1 and pixels
// multiples of 8, out 32-byte aligned.
__attribute__((target("avx2"))) std::uint32_t planes8_avx2(const float* raw, std::int64_t file_channels,
                                                           std::int64_t c0, std::int64_t p0, std::int64_t p1,
                                                           std::int64_t pixels, const float* shift,
                                                           const float* scale, float* out) {
  const __m256 sub = _mm256_loadu_ps(shift), mul = _mm256_loadu_ps(scale);
  __m256i marks = _mm256_setzero_si256();
  __m256 r[8];
  for (std::int64_t p = p0; p < p1; p += 8) {
    const float* src = raw + p * file_channels + c0;
    for (int j = 0; j < 8; ++j) {
      r[j] = _mm256_mul_ps(mul, _mm256_sub_ps(_mm256_loadu_ps(src + j * file_channels), sub));
      marks = marks256(r[j], marks);
    }
    transpose8(r);
    for (int j = 0; j < 8; ++j) _mm256_stream_ps(out + j * pixels + p, r[j]);
  }
  return reduce256(marks);
}

// As pixels16_avx512, two registers per pixel; out 32-byte aligned.
__attribute__((target("avx2"))) std::uint32_t pixels16_avx2(const float* raw, std::int64_t file_channels,
                                                            std::int64_t c0, std::int64_t p0, std::int64_t p1,
                                                            const float* shift, const float* scale, float* out) {
  const __m256 sub0 = _mm256_loadu_ps(shift), mul0 = _mm256_loadu_ps(scale);
  const __m256 sub1 = _mm256_loadu_ps(shift + 8), mul1 = _mm256_loadu_ps(scale + 8);
  __m256i marks = _mm256_setzero_si256();
  for (std::int64_t p = p0; p < p1; ++p) {
    const float* src = raw + p * file_channels + c0;
    const __m256 v0 = _mm256_mul_ps(mul0, _mm256_sub_ps(_mm256_loadu_ps(src), sub0));
    const __m256 v1 = _mm256_mul_ps(mul1, _mm256_sub_ps(_mm256_loadu_ps(src + 8), sub1));
    marks = marks256(v1, marks256(v0, marks));
    _mm256_stream_ps(out + p * 16, v0);
    _mm256_stream_ps(out + p * 16 + 8, v1);
  }
  return reduce256(marks);
}

// ---- SSE2 (every x86-64): 4 x 4 ----------------------------------------------------------------

// As planes16_avx512 for 4 consecutive channels; p0, p1 and pixels
// multiples of 4, out 16-byte aligned.
std::uint32_t planes4_sse2(const float* raw, std::int64_t file_channels, std::int64_t c0, std::int64_t p0,
                           std::int64_t p1, std::int64_t pixels, const float* shift, const float* scale,
                           float* out) {
  const __m128 sub = _mm_loadu_ps(shift), mul = _mm_loadu_ps(scale);
  const __m128i exponent = _mm_set1_epi32(0x7f800000), one = _mm_set1_epi32(0x00800000);
  __m128i marks = _mm_setzero_si128();
  float* d0 = out;
  float* d1 = d0 + pixels;
  float* d2 = d1 + pixels;
  float* d3 = d2 + pixels;
  for (std::int64_t p = p0; p < p1; p += 4) {
    const float* src = raw + p * file_channels + c0;
    __m128 r0 = _mm_mul_ps(mul, _mm_sub_ps(_mm_loadu_ps(src), sub));
    __m128 r1 = _mm_mul_ps(mul, _mm_sub_ps(_mm_loadu_ps(src + file_channels), sub));
    __m128 r2 = _mm_mul_ps(mul, _mm_sub_ps(_mm_loadu_ps(src + 2 * file_channels), sub));
    __m128 r3 = _mm_mul_ps(mul, _mm_sub_ps(_mm_loadu_ps(src + 3 * file_channels), sub));
    marks = _mm_or_si128(marks, _mm_add_epi32(_mm_and_si128(_mm_castps_si128(r0), exponent), one));
    marks = _mm_or_si128(marks, _mm_add_epi32(_mm_and_si128(_mm_castps_si128(r1), exponent), one));
    marks = _mm_or_si128(marks, _mm_add_epi32(_mm_and_si128(_mm_castps_si128(r2), exponent), one));
    marks = _mm_or_si128(marks, _mm_add_epi32(_mm_and_si128(_mm_castps_si128(r3), exponent), one));
    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);  // r_j: channel j of pixels p .. p + 3
    _mm_stream_ps(d0 + p, r0);
    _mm_stream_ps(d1 + p, r1);
    _mm_stream_ps(d2 + p, r2);
    _mm_stream_ps(d3 + p, r3);
  }
  alignas(16) std::uint32_t lanes[4];
  _mm_store_si128(reinterpret_cast<__m128i*>(lanes), marks);
  return lanes[0] | lanes[1] | lanes[2] | lanes[3];
}
#endif  // DEEPCAM_X86

// Streaming stores are weakly ordered: make them visible before the sample
// is handed to another thread.
void store_fence() {
#if DEEPCAM_X86
  _mm_sfence();
#endif
}

}  // namespace

bool select_channels(const float* raw, std::int64_t pixels, std::int64_t file_channels,
                     const std::vector<std::int64_t>& channels, const std::vector<float>& shift,
                     const std::vector<float>& scale, float* out) {
  const std::uint32_t marks =
      pixel_order<false>(raw, 0, pixels, file_channels, channels, shift.data(), scale.data(), out);
  return (marks & kNotFinite) == 0;
}

bool normalise_sample_hwc(const float* raw, std::int64_t pixels, std::int64_t file_channels,
                          const std::vector<std::int64_t>& channels, const std::vector<float>& shift,
                          const std::vector<float>& scale, float* data) {
  std::uint32_t marks;
#if DEEPCAM_X86
  if (channels.size() == 16 && consecutive(channels, 0, 16)) {
    const std::int64_t c0 = channels[0];
    if (cpu_has_avx512() && aligned(data, 64)) {
      marks = pixels16_avx512(raw, file_channels, c0, 0, pixels, shift.data(), scale.data(), data);
      store_fence();
      return (marks & kNotFinite) == 0;
    }
    if (cpu_has_avx2() && aligned(data, 32)) {
      marks = pixels16_avx2(raw, file_channels, c0, 0, pixels, shift.data(), scale.data(), data);
      store_fence();
      return (marks & kNotFinite) == 0;
    }
  }
#endif
  marks = pixel_order<true>(raw, 0, pixels, file_channels, channels, shift.data(), scale.data(), data);
  return (marks & kNotFinite) == 0;
}

bool normalise_sample(const float* raw, std::int64_t pixels, std::int64_t file_channels,
                      const std::vector<std::int64_t>& channels, const std::vector<float>& shift,
                      const std::vector<float>& scale, float* data) {
  // Blocks of pixels small enough that a block's input stays in L1/L2 while
  // its channels are written out one run at a time (512 pixels of 16
  // channels: 32 KiB); a multiple of 16, so that every vector path takes
  // whole groups of pixels in every block but the last.
  constexpr std::int64_t kBlock = 512;
  const auto count = static_cast<std::int64_t>(channels.size());
  std::uint32_t marks = 0;
#if DEEPCAM_X86
  // Each vector width needs its planes aligned for streaming stores: every
  // plane starts aligned when the output does and a plane is a multiple of
  // the width; every block then holds whole groups (the last one too).
  const bool use512 = cpu_has_avx512() && aligned(data, 64) && pixels % 16 == 0;
  const bool use256 = cpu_has_avx2() && aligned(data, 32) && pixels % 8 == 0;
  const bool use128 = aligned(data, 16) && pixels % 4 == 0;
  bool streamed = false;
#endif
  for (std::int64_t p0 = 0; p0 < pixels; p0 += kBlock) {
    const std::int64_t n = std::min(kBlock, pixels - p0);
    std::int64_t k = 0;
    while (k < count) {
      const auto kk = static_cast<std::size_t>(k);
      const std::int64_t c = channels[kk];
      float* out = data + k * pixels;
#if DEEPCAM_X86
      if (use512 && consecutive(channels, kk, 16)) {
        marks |= planes16_avx512(raw, file_channels, c, p0, p0 + n, pixels, shift.data() + k, scale.data() + k, out);
        streamed = true;
        k += 16;
        continue;
      }
      if (use256 && consecutive(channels, kk, 8)) {
        marks |= planes8_avx2(raw, file_channels, c, p0, p0 + n, pixels, shift.data() + k, scale.data() + k, out);
        streamed = true;
        k += 8;
        continue;
      }
      if (use128 && consecutive(channels, kk, 4)) {
        marks |= planes4_sse2(raw, file_channels, c, p0, p0 + n, pixels, shift.data() + k, scale.data() + k, out);
        streamed = true;
        k += 4;
        continue;
      }
#endif
      marks |= file_channels == 16 ? normalise_run<16>(raw, file_channels, c, p0, n, shift[kk], scale[kk], out)
                                   : normalise_run<0>(raw, file_channels, c, p0, n, shift[kk], scale[kk], out);
      ++k;
    }
  }
#if DEEPCAM_X86
  if (streamed) store_fence();
#endif
  return (marks & kNotFinite) == 0;
}

// ---- labels ------------------------------------------------------------------------------------

namespace {

// IEEE half precision to float (exact: every half is a float).
float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  std::uint32_t mantissa = h & 0x3ffu;
  std::uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // infinity, NaN
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;  // zero
  } else {
    // Subnormal: normalise it.
    std::uint32_t e = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// One pass: convert and check. The check is a flag ORed over all elements
// (vectorised with the conversion); the first bad element is looked for
// only when the flag is set.
template <typename T>
LabelCheck decode_as(const void* src_bytes, std::int64_t count, std::int64_t* out) {
  const T* src = static_cast<const T*>(src_bytes);
  bool bad = false;
  if constexpr (std::is_integral_v<T>) {
    for (std::int64_t k = 0; k < count; ++k) {
      const T v = src[k];
      out[k] = static_cast<std::int64_t>(v);
      // Negative values wrap to huge unsigned ones.
      bad |= static_cast<std::uint64_t>(v) >= static_cast<std::uint64_t>(kClasses);
    }
  } else {
    for (std::int64_t k = 0; k < count; ++k) {
      const T v = src[k];
      // No float-to-integer conversion of a value that may not be a class
      // (NaN, 1e30: undefined behaviour): the classes are compared instead.
      out[k] = v == T(1) ? 1 : v == T(2) ? 2 : 0;
      bad |= !(v == T(0) || v == T(1) || v == T(2));
    }
  }
  LabelCheck check;
  if (!bad) return check;
  for (std::int64_t k = 0; k < count; ++k) {
    const double v = static_cast<double>(src[k]);
    if (!(v == 0.0 || v == 1.0 || v == 2.0)) {
      check.bad = k;
      check.value = v;
      break;
    }
  }
  return check;
}

LabelCheck decode_half(const void* src_bytes, std::int64_t count, std::int64_t* out) {
  const auto* src = static_cast<const std::uint16_t*>(src_bytes);
  // 0, 1 and 2 as halves, and negative zero.
  constexpr std::uint16_t kZero = 0x0000, kNegativeZero = 0x8000, kOne = 0x3c00, kTwo = 0x4000;
  bool bad = false;
  for (std::int64_t k = 0; k < count; ++k) {
    const std::uint16_t h = src[k];
    out[k] = h == kOne ? 1 : h == kTwo ? 2 : 0;
    bad |= !(h == kZero || h == kNegativeZero || h == kOne || h == kTwo);
  }
  LabelCheck check;
  if (!bad) return check;
  for (std::int64_t k = 0; k < count; ++k) {
    const std::uint16_t h = src[k];
    if (!(h == kZero || h == kNegativeZero || h == kOne || h == kTwo)) {
      check.bad = k;
      check.value = static_cast<double>(half_to_float(h));
      break;
    }
  }
  return check;
}

}  // namespace

const char* to_string(LabelType type) {
  switch (type) {
    case LabelType::Int8: return "int8";
    case LabelType::Int16: return "int16";
    case LabelType::Int32: return "int32";
    case LabelType::Int64: return "int64";
    case LabelType::UInt8: return "uint8";
    case LabelType::UInt16: return "uint16";
    case LabelType::UInt32: return "uint32";
    case LabelType::UInt64: return "uint64";
    case LabelType::Float16: return "float16";
    case LabelType::Float32: return "float32";
    case LabelType::Float64: return "float64";
  }
  return "?";
}

LabelCheck decode_labels(const void* src, LabelType type, std::int64_t count, std::int64_t* out) {
  switch (type) {
    case LabelType::Int8: return decode_as<std::int8_t>(src, count, out);
    case LabelType::Int16: return decode_as<std::int16_t>(src, count, out);
    case LabelType::Int32: return decode_as<std::int32_t>(src, count, out);
    case LabelType::Int64: return decode_as<std::int64_t>(src, count, out);
    case LabelType::UInt8: return decode_as<std::uint8_t>(src, count, out);
    case LabelType::UInt16: return decode_as<std::uint16_t>(src, count, out);
    case LabelType::UInt32: return decode_as<std::uint32_t>(src, count, out);
    case LabelType::UInt64: return decode_as<std::uint64_t>(src, count, out);
    case LabelType::Float16: return decode_half(src, count, out);
    case LabelType::Float32: return decode_as<float>(src, count, out);
    case LabelType::Float64: return decode_as<double>(src, count, out);
  }
  return {};
}

}  // namespace deepcam
