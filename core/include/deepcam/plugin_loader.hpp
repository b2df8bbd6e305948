// Finds, loads and checks plugin libraries. A plugin is named by kind and name
// and lives in libdeepcam_<kind>_<name>.so, looked up in this order:
//   1. an explicit `library = "path"` in its TOML table;
//   2. each directory of DEEPCAM_PLUGIN_PATH (colon-separated), where the
//      file may sit directly or under <kind>s/<name>/ (the build tree's layout);
//   3. the install directory.
// The first level that has the file wins; two files within one level are an
// error naming both (the same file reached twice is one). Libraries are loaded RTLD_LOCAL, checked against this
// host (ABI, LibTorch version, C++ ABI, CUDA version) and never unloaded
// during a run.
#pragma once

#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "deepcam/error.hpp"
#include "deepcam/export.hpp"
#include "deepcam/plugin.hpp"

namespace deepcam {

struct LoadedPlugin {
  std::string path;
  const PluginDescriptor* descriptor = nullptr;
  std::shared_ptr<const void> library;  // keeps the library loaded
  // Set by discover() alone, "" for the file a run would load: why a run
  // naming this plugin does not load this file ("shadowed by FILE", found at
  // an earlier level of the search; or, for two files of one level, the
  // error a run gives).
  std::string not_used_because = "";
};

// An object made by a plugin, holding its library: members are destroyed in
// reverse order, so the object goes before the code it runs on.
template <typename T>
struct Plugged {
  std::shared_ptr<const void> library;
  std::unique_ptr<T> object;
  T* operator->() const { return object.get(); }
  T& operator*() const { return *object; }
};

// Called in a catch block around a plugin's factory: rethrows what it threw.
// An Error (the plugin's message about the run) passes as it is; a
// PluginBug, a c10::Error (said without LibTorch's C++ backtrace), any other
// exception, or one that is not a std::exception is a
// fault of the plugin's code, rethrown as a std::logic_error (the host's
// "internal error") whose message starts with the plugin's library `path`.
[[noreturn]] DEEPCAM_API void rethrow_factory_failure(const std::string& path);

// Calls a plugin's factory, `make(descriptor)`, and holds what it made with
// the plugin's library; what it throws, and a nullptr it returns, go through
// rethrow_factory_failure.
template <typename Make>
auto build_plugged(const LoadedPlugin& plugin, Make&& make) {
  decltype(make(*plugin.descriptor)) object;
  try {
    object = make(*plugin.descriptor);
    // A fault of the plugin's code like any other (status 3), not a mistake in the run file.
    if (!object) throw PluginBug("the factory returned nothing (nullptr)");
  } catch (...) {
    rethrow_factory_failure(plugin.path);
  }
  using T = typename decltype(object)::element_type;
  return Plugged<T>{plugin.library, std::move(object)};
}

class DEEPCAM_API PluginLoader {
 public:
  // Directories of level 2 and 3; the default reads DEEPCAM_PLUGIN_PATH and
  // adds the install directory ("": none, a build tree with the variable set).
  PluginLoader();
  PluginLoader(std::vector<std::string> env_dirs, std::string install_dir);

  // Loads (once) the plugin; `library` is the explicit path or empty.
  const LoadedPlugin& load(PluginKind kind, const std::string& name, const std::string& library = "");

  // Every plugin found on the search path (for --list-plugins), each checked;
  // libraries that fail the checks are reported in `problems`.
  std::vector<LoadedPlugin> discover(std::vector<std::string>& problems);
  // The same for the files named as plugins of one kind
  // (libdeepcam_<kind>_*.so), the only ones a run can load for it: a broken
  // library of another kind on the path is not opened.
  std::vector<LoadedPlugin> discover(std::vector<std::string>& problems, PluginKind kind);

  // DEEPCAM_PLUGIN_PATH's directories, then the install directory.
  std::vector<std::string> search_dirs() const;

  // Why a DEEPCAM_PLUGIN_PATH entry cannot be searched (a file), which
  // load() refuses when it searches: a message about the variable alone,
  // "" when every entry can be.
  std::string search_path_problem() const;

  // Loads and checks one file, whatever its name.
  static LoadedPlugin open(const std::string& path);

  static std::string file_name(PluginKind kind, const std::string& name);

 private:
  // discover() over the files whose names start with `prefix`.
  std::vector<LoadedPlugin> discover_named(std::vector<std::string>& problems, const std::string& prefix);

  std::vector<std::string> env_dirs_;
  std::string install_dir_;
  std::deque<LoadedPlugin> loaded_;  // a deque: references stay valid as it grows
};

}  // namespace deepcam
