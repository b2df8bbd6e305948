#include "deepcam/build_reader.hpp"

#include <algorithm>
#include <string>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <stdexcept>

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

void check_sample_shape(const std::vector<std::int64_t>& shape, const ReaderContext& context) {
  const auto channels = static_cast<std::int64_t>(context.channels.size());
  if (shape.size() == 3 && shape[0] == channels && shape[1] > 0 && shape[2] > 0) return;
  throw std::logic_error(fmt::format("its sample_shape() is ({}), and a reader reports (C, H, W) of the run's {} "
                                     "channels ([data] channels), each above 0 (a bug in the plugin)",
                                     fmt::join(shape, ", "), channels));
}

void check_sample_files(const Reader& reader, bool files_needed) {
  for (const Split split : {Split::Train, Split::Validation}) {
    const std::int64_t count = reader.sample_count(split);
    if (count < 0) {
      throw std::logic_error(fmt::format("its sample_count() of the {} split is {} (a bug in the plugin)",
                                         to_string(split), count));
    }
    for (std::int64_t i = 0; i < count; ++i) {
      const std::vector<std::string> files = reader.sample_files(split, i);
      const bool unnamed = std::any_of(files.begin(), files.end(), [](const std::string& f) { return f.empty(); });
      if (unnamed || (files_needed && files.empty())) {
        throw std::logic_error(fmt::format("its sample_files() of {} sample {} is [{}]; {} (a bug in the plugin)",
                                           to_string(split), i, fmt::join(files, ", "),
                                           unnamed ? "each file has a name"
                                                   : "staging copies a sample's files, and it names none"));
      }
    }
  }
}

Plugged<Reader> build_reader(const RunConfig& config, const ReaderContext& context) {
  const PluginChoice& choice = config.reader;
  return build_plugged(*choice.plugin, [&](const PluginDescriptor& d) {
    auto made = d.make_reader(choice.params, context);
    if (made) check_sample_shape(made->sample_shape(), context);
    return made;
  });
}

}  // namespace deepcam
