// A small fuzz run of the parsers, built with ASan and UBSan
// (tests/sanitize/meson.build): inputs generated from valid ones by seeded
// mutations, the same on every run, so that a finding is reproducible.
//   - npy headers: numpy's own headers for many dtypes and shapes, mutated
//     byte by byte, cut short, with digits and punctuation spliced in; every
//     header that parses is also converted (zero-element arrays included);
//   - torch.save checkpoints written by save_torch: the pickle mutated and
//     cut, the storage records cut short;
//   - run files: a complete run file with lines dropped, doubled and cut,
//     values replaced by other TOML values, bytes spliced in, and --set
//     overrides of every shape, through load_config and check_table_file.
// Each input must give a value or a deepcam::Error naming the file; any other
// exception fails the case, and the sanitizers stop the run on any memory
// error or undefined behaviour.
#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <caffe2/serialize/inline_container.h>

#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "deepcam/config.hpp"
#include "deepcam/error.hpp"
#include "deepcam/npy.hpp"
#include "deepcam/params.hpp"
#include "deepcam/plugin_loader.hpp"
#include "deepcam/torch_pickle.hpp"
#include "test_support.hpp"
#include "torch_archive.hpp"

namespace fs = std::filesystem;
using deepcam::Error;

namespace {

// Inputs per kind: enough to reach every branch of the parsers many times
// while the run stays within a few seconds under the sanitizers.
constexpr int kNpyCases = 40000;
constexpr int kCheckpointCases = 1500;
constexpr int kRunFileCases = 3000;

using Rng = std::mt19937_64;

std::size_t below(Rng& rng, std::size_t n) { return n ? static_cast<std::size_t>(rng() % n) : 0; }

// Pieces that make a parser take its rarer branches.
const std::vector<std::string> kSplices = {
    "(", ")", ",", ", ", "'", "\"", ":", "{", "}", "[", "]", "L", "0", "-1", "99999999999999999999",
    "9223372036854775807", "18446744073709551616", "True", "False", "None", "<f4", ">f8", "|b1", "<U8",
    "'descr'", "'shape'", "'fortran_order'", "\\", "\n", std::string(1, '\0'), "\xff\xfe", "\x93NUMPY",
    " = ", "[[", "]]", "nan", "inf", "-inf", "1e999", "0x7fffffffffffffff", "1979-05-27T07:32:00Z",
    "\"\"\"", "'''", "#", "=", ".", "run.", "{a = 1}", "[1, [2]]", "\xc3\x28"};

std::string mutate(Rng& rng, std::string s, int rounds) {
  for (int r = 0; r < rounds; ++r) {
    const std::size_t at = below(rng, s.size() + 1);
    switch (below(rng, 6)) {
      case 0:  // flip a byte
        if (!s.empty()) s[below(rng, s.size())] ^= static_cast<char>(1u << below(rng, 8));
        break;
      case 1:  // set a byte
        if (!s.empty()) s[below(rng, s.size())] = static_cast<char>(rng());
        break;
      case 2:  // splice in a piece
        s.insert(at, kSplices[below(rng, kSplices.size())]);
        break;
      case 3:  // drop a run
        s.erase(at, below(rng, 8) + 1);
        break;
      case 4:  // cut short
        s.resize(at);
        break;
      default: {  // copy a run elsewhere
        if (s.empty()) break;
        const std::size_t from = below(rng, s.size());
        s.insert(at, s.substr(from, below(rng, 16) + 1));
      }
    }
  }
  return s;
}

template <typename F>
void expect_value_or_error(const std::string& input_name, F&& parse) {
  try {
    parse();
  } catch (const Error&) {
  } catch (const std::exception& e) {
    FAIL_CHECK(input_name << ": an exception other than deepcam::Error: " << e.what());
  }
}

}  // namespace

TEST_CASE("mutated npy headers give a header or an Error, and parsed ones convert") {
  using deepcam::npy::DType;
  std::vector<std::string> bases;
  const DType dtypes[] = {DType::Bool,   DType::Int8,    DType::Int16,   DType::Int32,
                          DType::Int64,  DType::UInt8,   DType::UInt16,  DType::UInt32,
                          DType::UInt64, DType::Float16, DType::Float32, DType::Float64};
  const std::vector<std::vector<std::int64_t>> shapes = {{}, {0}, {3}, {2, 3}, {4, 0, 2}, {2, 3, 4}, {1, 1, 1, 1}};
  for (const DType d : dtypes)
    for (const auto& shape : shapes) bases.push_back(deepcam::npy::make_header(d, shape));
  // Written by hand: other key orders, big-endian, Fortran order, version 3.
  auto handmade = [](int major, const std::string& dict) {
    const std::size_t prefix = major == 1 ? 10 : 12;
    const std::string text = dict + std::string(64 - (prefix + dict.size() + 1) % 64, ' ') + "\n";
    std::string out = "\x93NUMPY";
    out += static_cast<char>(major);
    out += '\0';
    for (std::size_t b = 0; b < prefix - 8; ++b) out += static_cast<char>((text.size() >> (8 * b)) & 0xff);
    return out + text;
  };
  bases.push_back(handmade(1, "{'descr': '>f8', 'fortran_order': True, 'shape': (2, 3), }"));
  bases.push_back(handmade(3, "{'shape': (3,), 'descr': '<u2', 'fortran_order': False}"));
  bases.push_back(handmade(2, "{\"descr\":\"<i8\",\"fortran_order\":False,\"shape\":(0, 2,)}"));
  Rng rng(20261201);
  int parsed = 0;
  std::vector<unsigned char> bytes;
  for (int i = 0; i < kNpyCases; ++i) {
    const std::string header = i < static_cast<int>(bases.size())
                                   ? bases[static_cast<std::size_t>(i)]
                                   : mutate(rng, bases[below(rng, bases.size())], 1 + static_cast<int>(below(rng, 4)));
    const std::string name = "fuzz-" + std::to_string(i) + ".npy";
    expect_value_or_error(name, [&] {
      const deepcam::npy::Header h = deepcam::npy::parse_header(name, header.data(), header.size());
      ++parsed;
      if (h.data_bytes() > (std::size_t(1) << 16)) return;
      // Fresh buffers of exactly the data's size: a zero-element array's
      // are empty, with null data(), as a caller's would be.
      std::vector<unsigned char> data(h.data_bytes());
      for (auto& b : data) b = static_cast<unsigned char>(rng());
      std::vector<float> floats(static_cast<std::size_t>(h.count()));
      std::vector<std::int64_t> ints(static_cast<std::size_t>(h.count()));
      expect_value_or_error(name, [&] { deepcam::npy::convert(name, h, data.data(), floats.data(), h.count()); });
      expect_value_or_error(name, [&] { deepcam::npy::convert(name, h, data.data(), ints.data(), h.count()); });
    });
  }
  CHECK(parsed > static_cast<int>(bases.size()));

  // Some of them as files, through read_header and back through write.
  test_support::TempDir dir;
  int written = 0;
  for (int i = 0; i < 400; ++i) {
    std::string file = mutate(rng, bases[below(rng, bases.size())], static_cast<int>(below(rng, 3)));
    // Half of them end where the data their header describes ends (read_header
    // refuses a byte more or less); the others have 0 to 63 bytes after it.
    std::size_t data_size = below(rng, 64);
    if (below(rng, 2) == 0) {
      try {
        const deepcam::npy::Header h = deepcam::npy::parse_header("", file.data(), file.size());
        const std::size_t end = h.data_offset + h.data_bytes();
        if (h.data_bytes() <= (std::size_t(1) << 16) && end >= file.size()) data_size = end - file.size();
      } catch (const Error&) {
      }
    }
    file += std::string(data_size, '\x01');
    const std::string path = (dir.path / ("f" + std::to_string(i) + ".npy")).string();
    std::ofstream(path, std::ios::binary) << file;
    expect_value_or_error(path, [&] {
      const deepcam::npy::Header h = deepcam::npy::read_header(path);
      if (h.data_bytes() > (std::size_t(1) << 16) || h.big_endian || h.fortran_order) return;
      bytes.assign(h.data_bytes(), 7);
      deepcam::npy::write(path, h.dtype, h.shape, bytes.data());
      CHECK(deepcam::npy::read_header(path).shape == h.shape);
      ++written;
    });
  }
  // Enough of them get through to the write round trip.
  CHECK(written > 40);
}

TEST_CASE("mutated torch.save checkpoints give a value or an Error naming the file") {
  test_support::TempDir dir;
  const std::string base = (dir.path / "base.pt").string();
  {
    c10::impl::GenericDict model(c10::StringType::get(), c10::TensorType::get());
    model.insert("conv.weight", at::arange(24, at::kFloat).reshape({2, 3, 2, 2}));
    model.insert("bn.num_batches_tracked", at::scalar_tensor(7, at::kLong));
    model.insert("view", at::arange(10, at::kDouble).slice(0, 2, 8, 2));
    model.insert("empty", at::empty({0, 3}, at::kHalf));
    c10::impl::GenericDict top(c10::StringType::get(), c10::AnyType::get());
    top.insert("step", int64_t{12});
    top.insert("epoch", int64_t{3});
    top.insert("lr", 0.001);
    top.insert("name", std::string("deeplabv3plus"));
    top.insert("model", model);
    c10::impl::GenericList betas(c10::FloatType::get());
    betas.push_back(0.9);
    betas.push_back(0.999);
    top.insert("betas", betas);
    top.insert("none", c10::IValue());
    deepcam::save_torch(base, top);
  }
  REQUIRE(deepcam::load_torch_save(base).isGenericDict());

  caffe2::serialize::PyTorchStreamReader reader(base);
  std::vector<std::pair<std::string, std::string>> records;
  std::string pickle;
  for (const auto& name : reader.getAllRecords()) {
    auto [data, n] = reader.getRecord(name);
    std::string bytes(static_cast<const char*>(data.get()), n);
    if (name == "data.pkl") pickle = bytes;
    else if (name.rfind("data/", 0) == 0) records.emplace_back(name, bytes);
  }
  REQUIRE(pickle.size() > 100);
  REQUIRE(!records.empty());

  Rng rng(1201);
  const std::string path = (dir.path / "fuzz.pt").string();
  int loaded = 0;
  for (int i = 0; i < kCheckpointCases; ++i) {
    std::string bad = pickle;
    auto stored = records;
    if (i % 5 == 4) {  // a storage record cut short or grown
      auto& r = stored[below(rng, stored.size())].second;
      r.resize(below(rng, r.size() + 16));
    } else {
      bad = mutate(rng, pickle, 1 + static_cast<int>(below(rng, 3)));
    }
    test_support::write_torch_archive(path, bad, stored);
    try {
      deepcam::load_torch_save(path);
      ++loaded;
    } catch (const Error& e) {
      CHECK_MESSAGE(std::string(e.what()).rfind(path + ": ", 0) == 0, e.what());
    } catch (const std::exception& e) {
      FAIL_CHECK("case " << i << ": an exception other than deepcam::Error: " << e.what());
    }
  }
  MESSAGE(loaded << " of " << kCheckpointCases << " mutated checkpoints still loaded");
}

namespace {

const char* const kRunFile = R"([run]
seed = 5
output_dir = "out"
max_epochs = 2
target_iou = 0.82
logging_frequency = 2
train_batch_size = 2
validation_batch_size = 2
gradient_accumulation_frequency = 1
device = "cpu"
threads = 2
checkpoint_every = 1

[data]
root = "data"
channels = [0, 1, 2, 3]

[reader]
name = "hdf5"
threads = 2

[model]
name = "deeplabv3plus"
width = 0.0625

[optimizer]
name = "adam"
lr = 0.002
betas = [0.9, 0.999]

[scheduler]
name = "multistep"
milestones = [100]

[mlperf]
org = "fuzz"
platform = "cpu"
division = "open"
status = "research"
)";

// Every parameter type and kind of bound, for check_table_file.
const deepcam::ParamSpec kSpecs[] = {
    {"count", deepcam::ParamType::Int, "3", "an integer in [1, 10]", 1.0, 10.0},
    {"rate", deepcam::ParamType::Float, "0.5", "a number in (0, 1)", 0.0, 1.0, nullptr, true, true},
    {"flag", deepcam::ParamType::Bool, "false", "a boolean"},
    {"mode", deepcam::ParamType::String, "\"a\"", "a choice", 1.0, 0.0, "a|b|c"},
    {"sizes", deepcam::ParamType::IntList, "[1, 2]", "integers >= 0", 0.0, deepcam::kUnbounded},
    {"weights", deepcam::ParamType::FloatList, "[0.5]", "numbers", -deepcam::kUnbounded, deepcam::kUnbounded},
    {"names", deepcam::ParamType::StringList, "[\"x\"]", "strings"},
    {"where", deepcam::ParamType::Path, "\".\"", "a path"},
};
const char* const kTable = R"([t]
count = 4
rate = 0.25
flag = true
mode = "b"
sizes = [3, 4, 5]
weights = [1.5, -2.0]
names = ["p", "q"]
where = "sub/dir"
)";

}  // namespace

TEST_CASE("mutated run files and overrides give a config or an Error") {
  test_support::TempDir dir;
  // A data root, as load_config wants one (train/ or validation/ in it).
  fs::create_directories(dir.path / "data" / "train");
  fs::create_directories(dir.path / "data" / "validation");
  const std::string file = (dir.path / "run.toml").string();
  const std::string table_file = (dir.path / "table.toml").string();
  // No plugin can be found: a run file gets as far as its first plugin
  // table, after [run], [data] and [mlperf] are checked.
  deepcam::PluginLoader loader({}, (dir.path / "no-plugins").string());
  const deepcam::ParamSchema schema{kSpecs, sizeof kSpecs / sizeof kSpecs[0]};

  Rng rng(7);
  const std::vector<std::string> keys = {"run.seed", "run.max_epochs", "run.target_iou", "run.device",
                                         "run.threads", "data.channels", "data.root", "mlperf.division",
                                         "optimizer.lr", "reader.source.io", "run", "", ".", "run..seed",
                                         "nosuch.key", "run.output_dir"};
  for (int i = 0; i < kRunFileCases; ++i) {
    const bool table = i % 3 == 2;
    std::string text = mutate(rng, table ? kTable : kRunFile, 1 + static_cast<int>(below(rng, 4)));
    std::ofstream(table ? table_file : file, std::ios::binary | std::ios::trunc) << text;
    if (table) {
      expect_value_or_error(table_file, [&] { deepcam::check_table_file(table_file, "t", schema); });
      continue;
    }
    std::vector<std::string> overrides;
    for (std::size_t k = below(rng, 3); k > 0; --k)
      overrides.push_back(keys[below(rng, keys.size())] + "=" + kSplices[below(rng, kSplices.size())]);
    expect_value_or_error(file, [&] { deepcam::load_config(file, overrides, loader); });
  }
}
