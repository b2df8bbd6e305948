// The exception type of deepcam-host (the others derive from it). Its message
// is complete and printed as it is: what went wrong, where (file, key or
// dataset), and what to do.
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

// A mistake in a plugin's code rather than in the run file: its factory
// asked Params for a key its schema does not declare, or with the wrong
// accessor. An Error, so that code catching Error still sees it; where the
// host calls a factory (build_plugged, deepcam/plugin_loader.hpp) it is
// reported as an internal error naming the plugin's library.
class DEEPCAM_API PluginBug : public Error {
 public:
  explicit PluginBug(const std::string& message) : Error(message) {}
  ~PluginBug() override;
};

}  // namespace deepcam
