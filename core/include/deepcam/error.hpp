// The one exception type of deepcam-host. Its message is complete and printed
// as it is: what went wrong, where (file, key or dataset), and what to do.
#pragma once

#include <stdexcept>
#include <string>

#include "deepcam/export.hpp"

namespace deepcam {

class DEEPCAM_API Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace deepcam
