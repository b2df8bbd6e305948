// Test support shared by the adam and adamw unit tests: runs PyTorch's own
// optimizer (tests/integration/adam_reference.py, with the Python and the
// source tree of tests/unit/test_paths.hpp) and turns its printed values into
// tensors and checks. Include after <torch/types.h> and <doctest/doctest.h>.
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "test_paths.hpp"

namespace deepcam::optimizers::testing {

inline constexpr int kParams = 4;  // adam_reference.py SHAPES

// The script's output: "TAG INDEX v0 v1 ..." lines, and "group ..." lines whole.
struct Reference {
  std::map<std::string, std::vector<double>> lines;

  bool has(const std::string& tag, int index) const {
    return lines.count(tag + " " + std::to_string(index)) != 0;
  }
  const std::vector<double>& at(const std::string& tag, int index) const {
    const auto found = lines.find(tag + " " + std::to_string(index));
    REQUIRE_MESSAGE(found != lines.end(), "adam_reference.py printed no line " << tag << " " << index);
    return found->second;
  }
  std::vector<std::string> groups;  // the "group ..." lines, spaces removed
};

inline Reference run_reference(const std::string& args) {
  const std::string command = "'" + test_support::python() + "' '" +
                              (test_support::source_dir() / "tests/integration/adam_reference.py").string() + "' " + args;
  std::FILE* pipe = popen(command.c_str(), "r");
  REQUIRE_MESSAGE(pipe != nullptr, "cannot run " << command);
  std::string text;
  char buffer[4096];
  while (std::size_t n = std::fread(buffer, 1, sizeof buffer, pipe)) text.append(buffer, n);
  const int status = pclose(pipe);
  REQUIRE_MESSAGE(status == 0, command << " failed (status " << status
                                       << "); is the project venv with torch installed?");
  Reference ref;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream words(line);
    std::string tag, index;
    words >> tag >> index;
    if (tag == "group") {
      line.erase(std::remove(line.begin(), line.end(), ' '), line.end());
      ref.groups.push_back(line);
      continue;
    }
    std::vector<double> values;
    for (std::string word; words >> word;) values.push_back(std::strtod(word.c_str(), nullptr));
    ref.lines[tag + " " + index] = values;
  }
  return ref;
}

inline std::vector<std::int64_t> shape_of(const Reference& ref, int index) {
  std::vector<std::int64_t> shape;
  for (double d : ref.at("shape", index)) shape.push_back(static_cast<std::int64_t>(d));
  return shape;
}

inline at::Tensor make_tensor(const Reference& ref, const std::string& tag, int index) {
  const std::vector<double>& values = ref.at(tag, index);
  std::vector<float> floats(values.begin(), values.end());
  return torch::tensor(floats, torch::kFloat).reshape(shape_of(ref, index));
}

inline std::vector<at::Tensor> make_params(const Reference& ref, const std::string& tag) {
  std::vector<at::Tensor> params;
  for (int i = 0; i < kParams; ++i) params.push_back(make_tensor(ref, tag, i).requires_grad_(true));
  return params;
}

// Parameter 1 has gradients on even steps only, parameter 2 never.
inline void set_grads(std::vector<at::Tensor>& params, const Reference& ref, int step) {
  for (int i = 0; i < kParams; ++i) {
    const std::string tag = "grad" + std::to_string(step);
    params[i].mutable_grad() = ref.has(tag, i) ? make_tensor(ref, tag, i) : at::Tensor();
  }
}

// Bit-equal: the plugin runs PyTorch's kernels in PyTorch's order, so any
// difference at all means an operation or its order differs.
inline void check_equal(const at::Tensor& actual, const std::vector<double>& expected, const std::string& what) {
  const at::Tensor flat = actual.detach().reshape({-1}).to(torch::kFloat).contiguous();
  REQUIRE_MESSAGE(flat.numel() == static_cast<std::int64_t>(expected.size()), what);
  const float* data = flat.data_ptr<float>();
  for (std::size_t k = 0; k < expected.size(); ++k) {
    INFO(what << " element " << k);
    CHECK(data[k] == static_cast<float>(expected[k]));
  }
}

}  // namespace deepcam::optimizers::testing
