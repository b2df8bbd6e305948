// The process's stop request (deepcam/stop_request.hpp): one lock-free
// atomic in the core library, shared by the programs' signal handlers, the
// engine and the plugins.
#include "deepcam/stop_request.hpp"

#include <signal.h>

#include <atomic>

namespace deepcam {
namespace {

// Lock-free, so that the handler's store is async-signal-safe.
static_assert(std::atomic<int>::is_always_lock_free);
std::atomic<int> g_stop_request{0};

}  // namespace

int stop_requested() noexcept { return g_stop_request.load(); }

void record_stop_request(int signal) noexcept { g_stop_request.store(signal); }

void catch_stop_signals(void (*handler)(int), int flags) noexcept {
  struct sigaction action {};
  action.sa_handler = handler;
  action.sa_flags = flags;
  sigemptyset(&action.sa_mask);
  for (const int signal : {SIGINT, SIGTERM}) {
    struct sigaction current {};
    ::sigaction(signal, nullptr, &current);
    if (current.sa_handler != SIG_IGN) ::sigaction(signal, &action, nullptr);
  }
}

StopRequested::~StopRequested() = default;

}  // namespace deepcam
