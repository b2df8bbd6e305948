// A stop asked for by SIGTERM (a batch system's time limit, scancel) or
// SIGINT (Ctrl-C). deepcam-host and deepcam-data install the handlers, which
// record the signal here and do nothing else; the host looks at it between
// training steps and stops cleanly (SPEC 8.2). Long work a plugin does where
// the host cannot look (a reader staging a shard before training, which may
// take minutes) looks at it between pieces of that work and throws
// StopRequested, unwinding as on any error: its temporaries go, and the
// process ends before the batch system's kill follows the signal.
//
// Usage, in a plugin's loop over files:
//   for (const auto& file : files) {
//     if (const int signal = deepcam::stop_requested())
//       throw deepcam::StopRequested(signal, "staging into " + dir + " stopped after ...");
//     copy(file);
//   }
#pragma once

#include <string>

#include "deepcam/error.hpp"
#include "deepcam/export.hpp"

namespace deepcam {

// The signal that asked this process to stop, or 0. Thread-safe.
DEEPCAM_API int stop_requested() noexcept;

// Records `signal` as the stop request: async-signal-safe, for a signal
// handler. 0 withdraws a request (for tests).
DEEPCAM_API void record_stop_request(int signal) noexcept;

// Blocks SIGINT and SIGTERM in the calling thread, and so in every thread it
// starts from then on, and starts one thread that leaves them unblocked and
// does nothing else: the kernel gives those signals to that thread alone, and
// the handlers catch_stop_signals installs run there. Called first in main(),
// before any other thread exists; throws Error if the thread cannot start
// (the mask is then as it was).
//
// Why: a handler runs below the stack pointer of the thread the signal
// interrupts. oneDNN 3.10's x64 GEMM kernels (LibTorch 2.11's CPU
// convolutions, among them the ASPP's dilated ones) point the stack pointer
// into a heap buffer while they run, so a handler run on a training thread
// wrote its frame over the heap: one SIGTERM stop in 20 to 200 ended in
// glibc's "corrupted size vs. prev_size", or a NaN gradient. (oneDNN issue
// 4845, fixed upstream after 3.10.)
DEEPCAM_API void take_stop_signals_on_own_thread();

// Whether take_stop_signals_on_own_thread() was called and the calling
// thread still blocks SIGINT and SIGTERM: run_engine refuses to run
// otherwise, since its handlers could then run on a training thread.
DEEPCAM_API bool stop_signals_on_own_thread() noexcept;

// Sets the calling thread's signal mask back to the one the process had
// before take_stop_signals_on_own_thread(): for a child between fork and
// exec, so that the program it runs starts as this one did.
// Async-signal-safe; does nothing if that function was not called.
DEEPCAM_API void restore_start_signal_mask() noexcept;

// Installs `handler`, with sigaction's `flags`, for SIGINT and SIGTERM,
// except for a signal the process was started ignoring (SIGINT in a shell
// script's background job): that one stays ignored, as Python leaves it.
// For the programs' own handlers; a plugin installs none.
DEEPCAM_API void catch_stop_signals(void (*handler)(int), int flags = 0) noexcept;

// Work stopped by a stop request. An Error, so that clean-up written for
// errors runs; deepcam-host and deepcam-data end with the signal's status
// rather than an error's. The message says what was stopped and how far it
// had come.
class DEEPCAM_API StopRequested : public Error {
 public:
  StopRequested(int signal, const std::string& message) : Error(message), signal_(signal) {}
  ~StopRequested() override;
  int signal() const noexcept { return signal_; }

 private:
  int signal_;
};

}  // namespace deepcam
