#include "deepcam/mapping_guard.hpp"

#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <thread>

#include "deepcam/error.hpp"

namespace deepcam {

namespace {

// The guarded ranges. A table of atomics rather than a thread_local: the
// handler runs on the faulting thread, and the first touch of a dlopen'ed
// library's thread_local on a thread may call malloc, which a signal handler
// must not. Only the thread that registered a range reads its mapping, so a
// fault address lies in at most one live range.
struct Range {
  std::atomic<bool> taken{false};
  std::atomic<std::uintptr_t> begin{0};  // 0: none; set last, cleared first
  std::atomic<std::uintptr_t> end{0};    // rounded up to a page: the mapping's end
  std::atomic<bool> faulted{false};
};

// The handler reads them: atomics that are not lock-free are not
// async-signal-safe.
static_assert(std::atomic<bool>::is_always_lock_free && std::atomic<std::uintptr_t>::is_always_lock_free);

Range g_ranges[MappingGuard::kSlots];
std::uintptr_t g_page = 4096;
struct sigaction g_previous {};

void handle_sigbus(int sig, siginfo_t* info, void* context) {
  // BUS_ADRERR: an access past the end of a mapped file. Not a hardware
  // memory error (BUS_MCEERR_*), nor a signal someone sent.
  if (info->si_code == BUS_ADRERR) {
    const auto addr = reinterpret_cast<std::uintptr_t>(info->si_addr);
    for (Range& r : g_ranges) {
      const std::uintptr_t begin = r.begin.load();
      if (begin == 0 || addr < begin) continue;
      const std::uintptr_t end = r.end.load();
      if (addr >= end) continue;
      // Every page from here on is past the new end, or soon may be: zeros
      // for all of them, one fault in all. mmap is a plain system call.
      const std::uintptr_t page = addr & ~(g_page - 1);
      void* p = ::mmap(reinterpret_cast<void*>(page), end - page, PROT_READ,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
      if (p == MAP_FAILED) break;  // cannot recover: die of it as before
      r.faulted.store(true);
      return;
    }
  }
  if (g_previous.sa_flags & SA_SIGINFO) {
    g_previous.sa_sigaction(sig, info, context);
    return;
  }
  if (g_previous.sa_handler == SIG_IGN && info->si_code <= 0) return;  // sent, and ignored
  if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN) {
    g_previous.sa_handler(sig);
    return;
  }
  // The default action, as without this handler: the signal stays blocked
  // until the handler returns, then kills (a fault would also recur).
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  ::sigemptyset(&dfl.sa_mask);
  ::sigaction(SIGBUS, &dfl, nullptr);
  ::raise(SIGBUS);
}

// The interrupted code may be between a call and its look at errno.
void on_sigbus(int sig, siginfo_t* info, void* context) {
  const int saved = errno;
  handle_sigbus(sig, info, context);
  errno = saved;
}

// Installed once, by the first guard; when the library goes (exit, or
// dlclose), the previous handler is put back unless another one has replaced
// this one since (that one chains here no longer, then, but the code it would
// call is gone either way).
struct Installation {
  Installation() {
    g_page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
    struct sigaction sa {};
    sa.sa_sigaction = on_sigbus;
    // SA_ONSTACK: keep whatever alternate stack a previous handler relied on.
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    ::sigemptyset(&sa.sa_mask);
    if (::sigaction(SIGBUS, &sa, &g_previous) != 0) {
      throw Error(std::string("cannot install the SIGBUS handler of mapped reads: ") + std::strerror(errno));
    }
  }
  ~Installation() {
    struct sigaction now {};
    if (::sigaction(SIGBUS, nullptr, &now) == 0 && (now.sa_flags & SA_SIGINFO) && now.sa_sigaction == on_sigbus) {
      ::sigaction(SIGBUS, &g_previous, nullptr);
    }
  }
};

}  // namespace

MappingGuard::MappingGuard(const void* data, std::size_t size) {
  static const Installation installed;
  (void)installed;
  const auto begin = reinterpret_cast<std::uintptr_t>(data);
  const std::uintptr_t end = (begin + size + g_page - 1) & ~(g_page - 1);
  for (;;) {
    for (int i = 0; i < kSlots; ++i) {
      if (!g_ranges[i].taken.exchange(true)) {
        slot_ = i;
        break;
      }
    }
    if (slot_ >= 0) break;
    std::this_thread::yield();
  }
  Range& r = g_ranges[slot_];
  r.faulted.store(false);
  r.end.store(end);
  r.begin.store(begin);
}

MappingGuard::~MappingGuard() {
  Range& r = g_ranges[slot_];
  r.begin.store(0);
  r.end.store(0);
  r.taken.store(false);
}

bool MappingGuard::faulted() const { return g_ranges[slot_].faulted.load(); }

void throw_changed_size(const std::string& path) {
  struct stat st {};
  const std::string now =
      ::stat(path.c_str(), &st) == 0 ? "it is " + std::to_string(st.st_size) + " bytes now" : "it is gone now";
  throw Error(path + ": shrank while it was read (" + now +
              "); was it rewritten during the run? Rewrite the data set only between runs");
}

}  // namespace deepcam
