// Pictures of predictions (deepcam-host --predict): the predicted and the
// true classes of one sample over its integrated water vapour (TMQ), with a
// legend, written as an 8-bit RGB PNG.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace deepcam {

// An RGB image, rows top to bottom, 3 bytes a pixel.
struct Image {
  std::int64_t width = 0;
  std::int64_t height = 0;
  std::vector<std::uint8_t> rgb;
};

// The overlay of one sample: `background` (H x W, any scale; TMQ, or the
// channel `background_name` names) in grey,
// predicted tropical cyclones (class 1) and atmospheric rivers (class 2)
// filled in translucent red and blue, the true ones outlined in yellow and
// cyan, and below it a legend naming each colour. The image is W wide, or
// as wide as the legend's widest line where that is wider (the sample at
// its left, on black).
Image prediction_picture(const float* background, const std::uint8_t* predicted, const std::int64_t* truth,
                         std::int64_t height, std::int64_t width, const std::string& background_name);

// Writes `image` as a PNG (zlib-compressed, one IDAT) to a temporary name
// beside `path`, then renames it; a failure leaves no file behind.
void write_png(const std::string& path, const Image& image);

}  // namespace deepcam
