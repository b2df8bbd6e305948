// The NumPy .npy format (format versions 1.0, 2.0 and 3.0), shared by the
// npy reader and deepcam-data (convert, verify). Every failure throws
// deepcam::Error naming the file and what is wrong with it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "deepcam/export.hpp"

namespace deepcam::npy {

// The element types a data set may carry. Anything else (object arrays,
// strings, structured or complex dtypes) is refused when the header is parsed.
enum class DType { Bool, Int8, Int16, Int32, Int64, UInt8, UInt16, UInt32, UInt64, Float16, Float32, Float64 };

DEEPCAM_API const char* to_string(DType dtype);     // "float32", ...
DEEPCAM_API std::size_t item_size(DType dtype);

struct DEEPCAM_API Header {
  int major = 1;                     // format version
  int minor = 0;
  DType dtype = DType::Float32;
  bool big_endian = false;           // '>' in descr; '|' and '<' are little
  bool fortran_order = false;
  std::vector<std::int64_t> shape;
  std::size_t data_offset = 0;       // bytes from the start of the file to the data
  std::int64_t count() const;        // product of shape (1 for a scalar)
  std::size_t data_bytes() const;    // count() * item_size(dtype)
};

// Parses the header at the start of `bytes` (at least the whole header; the
// caller may pass the whole file). `file` is only used in messages.
DEEPCAM_API Header parse_header(const std::string& file, const void* bytes, std::size_t size);

// Reads and parses the header of a file, and checks that the file holds
// exactly data_offset + data_bytes() bytes ("header promises N bytes, file
// has M"; bytes after the data: trailing_bytes_problem()).
DEEPCAM_API Header read_header(const std::string& path);

// "" when a file of `file_size` bytes ends where `header`'s data ends; else
// what is wrong with the bytes after it. numpy.load reads past them, but
// numpy never writes them: a header whose dtype or shape does not describe
// the file reads as the wrong values.
DEEPCAM_API std::string trailing_bytes_problem(const Header& header, std::size_t file_size);

// "" unless a DeepCAM sample's array (its data or its labels) is stored as
// bool (|b1), which holds no climate values and no class 2: the readers and
// verify refuse it, as the hdf5 reader refuses h5py's bool (an HDF5 enum).
DEEPCAM_API std::string bool_sample_problem(const Header& header);

// The header bytes (magic, version, length, dict, padding, '\n') that numpy.save
// would write for a C-order little-endian array of `dtype` and `shape`; the
// data offset is a multiple of 64. Version 1.0 unless the header needs 2.0.
DEEPCAM_API std::string make_header(DType dtype, const std::vector<std::int64_t>& shape);

// Writes a C-order little-endian array to `path` under a temporary name in the
// same directory, then renames it: a failure (a full disk included) leaves no
// file at `path` and no temporary behind.
DEEPCAM_API void write(const std::string& path, DType dtype, const std::vector<std::int64_t>& shape,
                       const void* data);

// Converts `count` elements stored as `header` describes (byte order included)
// to float32 or int64. Float-to-int64 conversion requires integral values and
// throws naming `file` otherwise. Fortran-order data comes out in C order (as
// numpy.load returns it); it can only be converted whole (count == header.count()).
DEEPCAM_API void convert(const std::string& file, const Header& header, const void* src, float* dst,
                         std::int64_t count);
DEEPCAM_API void convert(const std::string& file, const Header& header, const void* src,
                         std::int64_t* dst, std::int64_t count);

}  // namespace deepcam::npy
