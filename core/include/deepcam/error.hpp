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
  // Out of line, in the core library: an Error thrown by a plugin must not be
  // destroyed through code in the plugin, which may be unloaded by then.
  ~Error() override;
};

}  // namespace deepcam
