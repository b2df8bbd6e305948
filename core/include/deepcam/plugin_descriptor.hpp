// The descriptor a plugin library exports and the macro that defines its
// entry point, without the interfaces' headers: the factories' types need
// only the names of the interfaces, so this header includes no ATen header
// (deepcam/plugin.hpp adds the interfaces; plugins include that one).
//
// The build a descriptor reports is taken when the plugin is compiled, from
// the compiler's _GLIBCXX_USE_CXX11_ABI and from the LibTorch headers on its
// include path (TORCH_VERSION, from a header of macros only), not from the
// SDK's deepcam_build_config.h: a plugin compiled with
// -D_GLIBCXX_USE_CXX11_ABI=0 must say so, or the host cannot refuse it. The
// host compares it with the same macros as its own core was compiled with.
#pragma once

// TORCH_VERSION; newer LibTorch keeps it in a header-only part that
// torch/version.h wraps (and refuses under TORCH_STABLE_ONLY).
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

#include <cstddef>
#include <cstdint>
#include <memory>

#include "deepcam/export.hpp"
#include "deepcam/params.hpp"
#include "deepcam_build_config.h"

// After a standard header, which defines _GLIBCXX_USE_CXX11_ABI under
// libstdc++ (as the -D flag set it, else its default); -1 for a standard
// library that is not libstdc++, which no LibTorch build of the host uses.
#if defined(_GLIBCXX_USE_CXX11_ABI)
#define DEEPCAM_COMPILED_CXX11_ABI _GLIBCXX_USE_CXX11_ABI
#else
#define DEEPCAM_COMPILED_CXX11_ABI -1
#endif
#define DEEPCAM_COMPILED_TORCH_VERSION TORCH_VERSION

namespace deepcam {

constexpr std::uint32_t kPluginAbi = DEEPCAM_PLUGIN_ABI;

enum class PluginKind : std::uint32_t { Reader, Model, Optimizer, Scheduler };

DEEPCAM_API const char* to_string(PluginKind kind);

class Reader;
class Model;
class Optimizer;
class Scheduler;
struct ReaderContext;
struct ModelContext;
struct OptimizerContext;
struct SchedulerContext;

using ReaderFactory = std::unique_ptr<Reader> (*)(const Params&, const ReaderContext&);
using ModelFactory = std::unique_ptr<Model> (*)(const Params&, const ModelContext&);
using OptimizerFactory = std::unique_ptr<Optimizer> (*)(const Params&, const OptimizerContext&);
using SchedulerFactory = std::unique_ptr<Scheduler> (*)(const Params&, const SchedulerContext&);

// The descriptor starts with the ABI version so that a host of any version can
// read that field and refuse the rest. Exactly one factory is set: the one of
// the plugin's kind.
struct PluginDescriptor {
  std::uint32_t abi_version;
  PluginKind kind;
  const char* name;
  const char* version;
  const char* summary;
  const char* torch_version;   // LibTorch the plugin was compiled against (its torch/version.h)
  int cxx11_abi;               // _GLIBCXX_USE_CXX11_ABI of the plugin's compile; -1: not libstdc++
  const char* cuda_version;    // the SDK's; "" when built without CUDA
  ParamSchema params;
  ReaderFactory make_reader;
  ModelFactory make_model;
  OptimizerFactory make_optimizer;
  SchedulerFactory make_scheduler;
};

// The macros' PARAMS: an array of ParamSpec, or nullptr for a plugin
// without parameters. A pointer to an array would have made an empty schema
// (sizeof a pointer over sizeof an entry), in which every key the plugin
// meant to declare is unknown: it does not compile.
template <std::size_t N>
constexpr ParamSchema schema_of(const ParamSpec (&specs)[N]) {
  return {specs, N};
}
constexpr ParamSchema schema_of(std::nullptr_t) { return {nullptr, 0}; }

}  // namespace deepcam

#define DEEPCAM_PLUGIN_ENTRY_CAT2(a, b) a##b
#define DEEPCAM_PLUGIN_ENTRY_CAT(a, b) DEEPCAM_PLUGIN_ENTRY_CAT2(a, b)
// deepcam_plugin_v1, deepcam_plugin_v2, ...
#define DEEPCAM_PLUGIN_ENTRY DEEPCAM_PLUGIN_ENTRY_CAT(deepcam_plugin_v, DEEPCAM_PLUGIN_ABI)
#define DEEPCAM_PLUGIN_ENTRY_NAME "deepcam_plugin_v" DEEPCAM_PLUGIN_ENTRY_STR(DEEPCAM_PLUGIN_ABI)
#define DEEPCAM_PLUGIN_ENTRY_STR2(x) #x
#define DEEPCAM_PLUGIN_ENTRY_STR(x) DEEPCAM_PLUGIN_ENTRY_STR2(x)

#define DEEPCAM_DEFINE_PLUGIN(KIND, NAME, VERSION, SUMMARY, PARAMS, R, M, O, S)             \
  extern "C" __attribute__((visibility("default"))) const ::deepcam::PluginDescriptor*      \
  DEEPCAM_PLUGIN_ENTRY() {                                                                  \
    static const ::deepcam::PluginDescriptor descriptor{                                     \
        ::deepcam::kPluginAbi, KIND, NAME, VERSION, SUMMARY, DEEPCAM_COMPILED_TORCH_VERSION,  \
        DEEPCAM_COMPILED_CXX11_ABI, DEEPCAM_CUDA_VERSION,                                     \
        ::deepcam::schema_of(PARAMS), R, M, O, S};                                            \
    return &descriptor;                                                                     \
  }

#define DEEPCAM_READER_PLUGIN(NAME, VERSION, SUMMARY, PARAMS, FACTORY) \
  DEEPCAM_DEFINE_PLUGIN(::deepcam::PluginKind::Reader, NAME, VERSION, SUMMARY, PARAMS, FACTORY, \
                        nullptr, nullptr, nullptr)
#define DEEPCAM_MODEL_PLUGIN(NAME, VERSION, SUMMARY, PARAMS, FACTORY) \
  DEEPCAM_DEFINE_PLUGIN(::deepcam::PluginKind::Model, NAME, VERSION, SUMMARY, PARAMS, nullptr, \
                        FACTORY, nullptr, nullptr)
#define DEEPCAM_OPTIMIZER_PLUGIN(NAME, VERSION, SUMMARY, PARAMS, FACTORY)                       \
  DEEPCAM_DEFINE_PLUGIN(::deepcam::PluginKind::Optimizer, NAME, VERSION, SUMMARY, PARAMS, nullptr, \
                        nullptr, FACTORY, nullptr)
#define DEEPCAM_SCHEDULER_PLUGIN(NAME, VERSION, SUMMARY, PARAMS, FACTORY)                       \
  DEEPCAM_DEFINE_PLUGIN(::deepcam::PluginKind::Scheduler, NAME, VERSION, SUMMARY, PARAMS, nullptr, \
                        nullptr, nullptr, FACTORY)
