// What a plugin library exports: one C entry point named after the ABI major
// version, returning a descriptor that the host checks before it uses
// anything else from the library (deepcam/plugin_descriptor.hpp), and the
// interfaces a plugin implements.
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

#include "deepcam/model.hpp"
#include "deepcam/optimizer.hpp"
#include "deepcam/params.hpp"
#include "deepcam/plugin_descriptor.hpp"
#include "deepcam/reader.hpp"
#include "deepcam/scheduler.hpp"
