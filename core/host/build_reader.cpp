#include "deepcam/build_reader.hpp"

namespace deepcam {

ReaderContext reader_context(const RunConfig& config, int rank, int world_size, MlperfLog* log) {
  const Params& run = config.run;
  ReaderContext context{config.data.string("root"),
                        config.data.integers("channels"),
                        run.integer("train_batch_size"),
                        run.integer("validation_batch_size"),
                        rank,
                        world_size,
                        static_cast<std::uint64_t>(run.integer("seed")),
                        log,
                        // The engine fills in the node's ranks once the ranks have met.
                        /*local_rank=*/0,
                        /*local_size=*/1,
                        run.string("device")};
  context.memory_format = run.string("memory_format");
  return context;
}

Plugged<Reader> build_reader(const RunConfig& config, const ReaderContext& context) {
  const PluginChoice& choice = config.reader;
  return build_plugged(*choice.plugin,
                       [&](const PluginDescriptor& d) { return d.make_reader(choice.params, context); });
}

}  // namespace deepcam
