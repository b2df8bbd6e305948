// The process's stop request (deepcam/stop_request.hpp): one lock-free
// atomic in the core library, shared by the programs' signal handlers, the
// engine and the plugins; and the thread those handlers run on.
#include "deepcam/stop_request.hpp"

#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <system_error>
#include <thread>

namespace deepcam {
namespace {

// Lock-free, so that the handler's store is async-signal-safe.
static_assert(std::atomic<int>::is_always_lock_free);
std::atomic<int> g_stop_request{0};

// Written once, before any other thread starts; read by a forked child.
sigset_t g_start_mask;
bool g_mask_saved = false;

sigset_t stop_signals() {
  sigset_t both;
  sigemptyset(&both);
  sigaddset(&both, SIGINT);
  sigaddset(&both, SIGTERM);
  return both;
}

}  // namespace

int stop_requested() noexcept { return g_stop_request.load(); }

void record_stop_request(int signal) noexcept { g_stop_request.store(signal); }

void take_stop_signals_on_own_thread() {
  const sigset_t both = stop_signals();
  sigset_t before;
  if (const int e = ::pthread_sigmask(SIG_BLOCK, &both, &before); e != 0) {
    throw Error(fmt::format("cannot block SIGINT and SIGTERM: {}", std::strerror(e)));
  }
  try {
    std::thread([both] {
      ::pthread_sigmask(SIG_UNBLOCK, &both, nullptr);
      for (;;) ::pause();  // returns after each handler
    }).detach();
  } catch (const std::system_error& e) {
    ::pthread_sigmask(SIG_SETMASK, &before, nullptr);
    throw Error(fmt::format("cannot start the thread that takes SIGINT and SIGTERM: {}", e.what()));
  }
  g_start_mask = before;
  g_mask_saved = true;
}

bool stop_signals_on_own_thread() noexcept {
  sigset_t mask;
  if (!g_mask_saved || ::pthread_sigmask(SIG_BLOCK, nullptr, &mask) != 0) return false;
  return sigismember(&mask, SIGINT) == 1 && sigismember(&mask, SIGTERM) == 1;
}

void restore_start_signal_mask() noexcept {
  if (g_mask_saved) ::pthread_sigmask(SIG_SETMASK, &g_start_mask, nullptr);
}

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
