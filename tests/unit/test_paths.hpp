// Where the unit tests find what they run and read outside themselves. Each
// place is compiled in as this build's, and the environment overrides it at
// run time: scripts/gpu_check.sh runs the executables from a bundle on a
// machine that has neither this checkout's path nor its build/ and .venv/.
//
//   Place           Environment          Compiled in            Holds
//   source tree     DEEPCAM_SOURCE_DIR   DEEPCAM_SOURCE_ROOT    scripts, the plugins' test.toml
//   build tree      DEEPCAM_BUILD_DIR    DEEPCAM_BUILD_ROOT     deepcam-data, plugins/
//   test vectors    DEEPCAM_TESTDATA     DEEPCAM_TESTDATA       ../shared/testdata
//   Python          DEEPCAM_PYTHON       -                      torch, NumPy, h5py
//
// DEEPCAM_BUILD_DIR is the name the integration tests already read.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <string>

namespace test_support {

// $name when set and not empty, else `compiled_in`.
inline std::filesystem::path place(const char* name, const char* compiled_in) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? value : compiled_in;
}

inline std::filesystem::path source_dir() { return place("DEEPCAM_SOURCE_DIR", DEEPCAM_SOURCE_ROOT); }
inline std::filesystem::path build_dir() { return place("DEEPCAM_BUILD_DIR", DEEPCAM_BUILD_ROOT); }
inline std::filesystem::path testdata_dir() { return place("DEEPCAM_TESTDATA", DEEPCAM_TESTDATA); }

// DEEPCAM_PYTHON, else the source tree's .venv, else python3 on PATH.
inline std::string python() {
  const std::filesystem::path venv = source_dir() / ".venv" / "bin" / "python";
  const std::filesystem::path fallback = std::filesystem::exists(venv) ? venv : "python3";
  return place("DEEPCAM_PYTHON", fallback.c_str()).string();
}

}  // namespace test_support
