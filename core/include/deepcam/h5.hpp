// A thin RAII layer over the HDF5 C library, shared by the hdf5 reader and
// deepcam-data. Every failure throws deepcam::Error naming the file and the
// dataset. Reads go through HDF5's type conversion, so any numeric type on
// disk is read into the type the caller asks for; read_stored keeps the type
// on disk instead, for copies that must not change it (deepcam-data convert).
//
// HDF5 runs one call at a time, process-wide. So that threads reading
// different files read in parallel, a dataset stored as one plain run of
// bytes (contiguous, unfiltered, allocated, a standard integer or IEEE
// float type) is read with pread() outside HDF5, HDF5 only saying where the
// bytes lie; the values are those HDF5 would give, bit for bit. Every other
// dataset, and every conversion that is not exact (float64 to float32, say),
// goes through H5Dread as before.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "deepcam/export.hpp"

namespace deepcam::h5 {

using Shape = std::vector<std::uint64_t>;

// How a dataset's elements are stored in the file.
struct StoredType {
  enum class Kind { Integer, Float, Enum, String, Compound, Other };
  Kind kind = Kind::Other;
  bool is_signed = false;   // integers: two's complement; floats: always true
  std::size_t size = 0;     // bytes per element
  bool big_endian = false;  // integers and floats
};

// A dataset's bytes mapped read-only from its file (File::map_stored):
// page-cache pages, no copy. Unmapped when destroyed; stays valid after the
// File is closed.
class DEEPCAM_API MappedBytes {
 public:
  MappedBytes() = default;
  MappedBytes(MappedBytes&& other) noexcept;
  MappedBytes& operator=(MappedBytes&& other) noexcept;
  MappedBytes(const MappedBytes&) = delete;
  MappedBytes& operator=(const MappedBytes&) = delete;
  ~MappedBytes();

  const void* data() const { return data_; }
  explicit operator bool() const { return data_ != nullptr; }

 private:
  friend class File;
  void* base_ = nullptr;  // the page-aligned start of the mapping
  std::size_t length_ = 0;
  const void* data_ = nullptr;
};

// Makes HDF5 keep, once they are closed, what `files` files open at the same
// time need (their metadata caches, about 512 KiB each), so that opening
// that many files later takes no fresh memory from the system. A reader
// that opens one file per sample on `files` threads calls it before it
// starts; it opens and closes in-memory files, nothing on disk.
DEEPCAM_API void keep_room_for_open_files(int files);

class DEEPCAM_API File {
 public:
  // Opens an existing file read-only.
  static File open(const std::string& path);
  // Creates (truncates) a file for writing. Callers write to a temporary
  // name and rename it when complete (see write_atomically in the tools).
  static File create(const std::string& path);

  File(File&& other) noexcept;
  File& operator=(File&& other) noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File();

  const std::string& path() const { return path_; }
  // False when no link of that name is in the file; an Error naming HDF5's
  // cause when one is but cannot be followed to a dataset (a group, a soft
  // link that loops or dangles, damaged metadata).
  bool has(const std::string& dataset) const;
  Shape shape(const std::string& dataset) const;
  StoredType stored_type(const std::string& dataset) const;
  // The element count must equal the dataset's size.
  void read(const std::string& dataset, float* out, std::size_t count) const;
  void read(const std::string& dataset, double* out, std::size_t count) const;
  void read(const std::string& dataset, std::int64_t* out, std::size_t count) const;
  // Reads an integer or float dataset in its stored type (float16 too), in
  // this machine's byte order; bytes must equal its element count times
  // stored_type(dataset).size.
  void read_stored(const std::string& dataset, void* out, std::size_t bytes) const;
  // Whether the dataset's bytes qualify for the read outside HDF5 (see the
  // top of this file): then read_stored always takes it, and read() does
  // when the conversion is exact (the same type, or a widening one). For
  // tests and diagnostics; reads decide this by themselves.
  bool reads_directly(const std::string& dataset) const;
  // The dataset's bytes mapped from the file, when it qualifies for the read
  // outside HDF5 and is stored in this machine's byte order: a reader can
  // then decode straight from the page cache instead of copying the bytes
  // first. An empty MappedBytes otherwise (then read it). bytes must equal
  // its element count times stored_type(dataset).size; a file shorter than
  // the dataset is an error.
  MappedBytes map_stored(const std::string& dataset, std::size_t bytes) const;
  // Creates the dataset (and its groups); a scalar when shape is empty.
  void write(const std::string& dataset, const float* data, const Shape& shape);
  void write(const std::string& dataset, const double* data, const Shape& shape);
  void write(const std::string& dataset, const std::int32_t* data, const Shape& shape);
  void write(const std::string& dataset, const std::int64_t* data, const Shape& shape);
  void close();

 private:
  File(std::string path, std::int64_t id, int fd) : path_(std::move(path)), id_(id), fd_(fd) {}
  std::string path_;
  std::int64_t id_ = -1;
  // A duplicate of HDF5's own descriptor of a file opened for reading (so
  // the very file HDF5 has open), for the reads outside HDF5; -1 when HDF5
  // does not use a plain file (another driver) or the file was created.
  int fd_ = -1;
};

}  // namespace deepcam::h5
