// `deepcam-data read RUN.toml [MORE.toml]...`: the reader of a run alone,
// without a model, so that a reader's speed is measured and not the training
// step's.
//
// The run files are merged left to right, then --set, and loaded and checked
// in full as deepcam-host does (the model, optimizer and scheduler plugins
// must therefore be found too; [run] device = "cuda" needs a GPU), but
// only the reader is built (deepcam/build_reader.hpp, as the engine builds
// it, rank 0 of 1). The split is read for the given epochs; with
// --with-validation each training epoch is followed by a validation pass,
// as the engine calls the reader (start_epoch(Train, e), its batches,
// start_epoch(Validation, 0), its batches, start_epoch(Train, e + 1), ...),
// so that a reader that reads the next epoch ahead is measured as it is
// used. One JSON line on stdout gives what was read and how fast:
//
//   reader, source      the [reader] plugin, and [reader.source] if it wraps one
//   split, epochs, batches, samples, samples_per_epoch
//                       batches and samples count the validation passes too
//                       (they are read and waited for); samples_per_epoch is
//                       the split's
//   with_validation     whether validation passes were read
//   validation_batches, validation_samples   the part of batches and samples
//                       that were validation (0 without --with-validation)
//   bytes               bytes on disk of the files read (sample_files() of
//                       each sample, once per read)
//   seconds             wall time of the epochs (start_epoch to the end),
//                       without building the reader (build_seconds)
//   samples_per_s, gb_per_s   samples and bytes (1e9) over seconds
//   wait_seconds        time spent inside start_epoch() and next(): what a
//                       training step would have waited for the reader
//   wait_fraction       wait_seconds / seconds
//   wait_ms_per_batch   wait_seconds per batch
//   first_wait_seconds  the part of wait_seconds spent on each epoch's first
//                       batch (start_epoch and the first next(); validation
//                       passes included): the time a read-ahead pipeline
//                       takes to fill, unless it read the epoch ahead
//   steady_wait_fraction  the wait without those, over the time without them:
//                       how well a read-ahead keeps up once it runs
//   consume_ms          the emulated step per batch (0: none)
//   read_ms_per_batch   --consume-matched: the reader's own time per batch,
//                       measured in a first epoch without a consumer (with
//                       --with-validation, a validation pass follows it,
//                       not measured)
//   peak_rss_bytes      getrusage maximum resident set of the process
//   base_rss_bytes      the same before the reader was built (LibTorch and
//                       the plugins loaded), so the reader's share is the
//                       difference. Pages of memory-mapped files that a
//                       reader touched count as resident.
//
// The consumer sleeps: a GPU training step leaves the host's cores to the
// reader's threads, and so does a sleep.
#pragma once

#include <string>
#include <vector>

#include "deepcam/error.hpp"
#include "deepcam/plugin_loader.hpp"
#include "deepcam/reader.hpp"
#include "deepcam/stop_request.hpp"

namespace deepcam::data {

struct ReadBenchOptions {
  std::vector<std::string> run_files;  // merged left to right, as deepcam-host merges them
  std::vector<std::string> overrides;  // --set section.key=value, after every file
  Split split = Split::Train;
  int epochs = 1;
  double consume_ms = 0.0;       // emulated training step per batch
  bool consume_matched = false;  // consume_ms := the measured read time per batch
  bool with_validation = false;  // a validation pass after each training epoch (split Train only: checked by the caller)
};

// A run file or a --set refused (load_config's message, or the device it
// names missing): a bad configuration, for which deepcam-data exits 2, as
// deepcam-host does.
class BadRunFile : public Error {
 public:
  using Error::Error;
};

// A stop signal while a run file was read (from a pipe): no reader was
// built, so none staged anything.
class StoppedReadingRunFiles : public StopRequested {
 public:
  using StopRequested::StopRequested;
};

// Prints the JSON line; throws BadRunFile on a bad run file, deepcam::Error
// on a failed read. `loader` outlives the call so that an exception from a
// plugin is handled while the plugin's code is still loaded.
void run_read_bench(const ReadBenchOptions& options, PluginLoader& loader);

}  // namespace deepcam::data
