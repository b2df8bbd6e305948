// Out-of-line destructors anchor each interface's vtable and type information
// in the core library, so that host and plugins share one copy of each.
#include "deepcam/error.hpp"
#include "deepcam/group.hpp"
#include "deepcam/model.hpp"
#include "deepcam/optimizer.hpp"
#include "deepcam/plugin.hpp"
#include "deepcam/reader.hpp"
#include "deepcam/scheduler.hpp"

namespace deepcam {

Error::~Error() = default;
PluginBug::~PluginBug() = default;
Group::~Group() = default;
Reader::~Reader() = default;
Model::~Model() = default;
Optimizer::~Optimizer() = default;
Scheduler::~Scheduler() = default;

const char* to_string(Split split) {
  return split == Split::Train ? "train" : "validation";
}

const char* to_string(PluginKind kind) {
  switch (kind) {
    case PluginKind::Reader: return "reader";
    case PluginKind::Model: return "model";
    case PluginKind::Optimizer: return "optimizer";
    case PluginKind::Scheduler: return "scheduler";
  }
  return "unknown";
}

}  // namespace deepcam
