// A pickle machine for the subset of pickle that torch.save writes: the
// containers, scalars and strings of a checkpoint, collections.OrderedDict,
// and tensors rebuilt by torch._utils from storages in the zip archive.
// Python objects are modelled first (Obj), because a pickle refers to globals
// and storages that have no IValue, and mutates containers after it has
// shared them; the finished object is then converted to an IValue once.
// Every read is bounds-checked: a corrupt file gives an Error, never a crash.
#include "deepcam/torch_pickle.hpp"

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <fcntl.h>
#include <unistd.h>
#include <caffe2/serialize/inline_container.h>
#include <fmt/format.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <new>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "deepcam/error.hpp"
#include "deepcam/mlperf_log.hpp"

namespace deepcam {
namespace {

// Far deeper than any checkpoint (a state dict nests four levels), and
// shallow enough that the recursive conversion and IValue's recursive
// destructor cannot exhaust the stack.
constexpr int kMaxDepth = 1000;

enum class Kind { None, Bool, Int, Float, Str, List, Tuple, Dict, Global, Storage, Tensor };

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::None: return "None";
    case Kind::Bool: return "bool";
    case Kind::Int: return "int";
    case Kind::Float: return "float";
    case Kind::Str: return "str";
    case Kind::List: return "list";
    case Kind::Tuple: return "tuple";
    case Kind::Dict: return "dict";
    case Kind::Global: return "global";
    case Kind::Storage: return "storage";
    case Kind::Tensor: return "tensor";
  }
  return "?";
}

// What a global resolves to.
enum class Fn {
  OrderedDict,
  RebuildTensor,
  RebuildTensorV2,
  RebuildTensorV3,
  RebuildParameter,
  Size,
  CodecsEncode,
  Bytes,
  StorageType,  // the storage class in a persistent id; `dtype` is its element type
  DType,        // a torch.dtype, the last argument of _rebuild_tensor_v3
};

struct Obj;
using Ref = std::shared_ptr<Obj>;

struct Obj {
  explicit Obj(Kind k) : kind(k) {}
  Obj(const Obj&) = delete;
  Obj& operator=(const Obj&) = delete;
  ~Obj();

  Kind kind;
  bool flag = false;  // Bool: the value; Dict: made by collections.OrderedDict
  std::int64_t i = 0;
  double f = 0;
  std::string s;             // Str: the value; Global: "module.name"; Storage: the key
  std::vector<Ref> items;    // List, Tuple; Dict: key, value, key, value, ...
  std::unordered_map<std::string, std::size_t> index;  // Dict: key -> entry number
  Fn fn = Fn::OrderedDict;                              // Global
  at::ScalarType dtype = at::kByte;                     // Global (StorageType, DType), Storage
  at::Storage storage;
  at::Tensor tensor;
};

// A crafted file can nest containers as deep as its length allows; releasing
// the children through a work list keeps the destructor from recursing.
Obj::~Obj() {
  std::vector<Ref> pending = std::move(items);
  while (!pending.empty()) {
    Ref r = std::move(pending.back());
    pending.pop_back();
    if (r && r.use_count() == 1) {
      for (auto& c : r->items) pending.push_back(std::move(c));
      r->items.clear();
    }
  }
}

Ref make(Kind k) { return std::make_shared<Obj>(k); }

Ref make_int(std::int64_t v) {
  Ref r = make(Kind::Int);
  r->i = v;
  return r;
}

Ref make_str(std::string v) {
  Ref r = make(Kind::Str);
  r->s = std::move(v);
  return r;
}

struct GlobalInfo {
  const char* name;
  Fn fn;
  at::ScalarType dtype;
};

// Every global this reader accepts; an error lists them.
const GlobalInfo kGlobals[] = {
    {"collections.OrderedDict", Fn::OrderedDict, at::kByte},
    {"torch._utils._rebuild_tensor", Fn::RebuildTensor, at::kByte},
    {"torch._utils._rebuild_tensor_v2", Fn::RebuildTensorV2, at::kByte},
    {"torch._utils._rebuild_tensor_v3", Fn::RebuildTensorV3, at::kByte},
    {"torch._utils._rebuild_parameter", Fn::RebuildParameter, at::kByte},
    {"torch.Size", Fn::Size, at::kByte},
    {"_codecs.encode", Fn::CodecsEncode, at::kByte},
    {"__builtin__.bytes", Fn::Bytes, at::kByte},
    {"builtins.bytes", Fn::Bytes, at::kByte},
    {"torch.FloatStorage", Fn::StorageType, at::kFloat},
    {"torch.DoubleStorage", Fn::StorageType, at::kDouble},
    {"torch.HalfStorage", Fn::StorageType, at::kHalf},
    {"torch.BFloat16Storage", Fn::StorageType, at::kBFloat16},
    {"torch.LongStorage", Fn::StorageType, at::kLong},
    {"torch.IntStorage", Fn::StorageType, at::kInt},
    {"torch.ShortStorage", Fn::StorageType, at::kShort},
    {"torch.CharStorage", Fn::StorageType, at::kChar},
    {"torch.ByteStorage", Fn::StorageType, at::kByte},
    {"torch.BoolStorage", Fn::StorageType, at::kBool},
    {"torch.ComplexFloatStorage", Fn::StorageType, at::kComplexFloat},
    {"torch.ComplexDoubleStorage", Fn::StorageType, at::kComplexDouble},
    {"torch.storage.UntypedStorage", Fn::StorageType, at::kByte},
    // The dtypes that have no legacy storage class come with _rebuild_tensor_v3.
    {"torch.float32", Fn::DType, at::kFloat},
    {"torch.float64", Fn::DType, at::kDouble},
    {"torch.float16", Fn::DType, at::kHalf},
    {"torch.bfloat16", Fn::DType, at::kBFloat16},
    {"torch.int64", Fn::DType, at::kLong},
    {"torch.int32", Fn::DType, at::kInt},
    {"torch.int16", Fn::DType, at::kShort},
    {"torch.int8", Fn::DType, at::kChar},
    {"torch.uint8", Fn::DType, at::kByte},
    {"torch.bool", Fn::DType, at::kBool},
    {"torch.complex64", Fn::DType, at::kComplexFloat},
    {"torch.complex128", Fn::DType, at::kComplexDouble},
    {"torch.uint16", Fn::DType, at::kUInt16},
    {"torch.uint32", Fn::DType, at::kUInt32},
    {"torch.uint64", Fn::DType, at::kUInt64},
    {"torch.float8_e4m3fn", Fn::DType, at::kFloat8_e4m3fn},
    {"torch.float8_e5m2", Fn::DType, at::kFloat8_e5m2},
    {"torch.float8_e4m3fnuz", Fn::DType, at::kFloat8_e4m3fnuz},
    {"torch.float8_e5m2fnuz", Fn::DType, at::kFloat8_e5m2fnuz},
};

const char* opcode_name(unsigned char op) {
  switch (op) {
    case '(': return "MARK";
    case '.': return "STOP";
    case '0': return "POP";
    case '1': return "POP_MARK";
    case '2': return "DUP";
    case 'F': return "FLOAT";
    case 'I': return "INT";
    case 'J': return "BININT";
    case 'K': return "BININT1";
    case 'L': return "LONG";
    case 'M': return "BININT2";
    case 'N': return "NONE";
    case 'P': return "PERSID";
    case 'Q': return "BINPERSID";
    case 'R': return "REDUCE";
    case 'S': return "STRING";
    case 'T': return "BINSTRING";
    case 'U': return "SHORT_BINSTRING";
    case 'V': return "UNICODE";
    case 'X': return "BINUNICODE";
    case 'a': return "APPEND";
    case 'b': return "BUILD";
    case 'c': return "GLOBAL";
    case 'd': return "DICT";
    case '}': return "EMPTY_DICT";
    case 'e': return "APPENDS";
    case 'g': return "GET";
    case 'h': return "BINGET";
    case 'i': return "INST";
    case 'j': return "LONG_BINGET";
    case 'l': return "LIST";
    case ']': return "EMPTY_LIST";
    case 'o': return "OBJ";
    case 'p': return "PUT";
    case 'q': return "BINPUT";
    case 'r': return "LONG_BINPUT";
    case 's': return "SETITEM";
    case 't': return "TUPLE";
    case ')': return "EMPTY_TUPLE";
    case 'u': return "SETITEMS";
    case 'G': return "BINFLOAT";
    case 0x80: return "PROTO";
    case 0x81: return "NEWOBJ";
    case 0x82: return "EXT1";
    case 0x83: return "EXT2";
    case 0x84: return "EXT4";
    case 0x85: return "TUPLE1";
    case 0x86: return "TUPLE2";
    case 0x87: return "TUPLE3";
    case 0x88: return "NEWTRUE";
    case 0x89: return "NEWFALSE";
    case 0x8a: return "LONG1";
    case 0x8b: return "LONG4";
    case 'B': return "BINBYTES";
    case 'C': return "SHORT_BINBYTES";
    case 0x8c: return "SHORT_BINUNICODE";
    case 0x8d: return "BINUNICODE8";
    case 0x8e: return "BINBYTES8";
    case 0x8f: return "EMPTY_SET";
    case 0x90: return "ADDITEMS";
    case 0x91: return "FROZENSET";
    case 0x92: return "NEWOBJ_EX";
    case 0x93: return "STACK_GLOBAL";
    case 0x94: return "MEMOIZE";
    case 0x95: return "FRAME";
    case 0x96: return "BYTEARRAY8";
    case 0x97: return "NEXT_BUFFER";
    case 0x98: return "READONLY_BUFFER";
    default: return nullptr;
  }
}

// A name from the file as a message can show it: bytes outside printable
// ASCII become '?', and a long one is cut after 64.
std::string printable(const std::string& name) {
  std::string out;
  for (const char c : name.substr(0, 64)) out += c >= ' ' && c <= '~' ? c : '?';
  return name.size() > 64 ? out + "..." : out;
}

std::uint64_t little_endian(const unsigned char* p, int bytes) {
  std::uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// The CRC-32 of each record as the archive's central directory holds it, by
// the record's name below the archive's folder ("data.pkl", "data/0").
// LibTorch's reader never compares them (its miniz is built without the
// check), so a flipped bit in a weight would load as a different weight.
class RecordChecksums {
 public:
  RecordChecksums(const std::string& path, std::uint64_t file_size) : path_(path) {
    std::ifstream in(path, std::ios::binary);
    auto read_at = [&](std::uint64_t offset, std::uint64_t n) { return read(in, offset, n, "its central directory"); };
    // The end record: 22 bytes and a comment of up to 65535, at the end.
    constexpr std::uint64_t kEnd = 22;
    // The file starts as a zip archive (check_container): without its end it
    // was cut short.
    const char* kCut =
        "no end of central directory record: the file is truncated (a copy or a save that did not finish?)";
    if (file_size < kEnd) fail(kCut);
    const std::uint64_t tail_size = std::min<std::uint64_t>(file_size, kEnd + 65535);
    const std::vector<unsigned char> tail = read_at(file_size - tail_size, tail_size);
    std::uint64_t end = tail_size - kEnd + 1;
    do {
      --end;
    } while (end > 0 && std::memcmp(&tail[end], "PK\x05\x06", 4) != 0);
    if (std::memcmp(&tail[end], "PK\x05\x06", 4) != 0) fail(kCut);
    std::uint64_t entries = little_endian(&tail[end + 10], 2);
    std::uint64_t size = little_endian(&tail[end + 12], 4);
    std::uint64_t offset = little_endian(&tail[end + 16], 4);
    if (entries == 0xffff || size == 0xffffffff || offset == 0xffffffff) {
      // Zip64: a locator just before the end record points at the 64-bit one.
      const std::uint64_t locator = file_size - tail_size + end;
      if (locator < 20) fail("a zip64 archive without its locator");
      const std::vector<unsigned char> l = read_at(locator - 20, 20);
      if (std::memcmp(l.data(), "PK\x06\x07", 4) != 0) fail("a zip64 archive without its locator");
      const std::uint64_t at = little_endian(&l[8], 8);
      if (at > file_size - 56) fail("its zip64 end record lies outside the file");
      const std::vector<unsigned char> e = read_at(at, 56);
      if (std::memcmp(e.data(), "PK\x06\x06", 4) != 0) fail("no zip64 end of central directory record");
      entries = little_endian(&e[32], 8);
      size = little_endian(&e[40], 8);
      offset = little_endian(&e[48], 8);
    }
    if (offset > file_size || size > file_size - offset) fail("its central directory lies outside the file");
    const std::vector<unsigned char> cd = read_at(offset, size);
    std::uint64_t pos = 0;
    std::uint64_t total = 0;
    for (std::uint64_t i = 0; i < entries; ++i) {
      if (pos + 46 > cd.size() || std::memcmp(&cd[pos], "PK\x01\x02", 4) != 0) {
        fail(fmt::format("central directory entry {} is damaged", i));
      }
      const auto crc = static_cast<std::uint32_t>(little_endian(&cd[pos + 16], 4));
      const std::uint64_t name_size = little_endian(&cd[pos + 28], 2);
      const std::uint64_t next =
          pos + 46 + name_size + little_endian(&cd[pos + 30], 2) + little_endian(&cd[pos + 32], 2);
      if (next > cd.size()) fail(fmt::format("central directory entry {} is damaged", i));
      const std::string name(reinterpret_cast<const char*>(&cd[pos + 46]), name_size);
      const std::size_t slash = name.find('/');
      const std::string record = slash == std::string::npos ? name : name.substr(slash + 1);
      // torch.save stores every record as it is: a compressed one (a few
      // bytes that expand to gigabytes) or one named twice (which copy is
      // read is the zip library's choice) is no file it wrote.
      if (const std::uint64_t method = little_endian(&cd[pos + 10], 2); method != 0) {
        fail(fmt::format("record '{}' is compressed (zip method {}); torch.save stores its records as they are",
                         printable(record), method));
      }
      if (!crcs_.emplace(record, crc).second) {
        fail(fmt::format("record '{}' stands twice in its central directory", printable(record)));
      }
      if (record == "version" || record == ".data/version") {
        versions_[record] = Place{little_endian(&cd[pos + 42], 4), little_endian(&cd[pos + 20], 4)};
      }
      // Zip64 keeps a size beyond 32 bits in an extra field; such a record
      // is not counted here.
      if (const std::uint64_t stored = little_endian(&cd[pos + 20], 4); stored != 0xffffffff) total += stored;
      pos = next;
    }
    // Entries that share their bytes would each be read in full.
    if (total > file_size) {
      fail(fmt::format("its records add up to {} bytes, more than the file's {} (entries sharing their bytes?)",
                       total, file_size));
    }
  }

  // The archive's format version, as LibTorch's reader would take it
  // (".data/version" before "version"), checked first: that reader parses
  // it with std::stoull and checks its range in its constructor, which
  // then throws without freeing the zip reader it made. No version record
  // is left to LibTorch's own message.
  void check_format_version() const {
    auto it = versions_.find(".data/version");
    if (it == versions_.end()) it = versions_.find("version");
    if (it == versions_.end()) return;
    const std::string record = it->first;
    const auto [at, size] = it->second;
    if (size > 32) {
      fail(fmt::format("its '{}' record holds {} bytes, where torch.save writes a number", record, size));
    }
    // The local header: 30 bytes, then the name and the extra field.
    std::ifstream in(path_, std::ios::binary);
    const std::string what = fmt::format("its '{}' record", record);
    const std::vector<unsigned char> header = read(in, at, 30, what);
    if (std::memcmp(header.data(), "PK\x03\x04", 4) != 0) fail(what + " has no local header where it should");
    const std::vector<unsigned char> bytes =
        read(in, at + 30 + little_endian(&header[26], 2) + little_endian(&header[28], 2), size, what);
    const std::string text(bytes.begin(), bytes.end());
    const std::size_t first = text.find_first_not_of(" \t\r\n");
    const std::size_t last = text.find_last_not_of(" \t\r\n");
    const std::string digits = first == std::string::npos ? "" : text.substr(first, last - first + 1);
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos) {
      fail(fmt::format("its '{}' record holds no number (\"{}\")", record, printable(digits)));
    }
    std::uint64_t version = 0;
    for (const char c : digits) {
      const auto digit = static_cast<std::uint64_t>(c - '0');
      if (version > (std::numeric_limits<std::uint64_t>::max() - digit) / 10) {
        fail(fmt::format("its '{}' record holds a number beyond 64 bits", record));
      }
      version = version * 10 + digit;
    }
    if (version < caffe2::serialize::kMinSupportedFileFormatVersion ||
        version > caffe2::serialize::kMaxSupportedFileFormatVersion) {
      fail(fmt::format("its file format version {} is not one this LibTorch reads ({} to {})", version,
                       caffe2::serialize::kMinSupportedFileFormatVersion,
                       caffe2::serialize::kMaxSupportedFileFormatVersion));
    }
  }

  void check(const std::string& record, const void* data, std::size_t n) const {
    const auto it = crcs_.find(record);
    if (it == crcs_.end()) fail(fmt::format("record '{}' is not in its central directory", record));
    const auto actual = static_cast<std::uint32_t>(crc32_z(0L, static_cast<const Bytef*>(data), n));
    if (actual != it->second) {
      fail(fmt::format("record '{}' fails its CRC-32 check (the archive says {:08x}, its bytes give {:08x}): the "
                       "file is damaged",
                       record, it->second, actual));
    }
  }

 private:
  [[noreturn]] void fail(const std::string& what) const { throw Error(fmt::format("{}: {}", path_, what)); }

  // `n` bytes of the file from `offset` on; `what` names them in the error.
  std::vector<unsigned char> read(std::ifstream& in, std::uint64_t offset, std::uint64_t n,
                                  const std::string& what) const {
    std::vector<unsigned char> bytes(n);
    in.seekg(static_cast<std::streamoff>(offset));
    in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(n));
    if (!in || static_cast<std::uint64_t>(in.gcount()) != n) fail("cannot read " + what);
    return bytes;
  }

  struct Place {
    std::uint64_t local_header;
    std::uint64_t size;
  };

  std::string path_;
  std::map<std::string, std::uint32_t> crcs_;
  std::map<std::string, Place> versions_;
};

// Loads "data/<key>" once; tensors that name the same key share the storage.
class StorageSource {
 public:
  StorageSource(caffe2::serialize::PyTorchStreamReader& reader, std::uint64_t file_size,
                const RecordChecksums& checksums)
      : reader_(reader), file_size_(file_size), checksums_(checksums) {}

  // Throws std::string on failure; the caller adds where in the pickle.
  at::Storage get(const std::string& key, std::uint64_t declared_bytes) {
    auto it = loaded_.find(key);
    if (it != loaded_.end()) {
      if (it->second.nbytes() != declared_bytes) {
        throw fmt::format("storage '{}' is declared with {} bytes here and {} bytes before", key,
                          declared_bytes, it->second.nbytes());
      }
      return it->second;
    }
    // torch.save names storages by counting; a key LibTorch's reader would
    // take up to a NUL, or as a path, is no storage of its.
    if (key.empty() || !std::all_of(key.begin(), key.end(), [](char c) {
          return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
        })) {
      throw fmt::format("storage key '{}' is no record name (letters, digits and '_')", printable(key));
    }
    const std::string name = "data/" + key;
    if (!reader_.hasRecord(name)) throw fmt::format("the archive has no record '{}'", name);
    const std::uint64_t size = reader_.getRecordSize(name);
    if (size != declared_bytes) {
      throw fmt::format("record '{}' holds {} bytes, the pickle declares {}", name, size, declared_bytes);
    }
    // torch.save stores records uncompressed: one larger than the file is a
    // corrupt directory entry, not something to allocate for.
    if (size > file_size_) {
      throw fmt::format("record '{}' claims {} bytes, more than the file's {}", name, size, file_size_);
    }
    auto [data, n] = reader_.getRecord(name);
    checksums_.check(name, data.get(), n);
    at::Storage storage(at::Storage::use_byte_size_t(), n, std::move(data), nullptr, false);
    loaded_.emplace(key, storage);
    return storage;
  }

 private:
  caffe2::serialize::PyTorchStreamReader& reader_;
  std::uint64_t file_size_;
  const RecordChecksums& checksums_;
  std::unordered_map<std::string, at::Storage> loaded_;
};

class Unpickler {
 public:
  Unpickler(const std::string& path, const unsigned char* data, std::size_t size, StorageSource& storages,
            std::vector<std::weak_ptr<Obj>>& containers)
      : path_(path), data_(data), size_(size), storages_(storages), containers_(containers) {}

  Ref run() {
    while (true) {
      op_pos_ = pos_;
      if (pos_ >= size_) fail("the pickle ends without STOP (truncated?)");
      const unsigned char op = u8();
      switch (op) {
        case 0x80: {  // PROTO
          const unsigned v = u8();
          if (v > 5) fail(fmt::format("pickle protocol {} is newer than this reader (at most 5)", v));
          break;
        }
        case 0x95:  // FRAME: only a read-ahead hint
          (void)u64();
          break;
        case '.': {  // STOP
          Ref result = pop();
          return result;
        }
        case '(':
          marks_.push_back(stack_.size());
          break;
        case '0':
          (void)pop();
          break;
        case '1':
          (void)pop_mark();
          break;
        case '2':
          push(top());
          break;
        case '}':
          push(container(Kind::Dict));
          break;
        case ']':
          push(container(Kind::List));
          break;
        case ')':
          push(container(Kind::Tuple));
          break;
        case 't':
          push(make_tuple(pop_mark()));
          break;
        case 0x85:
        case 0x86:
        case 0x87: {  // TUPLE1..3
          const std::size_t n = op - 0x84;
          std::vector<Ref> items(n);
          for (std::size_t k = n; k-- > 0;) items[k] = pop();
          push(make_tuple(std::move(items)));
          break;
        }
        case 'l': {
          Ref list = container(Kind::List);
          list->items = pop_mark();
          push(list);
          break;
        }
        case 'd': {
          Ref dict = container(Kind::Dict);
          set_items(*dict, pop_mark());
          push(dict);
          break;
        }
        case 's': {
          std::vector<Ref> kv(2);
          kv[1] = pop();
          kv[0] = pop();
          set_items(expect(top(), Kind::Dict, "SETITEM target"), std::move(kv));
          break;
        }
        case 'u': {
          std::vector<Ref> kv = pop_mark();
          set_items(expect(top(), Kind::Dict, "SETITEMS target"), std::move(kv));
          break;
        }
        case 'a': {
          Ref v = pop();
          expect(top(), Kind::List, "APPEND target").items.push_back(std::move(v));
          break;
        }
        case 'e': {
          std::vector<Ref> vs = pop_mark();
          auto& items = expect(top(), Kind::List, "APPENDS target").items;
          for (auto& v : vs) items.push_back(std::move(v));
          break;
        }
        case 'q': {
          const std::uint64_t key = u8();
          memo_[key] = top();
          break;
        }
        case 'r': {
          const std::uint64_t key = u32();
          memo_[key] = top();
          break;
        }
        case 0x94: {  // MEMOIZE
          const std::uint64_t key = memo_.size();
          memo_[key] = top();
          break;
        }
        case 'h':
          push(memo_get(u8()));
          break;
        case 'j':
          push(memo_get(u32()));
          break;
        case 'J': {
          const std::uint32_t v = u32();
          std::int32_t s;
          std::memcpy(&s, &v, sizeof s);
          push(make_int(s));
          break;
        }
        case 'K':
          push(make_int(u8()));
          break;
        case 'M':
          push(make_int(u16()));
          break;
        case 0x8a:  // LONG1
          push(make_int(little_endian_int(u8())));
          break;
        case 0x8b: {  // LONG4
          const std::uint32_t n = u32();
          if (n > 8) fail(fmt::format("an integer of {} bytes does not fit in 64 bits", n));
          push(make_int(little_endian_int(n)));
          break;
        }
        case 'G': {  // BINFLOAT, big-endian
          const unsigned char* p = take(8);
          std::uint64_t bits = 0;
          for (int k = 0; k < 8; ++k) bits = (bits << 8) | p[k];
          Ref r = make(Kind::Float);
          std::memcpy(&r->f, &bits, sizeof bits);
          push(r);
          break;
        }
        case 'X':
        case 'T':
        case 'B':
          push(make_str(bytes(signed_length32())));
          break;
        case 0x8c:
        case 'U':
        case 'C':
          push(make_str(bytes(u8())));
          break;
        case 0x8d:
        case 0x8e:
          push(make_str(bytes(u64())));
          break;
        case 'N':
          push(make(Kind::None));
          break;
        case 0x88:
        case 0x89: {
          Ref r = make(Kind::Bool);
          r->flag = op == 0x88;
          push(r);
          break;
        }
        case 'c': {
          std::string module = line();
          std::string name = line();
          push(resolve_global(module, name));
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          Ref name = pop();
          Ref module = pop();
          push(resolve_global(expect(module, Kind::Str, "STACK_GLOBAL module").s,
                              expect(name, Kind::Str, "STACK_GLOBAL name").s));
          break;
        }
        case 'R':
        case 0x81: {  // REDUCE, NEWOBJ: the globals accepted here construct the same way
          Ref args = pop();
          Ref callee = pop();
          push(call(expect(callee, Kind::Global, "callable"), expect(args, Kind::Tuple, "arguments")));
          break;
        }
        case 'b': {  // BUILD
          Ref state = pop();
          const Obj& target = *top();
          if (target.kind != Kind::Dict || !target.flag) {
            fail(fmt::format("BUILD (setting attributes) on a {} is not supported", kind_name(target.kind)));
          }
          // An OrderedDict's attributes: state_dict()._metadata, not data.
          break;
        }
        case 'Q':  // BINPERSID
          push(persistent_load(pop()));
          break;
        default: {
          const char* name = opcode_name(op);
          fail(name ? fmt::format("unsupported pickle opcode {} (0x{:02x})", name, op)
                    : fmt::format("invalid pickle opcode 0x{:02x}", op));
        }
      }
    }
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw Error(fmt::format("{}: data.pkl byte {}: {}", path_, op_pos_, what));
  }

  // Only called once the opcode at op_pos_ has been read.
  const char* op_label() const {
    const char* name = opcode_name(data_[op_pos_]);
    return name ? name : "opcode";
  }

  const unsigned char* take(std::uint64_t n) {
    if (n > size_ - pos_) {
      fail(fmt::format("{} needs {} more bytes, the pickle ends after {} (truncated?)", op_label(), n,
                       size_ - pos_));
    }
    const unsigned char* p = data_ + pos_;
    pos_ += n;
    return p;
  }
  unsigned u8() { return *take(1); }
  std::uint64_t little_endian(int n) {
    const unsigned char* p = take(n);
    std::uint64_t v = 0;
    for (int k = n; k-- > 0;) v = (v << 8) | p[k];
    return v;
  }
  unsigned u16() { return static_cast<unsigned>(little_endian(2)); }
  std::uint32_t u32() { return static_cast<std::uint32_t>(little_endian(4)); }
  std::uint64_t u64() { return little_endian(8); }
  std::uint64_t signed_length32() {
    const std::uint32_t v = u32();
    if (v & 0x80000000u) fail("negative length");
    return v;
  }
  std::string bytes(std::uint64_t n) {
    const unsigned char* p = take(n);
    return std::string(reinterpret_cast<const char*>(p), n);
  }
  std::string line() {
    const void* nl = std::memchr(data_ + pos_, '\n', size_ - pos_);
    if (!nl) fail("GLOBAL name has no end of line (truncated?)");
    const std::size_t n = static_cast<const unsigned char*>(nl) - (data_ + pos_);
    std::string s = bytes(n);
    pos_ += 1;
    return s;
  }
  // Two's complement of n bytes, as LONG1 and LONG4 write it.
  std::int64_t little_endian_int(std::uint64_t n) {
    if (n > 8) fail(fmt::format("an integer of {} bytes does not fit in 64 bits", n));
    if (n == 0) return 0;
    std::uint64_t v = little_endian(static_cast<int>(n));
    if (n < 8 && (v >> (8 * n - 1)) & 1) v |= ~std::uint64_t{0} << (8 * n);
    std::int64_t s;
    std::memcpy(&s, &v, sizeof s);
    return s;
  }

  // The stack above the innermost MARK is all an opcode may touch, as in Python.
  std::size_t floor() const { return marks_.empty() ? 0 : marks_.back(); }
  void push(Ref r) { stack_.push_back(std::move(r)); }
  Ref pop() {
    if (stack_.size() <= floor()) fail(fmt::format("{} on an empty stack", op_label()));
    Ref r = std::move(stack_.back());
    stack_.pop_back();
    return r;
  }
  const Ref& top() {
    if (stack_.size() <= floor()) fail(fmt::format("{} on an empty stack", op_label()));
    return stack_.back();
  }
  std::vector<Ref> pop_mark() {
    if (marks_.empty()) fail(fmt::format("{} without a MARK", op_label()));
    const std::size_t m = marks_.back();
    marks_.pop_back();
    std::vector<Ref> items(std::make_move_iterator(stack_.begin() + static_cast<std::ptrdiff_t>(m)),
                           std::make_move_iterator(stack_.end()));
    stack_.resize(m);
    return items;
  }
  Ref memo_get(std::uint64_t key) {
    auto it = memo_.find(key);
    if (it == memo_.end()) fail(fmt::format("memo entry {} was never stored", key));
    return it->second;
  }
  Obj& expect(const Ref& r, Kind k, const char* what) {
    if (r->kind != k) fail(fmt::format("{} is a {}, expected a {}", what, kind_name(r->kind), kind_name(k)));
    return *r;
  }

  Ref container(Kind k) {
    Ref r = make(k);
    containers_.push_back(r);
    return r;
  }

  Ref make_tuple(std::vector<Ref> items) {
    Ref t = container(Kind::Tuple);
    t->items = std::move(items);
    return t;
  }

  // Python's dict semantics: a repeated key keeps its place and takes the new value.
  void set_items(Obj& dict, std::vector<Ref> kv) {
    if (kv.size() % 2 != 0) fail("odd number of items for a dict");
    for (std::size_t k = 0; k < kv.size(); k += 2) {
      const Obj& key = *kv[k];
      std::string id;
      if (key.kind == Kind::Str) {
        id = "s" + key.s;
      } else if (key.kind == Kind::Int) {
        id = "i" + std::to_string(key.i);
      } else {
        fail(fmt::format("a dict key is a {}; only str and int keys are supported", kind_name(key.kind)));
      }
      auto [it, fresh] = dict.index.emplace(std::move(id), dict.items.size() / 2);
      if (fresh) {
        dict.items.push_back(std::move(kv[k]));
        dict.items.push_back(std::move(kv[k + 1]));
      } else {
        dict.items[2 * it->second + 1] = std::move(kv[k + 1]);
      }
    }
  }

  Ref resolve_global(const std::string& module, const std::string& name) {
    const std::string full = module + "." + name;
    for (const auto& g : kGlobals) {
      if (full == g.name) {
        Ref r = make(Kind::Global);
        r->s = full;
        r->fn = g.fn;
        r->dtype = g.dtype;
        return r;
      }
    }
    std::string known;
    for (const auto& g : kGlobals) {
      if (g.fn == Fn::StorageType || g.fn == Fn::DType) continue;
      known += known.empty() ? "" : ", ";
      known += g.name;
    }
    fail(fmt::format("unsupported global {} (this reader knows {}, torch storage types and dtypes)", full,
                     known));
  }

  // ('storage', <storage type>, key, location, numel): the location is
  // ignored because every tensor is loaded onto the CPU.
  Ref persistent_load(const Ref& pid) {
    const auto& t = expect(pid, Kind::Tuple, "persistent id").items;
    if (t.size() != 5 || t[0]->kind != Kind::Str || t[0]->s != "storage" || t[1]->kind != Kind::Global ||
        t[1]->fn != Fn::StorageType || t[2]->kind != Kind::Str || t[3]->kind != Kind::Str ||
        t[4]->kind != Kind::Int || t[4]->i < 0) {
      fail("persistent id is not ('storage', <storage type>, key, location, numel)");
    }
    const at::ScalarType dtype = t[1]->dtype;
    const std::uint64_t numel = static_cast<std::uint64_t>(t[4]->i);
    const std::uint64_t itemsize = c10::elementSize(dtype);
    if (numel > std::numeric_limits<std::uint64_t>::max() / itemsize) fail("storage size overflows");
    Ref r = make(Kind::Storage);
    r->s = t[2]->s;
    r->dtype = dtype;
    try {
      r->storage = storages_.get(t[2]->s, numel * itemsize);
    } catch (const std::string& e) {
      fail(e);
    }
    return r;
  }

  std::vector<std::int64_t> int_list(const Ref& r, const char* what) {
    if (r->kind != Kind::Tuple && r->kind != Kind::List) {
      fail(fmt::format("{} is a {}, expected a tuple of ints", what, kind_name(r->kind)));
    }
    std::vector<std::int64_t> out;
    for (const auto& v : r->items) {
      if (v->kind != Kind::Int) fail(fmt::format("{} holds a {}, expected ints", what, kind_name(v->kind)));
      out.push_back(v->i);
    }
    return out;
  }

  bool as_bool(const Ref& r, const char* what) { return expect(r, Kind::Bool, what).flag; }

  Ref make_tensor(const Ref& storage_ref, at::ScalarType dtype, const Ref& offset_ref, const Ref& size_ref,
                  const Ref& stride_ref) {
    const Obj& storage = expect(storage_ref, Kind::Storage, "tensor storage");
    const std::int64_t offset = expect(offset_ref, Kind::Int, "storage offset").i;
    const auto sizes = int_list(size_ref, "tensor size");
    const auto strides = int_list(stride_ref, "tensor stride");
    if (sizes.size() != strides.size()) {
      fail(fmt::format("tensor size has {} dimensions, its stride {}", sizes.size(), strides.size()));
    }
    if (offset < 0) fail("negative storage offset");
    // The last element the view reaches must lie inside the storage.
    constexpr std::int64_t kLimit = std::int64_t{1} << 62;
    bool empty = false;
    std::int64_t last = offset;
    for (std::size_t d = 0; d < sizes.size(); ++d) {
      if (sizes[d] < 0 || strides[d] < 0) fail("negative tensor size or stride");
      if (sizes[d] == 0) empty = true;
      if (sizes[d] > 0 && strides[d] > 0 && sizes[d] - 1 > (kLimit - last) / strides[d]) {
        fail("tensor extent overflows");
      }
      if (sizes[d] > 0) last += (sizes[d] - 1) * strides[d];
    }
    const std::uint64_t itemsize = c10::elementSize(dtype);
    const std::uint64_t nbytes = storage.storage.nbytes();
    if (!empty && static_cast<std::uint64_t>(last) + 1 > nbytes / itemsize) {
      fail(fmt::format("a {} view reaching element {} does not fit its storage '{}' of {} bytes",
                       c10::toString(dtype), last, storage.s, nbytes));
    }
    Ref r = make(Kind::Tensor);
    try {
      r->tensor = at::empty({0}, at::TensorOptions().dtype(dtype));
      r->tensor.set_(storage.storage, offset, sizes, strides);
    } catch (const c10::Error& e) {
      fail(fmt::format("cannot rebuild a tensor: {}", e.what_without_backtrace()));
    }
    return r;
  }

  void set_requires_grad(at::Tensor& t, bool requires_grad) {
    if (!requires_grad) return;
    try {
      t.set_requires_grad(true);
    } catch (const c10::Error& e) {
      fail(fmt::format("cannot set requires_grad: {}", e.what_without_backtrace()));
    }
  }

  // The conj and neg bits that torch._utils.get_tensor_metadata records.
  void set_metadata(at::Tensor& t, const Ref& meta) {
    if (meta->kind == Kind::None) return;
    const Obj& dict = expect(meta, Kind::Dict, "tensor metadata");
    for (std::size_t k = 0; k < dict.items.size(); k += 2) {
      const Obj& key = *dict.items[k];
      const std::string name = key.kind == Kind::Str ? key.s : std::to_string(key.i);
      const bool on = as_bool(dict.items[k + 1], "tensor metadata value");
      if (name == "conj") {
        if (on && !at::isComplexType(t.scalar_type())) fail("conj bit on a tensor that is not complex");
        t._set_conj(on);
      } else if (name == "neg") {
        // ATen has no negation for these dtypes: reading such a tensor
        // would fail later, outside the reader (torch.save writes the bit
        // as a view had it, even there).
        const at::ScalarType type = t.scalar_type();
        if (on && (type == at::kBool || type == at::kUInt16 || type == at::kUInt32 || type == at::kUInt64 ||
                   c10::isFloat8Type(type))) {
          fail(fmt::format("neg bit on a tensor of dtype {}, which has no negation", c10::toString(type)));
        }
        t._set_neg(on);
      } else {
        fail(fmt::format("unsupported tensor metadata '{}'", name));
      }
    }
  }

  Ref call(const Obj& callee, const Obj& args_obj) {
    const std::vector<Ref>& a = args_obj.items;
    auto arity = [&](std::size_t lo, std::size_t hi) {
      if (a.size() < lo || a.size() > hi) {
        fail(fmt::format("{} called with {} arguments, expected {}", callee.s, a.size(),
                         lo == hi ? std::to_string(lo) : fmt::format("{} to {}", lo, hi)));
      }
    };
    switch (callee.fn) {
      case Fn::OrderedDict: {
        arity(0, 0);
        Ref d = container(Kind::Dict);
        d->flag = true;
        return d;
      }
      case Fn::RebuildTensor: {
        arity(4, 4);
        return make_tensor(a[0], expect(a[0], Kind::Storage, "tensor storage").dtype, a[1], a[2], a[3]);
      }
      case Fn::RebuildTensorV2: {
        arity(6, 7);
        Ref t = make_tensor(a[0], expect(a[0], Kind::Storage, "tensor storage").dtype, a[1], a[2], a[3]);
        expect(a[5], Kind::Dict, "backward hooks");
        if (a.size() == 7) set_metadata(t->tensor, a[6]);
        set_requires_grad(t->tensor, as_bool(a[4], "requires_grad"));
        return t;
      }
      case Fn::RebuildTensorV3: {
        arity(7, 8);
        const Obj& dtype = expect(a[6], Kind::Global, "dtype");
        if (dtype.fn != Fn::DType) fail(fmt::format("{} is not a dtype", dtype.s));
        Ref t = make_tensor(a[0], dtype.dtype, a[1], a[2], a[3]);
        expect(a[5], Kind::Dict, "backward hooks");
        if (a.size() == 8) set_metadata(t->tensor, a[7]);
        set_requires_grad(t->tensor, as_bool(a[4], "requires_grad"));
        return t;
      }
      case Fn::RebuildParameter: {
        arity(3, 3);
        // A new tensor over the same data, as nn.Parameter(data) is.
        Ref t = make(Kind::Tensor);
        t->tensor = expect(a[0], Kind::Tensor, "parameter data").tensor.detach();
        expect(a[2], Kind::Dict, "backward hooks");
        set_requires_grad(t->tensor, as_bool(a[1], "requires_grad"));
        return t;
      }
      case Fn::Size: {
        arity(1, 1);
        (void)int_list(a[0], "torch.Size argument");
        return make_tuple(a[0]->items);
      }
      case Fn::CodecsEncode: {
        // How protocol 2 writes bytes: the bytes as code points 0-255 of a str.
        arity(2, 2);
        if (expect(a[1], Kind::Str, "encoding").s != "latin1") {
          fail(fmt::format("_codecs.encode with encoding '{}', expected 'latin1'", a[1]->s));
        }
        return make_str(latin1_from_utf8(expect(a[0], Kind::Str, "encoded text").s));
      }
      case Fn::Bytes:
        arity(0, 0);
        return make_str("");
      case Fn::StorageType:
      case Fn::DType:
        break;
    }
    fail(fmt::format("{} cannot be called", callee.s));
  }

  std::string latin1_from_utf8(const std::string& s) {
    std::string out;
    for (std::size_t k = 0; k < s.size(); ++k) {
      const auto c = static_cast<unsigned char>(s[k]);
      if (c < 0x80) {
        out += static_cast<char>(c);
      } else if ((c == 0xc2 || c == 0xc3) && k + 1 < s.size() &&
                 (static_cast<unsigned char>(s[k + 1]) & 0xc0) == 0x80) {
        out += static_cast<char>(((c & 0x03) << 6) | (static_cast<unsigned char>(s[k + 1]) & 0x3f));
        ++k;
      } else {
        fail("latin1-encoded bytes hold a character above U+00FF");
      }
    }
    return out;
  }

  const std::string& path_;
  const unsigned char* data_;
  std::size_t size_;
  StorageSource& storages_;
  std::vector<std::weak_ptr<Obj>>& containers_;
  std::size_t pos_ = 0;
  std::size_t op_pos_ = 0;
  std::vector<Ref> stack_;
  std::vector<std::size_t> marks_;
  std::unordered_map<std::uint64_t, Ref> memo_;
};

// The element type of a list or dict: the one type when all items share a
// simple one, so that toTensorList() and typed dicts work; otherwise Any.
c10::TypePtr common_type(const std::vector<c10::IValue>& items) {
  if (items.empty()) return c10::AnyType::get();
  auto all = [&](bool (c10::IValue::*is)() const) {
    for (const auto& v : items) {
      if (!(v.*is)()) return false;
    }
    return true;
  };
  if (all(&c10::IValue::isTensor)) return c10::TensorType::get();
  if (all(&c10::IValue::isInt)) return c10::IntType::get();
  if (all(&c10::IValue::isDouble)) return c10::FloatType::get();
  if (all(&c10::IValue::isBool)) return c10::BoolType::get();
  if (all(&c10::IValue::isString)) return c10::StringType::get();
  return c10::AnyType::get();
}

// Objects reached twice (memo) convert once, so identity survives.
class Converter {
 public:
  explicit Converter(const std::string& path) : path_(path) {}

  c10::IValue convert(const Ref& r, int depth) {
    if (depth > kMaxDepth) fail(fmt::format("containers nest deeper than {} levels", kMaxDepth));
    const Obj& o = *r;
    switch (o.kind) {
      case Kind::None: return c10::IValue();
      case Kind::Bool: return c10::IValue(o.flag);
      case Kind::Int: return c10::IValue(o.i);
      case Kind::Float: return c10::IValue(o.f);
      case Kind::Str: return c10::IValue(o.s);
      case Kind::Tensor: return c10::IValue(o.tensor);
      case Kind::Global: fail(fmt::format("holds {} itself, which is not a value this reader converts", o.s));
      case Kind::Storage: fail(fmt::format("holds a bare storage ('{}'); only tensors are converted", o.s));
      case Kind::List:
      case Kind::Tuple:
      case Kind::Dict: break;
    }
    auto done = done_.find(&o);
    if (done != done_.end()) return done->second;
    if (!active_.insert(&o).second) fail(fmt::format("a {} contains itself", kind_name(o.kind)));
    std::vector<c10::IValue> items;
    items.reserve(o.items.size());
    for (const auto& item : o.items) items.push_back(convert(item, depth + 1));
    c10::IValue out;
    if (o.kind == Kind::Tuple) {
      out = c10::ivalue::Tuple::create(std::move(items));
    } else if (o.kind == Kind::List) {
      c10::impl::GenericList list(common_type(items));
      list.reserve(items.size());
      for (auto& v : items) list.push_back(std::move(v));
      out = std::move(list);
    } else {
      std::vector<c10::IValue> keys, values;
      for (std::size_t k = 0; k < items.size(); k += 2) {
        keys.push_back(std::move(items[k]));
        values.push_back(std::move(items[k + 1]));
      }
      c10::impl::GenericDict dict(common_type(keys), common_type(values));
      dict.reserve(keys.size());
      for (std::size_t k = 0; k < keys.size(); ++k) dict.insert(std::move(keys[k]), std::move(values[k]));
      out = std::move(dict);
    }
    active_.erase(&o);
    done_.emplace(&o, out);
    return out;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const { throw Error(fmt::format("{}: {}", path_, what)); }

  const std::string& path_;
  std::unordered_map<const Obj*, c10::IValue> done_;
  std::unordered_set<const Obj*> active_;
};

// A crafted pickle can build a reference cycle (a list holding itself),
// which shared_ptr alone would leak; emptying every container still alive
// once the load is over breaks it.
class CycleBreaker {
 public:
  ~CycleBreaker() {
    for (auto& weak : containers) {
      if (Ref r = weak.lock()) r->items.clear();
    }
  }
  std::vector<std::weak_ptr<Obj>> containers;
};

// Says what the file is when it is not a zip archive, the commonest mistake.
void check_container(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) throw Error(fmt::format("{}: a folder, not a checkpoint file", path));
  // A pipe would block the open until a writer comes, a device never ends.
  const auto status = std::filesystem::status(path, ec);
  if (std::filesystem::exists(status) && !std::filesystem::is_regular_file(status)) {
    throw Error(fmt::format("{}: not a regular file (a pipe, socket or device), not a checkpoint file", path));
  }
  errno = 0;
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    // open(2)'s reason: no such file, not readable, a loop of links.
    const int err = errno;
    throw Error(fmt::format("{}: cannot open: {}", path, err ? std::strerror(err) : "no such file, or not readable"));
  }
  unsigned char head[4] = {};
  in.read(reinterpret_cast<char*>(head), sizeof head);
  if (in.gcount() >= 2 && head[0] == 0x80 && head[1] <= 5) {
    throw Error(fmt::format("{}: a bare pickle, as torch.save writes with _use_new_zipfile_serialization=False; "
                            "only the zip format is read: save it again with torch.save's default",
                            path));
  }
  if (in.gcount() < 4 || std::memcmp(head, "PK\x03\x04", 4) != 0) {
    throw Error(fmt::format("{}: not a torch.save file (not a zip archive)", path));
  }
}

}  // namespace

void check_torch_save_file(const std::string& path) { check_container(path); }

c10::IValue load_torch_save(const std::string& path) {
  check_container(path);
  std::error_code ec;
  const std::uint64_t file_size = std::filesystem::file_size(path, ec);
  if (ec) throw Error(fmt::format("{}: cannot read its size: {}", path, ec.message()));
  try {
    // The central directory first: what it refuses is never read.
    const RecordChecksums checksums(path, file_size);
    checksums.check_format_version();
    caffe2::serialize::PyTorchStreamReader reader(path);
    if (reader.hasRecord("byteorder")) {
      if (const std::size_t n = reader.getRecordSize("byteorder"); n > 16) {
        throw Error(fmt::format("{}: its 'byteorder' record holds {} bytes, where torch.save writes \"little\" or "
                                "\"big\"",
                                path, n));
      }
      auto [data, n] = reader.getRecord("byteorder");
      checksums.check("byteorder", data.get(), n);
      const std::string order = n ? std::string(static_cast<const char*>(data.get()), n) : std::string();
      if (order != "little") {
        throw Error(fmt::format("{}: tensors are stored {}-endian; only little-endian is supported", path,
                                printable(order)));
      }
    }
    if (!reader.hasRecord("data.pkl")) throw Error(fmt::format("{}: the archive has no data.pkl", path));
    if (reader.getRecordSize("data.pkl") > file_size) {
      throw Error(fmt::format("{}: data.pkl claims more bytes than the file has (corrupt?)", path));
    }
    auto [pickle, size] = reader.getRecord("data.pkl");
    StorageSource storages(reader, file_size, checksums);
    CycleBreaker breaker;
    Ref root =
        Unpickler(path, static_cast<const unsigned char*>(pickle.get()), size, storages, breaker.containers).run();
    // After the pickle is read, so that a fuzz run's mutations reach the
    // unpickler; either way a damaged pickle is an error.
    checksums.check("data.pkl", pickle.get(), size);
    return Converter(path).convert(root, 0);
  } catch (const c10::Error& e) {
    throw Error(fmt::format("{}: not a readable torch.save archive (truncated or corrupt?): {}", path,
                            e.what_without_backtrace()));
  } catch (const std::bad_alloc&) {
    throw Error(fmt::format("{}: out of memory while reading (corrupt sizes?)", path));
  }
}

}  // namespace deepcam

// ---------------------------------------------------------------------------
// The writer: the same format from the other side. The pickle holds only the
// structure (a few kilobytes for a state dict); each tensor's storage is
// written from the tensor's own memory straight into the archive, so that
// saving needs no second copy of the weights and optimizer state.

namespace deepcam {
namespace {

const char* legacy_storage_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "FloatStorage";
    case at::kDouble: return "DoubleStorage";
    case at::kHalf: return "HalfStorage";
    case at::kBFloat16: return "BFloat16Storage";
    case at::kLong: return "LongStorage";
    case at::kInt: return "IntStorage";
    case at::kShort: return "ShortStorage";
    case at::kChar: return "CharStorage";
    case at::kByte: return "ByteStorage";
    case at::kBool: return "BoolStorage";
    case at::kComplexFloat: return "ComplexFloatStorage";
    case at::kComplexDouble: return "ComplexDoubleStorage";
    default: return nullptr;
  }
}

// Protocol 2, as torch.save's default: the opcodes Python's pickler uses for
// these types, without the memo (nothing is shared but storages, and those
// are shared through their persistent ids, as torch.load resolves them).
class PickleWriter {
 public:
  explicit PickleWriter(std::string path) : path_(std::move(path)) { op(0x80), byte(2); }

  void write(const c10::IValue& v, const std::string& where, int depth = 0) {
    if (depth > kMaxDepth) fail(where, "nests deeper than " + std::to_string(kMaxDepth) + " levels");
    if (v.isNone()) return op('N');
    if (v.isBool()) return op(v.toBool() ? 0x88 : 0x89);
    if (v.isInt()) return integer(v.toInt());
    if (v.isDouble()) return floating(v.toDouble());
    if (v.isString()) return string(v.toStringRef());
    if (v.isTensor()) return tensor(v.toTensor(), where);
    if (v.isTuple()) {
      const auto& items = v.toTupleRef().elements();
      if (items.empty()) return op(')');
      if (items.size() > 3) op('(');
      for (std::size_t i = 0; i < items.size(); ++i) write(items[i], fmt::format("{}[{}]", where, i), depth + 1);
      if (items.size() > 3) return op('t');
      return op(static_cast<unsigned char>(0x84 + items.size()));  // TUPLE1..3
    }
    if (v.isList()) {
      op(']');
      const auto items = v.toListRef();
      if (items.empty()) return;
      op('(');
      for (std::size_t i = 0; i < items.size(); ++i) write(items[i], fmt::format("{}[{}]", where, i), depth + 1);
      return op('e');
    }
    if (v.isGenericDict()) {
      op('}');
      const auto dict = v.toGenericDict();
      if (dict.empty()) return;
      op('(');
      for (const auto& e : dict) {
        const std::string key = e.key().isString() ? "'" + e.key().toStringRef() + "'"
                                : e.key().isInt()  ? std::to_string(e.key().toInt())
                                                   : std::string(e.key().tagKind());
        write(e.key(), where, depth + 1);
        write(e.value(), fmt::format("{}[{}]", where, key), depth + 1);
      }
      return op('u');
    }
    fail(where, fmt::format("is a {}, which a checkpoint cannot hold", v.tagKind()));
  }

  // The pickle, ended by STOP.
  const std::string& finish() {
    op('.');
    return out_;
  }
  // The storages in the order of their keys "0", "1", ...
  const std::vector<c10::Storage>& storages() const { return storages_; }

 private:
  [[noreturn]] void fail(const std::string& where, const std::string& what) const {
    throw Error(fmt::format("{}: cannot save {}: it {}", path_, where.empty() ? "the value" : where, what));
  }
  void op(unsigned char c) { out_.push_back(static_cast<char>(c)); }
  void byte(unsigned char c) { out_.push_back(static_cast<char>(c)); }
  void le(std::uint64_t v, int n) {
    for (int i = 0; i < n; ++i) byte(static_cast<unsigned char>(v >> (8 * i)));
  }

  void integer(std::int64_t v) {
    if (v >= 0 && v < 256) return op('K'), byte(static_cast<unsigned char>(v));
    if (v >= 0 && v < 65536) return op('M'), le(static_cast<std::uint64_t>(v), 2);
    if (v >= std::numeric_limits<std::int32_t>::min() && v <= std::numeric_limits<std::int32_t>::max()) {
      return op('J'), le(static_cast<std::uint32_t>(static_cast<std::int32_t>(v)), 4);
    }
    // LONG1: the shortest little-endian two's complement.
    int n = 8;
    while (n > 1) {
      const std::int64_t shifted = v >> (8 * (n - 1) - 1);
      if (shifted != 0 && shifted != -1) break;
      --n;
    }
    op(0x8a), byte(static_cast<unsigned char>(n)), le(static_cast<std::uint64_t>(v), n);
  }

  void floating(double d) {
    std::uint64_t bits;
    std::memcpy(&bits, &d, sizeof bits);
    op('G');
    for (int i = 7; i >= 0; --i) byte(static_cast<unsigned char>(bits >> (8 * i)));
  }

  void string(const std::string& s) {
    if (s.size() > std::numeric_limits<std::uint32_t>::max()) fail("", "holds a string longer than 4 GiB");
    op('X'), le(s.size(), 4);
    out_ += s;
  }

  void global(const char* module, const char* name) {
    op('c');
    out_ += module;
    out_ += '\n';
    out_ += name;
    out_ += '\n';
  }

  void size_tuple(at::IntArrayRef values) {
    if (values.size() > 3) op('(');
    for (const std::int64_t v : values) integer(v);
    if (values.empty()) return op(')');
    if (values.size() > 3) return op('t');
    op(static_cast<unsigned char>(0x84 + values.size()));
  }

  // torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
  // requires_grad, OrderedDict()), the storage a persistent id
  // ('storage', torch.<Type>Storage, key, 'cpu', numel).
  void tensor(const at::Tensor& t, const std::string& where) {
    if (t.layout() != at::kStrided) fail(where, fmt::format("is a {} tensor; only dense ones are saved", c10::str(t.layout())));
    if (t.is_quantized()) fail(where, "is a quantized tensor");
    if (t.is_conj() || t.is_neg()) fail(where, "has the conj or neg bit set (resolve it first)");
    const char* storage_type = legacy_storage_name(t.scalar_type());
    if (!storage_type) fail(where, fmt::format("has dtype {}, which has no storage type here", c10::toString(t.scalar_type())));
    const c10::Storage& storage = t.storage();
    if (!storage) fail(where, "has no storage");
    auto [it, fresh] = keys_.try_emplace(storage.unsafeGetStorageImpl(), storages_.size());
    if (fresh) storages_.push_back(storage);

    global("torch._utils", "_rebuild_tensor_v2");
    op('(');
    op('(');
    string("storage");
    global("torch", storage_type);
    string(std::to_string(it->second));
    string("cpu");
    integer(static_cast<std::int64_t>(storage.nbytes() / t.element_size()));
    op('t');
    op('Q');  // BINPERSID
    integer(t.storage_offset());
    size_tuple(t.sizes());
    size_tuple(t.strides());
    op(t.requires_grad() ? 0x88 : 0x89);
    global("collections", "OrderedDict");
    op(')');
    op('R');
    op('t');
    op('R');
  }

  std::string path_;
  std::string out_;
  std::vector<c10::Storage> storages_;
  std::unordered_map<const c10::StorageImpl*, std::size_t> keys_;
};

// Where the archive goes: a file descriptor. The first failure is kept and
// every later write is dropped unreported, so that PyTorchStreamWriter never
// throws from its destructor (it finishes the archive there when an error
// cut the writing short); the caller checks `error` after each record.
struct FileSink {
  int fd = -1;
  int error = 0;
  bool discard = false;

  std::size_t operator()(const void* data, std::size_t n) {
    if (error || discard) return n;
    const char* p = static_cast<const char*>(data);
    std::size_t left = n;
    while (left > 0) {
      const ssize_t w = ::write(fd, p, left);
      if (w < 0) {
        if (errno == EINTR) continue;
        error = errno;
        return n;
      }
      if (w == 0) {
        error = EIO;
        return n;
      }
      p += w;
      left -= static_cast<std::size_t>(w);
    }
    return n;
  }
};

}  // namespace

void save_torch(const std::string& path, const c10::IValue& value) {
  PickleWriter pickle(path);
  pickle.write(value, "");
  const std::string& data = pickle.finish();

  const std::string tmp = fmt::format("{}.tmp-{}", path, ::getpid());
  FileSink sink;
  sink.fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (sink.fd < 0) throw Error(fmt::format("{}: cannot create: {}", tmp, std::strerror(errno)));
  // Declared before the writer, so destroyed after it: the file is closed
  // and, unless the rename happened, removed.
  struct Cleanup {
    FileSink& sink;
    const std::string& tmp;
    bool renamed = false;
    ~Cleanup() {
      if (sink.fd >= 0) ::close(sink.fd);
      if (!renamed) ::unlink(tmp.c_str());
    }
  } cleanup{sink, tmp};
  auto check = [&] {
    if (sink.error) throw Error(write_error_text(path, sink.error));
  };
  try {
    caffe2::serialize::PyTorchStreamWriter writer([&](const void* p, std::size_t n) { return sink(p, n); });
    // Declared after the writer, so destroyed before it: on an exception the
    // writer's destructor finishes the archive into nothing.
    struct Discard {
      FileSink& sink;
      bool armed = true;
      ~Discard() {
        if (armed) sink.discard = true;
      }
    } discard{sink};
    writer.writeRecord("data.pkl", data.data(), data.size());
    check();
    writer.writeRecord(".format_version", "1", 1);
    writer.writeRecord(".storage_alignment", "64", 2);
    writer.writeRecord("byteorder", "little", 6);
    check();
    const auto& storages = pickle.storages();
    for (std::size_t i = 0; i < storages.size(); ++i) {
      const c10::Storage& s = storages[i];
      const std::string name = fmt::format("data/{}", i);
      if (s.device().is_cpu() || s.nbytes() == 0) {
        writer.writeRecord(name, s.nbytes() ? s.data() : "", s.nbytes());
      } else {
        // One storage at a time through host memory.
        const at::Tensor whole = at::empty({0}, at::TensorOptions().dtype(at::kByte).device(s.device()))
                                     .set_(s, 0, {static_cast<std::int64_t>(s.nbytes())}, {1});
        const at::Tensor host = whole.cpu();
        writer.writeRecord(name, host.data_ptr(), s.nbytes());
      }
      check();
    }
    writer.writeEndOfFile();
    check();
    discard.armed = false;
  } catch (const c10::Error& e) {
    if (sink.error) throw Error(write_error_text(path, sink.error));
    throw Error(fmt::format("{}: cannot write: {}", path, e.what_without_backtrace()));
  }
  // A file system may report a full disk only when the data reaches it.
  if (::fsync(sink.fd) != 0) throw Error(write_error_text(path, errno));
  const int fd = sink.fd;
  sink.fd = -1;
  if (::close(fd) != 0) throw Error(write_error_text(path, errno));
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    throw Error(fmt::format("{}: cannot rename {} into place: {}", path, tmp, std::strerror(errno)));
  }
  cleanup.renamed = true;
}

}  // namespace deepcam
