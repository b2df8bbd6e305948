// Small text tests for the core's own sources (C++17's std::string has no
// ends_with).
#pragma once

#include <string_view>

namespace deepcam {

inline bool ends_with(std::string_view text, std::string_view end) {
  return text.size() >= end.size() && text.compare(text.size() - end.size(), end.size(), end) == 0;
}

}  // namespace deepcam
