// Builds the reader a run file names, with the ReaderContext the run's
// [run] and [data] tables give it. Shared by the engine (training) and by
// `deepcam-data read` (the reader alone, for benchmarks), so that both build
// the reader exactly alike.
#pragma once

#include "deepcam/config.hpp"
#include "deepcam/export.hpp"
#include "deepcam/plugin_loader.hpp"
#include "deepcam/reader.hpp"

#include <cstdint>
#include <vector>

namespace deepcam {

class MlperfLog;

// The context from [data] root and channels and the [run] batch sizes, seed
// and device; `log` (may be null) receives the staging events.
DEEPCAM_API ReaderContext reader_context(const RunConfig& config, int rank, int world_size, MlperfLog* log);

// A reader's sample_shape() must be (C, H, W) of the context's C channels,
// each above 0: the engine sizes its batches by it. Throws std::logic_error
// otherwise (a bug in the plugin), which build_plugged() turns into a
// message naming the plugin's file. For readers that build a nested reader
// (reader/prefetch), inside the nested plugin's factory call.
DEEPCAM_API void check_sample_shape(const std::vector<std::int64_t>& shape, const ReaderContext& context);

// A reader's listing of its samples, as a reader that reads through another
// (reader/prefetch) uses it: sample_count() of each split not negative, and
// sample_files() of every sample files with names, at least one where
// `files_needed` (the wrapper copies them: staging). Throws
// std::logic_error otherwise (a bug in the plugin), inside the nested
// plugin's factory call as check_sample_shape(): a count of -5 was taken
// for the wrapper's [reader] settings, an empty list for its staging's.
DEEPCAM_API void check_sample_files(const Reader& reader, bool files_needed);

// Calls the reader plugin's factory and checks its sample_shape(); the
// result holds the plugin's library.
DEEPCAM_API Plugged<Reader> build_reader(const RunConfig& config, const ReaderContext& context);

}  // namespace deepcam
