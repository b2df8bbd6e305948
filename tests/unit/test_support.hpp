// Helpers of the core unit tests that check files against what NumPy and
// h5py write and read: a temporary folder, a Python script run in it (with
// test_paths.hpp's Python), and small checks. Include after
// <doctest/doctest.h>.
#pragma once

#include <stdlib.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <vector>

#include "deepcam/error.hpp"
#include "test_paths.hpp"

namespace test_support {

namespace fs = std::filesystem;

// A fresh folder under the system's temporary directory, removed with it.
struct TempDir {
  fs::path path;
  TempDir() {
    std::string templ = (fs::temp_directory_path() / "deepcam_test.XXXXXX").string();
    REQUIRE(::mkdtemp(templ.data()) != nullptr);
    path = templ;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
};

// Runs `imports` then `body` as a Python script in `dir`, where the script
// sees the folder as DIR; the test stops if it fails.
inline void run_python(const fs::path& dir, const std::string& imports, const std::string& body) {
  const fs::path script = dir / "script.py";
  std::ofstream(script) << "import sys\n" << imports << "DIR = sys.argv[1]\n" << body;
  const std::string command = python() + " " + script.string() + " " + dir.string();
  const int rc = std::system(command.c_str());
  INFO("command: " << command);
  REQUIRE(rc == 0);
}

inline std::vector<unsigned char> read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  return std::vector<unsigned char>(std::istreambuf_iterator<char>(in), {});
}

// The message of the deepcam::Error `f` throws, or "(no error)".
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const deepcam::Error& e) {
    return e.what();
  }
  return "(no error)";
}

inline bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

}  // namespace test_support
