// What every deepcam-data command's option parsing shares: an option given
// twice is a bad command line, not the later one silently winning (synth
// --out a --out b wrote b), except one documented as repeatable (read's
// --set).
#pragma once

#include <set>
#include <string>
#include <utility>

#include <fmt/format.h>

namespace deepcam::data {

class OptionsSeen {
 public:
  explicit OptionsSeen(std::string command) : command_(std::move(command)) {}

  // "" the first time `option` is given, then "COMMAND: OPTION is given twice".
  std::string again(const std::string& option) {
    if (seen_.insert(option).second) return "";
    return fmt::format("{}: {} is given twice", command_, option);
  }

 private:
  std::string command_;
  std::set<std::string> seen_;
};

}  // namespace deepcam::data
