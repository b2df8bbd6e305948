// SIGINT and SIGTERM for deepcam-data's writers (synth, stats, convert,
// package): a signal stops the work between files, so that every file being
// written is finished and renamed into place, or removed, before the process
// ends; a killed writer left its temporary (the next run removed it).
//
// stop_on_signals() installs the handler, which only records the signal
// (deepcam/stop_request.hpp, where a reader staging for `read` sees it too).
// The loops call throw_if_stopped() before each file: it throws Stopped,
// which unwinds through the writers' clean-up like any failure. main()
// reports it and ends the process by the same signal, with its default
// action, so that a shell or a batch system sees the process as killed by
// it. A second signal, while the first is being handled, ends the process at
// once (SA_RESETHAND). A signal the process was started ignoring (SIGINT in
// a shell's background job, nohup) stays ignored.
#pragma once

#include <signal.h>

#include <csignal>

#include "deepcam/stop_request.hpp"

namespace deepcam::data {

// Thrown by throw_if_stopped(). Not a std::exception: no handler meant for
// a failure (one that prints what() and carries on) takes it for one.
struct Stopped {
  int signal;
};

extern "C" inline void record_stop_signal(int signal) { record_stop_request(signal); }

inline void stop_on_signals() { catch_stop_signals(record_stop_signal, SA_RESETHAND); }

inline void throw_if_stopped() {
  if (const int signal = stop_requested()) throw Stopped{signal};
}

}  // namespace deepcam::data
