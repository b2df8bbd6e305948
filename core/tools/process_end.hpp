// How deepcam-host and deepcam-data end once main's work is done: main()
// returns end_process(status) after every object of the run is gone (the
// engine, the readers, the plugin libraries), so that nothing of ours is
// left for static destructors.
//
// LibTorch's static destructors take a fifth of a second, about a third of
// a short command's time (--version, a refused run file): they take each of
// its thousands of operators out of the dispatcher again. A process that
// never loaded the CUDA driver ends without them (_exit, after stdio is
// flushed): nothing of it needs them. One that loaded the driver ends
// normally, as a PyTorch script does, so that a profiler that writes its
// data at exit (Nsight Systems, CUPTI) still gets it.
#pragma once

#include <dlfcn.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

namespace deepcam {

[[noreturn]] inline void end_process(int status) {
  std::fflush(nullptr);
  // RTLD_NOLOAD: finds the driver library only if it is loaded already.
  if (::dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD) == nullptr) ::_exit(status);
  std::exit(status);
}

}  // namespace deepcam
