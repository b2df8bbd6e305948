// Reads from a file's memory mapping that survive the file shrinking under
// them. A page of a mapping past the file's end raises SIGBUS when touched,
// and a file can shrink between the size check and the read (rewritten in
// place on a shared file system while a run reads it). Under read_mapping()
// such a fault ends in a deepcam::Error naming the file instead of killing
// the process.
//
// How: a SIGBUS handler, installed on first use and chaining to the one it
// replaced, that recognises a fault inside a guarded range, maps zero pages
// over the range from the faulting page to its end (MAP_FIXED, so the
// faulting load restarts and reads zeros) and marks the range. read_mapping()
// then discards whatever was decoded and throws. Nothing jumps out of the
// handler, so the guarded code may allocate, lock and throw as it likes: no
// longjmp past destructors or out of a held lock. A SIGBUS elsewhere (another
// mapping, a hardware memory error, kill) goes to the previous handler, or
// kills the process as it would have without this one.
#pragma once

#include <cstddef>
#include <string>

#include "deepcam/export.hpp"

namespace deepcam {

// Registers [data, data + size) (within one mapping made by mmap) as
// guarded until it goes. Thread-safe: one per mapping being read, from any
// thread; at most kSlots at once (more wait for one to go).
class DEEPCAM_API MappingGuard {
 public:
  static constexpr int kSlots = 1024;
  MappingGuard(const void* data, std::size_t size);
  ~MappingGuard();
  MappingGuard(const MappingGuard&) = delete;
  MappingGuard& operator=(const MappingGuard&) = delete;
  // Whether a page of the range faulted (and reads zeros since).
  bool faulted() const;

 private:
  int slot_ = -1;
};

// "<path>: shrank while it was read (it is N bytes now); ...".
[[noreturn]] DEEPCAM_API void throw_changed_size(const std::string& path);

// Runs read() over [data, data + size), mapped from the file `path`. If the
// file shrank meanwhile and read()
// touched a page past its new end, throws a deepcam::Error naming the file,
// whatever read() returned or threw (it saw zeros there).
template <class Read>
void read_mapping(const std::string& path, const unsigned char* data, std::size_t size, Read&& read) {
  if (size == 0) {
    read();
    return;
  }
  const MappingGuard guard(data, size);
  try {
    read();
  } catch (...) {
    if (guard.faulted()) throw_changed_size(path);
    throw;
  }
  if (guard.faulted()) throw_changed_size(path);
}

}  // namespace deepcam
