// FileReader's selected-but-unnormalised sample read (read_sample_selected,
// shift, scale) over the real file readers, the hdf5 and npy plugins, loaded
// from the build tree as the host loads them: the selected sample is the
// file's values, and normalising it with at:: ops (what the prefetch reader
// runs on the GPU) gives read_sample()'s data bit for bit. Also core's
// select_channels() against a plain loop.
#include <ATen/core/Tensor.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sub.h>
#undef CHECK
#include <doctest/doctest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "deepcam/config.hpp"
#include "deepcam/data_set.hpp"
#include "deepcam/error.hpp"
#include "deepcam/file_reader.hpp"
#include "deepcam/h5.hpp"
#include "deepcam/normalise.hpp"
#include "deepcam/npy.hpp"
#include "deepcam/plugin_loader.hpp"
#include "deepcam/sharding.hpp"
#include "test_paths.hpp"

namespace fs = std::filesystem;
using namespace deepcam;

namespace {

const fs::path kBuild = test_support::build_dir();
constexpr std::int64_t kHeight = 32, kWidth = 48, kChannels = 16;

// The values of an .h5 sample's climate/data, (H, W, C).
std::vector<float> h5_data(const std::string& path) {
  const h5::File file = h5::File::open(path);
  std::vector<float> data(kHeight * kWidth * kChannels);
  file.read("climate/data", data.data(), data.size());
  return data;
}

// deepcam-data synth's HDF5 samples with the numpy layout beside them
// (data-X.npy, label-X.npy next to data-X.h5, SPEC 1.5): one root for both
// readers, each listing only its own files.
std::string data_root() {
  static const std::string root = [] {
    const fs::path dir = fs::temp_directory_path() / ("deepcam_test_file_reader_" + std::to_string(::getpid()));
    const std::string cmd = (kBuild / "core" / "deepcam-data").string() + " synth --out " + dir.string() +
                            " --train 4 --validation 3 --height 32 --width 48 --seed 5 > /dev/null 2>&1";
    REQUIRE(std::system(cmd.c_str()) == 0);
    for (const char* split : {"train", "validation"}) {
      std::vector<fs::path> samples;
      for (const auto& e : fs::directory_iterator(dir / split))
        if (e.path().extension() == ".h5") samples.push_back(e.path());
      for (const fs::path& sample : samples) {
        const std::vector<float> data = h5_data(sample.string());
        std::vector<std::int64_t> labels(kHeight * kWidth);
        h5::File::open(sample.string()).read("climate/labels_0", labels.data(), labels.size());
        const std::string x = sample.stem().string().substr(5);  // data-X.h5 -> X
        npy::write((dir / split / ("data-" + x + ".npy")).string(), npy::DType::Float32,
                   {kHeight, kWidth, kChannels}, data.data());
        npy::write((dir / split / ("label-" + x + ".npy")).string(), npy::DType::Int64,
                   {kHeight, kWidth}, labels.data());
      }
    }
    return dir.string();
  }();
  return root;
}

PluginLoader& loader() {
  static PluginLoader instance({(kBuild / "plugins").string()}, "/nonexistent");
  return instance;
}

// A reader plugin built from a TOML table, as the host builds it.
struct Built {
  Plugged<Reader> reader;
  const FileReader* file_reader = nullptr;
};

Built build(const std::string& name, const std::string& toml, const std::string& root,
            const std::vector<std::int64_t>& channels) {
  const fs::path file = fs::temp_directory_path() /
                        ("deepcam_test_file_reader_" + std::to_string(::getpid()) + ".toml");
  std::ofstream(file) << toml;
  const LoadedPlugin& plugin = loader().load(PluginKind::Reader, name);
  const Params params = check_table_file(file.string(), "reader", plugin.descriptor->params, &loader());
  fs::remove(file);
  ReaderContext context{root, channels, 2, 2, 0, 1, 1, nullptr};
  Built out;
  out.reader.object = plugin.descriptor->make_reader(params, context);
  out.reader.library = plugin.library;
  // Across the plugin's library (loaded RTLD_LOCAL) and core: FileReader's
  // type information lives in core only, so the cast works, as the prefetch
  // reader needs it to.
  out.file_reader = dynamic_cast<const FileReader*>(out.reader.object.get());
  return out;
}

at::Tensor floats(std::vector<float>& v, at::IntArrayRef sizes) {
  return at::from_blob(v.data(), sizes, at::kFloat);
}

// Bit for bit, also for -0.0 and NaN: the float tensors compared as int32.
bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && at::equal(a.contiguous().view(at::kInt), b.contiguous().view(at::kInt));
}

// read_sample() against read_sample_selected() + at:: normalisation, and the
// selected values against the .h5 file's own, for every sample of both
// splits.
void check_reader(const Built& built, const std::vector<std::int64_t>& channels) {
  REQUIRE(built.file_reader != nullptr);
  const FileReader& reader = *built.file_reader;
  const auto c = static_cast<std::int64_t>(channels.size());
  REQUIRE(reader.shift().size() == channels.size());
  REQUIRE(reader.scale().size() == channels.size());
  std::vector<float> shift = reader.shift(), scale = reader.scale();
  const at::Tensor shift_t = floats(shift, {c}), scale_t = floats(scale, {c});
  for (const Split split : {Split::Train, Split::Validation}) {
    REQUIRE(reader.sample_count(split) > 0);
    for (std::int64_t i = 0; i < reader.sample_count(split); ++i) {
      const std::vector<std::string> files = reader.sample_files(split, i);
      INFO(files.front());
      std::vector<float> normalised(c * kHeight * kWidth), selected(c * kHeight * kWidth, -1.0f);
      std::vector<std::int64_t> labels(kHeight * kWidth), selected_labels(kHeight * kWidth, -1);
      reader.read_sample(files, normalised.data(), labels.data());
      reader.read_sample_selected(files, selected.data(), selected_labels.data());
      CHECK(labels == selected_labels);

      // Not normalised: the file's values of the selected channels, (H, W, C).
      const fs::path h5 = fs::path(files.front()).replace_extension(".h5");
      const std::vector<float> raw = h5_data(h5.string());
      bool as_stored = true;
      for (std::int64_t p = 0; p < kHeight * kWidth; ++p)
        for (std::int64_t k = 0; k < c; ++k)
          as_stored = as_stored && selected[p * c + k] == raw[p * kChannels + channels[k]];
      CHECK(as_stored);

      // What the prefetch reader computes on the GPU: two separate ops.
      const at::Tensor x = floats(selected, {kHeight, kWidth, c});
      const at::Tensor gpu_way = at::mul(at::sub(x, shift_t), scale_t).permute({2, 0, 1}).contiguous();
      CHECK(same_bits(gpu_way, floats(normalised, {c, kHeight, kWidth})));
    }
  }
}

const std::vector<std::vector<std::int64_t>> kSelections = {
    {0, 7, 15},                                                  // the generic test's
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},      // all, in order (vector path)
    {12, 4, 5, 6, 7, 1},                                         // a run of 4 and others
};

}  // namespace

TEST_CASE("hdf5 reader: the selected sample, normalised with at:: ops, is read_sample() bit for bit") {
  for (const auto& channels : kSelections) {
    INFO(channels.size());
    check_reader(build("hdf5", "[reader]\nname = \"hdf5\"\nthreads = 2\n", data_root(), channels), channels);
  }
}

TEST_CASE("npy reader: the selected sample, normalised with at:: ops, is read_sample() bit for bit") {
  for (const char* io : {"mmap", "direct", "pread"}) {
    INFO(io);
    for (const auto& channels : kSelections) {
      INFO(channels.size());
      const std::string toml = std::string("[reader]\nname = \"npy\"\nio = \"") + io + "\"\n";
      check_reader(build("npy", toml, data_root(), channels), channels);
    }
  }
}

namespace {

// The threads of this process, as the kernel lists them.
std::size_t thread_count() {
  std::size_t n = 0;
  for (const auto& e : fs::directory_iterator("/proc/self/task")) n += e.is_directory() ? 1 : 0;
  return n;
}

}  // namespace

TEST_CASE("a file reader starts its worker threads at its first batch: read by single samples, it starts none") {
  // Behind the prefetch reader, which reads single samples on threads of its
  // own, the source's pool of `threads` workers sat idle for the whole run.
  const std::vector<std::int64_t> channels = {0, 7, 15};
  const std::size_t before = thread_count();
  const Built built = build("hdf5", "[reader]\nname = \"hdf5\"\nthreads = 3\n", data_root(), channels);
  REQUIRE(built.file_reader != nullptr);
  std::vector<float> data(channels.size() * kHeight * kWidth);
  std::vector<std::int64_t> labels(kHeight * kWidth);
  built.file_reader->read_sample(built.file_reader->sample_files(Split::Train, 0), data.data(), labels.data());
  CHECK(thread_count() == before);
  built.reader.object->start_epoch(Split::Train, 0);
  Batch batch;
  REQUIRE(built.reader.object->next(batch));
  CHECK(thread_count() == before + 3);
  REQUIRE(built.reader.object->next(batch));  // the same pool
  CHECK(thread_count() == before + 3);
}

namespace {

// The npy layout with a load() that fails as `fault` says, as a format of a
// plugin's own might: an ATen op, a deepcam::Error naming no file (a
// problem of the data), or a std::runtime_error (a fault of its code).
enum class Fault { AtenOp, DataError, CodeFault };

class FailingOpFormat final : public FileFormat {
 public:
  explicit FailingOpFormat(Fault fault = Fault::AtenOp) : fault_(fault) {}
  std::vector<std::vector<std::string>> list_split(const std::string& dir, const char*) const override {
    NpySplit listed = list_npy_split(dir);
    return {std::move(listed.data), std::move(listed.labels)};
  }
  std::unique_ptr<TrainingSharding> make_sharding(const std::string&, const ShardingSetup& setup) const override {
    return std::make_unique<TrainingSharding>(setup);
  }
  SampleShape read_shape(const std::string& path) const override {
    const npy::Header header = npy::read_header(path);
    return {header.shape[0], header.shape[1], header.shape[2]};
  }
  std::unique_ptr<Scratch> make_scratch() const override { return std::make_unique<Scratch>(); }
  void load(const FileReader&, const std::vector<std::string>&, float*, std::int64_t*, Scratch&) const override {
    if (fault_ == Fault::DataError) throw Error("deliberate data problem");
    if (fault_ == Fault::CodeFault) throw std::runtime_error("deliberate fault of the format's code");
    (void)at::ones({2}).view({3});
  }

 private:
  Fault fault_;
};

}  // namespace

TEST_CASE("a format's failing ATen op is reported with the sample's file, without LibTorch's C++ backtrace") {
  ReaderContext context{data_root(), {0, 7, 15}, 2, 2, 0, 1, 1, nullptr};
  FileReader reader(context, {"test reader", 2, "a test sample is two .npy files", "", true, 1, false},
                    std::make_unique<FailingOpFormat>());
  const std::vector<std::string> files = reader.sample_files(Split::Train, 0);
  std::vector<float> data(3 * kHeight * kWidth);
  std::vector<std::int64_t> labels(kHeight * kWidth);
  for (const bool batch : {false, true}) {
    INFO(batch);
    std::string message;
    try {
      if (batch) {
        reader.start_epoch(Split::Train, 0);
        Batch b;
        reader.next(b);
      } else {
        reader.read_sample(files, data.data(), labels.data());
      }
    } catch (const Error& e) {
      message = e.what();
    }
    CHECK(message.find("/train/data-") != std::string::npos);
    CHECK(message.find("shape '[3]' is invalid for input of size 2") != std::string::npos);
    CHECK(message.find("Exception raised from") == std::string::npos);
    CHECK(message.find("frame #") == std::string::npos);
  }
}

TEST_CASE("a format's deepcam::Error gets the sample's file; any other exception passes on as it is") {
  // A std::runtime_error of a plugin's format was made a deepcam::Error about
  // the data file: a bug in the plugin reported as bad data (status 2),
  // naming no plugin.
  ReaderContext context{data_root(), {0, 7, 15}, 2, 2, 0, 1, 1, nullptr};
  for (const Fault fault : {Fault::DataError, Fault::CodeFault}) {
    FileReader reader(context, {"test reader", 2, "a test sample is two .npy files", "", true, 1, false},
                      std::make_unique<FailingOpFormat>(fault));
    const std::vector<std::string> files = reader.sample_files(Split::Train, 0);
    std::vector<float> data(3 * kHeight * kWidth);
    std::vector<std::int64_t> labels(kHeight * kWidth);
    for (const bool batch : {false, true}) {
      INFO(batch);
      const auto read = [&] {
        if (batch) {
          reader.start_epoch(Split::Train, 0);
          Batch b;
          reader.next(b);
        } else {
          reader.read_sample(files, data.data(), labels.data());
        }
      };
      if (fault == Fault::DataError) {
        // The sample's file in front (in an epoch, the first of its order).
        std::string message;
        try {
          read();
        } catch (const Error& e) {
          message = e.what();
        }
        CHECK(message.rfind(data_root() + "/train/data-", 0) == 0);
        CHECK(message.find(".npy: deliberate data problem") != std::string::npos);
        if (!batch) CHECK(message == files[0] + ": deliberate data problem");
      } else {
        try {
          read();
          FAIL("no exception");
        } catch (const Error& e) {
          FAIL("made a deepcam::Error: " << e.what());
        } catch (const std::runtime_error& e) {
          CHECK(std::string(e.what()) == "deliberate fault of the format's code");
        }
      }
    }
  }
}

TEST_CASE("a Format that contradicts its format's listing is refused as a bug in the plugin") {
  // files_per_sample 1 for the npy layout's two columns trained on (the
  // first column alone), and behind prefetch every sample was refused with
  // "read_sample() got 2 files; a test sample is two .npy files".
  ReaderContext context{data_root(), {0, 7, 15}, 2, 2, 0, 1, 1, nullptr};
  const auto build = [&](std::size_t files_per_sample, int threads) {
    FileReader reader(context, {"test reader", files_per_sample, "a test sample is two .npy files", "", true, threads,
                                false},
                      std::make_unique<FailingOpFormat>());
  };
  CHECK_THROWS_WITH_AS(build(1, 1),
                       "test reader: its format's list_split() gave 2 column(s) for the train split, but its Format "
                       "says 1 file(s) per sample (a bug in the plugin)",
                       std::logic_error);
  CHECK_THROWS_WITH_AS(build(0, 1),
                       "test reader: its Format says 0 files per sample; a sample is one file or more (a bug in the "
                       "plugin)",
                       std::logic_error);
  CHECK_THROWS_WITH_AS(build(2, 0), "test reader: its Format says 0 worker threads; at least 1 (a bug in the plugin)",
                       std::logic_error);
  CHECK_NOTHROW(build(2, 1));
}

TEST_CASE("the selected read refuses NaN and overflow with read_sample()'s message") {
  // A copy of the data set whose first training sample (npy) holds `value`
  // at (1, 2, 7), channel 7 being the second selected.
  const fs::path root = fs::path(data_root() + "_bad");
  fs::remove_all(root);
  fs::copy(data_root(), root, fs::copy_options::recursive);
  // Channel 7's range narrowed to 1e-3 in stats.h5 (scale about 1000), so
  // that the largest finite floats overflow once normalised.
  {
    std::vector<double> minval(kChannels), maxval(kChannels);
    {
      const h5::File stats = h5::File::open((root / "stats.h5").string());
      stats.read("climate/minval", minval.data(), minval.size());
      stats.read("climate/maxval", maxval.data(), maxval.size());
    }
    maxval[7] = minval[7] + 1e-3;
    fs::remove(root / "stats.h5");
    h5::File stats = h5::File::create((root / "stats.h5").string());
    stats.write("climate/minval", minval.data(), {kChannels});
    stats.write("climate/maxval", maxval.data(), {kChannels});
  }
  const std::vector<std::int64_t> channels{0, 7, 15};
  const std::string first =
      build("npy", "[reader]\nname = \"npy\"\n", root.string(), channels).file_reader->sample_files(Split::Train, 0).front();
  const std::string first_h5 = fs::path(first).replace_extension(".h5").string();
  const float huge = std::numeric_limits<float>::max();
  for (const float value : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity(),
                            huge, -huge}) {
    INFO(value);
    std::vector<float> data = h5_data(first_h5);
    data[(1 * kWidth + 2) * kChannels + 7] = value;
    npy::write(first, npy::DType::Float32, {kHeight, kWidth, kChannels},
               data.data());
    const Built built = build("npy", "[reader]\nname = \"npy\"\n", root.string(), channels);
    REQUIRE(built.file_reader != nullptr);
    const FileReader& reader = *built.file_reader;
    const std::vector<std::string> files = reader.sample_files(Split::Train, 0);
    REQUIRE(files.front() == first);
    std::vector<float> out(3 * kHeight * kWidth);
    std::vector<std::int64_t> labels(kHeight * kWidth);
    std::string plain, selected;
    try {
      reader.read_sample(files, out.data(), labels.data());
    } catch (const Error& e) {
      plain = e.what();
    }
    try {
      reader.read_sample_selected(files, out.data(), labels.data());
    } catch (const Error& e) {
      selected = e.what();
    }
    REQUIRE(reader.scale()[1] > 100.0f);
    CHECK(plain.find(files.front() + ": data at (1, 2, 7) holds ") == 0);
    // A finite value is named with what it normalises to.
    CHECK((plain.find("which normalises to") != std::string::npos) == std::isfinite(value));
    CHECK(selected == plain);
    // The mode ends with the call, also after an error: read_sample()
    // normalises again.
    std::vector<float> again(3 * kHeight * kWidth);
    const std::vector<std::string> good = reader.sample_files(Split::Train, 1);
    reader.read_sample(good, again.data(), labels.data());
    std::vector<float> sel(3 * kHeight * kWidth);
    reader.read_sample_selected(good, sel.data(), labels.data());
    CHECK(again[0] == (sel[0] - reader.shift()[0]) * reader.scale()[0]);
  }
  // check_finite = false reads the NaN through, selected as stored.
  std::vector<float> data = h5_data(first_h5);
  data[(1 * kWidth + 2) * kChannels + 7] = std::numeric_limits<float>::quiet_NaN();
  npy::write(first, npy::DType::Float32, {kHeight, kWidth, kChannels},
             data.data());
  const Built lax = build("npy", "[reader]\nname = \"npy\"\ncheck_finite = false\n", root.string(), channels);
  std::vector<float> out(3 * kHeight * kWidth);
  std::vector<std::int64_t> labels(kHeight * kWidth);
  lax.file_reader->read_sample_selected(lax.file_reader->sample_files(Split::Train, 0), out.data(), labels.data());
  CHECK(std::isnan(out[(1 * kWidth + 2) * 3 + 1]));
  fs::remove_all(root);
}

TEST_CASE("select_channels copies the selection in pixel order and flags what would not normalise") {
  const std::int64_t pixels = 5, file_channels = 6;
  std::vector<float> raw(pixels * file_channels);
  for (std::size_t i = 0; i < raw.size(); ++i) raw[i] = static_cast<float>(i) * 0.5f - 3.0f;
  for (const std::vector<std::int64_t>& channels :
       {std::vector<std::int64_t>{5, 0, 2}, std::vector<std::int64_t>{1}, std::vector<std::int64_t>{0, 1, 2, 3, 4, 5}}) {
    const auto c = static_cast<std::int64_t>(channels.size());
    const std::vector<float> shift(channels.size(), -1.0f), scale(channels.size(), 0.25f);
    std::vector<float> out(pixels * c);
    CHECK(select_channels(raw.data(), pixels, file_channels, channels, shift, scale, out.data()));
    for (std::int64_t p = 0; p < pixels; ++p)
      for (std::int64_t k = 0; k < c; ++k) CHECK(out[p * c + k] == raw[p * file_channels + channels[k]]);
    // Finite input that overflows once normalised is flagged.
    const std::vector<float> big(channels.size(), 1e38f);
    CHECK_FALSE(select_channels(raw.data(), pixels, file_channels, channels, shift, big, out.data()));
  }
  raw[7] = std::numeric_limits<float>::infinity();  // pixel 1, channel 1
  const std::vector<float> shift(2, 0.0f), scale(2, 1.0f);
  std::vector<float> out(pixels * 2);
  CHECK_FALSE(select_channels(raw.data(), pixels, file_channels, {1, 3}, shift, scale, out.data()));
  CHECK(select_channels(raw.data(), pixels, file_channels, {0, 3}, shift, scale, out.data()));
}

// Every path of the kernels (AVX-512 16 x 16, AVX2 8 x 8, SSE2 4 x 4 and the
// scalar runs; streaming stores on aligned output, plain stores otherwise)
// against the plain formula, bit for bit, in both layouts, for selections
// that mix runs of consecutive channels with single ones, on aligned and
// misaligned output and pixel counts that are and are not multiples of 16.
TEST_CASE("normalise_sample and normalise_sample_hwc equal scale * (x - shift) bit for bit on every path") {
  const std::int64_t file_channels = 20;
  for (const std::int64_t pixels : {std::int64_t{16 * 37}, std::int64_t{8 * 3}, std::int64_t{4 * 5}, std::int64_t{13}}) {
    std::vector<float> raw(static_cast<std::size_t>(pixels * file_channels));
    std::uint32_t state = 12345;
    for (float& x : raw) {
      state = state * 1664525u + 1013904223u;
      x = static_cast<float>(static_cast<std::int32_t>(state >> 8) % 100000) * 1.37e-3f - 40.0f;
    }
    for (const std::vector<std::int64_t>& channels :
         {std::vector<std::int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
          std::vector<std::int64_t>{4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 0, 1, 2, 3, 19},
          std::vector<std::int64_t>{3, 4, 5, 6, 7, 8, 9, 10, 2, 11, 12, 13, 14, 1},
          std::vector<std::int64_t>{7, 0, 19}}) {
      const auto c = static_cast<std::int64_t>(channels.size());
      std::vector<float> shift, scale;
      for (std::int64_t k = 0; k < c; ++k) {
        shift.push_back(-33.3f + 0.71f * static_cast<float>(k));
        scale.push_back(1.0f / (97.0f + 3.3f * static_cast<float>(k)));
      }
      // The output at offset 0 (64-byte aligned) and 1 (4), with at least 16 floats of slack before
      // it and 48 after it.
      std::vector<float> storage(static_cast<std::size_t>(pixels * c + 64 + 16));
      float* base = storage.data() + 16 + (16 - reinterpret_cast<std::uintptr_t>(storage.data()) / 4 % 16) % 16;
      // Nothing outside [out, out + pixels * c) is written, on any path (streaming stores of whole
      // vectors included): the slack around the output keeps a value no result has.
      constexpr float kUntouched = -7.0e30f;
      const auto slack_kept = [&](const float* out) {
        bool kept = true;
        for (const float* q = storage.data(); q != storage.data() + storage.size(); ++q)
          if (q < out || q >= out + pixels * c) kept = kept && *q == kUntouched;
        return kept;
      };
      for (const std::int64_t offset : {std::int64_t{0}, std::int64_t{1}}) {
        float* out = base + offset;
        INFO("pixels " << pixels << ", " << c << " channels, offset " << offset);
        std::fill(storage.begin(), storage.end(), kUntouched);
        CHECK(normalise_sample(raw.data(), pixels, file_channels, channels, shift, scale, out));
        CHECK(slack_kept(out));
        bool same = true;
        for (std::int64_t k = 0; k < c; ++k)
          for (std::int64_t p = 0; p < pixels; ++p) {
            const float want = scale[k] * (raw[p * file_channels + channels[k]] - shift[k]);
            same = same && std::memcmp(&want, out + k * pixels + p, sizeof want) == 0;
          }
        CHECK(same);
        std::fill(storage.begin(), storage.end(), kUntouched);
        CHECK(normalise_sample_hwc(raw.data(), pixels, file_channels, channels, shift, scale, out));
        CHECK(slack_kept(out));
        same = true;
        for (std::int64_t p = 0; p < pixels; ++p)
          for (std::int64_t k = 0; k < c; ++k) {
            const float want = scale[k] * (raw[p * file_channels + channels[k]] - shift[k]);
            same = same && std::memcmp(&want, out + p * c + k, sizeof want) == 0;
          }
        CHECK(same);
      }
      // A NaN anywhere is flagged by both, on every path.
      std::vector<float> bad = raw;
      bad[static_cast<std::size_t>((pixels - 1) * file_channels + channels.back())] = std::nanf("");
      CHECK_FALSE(normalise_sample(bad.data(), pixels, file_channels, channels, shift, scale, base));
      CHECK_FALSE(normalise_sample_hwc(bad.data(), pixels, file_channels, channels, shift, scale, base));
    }
  }
}

TEST_CASE("decode_labels converts every stored type and finds the first value that is not a class id") {
  const std::vector<std::int32_t> ints{0, 1, 2, 2, 1, 0};
  std::vector<std::int64_t> out(ints.size(), -9);
  CHECK(decode_labels(ints.data(), LabelType::Int32, 6, out.data()).bad == -1);
  CHECK(out == std::vector<std::int64_t>{0, 1, 2, 2, 1, 0});
  const std::vector<std::int8_t> negative{0, 1, -1, 5};
  LabelCheck check = decode_labels(negative.data(), LabelType::Int8, 4, out.data());
  CHECK(check.bad == 2);
  CHECK(check.value == -1.0);
  const std::vector<std::uint64_t> huge{2, 0, 1, 18446744073709551615ull};
  check = decode_labels(huge.data(), LabelType::UInt64, 4, out.data());
  CHECK(check.bad == 3);
  const std::vector<float> floats{0.0f, -0.0f, 2.0f, 1.0f, 0.5f, 3.0f};
  check = decode_labels(floats.data(), LabelType::Float32, 6, out.data());
  CHECK(check.bad == 4);
  CHECK(check.value == 0.5);
  CHECK(out[2] == 2);
  CHECK(out[3] == 1);
  const std::vector<double> nan{1.0, std::nan("")};
  CHECK(decode_labels(nan.data(), LabelType::Float64, 2, out.data()).bad == 1);
  // float16: 0, -0, 1, 2 and 2.5 (0x4100).
  const std::vector<std::uint16_t> halves{0x0000, 0x8000, 0x3c00, 0x4000, 0x4100};
  check = decode_labels(halves.data(), LabelType::Float16, 5, out.data());
  CHECK(check.bad == 4);
  CHECK(check.value == 2.5);
  CHECK(std::vector<std::int64_t>(out.begin(), out.begin() + 4) == std::vector<std::int64_t>{0, 0, 1, 2});
  // In place, as the readers check labels another conversion produced.
  std::vector<std::int64_t> in_place{0, 2, 7, 1};
  check = decode_labels(in_place.data(), LabelType::Int64, 4, in_place.data());
  CHECK(check.bad == 2);
  CHECK(check.value == 7.0);
}

TEST_CASE("a shape message names the file that fixed the shape, or says that file itself changed since") {
  // The first training file, replaced during a run, was "expected (64, 64, 16) as in" itself.
  ReaderContext context{data_root(), {0, 7, 15}, 2, 2, 0, 1, 1, nullptr};
  FileReader reader(context, {"test reader", 2, "a test sample is two .npy files", "", true, 1, false},
                    std::make_unique<FailingOpFormat>());
  const std::string& source = reader.shape_source();
  CHECK(reader.shape_reference(source) == "as this file was when the run started: it changed since");
  CHECK(reader.shape_reference(source + ".other") == "as in " + source);
}
