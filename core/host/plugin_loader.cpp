#include "deepcam/plugin_loader.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <c10/util/Exception.h>
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>

#include <algorithm>
#include <boost/dll/shared_library.hpp>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <system_error>

#include "deepcam/config.hpp"
#include "deepcam/error.hpp"
#include "deepcam/stop_request.hpp"

namespace fs = std::filesystem;

namespace deepcam {

namespace {

const PluginKind kKinds[] = {PluginKind::Reader, PluginKind::Model, PluginKind::Optimizer,
                             PluginKind::Scheduler};

// Each directory made absolute here, once: the paths found in them are
// recorded in config.toml, which must find the same files when rerun from
// another working directory.
std::vector<std::string> split_path(const char* value) {
  std::vector<std::string> dirs;
  if (!value) return dirs;
  std::string s(value);
  std::size_t start = 0;
  while (start <= s.size()) {
    std::size_t end = s.find(':', start);
    if (end == std::string::npos) end = s.size();
    if (end > start) dirs.push_back(fs::absolute(s.substr(start, end - start)).string());
    start = end + 1;
  }
  return dirs;
}

// Why a DEEPCAM_PLUGIN_PATH entry that exists is no folder to search ("" if
// it is one, or is not there: a path may name folders of other machines):
// the library file itself given there was passed over, and a plugin of
// that name taken from the install directory in silence.
std::string plugin_path_entry_problem(const std::string& dir) {
  std::error_code ec;
  const fs::file_status status = fs::status(dir, ec);
  if (!fs::exists(status) || fs::is_directory(status)) return "";
  return fmt::format("DEEPCAM_PLUGIN_PATH entry {}: not a folder ({}); the variable lists folders that hold plugin "
                     "libraries: give the folder, or name the file with the table's `library` key",
                     dir, fs::is_regular_file(status) ? "a file" : "not a regular file either");
}

std::string describe_build(const char* torch, int abi, const char* cuda) {
  return fmt::format("LibTorch {}, _GLIBCXX_USE_CXX11_ABI={}, CUDA {}", torch,
                     abi < 0 ? "unset (not libstdc++)" : std::to_string(abi), *cuda ? cuda : "none");
}

// A hint for the loader's "undefined symbol: X", or "": a plugin compiled
// with _GLIBCXX_USE_CXX11_ABI=0 asks the core for functions taking the old
// std::string, which it does not have, so the loader refuses it before its
// descriptor (which would say so) can be read.
std::string undefined_symbol_hint(const std::string& cause) {
  const std::string marker = "undefined symbol: ";
  const auto at = cause.find(marker);
  if (at == std::string::npos) return "";
  const std::string symbol = cause.substr(at + marker.size(), cause.find_first_of(" \t(", at + marker.size()) -
                                                                   (at + marker.size()));
  int status = 0;
  std::unique_ptr<char, decltype(&std::free)> demangled(abi::__cxa_demangle(symbol.c_str(), nullptr, nullptr, &status),
                                                         &std::free);
  if (status != 0 || !demangled) return "";
  const std::string text = demangled.get();
  const bool old_string = (text.find("std::string") != std::string::npos ||
                           text.find("std::basic_string") != std::string::npos) &&
                          text.find("__cxx11") == std::string::npos;
  if (!old_string || DEEPCAM_COMPILED_CXX11_ABI != 1) return "";
  return fmt::format(" ({}): the plugin takes the C++ library's old std::string, as code compiled with "
                     "_GLIBCXX_USE_CXX11_ABI=0 does, and this host is built with _GLIBCXX_USE_CXX11_ABI=1; rebuild "
                     "the plugin with the SDK's flags (pkg-config --cflags deepcam-plugin)",
                     text);
}

// What is wrong with the descriptor's own fields, or "": the strings the
// host prints or compares must be there.
std::string descriptor_problem(const PluginDescriptor& d) {
  const std::pair<const char*, const char*> strings[] = {
      {"name", d.name}, {"version", d.version}, {"summary", d.summary},
      {"torch_version", d.torch_version}, {"cuda_version", d.cuda_version}};
  for (const auto& [field, value] : strings) {
    if (!value) return fmt::format("descriptor's {} is null", field);
  }
  if (!*d.name) return "descriptor's name is empty";
  if (static_cast<std::uint32_t>(d.kind) >= std::size(kKinds)) {
    return fmt::format("descriptor's kind {} is none of reader, model, optimizer, scheduler",
                       static_cast<std::uint32_t>(d.kind));
  }
  return "";
}

// Files within one directory that may hold the plugin.
std::vector<fs::path> candidates(const std::string& dir, PluginKind kind, const std::string& name) {
  const std::string file = PluginLoader::file_name(kind, name);
  return {fs::path(dir) / file, fs::path(dir) / (std::string(to_string(kind)) + "s") / name / file};
}

// The dynamic loader maps a library's segments as its headers describe them;
// a truncated file then faults (SIGBUS) on first access instead of failing.
// Checking that every part the headers name lies within the file turns that
// crash into an error. Returns "" when the file looks whole.
std::string elf_problem(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "cannot be opened for reading";
  in.seekg(0, std::ios::end);
  const auto size = static_cast<std::uint64_t>(in.tellg());
  in.seekg(0);
  Elf64_Ehdr eh{};
  if (!in.read(reinterpret_cast<char*>(&eh), sizeof eh) || std::memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0)
    return "not an ELF shared library";
  if (eh.e_ident[EI_CLASS] != ELFCLASS64) return "not a 64-bit ELF library";
  if (eh.e_type != ET_DYN) {
    return fmt::format("not a shared library ({})", eh.e_type == ET_REL    ? "an object file"
                                                    : eh.e_type == ET_EXEC ? "an executable"
                                                    : eh.e_type == ET_CORE ? "a core dump"
                                                                           : fmt::format("ELF type {}", eh.e_type));
  }
  if (eh.e_phentsize != sizeof(Elf64_Phdr)) return "not a 64-bit ELF library";
  const auto ends_within = [size](std::uint64_t offset, std::uint64_t length) {
    return offset <= size && length <= size - offset;
  };
  if (!ends_within(eh.e_phoff, std::uint64_t{eh.e_phnum} * sizeof(Elf64_Phdr)) ||
      (eh.e_shnum != 0 && !ends_within(eh.e_shoff, std::uint64_t{eh.e_shnum} * eh.e_shentsize)))
    return fmt::format("truncated: its headers reach past the end of the file ({} bytes)", size);
  for (unsigned i = 0; i < eh.e_phnum; ++i) {
    Elf64_Phdr ph{};
    in.seekg(static_cast<std::streamoff>(eh.e_phoff + i * sizeof(Elf64_Phdr)));
    if (!in.read(reinterpret_cast<char*>(&ph), sizeof ph)) return "unreadable program header";
    if (!ends_within(ph.p_offset, ph.p_filesz))
      return fmt::format("truncated: segment {} ends at byte {}, the file has {} bytes", i,
                         ph.p_offset + ph.p_filesz, size);
  }
  return "";
}

// A library's static initialisers run inside dlopen. An exception that
// leaves one cannot be caught safely by dlopen's caller: the C++ runtime
// calls std::terminate, or, with a C library whose frames the unwinder can
// pass, the exception skips the dynamic loader's cleanup and leaves its
// lock held, so the process could load nothing after it anyway. While a
// library loads, a terminate handler on the loading thread names the
// library and what it threw, and ends the process with the status of an
// internal error (3), where the default handler would abort with
// "terminate called".
// (Initialisers run on the thread that calls dlopen.)
std::mutex g_loading_mutex;  // one load at a time: the handler is process-wide
std::terminate_handler g_previous_terminate = nullptr;
thread_local const char* t_loading_path = nullptr;  // the library this thread is loading

[[noreturn]] void terminate_while_loading() {
  const char* path = t_loading_path;
  if (path == nullptr) {  // another thread's std::terminate, while a library loads
    if (g_previous_terminate != nullptr) g_previous_terminate();
    std::abort();
  }
  std::string what = "std::terminate was called";
  if (const std::exception_ptr thrown = std::current_exception()) {
    try {
      std::rethrow_exception(thrown);
    } catch (const std::exception& e) {
      what = fmt::format("it threw: {}", e.what());
    } catch (...) {
      what = "it threw an exception that is not a std::exception";
    }
  }
  std::fprintf(stderr,
               "%s: internal error: %s: cannot load: %s while the library's static initialisers ran; a plugin's "
               "code must not throw while its library is loaded\n",
               program_invocation_short_name, path, what.c_str());
  std::fflush(stderr);
  std::_Exit(3);
}

// Holds terminate_while_loading in place for one library's load.
class NameLibraryOnTerminate {
 public:
  explicit NameLibraryOnTerminate(const std::string& path) : lock_(g_loading_mutex) {
    t_loading_path = path.c_str();
    g_previous_terminate = std::set_terminate(terminate_while_loading);
  }
  ~NameLibraryOnTerminate() {
    std::set_terminate(g_previous_terminate);
    t_loading_path = nullptr;
  }
  NameLibraryOnTerminate(const NameLibraryOnTerminate&) = delete;
  NameLibraryOnTerminate& operator=(const NameLibraryOnTerminate&) = delete;

 private:
  std::lock_guard<std::mutex> lock_;
};

}  // namespace

std::string PluginLoader::file_name(PluginKind kind, const std::string& name) {
  return fmt::format("libdeepcam_{}_{}.so", to_string(kind), name);
}

namespace {

// The install directory is found from where libdeepcam_core was loaded
// (<libdir>/deepcam-host/plugins beside it), not from the configured prefix,
// so that an install that was moved or staged with DESTDIR finds its own
// plugins. The configured path is the fallback when dladdr cannot tell.
//
// The plugins folder of the build tree whose core library this is
// (uninstalled), or "" for an installed one: the tree it was built in, or a
// copy of a build tree (a node's local disk, a bundle for another machine),
// whose core/ holds the deepcam-host program beside the library and whose
// plugins/ lies beside core/, as no install's <libdir> does.
std::string build_tree_plugins() {
  Dl_info info{};
  if (::dladdr(reinterpret_cast<const void*>(&build_tree_plugins), &info) == 0 || info.dli_fname == nullptr)
    return "";
  const fs::path core = fs::path(info.dli_fname).parent_path();
  std::error_code ec;
  if (fs::equivalent(core, DEEPCAM_BUILD_CORE_DIR, ec)) return DEEPCAM_BUILD_PLUGIN_DIR;
  if (fs::is_regular_file(core / "deepcam-host", ec) && fs::is_directory(core.parent_path() / "plugins", ec)) {
    return (core.parent_path() / "plugins").lexically_normal().string();
  }
  return "";
}

// Uninstalled (GStreamer's word): the core library of a build tree, with no
// DEEPCAM_PLUGIN_PATH set, takes that build tree's plugins folder as its
// install directory, so that build/core/deepcam-host runs as it is; with the
// variable set it has none ("": its folders alone are searched), as a build
// tree holds no <libdir>/deepcam-host/plugins.
std::string install_dir() {
  Dl_info info{};
  if (::dladdr(reinterpret_cast<const void*>(&install_dir), &info) == 0 || info.dli_fname == nullptr)
    return DEEPCAM_PLUGIN_INSTALL_DIR;
  if (const std::string plugins = build_tree_plugins(); !plugins.empty()) {
    return split_path(std::getenv("DEEPCAM_PLUGIN_PATH")).empty() ? plugins : "";
  }
  const fs::path configured(DEEPCAM_PLUGIN_INSTALL_DIR);
  const fs::path below_libdir = configured.parent_path().filename() / configured.filename();
  // The path the dynamic linker used may hold "bin/../lib": name it plainly.
  return (fs::path(info.dli_fname).parent_path() / below_libdir).lexically_normal().string();
}

}  // namespace

PluginLoader::PluginLoader()
    : PluginLoader(split_path(std::getenv("DEEPCAM_PLUGIN_PATH")), install_dir()) {}

PluginLoader::PluginLoader(std::vector<std::string> env_dirs, std::string install_dir)
    : env_dirs_(std::move(env_dirs)), install_dir_(std::move(install_dir)) {}

std::string PluginLoader::search_path_problem() const {
  for (const std::string& dir : env_dirs_) {
    if (const std::string problem = plugin_path_entry_problem(dir); !problem.empty()) return problem;
  }
  return "";
}

std::vector<std::string> PluginLoader::search_dirs() const {
  std::vector<std::string> dirs = env_dirs_;
  if (!install_dir_.empty()) dirs.push_back(install_dir_);
  return dirs;
}

LoadedPlugin PluginLoader::open(const std::string& path) {
  std::error_code exists_ec;
  if (fs::is_directory(path, exists_ec)) {
    throw Error(fmt::format("{}: a directory, not a plugin library file", path));
  }
  const fs::file_status status = fs::status(path, exists_ec);
  if (!fs::exists(status)) {
    // A loop of links is no missing file.
    if (exists_ec && exists_ec != std::errc::no_such_file_or_directory)
      throw Error(fmt::format("{}: cannot read the plugin library: {}", path, exists_ec.message()));
    throw Error(fmt::format("{}: no such plugin library", path));
  }
  if (!fs::is_regular_file(status)) {
    throw Error(fmt::format("{}: not a plugin library file (a device, pipe or socket)", path));
  }
  if (const std::string problem = elf_problem(path); !problem.empty()) {
    throw Error(fmt::format("{}: cannot load: {}", path, problem));
  }
  auto lib = std::make_shared<boost::dll::shared_library>();
  boost::dll::fs::error_code ec;
  {
    const NameLibraryOnTerminate naming(path);
    try {
      // RTLD_LOCAL: one plugin's symbols never resolve another's.
      lib->load(path, ec, boost::dll::load_mode::rtld_local | boost::dll::load_mode::rtld_now);
    } catch (...) {
      // Where the unwinder does get through the dynamic loader's frames, the
      // initialiser's exception arrives here instead of in std::terminate,
      // past the loader's own cleanup (its lock still held): the process
      // ends the same way, naming the library.
      terminate_while_loading();
    }
  }
  if (ec) {
    // Boost.DLL reduces the loader's message to an errno text ("Bad file
    // descriptor"); dlerror() after a second attempt names the real cause
    // (an undefined symbol, a missing dependency, not an ELF file).
    std::string cause = ec.message();
    if (void* handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL)) {
      ::dlclose(handle);
    } else if (const char* text = ::dlerror()) {
      cause = text;
    }
    throw Error(fmt::format("{}: cannot load: {}{}", path, cause, undefined_symbol_hint(cause)));
  }
  if (!lib->has(DEEPCAM_PLUGIN_ENTRY_NAME)) {
    for (int v = 0; v < 100; ++v) {
      const std::string other = fmt::format("deepcam_plugin_v{}", v);
      if (v != DEEPCAM_PLUGIN_ABI && lib->has(other)) {
        throw Error(fmt::format("{}: built for plugin ABI {}, this host has plugin ABI {}; rebuild the "
                                "plugin against this deepcam-host",
                                path, v, DEEPCAM_PLUGIN_ABI));
      }
    }
    throw Error(fmt::format("{}: not a deepcam-host plugin (no symbol {})", path,
                            DEEPCAM_PLUGIN_ENTRY_NAME));
  }
  auto entry = lib->get<const PluginDescriptor*()>(DEEPCAM_PLUGIN_ENTRY_NAME);
  const PluginDescriptor* d = entry();
  if (!d) {
    throw Error(fmt::format("{}: its entry point {} returned no descriptor (nullptr); a plugin defines it with "
                            "DEEPCAM_<KIND>_PLUGIN(...)",
                            path, DEEPCAM_PLUGIN_ENTRY_NAME));
  }
  if (d->abi_version != kPluginAbi) {
    throw Error(fmt::format("{}: descriptor reports plugin ABI {}, this host has plugin ABI {}", path,
                            d->abi_version, kPluginAbi));
  }
  if (const std::string problem = descriptor_problem(*d); !problem.empty()) {
    throw Error(fmt::format("{}: {}; a plugin defines its descriptor with DEEPCAM_<KIND>_PLUGIN(...)", path,
                            problem));
  }
  // The host's side is what its own core was compiled with, taken from the
  // same macros as a plugin's side (deepcam/plugin_descriptor.hpp).
  const bool same_build = std::string(d->torch_version) == DEEPCAM_COMPILED_TORCH_VERSION &&
                          d->cxx11_abi == DEEPCAM_COMPILED_CXX11_ABI &&
                          std::string(d->cuda_version) == DEEPCAM_CUDA_VERSION;
  if (!same_build) {
    throw Error(fmt::format("{}: plugin built with {}; this host is built with {}; rebuild the plugin",
                            path, describe_build(d->torch_version, d->cxx11_abi, d->cuda_version),
                            describe_build(DEEPCAM_COMPILED_TORCH_VERSION, DEEPCAM_COMPILED_CXX11_ABI,
                                           DEEPCAM_CUDA_VERSION)));
  }
  if (const std::string problem = schema_problem(d->params); !problem.empty()) {
    throw Error(fmt::format("{}: the parameter schema of the {} plugin '{}' has a mistake: {}; fix the plugin's "
                            "ParamSpec array and rebuild it",
                            path, to_string(d->kind), d->name, problem));
  }
  const void* factories[] = {reinterpret_cast<const void*>(d->make_reader),
                             reinterpret_cast<const void*>(d->make_model),
                             reinterpret_cast<const void*>(d->make_optimizer),
                             reinterpret_cast<const void*>(d->make_scheduler)};
  if (!factories[static_cast<std::size_t>(d->kind)]) {
    throw Error(fmt::format("{}: descriptor has no factory for its kind", path));
  }
  return LoadedPlugin{path, d, std::shared_ptr<const void>(lib, lib.get())};
}

const LoadedPlugin& PluginLoader::load(PluginKind kind, const std::string& name,
                                       const std::string& library) {
  for (const auto& p : loaded_) {
    if (p.descriptor->kind != kind || p.descriptor->name != name) continue;
    // Loaded already (another table names it): a `library` must be that
    // same file, or one of the two would be used in silence.
    std::error_code ec;
    if (library.empty() || fs::equivalent(library, p.path, ec)) return p;
    if (fs::exists(library, ec)) {
      throw Error(fmt::format("{}: another file than {}, from which the {} plugin '{}' is loaded already for "
                              "another table; a run holds one plugin of a name: give both tables the same "
                              "`library`, or none",
                              library, p.path, to_string(kind), name));
    }
    break;  // no such file: said below as for any missing library
  }
  std::string path = library;
  std::vector<std::string> searched;
  if (path.empty()) {
    if (const std::string problem = search_path_problem(); !problem.empty()) throw Error(problem);
    // Level 2 (DEEPCAM_PLUGIN_PATH) as a whole, then level 3 (install dir).
    std::vector<std::vector<std::string>> levels = {env_dirs_};
    if (!install_dir_.empty()) levels.push_back({install_dir_});
    for (const auto& level : levels) {
      std::vector<std::string> found;
      for (const auto& dir : level) {
        for (const auto& c : candidates(dir, kind, name)) {
          searched.push_back(c.string());
          std::error_code ec;
          // The same file reached twice (a folder named twice in
          // DEEPCAM_PLUGIN_PATH, or through a link) is one plugin.
          const auto same_file = [&](const std::string& f) { return fs::equivalent(f, c, ec); };
          if (fs::is_regular_file(c, ec)) {
            if (std::none_of(found.begin(), found.end(), same_file)) found.push_back(c.string());
          } else if (fs::exists(fs::symlink_status(c, ec))) {
            // Named as the plugin but not a file: a mistake to say, not to pass over.
            throw Error(fmt::format("{}: named as the {} plugin '{}' but {}", c.string(), to_string(kind), name,
                                    fs::is_symlink(fs::symlink_status(c, ec)) && !fs::exists(c, ec)
                                        ? "a link to nothing"
                                        : "not a file"));
          }
        }
      }
      if (found.size() > 1) {
        throw Error(fmt::format("{} '{}' is provided twice: {} and {}; remove one or set the table's "
                                "`library` key",
                                to_string(kind), name, found[0], found[1]));
      }
      if (found.size() == 1) {
        path = found[0];
        break;
      }
    }
  }
  if (path.empty()) {
    std::vector<std::string> problems;
    std::string known;
    std::vector<std::string> names;
    for (const auto& p : discover(problems, kind)) {
      if (p.descriptor->kind != kind) continue;
      known += fmt::format("{}{} ({})", known.empty() ? "" : ", ", p.descriptor->name, p.path);
      names.emplace_back(p.descriptor->name);
    }
    const std::string closest = closest_match(name, names);
    // The build tree's host drops its own plugins folder while the variable
    // is set (install_dir()): say so, unless the variable names that folder.
    std::string build_tree;
    std::error_code ec;
    if (const std::string plugins = build_tree_plugins();
        install_dir_.empty() && !plugins.empty() &&
        std::none_of(env_dirs_.begin(), env_dirs_.end(),
                     [&](const std::string& d) { return fs::equivalent(d, plugins, ec); })) {
      build_tree = fmt::format("; the host of a build tree searches DEEPCAM_PLUGIN_PATH alone while it is set, not "
                               "its own {}: DEEPCAM_PLUGIN_PATH={}:{} searches both",
                               plugins, fmt::join(env_dirs_, ":"), plugins);
    }
    throw Error(fmt::format("no {} plugin named '{}'{}; found: {}. Searched {} (set DEEPCAM_PLUGIN_PATH "
                            "or the table's `library` key){}",
                            to_string(kind), name,
                            closest.empty() ? "" : fmt::format(" (did you mean '{}'?)", closest),
                            known.empty() ? "none" : known, fmt::join(searched, ", "), build_tree));
  }
  LoadedPlugin plugin = open(path);
  if (plugin.descriptor->kind != kind || plugin.descriptor->name != name) {
    throw Error(fmt::format("{}: is the {} plugin '{}', but the config asks for the {} plugin '{}'",
                            path, to_string(plugin.descriptor->kind), plugin.descriptor->name,
                            to_string(kind), name));
  }
  loaded_.push_back(std::move(plugin));
  return loaded_.back();
}

namespace {

// A file found by its name on the search path must be the plugin its name
// says, as load() requires of the file it looks up by that name.
std::string name_problem(const fs::path& file, const PluginDescriptor& d) {
  const std::string expected = PluginLoader::file_name(d.kind, d.name);
  if (file.filename() == expected) return "";
  return fmt::format("{}: is the {} plugin '{}', whose file must be named {}: a run finds a plugin by its file "
                     "name and refuses a file that holds another; rename the file or the plugin",
                     file.string(), to_string(d.kind), d.name, expected);
}

}  // namespace

std::vector<LoadedPlugin> PluginLoader::discover(std::vector<std::string>& problems) {
  return discover_named(problems, "libdeepcam_");
}

std::vector<LoadedPlugin> PluginLoader::discover(std::vector<std::string>& problems, PluginKind kind) {
  return discover_named(problems, fmt::format("libdeepcam_{}_", to_string(kind)));
}

std::vector<LoadedPlugin> PluginLoader::discover_named(std::vector<std::string>& problems,
                                                       const std::string& prefix) {
  // Listing opens only files named like plugins, in the places load() looks.
  std::vector<LoadedPlugin> out;
  std::vector<fs::path> files;
  // The level of each file (as load() searches them): DEEPCAM_PLUGIN_PATH 0, the install directory 1.
  std::vector<int> levels;
  const std::vector<std::string> dirs = search_dirs();
  for (std::size_t d = 0; d < dirs.size(); ++d) {
    const std::string& dir = dirs[d];
    std::error_code ec;
    if (d < env_dirs_.size()) {
      if (const std::string problem = plugin_path_entry_problem(dir); !problem.empty()) problems.push_back(problem);
    }
    if (!fs::is_directory(dir, ec)) continue;
    const std::size_t first_of_dir = files.size();
    for (const auto& top : fs::directory_iterator(dir, ec)) files.push_back(top.path());
    for (PluginKind kind : kKinds) {
      const fs::path sub = fs::path(dir) / (std::string(to_string(kind)) + "s");
      if (!fs::is_directory(sub, ec)) continue;
      for (const auto& plugin_dir : fs::directory_iterator(sub, ec)) {
        if (!plugin_dir.is_directory(ec)) continue;
        for (const auto& f : fs::directory_iterator(plugin_dir.path(), ec)) files.push_back(f.path());
      }
    }
    // In name order, not the file system's: a listing reads the same every time.
    std::sort(files.begin() + static_cast<std::ptrdiff_t>(first_of_dir), files.end());
    levels.resize(files.size(), d < env_dirs_.size() ? 0 : 1);
  }
  std::vector<fs::path> opened;
  std::vector<int> out_levels;
  for (std::size_t i = 0; i < files.size(); ++i) {
    const fs::path& f = files[i];
    const std::string n = f.filename().string();
    if (n.rfind(prefix, 0) != 0 || f.extension() != ".so" || n == "libdeepcam_core.so") continue;
    // The same file reached twice (a folder named twice on the path) is listed once.
    std::error_code ec;
    if (std::any_of(opened.begin(), opened.end(), [&](const fs::path& o) { return fs::equivalent(o, f, ec); }))
      continue;
    opened.push_back(f);
    try {
      LoadedPlugin plugin = open(f.string());
      if (const std::string problem = name_problem(f, *plugin.descriptor); !problem.empty()) throw Error(problem);
      // A run takes the first file of a kind and name, from the first level
      // that has one, and refuses two of one level: a listing says which.
      const auto first = std::find_if(out.begin(), out.end(), [&](const LoadedPlugin& o) {
        return o.descriptor->kind == plugin.descriptor->kind &&
               std::string(o.descriptor->name) == plugin.descriptor->name;
      });
      if (first != out.end()) {
        const auto twice = [](const std::string& other) {
          return fmt::format("provided twice, with {}: a run refuses both; remove one or set the table's `library`",
                             other);
        };
        if (out_levels[static_cast<std::size_t>(first - out.begin())] == levels[i]) {
          // Neither is what a run loads: both are marked.
          plugin.not_used_because = twice(first->path);
          if (first->not_used_because.empty()) first->not_used_because = twice(plugin.path);
        } else {
          plugin.not_used_because = fmt::format("shadowed by {}", first->path);
        }
      }
      out.push_back(std::move(plugin));
      out_levels.push_back(levels[i]);
    } catch (const Error& e) {
      problems.push_back(e.what());
    }
  }
  return out;
}

namespace {

// A factory's failure, already named with its plugin's file: a wrapping
// plugin (prefetch) that called a nested factory passes it on as it is.
class FactoryFailure final : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

}  // namespace

void rethrow_factory_failure(const std::string& path) {
  try {
    throw;
  } catch (const FactoryFailure&) {
    throw;  // a nested plugin's, named with its own file
  } catch (const PluginBug& e) {
    throw FactoryFailure(fmt::format("{}: a bug in the plugin: {}", path, e.what()));
  } catch (const StopRequested& e) {
    if (e.signal() >= 1 && e.signal() < NSIG) throw;  // SIGINT or SIGTERM stopped its work
    throw FactoryFailure(
        fmt::format("{}: a bug in the plugin: it stopped for signal {}, which is no signal: {}", path, e.signal(),
                    e.what()));
  } catch (const Error&) {
    throw;  // the plugin's own message about the run
  } catch (const c10::Error& e) {
    // what() carries LibTorch's C++ backtrace, of no use to the user.
    throw FactoryFailure(fmt::format("{}: the plugin's factory failed: {}", path, e.what_without_backtrace()));
  } catch (const std::exception& e) {
    throw FactoryFailure(fmt::format("{}: the plugin's factory failed: {}", path, e.what()));
  } catch (...) {
    throw FactoryFailure(
        fmt::format("{}: the plugin's factory threw an exception that is not a std::exception", path));
  }
}

}  // namespace deepcam
