// Unit tests of deepcam::readers::PrefetchReader and StagingArea: the ring
// (bounded read-ahead, buffers still held are not overwritten), batches that
// do not depend on the number of threads and equal the source reader's own,
// errors handed over at the batch they belong to, and staging (copies equal
// to their sources, reads go to them, removed at exit and after an error),
// and the GPU's normalisation over a file reader (its at:: ops run on the CPU
// here, on the GPU where one is present).
#include <ATen/ops/empty.h>
#include <ATen/Context.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/from_blob.h>

#include <fcntl.h>
#include <ftw.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "deepcam/error.hpp"
#include "deepcam/mlperf_log.hpp"
#include "deepcam/sharding.hpp"
#include "../hdf5/hdf5_reader.hpp"
#include "device_copy.hpp"
#include "prefetch_reader.hpp"
#include "staging.hpp"

// Last: c10's logging header defines its own CHECK, which must not win.
#undef CHECK
#include <doctest/doctest.h>

namespace fs = std::filesystem;
using deepcam::Batch;
using deepcam::Error;
using deepcam::ReaderContext;
using deepcam::ShuffleMode;
using deepcam::Split;
using deepcam::readers::PrefetchOptions;
using deepcam::readers::PrefetchReader;
using deepcam::readers::StagingArea;

namespace {

// Not std::filesystem::remove_all: libtorch.so exports a broken copy of it.
void remove_tree(const fs::path& path) {
  nftw(
      path.c_str(), [](const char* file, const struct stat*, int, struct FTW*) { return ::remove(file); }, 16,
      FTW_DEPTH | FTW_PHYS);
}

struct TempDir {
  fs::path path;
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "deepcam_prefetch_XXXXXX").string();
    REQUIRE(mkdtemp(pattern.data()) != nullptr);
    path = pattern;
  }
  ~TempDir() { remove_tree(path); }
};

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<std::string> entries(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  return out;
}

constexpr std::int64_t kC = 2, kH = 3, kW = 4;

// A source whose sample i is a real file holding "sample i" (so that staging
// has something to copy) and whose values encode i and the position, so that
// any mix-up shows. Reads take a random few hundred microseconds, so that
// workers finish out of order.
class FakeSource final : public deepcam::Reader {
 public:
  FakeSource(const fs::path& dir, std::int64_t train, std::int64_t validation, const ReaderContext& ctx)
      : ctx_(ctx) {
    for (const char* split : {"train", "validation"}) {
      const std::int64_t n = std::string(split) == "train" ? train : validation;
      fs::create_directories(dir / split);
      for (std::int64_t i = 0; i < n; ++i) {
        const fs::path f = dir / split / ("sample-" + std::to_string(1000 + i) + ".bin");
        std::ofstream(f) << split << ' ' << i << std::string(static_cast<std::size_t>(100 + 37 * i), 'x');
        files_[std::string(split) == "train" ? 0 : 1].push_back(f.string());
      }
    }
  }
  std::int64_t global_samples(Split s) const override { return sample_count(s); }
  std::int64_t local_samples(Split s) const override { return sample_count(s); }
  // Its own order, sequentially: the reference's global order for training.
  void start_epoch(Split s, std::int64_t epoch) override {
    split_ = s;
    pos_ = 0;
    order_ = s == Split::Train ? deepcam::training_indices(sample_count(s), ctx_.rank, ctx_.world_size, ctx_.seed, epoch)
                               : deepcam::validation_indices(sample_count(s), ctx_.rank, ctx_.world_size);
  }
  bool next(Batch& b) override {
    const std::int64_t bs = split_ == Split::Train ? ctx_.train_batch_size : ctx_.validation_batch_size;
    const std::int64_t n = std::min<std::int64_t>(bs, static_cast<std::int64_t>(order_.size()) - pos_);
    if (n <= 0) return false;
    b.data = at::empty({n, kC, kH, kW}, at::kFloat);
    b.labels = at::empty({n, kH, kW}, at::kLong);
    for (std::int64_t j = 0; j < n; ++j) {
      read_sample(sample_files(split_, order_[static_cast<std::size_t>(pos_ + j)]),
                  b.data.data_ptr<float>() + j * kC * kH * kW, b.labels.data_ptr<std::int64_t>() + j * kH * kW);
    }
    pos_ += n;
    return true;
  }
  std::int64_t sample_count(Split s) const override {
    return static_cast<std::int64_t>(files_[s == Split::Train ? 0 : 1].size());
  }
  std::vector<std::string> sample_files(Split s, std::int64_t i) const override {
    return {files_[s == Split::Train ? 0 : 1].at(static_cast<std::size_t>(i))};
  }
  std::vector<std::int64_t> sample_shape() const override { return {kC, kH, kW}; }
  void read_sample(const std::vector<std::string>& files, float* data, std::int64_t* labels) const override {
    thread_local std::mt19937 gen(std::hash<std::thread::id>()(std::this_thread::get_id()));
    std::this_thread::sleep_for(delay_ > 0 ? std::chrono::microseconds(delay_)
                                           : std::chrono::microseconds(gen() % 400));
    {
      std::lock_guard<std::mutex> lock(mutex_);
      read_paths_.push_back(files.at(0));
    }
    ++reads_;
    std::istringstream in(read_text(files.at(0)));
    std::string split;
    std::int64_t i = -1;
    in >> split >> i;
    if (i < 0) throw Error(files[0] + ": not a fake sample");
    if (i == fail_at_ && (fail_split_.empty() || split == fail_split_)) throw Error(files[0] + ": injected failure");
    const float base = (split == "train" ? 0.0f : 0.5f) + static_cast<float>(i);
    for (std::int64_t k = 0; k < kC * kH * kW; ++k) data[k] = base + static_cast<float>(k) / 1000.0f;
    for (std::int64_t k = 0; k < kH * kW; ++k) labels[k] = i * 100 + k;
  }

  std::int64_t fail_at_ = -1;
  std::string fail_split_;  // "train" or "validation": fail_at_ there only; "": in both
  std::int64_t delay_ = 0;  // microseconds per read; 0: random, below 400
  mutable std::atomic<std::int64_t> reads_{0};
  mutable std::mutex mutex_;
  mutable std::vector<std::string> read_paths_;

 private:
  ReaderContext ctx_;
  std::vector<std::string> files_[2];
  Split split_ = Split::Train;
  std::vector<std::int64_t> order_;
  std::int64_t pos_ = 0;
};

ReaderContext context(std::int64_t train_bs = 3, std::int64_t val_bs = 2, int rank = 0, int world = 1) {
  ReaderContext c{};
  c.train_batch_size = train_bs;
  c.validation_batch_size = val_bs;
  c.rank = rank;
  c.world_size = world;
  c.seed = 7;
  c.log = nullptr;
  return c;
}

PrefetchOptions options(int threads, int depth, ShuffleMode mode = ShuffleMode::Global) {
  PrefetchOptions o;
  o.threads = threads;
  o.depth = depth;
  o.shuffle_mode = mode;
  o.where = "test.toml [reader]";
  return o;
}

struct Drained {
  std::vector<at::Tensor> data, labels;
};

Drained drain(deepcam::Reader& r, Split s, std::int64_t epoch) {
  Drained d;
  r.start_epoch(s, epoch);
  Batch b;
  while (r.next(b)) {
    d.data.push_back(b.data.clone());
    d.labels.push_back(b.labels.clone());
  }
  return d;
}

bool same(const Drained& a, const Drained& b) {
  if (a.data.size() != b.data.size()) return false;
  for (std::size_t i = 0; i < a.data.size(); ++i) {
    if (!at::equal(a.data[i], b.data[i]) || !at::equal(a.labels[i], b.labels[i])) return false;
  }
  return true;
}

// Bit for bit: the float tensors compared as int32 (at::equal on floats
// would take -0.0 for 0.0).
bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return false;
  if (a.scalar_type() != at::kFloat) return at::equal(a.contiguous(), b.contiguous());
  return at::equal(a.contiguous().view(at::kInt), b.contiguous().view(at::kInt));
}

bool same_bits(const Drained& a, const Drained& b) {
  if (a.data.size() != b.data.size()) return false;
  for (std::size_t i = 0; i < a.data.size(); ++i) {
    if (!same_bits(a.data[i], b.data[i]) || !same_bits(a.labels[i], b.labels[i])) return false;
  }
  return true;
}

// deepcam-data synth's HDF5 data set in dir/data, for the readers over it.
ReaderContext synth_context(const fs::path& dir, std::vector<std::int64_t> channels) {
  const std::string cmd = std::string(DEEPCAM_BUILD_ROOT) + "/core/deepcam-data synth --out " + dir.string() +
                          "/data --train 7 --validation 3 --height 16 --width 24 --seed 4 > /dev/null 2>&1";
  REQUIRE(std::system(cmd.c_str()) == 0);
  ReaderContext ctx = context(2, 2);
  ctx.data_root = (dir / "data").string();
  ctx.channels = std::move(channels);
  return ctx;
}

template <typename F>
bool eventually(F&& f) {
  for (int i = 0; i < 400; ++i) {
    if (f()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return f();
}

}  // namespace

TEST_CASE("batches do not depend on the number of threads and equal the source's own order in global mode") {
  TempDir dir;
  const auto ctx = context(3, 2);
  FakeSource reference(dir.path, 17, 5, ctx);
  const Drained own0 = drain(reference, Split::Train, 0), own1 = drain(reference, Split::Train, 1);
  const Drained own_val = drain(reference, Split::Validation, 0);
  REQUIRE(own0.data.size() == 6);  // 17 samples, batches of 3: the last has 2
  CHECK(own0.data.back().size(0) == 2);
  CHECK(!same(own0, own1));  // a new permutation each epoch
  for (int threads : {1, 2, 5}) {
    for (int depth : {1, 3}) {
      INFO("threads " << threads << " depth " << depth);
      PrefetchReader r(ctx, options(threads, depth), std::make_unique<FakeSource>(dir.path, 17, 5, ctx));
      CHECK(r.global_samples(Split::Train) == 17);
      CHECK(r.local_samples(Split::Train) == 17);
      CHECK(r.global_samples(Split::Validation) == 5);
      CHECK(same(drain(r, Split::Train, 0), own0));
      CHECK(same(drain(r, Split::Validation, 0), own_val));
      CHECK(same(drain(r, Split::Train, 1), own1));
    }
  }
}

TEST_CASE("node and gpu modes: the order follows the core sharding, whatever the thread count") {
  TempDir dir;
  for (ShuffleMode mode : {ShuffleMode::Node, ShuffleMode::Gpu}) {
    // Rank 1 of 4, two ranks per node.
    ReaderContext ctx = context(2, 2, 1, 4);
    ctx.local_rank = 1;
    ctx.local_size = 2;
    deepcam::ShardingSetup setup;
    setup.files = 23;
    setup.rank = 1;
    setup.world_size = 4;
    setup.local_rank = 1;
    setup.local_size = 2;
    setup.seed = 7;
    setup.mode = mode;
    setup.oversampling_factor = 2;
    const deepcam::TrainingSharding sharding(setup);
    Drained first;
    for (int threads : {1, 2, 5}) {
      INFO(deepcam::to_string(mode) << " threads " << threads);
      auto o = options(threads, 2, mode);
      o.oversampling_factor = 2;
      PrefetchReader r(ctx, o, std::make_unique<FakeSource>(dir.path / deepcam::to_string(mode), 23, 6, ctx));
      CHECK(r.global_samples(Split::Train) == sharding.global_samples());
      CHECK(r.local_samples(Split::Train) == sharding.local_samples());
      for (std::int64_t epoch : {0, 1, 2}) {
        const Drained d = drain(r, Split::Train, epoch);
        CHECK(r.epoch_order() == sharding.order(epoch));
        // Sample i's first value is i: the batches hold the order's samples.
        std::vector<std::int64_t> seen;
        for (const auto& t : d.data) {
          for (std::int64_t j = 0; j < t.size(0); ++j) {
            seen.push_back(static_cast<std::int64_t>(t.data_ptr<float>()[j * kC * kH * kW]));
          }
        }
        CHECK(seen == sharding.order(epoch));
        if (epoch == 1) {
          if (threads == 1) first = d;
          else CHECK(same(d, first));
        }
      }
    }
  }
}

TEST_CASE("the ring reads ahead exactly depth batches beyond those the consumer holds") {
  TempDir dir;
  const auto ctx = context(2, 2);
  auto source = std::make_unique<FakeSource>(dir.path, 40, 2, ctx);
  FakeSource* fake = source.get();
  const int depth = 3;
  PrefetchReader r(ctx, options(4, depth), std::move(source));
  r.start_epoch(Split::Train, 0);
  // Nothing consumed: the ring's depth + 2 slots fill, then the workers wait.
  const std::int64_t full = (depth + 2) * 2;
  CHECK(eventually([&] { return fake->reads_.load() == full; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK(fake->reads_.load() == full);
  Batch b;
  REQUIRE(r.next(b));  // batch 0 handed out, held
  REQUIRE(r.next(b));  // batch 1 handed out; batch 0 still counted as held
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK(fake->reads_.load() == full);
  REQUIRE(r.next(b));  // batch 2: batch 0 goes back, one more batch is read
  CHECK(eventually([&] { return fake->reads_.load() == full + 2; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK(fake->reads_.load() == full + 2);
}

TEST_CASE("while the ring keeps up, the training step does not wait for reads") {
  // Reads of 20 ms per sample, 2 samples per batch, 4 workers: a batch takes
  // ~10 ms of reading with the ring; the "training step" takes 30 ms. After
  // the first batch, next() should find every batch ready. Sleeps, not CPU
  // work, so that a busy machine cannot make the reads slower than the step.
  TempDir dir;
  const auto ctx = context(2, 2);
  auto source = std::make_unique<FakeSource>(dir.path, 24, 2, ctx);
  source->delay_ = 20000;
  PrefetchReader r(ctx, options(4, 3), std::move(source));
  r.start_epoch(Split::Train, 0);
  Batch b;
  REQUIRE(r.next(b));
  double waited = 0.0;
  std::int64_t batches = 1;
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    const auto t0 = std::chrono::steady_clock::now();
    if (!r.next(b)) break;
    waited += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++batches;
  }
  CHECK(batches == 12);
  // Read in line, the 11 batches would cost 11 x 40 ms of waiting.
  INFO("waited " << waited << " s");
  CHECK(waited < 0.05);
}

TEST_CASE("on CUDA: batches arrive on the GPU, equal to the CPU path (runs where a GPU is present)") {
  if (!at::hasCUDA()) {
    MESSAGE("no CUDA device: the pinned-memory and side-stream path is not run here");
    return;
  }
  TempDir dir;
  ReaderContext cpu = context(3, 2);
  ReaderContext gpu = cpu;
  gpu.device = "cuda";
  PrefetchReader on_cpu(cpu, options(2, 2), std::make_unique<FakeSource>(dir.path, 11, 4, cpu));
  PrefetchReader on_gpu(gpu, options(2, 2), std::make_unique<FakeSource>(dir.path, 11, 4, gpu));
  for (Split s : {Split::Train, Split::Validation}) {
    on_cpu.start_epoch(s, 1);
    on_gpu.start_epoch(s, 1);
    Batch a, b;
    while (on_cpu.next(a)) {
      REQUIRE(on_gpu.next(b));
      CHECK(b.data.is_cuda());
      CHECK(b.labels.is_cuda());
      CHECK(at::equal(a.data, b.data.cpu()));
      CHECK(at::equal(a.labels, b.labels.cpu()));
    }
    CHECK(!on_gpu.next(b));
  }
}

TEST_CASE("on CUDA over the HDF5 reader: normalised on the GPU, the batches of the CPU path bit for bit") {
  if (!at::hasCUDA()) {
    MESSAGE("no CUDA device: the GPU normalisation is not run here");
    return;
  }
  TempDir dir;
  // All 16 channels (the CPU's vector path) and a mixed selection.
  for (const std::vector<std::int64_t>& channels :
       {std::vector<std::int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
        std::vector<std::int64_t>{3, 0, 15}}) {
    INFO(channels.size());
    const TempDir data;
    const ReaderContext cpu = synth_context(data.path, channels);
    ReaderContext gpu = cpu;
    gpu.device = "cuda";
    deepcam::readers::Hdf5ReaderOptions ho;
    ho.threads = 1;
    PrefetchReader on_cpu(cpu, options(2, 2), std::make_unique<deepcam::readers::Hdf5Reader>(cpu, ho));
    PrefetchReader on_gpu(gpu, options(2, 2), std::make_unique<deepcam::readers::Hdf5Reader>(gpu, ho));
    CHECK(!on_cpu.normalises_on_device());
    CHECK(on_gpu.normalises_on_device());
    for (std::int64_t epoch : {0, 1}) {
      const Drained a = drain(on_cpu, Split::Train, epoch);
      const Drained b = drain(on_gpu, Split::Train, epoch);
      REQUIRE(!b.data.empty());
      CHECK(b.data.front().is_cuda());
      CHECK(b.data.front().is_contiguous());
      Drained b_host;
      for (std::size_t i = 0; i < b.data.size(); ++i) {
        b_host.data.push_back(b.data[i].cpu());
        b_host.labels.push_back(b.labels[i].cpu());
      }
      CHECK(same_bits(a, b_host));
    }
    const Drained a = drain(on_cpu, Split::Validation, 0);
    Drained b = drain(on_gpu, Split::Validation, 0);
    for (auto& t : b.data) t = t.cpu();
    for (auto& t : b.labels) t = t.cpu();
    CHECK(same_bits(a, b));
  }
  // A source that is not a file reader: normalised by itself, on the CPU.
  ReaderContext gpu = context(3, 2);
  gpu.device = "cuda";
  PrefetchReader fake_gpu(gpu, options(1, 1), std::make_unique<FakeSource>(dir.path, 5, 2, gpu));
  CHECK(!fake_gpu.normalises_on_device());
}

TEST_CASE("the GPU's normalisation run on the CPU: raw samples through normalise_batch are the HDF5 reader's batches") {
  // What the side stream runs on CUDA, with the same at:: ops on CPU
  // tensors, against the HDF5 reader's own batches, bit for bit.
  for (const std::vector<std::int64_t>& channels :
       {std::vector<std::int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
        std::vector<std::int64_t>{3, 0, 15}, std::vector<std::int64_t>{9, 10, 11, 12, 2}}) {
    INFO(channels.size());
    TempDir dir;
    const ReaderContext ctx = synth_context(dir.path, channels);
    deepcam::readers::Hdf5ReaderOptions ho;
    ho.threads = 2;
    deepcam::readers::Hdf5Reader own(ctx, ho);
    const auto c = static_cast<std::int64_t>(channels.size());
    std::vector<float> shift = own.shift(), scale = own.scale();
    const at::Tensor shift_t = at::from_blob(shift.data(), {c}, at::kFloat);
    const at::Tensor scale_t = at::from_blob(scale.data(), {c}, at::kFloat);
    for (const Split split : {Split::Train, Split::Validation}) {
      own.start_epoch(split, 1);
      const std::vector<std::string> files = own.epoch_files();
      std::size_t position = 0;
      Batch batch;
      while (own.next(batch)) {
        const std::int64_t n = batch.data.size(0);
        at::Tensor raw = at::empty({n, 16, 24, c}, at::kFloat);
        at::Tensor labels = at::empty({n, 16, 24}, at::kLong);
        for (std::int64_t j = 0; j < n; ++j) {
          own.read_sample_selected({files.at(position++)}, raw.data_ptr<float>() + j * 16 * 24 * c,
                                   labels.data_ptr<std::int64_t>() + j * 16 * 24);
        }
        const at::Tensor normalised = deepcam::readers::normalise_batch(raw, shift_t, scale_t);
        CHECK(normalised.is_contiguous());
        CHECK(same_bits(normalised, batch.data));
        CHECK(same_bits(labels, batch.labels));
      }
      CHECK(position == files.size());
    }
    // On the CPU the prefetch reader keeps the source's own normalisation.
    PrefetchReader r(ctx, options(2, 2), std::make_unique<deepcam::readers::Hdf5Reader>(ctx, ho));
    CHECK(!r.normalises_on_device());
  }
}

TEST_CASE("a batch the consumer keeps is never overwritten by later batches") {
  TempDir dir;
  const auto ctx = context(2, 2);
  PrefetchReader r(ctx, options(3, 1), std::make_unique<FakeSource>(dir.path, 30, 2, ctx));
  r.start_epoch(Split::Train, 0);
  Batch b;
  REQUIRE(r.next(b));
  const at::Tensor kept = b.data, kept_labels = b.labels;
  const at::Tensor copy = kept.clone(), copy_labels = kept_labels.clone();
  std::int64_t batches = 1;
  while (r.next(b)) ++batches;
  CHECK(batches == 15);
  CHECK(at::equal(kept, copy));
  CHECK(at::equal(kept_labels, copy_labels));
}

TEST_CASE("starting another epoch mid-way drops the read-ahead and serves the new split") {
  TempDir dir;
  const auto ctx = context(2, 2);
  FakeSource reference(dir.path, 20, 7, ctx);
  const Drained val = drain(reference, Split::Validation, 0);
  PrefetchReader r(ctx, options(3, 4), std::make_unique<FakeSource>(dir.path, 20, 7, ctx));
  for (int round = 0; round < 3; ++round) {
    r.start_epoch(Split::Train, round);
    Batch b;
    REQUIRE(r.next(b));
    CHECK(same(drain(r, Split::Validation, 0), val));
  }
}

// One call of a sequence: begin (split, epoch), take `take` batches (-1:
// all, and the end), then, if `settle`, let the workers read ahead as far
// as they will before the next call.
struct Call {
  Split split;
  std::int64_t epoch;
  int take;
  bool settle;
};

// Waits until the source's read count stops changing: the workers have
// read ahead as far as they may.
void settle(const FakeSource& fake) {
  std::int64_t before = -1;
  while (fake.reads_.load() != before) {
    before = fake.reads_.load();
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

TEST_CASE("every sequence of calls returns exactly the plain reader's batches, read ahead or not") {
  TempDir dir;
  // 21 training samples in batches of 2 (the last has 1), 7 validation
  // samples in batches of 3.
  const auto ctx = context(2, 3);
  FakeSource reference(dir.path, 21, 7, ctx);
  const std::vector<std::pair<const char*, std::vector<Call>>> sequences = {
      {"train e, val, train e+1 (the engine)",
       {{Split::Train, 0, -1, true}, {Split::Validation, 0, -1, true}, {Split::Train, 1, -1, true},
        {Split::Validation, 1, -1, false}, {Split::Train, 2, -1, false}}},
      {"the engine, dropping the last incomplete training batch",
       {{Split::Train, 0, 10, true}, {Split::Validation, 0, -1, true}, {Split::Train, 1, 10, false},
        {Split::Validation, 0, -1, false}, {Split::Train, 2, 10, true}}},
      {"train e, train e+1 (no validation)",
       {{Split::Train, 0, -1, true}, {Split::Train, 1, -1, true}, {Split::Train, 2, -1, false}}},
      {"train e, train e+2 (a skip)", {{Split::Train, 0, -1, true}, {Split::Train, 2, -1, true}}},
      {"validation first (evaluate), then training from epoch 0 and from epoch 4 (a resume)",
       {{Split::Validation, 0, -1, true}, {Split::Train, 0, -1, false}, {Split::Validation, 0, -1, true},
        {Split::Train, 4, -1, true}, {Split::Validation, 0, -1, true}}},
      {"partial epochs abandoned mid-way",
       {{Split::Train, 0, 3, true}, {Split::Validation, 0, 1, true}, {Split::Train, 1, 0, true},
        {Split::Train, 1, 2, false}, {Split::Validation, 0, 2, false}, {Split::Train, 2, -1, true},
        {Split::Train, 2, 5, true}, {Split::Train, 3, -1, true}}},
      {"the same epoch again after its end", {{Split::Train, 5, -1, true}, {Split::Train, 5, -1, true},
                                               {Split::Validation, 0, -1, true}, {Split::Validation, 0, -1, true}}},
  };
  std::map<std::pair<int, std::int64_t>, Drained> plain;
  auto expected = [&](Split s, std::int64_t e) -> const Drained& {
    const auto key = std::make_pair(s == Split::Train ? 0 : 1, e);
    if (!plain.count(key)) plain[key] = drain(reference, s, e);
    return plain[key];
  };
  for (const auto& [name, calls] : sequences) {
    for (int threads : {1, 3}) {
      for (int depth : {1, 2, 5}) {
        INFO(name << ", threads " << threads << " depth " << depth);
        auto source = std::make_unique<FakeSource>(dir.path, 21, 7, ctx);
        const FakeSource* fake = source.get();
        PrefetchReader r(ctx, options(threads, depth), std::move(source));
        for (const Call& call : calls) {
          INFO(deepcam::to_string(call.split) << " epoch " << call.epoch << " take " << call.take);
          const Drained& want = expected(call.split, call.epoch);
          r.start_epoch(call.split, call.epoch);
          Batch b;
          const std::size_t n = call.take < 0 ? want.data.size() : static_cast<std::size_t>(call.take);
          for (std::size_t k = 0; k < n; ++k) {
            REQUIRE(r.next(b));
            CHECK(at::equal(b.data, want.data[k]));
            CHECK(at::equal(b.labels, want.labels[k]));
          }
          if (call.take < 0) CHECK(!r.next(b));
          if (call.settle) settle(*fake);
        }
      }
    }
  }
}

TEST_CASE("the next epochs are read ahead within depth more buffers, and found ready") {
  TempDir dir;
  // 20 training samples in batches of 2, 7 validation samples in batches of
  // 2 (the last has 1); 20 ms per read.
  const auto ctx = context(2, 2);
  auto source = std::make_unique<FakeSource>(dir.path, 20, 7, ctx);
  FakeSource* fake = source.get();
  fake->delay_ = 20000;
  const int depth = 2;
  PrefetchReader r(ctx, options(4, depth), std::move(source));
  auto first_wait = [&](Split s, std::int64_t e, Batch& b) {
    const auto t0 = std::chrono::steady_clock::now();
    r.start_epoch(s, e);
    REQUIRE(r.next(b));
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  std::set<const void*> buffers;
  {
    Batch b;
    r.start_epoch(Split::Train, 0);
    while (r.next(b)) buffers.insert(b.data.data_ptr());
  }
  settle(*fake);
  // Training epoch 0, then `depth` batches of validation and `depth` of
  // training epoch 1, read ahead.
  CHECK(fake->reads_.load() == 20 + 2 * depth + 2 * depth);
  {
    Batch b;
    const double waited = first_wait(Split::Validation, 0, b);
    INFO("validation's first batch waited " << waited << " s");
    CHECK(waited < 0.015);  // one read takes 20 ms
    buffers.insert(b.data.data_ptr());
    while (r.next(b)) buffers.insert(b.data.data_ptr());
  }
  settle(*fake);
  // All of validation; training epoch 1 still has its `depth` batches.
  CHECK(fake->reads_.load() == 20 + 7 + 2 * depth);
  {
    Batch b;
    const double waited = first_wait(Split::Train, 1, b);
    INFO("training epoch 1's first batch waited " << waited << " s");
    CHECK(waited < 0.015);
    buffers.insert(b.data.data_ptr());
    while (r.next(b)) buffers.insert(b.data.data_ptr());
  }
  settle(*fake);
  CHECK(fake->reads_.load() == 20 + 7 + 20 + 2 * depth + 2 * depth);
  // Neither batch was kept by the consumer: the pool's buffers were reused,
  // never more than 2 * depth + 2 of them.
  CHECK(buffers.size() <= static_cast<std::size_t>(2 * depth + 2));
  CHECK(buffers.size() > static_cast<std::size_t>(depth + 2));
}

TEST_CASE("a failure read ahead is reported only if its epoch is begun, at its batch") {
  TempDir dir;
  const auto ctx = context(2, 2);
  auto source = std::make_unique<FakeSource>(dir.path, 10, 7, ctx);
  FakeSource* fake = source.get();
  fake->fail_at_ = 3;  // validation batch 1
  fake->fail_split_ = "validation";
  PrefetchReader r(ctx, options(3, 3), std::move(source));
  FakeSource reference(dir.path, 10, 7, ctx);
  const Drained own1 = drain(reference, Split::Train, 1);
  drain(r, Split::Train, 0);
  settle(*fake);
  // Validation's failed batch was read ahead; a run that does not validate
  // never sees it.
  CHECK(same(drain(r, Split::Train, 1), own1));
  settle(*fake);
  r.start_epoch(Split::Validation, 0);
  Batch b;
  CHECK(r.next(b));
  CHECK_THROWS_WITH_AS(r.next(b), doctest::Contains("sample-1003.bin: injected failure"), Error);
}

TEST_CASE("a failed sample is reported at its batch, after the batches before it") {
  TempDir dir;
  const auto ctx = context(2, 2);
  auto source = std::make_unique<FakeSource>(dir.path, 10, 2, ctx);
  const auto order = deepcam::training_indices(10, 0, 1, 7, 0);
  source->fail_at_ = order[5];  // the second sample of batch 2
  PrefetchReader r(ctx, options(4, 4), std::move(source));
  r.start_epoch(Split::Train, 0);
  Batch b;
  CHECK(r.next(b));
  CHECK(r.next(b));
  CHECK_THROWS_WITH_AS(r.next(b), doctest::Contains("injected failure"), Error);
  // The reader stays usable: the next epoch starts afresh.
  r.start_epoch(Split::Validation, 0);
  CHECK(r.next(b));
}

TEST_CASE("staging copies the rank's samples, checks them, reads them and removes them at exit") {
  TempDir data, stage;
  const auto ctx = context(2, 2);
  std::string staged_dir;
  {
    std::FILE* log_file = std::tmpfile();
    deepcam::MlperfLog log(log_file, true);
    ReaderContext c = ctx;
    c.log = &log;
    auto o = options(3, 2);
    o.stage_dir = stage.path.string();
    auto source = std::make_unique<FakeSource>(data.path, 9, 4, ctx);
    FakeSource* fake = source.get();
    PrefetchReader r(c, o, std::move(source));
    staged_dir = r.staging_dir();
    REQUIRE(!staged_dir.empty());
    CHECK(fs::path(staged_dir).parent_path() == stage.path);
    // Every copy equals its source, byte for byte, under the same name.
    for (Split s : {Split::Train, Split::Validation}) {
      for (std::int64_t i = 0; i < r.sample_count(s); ++i) {
        const auto copy = r.sample_files(s, i).at(0);
        const auto orig = fake->sample_files(s, i).at(0);
        CHECK(copy.rfind(staged_dir, 0) == 0);
        CHECK(fs::path(copy).filename() == fs::path(orig).filename());
        CHECK(read_text(copy) == read_text(orig));
      }
    }
    fake->read_paths_.clear();
    FakeSource reference(data.path, 9, 4, ctx);
    CHECK(same(drain(r, Split::Train, 0), drain(reference, Split::Train, 0)));
    CHECK(same(drain(r, Split::Validation, 0), drain(reference, Split::Validation, 0)));
    // Every sample read (the next training epoch, read ahead, reads the
    // same training files again), and only from the copies.
    for (const auto& p : fake->read_paths_) CHECK(p.rfind(staged_dir, 0) == 0);
    CHECK(std::set<std::string>(fake->read_paths_.begin(), fake->read_paths_.end()).size() == 13);
    // staging_start / staging_stop, in that order, with the count of files.
    std::fflush(log_file);
    std::rewind(log_file);
    std::string text;
    char buf[4096];
    for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, log_file)) > 0;) text.append(buf, n);
    std::fclose(log_file);
    const auto start = text.find("\"key\": \"staging_start\""), stop = text.find("\"key\": \"staging_stop\"");
    CHECK(start != std::string::npos);
    CHECK(stop != std::string::npos);
    CHECK(start < stop);
    CHECK(text.find("\"staged_files\": 13") != std::string::npos);
  }
  CHECK(!fs::exists(staged_dir));
  CHECK(entries(stage.path).empty());
}

TEST_CASE("staging that fails half-way leaves no copies behind") {
  TempDir data, stage;
  const auto ctx = context(2, 2);
  auto source = std::make_unique<FakeSource>(data.path, 12, 3, ctx);
  // The ninth training file disappears after listing: its copy fails.
  fs::remove(source->sample_files(Split::Train, 8).at(0));
  auto o = options(2, 2);
  o.stage_dir = stage.path.string();
  CHECK_THROWS_WITH_AS(PrefetchReader(ctx, o, std::move(source)),
                       doctest::Contains("sample-1008.bin: cannot open for staging"), Error);
  CHECK(entries(stage.path).empty());

  o.stage_dir = (stage.path / "missing").string();
  const std::string expected = "test.toml [reader] stage_dir = \"" + o.stage_dir + "\": no such directory";
  CHECK_THROWS_WITH_AS(PrefetchReader(ctx, o, std::make_unique<FakeSource>(data.path, 3, 3, ctx)),
                       doctest::Contains(expected.c_str()), Error);
}

TEST_CASE("a staging copy that cannot be written (file size limit) is an error naming it, and nothing is left") {
  TempDir data, stage;
  const std::string big = (data.path / "big.bin").string();
  std::ofstream(big) << std::string(200000, 'b');
  // In a child: the file size limit and an ignored SIGXFSZ make write()
  // fail with EFBIG, as a full disk fails with ENOSPC.
  int pipe_fds[2];
  REQUIRE(::pipe(pipe_fds) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(pipe_fds[0]);
    std::signal(SIGXFSZ, SIG_IGN);
    struct rlimit limit{65536, 65536};
    ::setrlimit(RLIMIT_FSIZE, &limit);
    std::string message = "no error";
    try {
      StagingArea area(stage.path.string(), "test.toml [reader] stage_dir");
      area.copy(big, "train");
    } catch (const Error& e) {
      message = e.what();
    }
    (void)!::write(pipe_fds[1], message.data(), message.size());
    ::_exit(0);
  }
  ::close(pipe_fds[1]);
  std::string message;
  char buf[1024];
  for (ssize_t n; (n = ::read(pipe_fds[0], buf, sizeof buf)) > 0;) message.append(buf, static_cast<std::size_t>(n));
  ::close(pipe_fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  CHECK(message.find("big.bin: cannot write the staged copy of " + big) != std::string::npos);
  CHECK(message.find("File too large") != std::string::npos);
  CHECK(message.find("point stage_dir at a larger directory") != std::string::npos);
  CHECK(entries(stage.path).empty());
}

TEST_CASE("staging directories left by runs that are gone are found, live ones are not") {
  TempDir stage;
  pid_t dead = 4194000;
  while (::kill(dead, 0) == 0 || errno != ESRCH) --dead;
  const fs::path gone = stage.path / ("deepcam-stage-" + std::to_string(dead) + "-a1b2c3");
  const fs::path live = stage.path / ("deepcam-stage-" + std::to_string(::getpid()) + "-d4e5f6");
  fs::create_directories(gone / "train");
  fs::create_directories(live);
  fs::create_directories(stage.path / "deepcam-stage-XYZ");
  CHECK(deepcam::readers::leftover_areas(stage.path.string()) == std::vector<std::string>{gone.string()});
  {
    StagingArea area(stage.path.string(), "test.toml [reader] stage_dir");
    CHECK(fs::path(area.dir()).filename().string().rfind("deepcam-stage-" + std::to_string(::getpid()) + "-", 0) == 0);
    CHECK(deepcam::readers::leftover_areas(stage.path.string()).size() == 1);
  }
  // Only reported: another job's data is not ours to remove.
  CHECK(fs::exists(gone / "train"));
  CHECK(fs::exists(live));
}

TEST_CASE("checksum: every byte counts, and chunked equals whole") {
  std::string a(1003, 'a');
  const auto whole = deepcam::readers::checksum(a.data(), a.size());
  CHECK(deepcam::readers::checksum(a.data() + 500, 503, deepcam::readers::checksum(a.data(), 500)) != 0);
  CHECK(deepcam::readers::checksum(a.data() + 496, 507, deepcam::readers::checksum(a.data(), 496)) == whole);
  for (std::size_t i : {0u, 7u, 8u, 1002u}) {
    std::string b = a;
    b[i] = 'b';
    CHECK(deepcam::readers::checksum(b.data(), b.size()) != whole);
  }
}

TEST_CASE("over the HDF5 reader: the same batches as the HDF5 reader's own, and its validation split") {
  TempDir dir;
  const std::string cmd = std::string(DEEPCAM_BUILD_ROOT) + "/core/deepcam-data synth --out " + dir.path.string() +
                          "/data --train 7 --validation 3 --height 16 --width 24 --seed 4 > /dev/null 2>&1";
  REQUIRE(std::system(cmd.c_str()) == 0);
  ReaderContext ctx = context(2, 2);
  ctx.data_root = (dir.path / "data").string();
  ctx.channels = {3, 0, 15};
  deepcam::readers::Hdf5ReaderOptions ho;
  ho.threads = 1;
  deepcam::readers::Hdf5Reader own(ctx, ho);
  for (int threads : {1, 3}) {
    PrefetchReader r(ctx, options(threads, 2), std::make_unique<deepcam::readers::Hdf5Reader>(ctx, ho));
    CHECK(r.sample_shape() == std::vector<std::int64_t>{3, 16, 24});
    for (std::int64_t epoch : {0, 1}) CHECK(same(drain(r, Split::Train, epoch), drain(own, Split::Train, epoch)));
    CHECK(same(drain(r, Split::Validation, 0), drain(own, Split::Validation, 0)));
    CHECK(r.global_samples(Split::Train) == own.global_samples(Split::Train));
  }
}
