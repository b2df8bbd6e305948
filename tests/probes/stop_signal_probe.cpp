// A storm of stop signals over oneDNN's GEMM convolutions, for
// tests/integration/test_stop_signal_thread.py.
//
//   stop_signal_probe STEPS
//
// Takes SIGINT and SIGTERM as deepcam-host does (a thread of their own,
// deepcam/stop_request.hpp) with a handler that counts them and stops
// nothing, prints "ready", then runs STEPS dilated 3x3 convolutions of one
// input (the ASPP's kind: on an AVX2 CPU, oneDNN runs them as GEMMs whose
// kernel points the stack pointer into a heap buffer), while the test sends
// SIGTERM as fast as it can. Prints one JSON line: the steps, those whose
// output differs from the first one's, the signals handled, and those
// handled on the main thread. With the handler run on the convolution's
// thread, the probe died of a corrupted heap within about 30000 signals
// sent (about 1000 from a shell's kill loop).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>

#include "deepcam/error.hpp"
#include "deepcam/stop_request.hpp"

namespace {

std::atomic<long> g_handled{0};
std::atomic<long> g_on_main{0};
pid_t g_main = 0;

extern "C" void count_signal(int) {
  g_handled.fetch_add(1);
  if (static_cast<pid_t>(::syscall(SYS_gettid)) == g_main) g_on_main.fetch_add(1);
}

}  // namespace

int main(int argc, char** argv) {
  const long steps = argc == 2 ? std::atol(argv[1]) : 0;
  if (steps < 1) {
    std::fprintf(stderr, "usage: stop_signal_probe STEPS\n");
    return 2;
  }
  try {
    deepcam::take_stop_signals_on_own_thread();
  } catch (const deepcam::Error& e) {
    std::fprintf(stderr, "stop_signal_probe: %s\n", e.what());
    return 3;
  }
  g_main = ::getpid();
  deepcam::catch_stop_signals(count_signal);
  at::set_num_threads(1);
  at::manual_seed(5);
  const at::Tensor input = at::randn({4, 128, 4, 6});
  const at::Tensor weight = at::randn({32, 128, 3, 3}).requires_grad_();
  auto convolve = [&] { return at::conv2d(input, weight, {}, 1, 12, 12); };
  const at::Tensor first = convolve().detach();
  std::printf("ready\n");
  std::fflush(stdout);
  long differ = 0;
  for (long i = 0; i < steps; ++i) {
    if (!at::equal(convolve().detach(), first)) ++differ;
  }
  std::printf("{\"steps\": %ld, \"differ\": %ld, \"handled\": %ld, \"on_main\": %ld}\n", steps, differ,
              g_handled.load(), g_on_main.load());
  return 0;
}
