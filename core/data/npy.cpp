// The .npy format (numpy/lib/format.py): a 6-byte magic "\x93NUMPY", two
// version bytes, the header length (2 bytes little-endian in 1.0, 4 bytes in
// 2.0 and 3.0), then the header: a Python dict literal with exactly the keys
// 'descr', 'fortran_order' and 'shape', padded with spaces and ending in
// '\n', then the raw array.
//
// Decisions worth knowing:
// - The header is parsed by a small parser for the Python literals numpy
//   writes (strings, True/False, tuples of ints, including the 'L' suffix of
//   files written by Python 2), not by a regular expression: any padding,
//   key order and quoting numpy accepts is accepted here.
// - fortran_order True is handled, not refused: convert() transposes
//   Fortran-order data into C order, so a reader sees the same array that
//   numpy.load returns. Such data can only be converted whole.
// - make_header() writes the header byte for byte as numpy.save does
//   (sorted keys, the 21-digit growth space after the dict, 64-byte
//   alignment), so files we write are indistinguishable from NumPy's.
#include "deepcam/npy.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <type_traits>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "deepcam/error.hpp"
#include "deepcam/mlperf_log.hpp"
#include "temporary_files.hpp"

namespace deepcam::npy {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr std::size_t kMagicSize = 6;
constexpr std::size_t kAlign = 64;           // numpy's ARRAY_ALIGN
constexpr std::size_t kGrowthDigits = 21;    // numpy's GROWTH_AXIS_MAX_DIGITS
constexpr bool kHostBigEndian = __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__;

constexpr const char* kSupported =
    "bool (b1), int8/16/32/64 (i1 i2 i4 i8), uint8/16/32/64 (u1 u2 u4 u8), float16/32/64 (f2 f4 f8)";

std::string errno_text(int err) { return std::strerror(err); }

// Header text as a message may echo it: a byte outside printable ASCII
// (an escape sequence could clear or rewrite the terminal) as \xNN, and
// the backslash doubled so that the two cannot be confused.
std::string printable(std::string_view text) {
  std::string out;
  for (const char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    if (c == '\\') out += "\\\\";
    else if (byte >= 0x20 && byte < 0x7f) out += c;
    else out += fmt::format("\\x{:02x}", byte);
  }
  return out;
}

// ---------------------------------------------------------------------------
// A parser for the header dict. numpy reads it with ast.literal_eval; the
// values it can hold in a valid file are a string or a list (descr), a bool
// (fortran_order) and a tuple of ints (shape).

struct Value {
  enum Kind { String, Bool, Tuple, Other } kind = Other;
  std::string text;                 // String: the contents; Other: the source text
  bool flag = false;                // Bool
  std::vector<std::int64_t> items;  // Tuple
};

class Parser {
 public:
  Parser(const std::string& file, std::string_view text) : file_(file), text_(text) {}

  // The dict, as (key, value) pairs in file order.
  std::vector<std::pair<std::string, Value>> dict() {
    skip_space();
    expect('{', "the header must be a Python dict literal starting with '{'");
    std::vector<std::pair<std::string, Value>> out;
    skip_space();
    while (peek() != '}') {
      Value key = value();
      if (key.kind != Value::String) fail("a key that is not a string");
      skip_space();
      expect(':', "expected ':' after a key");
      Value v = value();
      for (const auto& kv : out)
        if (kv.first == key.text) fail(fmt::format("the key '{}' twice", printable(key.text)));
      out.emplace_back(key.text, std::move(v));
      skip_space();
      if (peek() == ',') {
        ++pos_;
        skip_space();
      } else if (peek() != '}') {
        fail("expected ',' or '}' after a value");
      }
    }
    ++pos_;
    skip_space();
    if (pos_ != text_.size()) fail("text after the closing '}' (only spaces and a newline may follow)");
    return out;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    std::string shown(text_.substr(0, 120));
    for (char& c : shown)
      if (c == '\n' || c == '\r') c = ' ';
    while (!shown.empty() && shown.back() == ' ') shown.pop_back();
    throw Error(fmt::format("{}: not a valid .npy header: {} at character {} of \"{}\"", file_, what, pos_,
                            printable(shown)));
  }

  char peek() const {
    if (pos_ >= text_.size()) fail("the header ends early");
    return text_[pos_];
  }
  void expect(char c, const char* what) {
    if (peek() != c) fail(what);
    ++pos_;
  }
  void skip_space() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' ||
                                   text_[pos_] == '\r' || text_[pos_] == '\f' || text_[pos_] == '\v'))
      ++pos_;
  }

  Value value() {
    skip_space();
    const char c = peek();
    if (c == '\'' || c == '"') return string();
    if (c == '(') return tuple();
    if (c == '[' || c == '{') return nested();
    if (text_.compare(pos_, 4, "True") == 0) {
      pos_ += 4;
      return Value{Value::Bool, "", true, {}};
    }
    if (text_.compare(pos_, 5, "False") == 0) {
      pos_ += 5;
      return Value{Value::Bool, "", false, {}};
    }
    fail("an unexpected value");
  }

  Value string() {
    const char quote = text_[pos_++];
    Value v{Value::String, "", false, {}};
    while (peek() != quote) {
      char c = text_[pos_++];
      if (c == '\\') c = peek(), ++pos_;  // the descr strings numpy writes need no more than this
      v.text += c;
    }
    ++pos_;
    return v;
  }

  std::int64_t integer() {
    skip_space();
    if (peek() == '-') fail("a negative dimension in 'shape'");
    if (peek() < '0' || peek() > '9') fail("a 'shape' entry that is not an integer");
    std::int64_t n = 0;
    while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
      const int digit = text_[pos_++] - '0';
      if (n > (std::numeric_limits<std::int64_t>::max() - digit) / 10) fail("a dimension too large");
      n = n * 10 + digit;
    }
    if (pos_ < text_.size() && (text_[pos_] == 'L' || text_[pos_] == 'l')) ++pos_;  // Python 2 long
    return n;
  }

  Value tuple() {
    ++pos_;
    Value v{Value::Tuple, "", false, {}};
    skip_space();
    bool comma = false;
    while (peek() != ')') {
      v.items.push_back(integer());
      skip_space();
      comma = false;
      if (peek() == ',') {
        ++pos_;
        comma = true;
        skip_space();
      } else if (peek() != ')') {
        fail("expected ',' or ')' in 'shape'");
      }
    }
    // In Python (5) is the integer 5, not a tuple; numpy refuses it too.
    if (v.items.size() == 1 && !comma) fail("'shape' (n) without a comma is an integer, not a tuple");
    ++pos_;
    return v;
  }

  // A list or dict (a structured descr): kept as text for the message.
  Value nested() {
    const std::size_t start = pos_;
    int depth = 0;
    char quote = 0;
    do {
      const char c = peek();
      ++pos_;
      if (quote) {
        if (c == '\\') ++pos_;
        else if (c == quote) quote = 0;
      } else if (c == '\'' || c == '"') {
        quote = c;
      } else if (c == '[' || c == '{' || c == '(') {
        ++depth;
      } else if (c == ']' || c == '}' || c == ')') {
        --depth;
      }
    } while (depth > 0);
    return Value{Value::Other, std::string(text_.substr(start, pos_ - start)), false, {}};
  }

  const std::string& file_;
  std::string_view text_;
  std::size_t pos_ = 0;
};

struct TypeCode {
  char kind;
  std::size_t size;
  DType dtype;
};
constexpr TypeCode kTypes[] = {
    {'b', 1, DType::Bool},    {'i', 1, DType::Int8},    {'i', 2, DType::Int16},   {'i', 4, DType::Int32},
    {'i', 8, DType::Int64},   {'u', 1, DType::UInt8},   {'u', 2, DType::UInt16},  {'u', 4, DType::UInt32},
    {'u', 8, DType::UInt64},  {'f', 2, DType::Float16}, {'f', 4, DType::Float32}, {'f', 8, DType::Float64}};

// descr as numpy writes it: a byte-order character ('<', '>', '|', '=', or
// none), the kind and the item size, e.g. '<f4', '|u1', '>i8'.
void parse_descr(const std::string& file, const Value& v, Header& h) {
  if (v.kind == Value::Other)
    throw Error(fmt::format("{}: the .npy file holds a structured array (descr {}), which is not supported; "
                            "save a plain numeric array ({})",
                            file, printable(v.text), kSupported));
  if (v.kind != Value::String)
    throw Error(fmt::format("{}: not a valid .npy header: 'descr' is not a string", file));
  const std::string& d = v.text;
  std::size_t pos = 0;
  char order = '|';
  if (!d.empty() && (d[0] == '<' || d[0] == '>' || d[0] == '|' || d[0] == '=')) order = d[pos++];
  const std::string code = d.substr(pos);
  if (code == "O" || code.rfind("O", 0) == 0)
    throw Error(fmt::format("{}: the .npy file holds Python objects (dtype '{}'), which cannot be read "
                            "without unpickling; save a numeric array ({})",
                            file, printable(d), kSupported));
  for (const TypeCode& t : kTypes) {
    if (code.size() == 2 && code[0] == t.kind && static_cast<std::size_t>(code[1] - '0') == t.size) {
      h.dtype = t.dtype;
      // '=' is the byte order of the machine reading the file; '|' means
      // the order does not matter (one-byte items).
      h.big_endian = order == '>' || (order == '=' && kHostBigEndian);
      if (t.size == 1) h.big_endian = false;
      return;
    }
  }
  throw Error(fmt::format("{}: the .npy dtype '{}' is not supported (supported: {})", file, printable(d),
                          kSupported));
}

std::size_t checked_data_bytes(const std::string& file, const std::vector<std::int64_t>& shape, DType dtype) {
  // Overflow here would let a hostile header pass the file-size check.
  std::uint64_t n = item_size(dtype);
  for (const std::int64_t d : shape) {
    if (d != 0 && n > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) / d)
      throw Error(fmt::format("{}: the .npy shape ({}) is too large to address", file, fmt::join(shape, ", ")));
    n *= static_cast<std::uint64_t>(d);
  }
  return static_cast<std::size_t>(n);
}

std::string shape_repr(const std::vector<std::int64_t>& shape) {
  if (shape.size() == 1) return fmt::format("({},)", shape[0]);
  return fmt::format("({})", fmt::join(shape, ", "));
}

const char* descr(DType dtype) {
  switch (dtype) {
    case DType::Bool: return "|b1";
    case DType::Int8: return "|i1";
    case DType::Int16: return "<i2";
    case DType::Int32: return "<i4";
    case DType::Int64: return "<i8";
    case DType::UInt8: return "|u1";
    case DType::UInt16: return "<u2";
    case DType::UInt32: return "<u4";
    case DType::UInt64: return "<u8";
    case DType::Float16: return "<f2";
    case DType::Float32: return "<f4";
    case DType::Float64: return "<f8";
  }
  return "?";
}

// ---------------------------------------------------------------------------
// Element conversion.

template <typename T>
T load(const unsigned char* p, bool swap) {
  unsigned char b[sizeof(T)];
  std::memcpy(b, p, sizeof(T));
  if (swap)
    for (std::size_t i = 0; i < sizeof(T) / 2; ++i) std::swap(b[i], b[sizeof(T) - 1 - i]);
  T v;
  std::memcpy(&v, b, sizeof(T));
  return v;
}

float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = (h & 0x8000u) << 16;
  std::uint32_t exponent = (h >> 10) & 0x1Fu;
  std::uint32_t mantissa = h & 0x3FFu;
  std::uint32_t bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);  // Inf or NaN (payload kept)
  } else if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exponent = 127 - 15 + 1;
      while (!(mantissa & 0x400u)) {
        mantissa <<= 1;
        --exponent;
      }
      bits = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
    }
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The (row, column, ...) index of the k-th element, for messages.
std::string index_text(const Header& h, std::int64_t k) {
  if (h.shape.empty()) return "()";
  std::vector<std::int64_t> idx(h.shape.size());
  for (std::size_t d = h.shape.size(); d-- > 0;) {
    idx[d] = h.shape[d] ? k % h.shape[d] : 0;
    k = h.shape[d] ? k / h.shape[d] : 0;
  }
  return shape_repr(idx);
}

// How a value of the file's type becomes the caller's type. The primary
// template is a plain copy (used for raw bits: bool bytes, float16 halves).
template <typename Dst>
struct Store {
  template <typename T>
  static Dst from(const std::string&, const Header&, std::int64_t, T v) {
    return static_cast<Dst>(v);
  }
};

template <>
struct Store<float> {
  template <typename T>
  static float from(const std::string&, const Header&, std::int64_t, T v) {
    return static_cast<float>(v);
  }
};

template <>
struct Store<std::int64_t> {
  template <typename T>
  static std::int64_t from(const std::string& file, const Header& h, std::int64_t k, T v) {
    if constexpr (std::is_floating_point_v<T>) {
      // 2^63 is exactly representable; anything at or above it is out of range.
      if (!(std::floor(v) == v) || !(v >= -9223372036854775808.0) || !(v < 9223372036854775808.0))
        throw Error(fmt::format("{}: element {} is {}, which is not a whole number in the range of int64 "
                                "(integer data such as labels must hold whole numbers)",
                                file, index_text(h, k), static_cast<double>(v)));
      return static_cast<std::int64_t>(v);
    } else if constexpr (std::is_same_v<T, std::uint64_t>) {
      if (v > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        throw Error(fmt::format("{}: element {} is {}, beyond the range of int64", file, index_text(h, k), v));
      return static_cast<std::int64_t>(v);
    } else {
      return static_cast<std::int64_t>(v);
    }
  }
};

// Converts `count` elements stored as Src; with `fortran`, reorders them
// from Fortran to C order on the way.
template <typename Src, typename Dst>
void convert_as(const std::string& file, const Header& h, const unsigned char* src, Dst* dst, std::int64_t count,
                bool swap, bool fortran) {
  auto element = [&](std::int64_t at) {
    return load<Src>(src + static_cast<std::size_t>(at) * sizeof(Src), swap);
  };
  if (!fortran) {
    if constexpr (std::is_same_v<Src, Dst>) {
      if (!swap) {
        // memcpy's pointers must be valid even for 0 bytes, and a
        // zero-element array's buffers may be null.
        if (count > 0) std::memcpy(dst, src, static_cast<std::size_t>(count) * sizeof(Dst));
        return;
      }
    }
    for (std::int64_t k = 0; k < count; ++k) dst[k] = Store<Dst>::from(file, h, k, element(k));
    return;
  }
  // Fortran order: walk the output in C order and find each element at
  // sum(index[d] * stride[d]) with Fortran strides (the first axis fastest).
  const std::size_t rank = h.shape.size();
  std::vector<std::int64_t> stride(rank), index(rank, 0);
  std::int64_t s = 1;
  for (std::size_t d = 0; d < rank; ++d) {
    stride[d] = s;
    s *= h.shape[d];
  }
  std::int64_t at = 0;
  for (std::int64_t k = 0; k < count; ++k) {
    dst[k] = Store<Dst>::from(file, h, k, element(at));
    for (std::size_t d = rank; d-- > 0;) {
      at += stride[d];
      if (++index[d] < h.shape[d]) break;
      at -= stride[d] * h.shape[d];
      index[d] = 0;
    }
  }
}

template <typename Dst>
void convert_any(const std::string& file, const Header& h, const void* src, Dst* dst, std::int64_t count) {
  if (count < 0 || count > h.count())
    throw Error(fmt::format("{}: asked to convert {} elements of an array of {}", file, count, h.count()));
  const bool fortran = h.fortran_order && h.shape.size() >= 2;
  if (fortran && count != h.count())
    throw Error(fmt::format("{}: a Fortran-order array can only be converted whole ({} of {} elements asked)",
                            file, count, h.count()));
  const auto* p = static_cast<const unsigned char*>(src);
  const bool swap = h.big_endian != kHostBigEndian && item_size(h.dtype) > 1;
  switch (h.dtype) {
    case DType::Bool: {
      // numpy stores True as 1 but any non-zero byte reads as True.
      std::vector<std::uint8_t> as_bool(static_cast<std::size_t>(count));
      if (!fortran) {
        for (std::int64_t k = 0; k < count; ++k) dst[k] = p[k] ? Dst(1) : Dst(0);
      } else {
        Header bytes = h;
        bytes.dtype = DType::UInt8;
        convert_as<std::uint8_t, std::uint8_t>(file, bytes, p, as_bool.data(), count, false, true);
        for (std::int64_t k = 0; k < count; ++k) dst[k] = as_bool[k] ? Dst(1) : Dst(0);
      }
      return;
    }
    case DType::Float16: {
      std::vector<std::uint16_t> bits(static_cast<std::size_t>(count));
      Header raw = h;
      raw.dtype = DType::UInt16;
      convert_as<std::uint16_t, std::uint16_t>(file, raw, p, bits.data(), count, swap, fortran);
      for (std::int64_t k = 0; k < count; ++k)
        dst[k] = Store<Dst>::from(file, h, k, half_to_float(bits[static_cast<std::size_t>(k)]));
      return;
    }
    case DType::Int8: return convert_as<std::int8_t>(file, h, p, dst, count, swap, fortran);
    case DType::Int16: return convert_as<std::int16_t>(file, h, p, dst, count, swap, fortran);
    case DType::Int32: return convert_as<std::int32_t>(file, h, p, dst, count, swap, fortran);
    case DType::Int64: return convert_as<std::int64_t>(file, h, p, dst, count, swap, fortran);
    case DType::UInt8: return convert_as<std::uint8_t>(file, h, p, dst, count, swap, fortran);
    case DType::UInt16: return convert_as<std::uint16_t>(file, h, p, dst, count, swap, fortran);
    case DType::UInt32: return convert_as<std::uint32_t>(file, h, p, dst, count, swap, fortran);
    case DType::UInt64: return convert_as<std::uint64_t>(file, h, p, dst, count, swap, fortran);
    case DType::Float32: return convert_as<float>(file, h, p, dst, count, swap, fortran);
    case DType::Float64: return convert_as<double>(file, h, p, dst, count, swap, fortran);
  }
}

// ---------------------------------------------------------------------------
// Files.

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

// Reads up to `size` bytes at `offset`; returns how many there were.
std::size_t read_at(const std::string& path, int fd, void* out, std::size_t size, std::size_t offset) {
  std::size_t done = 0;
  while (done < size) {
    const ssize_t n = ::pread(fd, static_cast<char*>(out) + done, size - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error(fmt::format("{}: cannot read: {}", path, errno_text(errno)));
    }
    if (n == 0) break;
    done += static_cast<std::size_t>(n);
  }
  return done;
}

void write_all(const std::string& path, int fd, const void* data, std::size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error(write_error_text(path, errno));
    }
    p += n;
    size -= static_cast<std::size_t>(n);
  }
}

}  // namespace

const char* to_string(DType dtype) {
  switch (dtype) {
    case DType::Bool: return "bool";
    case DType::Int8: return "int8";
    case DType::Int16: return "int16";
    case DType::Int32: return "int32";
    case DType::Int64: return "int64";
    case DType::UInt8: return "uint8";
    case DType::UInt16: return "uint16";
    case DType::UInt32: return "uint32";
    case DType::UInt64: return "uint64";
    case DType::Float16: return "float16";
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
  }
  return "unknown";
}

std::size_t item_size(DType dtype) {
  switch (dtype) {
    case DType::Bool:
    case DType::Int8:
    case DType::UInt8: return 1;
    case DType::Int16:
    case DType::UInt16:
    case DType::Float16: return 2;
    case DType::Int32:
    case DType::UInt32:
    case DType::Float32: return 4;
    case DType::Int64:
    case DType::UInt64:
    case DType::Float64: return 8;
  }
  return 0;
}

std::int64_t Header::count() const {
  std::int64_t n = 1;
  for (const std::int64_t d : shape) n *= d;
  return n;
}

std::size_t Header::data_bytes() const { return static_cast<std::size_t>(count()) * item_size(dtype); }

Header parse_header(const std::string& file, const void* bytes, std::size_t size) {
  const auto* p = static_cast<const unsigned char*>(bytes);
  if (size < kMagicSize || std::memcmp(p, kMagic, kMagicSize) != 0)
    throw Error(fmt::format("{}: not a .npy file (it does not start with \\x93NUMPY)", file));
  if (size < kMagicSize + 2)
    throw Error(fmt::format("{}: truncated .npy file: it ends inside the version bytes", file));
  Header h;
  h.major = p[6];
  h.minor = p[7];
  if (h.minor != 0 || h.major < 1 || h.major > 3)
    throw Error(fmt::format("{}: .npy format version {}.{} is not supported (1.0, 2.0 and 3.0 are)", file,
                            h.major, h.minor));
  const std::size_t length_bytes = h.major == 1 ? 2 : 4;
  const std::size_t prefix = kMagicSize + 2 + length_bytes;
  if (size < prefix)
    throw Error(fmt::format("{}: truncated .npy file: it ends inside the header length", file));
  std::size_t length = p[8] | (std::size_t(p[9]) << 8);
  if (length_bytes == 4) length |= (std::size_t(p[10]) << 16) | (std::size_t(p[11]) << 24);
  if (size < prefix + length)
    throw Error(fmt::format("{}: truncated .npy file: the header is {} bytes long, but only {} follow", file,
                            length, size - prefix));
  h.data_offset = prefix + length;
  // Versions 1.0 and 2.0 are latin-1 and 3.0 is utf-8; every byte of a
  // header we can accept is ASCII, so the two decode alike here.
  const std::string_view text(reinterpret_cast<const char*>(p) + prefix, length);
  const auto entries = Parser(file, text).dict();

  const Value* descr_value = nullptr;
  const Value* fortran_value = nullptr;
  const Value* shape_value = nullptr;
  for (const auto& [key, value] : entries) {
    if (key == "descr") descr_value = &value;
    else if (key == "fortran_order") fortran_value = &value;
    else if (key == "shape") shape_value = &value;
    else
      throw Error(fmt::format("{}: not a valid .npy header: unexpected key '{}' (the keys are 'descr', "
                              "'fortran_order' and 'shape')",
                              file, printable(key)));
  }
  for (const auto& [name, value] :
       {std::pair{"descr", descr_value}, {"fortran_order", fortran_value}, {"shape", shape_value}})
    if (!value) throw Error(fmt::format("{}: not a valid .npy header: the key '{}' is missing", file, name));
  if (fortran_value->kind != Value::Bool)
    throw Error(fmt::format("{}: not a valid .npy header: 'fortran_order' is not True or False", file));
  if (shape_value->kind != Value::Tuple)
    throw Error(fmt::format("{}: not a valid .npy header: 'shape' is not a tuple of integers", file));
  h.fortran_order = fortran_value->flag;
  h.shape = shape_value->items;
  parse_descr(file, *descr_value, h);
  checked_data_bytes(file, h.shape, h.dtype);
  return h;
}

std::string trailing_bytes_problem(const Header& header, std::size_t file_size) {
  const std::size_t need = header.data_offset + header.data_bytes();
  if (file_size <= need) return "";
  return fmt::format("{} bytes follow the {} bytes of {} data of shape {} its header describes (the file has {} "
                     "bytes, not {}); numpy writes none: the header does not describe the file (a wrong dtype or "
                     "shape), or two writes ran into it",
                     file_size - need, header.data_bytes(), to_string(header.dtype), shape_repr(header.shape),
                     file_size, need);
}

std::string bool_sample_problem(const Header& header) {
  if (header.dtype != DType::Bool) return "";
  return "holds bool values (|b1), which are neither climate values nor classes 0, 1 and 2: store integers or "
         "floats (numpy's astype)";
}

Header read_header(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path, ec)) throw Error(fmt::format("{}: is a directory, not a .npy file", path));
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    const int err = errno;
    throw Error(fmt::format("{}: cannot open: {}", path, err == ENOENT ? "no such file" : errno_text(err)));
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) throw Error(fmt::format("{}: cannot stat: {}", path, errno_text(errno)));
  const auto file_size = static_cast<std::size_t>(st.st_size);

  // The header is usually 128 bytes; read its length first when it is longer.
  std::vector<unsigned char> head(std::min<std::size_t>(file_size, 4096));
  head.resize(read_at(path, fd.get(), head.data(), head.size(), 0));
  if (head.size() >= 12 && std::memcmp(head.data(), kMagic, kMagicSize) == 0) {
    const std::size_t length_bytes = head[6] == 1 ? 2 : 4;
    std::size_t length = head[8] | (std::size_t(head[9]) << 8);
    if (length_bytes == 4) length |= (std::size_t(head[10]) << 16) | (std::size_t(head[11]) << 24);
    const std::size_t want = 8 + length_bytes + length;
    if (want > head.size() && want <= file_size) {
      head.resize(want);
      head.resize(read_at(path, fd.get(), head.data(), want, 0));
    }
  }
  Header h = parse_header(path, head.data(), head.size());
  const std::size_t need = h.data_offset + h.data_bytes();
  if (file_size < need)
    throw Error(fmt::format("{}: truncated .npy file: the header promises {} bytes of {} data of shape {} "
                            "(file size {}), but the file has {} bytes",
                            path, h.data_bytes(), to_string(h.dtype), shape_repr(h.shape), need, file_size));
  if (const std::string extra = trailing_bytes_problem(h, file_size); !extra.empty())
    throw Error(fmt::format("{}: {}", path, extra));
  return h;
}

std::string make_header(DType dtype, const std::vector<std::int64_t>& shape) {
  for (const std::int64_t d : shape)
    if (d < 0) throw Error(fmt::format("npy::make_header: negative dimension in shape {}", shape_repr(shape)));
  std::string dict = fmt::format("{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}", descr(dtype),
                                 shape_repr(shape));
  // numpy leaves room for the first axis to grow to 21 digits in place.
  if (!shape.empty()) dict.append(kGrowthDigits - fmt::format("{}", shape[0]).size(), ' ');
  for (const int major : {1, 2}) {
    const std::size_t prefix = kMagicSize + 2 + (major == 1 ? 2 : 4);
    const std::size_t text = dict.size() + 1;  // with the final '\n'
    const std::size_t pad = kAlign - (prefix + text) % kAlign;
    const std::size_t length = text + pad;
    if (major == 1 && length > 0xFFFF) continue;
    std::string out(kMagic, kMagicSize);
    out += static_cast<char>(major);
    out += '\0';
    for (std::size_t b = 0; b < prefix - kMagicSize - 2; ++b) out += static_cast<char>((length >> (8 * b)) & 0xFF);
    out += dict;
    out.append(pad, ' ');
    out += '\n';
    return out;
  }
  throw Error(fmt::format("npy::make_header: shape {} needs a header too long for .npy", shape_repr(shape)));
}

void write(const std::string& path, DType dtype, const std::vector<std::int64_t>& shape, const void* data) {
  namespace fs = std::filesystem;
  const std::string header = make_header(dtype, shape);
  Header h;
  h.dtype = dtype;
  h.shape = shape;
  const std::size_t bytes = checked_data_bytes(path, shape, dtype);

  const fs::path target(path);
  const fs::path dir = target.parent_path().empty() ? fs::path(".") : target.parent_path();
  const std::string temp = temporary_files::hidden_name(target).string();
  Fd fd(::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666));
  if (fd.get() < 0)
    throw Error(fmt::format("{}: cannot create {} in {}: {}", path, fs::path(temp).filename().string(),
                            dir.string(), errno_text(errno)));
  try {
    write_all(path, fd.get(), header.data(), header.size());
    if constexpr (!kHostBigEndian) {
      write_all(path, fd.get(), data, bytes);
    } else {
      // Stored little-endian whatever the machine; swap a block at a time.
      const std::size_t item = item_size(dtype);
      std::vector<unsigned char> block(std::size_t(1) << 20);
      const auto* src = static_cast<const unsigned char*>(data);
      for (std::size_t at = 0; at < bytes;) {
        const std::size_t n = std::min(block.size(), bytes - at);
        for (std::size_t k = 0; k < n; k += item)
          for (std::size_t b = 0; b < item; ++b) block[k + b] = src[at + k + item - 1 - b];
        write_all(path, fd.get(), block.data(), n);
        at += n;
      }
    }
    // close() is where some file systems (NFS) report a failed write.
    if (::close(fd.release()) != 0) throw Error(write_error_text(path, errno));
    if (::rename(temp.c_str(), path.c_str()) != 0)
      throw Error(fmt::format("{}: cannot rename {} into place: {}", path, fs::path(temp).filename().string(),
                              errno_text(errno)));
  } catch (...) {
    ::unlink(temp.c_str());
    throw;
  }
}

void convert(const std::string& file, const Header& header, const void* src, float* dst, std::int64_t count) {
  convert_any(file, header, src, dst, count);
}

void convert(const std::string& file, const Header& header, const void* src, std::int64_t* dst,
             std::int64_t count) {
  convert_any(file, header, src, dst, count);
}

}  // namespace deepcam::npy
