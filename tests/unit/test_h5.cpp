// Unit tests of deepcam::h5's reads (core/data/h5.cpp) against h5py: the test
// runs Python to write HDF5 files with h5py (contiguous float32 and float64
// in both byte orders, integer types of every size, chunked and gzip
// datasets, float16, a dataset never written, a file with a user block) and
// to read every dataset back through HDF5's own conversion
// (Dataset.astype), and checks that File::read and File::read_stored give
// the same bytes, whether the dataset is read outside HDF5 (pread) or
// through H5Dread, also from several threads at once. A file truncated
// before it is opened, and one truncated while open, must fail with a
// message naming the file and the dataset.
//
// Python is $DEEPCAM_PYTHON, else the project's .venv, else python3 on PATH;
// it must have numpy and h5py (scripts/setup.sh installs them). Without them
// the test fails: a skip would pass silently.
#include <doctest/doctest.h>

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "deepcam/error.hpp"
#include "deepcam/h5.hpp"
#include "test_support.hpp"

namespace fs = std::filesystem;
namespace h5 = deepcam::h5;

using test_support::contains;
using test_support::error_of;
using test_support::read_file;
using test_support::TempDir;

namespace {

// The Python every script here starts with.
const char* const kImports = "import numpy as np, h5py\n";

void run_python(const fs::path& dir, const std::string& body) {
  test_support::run_python(dir, kImports, body);
}

// Writes DIR/samples.h5 and, for each dataset and each target type h5py
// converts it to, DIR/expect/<name>.<f4|f8|i8|stored>.bin: what h5py reads,
// in this machine's byte order. DIR/direct.txt lists the datasets expected
// to be read outside HDF5, DIR/names.txt all of them.
const char* kWriteSamples = R"PY(
import os
np.seterr(over="ignore")  # float16 and uint64 overflow on purpose
rng = np.random.default_rng(7)
a = rng.standard_normal((37, 53, 5)).astype(np.float32) * 1000
# Values where a wrong conversion shows: NaN with a payload, infinities,
# signed zero, subnormals, the largest float32.
a[0, 0, :] = [np.nan, np.inf, -np.inf, -0.0, 1e-42]
a[0, 1, 0] = np.float32(3.4028235e38)
a.view(np.uint32)[1, 0, 0] = 0x7fc12345
labels = rng.integers(-3, 4, (37, 53))
datasets = {
    "le32": dict(data=a.astype("<f4")),
    "be32": dict(data=a.astype(">f4")),
    "le64": dict(data=a.astype("<f8") * 1.1),
    "be64": dict(data=a.astype(">f8") * 1.1),
    "labels_i32": dict(data=labels.astype("<i4")),
    "labels_i32be": dict(data=labels.astype(">i4")),
    "i8": dict(data=labels.astype("i1")),
    "u8": dict(data=(labels + 3).astype("u1")),
    "i16be": dict(data=(labels * 1000).astype(">i2")),
    "u16": dict(data=(labels + 3).astype("<u2") * 20000),
    "u32": dict(data=(labels + 3).astype("<u4") * 1000000000),
    "i64": dict(data=labels.astype("<i8") * 3000000000),
    "i64be": dict(data=labels.astype(">i8") * 3000000000),
    "u64": dict(data=(labels + 3).astype("<u8") * 6000000000000000000),
    "gzip": dict(data=a, chunks=(8, 8, 5), compression="gzip"),
    "chunked": dict(data=labels.astype("<i4"), chunks=(10, 10)),
    "shuffled": dict(data=a.astype(">f4"), chunks=(37, 53, 1), shuffle=True, compression="gzip"),
    "half": dict(data=a.astype("<f2")),
    "group/nested": dict(data=a[:3].astype("<f4")),
}
direct = ["le32", "be32", "le64", "be64", "labels_i32", "labels_i32be", "i8", "u8", "i16be", "u16", "u32",
          "i64", "i64be", "u64", "group/nested"]
with h5py.File(os.path.join(DIR, "samples.h5"), "w") as f:
    for name, kwargs in datasets.items():
        f.create_dataset(name, **kwargs)
    # h5py reads storage never written as the fill value (zeros).
    f.create_dataset("unwritten", shape=(6, 7), dtype="<f4")
    f.create_dataset("part", shape=(6, 7), dtype="<f4", chunks=(2, 7))[:2] = 1
os.makedirs(os.path.join(DIR, "expect"))
with h5py.File(os.path.join(DIR, "samples.h5"), "r") as f:
    for name in datasets:
        d = f[name]
        if name in direct:
            assert d.id.get_offset() is not None, name
        out = os.path.join(DIR, "expect", name.replace("/", "_"))
        d[...].astype(d.dtype.newbyteorder("=")).tofile(out + ".stored.bin")
        for t in ("f4", "f8", "i8"):
            # h5py bundles its own HDF5 (another version than the system's)
            # and the two disagree on what NaN or infinity becomes as an
            # integer and on float16's specials: conversions both sides leave
            # to H5Dread, which this test does not judge.
            if name == "half" or (t == "i8" and d.dtype.kind == "f"):
                continue
            # astype reads through HDF5's conversion, as H5Dread does.
            d.astype("=" + t)[...].tofile(out + "." + t + ".bin")
open(os.path.join(DIR, "names.txt"), "w").write("\n".join(datasets))
open(os.path.join(DIR, "direct.txt"), "w").write("\n".join(direct))

with h5py.File(os.path.join(DIR, "userblock.h5"), "w", userblock_size=1024) as f:
    f.create_dataset("x", data=a.astype(">f4"))
a.astype("=f4").tofile(os.path.join(DIR, "expect", "userblock.f4.bin"))

with h5py.File(os.path.join(DIR, "big.h5"), "w") as f:
    f.create_dataset("climate/data", data=np.arange(200000, dtype="<f4"))
    offset = f["climate/data"].id.get_offset()
open(os.path.join(DIR, "big_offset.txt"), "w").write(str(offset))
)PY";

std::vector<std::string> lines(const fs::path& path) {
  std::ifstream in(path);
  std::vector<std::string> out;
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) out.push_back(line);
  return out;
}

std::string file_name(const std::string& dataset) {
  std::string out = dataset;
  for (char& c : out)
    if (c == '/') c = '_';
  return out;
}

template <typename T>
std::vector<unsigned char> read_as(const h5::File& file, const std::string& name) {
  std::uint64_t count = 1;
  for (auto d : file.shape(name)) count *= d;
  std::vector<T> values(count);
  file.read(name, values.data(), values.size());
  const auto* bytes = reinterpret_cast<const unsigned char*>(values.data());
  return std::vector<unsigned char>(bytes, bytes + values.size() * sizeof(T));
}

std::vector<unsigned char> read_stored(const h5::File& file, const std::string& name) {
  std::uint64_t count = 1;
  for (auto d : file.shape(name)) count *= d;
  std::vector<unsigned char> out(count * file.stored_type(name).size);
  file.read_stored(name, out.data(), out.size());
  return out;
}

}  // namespace

TEST_CASE("reads equal h5py's bit for bit, read outside HDF5 or through it") {
  TempDir dir;
  run_python(dir.path, kWriteSamples);
  const std::vector<std::string> names = lines(dir.path / "names.txt");
  const std::vector<std::string> direct = lines(dir.path / "direct.txt");
  REQUIRE(names.size() == 19);
  h5::File file = h5::File::open((dir.path / "samples.h5").string());

  for (const std::string& name : names) {
    CAPTURE(name);
    const bool expect_direct = std::find(direct.begin(), direct.end(), name) != direct.end();
    CHECK(file.reads_directly(name) == expect_direct);
    const fs::path expect = dir.path / "expect" / file_name(name);
    CHECK(read_stored(file, name) == read_file(expect.string() + ".stored.bin"));
    const bool is_float = file.stored_type(name).kind == h5::StoredType::Kind::Float;
    if (name != "half") {
      CHECK(read_as<float>(file, name) == read_file(expect.string() + ".f4.bin"));
      CHECK(read_as<double>(file, name) == read_file(expect.string() + ".f8.bin"));
    }
    if (!is_float) CHECK(read_as<std::int64_t>(file, name) == read_file(expect.string() + ".i8.bin"));
    // Mapped: the stored bytes without a copy, where they are one plain run
    // in this machine's byte order; otherwise nothing (read them instead).
    const std::vector<unsigned char> stored = read_stored(file, name);
    const h5::MappedBytes mapped = file.map_stored(name, stored.size());
    const bool host_order = file.stored_type(name).size == 1 || !file.stored_type(name).big_endian;
    CHECK(static_cast<bool>(mapped) == (expect_direct && host_order));
    if (mapped) {
      const auto* bytes = static_cast<const unsigned char*>(mapped.data());
      CHECK(std::vector<unsigned char>(bytes, bytes + stored.size()) == stored);
    }
  }

  SUBCASE("a dataset never written, wholly or in part, is refused: HDF5 would give zeros") {
    std::vector<unsigned char> bytes(6 * 7 * 4);
    const std::string where = (dir.path / "samples.h5").string() + ": dataset ";
    CHECK(error_of([&] { file.read_stored("unwritten", bytes.data(), bytes.size()); }) ==
          where + "unwritten: holds no data: it was created but never written (its writer stopped before writing "
                  "it?); write the file again");
    CHECK(error_of([&] { read_as<float>(file, "unwritten"); }).rfind(where + "unwritten: holds no data:", 0) == 0);
    CHECK(error_of([&] { read_as<float>(file, "part"); }) ==
          where + "part: is only partly written: 2 of its 3 chunks were never written (its writer stopped part "
                  "way?); write the file again");
    CHECK_FALSE(file.map_stored("unwritten", bytes.size()));
  }

  SUBCASE("a file with a user block: the offset counts it") {
    h5::File ub = h5::File::open((dir.path / "userblock.h5").string());
    CHECK(ub.reads_directly("x"));
    CHECK(read_as<float>(ub, "x") == read_file(dir.path / "expect" / "userblock.f4.bin"));
  }

  SUBCASE("several threads reading at once get the same values") {
    std::vector<std::vector<unsigned char>> got(4);
    std::vector<std::string> errors(4);
    {
      std::vector<std::thread> threads;
      for (std::size_t t = 0; t < got.size(); ++t) {
        threads.emplace_back([&, t] {
          try {
            // Each thread its own file object, as the reader's workers do,
            // and one shared one.
            h5::File own = h5::File::open((dir.path / "samples.h5").string());
            for (int i = 0; i < 20; ++i) {
              got[t] = read_as<float>(t % 2 ? own : file, "be32");
              const auto labels = read_as<std::int64_t>(own, "labels_i32");
              if (labels != read_file(dir.path / "expect" / "labels_i32.i8.bin")) errors[t] = "labels differ";
            }
          } catch (const std::exception& e) {
            errors[t] = e.what();
          }
        });
      }
      for (auto& t : threads) t.join();
    }
    const auto expect = read_file(dir.path / "expect" / "be32.f4.bin");
    for (std::size_t t = 0; t < got.size(); ++t) {
      CHECK(errors[t] == "");
      CHECK(got[t] == expect);
    }
  }

  SUBCASE("a created file is read through HDF5, values unchanged") {
    const fs::path path = dir.path / "written.h5";
    const std::vector<float> values{1.5f, -2.0f, 3.25f, 0.0f};
    {
      h5::File out = h5::File::create(path.string());
      out.write("v", values.data(), {2, 2});
      CHECK_FALSE(out.reads_directly("v"));
      std::vector<float> back(4);
      out.read("v", back.data(), back.size());
      CHECK(back == values);
      out.close();
    }
    h5::File in = h5::File::open(path.string());
    CHECK(in.reads_directly("v"));
    std::vector<double> back(4);
    in.read("v", back.data(), back.size());
    CHECK(back == std::vector<double>{1.5, -2.0, 3.25, 0.0});
  }

  SUBCASE("wrong element counts are still refused") {
    std::vector<float> small(10);
    const std::string message = error_of([&] { file.read("le32", small.data(), small.size()); });
    CHECK(contains(message, "samples.h5"));
    CHECK(contains(message, "le32"));
    CHECK(contains(message, "expected 10 elements"));
  }
}

TEST_CASE("truncated files are refused naming the file and the dataset, without a crash") {
  TempDir dir;
  run_python(dir.path, kWriteSamples);
  const fs::path big = dir.path / "big.h5";
  const std::uint64_t offset = std::stoull(lines(dir.path / "big_offset.txt").at(0));
  REQUIRE(offset > 0);
  const std::uint64_t end = offset + 200000 * 4;
  REQUIRE(fs::file_size(big) >= end);

  SUBCASE("truncated while open: the read outside HDF5 sees the end") {
    h5::File file = h5::File::open(big.string());
    REQUIRE(file.reads_directly("climate/data"));
    fs::resize_file(big, offset + 1000);
    std::vector<float> values(200000);
    std::string message = error_of([&] { file.read("climate/data", values.data(), values.size()); });
    CHECK(contains(message, big.string()));
    CHECK(contains(message, "climate/data"));
    CHECK(contains(message, "truncated"));
    CHECK(contains(message, std::to_string(end)));
    std::vector<double> wide(200000);
    message = error_of([&] { file.read("climate/data", wide.data(), wide.size()); });
    CHECK(contains(message, "climate/data"));
    CHECK(contains(message, "truncated"));
    message = error_of([&] { file.read_stored("climate/data", values.data(), values.size() * 4); });
    CHECK(contains(message, "climate/data"));
    CHECK(contains(message, "truncated"));
    // Refused before mapping: touching a page past the end would be SIGBUS.
    message = error_of([&] { file.map_stored("climate/data", values.size() * 4); });
    CHECK(contains(message, big.string()));
    CHECK(contains(message, "climate/data"));
    CHECK(contains(message, "truncated"));
  }

  SUBCASE("truncated before it is opened") {
    fs::resize_file(big, offset + 1000);
    const std::string message = error_of([&] {
      h5::File file = h5::File::open(big.string());
      std::vector<float> values(200000);
      file.read("climate/data", values.data(), values.size());
    });
    CHECK(contains(message, big.string()));
    CHECK(contains(message, "truncated"));
  }
}
