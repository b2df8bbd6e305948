// Entry point of libdeepcam_reader_prefetch.so: the parameter schema and the
// factory. The host has already loaded and checked the source reader named
// in [reader.source]; the factory builds it with the same context and wraps it.
#include "deepcam/plugin.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "deepcam/build_reader.hpp"
#include "deepcam/error.hpp"
#include "deepcam/plugin_loader.hpp"
#include "prefetch_reader.hpp"

namespace {

const deepcam::ParamSpec kParams[] = {
    {"source", deepcam::ParamType::Plugin, nullptr, "the reader that supplies the samples", 1.0, 0.0, "reader"},
    {"depth", deepcam::ParamType::Int, "4",
     "batches read ahead of the training step, and of each epoch expected next", 1.0, 1024.0},
    {"threads", deepcam::ParamType::Int, "4", "worker threads reading samples (and staging copies)", 1.0, 256.0},
    {"shuffle_mode", deepcam::ParamType::String, "\"global\"",
     "training order: global (the reference), node or gpu (shard per node or rank, SPEC 2.2)", 1.0, 0.0,
     "global|node|gpu"},
    {"data_oversampling_factor", deepcam::ParamType::Int, "1",
     "NVIDIA's oversampling (node/gpu modes): a rank cycles through this many random shards, one per epoch", 1.0,
     1024.0},
    {"stage_dir", deepcam::ParamType::Path, "\"\"",
     "node-local directory (e.g. /dev/shm) to copy this rank's samples into at start; \"\": read in place"},
};

std::unique_ptr<deepcam::Reader> make(const deepcam::Params& params, const deepcam::ReaderContext& context) {
  const auto source = params.plugin_shared("source");
  if (!source->descriptor || !source->descriptor->make_reader) {
    throw deepcam::Error(fmt::format("{} source: {} is not a reader plugin", params.where(), source->path));
  }
  // The prefetch reader orders the samples itself (its own shuffle_mode and
  // data_oversampling_factor) and asks its source for samples by index: a
  // source's own order keys would be ignored, so a value other than the
  // key's default is refused. The default, set or filled in, changes
  // nothing (a run's config.toml writes every default, on a line of its own).
  const std::string table = params.where().substr(params.where().rfind(" [") + 1);  // "[reader]"
  for (const char* key : {"shuffle_mode", "data_oversampling_factor"}) {
    const auto value = source->params.values().find(key);
    if (value == source->params.values().end()) continue;
    const deepcam::ParamSchema& schema = source->descriptor->params;
    const auto spec = std::find_if(schema.begin(), schema.end(),
                                   [&](const deepcam::ParamSpec& s) { return std::string(s.key) == key; });
    if (spec != schema.end() && spec->default_toml && deepcam::to_toml(value->second) == spec->default_toml) continue;
    throw deepcam::Error(fmt::format("{}: the prefetch reader decides the training order, and its source's {} "
                                     "would be ignored; set {} in {} (the prefetch reader's table) instead",
                                     source->params.where(key), key, key, table));
  }
  // As the host's own factory calls: what the nested factory throws, or a
  // nullptr it returns, names the nested plugin's file.
  // Its sample shape too: the ring's buffers and the GPU's normalisation
  // are sized by it, so a wrong one would be blamed on this reader.
  deepcam::Plugged<deepcam::Reader> reader =
      deepcam::build_plugged(deepcam::LoadedPlugin{source->path, source->descriptor, source->library},
                             [&](const deepcam::PluginDescriptor& d) {
                               auto made = d.make_reader(source->params, context);
                               if (made) {
                                 deepcam::check_sample_shape(made->sample_shape(), context);
                                 // Staging copies the files: a run that stages (a split to read).
                                 const bool stages = !params.string("stage_dir").empty() && !context.splits.empty();
                                 deepcam::check_sample_files(*made, stages);
                               }
                               return made;
                             });
  // `source` holds the source's library: released after the source reader.
  return std::make_unique<deepcam::readers::PrefetchReader>(
      context, deepcam::readers::PrefetchOptions::from(params), std::move(reader.object), source);
}

}  // namespace

DEEPCAM_READER_PLUGIN("prefetch", "1.0.0",
                      "reads ahead into a ring of batch buffers on worker threads, from any reader named in "
                      "[reader.source]; shuffle modes, oversampling, staging to node-local storage",
                      kParams, make)
