// Unit tests of the npy reader on files NumPy writes (make_npy_cases.py, run
// with the project's venv Python): every case must give the batches the
// hdf5 reader gives on the same values, in both io modes; bad files are
// refused naming the file, as is a file that shrinks under its mapping
// (mapping_guard.hpp), which must not end the process with a SIGBUS.
#include <ATen/core/Tensor.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/from_blob.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../hdf5/hdf5_reader.hpp"
#include "deepcam/error.hpp"
#include "deepcam/sharding.hpp"
#include "deepcam/mapping_guard.hpp"
#include "npy_reader.hpp"
#include "test_paths.hpp"

#undef CHECK
#undef CHECK_EQ
// Last: c10's logging header defines its own CHECK, which must not win.
#include <doctest/doctest.h>

namespace fs = std::filesystem;
using deepcam::Batch;
using deepcam::Error;
using deepcam::Reader;
using deepcam::ReaderContext;
using deepcam::ShuffleMode;
using deepcam::Split;
using deepcam::readers::Hdf5Reader;
using deepcam::readers::Hdf5ReaderOptions;
using deepcam::readers::NpyIo;
using deepcam::readers::NpyReader;
using deepcam::readers::NpyReaderOptions;

namespace {

const char* const kCases[] = {"f32", "f16_u8", "f64be_i8be", "f32be_fortran_f4", "v2_i2",
                              "v3_f8_u2"};
constexpr int kHeight = 16, kWidth = 24;

// Not std::filesystem::remove_all: libtorch.so (2.11.0 wheel) exports its
// own copy of it, which crashes when it is bound ahead of libstdc++'s.
void remove_tree(const fs::path& path) {
  nftw(
      path.c_str(),
      [](const char* file, const struct stat*, int, struct FTW*) { return ::remove(file); }, 16,
      FTW_DEPTH | FTW_PHYS);
}

void run(const std::string& command) {
  INFO(command);
  REQUIRE(std::system(command.c_str()) == 0);
}

struct TempDir {
  fs::path path;
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "deepcam_npy_XXXXXX").string();
    REQUIRE(mkdtemp(pattern.data()) != nullptr);
    path = pattern;
  }
  ~TempDir() { remove_tree(path); }
};

// The cases, made once per test run: a synthetic HDF5 set turned into every
// .npy variant by NumPy.
const fs::path& cases() {
  static TempDir dir;
  static const bool made = [] {
    run("'" + (test_support::build_dir() / "core/deepcam-data").string() + "' synth --out '" +
        (dir.path / "src").string() + "' --train 6 --validation 5 --height " +
        std::to_string(kHeight) + " --width " + std::to_string(kWidth) +
        " --seed 3 > /dev/null 2>&1");
    run("'" + test_support::python() + "' '" +
        (test_support::source_dir() / "plugins/readers/npy/make_npy_cases.py").string() + "' '" +
        (dir.path / "src").string() + "' '" +
        (dir.path / "out").string() + "'");
    return true;
  }();
  (void)made;
  static const fs::path out = dir.path / "out";
  return out;
}

// A writable copy of one case's npy set, to break.
fs::path copy_case(const TempDir& into, const std::string& name) {
  run("cp -r '" + (cases() / name / "npy").string() + "' '" + (into.path / name).string() + "'");
  return into.path / name;
}

ReaderContext context(const fs::path& root, std::vector<std::int64_t> channels = {0, 7, 15, 3},
                      int rank = 0, int world_size = 1, std::int64_t batch_size = 2) {
  ReaderContext c;
  c.data_root = root.string();
  c.channels = std::move(channels);
  c.train_batch_size = batch_size;
  c.validation_batch_size = batch_size;
  c.rank = rank;
  c.world_size = world_size;
  c.seed = 5;
  c.log = nullptr;
  return c;
}

constexpr NpyIo kIos[] = {NpyIo::Mmap, NpyIo::Direct, NpyIo::Pread};

std::string io_name(NpyIo io) {
  return io == NpyIo::Mmap ? "mmap" : io == NpyIo::Direct ? "direct" : "pread";
}

NpyReaderOptions npy_options(NpyIo io, int threads = 2) {
  NpyReaderOptions o;
  o.threads = threads;
  o.io = io;
  return o;
}

Hdf5ReaderOptions hdf5_options() {
  Hdf5ReaderOptions o;
  o.threads = 1;
  return o;
}

std::vector<Batch> read_all(Reader& reader, Split split, std::int64_t epoch) {
  reader.start_epoch(split, epoch);
  std::vector<Batch> batches;
  Batch batch;
  while (reader.next(batch)) batches.push_back(batch);
  return batches;
}

bool same(const std::vector<Batch>& a, const std::vector<Batch>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!at::equal(a[i].data, b[i].data) || !at::equal(a[i].labels, b[i].labels)) return false;
  }
  return true;
}

std::string stem(const std::string& path) { return fs::path(path).stem().string(); }

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no deepcam::Error thrown)";
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

std::string validation_file(const fs::path& root, const std::string& prefix, int index) {
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(root / "validation"))
    if (e.path().filename().string().rfind(prefix, 0) == 0) files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  return files.at(static_cast<std::size_t>(index));
}

}  // namespace

TEST_CASE("every dtype, byte order, memory order and version NumPy writes reads as HDF5 does") {
  for (const char* name : kCases) {
    const fs::path npy_root = cases() / name / "npy";
    Hdf5Reader expected(context(cases() / name / "h5"), hdf5_options());
    for (const NpyIo io : kIos) {
      INFO("case " << std::string(name) << ", io " << io_name(io));
      NpyReader reader(context(npy_root), npy_options(io, 3));
      CHECK(reader.global_samples(Split::Train) == 6);
      CHECK(reader.global_samples(Split::Validation) == 5);
      CHECK((reader.sample_shape() == std::vector<std::int64_t>{4, kHeight, kWidth}));
      for (const std::int64_t epoch : {0, 1}) {
        const auto got = read_all(reader, Split::Train, epoch);
        const auto want = read_all(expected, Split::Train, epoch);
        REQUIRE(got.size() == 3);
        CHECK(same(got, want));
        std::vector<std::string> a, b;
        for (const auto& f : reader.epoch_files()) a.push_back(stem(f));
        for (const auto& f : expected.epoch_files()) b.push_back(stem(f));
        CHECK(a == b);
      }
      const auto got = read_all(reader, Split::Validation, 0);
      CHECK(got.size() == 3);  // 2 + 2 + 1
      CHECK(same(got, read_all(expected, Split::Validation, 0)));
      CHECK((got.back().data.sizes() == at::IntArrayRef{1, 4, kHeight, kWidth}));
      CHECK((got.back().labels.scalar_type() == at::kLong));
    }
  }
}

TEST_CASE("the io modes and thread counts give identical batches") {
  const fs::path root = cases() / "f32" / "npy";
  NpyReader mmap(context(root), npy_options(NpyIo::Mmap, 1));
  NpyReader direct(context(root), npy_options(NpyIo::Direct, 4));
  NpyReader pread(context(root), npy_options(NpyIo::Pread, 3));
  for (const std::int64_t epoch : {0, 3}) {
    const auto a = read_all(mmap, Split::Train, epoch);
    CHECK(!a.empty());
    CHECK(same(a, read_all(direct, Split::Train, epoch)));
    CHECK(same(a, read_all(pread, Split::Train, epoch)));
  }
  const auto validation = read_all(mmap, Split::Validation, 0);
  CHECK(same(validation, read_all(direct, Split::Validation, 0)));
  CHECK(same(validation, read_all(pread, Split::Validation, 0)));
}

TEST_CASE("next() refills the last batch's buffers only when nobody else holds them") {
  const fs::path root = cases() / "f32" / "npy";
  for (const NpyIo io : kIos) {
    NpyReader reader(context(root), npy_options(io, 2));
    const auto kept = read_all(reader, Split::Train, 1);  // each batch kept: fresh buffers
    REQUIRE(kept.size() == 3);
    CHECK(kept[0].data.data_ptr() != kept[1].data.data_ptr());
    reader.start_epoch(Split::Train, 1);
    Batch batch;
    std::set<const void*> buffers;
    for (std::size_t i = 0; reader.next(batch); ++i) {
      REQUIRE(i < kept.size());
      CHECK(at::equal(batch.data, kept[i].data));
      CHECK(at::equal(batch.labels, kept[i].labels));
      buffers.insert(batch.labels.data_ptr());
    }
    CHECK(buffers.size() == 1);  // only `batch` held them
    reader.start_epoch(Split::Train, 1);
    REQUIRE(reader.next(batch));
    const at::Tensor copy = batch.data;
    REQUIRE(reader.next(batch));
    CHECK(at::equal(copy, kept[0].data));
    CHECK(at::equal(batch.data, kept[1].data));
  }
}

TEST_CASE("single samples by index, also from copies of the files elsewhere") {
  TempDir copy;
  const fs::path root = cases() / "f64be_i8be" / "npy";
  for (const NpyIo io : kIos) {
    NpyReader reader(context(root, {0, 7, 15, 3}, 0, 1, 1), npy_options(io));
    CHECK(reader.sample_count(Split::Train) == 6);
    CHECK(reader.sample_count(Split::Validation) == 5);
    const auto batches = read_all(reader, Split::Validation, 0);
    REQUIRE(batches.size() == 5);
    for (std::int64_t i = 0; i < 5; ++i) {
      const auto files = reader.sample_files(Split::Validation, i);
      REQUIRE(files.size() == 2);
      CHECK(files[0] == validation_file(root, "data-", static_cast<int>(i)));
      CHECK(files[1] == validation_file(root, "label-", static_cast<int>(i)));
      std::vector<std::string> copies;
      for (const auto& f : files) {
        const fs::path to = copy.path / fs::path(f).filename();
        fs::copy_file(f, to, fs::copy_options::overwrite_existing);
        copies.push_back(to.string());
      }
      std::vector<float> data(4 * kHeight * kWidth);
      std::vector<std::int64_t> labels(kHeight * kWidth);
      reader.read_sample(copies, data.data(), labels.data());
      CHECK(at::equal(at::from_blob(data.data(), {1, 4, kHeight, kWidth}), batches[i].data));
      CHECK(at::equal(at::from_blob(labels.data(), {1, kHeight, kWidth}, at::kLong),
                      batches[i].labels));
    }
    CHECK(contains(error_of([&] { reader.sample_files(Split::Train, 6); }), "has 6 samples"));
    CHECK(contains(error_of([&] { reader.read_sample({"x"}, nullptr, nullptr); }),
                   "data-X.npy and label-X.npy"));
  }
}

TEST_CASE("training batches are the files of core's sharding, in its order, in every shuffle mode") {
  const fs::path root = cases() / "f32" / "npy";
  for (const ShuffleMode mode : {ShuffleMode::Global, ShuffleMode::Node, ShuffleMode::Gpu}) {
    std::set<std::string> seen;
    for (int rank = 0; rank < 2; ++rank) {
      INFO(std::string(to_string(mode)) << " rank " << rank);
      ReaderContext c = context(root, {0, 1}, rank, 2, 1);
      // Node mode on two nodes of one rank each.
      NpyReaderOptions o = npy_options(NpyIo::Mmap);
      o.shuffle_mode = mode;
      NpyReader reader(c, o);
      CHECK(reader.global_samples(Split::Train) == 6);
      CHECK(reader.local_samples(Split::Train) == 3);
      for (const std::int64_t epoch : {0, 1, 2}) {
        reader.start_epoch(Split::Train, epoch);
        const auto order = reader.sharding().order(epoch);
        std::vector<std::string> want;
        for (const auto i : order) want.push_back(reader.sample_files(Split::Train, i)[0]);
        CHECK(reader.epoch_files() == want);
        // And the batches are those files' samples, in that order.
        const auto batches = read_all(reader, Split::Train, epoch);
        REQUIRE(batches.size() == order.size());
        for (std::size_t k = 0; k < order.size(); ++k) {
          std::vector<float> data(2 * kHeight * kWidth);
          std::vector<std::int64_t> labels(kHeight * kWidth);
          reader.read_sample(reader.sample_files(Split::Train, order[k]), data.data(), labels.data());
          CHECK(at::equal(at::from_blob(data.data(), {1, 2, kHeight, kWidth}), batches[k].data));
          CHECK(at::equal(at::from_blob(labels.data(), {1, kHeight, kWidth}, at::kLong), batches[k].labels));
        }
        if (mode != ShuffleMode::Global) {
          // The shard is the contiguous half of the sorted list.
          for (const auto i : order) CHECK(i / 3 == rank);
        }
        if (epoch == 0) seen.insert(want.begin(), want.end());
      }
    }
    CHECK(seen.size() == 6);
  }
  // Oversampling needs a shard mode; the error names the setting.
  NpyReaderOptions o = npy_options(NpyIo::Mmap);
  o.data_oversampling_factor = 2;
  o.where = "run.toml [reader]";
  CHECK(contains(error_of([&] { NpyReader(context(root), o); }),
                 "run.toml [reader]: data_oversampling_factor = 2 with shuffle_mode = \"global\""));
  o.shuffle_mode = ShuffleMode::Gpu;
  NpyReader oversampled(context(root, {0}, 0, 2, 1), o);
  // Epochs alternate between the two rounds; round 0 is the contiguous half,
  // and what the rank may read is exactly what the two rounds hold.
  const auto round0 = oversampled.sharding().order(0), round1 = oversampled.sharding().order(1);
  CHECK(std::set<std::int64_t>(round0.begin(), round0.end()) == std::set<std::int64_t>{0, 1, 2});
  std::set<std::int64_t> both(round0.begin(), round0.end());
  both.insert(round1.begin(), round1.end());
  const auto reach = oversampled.sharding().reach();
  CHECK(std::set<std::int64_t>(reach.begin(), reach.end()) == both);
  oversampled.start_epoch(Split::Train, 3);
  std::vector<std::string> files;
  for (const auto i : oversampled.sharding().order(3))
    files.push_back(oversampled.sample_files(Split::Train, i)[0]);
  CHECK(oversampled.epoch_files() == files);
}

TEST_CASE("bad data sets are refused when the reader is built, naming the file or directory") {
  TempDir dir;
  const fs::path root = copy_case(dir, "f32");
  const auto build = [&](const fs::path& r) { NpyReader(context(r), npy_options(NpyIo::Mmap)); };

  const std::string label = validation_file(root, "label-", 2);
  fs::rename(label, label + ".away");
  std::string e = error_of([&] { build(root); });
  CHECK(contains(e, label + ": no such file"));
  CHECK(contains(e, validation_file(root, "data-", 2)));
  fs::rename(label + ".away", label);

  fs::rename(root / "stats.h5", root / "stats.away");
  CHECK(contains(error_of([&] { build(root); }), (root / "stats.h5").string() + ": no such file"));
  fs::rename(root / "stats.away", root / "stats.h5");

  CHECK(contains(error_of([&] { build(cases() / "f32" / "h5"); }),
                 "no data-*.npy files in the train split (it holds .h5 files"));

  // The first training file fixes the shape: its header is read at once.
  std::string first;
  for (const auto& f : fs::directory_iterator(root / "train"))
    if (f.path().filename().string().rfind("data-", 0) == 0 && (first.empty() || f.path() < first))
      first = f.path().string();
  fs::resize_file(first, 30);
  CHECK(contains(error_of([&] { build(root); }), first));
}

TEST_CASE("bad samples are refused by next() with the file named, in every io mode") {
  TempDir dir;
  const fs::path bad = cases() / "bad";
  for (const NpyIo io : kIos) {
    INFO("io " << io_name(io));
    const fs::path root =
        copy_case(dir, io == NpyIo::Mmap ? "f32" : io == NpyIo::Direct ? "f16_u8" : "v2_i2");
    const std::string data = validation_file(root, "data-", 1);
    const std::string label = validation_file(root, "label-", 1);
    const auto original = [&](const std::string& file) { return file + ".orig"; };
    fs::copy_file(data, original(data));
    fs::copy_file(label, original(label));
    const auto restore = [&] {
      fs::copy_file(original(data), data, fs::copy_options::overwrite_existing);
      fs::copy_file(original(label), label, fs::copy_options::overwrite_existing);
    };
    const auto read_validation = [&](std::vector<std::int64_t> channels = {0, 7, 15, 3}) {
      NpyReader reader(context(root, channels), npy_options(io));
      read_all(reader, Split::Validation, 0);
    };
    REQUIRE(error_of([&] { read_validation(); }) == "(no deepcam::Error thrown)");

    // Cut inside the header.
    fs::resize_file(data, 20);
    std::string e = error_of([&] { read_validation(); });
    CHECK(contains(e, data));
    restore();

    // A header promising more data than the file holds.
    fs::resize_file(data, fs::file_size(data) - 100);
    e = error_of([&] { read_validation(); });
    CHECK(contains(e, data + ": header promises"));
    CHECK(contains(e, "truncated"));
    restore();

    fs::resize_file(label, fs::file_size(label) - 1);
    CHECK(contains(error_of([&] { read_validation(); }), label + ": header promises"));
    restore();

    fs::copy_file(bad / "complex.npy", data, fs::copy_options::overwrite_existing);
    e = error_of([&] { read_validation(); });
    CHECK(contains(e, data));
    CHECK(contains(e, "'<c8' is not supported"));  // the npy layer names what it refuses
    restore();

    // Integer data is no bad sample: converted, as the hdf5 reader converts
    // it and as deepcam-data verify passes it.
    fs::copy_file(bad / "int32.npy", data, fs::copy_options::overwrite_existing);
    CHECK(error_of([&] { read_validation(); }) == "(no deepcam::Error thrown)");
    restore();

    fs::copy_file(bad / "nan.npy", data, fs::copy_options::overwrite_existing);
    e = error_of([&] { read_validation({0, 1, 2, 3}); });
    CHECK(contains(e, data + ": data at (1, 2, 3) holds nan"));
    CHECK(contains(e, "check_finite = false"));
    // Channel 3 not selected: the NaN is never read.
    CHECK(error_of([&] { read_validation({0, 1, 2}); }) == "(no deepcam::Error thrown)");
    restore();

    fs::copy_file(bad / "float_labels.npy", label, fs::copy_options::overwrite_existing);
    CHECK(contains(error_of([&] { read_validation(); }), label));
    restore();

    // A data file where the labels belong: the wrong shape, named.
    fs::copy_file(original(data), label, fs::copy_options::overwrite_existing);
    e = error_of([&] { read_validation(); });
    CHECK(contains(e, label + ": holds an array of shape (16, 24, 16), expected (16, 24)"));
    restore();
  }
}

TEST_CASE("options come from the plugin's checked table") {
  deepcam::Params params("run.toml [reader]",
                         {{"threads", std::int64_t{3}},
                          {"io", std::string("direct")},
                          {"shuffle_mode", std::string("node")},
                          {"data_oversampling_factor", std::int64_t{2}},
                          {"check_finite", false}});
  const NpyReaderOptions o = NpyReaderOptions::from(params);
  CHECK(o.threads == 3);
  CHECK((o.io == NpyIo::Direct));
  CHECK((o.shuffle_mode == ShuffleMode::Node));
  CHECK(o.data_oversampling_factor == 2);
  CHECK(!o.check_finite);
  CHECK(o.where == "run.toml [reader]");
  deepcam::Params bad("run.toml [reader]", {{"threads", std::int64_t{3}},
                                            {"io", std::string("aio")},
                                            {"shuffle_mode", std::string("node")},
                                            {"data_oversampling_factor", std::int64_t{1}},
                                            {"check_finite", true}});
  CHECK(contains(error_of([&] { NpyReaderOptions::from(bad); }),
                 "run.toml [reader] io = \"aio\": use \"mmap\", \"pread\" or \"direct\""));
  deepcam::Params pread("run.toml [reader]", {{"threads", std::int64_t{1}},
                                              {"io", std::string("pread")},
                                              {"shuffle_mode", std::string("global")},
                                              {"data_oversampling_factor", std::int64_t{1}},
                                              {"check_finite", true}});
  CHECK((NpyReaderOptions::from(pread).io == NpyIo::Pread));
}

namespace {

// A file of `pages` pages of 1s, mapped whole, as the reader maps a sample.
struct MappedTemp {
  std::string path;
  std::size_t size = 0;
  const unsigned char* data = nullptr;
  MappedTemp(const TempDir& dir, const std::string& name, std::size_t pages) {
    path = (dir.path / name).string();
    size = pages * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    REQUIRE(fd >= 0);
    const std::vector<unsigned char> ones(size, 1);
    REQUIRE(::write(fd, ones.data(), size) == static_cast<ssize_t>(size));
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    REQUIRE(p != MAP_FAILED);
    data = static_cast<const unsigned char*>(p);
  }
  ~MappedTemp() { ::munmap(const_cast<unsigned char*>(data), size); }
  // Every byte, as a decoder touches them.
  std::size_t sum() const {
    std::size_t total = 0;
    for (std::size_t i = 0; i < size; ++i) total += static_cast<const volatile unsigned char*>(data)[i];
    return total;
  }
};

}  // namespace

// The race of a file rewritten in place while it is read, made certain: the
// file shrinks after it is mapped and before its pages are touched.
TEST_CASE("a mapped file that shrinks while it is read is an error naming it, not a SIGBUS") {
  using deepcam::read_mapping;
  TempDir dir;
  {
    const MappedTemp intact(dir, "intact.npy", 8);
    std::size_t total = 0;
    read_mapping(intact.path, intact.data, intact.size, [&] { total = intact.sum(); });
    CHECK(total == intact.size);
  }
  const MappedTemp file(dir, "shrunk.npy", 8);
  fs::resize_file(file.path, 100);
  const std::string e =
      error_of([&] { read_mapping(file.path, file.data, file.size, [&] { (void)file.sum(); }); });
  CHECK(contains(e, file.path + ": shrank while it was read (it is 100 bytes now)"));
  // What the decoder threw on the zeros it saw is replaced by the cause.
  const MappedTemp other(dir, "other.npy", 8);
  fs::resize_file(other.path, 0);
  CHECK(contains(error_of([&] {
                   read_mapping(other.path, other.data, other.size, [&] {
                     if (other.sum() < other.size) throw Error("a decoder's complaint");
                   });
                 }),
                 other.path + ": shrank while it was read"));
  // Faults on many threads at once, each in its own mapping, beside
  // threads whose files stay whole.
  std::vector<std::string> errors(8);
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < errors.size(); ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 20; ++round) {
        const MappedTemp m(dir, "t" + std::to_string(t) + "-" + std::to_string(round), 4);
        const bool shrink = t % 2 == 0;
        if (shrink) fs::resize_file(m.path, 0);
        std::size_t total = 0;
        const std::string e =
            error_of([&] { read_mapping(m.path, m.data, m.size, [&] { total = m.sum(); }); });
        if (shrink ? !contains(e, m.path + ": shrank while it was read")
                   : (e != "(no deepcam::Error thrown)" || total != m.size))
          errors[t] = e + " (read " + std::to_string(total) + " of " + std::to_string(m.size) + ")";
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& text : errors) CHECK(text.empty());
}

// The guard takes only its own faults: a SIGBUS anywhere else still ends the
// process as before (in a child, after the guard was installed).
TEST_CASE("a SIGBUS outside a guarded read still kills the process") {
  using deepcam::read_mapping;
  TempDir dir;
  const MappedTemp installs(dir, "installs.npy", 1);
  read_mapping(installs.path, installs.data, installs.size, [&] { (void)installs.sum(); });
  const MappedTemp file(dir, "unguarded.npy", 4);
  fs::resize_file(file.path, 0);
  std::fflush(nullptr);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    (void)file.sum();
    ::_exit(0);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  CHECK(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGBUS);
}
