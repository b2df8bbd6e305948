// Calls into a plugin's object, and the checks of what a reader hands out,
// as the engine makes them: shared with `deepcam-data read`, so that a
// reader's fault is named the same way there (the plugin's file, "a bug in
// the plugin", an internal error) and what read measures is what training
// reads.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <fmt/format.h>

#include <csignal>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "deepcam/config.hpp"
#include "deepcam/error.hpp"
#include "deepcam/export.hpp"
#include "deepcam/params.hpp"
#include "deepcam/plugin_loader.hpp"
#include "deepcam/reader.hpp"
#include "deepcam/stop_request.hpp"

namespace deepcam {

// "[4, 16, 96, 144] float32", as a message shows what a plugin handed over.
DEEPCAM_API std::string tensor_text(const at::Tensor& t);

// The reader a wrapping reader reads through ([reader.source], as
// reader/prefetch does), or null: a fault in what the wrapper hands out may
// be that reader's.
DEEPCAM_API const NestedPlugin* nested_source(const Params& params);

// ", or in the reader plugin 'hdf5' it reads through (path)" for a wrapping
// reader, to follow "a bug in the plugin"; "" for any other plugin.
DEEPCAM_API std::string or_its_source(const PluginChoice& choice);

// Whether a LibTorch error that a plugin's call threw is no fault of the
// plugin's and passes on as it is: out of memory (the CPU allocator's comes
// as a plain c10::Error), a device's asynchronous error (raised by whatever
// call met it), a collective's failure, or any while a LibTorchErrorsPass
// lives on this thread.
DEEPCAM_API bool libtorch_error_passes(const c10::Error& e);

// Whether it is LibTorch's CPU allocator saying that it is out of memory.
DEEPCAM_API bool cpu_out_of_memory(const c10::Error& e);

// While one lives on this thread, LibTorch's errors in plugin calls pass on
// as they are: a CUDA graph's capture names its own failure (an op that
// cannot be captured is no fault of the plugin that called it).
class DEEPCAM_API LibTorchErrorsPass {
 public:
  LibTorchErrorsPass();
  ~LibTorchErrorsPass();
  LibTorchErrorsPass(const LibTorchErrorsPass&) = delete;
  LibTorchErrorsPass& operator=(const LibTorchErrorsPass&) = delete;

 private:
  bool was_;
};

// A call into a plugin's object during the run, named as a factory's
// failure is: what it throws names its file (an internal error), a
// PluginBug (a key its schema lacks, asked for in a method) as a bug in the
// plugin, and a LibTorch error as the plugin's failure. A deepcam::Error (a
// message about the run or its data, a lost rank, a stop request for a
// signal), std::bad_alloc and the LibTorch errors of libtorch_error_passes
// pass on as they are.
template <typename F>
decltype(auto) in_plugin(const PluginChoice& choice, F&& call) {
  try {
    return std::forward<F>(call)();
  } catch (const StopRequested& e) {
    if (e.signal() >= 1 && e.signal() < NSIG) throw;  // SIGINT or SIGTERM stopped its work
    throw std::logic_error(fmt::format("{}: the {} plugin '{}' stopped for signal {}, which is no signal: {} (a bug "
                                       "in the plugin{})",
                                       choice.plugin->path, to_string(choice.kind), choice.name, e.signal(), e.what(),
                                       or_its_source(choice)));
  } catch (const PluginBug& e) {
    throw std::logic_error(fmt::format("{}: {} (a bug in the {} plugin '{}'{})", choice.plugin->path, e.what(),
                                       to_string(choice.kind), choice.name, or_its_source(choice)));
  } catch (const Error&) {
    throw;
  } catch (const c10::Error& e) {
    if (libtorch_error_passes(e)) throw;
    // Not called a bug: an ATen op may refuse what the plugin was given (a
    // sample too small for the model's convolutions).
    throw std::logic_error(fmt::format("{}: the {} plugin '{}' failed in LibTorch: {}", choice.plugin->path,
                                       to_string(choice.kind), choice.name, e.what_without_backtrace()));
  } catch (const std::bad_alloc&) {
    throw;
  } catch (const std::exception& e) {
    throw std::logic_error(fmt::format("{}: the {} plugin '{}' failed: {} (a bug in the plugin{})",
                                       choice.plugin->path, to_string(choice.kind), choice.name, e.what(),
                                       or_its_source(choice)));
  } catch (...) {
    throw std::logic_error(fmt::format("{}: the {} plugin '{}' threw an exception that is not a std::exception (a "
                                       "bug in the plugin{})",
                                       choice.plugin->path, to_string(choice.kind), choice.name,
                                       or_its_source(choice)));
  }
}

// The reader's sample counts of both splits: at least one sample over all
// ranks, and this rank's share within them; else a std::logic_error naming
// the plugin (a count no data set has went into the MLPerf log).
DEEPCAM_API void check_sample_counts(const PluginChoice& choice, const Reader& reader);

// What a batch the reader handed out must be (the reader interface, on its
// sizes and dtypes): data (B, C, H, W) float32 of `channels` channels and
// the sample's H and W (`shape`, (C, H, W) as sample_shape() gives it),
// labels (B, H, W) int64, B the batch size (`full`: a training batch) or at
// most it. Anything else is a std::logic_error naming the plugin: a short
// training batch ended the epoch early, without a word.
DEEPCAM_API void check_batch(const PluginChoice& choice, const Batch& batch, Split split, std::int64_t index,
                             std::int64_t channels, const std::vector<std::int64_t>& shape, std::int64_t batch_size,
                             bool full);

// The labels' values: class ids 0 .. kClasses - 1 (deepcam/normalise.hpp), else a std::logic_error
// naming the plugin (LibTorch's "Target 7 is out of bounds" on the CPU, a
// device-side assert that ends the process on a GPU). Reads the labels:
// on a device, a wait for it.
DEEPCAM_API void check_classes(const PluginChoice& choice, const at::Tensor& labels, Split split,
                               std::int64_t index);

}  // namespace deepcam
