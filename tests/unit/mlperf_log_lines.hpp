// What an MlperfLog writes, read back for the plugin tests that check the
// hyper-parameter lines (Adam, the schedulers). Include after
// <doctest/doctest.h>.
#pragma once

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "deepcam/mlperf_log.hpp"

namespace test_support {

// The lines `write` puts into a log, each with its spaces taken out: the
// checks ignore json.dumps' spacing.
inline std::vector<std::string> log_lines(const std::function<void(deepcam::MlperfLog&)>& write) {
  std::FILE* file = std::tmpfile();
  REQUIRE(file != nullptr);
  deepcam::MlperfLog log(file, true);
  write(log);
  std::fflush(file);
  std::rewind(file);
  std::vector<std::string> lines;
  char buffer[4096];
  while (std::fgets(buffer, sizeof buffer, file)) {
    std::string line;
    for (const char* c = buffer; *c && *c != '\n'; ++c) {
      if (*c != ' ') line += *c;
    }
    lines.push_back(line);
  }
  std::fclose(file);
  return lines;
}

}  // namespace test_support
