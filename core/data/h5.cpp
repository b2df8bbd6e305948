// deepcam::h5 over the HDF5 C API (1.10). Three things shape this file:
// - HDF5 prints its error stack to stderr by default; we silence it and turn
//   the innermost message of the stack into the cause of a deepcam::Error.
//   In a thread-safe build the error stack (and its auto-print setting) is
//   per thread, so every thread silences its own on first use.
// - A library built without thread safety must never be entered by two
//   threads at once: then every call goes through one global mutex.
// - Datasets and groups are created without modification times, so that the
//   same content gives the same bytes (deepcam-data synth is reproducible to
//   the byte).
// - HDF5 runs one call at a time even in its thread-safe build, so readers
//   on several threads would wait for each other's H5Dread. A dataset whose
//   bytes lie in one run in the file (contiguous layout, no filters, no
//   external storage, allocated, a standard integer or IEEE type) is read
//   instead with pread() on a duplicate of HDF5's own descriptor, after
//   HDF5 said where the run lies, and outside the lock. Only conversions
//   whose result HDF5's own equals bit for bit are done here: the same type
//   (byte order swapped if need be; HDF5 swaps bytes too), integer widening,
//   and float32 to float64 from this machine's byte order (from the other
//   order HDF5 converts with its own soft routine, whose NaNs need not be a
//   C cast's). Anything else reads through H5Dread as before.
#include "deepcam/h5.hpp"

#include <fcntl.h>
#include <hdf5.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "deepcam/error.hpp"
#include "deepcam/mlperf_log.hpp"

namespace deepcam::h5 {
namespace {

static_assert(std::is_same_v<hid_t, std::int64_t>,
              "File stores the HDF5 id as std::int64_t; hid_t must be 64-bit (HDF5 >= 1.10)");

// Asked once, before HDF5's first call (every public operation's Lock asks
// it first). It also leaves out HDF5's atexit handler, which closes what is
// still open at exit: a file whose H5Fclose failed (a full disk) stays in
// its tables half-closed, and that handler then crashed (SIGSEGV in
// H5F__close_cb) after the error was reported. Every file here is closed
// explicitly and written under a temporary name, so nothing is lost.
bool library_is_threadsafe() {
  static const bool safe = [] {
    H5dont_atexit();
    hbool_t threadsafe = false;
    return H5is_library_threadsafe(&threadsafe) >= 0 && threadsafe;
  }();
  return safe;
}

std::recursive_mutex& library_mutex() {
  static std::recursive_mutex mutex;
  return mutex;
}

// Held for the whole of every public operation; declared first in each
// function so that every HDF5 handle is closed before it is released.
class Lock {
 public:
  Lock() {
    if (!library_is_threadsafe()) lock_ = std::unique_lock<std::recursive_mutex>(library_mutex());
    thread_local bool silenced = false;
    if (!silenced) {
      H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
      silenced = true;
    }
  }

 private:
  std::unique_lock<std::recursive_mutex> lock_;
};

class Handle {
 public:
  Handle(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  Handle(Handle&& other) noexcept : id_(other.id_), close_(other.close_) { other.id_ = -1; }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  Handle& operator=(Handle&&) = delete;
  ~Handle() {
    if (id_ >= 0) close_(id_);
  }
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }

 private:
  hid_t id_;
  herr_t (*close_)(hid_t);
};

herr_t keep_innermost(unsigned n, const H5E_error2_t* err, void* data) {
  if (n == 0 && err->desc) *static_cast<std::string*>(data) = err->desc;
  return 0;
}

herr_t keep_all(unsigned, const H5E_error2_t* err, void* data) {
  if (err->desc) *static_cast<std::string*>(data) += std::string(err->desc) + "\n";
  return 0;
}

// The innermost message of this thread's error stack (where HDF5 first
// noticed the problem), on one line; the stack is cleared. `whole`, if
// given, gets every message of the stack, for a cause that shows anywhere.
std::string hdf5_cause(std::string* whole = nullptr) {
  std::string cause;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, keep_innermost, &cause);
  if (whole) H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, keep_all, whole);
  H5Eclear2(H5E_DEFAULT);
  for (char& c : cause)
    if (c == '\n' || c == '\r') c = ' ';
  while (!cause.empty() && cause.back() == ' ') cause.pop_back();
  return cause;
}

[[noreturn]] void fail(const std::string& file, const std::string& dataset, const std::string& what,
                       bool with_cause = true) {
  std::string message = dataset.empty() ? fmt::format("{}: {}", file, what)
                                        : fmt::format("{}: dataset {}: {}", file, dataset, what);
  if (with_cause) {
    const std::string cause = hdf5_cause();
    if (!cause.empty()) message += fmt::format(" (HDF5: {})", cause);
  } else {
    H5Eclear2(H5E_DEFAULT);
  }
  throw Error(message);
}

// A write HDF5 refused. Its message holds the system's errno among its
// internals (buffer addresses, "bytes actually written = 2^64 - 1"): the
// error says that errno as every writer of ours does (write_error_text:
// a full disk, a file-size limit), and keeps HDF5's words only when there
// is none.
[[noreturn]] void fail_write(const std::string& file, const std::string& dataset, const char* what = "cannot write") {
  const std::string cause = hdf5_cause();
  const std::string where = dataset.empty() ? file : fmt::format("{}: dataset {}", file, dataset);
  if (const std::size_t at = cause.find("errno = "); at != std::string::npos) {
    if (const int err = std::atoi(cause.c_str() + at + 8); err > 0)
      throw Error(fmt::format("{}: {}: {}", where, what, write_error_cause(err)));
  }
  throw Error(fmt::format("{}: {}{}", where, what, cause.empty() ? "" : fmt::format(" (HDF5: {})", cause)));
}

// A filter (compression) in the dataset's pipeline that this HDF5 library
// lacks, as the cause of a failed read: "" when every filter is there. Such
// a file is intact, only not readable here (h5py's LZF, for one, is a
// filter h5py brings, not HDF5).
std::string missing_filter(hid_t dataset) {
  std::string missing;
  Handle dcpl(H5Dget_create_plist(dataset), H5Pclose);
  const int filters = dcpl.valid() ? H5Pget_nfilters(dcpl.get()) : 0;
  for (int i = 0; i < filters && missing.empty(); ++i) {
    unsigned flags = 0, config = 0;
    std::size_t values = 0;
    char name[256] = {};
    const H5Z_filter_t id = H5Pget_filter2(dcpl.get(), static_cast<unsigned>(i), &flags, &values, nullptr,
                                           sizeof name, name, &config);
    if (id < 0 || H5Zfilter_avail(id) > 0) continue;
    const std::string named = name[0] ? fmt::format("'{}' (HDF5 filter {})", name, id) : fmt::format("{}", id);
    missing = fmt::format("compressed with filter {}, which this program's HDF5 library lacks, so it cannot "
                          "decompress it (the file is not damaged); rewrite the file uncompressed with "
                          "h5repack -f NONE src.h5 dst.h5, or make the filter's plugin available through "
                          "HDF5_PLUGIN_PATH",
                          named);
  }
  H5Eclear2(H5E_DEFAULT);
  return missing;
}

// H5Dread of a dataset failed: a missing filter is named as the cause, and
// anything else is taken for damage.
[[noreturn]] void fail_read(hid_t dataset, const std::string& path, const std::string& name,
                            const std::string& what) {
  const std::string cause = hdf5_cause();  // before the filter queries clear the stack
  if (const std::string filter = missing_filter(dataset); !filter.empty()) fail(path, name, filter, false);
  throw Error(fmt::format("{}: dataset {}: {} (damaged or truncated file?){}", path, name, what,
                          cause.empty() ? "" : fmt::format(" (HDF5: {})", cause)));
}

std::string shape_text(const Shape& shape) {
  if (shape.empty()) return "() (a scalar)";
  return fmt::format("({})", fmt::join(shape, ", "));
}

// True when every group on the way and the object itself exist, false when
// a link on the way is absent. H5Lexists only answers for the last
// component, and fails when an earlier one is missing, so each prefix is
// asked in turn; a prefix it cannot answer for, whose groups before it
// exist, is no absence but a file HDF5 cannot read there (damaged
// metadata, or a link on the way that loops, dangles or is no group): an
// Error with HDF5's cause, not "no such dataset".
bool link_exists(hid_t file, const std::string& path, const std::string& name) {
  std::size_t pos = 0;
  while (pos <= name.size()) {
    std::size_t slash = name.find('/', pos);
    if (slash == std::string::npos) slash = name.size();
    if (slash > pos) {
      const std::string prefix = name.substr(0, slash);
      const htri_t found = H5Lexists(file, prefix.c_str(), H5P_DEFAULT);
      if (found < 0) fail(path, name, fmt::format("cannot look up {} in the file (damaged file?)", prefix));
      if (found == 0) {
        H5Eclear2(H5E_DEFAULT);
        return false;
      }
    }
    pos = slash + 1;
  }
  return true;
}

// The object `name` names, which exists (link_exists), is a dataset: an
// Error with HDF5's cause when it cannot be opened (a soft link that loops
// or dangles, damaged metadata), or naming what it is instead.
void require_dataset_object(hid_t file, const std::string& path, const std::string& name) {
  Handle object(H5Oopen(file, name.c_str(), H5P_DEFAULT), H5Oclose);
  if (!object.valid()) fail(path, name, "cannot open");
  if (const H5I_type_t type = H5Iget_type(object.get()); type != H5I_DATASET)
    fail(path, name, type == H5I_GROUP ? "is a group, not a dataset" : "is not a dataset", false);
}

hid_t checked_id(std::int64_t id, const std::string& file) {
  if (id < 0) throw Error(fmt::format("{}: the file is closed (used after close() or a move)", file));
  return static_cast<hid_t>(id);
}

// The number HDF5 gives the open file that holds `object` (0: unknown).
unsigned long file_number(hid_t object) {
#if H5_VERSION_GE(1, 12, 0)
  H5O_info2_t info{};
  const herr_t status = H5Oget_info3(object, &info, H5O_INFO_BASIC);
#else
  H5O_info_t info{};
  const herr_t status = H5Oget_info2(object, &info, H5O_INFO_BASIC);
#endif
  H5Eclear2(H5E_DEFAULT);
  return status < 0 ? 0 : info.fileno;
}

// A dataset's values must be in the file itself. Through an external link
// the direct read took the other file's offsets in this one; a virtual
// dataset or external raw storage reads as the fill value (zeros), without
// an error, where a source file is missing or short.
void require_stored_here(hid_t file, hid_t dataset, const std::string& path, const std::string& name) {
  constexpr const char* kStoreHere = "; store the values in the file itself (h5py: write the array read back)";
  if (file_number(file) != file_number(dataset))
    fail(path, name, fmt::format("is in another file, reached through an external link{}", kStoreHere), false);
  Handle dcpl(H5Dget_create_plist(dataset), H5Pclose);
  if (!dcpl.valid()) fail(path, name, "cannot read how its values are stored");
  if (H5Pget_layout(dcpl.get()) == H5D_VIRTUAL)
    fail(path, name,
         fmt::format("is a virtual dataset: its values are in other files, and HDF5 reads a missing one as zeros "
                     "without an error{}",
                     kStoreHere),
         false);
  if (H5Pget_external_count(dcpl.get()) != 0)
    fail(path, name,
         fmt::format("keeps its values in external raw files, which HDF5 reads as zeros without an error where "
                     "one is missing or short{}",
                     kStoreHere),
         false);
}

Handle open_dataset(hid_t file, const std::string& path, const std::string& dataset) {
  if (!link_exists(file, path, dataset)) fail(path, dataset, "no such dataset in the file", false);
  require_dataset_object(file, path, dataset);
  Handle handle(H5Dopen2(file, dataset.c_str(), H5P_DEFAULT), H5Dclose);
  if (!handle.valid()) fail(path, dataset, "cannot open");
  require_stored_here(file, handle.get(), path, dataset);
  return handle;
}

Shape dataset_shape(hid_t dataset, const std::string& path, const std::string& name) {
  Handle space(H5Dget_space(dataset), H5Sclose);
  if (!space.valid()) fail(path, name, "cannot read its dataspace");
  const int rank = H5Sget_simple_extent_ndims(space.get());
  if (rank < 0) fail(path, name, "cannot read its rank");
  std::vector<hsize_t> dims(static_cast<std::size_t>(rank));
  if (rank > 0 && H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr) < 0)
    fail(path, name, "cannot read its dimensions");
  return Shape(dims.begin(), dims.end());
}

std::uint64_t element_count(const Shape& shape) {
  std::uint64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

// HDF5 gives a dataset's fill value (zeros unless set) for storage that was
// never written, so a sample whose writer stopped between creating and
// writing a dataset would train as an all-zero field. A contiguous dataset
// never written has no storage; a chunked one lacks the chunks never written
// (counted, not told by H5Dget_space_status, which compares bytes and so
// calls every compressed dataset partly allocated). A dataset allocated when
// it was created cannot be told from a written one.
void require_written(hid_t dataset, const std::string& path, const std::string& name, std::uint64_t count) {
  if (count == 0) return;
  Handle dcpl(H5Dget_create_plist(dataset), H5Pclose);
  const H5D_layout_t layout = dcpl.valid() ? H5Pget_layout(dcpl.get()) : H5D_LAYOUT_ERROR;
  std::uint64_t chunks = 1, written = 1;
  if (layout == H5D_CONTIGUOUS) {
    H5D_space_status_t status = H5D_SPACE_STATUS_ERROR;
    if (H5Dget_space_status(dataset, &status) >= 0 && status == H5D_SPACE_STATUS_NOT_ALLOCATED) written = 0;
  } else if (layout == H5D_CHUNKED) {
    const Shape shape = dataset_shape(dataset, path, name);
    std::vector<hsize_t> chunk(shape.size());
    hsize_t allocated = 0;
    // HDF5 1.10 refuses H5S_ALL here: the dataset's own dataspace selects all.
    Handle space(H5Dget_space(dataset), H5Sclose);
    if (space.valid() &&
        H5Pget_chunk(dcpl.get(), static_cast<int>(chunk.size()), chunk.data()) == static_cast<int>(chunk.size()) &&
        H5Dget_num_chunks(dataset, space.get(), &allocated) >= 0) {
      for (std::size_t i = 0; i < shape.size(); ++i) chunks *= (shape[i] + chunk[i] - 1) / chunk[i];
      written = allocated;
    }
  }
  H5Eclear2(H5E_DEFAULT);
  if (written == 0)
    fail(path, name,
         "holds no data: it was created but never written (its writer stopped before writing it?); write the "
         "file again",
         false);
  if (written < chunks)
    fail(path, name,
         fmt::format("is only partly written: {} of its {} chunks were never written (its writer stopped part "
                     "way?); write the file again",
                     chunks - written, chunks),
         false);
}

// Opens `name` for a read of `count` elements: it must be an integer or float
// dataset of that many elements. `as` names the type read into, for the messages.
Handle open_for_read(hid_t file, const std::string& path, const std::string& name, std::uint64_t count,
                     const std::string& as) {
  Handle dataset = open_dataset(file, path, name);
  const Shape shape = dataset_shape(dataset.get(), path, name);
  const std::uint64_t found = element_count(shape);
  if (found != count)
    fail(path, name,
         fmt::format("expected {} elements, found shape {} with {} elements", count, shape_text(shape), found),
         false);
  Handle type(H5Dget_type(dataset.get()), H5Tclose);
  const H5T_class_t type_class = type.valid() ? H5Tget_class(type.get()) : H5T_NO_CLASS;
  if (type_class != H5T_INTEGER && type_class != H5T_FLOAT) {
    // The stored kind, as deepcam-data verify names it.
    const char* stored = type_class == H5T_ENUM       ? "an enum (h5py stores bool arrays so)"
                         : type_class == H5T_STRING   ? "strings"
                         : type_class == H5T_COMPOUND ? "a compound type"
                                                      : "a type that is not a number";
    fail(path, name,
         fmt::format("is stored as {}; cannot read it as {}: store integers or floats (numpy's astype)", stored, as),
         false);
  }
  require_written(dataset.get(), path, name, count);
  return dataset;
}

StoredType stored_type_of(hid_t dataset, const std::string& path, const std::string& name) {
  Handle type(H5Dget_type(dataset), H5Tclose);
  if (!type.valid()) fail(path, name, "cannot read its type");
  StoredType stored;
  stored.size = H5Tget_size(type.get());
  switch (H5Tget_class(type.get())) {
    case H5T_INTEGER:
      stored.kind = StoredType::Kind::Integer;
      stored.is_signed = H5Tget_sign(type.get()) == H5T_SGN_2;
      break;
    case H5T_FLOAT:
      stored.kind = StoredType::Kind::Float;
      stored.is_signed = true;
      break;
    case H5T_ENUM: stored.kind = StoredType::Kind::Enum; break;
    case H5T_STRING: stored.kind = StoredType::Kind::String; break;
    case H5T_COMPOUND: stored.kind = StoredType::Kind::Compound; break;
    default: break;
  }
  if (stored.kind == StoredType::Kind::Integer || stored.kind == StoredType::Kind::Float)
    stored.big_endian = H5Tget_order(type.get()) == H5T_ORDER_BE;
  H5Eclear2(H5E_DEFAULT);
  return stored;
}

constexpr bool kBigEndianHost = __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__;

// Types whose bytes are the value with no padding or unusual bit layout, so
// that a byte swap and a C cast give what HDF5's conversion gives.
bool is_standard_type(hid_t type) {
  const hid_t standard[] = {H5T_STD_I8LE,  H5T_STD_I8BE,  H5T_STD_U8LE,  H5T_STD_U8BE,  H5T_STD_I16LE,
                            H5T_STD_I16BE, H5T_STD_U16LE, H5T_STD_U16BE, H5T_STD_I32LE, H5T_STD_I32BE,
                            H5T_STD_U32LE, H5T_STD_U32BE, H5T_STD_I64LE, H5T_STD_I64BE, H5T_STD_U64LE,
                            H5T_STD_U64BE, H5T_IEEE_F32LE, H5T_IEEE_F32BE, H5T_IEEE_F64LE, H5T_IEEE_F64BE};
  for (const hid_t t : standard)
    if (H5Tequal(type, t) > 0) return true;
  return false;
}

// Where a dataset's bytes lie when they can be read outside HDF5.
struct Direct {
  bool usable = false;
  std::uint64_t offset = 0;  // from the start of the file (HDF5 adds any user block)
  std::uint64_t bytes = 0;
  StoredType type;
};

// Under the lock. `count` is the dataset's element count; `fd` the file's
// duplicate descriptor (-1: none). Anything unusual answers "not usable".
Direct direct_plan(hid_t dataset, int fd, std::uint64_t count, const std::string& path, const std::string& name) {
  Direct direct;
  if (fd < 0 || count == 0) return direct;
  direct.type = stored_type_of(dataset, path, name);
  Handle type(H5Dget_type(dataset), H5Tclose);
  Handle dcpl(H5Dget_create_plist(dataset), H5Pclose);
  Handle space(H5Dget_space(dataset), H5Sclose);
  H5D_space_status_t status = H5D_SPACE_STATUS_ERROR;
  const bool plain = type.valid() && dcpl.valid() && space.valid() && is_standard_type(type.get()) &&
                     H5Sget_simple_extent_type(space.get()) == H5S_SIMPLE &&
                     H5Pget_layout(dcpl.get()) == H5D_CONTIGUOUS && H5Pget_nfilters(dcpl.get()) == 0 &&
                     H5Pget_external_count(dcpl.get()) == 0 && H5Dget_space_status(dataset, &status) >= 0 &&
                     status == H5D_SPACE_STATUS_ALLOCATED;
  if (plain) {
    const haddr_t offset = H5Dget_offset(dataset);
    const hsize_t storage = H5Dget_storage_size(dataset);
    if (offset != HADDR_UNDEF && storage == count * direct.type.size) {
      direct.usable = true;
      direct.offset = offset;
      direct.bytes = storage;
    }
  }
  H5Eclear2(H5E_DEFAULT);
  return direct;
}

[[noreturn]] void fail_truncated(const std::string& path, const std::string& name, std::uint64_t end,
                                 std::uint64_t size) {
  throw Error(fmt::format("{}: dataset {}: truncated file: its data runs to byte {}, but the file has {} bytes "
                          "(copy the file again or recreate it)",
                          path, name, end, size));
}

// Reads `bytes` bytes of the dataset from `offset` on (relative to its data)
// into `out`; outside the lock. A file shorter than the dataset is an error.
void read_bytes(int fd, const Direct& direct, std::uint64_t offset, void* out, std::size_t bytes,
                const std::string& path, const std::string& name) {
  auto* to = static_cast<char*>(out);
  std::uint64_t at = direct.offset + offset;
  while (bytes > 0) {
    const ssize_t got = ::pread(fd, to, bytes, static_cast<off_t>(at));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw Error(fmt::format("{}: dataset {}: cannot read: {}", path, name, std::strerror(errno)));
    }
    if (got == 0) {
      struct stat st {};
      const std::uint64_t size = ::fstat(fd, &st) == 0 ? static_cast<std::uint64_t>(st.st_size) : at;
      fail_truncated(path, name, direct.offset + direct.bytes, size);
    }
    to += got;
    at += static_cast<std::uint64_t>(got);
    bytes -= static_cast<std::size_t>(got);
  }
}

void check_file_size(int fd, const Direct& direct, const std::string& path, const std::string& name) {
  struct stat st {};
  if (::fstat(fd, &st) != 0)
    throw Error(fmt::format("{}: dataset {}: cannot read: {}", path, name, std::strerror(errno)));
  const auto size = static_cast<std::uint64_t>(st.st_size);
  if (direct.offset > size || direct.bytes > size - direct.offset)
    fail_truncated(path, name, direct.offset + direct.bytes, size);
}

template <std::size_t N>
struct Unsigned;
template <> struct Unsigned<1> { using type = std::uint8_t; };
template <> struct Unsigned<2> { using type = std::uint16_t; };
template <> struct Unsigned<4> { using type = std::uint32_t; };
template <> struct Unsigned<8> { using type = std::uint64_t; };

template <typename U>
U swap_bytes(U v) {
  if constexpr (sizeof(U) == 1) return v;
  else if constexpr (sizeof(U) == 2) return __builtin_bswap16(v);
  else if constexpr (sizeof(U) == 4) return __builtin_bswap32(v);
  else return __builtin_bswap64(v);
}

// Reverses the bytes of each of `count` elements of `size` bytes, in place.
void swap_in_place(void* data, std::size_t size, std::size_t count) {
  auto each = [&](auto tag) {
    using U = decltype(tag);
    auto* p = static_cast<unsigned char*>(data);
    for (std::size_t i = 0; i < count; ++i, p += sizeof(U)) {
      U v;
      std::memcpy(&v, p, sizeof(U));
      v = swap_bytes(v);
      std::memcpy(p, &v, sizeof(U));
    }
  };
  switch (size) {
    case 2: each(std::uint16_t{}); break;
    case 4: each(std::uint32_t{}); break;
    case 8: each(std::uint64_t{}); break;
    default: break;
  }
}

template <typename S, bool Swap, typename T>
void convert_run(const unsigned char* in, T* out, std::size_t count) {
  using U = typename Unsigned<sizeof(S)>::type;
  for (std::size_t i = 0; i < count; ++i) {
    U bits;
    std::memcpy(&bits, in + i * sizeof(S), sizeof(S));
    if constexpr (Swap) bits = swap_bytes(bits);
    S value;
    std::memcpy(&value, &bits, sizeof(S));
    out[i] = static_cast<T>(value);
  }
}

template <typename S, typename T>
void convert_from(const unsigned char* in, bool swap, T* out, std::size_t count) {
  if (swap) convert_run<S, true>(in, out, count);
  else convert_run<S, false>(in, out, count);
}

// The stored type's C type, for the widening conversions exact_into allows.
template <typename T>
void convert(const StoredType& t, const unsigned char* in, T* out, std::size_t count) {
  const bool swap = t.big_endian != kBigEndianHost;
  if (t.kind == StoredType::Kind::Float) {
    if (t.size == 4) return convert_from<float>(in, swap, out, count);
    return convert_from<double>(in, swap, out, count);
  }
  switch (t.size * 2 + (t.is_signed ? 1 : 0)) {
    case 2: return convert_from<std::uint8_t>(in, swap, out, count);
    case 3: return convert_from<std::int8_t>(in, swap, out, count);
    case 4: return convert_from<std::uint16_t>(in, swap, out, count);
    case 5: return convert_from<std::int16_t>(in, swap, out, count);
    case 8: return convert_from<std::uint32_t>(in, swap, out, count);
    case 9: return convert_from<std::int32_t>(in, swap, out, count);
    case 16: return convert_from<std::uint64_t>(in, swap, out, count);
    default: return convert_from<std::int64_t>(in, swap, out, count);
  }
}

// Whether converting the stored type to T here gives HDF5's result bit for
// bit (see the top of the file).
template <typename T>
bool exact_into(const StoredType& t) {
  const bool is_float = t.kind == StoredType::Kind::Float;
  const bool is_integer = t.kind == StoredType::Kind::Integer;
  const bool native_order = t.big_endian == kBigEndianHost;
  if constexpr (std::is_same_v<T, float>) {
    return is_float && t.size == 4;
  } else if constexpr (std::is_same_v<T, double>) {
    return (is_float && (t.size == 8 || native_order)) || (is_integer && t.size <= 4);
  } else {
    static_assert(std::is_same_v<T, std::int64_t>);
    return is_integer && (t.is_signed || t.size <= 4);
  }
}

// Reads the whole dataset into `out` as T, outside the lock.
template <typename T>
void read_direct(int fd, const Direct& direct, T* out, std::size_t count, const std::string& path,
                 const std::string& name) {
  check_file_size(fd, direct, path, name);
  const StoredType& t = direct.type;
  if (t.size == sizeof(T) && (t.kind == StoredType::Kind::Float) == std::is_floating_point_v<T>) {
    read_bytes(fd, direct, 0, out, direct.bytes, path, name);
    if (t.big_endian != kBigEndianHost) swap_in_place(out, t.size, count);
    return;
  }
  // Widening: a run at a time through a small buffer that stays in the CPU
  // cache, rather than all of it through memory twice.
  constexpr std::size_t kRun = 256 * 1024;
  thread_local std::vector<unsigned char> buffer(kRun);
  const std::size_t per_run = kRun / t.size;
  for (std::size_t done = 0; done < count;) {
    const std::size_t n = std::min(per_run, count - done);
    read_bytes(fd, direct, done * t.size, buffer.data(), n * t.size, path, name);
    convert(t, buffer.data(), out + done, n);
    done += n;
  }
}

// Creates the groups on the way to `name` that do not exist yet, without
// modification times (see the top of the file).
void create_groups(hid_t file, const std::string& path, const std::string& name) {
  std::size_t slash = name.find('/');
  while (slash != std::string::npos) {
    const std::string group = name.substr(0, slash);
    if (!group.empty() && group != "/" && !link_exists(file, path, group)) {
      Handle gcpl(H5Pcreate(H5P_GROUP_CREATE), H5Pclose);
      if (!gcpl.valid() || H5Pset_obj_track_times(gcpl.get(), false) < 0)
        fail(path, name, "cannot set up group creation");
      Handle g(H5Gcreate2(file, group.c_str(), H5P_DEFAULT, gcpl.get(), H5P_DEFAULT), H5Gclose);
      if (!g.valid()) fail(path, name, fmt::format("cannot create group {}", group));
    }
    slash = name.find('/', slash + 1);
  }
}

template <typename T>
void write_as(std::int64_t id, const std::string& path, const std::string& name, const T* data,
              const Shape& shape, hid_t memory_type, hid_t file_type) {
  Lock lock;
  const hid_t file = checked_id(id, path);
  if (link_exists(file, path, name)) fail(path, name, "already exists; cannot write it again", false);
  create_groups(file, path, name);
  std::vector<hsize_t> dims(shape.begin(), shape.end());
  Handle space(shape.empty() ? H5Screate(H5S_SCALAR)
                             : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
               H5Sclose);
  if (!space.valid()) fail(path, name, fmt::format("cannot make a dataspace of shape {}", shape_text(shape)));
  Handle dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  if (!dcpl.valid() || H5Pset_obj_track_times(dcpl.get(), false) < 0)
    fail(path, name, "cannot set up dataset creation");
  Handle dataset(H5Dcreate2(file, name.c_str(), file_type, space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT),
                 H5Dclose);
  if (!dataset.valid()) fail(path, name, "cannot create");
  if (element_count(shape) > 0 &&
      H5Dwrite(dataset.get(), memory_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0)
    fail_write(path, name);
}

template <typename T>
void read_as(std::int64_t id, int fd, const std::string& path, const std::string& name, T* out,
             std::size_t count, hid_t memory_type, const char* type_name) {
  Direct direct;
  {
    Lock lock;
    Handle dataset = open_for_read(checked_id(id, path), path, name, count, type_name);
    if (count == 0) return;
    direct = direct_plan(dataset.get(), fd, count, path, name);
    if (!direct.usable || !exact_into<T>(direct.type)) {
      if (H5Dread(dataset.get(), memory_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, out) < 0)
        fail_read(dataset.get(), path, name, fmt::format("cannot read as {}", type_name));
      return;
    }
  }
  read_direct(fd, direct, out, count, path, name);
}

// A duplicate of the descriptor HDF5 reads the file with, or -1 when the
// file is not read through the plain POSIX driver.
int duplicate_descriptor(hid_t file) {
  int fd = -1;
  Handle fapl(H5Fget_access_plist(file), H5Pclose);
  void* handle = nullptr;
  if (fapl.valid() && H5Pget_driver(fapl.get()) == H5FD_SEC2 &&
      H5Fget_vfd_handle(file, fapl.get(), &handle) >= 0 && handle != nullptr)
    fd = ::fcntl(*static_cast<int*>(handle), F_DUPFD_CLOEXEC, 0);
  H5Eclear2(H5E_DEFAULT);
  return fd;
}

}  // namespace

File File::open(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);
  if (!fs::exists(status)) throw Error(fmt::format("{}: no such file", path));
  if (fs::is_directory(status)) throw Error(fmt::format("{}: is a directory, not an HDF5 file", path));
  const auto size = fs::file_size(path, ec);
  if (!ec && size == 0) throw Error(fmt::format("{}: the file is empty, not an HDF5 file", path));
  // HDF5 says only that it cannot open the file; the system says why.
  if (::access(path.c_str(), R_OK) != 0) throw Error(fmt::format("{}: cannot open: {}", path, std::strerror(errno)));

  Lock lock;
  const htri_t is_hdf5 = H5Fis_hdf5(path.c_str());
  if (is_hdf5 == 0) fail(path, "", "not an HDF5 file (no HDF5 signature found)", false);
  if (is_hdf5 < 0) fail(path, "", "cannot read the file");
  const hid_t id = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (id < 0) {
    // HDF5 locks a file it opens (flock, shared to read, exclusive to
    // write): a lock it cannot take is no damage. Its message names the
    // errno, EWOULDBLOCK when another process holds the file for writing.
    std::string stack;
    const std::string cause = hdf5_cause(&stack);
    const std::string with_cause = cause.empty() ? "" : fmt::format(" (HDF5: {})", cause);
    if (stack.find("unable to lock file") != std::string::npos) {
      if (stack.find(fmt::format("errno = {},", EWOULDBLOCK)) != std::string::npos)
        throw Error(fmt::format("{}: locked by another process, which has it open for writing (HDF5 file "
                                "locking); wait until it closes the file, or, if nothing changes the file, set "
                                "HDF5_USE_FILE_LOCKING=FALSE to read it without the lock, as HDF5 documents{}",
                                path, with_cause));
      throw Error(fmt::format("{}: HDF5 cannot lock the file (the file system may not support locking); set "
                              "HDF5_USE_FILE_LOCKING=FALSE to read it without the lock, as HDF5 documents{}",
                              path, with_cause));
    }
    throw Error(fmt::format("{}: cannot open the HDF5 file (truncated or damaged?){}", path, with_cause));
  }
  return File(path, id, duplicate_descriptor(id));
}

// Every H5Fopen allocates the file's metadata cache (about 512 KiB, most of
// it a hash table that HDF5 zeroes) from HDF5's free list of such caches,
// and H5Fclose gives it back. HDF5's default limit per free list (64 KiB)
// is below one cache, so each close returned it to malloc and the next open
// faulted in fresh pages whenever malloc had handed the memory back to the
// system: about 129 page faults on one sample in six in the hdf5 reader.
// Here a regular free list may keep 1 MiB per file (a cache and the file's
// smaller pieces), all regular lists together that and 1 MiB more (HDF5's
// default); the array, block and factory lists keep HDF5's default limits.
// Then as many files as asked are open at once, in memory, and closed.
void keep_room_for_open_files(int files) {
  static std::mutex room_mutex;
  static int room = 0;  // files HDF5 keeps room for
  std::lock_guard<std::mutex> room_lock(room_mutex);
  if (files <= room) return;
  Lock lock;
  constexpr int kMiB = 1024 * 1024;
  if (H5set_free_list_limits(files * kMiB + kMiB, files * kMiB, 4 * kMiB, 256 * 1024, 16 * kMiB, kMiB) < 0)
    fail("(HDF5 library)", "", "cannot set its free-list limits");
  // In-memory files (the core driver, no backing store) have a metadata
  // cache like any other; closing them leaves the caches on the free list.
  Handle fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  if (!fapl.valid() || H5Pset_fapl_core(fapl.get(), 64 * 1024, false) < 0)
    fail("(in-memory file)", "", "cannot set up an in-memory file");
  std::vector<Handle> open;
  for (int i = 0; i < files; ++i) {
    const std::string name = fmt::format("deepcam-room-{}", i);
    open.emplace_back(H5Fcreate(name.c_str(), H5F_ACC_EXCL, H5P_DEFAULT, fapl.get()), H5Fclose);
    if (!open.back().valid()) fail(name, "", "cannot create an in-memory file");
  }
  room = files;
}

File File::create(const std::string& path) {
  Lock lock;
  Handle fcpl(H5Pcreate(H5P_FILE_CREATE), H5Pclose);
  if (!fcpl.valid() || H5Pset_obj_track_times(fcpl.get(), false) < 0)
    fail(path, "", "cannot set up file creation");
  const hid_t id = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, fcpl.get(), H5P_DEFAULT);
  if (id < 0) fail(path, "", "cannot create the HDF5 file");
  return File(path, id, -1);
}

File::File(File&& other) noexcept : path_(std::move(other.path_)), id_(other.id_), fd_(other.fd_) {
  other.id_ = -1;
  other.fd_ = -1;
}

File& File::operator=(File&& other) noexcept {
  if (this != &other) {
    std::swap(path_, other.path_);
    std::swap(id_, other.id_);
    std::swap(fd_, other.fd_);
  }
  return *this;
}

File::~File() {
  if (fd_ >= 0) ::close(fd_);
  if (id_ >= 0) {
    Lock lock;
    H5Fclose(static_cast<hid_t>(id_));
    H5Eclear2(H5E_DEFAULT);
  }
}

void File::close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  if (id_ < 0) return;
  Lock lock;
  const herr_t status = H5Fclose(static_cast<hid_t>(id_));
  id_ = -1;
  if (status < 0) fail_write(path_, "", "cannot close the file (its data may not be written)");
}

bool File::has(const std::string& dataset) const {
  Lock lock;
  const hid_t file = checked_id(id_, path_);
  if (!link_exists(file, path_, dataset)) return false;
  require_dataset_object(file, path_, dataset);
  return true;
}

Shape File::shape(const std::string& dataset) const {
  Lock lock;
  Handle handle = open_dataset(checked_id(id_, path_), path_, dataset);
  return dataset_shape(handle.get(), path_, dataset);
}

StoredType File::stored_type(const std::string& dataset) const {
  Lock lock;
  Handle handle = open_dataset(checked_id(id_, path_), path_, dataset);
  return stored_type_of(handle.get(), path_, dataset);
}

void File::read_stored(const std::string& dataset, void* out, std::size_t bytes) const {
  Direct direct;
  {
    Lock lock;
    const hid_t file = checked_id(id_, path_);
    const StoredType stored = stored_type_of(open_dataset(file, path_, dataset).get(), path_, dataset);
    const std::string as = "its stored type";
    if (stored.size == 0 || bytes % stored.size != 0)
      fail(path_, dataset,
           fmt::format("{} bytes are not a whole number of its {}-byte elements", bytes, stored.size), false);
    Handle handle = open_for_read(file, path_, dataset, bytes / stored.size, as);
    if (bytes == 0) return;
    direct = direct_plan(handle.get(), fd_, bytes / stored.size, path_, dataset);
    if (!direct.usable) {
      // The memory type is the stored type in this machine's byte order, so
      // the values arrive unchanged; float16 has no native HDF5 type, hence
      // the copy.
      Handle on_disk(H5Dget_type(handle.get()), H5Tclose);
      Handle memory(on_disk.valid() ? H5Tcopy(on_disk.get()) : -1, H5Tclose);
      if (!memory.valid() || H5Tset_order(memory.get(), kBigEndianHost ? H5T_ORDER_BE : H5T_ORDER_LE) < 0)
        fail(path_, dataset, "cannot set up its memory type");
      if (H5Dread(handle.get(), memory.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, out) < 0)
        fail_read(handle.get(), path_, dataset, fmt::format("cannot read in {}", as));
      return;
    }
  }
  check_file_size(fd_, direct, path_, dataset);
  read_bytes(fd_, direct, 0, out, bytes, path_, dataset);
  if (direct.type.big_endian != kBigEndianHost) swap_in_place(out, direct.type.size, bytes / direct.type.size);
}

MappedBytes::MappedBytes(MappedBytes&& other) noexcept
    : base_(std::exchange(other.base_, nullptr)),
      length_(std::exchange(other.length_, 0)),
      data_(std::exchange(other.data_, nullptr)) {}

MappedBytes& MappedBytes::operator=(MappedBytes&& other) noexcept {
  std::swap(base_, other.base_);
  std::swap(length_, other.length_);
  std::swap(data_, other.data_);
  return *this;
}

MappedBytes::~MappedBytes() {
  if (base_) ::munmap(base_, length_);
}

MappedBytes File::map_stored(const std::string& dataset, std::size_t bytes) const {
  Direct direct;
  {
    Lock lock;
    Handle handle = open_dataset(checked_id(id_, path_), path_, dataset);
    const std::uint64_t count = element_count(dataset_shape(handle.get(), path_, dataset));
    direct = direct_plan(handle.get(), fd_, count, path_, dataset);
  }
  if (!direct.usable || (direct.type.size > 1 && direct.type.big_endian != kBigEndianHost)) return {};
  if (bytes != direct.bytes) {
    fail(path_, dataset, fmt::format("{} bytes asked for, but it holds {}", bytes, direct.bytes), false);
  }
  // Checked before mapping: a page beyond the end of the file would be a
  // SIGBUS when touched, not an error.
  check_file_size(fd_, direct, path_, dataset);
  static const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  const std::uint64_t start = direct.offset / page * page;
  MappedBytes mapped;
  mapped.length_ = static_cast<std::size_t>(direct.offset + direct.bytes - start);
  // Populated: the caller reads every byte once, so the page tables are
  // filled in one call rather than one page fault per page.
  void* p = ::mmap(nullptr, mapped.length_, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd_, static_cast<off_t>(start));
  if (p == MAP_FAILED) {
    throw Error(fmt::format("{}: dataset {}: cannot map: {}", path_, dataset, std::strerror(errno)));
  }
  mapped.base_ = p;
  mapped.data_ = static_cast<const char*>(p) + (direct.offset - start);
  return mapped;
}

bool File::reads_directly(const std::string& dataset) const {
  Lock lock;
  Handle handle = open_dataset(checked_id(id_, path_), path_, dataset);
  const std::uint64_t count = element_count(dataset_shape(handle.get(), path_, dataset));
  return direct_plan(handle.get(), fd_, count, path_, dataset).usable;
}

void File::read(const std::string& dataset, float* out, std::size_t count) const {
  read_as(id_, fd_, path_, dataset, out, count, H5T_NATIVE_FLOAT, "float32");
}
void File::read(const std::string& dataset, double* out, std::size_t count) const {
  read_as(id_, fd_, path_, dataset, out, count, H5T_NATIVE_DOUBLE, "float64");
}
void File::read(const std::string& dataset, std::int64_t* out, std::size_t count) const {
  read_as(id_, fd_, path_, dataset, out, count, H5T_NATIVE_INT64, "int64");
}

void File::write(const std::string& dataset, const float* data, const Shape& shape) {
  write_as(id_, path_, dataset, data, shape, H5T_NATIVE_FLOAT, H5T_IEEE_F32LE);
}
void File::write(const std::string& dataset, const double* data, const Shape& shape) {
  write_as(id_, path_, dataset, data, shape, H5T_NATIVE_DOUBLE, H5T_IEEE_F64LE);
}
void File::write(const std::string& dataset, const std::int32_t* data, const Shape& shape) {
  write_as(id_, path_, dataset, data, shape, H5T_NATIVE_INT32, H5T_STD_I32LE);
}
void File::write(const std::string& dataset, const std::int64_t* data, const Shape& shape) {
  write_as(id_, path_, dataset, data, shape, H5T_NATIVE_INT64, H5T_STD_I64LE);
}

}  // namespace deepcam::h5
