// A thin RAII layer over the HDF5 C library, shared by the hdf5 reader and
// deepcam-data. Every failure throws deepcam::Error naming the file and the
// dataset. Reads go through HDF5's type conversion, so any numeric type on
// disk is read into the type the caller asks for; read_stored keeps the type
// on disk instead, for copies that must not change it (deepcam-data convert).
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
  // Creates the dataset (and its groups); a scalar when shape is empty.
  void write(const std::string& dataset, const float* data, const Shape& shape);
  void write(const std::string& dataset, const double* data, const Shape& shape);
  void write(const std::string& dataset, const std::int32_t* data, const Shape& shape);
  void write(const std::string& dataset, const std::int64_t* data, const Shape& shape);
  void close();

 private:
  File(std::string path, std::int64_t id) : path_(std::move(path)), id_(id) {}
  std::string path_;
  std::int64_t id_ = -1;
};

}  // namespace deepcam::h5
