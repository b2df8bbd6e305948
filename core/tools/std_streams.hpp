// The standard streams of deepcam-host and deepcam-data: closed ones, and
// ones that cannot be written (a full disk under a job's output file,
// /dev/full).
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>

#include <fmt/format.h>

#include "deepcam/json.hpp"  // shown()

namespace deepcam {

// Opens /dev/null on each of the descriptors 0, 1 and 2 that is closed
// (`>&-`, `2>&-`): the next file the program opens would otherwise take its
// number, and what it prints to stdout or stderr would land in that file
// (the MLPerf log, a checkpoint). Called first in main, before anything is
// opened.
inline void occupy_closed_standard_fds() {
  for (int fd = 0; fd <= 2; ++fd) {
    if (::fcntl(fd, F_GETFD) != -1 || errno != EBADF) continue;
    const int opened = ::open("/dev/null", (fd == 0 ? O_RDONLY : O_WRONLY) | O_CLOEXEC);
    if (opened < 0) continue;
    if (opened != fd) {
      ::dup2(opened, fd);  // without O_CLOEXEC: children (the --nproc ranks) inherit it
      ::close(opened);
    } else {
      ::fcntl(fd, F_SETFD, 0);
    }
  }
}

// The errno of the first failed write to stdout that flush_stdout() or
// oprint() saw; 0 if none.
inline int& stdout_errno() {
  static int first = 0;
  return first;
}

// std::fflush(stdout), keeping the cause of a failure for stdout_written().
inline void flush_stdout() {
  errno = 0;
  if (std::fflush(stdout) != 0 && stdout_errno() == 0) stdout_errno() = errno;
}

// Whether everything printed to stdout reached it. When a write failed (a
// full disk under a redirect, /dev/full), stderr says so, naming the
// program and the cause, and the result is false. A reader that stopped
// reading (`| head`: EPIPE, where SIGPIPE is ignored) chose to: that is no
// failure.
inline bool stdout_written(const char* program) {
  flush_stdout();
  if (!std::ferror(stdout)) return true;
  int err = stdout_errno();
  // A write inside printf (a result longer than stdio's buffer) keeps no
  // cause: a write to a pipe or socket fails only when its reader is gone.
  struct stat st {};
  if (err == 0 && ::fstat(1, &st) == 0 && (S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode))) err = EPIPE;
  if (err == EPIPE) return true;
  std::fprintf(stderr, "%s: cannot write to standard output%s%s; what it shows there is lost\n", program,
               err != 0 ? ": " : "", err != 0 ? std::strerror(err) : "");
  return false;
}

// fmt::print(stderr, ...) that never throws: a stderr that cannot be
// written (its file's disk is full, /dev/full) must not end the work that
// the line reports on, nor turn an error into std::terminate while it is
// being reported. The line is lost; the exit status still tells.
template <typename... Args>
void eprint(fmt::format_string<Args...> format, Args&&... args) {
  const std::string text = fmt::format(format, std::forward<Args>(args)...);
  std::fwrite(text.data(), 1, text.size(), stderr);
}

// fmt::print(...) to stdout that never throws: a failed write is reported
// once, by stdout_written() at the end, with the status it sets.
template <typename... Args>
void oprint(fmt::format_string<Args...> format, Args&&... args) {
  const std::string text = fmt::format(format, std::forward<Args>(args)...);
  errno = 0;
  if (std::fwrite(text.data(), 1, text.size(), stdout) != text.size() && stdout_errno() == 0) stdout_errno() = errno;
}

}  // namespace deepcam
