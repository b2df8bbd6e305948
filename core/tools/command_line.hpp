// What deepcam-host's and deepcam-data's command lines share: a word that
// would be printed raw where a line names it.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "deepcam/json.hpp"  // control_character(), Json

namespace deepcam {

// What is wrong with word k of `args` (counted from 1 in the message) for
// a line that names it: a control character (a path holding one would be
// printed raw, "wrote the predictions ... to DIR"); "" when nothing. An
// --set item (`--set ITEM`, `--set=ITEM`) has a check of its own, naming
// its key.
inline std::string control_character_word(const std::vector<std::string>& args, std::size_t k) {
  if ((k > 0 && args[k - 1] == "--set") || args[k].rfind("--set=", 0) == 0) return "";
  const std::string problem = control_character(args[k]);
  if (problem.empty()) return "";
  return fmt::format("argument {}{} ({}) {}; write it without", k + 1, k > 0 ? " (after " + args[k - 1] + ")" : "",
                     Json(args[k]).dump(), problem);
}

}  // namespace deepcam
