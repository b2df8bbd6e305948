// What a plugin library exports: one C entry point named after the ABI major
// version, returning a descriptor that the host checks before it uses
// anything else from the library.
//
// A plugin's file that defines its entry point:
//
//   #include "deepcam/plugin.hpp"
//   static const deepcam::ParamSpec kParams[] = {{"lr", deepcam::ParamType::Float, "1e-3",
//                                                  "learning rate", 0.0, 1e9}};
//   static std::unique_ptr<deepcam::Optimizer> make(const deepcam::Params& p,
//                                                    const deepcam::OptimizerContext& c) {...}
//   DEEPCAM_OPTIMIZER_PLUGIN("adam", "1.0.0", "Adam with L2 weight decay", kParams, make)
#pragma once

#include <cstdint>
#include <memory>

#include "deepcam/export.hpp"
#include "deepcam/model.hpp"
#include "deepcam/optimizer.hpp"
#include "deepcam/params.hpp"
#include "deepcam/reader.hpp"
#include "deepcam/scheduler.hpp"
#include "deepcam_build_config.h"

namespace deepcam {

constexpr std::uint32_t kPluginAbi = DEEPCAM_PLUGIN_ABI;

enum class PluginKind : std::uint32_t { Reader, Model, Optimizer, Scheduler };

DEEPCAM_API const char* to_string(PluginKind kind);

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
  const char* torch_version;   // LibTorch the plugin was compiled against
  int cxx11_abi;               // _GLIBCXX_USE_CXX11_ABI of that build
  const char* cuda_version;    // "" when built without CUDA
  ParamSchema params;
  ReaderFactory make_reader;
  ModelFactory make_model;
  OptimizerFactory make_optimizer;
  SchedulerFactory make_scheduler;
};

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
        ::deepcam::kPluginAbi, KIND, NAME, VERSION, SUMMARY, DEEPCAM_TORCH_VERSION,           \
        DEEPCAM_CXX11_ABI, DEEPCAM_CUDA_VERSION,                                              \
        ::deepcam::ParamSchema{PARAMS, sizeof(PARAMS) / sizeof(PARAMS[0])}, R, M, O, S};     \
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
