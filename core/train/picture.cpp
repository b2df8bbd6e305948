#include "picture.hpp"

#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

#include <fmt/format.h>

#include "deepcam/error.hpp"
#include "deepcam/mlperf_log.hpp"

namespace deepcam {

namespace {

using Rgb = std::array<std::uint8_t, 3>;

constexpr Rgb kPredictedCyclone{230, 30, 30};
constexpr Rgb kPredictedRiver{30, 100, 255};
constexpr Rgb kTrueCyclone{255, 230, 0};
constexpr Rgb kTrueRiver{0, 240, 240};

// A 5 x 7 pixel font for the legend's letters, one row a byte (bit 4 the
// leftmost column).
struct Glyph {
  char c;
  std::array<std::uint8_t, 7> rows;
};
constexpr Glyph kFont[] = {
    {'A', {0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11}}, {'C', {0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E}},
    {'D', {0x1E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1E}}, {'E', {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F}},
    {'I', {0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E}}, {'M', {0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11}},
    {'P', {0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10}}, {'Q', {0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D}},
    {'R', {0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11}}, {'T', {0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04}},
    {'U', {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E}}, {'V', {0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04}},
    {'O', {0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E}}, {'L', {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F}},
    {'N', {0x11, 0x19, 0x15, 0x13, 0x11, 0x11, 0x11}}, {'Y', {0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04}},
    {'S', {0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E}}, {'W', {0x11, 0x11, 0x11, 0x15, 0x15, 0x1B, 0x11}},
    {'G', {0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F}}, {'B', {0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E}},
    {'H', {0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11}}, {'K', {0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11}},
    {'(', {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02}}, {')', {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08}},
    // The digits of channel names (U850, Z1000, ...).
    {'0', {0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E}}, {'1', {0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E}},
    {'2', {0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F}}, {'3', {0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E}},
    {'4', {0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02}}, {'5', {0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E}},
    {'6', {0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E}}, {'7', {0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08}},
    {'8', {0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E}}, {'9', {0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C}},
};

class Canvas {
 public:
  Canvas(std::int64_t width, std::int64_t height) {
    image_.width = width;
    image_.height = height;
    image_.rgb.assign(static_cast<std::size_t>(width * height * 3), 0);
  }
  void set(std::int64_t x, std::int64_t y, const Rgb& c) {
    if (x < 0 || y < 0 || x >= image_.width || y >= image_.height) return;
    std::memcpy(&image_.rgb[static_cast<std::size_t>((y * image_.width + x) * 3)], c.data(), 3);
  }
  void blend(std::int64_t x, std::int64_t y, const Rgb& c) {
    std::uint8_t* p = &image_.rgb[static_cast<std::size_t>((y * image_.width + x) * 3)];
    for (int i = 0; i < 3; ++i) p[i] = static_cast<std::uint8_t>((p[i] + c[static_cast<std::size_t>(i)]) / 2);
  }
  void box(std::int64_t x, std::int64_t y, std::int64_t w, std::int64_t h, const Rgb& c) {
    for (std::int64_t j = y; j < y + h; ++j) {
      for (std::int64_t i = x; i < x + w; ++i) set(i, j, c);
    }
  }
  // Text in the legend's letters, `scale` screen pixels a font pixel.
  void text(std::int64_t x, std::int64_t y, const std::string& s, int scale) {
    for (char ch : s) {
      const auto* g = std::find_if(std::begin(kFont), std::end(kFont), [&](const Glyph& f) { return f.c == ch; });
      if (g != std::end(kFont)) {
        for (int row = 0; row < 7; ++row) {
          for (int col = 0; col < 5; ++col) {
            if (g->rows[static_cast<std::size_t>(row)] & (0x10 >> col)) {
              box(x + col * scale, y + row * scale, scale, scale, {255, 255, 255});
            }
          }
        }
      }
      x += 6 * scale;
    }
  }
  Image take() { return std::move(image_); }

 private:
  Image image_;
};

void append_chunk(std::string& png, const char* type, const std::string& data) {
  const auto be32 = [&](std::uint32_t v) {
    for (int shift = 24; shift >= 0; shift -= 8) png.push_back(static_cast<char>((v >> shift) & 0xFF));
  };
  be32(static_cast<std::uint32_t>(data.size()));
  const std::string body = std::string(type, 4) + data;
  png += body;
  be32(static_cast<std::uint32_t>(
      ::crc32(0L, reinterpret_cast<const Bytef*>(body.data()), static_cast<uInt>(body.size()))));
}

}  // namespace

Image prediction_picture(const float* background, const std::uint8_t* predicted, const std::int64_t* truth,
                         std::int64_t height, std::int64_t width, const std::string& background_name) {
  // The legend: five lines of text, large enough to read on a full-size
  // (1152 wide) picture.
  const int scale = static_cast<int>(std::max<std::int64_t>(1, width / 384));
  const std::int64_t line = 10 * scale;
  const std::vector<std::pair<std::string, Rgb>> legend = {
      {background_name + " (GREY)", {128, 128, 128}},
      {"TC PREDICTED", kPredictedCyclone},
      {"AR PREDICTED", kPredictedRiver},
      {"TC TRUE (EDGE)", kTrueCyclone},
      {"AR TRUE (EDGE)", kTrueRiver},
  };
  // As wide as the widest legend line at least: on a narrow sample (synth
  // writes them down to 16 pixels wide) the legend was cut at the sample's
  // edge. The sample is drawn at the left, on black.
  std::size_t longest = 0;
  for (const auto& entry : legend) longest = std::max(longest, entry.first.size());
  const std::int64_t legend_width = 10 * scale + 6 * scale * static_cast<std::int64_t>(longest);
  Canvas canvas(std::max(width, legend_width), height + line * static_cast<std::int64_t>(legend.size()) + 2 * scale);
  const std::int64_t pixels = height * width;
  const auto [lo, hi] = std::minmax_element(background, background + pixels);
  const float span = *hi > *lo ? *hi - *lo : 1.0f;
  for (std::int64_t y = 0; y < height; ++y) {
    for (std::int64_t x = 0; x < width; ++x) {
      const std::int64_t i = y * width + x;
      const auto grey = static_cast<std::uint8_t>(std::lround(255.0f * (background[i] - *lo) / span));
      canvas.set(x, y, {grey, grey, grey});
      if (predicted[i] == 1) canvas.blend(x, y, kPredictedCyclone);
      if (predicted[i] == 2) canvas.blend(x, y, kPredictedRiver);
      // A true region's edge: a pixel of the class with a 4-neighbour that
      // is not (or the picture's border).
      const std::int64_t c = truth[i];
      if (c == 0) continue;
      const bool edge = x == 0 || y == 0 || x == width - 1 || y == height - 1 || truth[i - 1] != c ||
                        truth[i + 1] != c || truth[i - width] != c || truth[i + width] != c;
      if (edge) canvas.set(x, y, c == 1 ? kTrueCyclone : kTrueRiver);
    }
  }
  for (std::size_t k = 0; k < legend.size(); ++k) {
    const std::int64_t y = height + scale + static_cast<std::int64_t>(k) * line;
    canvas.box(scale, y, 7 * scale, 7 * scale, legend[k].second);
    canvas.text(10 * scale, y, legend[k].first, scale);
  }
  return canvas.take();
}

void write_png(const std::string& path, const Image& image) {
  // Each row starts with filter type 0 (none); zlib compresses the whole.
  const std::size_t row = static_cast<std::size_t>(image.width) * 3;
  std::string raw;
  raw.reserve((row + 1) * static_cast<std::size_t>(image.height));
  for (std::int64_t y = 0; y < image.height; ++y) {
    raw.push_back('\0');
    raw.append(reinterpret_cast<const char*>(&image.rgb[static_cast<std::size_t>(y) * row]), row);
  }
  uLongf packed_size = ::compressBound(static_cast<uLong>(raw.size()));
  std::string packed(packed_size, '\0');
  if (::compress2(reinterpret_cast<Bytef*>(packed.data()), &packed_size, reinterpret_cast<const Bytef*>(raw.data()),
                  static_cast<uLong>(raw.size()), 6) != Z_OK) {
    throw Error(fmt::format("{}: cannot compress the picture", path));
  }
  packed.resize(packed_size);

  std::string png("\x89PNG\r\n\x1a\n", 8);
  std::string header;
  for (std::uint32_t v : {static_cast<std::uint32_t>(image.width), static_cast<std::uint32_t>(image.height)}) {
    for (int shift = 24; shift >= 0; shift -= 8) header.push_back(static_cast<char>((v >> shift) & 0xFF));
  }
  header += std::string("\x08\x02\x00\x00\x00", 5);  // 8 bits, RGB, deflate, adaptive filters, no interlace
  append_chunk(png, "IHDR", header);
  append_chunk(png, "IDAT", packed);
  append_chunk(png, "IEND", "");

  const std::string tmp = fmt::format("{}.tmp-{}", path, ::getpid());
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  // Named as the picture being written: its temporary is gone with the error.
  if (!f) throw Error(fmt::format("{}: cannot create: {}", path, std::strerror(errno)));
  const bool written = std::fwrite(png.data(), 1, png.size(), f) == png.size() && std::fflush(f) == 0;
  const int e = errno;
  if (std::fclose(f) != 0 || !written) {
    const int closing = errno;
    std::remove(tmp.c_str());
    throw Error(write_error_text(path, written ? closing : e));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int r = errno;
    std::remove(tmp.c_str());
    throw Error(fmt::format("{}: cannot rename {} to it: {}", path, tmp, std::strerror(r)));
  }
}

}  // namespace deepcam
