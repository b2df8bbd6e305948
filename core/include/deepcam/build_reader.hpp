// Builds the reader a run file names, with the ReaderContext the run's
// [run] and [data] tables give it. Shared by the engine (training) and by
// `deepcam-data read` (the reader alone, for benchmarks), so that both build
// the reader exactly alike.
#pragma once

#include "deepcam/config.hpp"
#include "deepcam/export.hpp"
#include "deepcam/plugin_loader.hpp"
#include "deepcam/reader.hpp"

namespace deepcam {

class MlperfLog;

// The context from [data] root and channels and the [run] batch sizes, seed
// and device; `log` (may be null) receives the staging events.
DEEPCAM_API ReaderContext reader_context(const RunConfig& config, int rank, int world_size, MlperfLog* log);

// Calls the reader plugin's factory; the result holds the plugin's library.
DEEPCAM_API Plugged<Reader> build_reader(const RunConfig& config, const ReaderContext& context);

}  // namespace deepcam
