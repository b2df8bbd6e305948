// Unit tests of deepcam::npy (core/data/npy.cpp) against NumPy itself: the
// test runs Python to write .npy files with numpy.lib.format.write_array in
// every format version, every supported dtype, both byte orders, C and
// Fortran order, 0-d and empty shapes, and checks that parse_header/convert
// read them as numpy.load does; then it checks that make_header is byte for
// byte numpy's header and that numpy.load reads what write() writes. The
// error cases (bad magic, truncation, unsupported dtypes, a full disk) are
// checked for a message naming the file and for nothing left behind, and the
// names of temporaries (temporary_files.hpp) are told from other files.
//
// Python is $DEEPCAM_PYTHON, else the project's .venv, else python3 on PATH;
// it must have numpy (scripts/setup.sh installs it). Without it the test
// fails: a skip would pass silently.
#include <doctest/doctest.h>

#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>
#include <iterator>
#include <limits>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "deepcam/error.hpp"
#include "deepcam/npy.hpp"
#include "temporary_files.hpp"
#include "test_support.hpp"

namespace fs = std::filesystem;
namespace npy = deepcam::npy;

using test_support::contains;
using test_support::error_of;
using test_support::read_file;
using test_support::TempDir;

namespace {

// The Python every script here starts with.
const char* const kImports = "import numpy as np\nfrom numpy.lib import format as npf\n";

void run_python(const fs::path& dir, const std::string& body) {
  test_support::run_python(dir, kImports, body);
}

// Files in `dir` whose names start with '.' (write()'s temporaries).
std::vector<std::string> hidden(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string()[0] == '.') out.push_back(e.path().filename().string());
  return out;
}

// The cases numpy writes: every dtype x byte order x C/Fortran order x
// version, over shapes that include a scalar, empty arrays and 1 to 3 axes.
// Each case also gets its values as little-endian C-order float32 (.f32)
// and, when they are whole numbers, int64 (.i64), which is what convert()
// must produce.
constexpr const char* kCases = R"(
import itertools
dtypes = ['b1', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8', 'f2', 'f4', 'f8']
shapes = [(), (0,), (7,), (3, 0, 2), (4, 5), (2, 3, 4)]
manifest = open(DIR + '/manifest.txt', 'w')
n = 0
for code, order, fortran, version, shape in itertools.product(
        dtypes, '<>', [False, True], [(1, 0), (2, 0), (3, 0)], shapes):
    size = int(np.prod(shape))
    k = np.arange(size, dtype=np.int64)
    if code == 'b1':
        v = (k % 3 == 0)
    elif code[0] == 'f':
        v = (k - 5) * 0.25
    elif code[0] == 'u':
        v = k * 37 + (2**40 if code == 'u8' else 0)
    else:
        v = (k * 37 - 50) * (2**33 if code == 'i8' else 1)
    a = np.asarray(v).astype(order + code).reshape(shape)
    if fortran:
        a = np.asfortranarray(a)
    name = 'case%d' % n
    n += 1
    with open(DIR + '/' + name + '.npy', 'wb') as f:
        npf.write_array(f, a, version=version)
    back = np.load(DIR + '/' + name + '.npy')
    assert back.dtype == a.dtype and back.shape == a.shape and np.array_equal(back, a)
    np.ascontiguousarray(a, dtype='<f4').tofile(DIR + '/' + name + '.f32')
    ints = code[0] != 'f' or bool(np.all(np.floor(v) == v))
    if ints:
        np.ascontiguousarray(a, dtype='<i8').tofile(DIR + '/' + name + '.i64')
    # numpy writes fortran_order True only for data that is not also C-contiguous.
    f_written = a.flags.f_contiguous and not a.flags.c_contiguous
    manifest.write('%s %s %s %d %d %d %d %s\n' % (name, code, order, f_written, version[0], ints,
                   a.ndim, ' '.join(map(str, a.shape))))
)";

struct Case {
  std::string name, code;
  char order = '<';
  bool fortran = false, ints = false;
  int major = 1;
  std::vector<std::int64_t> shape;
};

npy::DType dtype_of(const std::string& code) {
  static const std::pair<const char*, npy::DType> table[] = {
      {"b1", npy::DType::Bool},     {"i1", npy::DType::Int8},     {"i2", npy::DType::Int16},
      {"i4", npy::DType::Int32},    {"i8", npy::DType::Int64},    {"u1", npy::DType::UInt8},
      {"u2", npy::DType::UInt16},   {"u4", npy::DType::UInt32},   {"u8", npy::DType::UInt64},
      {"f2", npy::DType::Float16},  {"f4", npy::DType::Float32},  {"f8", npy::DType::Float64}};
  for (const auto& [c, d] : table)
    if (code == c) return d;
  FAIL("unknown code " << code);
  return npy::DType::Bool;
}

}  // namespace

TEST_CASE("files numpy writes are read as numpy.load reads them") {
  TempDir dir;
  run_python(dir.path, kCases);
  std::ifstream manifest(dir.path / "manifest.txt");
  std::string line;
  int cases = 0, fortran_cases = 0, big_cases = 0;
  std::set<int> versions;
  while (std::getline(manifest, line)) {
    std::istringstream in(line);
    Case c;
    std::string order;
    int fortran = 0, ints = 0, ndim = 0;
    in >> c.name >> c.code >> order >> fortran >> c.major >> ints >> ndim;
    c.order = order[0];
    c.fortran = fortran;
    c.ints = ints;
    c.shape.resize(ndim);
    for (auto& d : c.shape) in >> d;
    CAPTURE(line);

    const fs::path path = dir.path / (c.name + ".npy");
    const npy::Header h = npy::read_header(path.string());
    CHECK(h.major == c.major);
    CHECK(h.minor == 0);
    CHECK((h.dtype == dtype_of(c.code)));
    CHECK(h.big_endian == (c.order == '>' && c.code.size() == 2 && c.code[1] != '1'));
    CHECK(h.fortran_order == c.fortran);
    CHECK(h.shape == c.shape);
    CHECK(h.data_offset % 64 == 0);  // numpy aligns the data
    const auto bytes = read_file(path);
    CHECK(bytes.size() == h.data_offset + h.data_bytes());

    // The same header parsed from memory.
    const npy::Header again = npy::parse_header(path.string(), bytes.data(), bytes.size());
    CHECK(again.shape == h.shape);
    CHECK(again.data_offset == h.data_offset);

    const auto f32 = read_file(dir.path / (c.name + ".f32"));
    std::vector<float> as_float(static_cast<std::size_t>(h.count()));
    npy::convert(path.string(), h, bytes.data() + h.data_offset, as_float.data(), h.count());
    REQUIRE(f32.size() == as_float.size() * sizeof(float));
    // memcmp wants valid pointers even for 0 bytes (an empty vector's may be null).
    CHECK((f32.empty() || std::memcmp(f32.data(), as_float.data(), f32.size()) == 0));

    std::vector<std::int64_t> as_int(static_cast<std::size_t>(h.count()));
    if (c.ints) {
      const auto i64 = read_file(dir.path / (c.name + ".i64"));
      npy::convert(path.string(), h, bytes.data() + h.data_offset, as_int.data(), h.count());
      REQUIRE(i64.size() == as_int.size() * sizeof(std::int64_t));
      CHECK((i64.empty() || std::memcmp(i64.data(), as_int.data(), i64.size()) == 0));
    } else {
      const std::string e = error_of(
          [&] { npy::convert(path.string(), h, bytes.data() + h.data_offset, as_int.data(), h.count()); });
      CHECK(contains(e, path.string()));
      CHECK(contains(e, "not a whole number"));
    }
    ++cases;
    fortran_cases += c.fortran;
    big_cases += h.big_endian;
    versions.insert(h.major);
  }
  CHECK(cases == 12 * 2 * 2 * 3 * 6);
  CHECK(fortran_cases > 0);
  CHECK(big_cases > 0);
  CHECK(versions == std::set<int>{1, 2, 3});
}

TEST_CASE("make_header is numpy's header, and numpy.load reads what write() writes") {
  TempDir dir;
  struct Out {
    npy::DType dtype;
    std::vector<std::int64_t> shape;
    const char* code;
  };
  const std::vector<Out> outs = {
      {npy::DType::Float32, {768, 1152, 16}, "<f4"}, {npy::DType::Int32, {768, 1152}, "<i4"},
      {npy::DType::Float64, {}, "<f8"},              {npy::DType::UInt8, {0}, "|u1"},
      {npy::DType::Bool, {5}, "|b1"},                {npy::DType::Int64, {3, 0, 2}, "<i8"},
      {npy::DType::Float16, {2, 3}, "<f2"},          {npy::DType::UInt64, {12345678901LL, 0}, "<u8"},
      {npy::DType::Int16, {3, 2}, "<i2"},            {npy::DType::UInt16, {4}, "<u2"},
      {npy::DType::UInt32, {1, 1, 1, 1}, "<u4"},     {npy::DType::Int8, {2, 2}, "|i1"},
  };
  std::string script = "import json\ncases = json.load(open(DIR + '/cases.json'))\n"
                       "for name, code, shape in cases:\n"
                       "    np.save(DIR + '/np-' + name + '.npy', np.zeros(shape, dtype=code))\n"
                       "    a = np.load(DIR + '/ours-' + name + '.npy')\n"
                       "    assert a.dtype == np.dtype(code), (name, a.dtype)\n"
                       "    assert a.shape == tuple(shape), (name, a.shape)\n"
                       "    ref = np.arange(a.size).astype(code).reshape(shape)\n"
                       "    assert np.array_equal(a, ref), name\n";
  std::ostringstream json;
  json << "[";
  for (std::size_t k = 0; k < outs.size(); ++k) {
    const auto& [dtype, shape, code] = outs[k];
    const std::string name = "c" + std::to_string(k);
    std::int64_t count = 1;
    for (auto d : shape) count *= d;
    // Values 0, 1, 2, ... in the dtype, as numpy's arange(...).astype makes them.
    std::vector<unsigned char> data(static_cast<std::size_t>(count) * npy::item_size(dtype));
    for (std::int64_t i = 0; i < count; ++i) {
      unsigned char* p = data.data() + i * npy::item_size(dtype);
      switch (dtype) {
        case npy::DType::Float32: { const float v = static_cast<float>(i); std::memcpy(p, &v, 4); break; }
        case npy::DType::Float64: { const double v = static_cast<double>(i); std::memcpy(p, &v, 8); break; }
        case npy::DType::Int32: { const std::int32_t v = static_cast<std::int32_t>(i); std::memcpy(p, &v, 4); break; }
        case npy::DType::Bool: *p = i != 0; break;
        case npy::DType::Float16: {
          // i < 6 here: 0 and the powers of two and 3, 5 as half floats.
          static const std::uint16_t halves[] = {0x0000, 0x3C00, 0x4000, 0x4200, 0x4400, 0x4500};
          std::memcpy(p, &halves[i], 2);
          break;
        }
        case npy::DType::Int16: { const std::int16_t v = static_cast<std::int16_t>(i); std::memcpy(p, &v, 2); break; }
        case npy::DType::UInt16: { const std::uint16_t v = static_cast<std::uint16_t>(i); std::memcpy(p, &v, 2); break; }
        case npy::DType::UInt32: { const std::uint32_t v = static_cast<std::uint32_t>(i); std::memcpy(p, &v, 4); break; }
        case npy::DType::Int8: { const std::int8_t v = static_cast<std::int8_t>(i); std::memcpy(p, &v, 1); break; }
        default: break;  // empty arrays
      }
    }
    npy::write((dir.path / ("ours-" + name + ".npy")).string(), dtype, shape, data.data());
    json << (k ? ", " : "") << "[\"" << name << "\", \"" << code << "\", [";
    for (std::size_t d = 0; d < shape.size(); ++d) json << (d ? ", " : "") << shape[d];
    json << "]]";
  }
  json << "]";
  std::ofstream(dir.path / "cases.json") << json.str();
  CHECK(hidden(dir.path).empty());
  run_python(dir.path, script);

  for (std::size_t k = 0; k < outs.size(); ++k) {
    const auto& [dtype, shape, code] = outs[k];
    const std::string name = "c" + std::to_string(k);
    CAPTURE(name);
    const auto theirs = read_file(dir.path / ("np-" + name + ".npy"));
    const std::string ours = npy::make_header(dtype, shape);
    REQUIRE(theirs.size() >= ours.size());
    CHECK(std::string(theirs.begin(), theirs.begin() + static_cast<long>(ours.size())) == ours);
    const npy::Header h = npy::read_header((dir.path / ("np-" + name + ".npy")).string());
    CHECK(h.data_offset == ours.size());
    CHECK(h.major == 1);
  }

  // A header longer than format 1.0 can hold (65535 bytes) is written as 2.0.
  // numpy allows only 64 axes, so only a structured dtype makes it write one;
  // we check ours against our reader.
  const std::vector<std::int64_t> many(30000, 1);
  const std::string header = npy::make_header(npy::DType::Float32, many);
  const npy::Header h = npy::parse_header("many.npy", header.data(), header.size());
  CHECK(h.major == 2);
  CHECK(h.shape == many);
  CHECK(h.data_offset == header.size());
  CHECK(header.size() % 64 == 0);
}

TEST_CASE("headers written by hand: any padding, key order and quoting numpy accepts") {
  TempDir dir;
  auto file = [&](const std::string& name, int major, const std::string& dict, std::size_t data_bytes) {
    std::string out("\x93NUMPY", 6);
    out += static_cast<char>(major);
    out += '\0';
    const std::size_t length = dict.size();
    out += static_cast<char>(length & 0xFF);
    out += static_cast<char>((length >> 8) & 0xFF);
    if (major > 1) out += std::string("\0\0", 2);
    out += dict;
    out.append(data_bytes, '\0');
    const fs::path path = dir.path / name;
    std::ofstream(path, std::ios::binary) << out;
    return path.string();
  };
  // Python 2 longs, double quotes, no trailing comma, other key order, tabs.
  const std::string py2 = "{\"shape\": (2L, 3L), 'fortran_order': False,\t'descr': '<i4'}\n";
  npy::Header h = npy::read_header(file("py2.npy", 1, py2, 24));
  CHECK(h.shape == std::vector<std::int64_t>{2, 3});
  CHECK((h.dtype == npy::DType::Int32));
  CHECK(h.data_offset == 10 + py2.size());
  // '=' is the reading machine's order; no order character is allowed too.
  h = npy::read_header(file("native.npy", 2, "{'descr': '=u2', 'fortran_order': True, 'shape': (4,)}    \n", 8));
  CHECK(!h.big_endian);
  CHECK(h.fortran_order);
  CHECK(h.count() == 4);
  h = npy::read_header(file("bare.npy", 1, "{'descr': 'f8', 'fortran_order': False, 'shape': ()}\n", 8));
  CHECK(h.count() == 1);
  CHECK(h.data_bytes() == 8);

  struct Bad {
    std::string name, dict, expect;
    std::size_t data;
  };
  const std::vector<Bad> bad = {
      {"object.npy", "{'descr': '|O', 'fortran_order': False, 'shape': (3,), }\n", "Python objects", 24},
      {"complex.npy", "{'descr': '<c8', 'fortran_order': False, 'shape': (3,), }\n", "dtype '<c8' is not supported", 24},
      {"string.npy", "{'descr': '<U5', 'fortran_order': False, 'shape': (3,), }\n", "dtype '<U5' is not supported", 60},
      {"struct.npy", "{'descr': [('a', '<f4'), ('b', '<i4')], 'fortran_order': False, 'shape': (3,), }\n",
       "structured array", 24},
      {"nokey.npy", "{'descr': '<f4', 'shape': (3,), }\n", "'fortran_order' is missing", 12},
      {"extra.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'x': True}\n", "unexpected key 'x'", 12},
      {"notuple.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (3), }\n", "without a comma", 12},
      {"negative.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (-3,), }\n", "negative dimension", 12},
      {"notdict.npy", "[1, 2]\n", "must be a Python dict", 0},
      {"garbage.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), } x\n", "after the closing", 12},
      {"huge.npy", "{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296), }\n",
       "too large", 0},
      {"short.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (768, 1152, 16), }\n",
       "header promises 56623104 bytes", 1000},
  };
  for (const Bad& b : bad) {
    CAPTURE(b.name);
    const std::string path = file(b.name, 1, b.dict, b.data);
    const std::string e = error_of([&] { npy::read_header(path); });
    CHECK(contains(e, path));
    CHECK(contains(e, b.expect));
  }

  // Damage before the dict: magic, version, a header length past the end.
  const std::string path = (dir.path / "damaged.npy").string();
  auto write_raw = [&](const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; };
  write_raw("NUMPY\x01\x00");
  CHECK(contains(error_of([&] { npy::read_header(path); }), "not a .npy file"));
  write_raw(std::string("\x93NUMPY\x04\x00\x10\x00", 10) + std::string(16, ' '));
  CHECK(contains(error_of([&] { npy::read_header(path); }), "version 4.0 is not supported"));
  write_raw(std::string("\x93NUMPY\x01\x00\x00\x01", 10) + "{'descr'");
  CHECK(contains(error_of([&] { npy::read_header(path); }), "the header is 256 bytes long, but only 8 follow"));
  write_raw(std::string("\x93NUMPY\x02\x00\x10", 9));
  CHECK(contains(error_of([&] { npy::read_header(path); }), "ends inside the header length"));
  write_raw("");
  CHECK(contains(error_of([&] { npy::read_header(path); }), "not a .npy file"));
  CHECK(contains(error_of([&] { npy::read_header((dir.path / "missing.npy").string()); }), "no such file"));
  CHECK(contains(error_of([&] { npy::read_header(dir.path.string()); }), "is a directory"));
}

TEST_CASE("convert: float16, byte order, Fortran order and int64 range") {
  npy::Header h;
  h.dtype = npy::DType::Float16;
  h.shape = {6};
  // 1, -2, 65504 (largest half), smallest subnormal, +Inf, NaN
  const std::uint16_t halves[] = {0x3C00, 0xC000, 0x7BFF, 0x0001, 0x7C00, 0x7E00};
  float f[6];
  npy::convert("h.npy", h, halves, f, 6);
  CHECK(f[0] == 1.0f);
  CHECK(f[1] == -2.0f);
  CHECK(f[2] == 65504.0f);
  CHECK(f[3] == std::ldexp(1.0f, -24));
  CHECK(std::isinf(f[4]));
  CHECK(std::isnan(f[5]));
  std::int64_t i[6];
  CHECK(contains(error_of([&] { npy::convert("h.npy", h, halves, i, 6); }), "h.npy: element (3,) is 5.96"));

  h.dtype = npy::DType::UInt64;
  h.shape = {2};
  const std::uint64_t big[] = {7, 1ull << 63};
  CHECK(contains(error_of([&] { npy::convert("u.npy", h, big, i, 2); }), "u.npy: element (1,) is 9223372036854775808"));
  npy::convert("u.npy", h, big, i, 1);  // a prefix of a C-order array is fine
  CHECK(i[0] == 7);

  // Big-endian int32 (2, 3) in Fortran order: storage is column by column.
  h.dtype = npy::DType::Int32;
  h.big_endian = true;
  h.fortran_order = true;
  h.shape = {2, 3};
  const unsigned char be[] = {0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 1, 2, 0, 0, 0, 5};
  npy::convert("f.npy", h, be, i, 6);
  CHECK(std::vector<std::int64_t>(i, i + 6) == std::vector<std::int64_t>{0, 1, 258, 3, 4, 5});
  CHECK(contains(error_of([&] { npy::convert("f.npy", h, be, i, 3); }), "only be converted whole"));
}

TEST_CASE("write: a failed write leaves neither the file nor a temporary") {
  TempDir dir;
  const std::vector<float> data(100000, 1.5f);
  const fs::path target = dir.path / "data-x.npy";

  // A file-size limit stands in for a full disk: with SIGXFSZ ignored,
  // write() fails with EFBIG as it fails with ENOSPC on a full disk.
  rlimit old{};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
  struct sigaction ignore {}, previous {};
  ignore.sa_handler = SIG_IGN;
  REQUIRE(::sigaction(SIGXFSZ, &ignore, &previous) == 0);
  rlimit small = old;
  small.rlim_cur = 65536;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
  const std::string e = error_of([&] {
    npy::write(target.string(), npy::DType::Float32, {100000}, data.data());
  });
  ::setrlimit(RLIMIT_FSIZE, &old);
  ::sigaction(SIGXFSZ, &previous, nullptr);
  CHECK(contains(e, target.string()));
  CHECK(contains(e, "cannot write"));
  CHECK(!fs::exists(target));
  CHECK(hidden(dir.path).empty());

  // Into a folder that does not exist.
  const std::string missing = (dir.path / "nope" / "a.npy").string();
  CHECK(contains(error_of([&] { npy::write(missing, npy::DType::Float32, {1}, data.data()); }), missing));

  // And the same write with room succeeds and replaces an older file.
  std::ofstream(target) << "old";
  npy::write(target.string(), npy::DType::Float32, {100000}, data.data());
  const npy::Header h = npy::read_header(target.string());
  CHECK(fs::file_size(target) == h.data_offset + 400000);
  CHECK(hidden(dir.path).empty());
}

TEST_CASE("temporary names: each writer's form is known with its pid, other names are not") {
  namespace tf = deepcam::temporary_files;
  CHECK(tf::writer("checkpoint-epoch3.pt.tmp-4242") == 4242L);
  CHECK(tf::writer("mlperf.log.partial-17") == 17L);
  CHECK(tf::writer(".data-x.npy.tmp99-3") == 99L);
  CHECK(tf::writer(".stats.h5.tmp123") == 123L);  // the form of earlier versions
  for (const char* other : {"data-x.npy", "stats.h5", ".hidden", "x.tmp-", "x.tmp-12a", ".x.tmp", ".x.tmpfoo",
                            "x.tmp12", ".x.tmp1-", "x.partial", "checkpoint.pt.tmp-1234567890"}) {
    CHECK_MESSAGE(!tf::writer(other), other);
  }

  // hidden_name: beside the target, hidden, not a sample's name, new at each call, and this process's.
  TempDir dir;
  const fs::path target = dir.path / "data-x.npy";
  const fs::path a = tf::hidden_name(target), b = tf::hidden_name(target);
  CHECK(a != b);
  CHECK(a.parent_path() == dir.path);
  CHECK(a.filename().string().rfind(".data-x.npy.tmp", 0) == 0);
  CHECK(a.extension() != ".npy");
  CHECK(tf::writer(a.filename().string()) == long(::getpid()));
  CHECK(tf::hidden_name("stats.h5").parent_path() == ".");

  // stale: only those whose process is gone, never this process's, nothing below the folder.
  pid_t gone = ::fork();
  if (gone == 0) ::_exit(0);
  REQUIRE(gone > 0);
  ::waitpid(gone, nullptr, 0);
  const fs::path dead = dir.path / fmt::format(".data-y.npy.tmp{}-0", gone);
  const fs::path mine = dir.path / fmt::format("checkpoint.pt.tmp-{}", ::getpid());
  fs::create_directory(dir.path / "sub");
  fs::create_directory(dir.path / fmt::format(".pkg.tmp{}-0", gone));  // a package's folder stays
  for (const fs::path& p : {dead, mine, dir.path / "sub" / dead.filename(), dir.path / "data-z.npy"}) {
    std::ofstream(p) << "x";
  }
  const std::vector<tf::Stale> found = tf::stale(dir.path);
  REQUIRE(found.size() == 1);
  CHECK(found[0].path == dead);
  CHECK(found[0].writer == long(gone));
  CHECK(found[0].target == "data-y.npy");
  const fs::path visible = dir.path / fmt::format("mlperf.log.partial-{}", gone);
  std::ofstream(visible) << "x";
  fs::remove(dead);
  const std::vector<tf::Stale> partial = tf::stale(dir.path);
  REQUIRE(partial.size() == 1);
  CHECK(partial[0].target == "mlperf.log");
  CHECK(tf::alive(::getpid()));
  CHECK(!tf::alive(gone));
}
