// Unit tests of deepcam::readers::Hdf5Reader on small data sets written here.
// Expected orders marked "reference" were printed by Python with numpy 2.3.5
// and torch 2.11.0: numpy.random.RandomState(12345).shuffle(list(range(n)))
// and torch.utils.data.DistributedSampler(shuffle=True, drop_last=True,
// seed=s) after set_epoch(e), mapped through that shuffle.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/randperm.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include <ftw.h>

#include "deepcam/error.hpp"
#include "deepcam/h5.hpp"
#include "deepcam/sharding.hpp"
#include "hdf5_reader.hpp"

// Last: c10's logging header defines its own CHECK, which must not win.
#include <doctest/doctest.h>

namespace fs = std::filesystem;
using deepcam::Batch;
using deepcam::Error;
using deepcam::ReaderContext;
using deepcam::Split;
using deepcam::readers::Hdf5Reader;
using deepcam::readers::Hdf5ReaderOptions;

namespace {

// Not std::filesystem::remove_all: libtorch.so (2.11.0 wheel) exports its
// own copy of it, which crashes when it is bound ahead of libstdc++'s.
void remove_tree(const fs::path& path) {
  nftw(
      path.c_str(),
      [](const char* file, const struct stat*, int, struct FTW*) { return ::remove(file); }, 16,
      FTW_DEPTH | FTW_PHYS);
}

struct TempDir {
  fs::path path;
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "deepcam_hdf5_XXXXXX").string();
    REQUIRE(mkdtemp(pattern.data()) != nullptr);
    path = pattern;
  }
  ~TempDir() { remove_tree(path); }
};

// Every value is a small integer, so that it and its normalised form are
// exact in float32 and the expected values can be computed in double.
double value(int id, std::uint64_t h, std::uint64_t w, std::uint64_t c) {
  return id * 1000.0 + h * 100.0 + w * 10.0 + c;
}
std::int32_t label(int id, std::uint64_t h, std::uint64_t w) {
  return static_cast<std::int32_t>((id + h + 2 * w) % 3);
}
double minval(std::uint64_t c) { return -1.0 - c; }
double maxval(std::uint64_t c) { return minval(c) + (c % 2 ? 1024.0 : 65536.0); }

struct Layout {
  std::uint64_t height = 2;
  std::uint64_t width = 3;
  std::uint64_t channels = 4;
};

std::string sample_name(int id) {
  char name[32];
  std::snprintf(name, sizeof name, "data-%04d.h5", id);
  return name;
}

void write_sample(const fs::path& path, int id, const Layout& l) {
  std::vector<float> data;
  std::vector<std::int32_t> labels;
  for (std::uint64_t h = 0; h < l.height; ++h)
    for (std::uint64_t w = 0; w < l.width; ++w) {
      labels.push_back(label(id, h, w));
      for (std::uint64_t c = 0; c < l.channels; ++c)
        data.push_back(static_cast<float>(value(id, h, w, c)));
    }
  auto file = deepcam::h5::File::create(path.string());
  file.write("climate/data", data.data(), {l.height, l.width, l.channels});
  file.write("climate/labels_0", labels.data(), {l.height, l.width});
  file.close();
}

void write_stats(const fs::path& root, std::uint64_t channels) {
  std::vector<double> lo, hi;
  for (std::uint64_t c = 0; c < channels; ++c) {
    lo.push_back(minval(c));
    hi.push_back(maxval(c));
  }
  auto file = deepcam::h5::File::create((root / "stats.h5").string());
  file.write("climate/minval", lo.data(), {channels});
  file.write("climate/maxval", hi.data(), {channels});
  file.close();
}

// Training samples get ids 0.., validation samples 5000..; the sorted
// position of a file is therefore its id (minus 5000).
void write_dataset(const fs::path& root, int n_train, int n_validation, const Layout& l = {}) {
  fs::create_directories(root / "train");
  fs::create_directories(root / "validation");
  for (int i = 0; i < n_train; ++i) write_sample(root / "train" / sample_name(i), i, l);
  for (int i = 0; i < n_validation; ++i)
    write_sample(root / "validation" / sample_name(5000 + i), 5000 + i, l);
  write_stats(root, l.channels);
}

ReaderContext context(const fs::path& root, std::vector<std::int64_t> channels = {0, 1, 2, 3},
                      int rank = 0, int world_size = 1, std::uint64_t seed = 0,
                      std::int64_t batch_size = 2) {
  ReaderContext c;
  c.data_root = root.string();
  c.channels = std::move(channels);
  c.train_batch_size = batch_size;
  c.validation_batch_size = batch_size;
  c.rank = rank;
  c.world_size = world_size;
  c.seed = seed;
  c.log = nullptr;
  return c;
}

Hdf5ReaderOptions options(int threads, bool check_finite = true) {
  Hdf5ReaderOptions o;
  o.threads = threads;
  o.check_finite = check_finite;
  return o;
}

int id_of(const std::string& path) { return std::stoi(fs::path(path).stem().string().substr(5)); }

std::vector<int> epoch_ids(const Hdf5Reader& reader) {
  std::vector<int> ids;
  for (const auto& f : reader.epoch_files()) ids.push_back(id_of(f));
  return ids;
}

std::vector<Batch> read_all(Hdf5Reader& reader, Split split, std::int64_t epoch) {
  reader.start_epoch(split, epoch);
  std::vector<Batch> batches;
  Batch batch;
  while (reader.next(batch)) batches.push_back(batch);
  return batches;
}

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

}  // namespace

TEST_CASE("samples are normalised per SPEC 1.4, channels selected in order, then transposed") {
  TempDir dir;
  const Layout l;
  write_dataset(dir.path, 3, 1, l);
  const std::vector<std::int64_t> channels{3, 0, 2};
  Hdf5Reader reader(context(dir.path, channels, 0, 1, 0, 8), options(2));
  const auto batches = read_all(reader, Split::Validation, 0);
  REQUIRE(batches.size() == 1);
  const Batch& b = batches[0];
  CHECK((b.data.scalar_type() == at::kFloat));
  CHECK((b.labels.scalar_type() == at::kLong));
  CHECK(b.data.is_contiguous());
  CHECK(b.labels.is_contiguous());
  REQUIRE(b.data.sizes() == at::IntArrayRef{1, 3, 2, 3});
  REQUIRE(b.labels.sizes() == at::IntArrayRef{1, 2, 3});
  const float* x = b.data.data_ptr<float>();
  const std::int64_t* y = b.labels.data_ptr<std::int64_t>();
  for (std::size_t k = 0; k < channels.size(); ++k)
    for (std::uint64_t h = 0; h < l.height; ++h)
      for (std::uint64_t w = 0; w < l.width; ++w) {
        const auto c = static_cast<std::uint64_t>(channels[k]);
        const double expected = (value(5000, h, w, c) - minval(c)) / (maxval(c) - minval(c));
        CHECK(x[(k * l.height + h) * l.width + w] == expected);
      }
  for (std::uint64_t h = 0; h < l.height; ++h)
    for (std::uint64_t w = 0; w < l.width; ++w) CHECK(y[h * l.width + w] == label(5000, h, w));
  // One value of the hand computation spelled out: file 5000, h 1, w 2,
  // channel 3 (output channel 0): (5000123 - (-4)) / 1024.
  CHECK(x[(0 * 2 + 1) * 3 + 2] == 5000127.0f / 1024.0f);
}

TEST_CASE("normalisation is exact across pixel blocks, channel groups and layouts") {
  // normalise.hpp: blocks of 512 pixels; runs of 4 consecutive channels go
  // through the vector path when a plane is a multiple of 4 pixels (23 x 52),
  // everything else through the plain loop (23 x 50, or channels that do not
  // follow each other); 16 file channels have a compile-time stride.
  struct Case {
    std::uint64_t width, file_channels;
    std::vector<std::int64_t> channels;
  };
  const Case cases[] = {{50, 16, {4, 0, 3, 1}},
                        {52, 16, {4, 0, 3, 1}},
                        {52, 16, {0, 1, 2, 3, 7, 8, 9, 10, 5}},
                        {50, 16, {0, 1, 2, 3, 7, 8, 9, 10, 5}},
                        {52, 5, {1, 2, 3, 4, 0}},
                        {50, 5, {1, 2, 3, 4, 0}}};
  for (const Case& t : cases) {
    const std::uint64_t file_channels = t.file_channels;
    const std::vector<std::int64_t>& channels = t.channels;
    INFO("width " << t.width << ", file channels " << file_channels << ", " << channels.size() << " selected");
    TempDir dir;
    const Layout l{23, t.width, file_channels};
    write_dataset(dir.path, 2, 1, l);
    Hdf5Reader reader(context(dir.path, channels, 0, 1, 0, 1), options(2));
    const auto batches = read_all(reader, Split::Validation, 0);
    REQUIRE(batches.size() == 1);
    const float* x = batches[0].data.data_ptr<float>();
    std::size_t wrong = 0;
    for (std::size_t k = 0; k < channels.size(); ++k)
      for (std::uint64_t h = 0; h < l.height; ++h)
        for (std::uint64_t w = 0; w < l.width; ++w) {
          const auto c = static_cast<std::uint64_t>(channels[k]);
          const double expected = (value(5000, h, w, c) - minval(c)) / (maxval(c) - minval(c));
          wrong += x[(k * l.height + h) * l.width + w] != expected;
        }
    CHECK(wrong == 0);

    // A NaN in the last, partial block is found and named.
    std::vector<float> data(l.height * l.width * l.channels, 5.0f);
    std::vector<std::int32_t> labels(l.height * l.width, 1);
    data[(22 * l.width + 40) * l.channels + 3] = std::numeric_limits<float>::quiet_NaN();
    const fs::path bad = dir.path / "validation" / sample_name(5000);
    auto f = deepcam::h5::File::create(bad.string());
    f.write("climate/data", data.data(), {l.height, l.width, l.channels});
    f.write("climate/labels_0", labels.data(), {l.height, l.width});
    f.close();
    const std::string message = error_of([&] { read_all(reader, Split::Validation, 0); });
    CHECK(contains(message, bad.string()));
    CHECK(contains(message, "(22, 40, 3) holds nan"));
  }
}

TEST_CASE("next() refills the last batch's buffers only when nobody else holds them") {
  TempDir dir;
  write_dataset(dir.path, 6, 1);
  Hdf5Reader reader(context(dir.path, {0, 1, 2, 3}, 0, 1, 0, 2), options(2));
  const auto kept = read_all(reader, Split::Train, 0);  // each batch kept: three buffers
  REQUIRE(kept.size() == 3);
  CHECK(kept[0].data.data_ptr() != kept[1].data.data_ptr());
  CHECK(kept[1].labels.data_ptr() != kept[2].labels.data_ptr());

  // Only `batch` holds the last one: its buffers are filled again, with the
  // same values as fresh ones.
  reader.start_epoch(Split::Train, 0);
  Batch batch;
  std::set<const void*> buffers;
  for (std::size_t i = 0; reader.next(batch); ++i) {
    REQUIRE(i < kept.size());
    CHECK(at::equal(batch.data, kept[i].data));
    CHECK(at::equal(batch.labels, kept[i].labels));
    buffers.insert(batch.data.data_ptr());
  }
  CHECK(buffers.size() == 1);

  // A copy or a view of the last batch keeps it as it was.
  reader.start_epoch(Split::Train, 0);
  REQUIRE(reader.next(batch));
  const at::Tensor copy = batch.data;
  const at::Tensor view = batch.labels.view({-1});
  REQUIRE(reader.next(batch));
  CHECK(copy.data_ptr() != batch.data.data_ptr());
  CHECK(view.data_ptr() != batch.labels.data_ptr());
  CHECK(at::equal(copy, kept[0].data));
  CHECK(at::equal(view, kept[0].labels.view({-1})));
  CHECK(at::equal(batch.data, kept[1].data));
}

TEST_CASE("float64 data and int64 labels on disk are read through HDF5's conversion") {
  TempDir dir;
  const std::vector<double> data{0.1, -2.7, 1e-3, 3.25, 7.0, 0.3};  // (1, 2, 3)
  const std::vector<std::int64_t> labels{2, 0};
  for (const char* split : {"train", "validation"}) {
    fs::create_directories(dir.path / split);
    auto f = deepcam::h5::File::create((dir.path / split / "data-9000.h5").string());
    f.write("climate/data", data.data(), {1, 2, 3});
    f.write("climate/labels_0", labels.data(), {1, 2});
  }
  {
    const std::vector<double> lo{0.0, -3.0, 0.0}, hi{1.0, 1.0, 2.0};
    auto f = deepcam::h5::File::create((dir.path / "stats.h5").string());
    f.write("climate/minval", lo.data(), {3});
    f.write("climate/maxval", hi.data(), {3});
  }
  Hdf5Reader reader(context(dir.path, {0, 1, 2}), options(1));
  const auto batches = read_all(reader, Split::Validation, 0);
  REQUIRE(batches.size() == 1);
  REQUIRE(batches[0].data.sizes() == at::IntArrayRef{1, 3, 1, 2});
  const float* x = batches[0].data.data_ptr<float>();
  // Output (c, h, w) with h = 0 comes from input (h, w, c) at w * 3 + c.
  const float shift[3] = {0.0f, -3.0f, 0.0f};
  const float scale[3] = {1.0f, 0.25f, 0.5f};
  for (int c = 0; c < 3; ++c)
    for (int w = 0; w < 2; ++w)
      CHECK(x[c * 2 + w] == (static_cast<float>(data[w * 3 + c]) - shift[c]) * scale[c]);
  CHECK(batches[0].labels.data_ptr<std::int64_t>()[0] == 2);
  CHECK(batches[0].labels.data_ptr<std::int64_t>()[1] == 0);
}

TEST_CASE("the reference's file pre-shuffle is numpy RandomState(12345).shuffle") {
  using deepcam::reference_preshuffle;
  const std::vector<std::vector<std::int64_t>> reference{
      {0},
      {1, 0},
      {0, 4, 3, 1, 2},
      {0, 7, 3, 9, 6, 4, 1, 8, 5, 2},
      {25, 26, 2,  19, 5,  12, 3,  0,  4,  15, 32, 20, 8,  28, 24, 21, 7,  6, 30,
       10, 13, 11, 33, 18, 16, 31, 23, 9,  14, 27, 17, 22, 36, 35, 1,  29, 34}};
  for (const auto& expected : reference) {
    const auto n = static_cast<std::int64_t>(expected.size());
    CAPTURE(n);
    CHECK(reference_preshuffle(n) == expected);
  }
}

TEST_CASE("the training permutation is torch.randperm(N) seeded with seed + epoch") {
  using deepcam::reference_preshuffle;
  using deepcam::training_indices;
  using Indices = std::vector<std::int64_t>;
  // The C++ generator is seeded as Python's torch.Generator().manual_seed(7).
  {
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(7);
    const at::Tensor p = at::randperm(10, g, at::kLong);
    const Indices got(p.data_ptr<std::int64_t>(), p.data_ptr<std::int64_t>() + 10);
    const Indices python{5, 0, 3, 4, 1, 7, 9, 6, 8, 2};
    CHECK(got == python);
  }
  for (const std::uint64_t seed : {0ULL, 3ULL, 123456789ULL})
    for (const std::int64_t epoch : {0, 1, 5}) {
      const std::int64_t n = 23;
      at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed + epoch);
      const at::Tensor p = at::randperm(n, g, at::kLong);
      const auto pre = reference_preshuffle(n);
      Indices expected;
      for (std::int64_t k = 0; k < n; ++k) expected.push_back(pre[p.data_ptr<std::int64_t>()[k]]);
      CHECK(training_indices(n, 0, 1, seed, epoch) == expected);
    }
  CHECK(training_indices(23, 0, 1, 9, 0) != training_indices(23, 0, 1, 9, 1));
  CHECK(training_indices(23, 0, 1, 9, 1) != training_indices(23, 0, 1, 9, 2));
  CHECK(training_indices(23, 0, 1, 1, 0) != training_indices(23, 0, 1, 2, 0));

  struct Case {
    std::int64_t n;
    int world_size;
    std::uint64_t seed;
    std::int64_t epoch;
    std::vector<Indices> per_rank;
  };
  const std::vector<Case> reference{
      {37, 4, 1234, 0,
       {{13, 30, 27, 7, 19, 25, 23, 8, 9},
        {5, 31, 26, 29, 12, 21, 6, 2, 20},
        {18, 33, 22, 11, 17, 0, 36, 14, 15},
        {1, 3, 16, 4, 32, 28, 34, 35, 10}}},
      {7, 2, 5, 3, {{3, 0, 6}, {5, 1, 4}}},
  };
  for (const auto& c : reference)
    for (int rank = 0; rank < c.world_size; ++rank) {
      CAPTURE(c.n);
      CAPTURE(rank);
      CHECK(training_indices(c.n, rank, c.world_size, c.seed, c.epoch) == c.per_rank[rank]);
    }
}

TEST_CASE("the reader reads the reference's training order (seed 0 = the reference's sampler)") {
  TempDir dir;
  write_dataset(dir.path, 10, 2);
  const std::vector<std::vector<int>> epoch0{{6, 4, 0}, {7, 9, 5}, {8, 2, 1}};
  const std::vector<std::vector<int>> epoch1{{4, 3, 2}, {1, 0, 9}, {7, 5, 8}};
  for (int rank = 0; rank < 3; ++rank) {
    Hdf5Reader reader(context(dir.path, {0, 1, 2, 3}, rank, 3, 0, 2), options(2));
    CHECK(reader.global_samples(Split::Train) == 10);  // SPEC 2.1: N, whatever P
    CHECK(reader.local_samples(Split::Train) == 3);
    reader.start_epoch(Split::Train, 0);
    CHECK(epoch_ids(reader) == epoch0[rank]);
    reader.start_epoch(Split::Train, 1);
    CHECK(epoch_ids(reader) == epoch1[rank]);
    // The batches hold those files, in that order; the last batch is smaller.
    const auto batches = read_all(reader, Split::Train, 1);
    REQUIRE(batches.size() == 2);
    CHECK(batches[0].data.size(0) == 2);
    CHECK(batches[1].data.size(0) == 1);
    const float* x0 = batches[0].data.data_ptr<float>();
    const float* x1 = batches[1].data.data_ptr<float>();
    // Channel 0 at (0, 0) normalises to (1000 id + 1) / 65536.
    CHECK(x0[0] == (1000.0 * epoch1[rank][0] + 1.0) / 65536.0);
    CHECK(x0[4 * 2 * 3] == (1000.0 * epoch1[rank][1] + 1.0) / 65536.0);
    CHECK(x1[0] == (1000.0 * epoch1[rank][2] + 1.0) / 65536.0);
  }
}

TEST_CASE("training shards are disjoint and equal; validation covers every file once") {
  using deepcam::training_indices;
  using deepcam::validation_indices;
  for (const std::int64_t n : {1, 2, 7, 10, 64, 101})
    for (const int p : {1, 2, 3, 4, 8, 13}) {
      CAPTURE(n);
      CAPTURE(p);
      std::set<std::int64_t> union_train;
      std::multiset<std::int64_t> union_validation;
      std::size_t total_train = 0;
      for (int r = 0; r < p; ++r) {
        if (n >= p) {
          const auto shard = training_indices(n, r, p, 42, 3);
          CHECK(static_cast<std::int64_t>(shard.size()) == n / p);
          total_train += shard.size();
          union_train.insert(shard.begin(), shard.end());
        }
        const auto v = validation_indices(n, r, p);
        CHECK(static_cast<std::int64_t>(v.size()) == n / p + (r < n % p ? 1 : 0));
        // SPEC 2.3: the block [r q, (r + 1) q), then remainder file N - N mod P + r.
        for (std::size_t i = 0; i < static_cast<std::size_t>(n / p); ++i)
          CHECK(v[i] == r * (n / p) + static_cast<std::int64_t>(i));
        if (r < n % p) CHECK(v.back() == n - n % p + r);
        union_validation.insert(v.begin(), v.end());
      }
      if (n >= p) {
        CHECK(union_train.size() == total_train);  // disjoint
        CHECK(static_cast<std::int64_t>(union_train.size()) == n / p * p);
        CHECK(*union_train.rbegin() < n);
      }
      CHECK(static_cast<std::int64_t>(union_validation.size()) == n);
      CHECK(std::set<std::int64_t>(union_validation.begin(), union_validation.end()).size() ==
            static_cast<std::size_t>(n));
    }
}

TEST_CASE("the reader's validation split is unshuffled, blocked, and complete over ranks") {
  TempDir dir;
  write_dataset(dir.path, 4, 7);
  std::multiset<int> seen;
  for (int rank = 0; rank < 3; ++rank) {
    Hdf5Reader reader(context(dir.path, {0, 1, 2, 3}, rank, 3), options(2));
    CHECK(reader.global_samples(Split::Validation) == 7);
    CHECK(reader.local_samples(Split::Validation) == (rank == 0 ? 3 : 2));
    reader.start_epoch(Split::Validation, 4);
    const auto ids = epoch_ids(reader);
    const std::vector<std::vector<int>> expected{{5000, 5001, 5006}, {5002, 5003}, {5004, 5005}};
    CHECK(ids == expected[rank]);
    seen.insert(ids.begin(), ids.end());
    std::int64_t read = 0;
    for (const auto& b : read_all(reader, Split::Validation, 4)) read += b.data.size(0);
    CHECK(read == reader.local_samples(Split::Validation));
  }
  const std::multiset<int> all{5000, 5001, 5002, 5003, 5004, 5005, 5006};
  CHECK(seen == all);
}

TEST_CASE("the number of threads does not change the batches") {
  TempDir dir;
  write_dataset(dir.path, 11, 3);
  Hdf5Reader one(context(dir.path, {2, 1}, 0, 1, 77, 4), options(1));
  Hdf5Reader many(context(dir.path, {2, 1}, 0, 1, 77, 4), options(5));
  for (const Split split : {Split::Train, Split::Validation}) {
    const auto a = read_all(one, split, 2);
    const auto b = read_all(many, split, 2);
    REQUIRE(a.size() == b.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
      CHECK(at::equal(a[i].data, b[i].data));
      CHECK(at::equal(a[i].labels, b[i].labels));
    }
  }
}

TEST_CASE("bad samples are refused by next() with the file and dataset named") {
  TempDir dir;
  const Layout l;
  write_dataset(dir.path, 4, 1, l);
  const fs::path bad = dir.path / "train" / "data-0002.h5";
  auto first_error = [&](int threads, bool check_finite = true) {
    Hdf5Reader reader(context(dir.path, {0, 1, 2, 3}, 0, 1, 0, 4), options(threads, check_finite));
    return error_of([&] { read_all(reader, Split::Train, 0); });
  };

  SUBCASE("missing dataset") {
    auto f = deepcam::h5::File::create(bad.string());
    std::vector<float> data(l.height * l.width * l.channels, 1.0f);
    f.write("climate/data", data.data(), {l.height, l.width, l.channels});
    f.close();
    const std::string message = first_error(2);
    CHECK(contains(message, bad.string()));
    CHECK(contains(message, "climate/labels_0"));
  }
  SUBCASE("wrong data shape") {
    write_sample(bad, 2, Layout{2, 4, 4});
    const std::string message = first_error(2);
    CHECK(contains(message, bad.string()));
    CHECK(contains(message, "climate/data"));
    CHECK(contains(message, "(2, 4, 4)"));
  }
  SUBCASE("wrong label shape") {
    auto f = deepcam::h5::File::create(bad.string());
    std::vector<float> data(l.height * l.width * l.channels, 1.0f);
    std::vector<std::int32_t> labels(l.height * l.width, 0);
    f.write("climate/data", data.data(), {l.height, l.width, l.channels});
    f.write("climate/labels_0", labels.data(), {l.width, l.height});
    f.close();
    const std::string message = first_error(3);
    CHECK(contains(message, bad.string()));
    CHECK(contains(message, "climate/labels_0"));
  }
  SUBCASE("NaN and infinite values") {
    for (const float poison : {std::numeric_limits<float>::quiet_NaN(),
                               -std::numeric_limits<float>::infinity()}) {
      std::vector<float> data;
      std::vector<std::int32_t> labels(l.height * l.width, 1);
      for (std::uint64_t i = 0; i < l.height * l.width * l.channels; ++i)
        data.push_back(i == 1 * 12 + 2 * 4 + 3 ? poison : 5.0f);  // (1, 2, 3)
      auto f = deepcam::h5::File::create(bad.string());
      f.write("climate/data", data.data(), {l.height, l.width, l.channels});
      f.write("climate/labels_0", labels.data(), {l.height, l.width});
      f.close();
      const std::string message = first_error(2);
      CHECK(contains(message, bad.string()));
      CHECK(contains(message, "(1, 2, 3)"));
      // Unchecked, the value passes through as it is.
      Hdf5Reader lax(context(dir.path, {3}, 0, 1, 0, 4), options(2, false));
      const auto batches = read_all(lax, Split::Train, 0);
      bool found = false;
      for (const auto& b : batches)
        for (std::int64_t i = 0; i < b.data.numel(); ++i)
          found = found || !std::isfinite(b.data.data_ptr<float>()[i]);
      CHECK(found);
    }
  }
  SUBCASE("truncated file") {
    // A valid sample cut in half: HDF5 sees the end of file before the
    // end its superblock records.
    fs::resize_file(bad, fs::file_size(bad) / 2);
    const std::string message = first_error(2);
    CHECK(contains(message, bad.string()));
  }
  SUBCASE("errors in a single worker reach the caller too") {
    write_sample(bad, 2, Layout{3, 3, 4});
    const std::string message = first_error(1);
    CHECK(contains(message, bad.string()));
    CHECK(contains(message, "climate/data"));
  }
}

TEST_CASE("bad data sets are refused when the reader is built, naming the file or directory") {
  TempDir dir;
  write_dataset(dir.path, 3, 2);
  auto build_error = [&](std::vector<std::int64_t> channels = {0, 1, 2, 3}, int world = 1) {
    return error_of([&] {
      Hdf5Reader reader(context(dir.path, channels, 0, world), options(2));
      (void)reader;
    });
  };

  SUBCASE("stats channel count differs from the data's") {
    write_stats(dir.path, 16);
    const std::string message = build_error();
    CHECK(contains(message, (dir.path / "stats.h5").string()));
    CHECK(contains(message, "climate/minval"));
  }
  SUBCASE("stats dataset missing") {
    {
      const std::vector<double> lo(4, 0.0);
      auto f = deepcam::h5::File::create((dir.path / "stats.h5").string());
      f.write("climate/minval", lo.data(), {4});
    }
    const std::string message = build_error();
    CHECK(contains(message, (dir.path / "stats.h5").string()));
    CHECK(contains(message, "climate/maxval"));
  }
  SUBCASE("missing split directory") {
    remove_tree(dir.path / "validation");
    const std::string message = build_error();
    CHECK(contains(message, (dir.path / "validation").string()));
  }
  SUBCASE("empty split directory") {
    remove_tree(dir.path / "train");
    fs::create_directories(dir.path / "train");
    const std::string message = build_error();
    CHECK(contains(message, (dir.path / "train").string()));
  }
  SUBCASE("channel out of range") {
    const std::string message = build_error({0, 4});
    CHECK(contains(message, "channel 4"));
    CHECK(contains(message, (dir.path / "train" / "data-0000.h5").string()));
  }
  SUBCASE("fewer training files than ranks") {
    const std::string message = build_error({0}, 4);
    CHECK(contains(message, (dir.path / "train").string()));
  }
}

TEST_CASE("next() before start_epoch() is an error; an exhausted epoch stays exhausted") {
  TempDir dir;
  write_dataset(dir.path, 2, 1);
  Hdf5Reader reader(context(dir.path), options(1));
  Batch batch;
  CHECK_THROWS_AS(reader.next(batch), Error);
  reader.start_epoch(Split::Validation, 0);
  CHECK(reader.next(batch));
  CHECK_FALSE(reader.next(batch));
  CHECK_FALSE(reader.next(batch));
}

TEST_CASE("options come from the plugin's checked table") {
  const deepcam::Params params("test.toml [reader]",
                               {{"threads", std::int64_t{3}}, {"check_finite", false}});
  const Hdf5ReaderOptions o = Hdf5ReaderOptions::from(params);
  CHECK(o.threads == 3);
  CHECK_FALSE(o.check_finite);
}
